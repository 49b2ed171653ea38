// ClipGradNorm and AdamWStep against libtorch's clip_grad_norm_ and
// torch::optim::AdamW::step over several steps: values, state, fallbacks.
#include "edge-agent/optim.h"

#include <torch/torch.h>

#include <vector>

#include "gtest/gtest.h"

namespace fedlora::edge {
namespace {

std::vector<torch::Tensor> Leaves(const std::vector<std::vector<int64_t>>& shapes, uint64_t seed) {
  torch::manual_seed(seed);
  std::vector<torch::Tensor> out;
  for (const auto& s : shapes) out.push_back(torch::randn(s).requires_grad_(true));
  return out;
}

std::vector<torch::Tensor> Copies(const std::vector<torch::Tensor>& ps) {
  std::vector<torch::Tensor> out;
  for (const auto& p : ps) out.push_back(p.detach().clone().requires_grad_(true));
  return out;
}

// The same gradients on both sets: g = sin(step + index) * randn (seeded).
void SetGrads(std::vector<torch::Tensor>& a, std::vector<torch::Tensor>& b, int step) {
  torch::manual_seed(1000 + step);
  for (size_t i = 0; i < a.size(); ++i) {
    torch::Tensor g = torch::randn(a[i].sizes()) * (0.5 + std::sin(step + i));
    a[i].mutable_grad() = g.clone();
    b[i].mutable_grad() = g.clone();
  }
}

double RelDiff(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a - b).abs().max() / (b.abs().max() + 1e-12)).item<double>();
}

const std::vector<std::vector<int64_t>> kShapes = {{8, 576}, {576, 8}, {1536, 8}, {3}, {8, 40}};

TEST(OptimTest, AdamWStepMatchesLibtorchOverSteps) {
  for (double wd : {0.0, 0.01}) {
    auto ours = Leaves(kShapes, 1), theirs = Copies(ours);
    auto opts = torch::optim::AdamWOptions(3e-3).weight_decay(wd).betas({0.9, 0.95}).eps(1e-7);
    torch::optim::AdamW a(ours, opts), b(theirs, opts);
    for (int step = 0; step < 6; ++step) {
      SetGrads(ours, theirs, step);
      // A schedule changes lr between steps, as the engine's does.
      for (auto* o : {&a, &b}) {
        static_cast<torch::optim::AdamWOptions&>(o->param_groups()[0].options()).lr(3e-3 / (step + 1));
      }
      AdamWStep(a);
      b.step();
    }
    for (size_t i = 0; i < ours.size(); ++i) {
      EXPECT_LT(RelDiff(ours[i], theirs[i]), 1e-6) << "param " << i << " wd " << wd;
      const auto& sa = static_cast<torch::optim::AdamWParamState&>(*a.state().at(AdamStateKey(ours[i])));
      const auto& sb = static_cast<torch::optim::AdamWParamState&>(*b.state().at(AdamStateKey(theirs[i])));
      EXPECT_EQ(sa.step(), 6);
      EXPECT_EQ(sa.step(), sb.step());
      EXPECT_LT(RelDiff(sa.exp_avg(), sb.exp_avg()), 1e-6);
      EXPECT_LT(RelDiff(sa.exp_avg_sq(), sb.exp_avg_sq()), 1e-6);
    }
    // The update moved the parameters (the comparison above is not of two no-ops).
    EXPECT_GT(RelDiff(ours[0], Leaves(kShapes, 1)[0]), 1e-4);
  }
}

// State made by libtorch's step is continued by AdamWStep and the other way
// round (checkpoints restore it into the optimizer either may run).
TEST(OptimTest, StateIsSharedWithLibtorchsStep) {
  auto ours = Leaves(kShapes, 2), theirs = Copies(ours);
  torch::optim::AdamW a(ours, torch::optim::AdamWOptions(1e-3)), b(theirs, torch::optim::AdamWOptions(1e-3));
  for (int step = 0; step < 4; ++step) {
    SetGrads(ours, theirs, step);
    if (step % 2 == 0) {
      a.step();
    } else {
      AdamWStep(a);
    }
    b.step();
  }
  for (size_t i = 0; i < ours.size(); ++i) EXPECT_LT(RelDiff(ours[i], theirs[i]), 1e-6) << i;
  EXPECT_EQ(a.state().size(), ours.size());
}

TEST(OptimTest, ParametersWithoutAGradientAreLeftAlone) {
  auto ps = Leaves({{4, 4}, {4, 4}}, 3);
  torch::Tensor before = ps[1].detach().clone();
  torch::optim::AdamW opt(ps, torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  ps[0].mutable_grad() = torch::ones({4, 4});
  AdamWStep(opt);
  EXPECT_TRUE(torch::equal(ps[1], before));
  EXPECT_EQ(opt.state().count(AdamStateKey(ps[1])), 0u);
  EXPECT_EQ(opt.state().count(AdamStateKey(ps[0])), 1u);
}

TEST(OptimTest, AmsgradAndStridedParametersFallBackToLibtorch) {
  // amsgrad: not in the fused update; the result is libtorch's own, bit for bit.
  {
    auto ours = Leaves(kShapes, 4), theirs = Copies(ours);
    auto opts = torch::optim::AdamWOptions(1e-3).amsgrad(true);
    torch::optim::AdamW a(ours, opts), b(theirs, opts);
    for (int step = 0; step < 3; ++step) {
      SetGrads(ours, theirs, step);
      AdamWStep(a);
      b.step();
    }
    for (size_t i = 0; i < ours.size(); ++i) EXPECT_TRUE(torch::equal(ours[i], theirs[i])) << i;
  }
  // A transposed (non-contiguous) parameter.
  {
    torch::manual_seed(5);
    torch::Tensor p = torch::randn({6, 5}).t().requires_grad_(true);
    torch::Tensor q = p.detach().clone().t().contiguous().t().requires_grad_(true);
    ASSERT_FALSE(p.is_contiguous());
    torch::optim::AdamW a({p}, torch::optim::AdamWOptions(1e-2)), b({q}, torch::optim::AdamWOptions(1e-2));
    torch::Tensor g = torch::randn({5, 6});
    p.mutable_grad() = g.clone();
    q.mutable_grad() = g.clone();
    AdamWStep(a);
    b.step();
    EXPECT_TRUE(torch::equal(p, q));
  }
}

TEST(OptimTest, ClipGradNormMatchesLibtorch) {
  for (double max_norm : {1e9, 1.0, 0.05}) {
    auto ours = Leaves(kShapes, 6), theirs = Copies(ours);
    SetGrads(ours, theirs, 0);
    ours[3].mutable_grad() = torch::Tensor();  // no gradient: not counted
    theirs[3].mutable_grad() = torch::Tensor();
    const double n1 = ClipGradNorm(ours, max_norm);
    const double n2 = torch::nn::utils::clip_grad_norm_(theirs, max_norm);
    EXPECT_NEAR(n1, n2, 1e-6 * n2) << max_norm;
    for (size_t i = 0; i < ours.size(); ++i) {
      if (i == 3) continue;
      EXPECT_LT(RelDiff(ours[i].grad(), theirs[i].grad()), 1e-6) << i << " " << max_norm;
    }
    if (max_norm < n2) {
      double total = 0;
      for (size_t i = 0; i < ours.size(); ++i) {
        if (i != 3) total += ours[i].grad().pow(2).sum().item<double>();
      }
      EXPECT_NEAR(std::sqrt(total), max_norm, 1e-5 * max_norm);
    }
  }
}

}  // namespace
}  // namespace fedlora::edge
