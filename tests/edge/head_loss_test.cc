// HeadCrossEntropySum (the fused LM head + cross-entropy) against logits +
// torch::nn::functional::cross_entropy: loss and gradient.
#include "edge-agent/head_loss.h"

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include "gtest/gtest.h"

namespace fedlora::edge {
namespace {

struct Case {
  int64_t n, h, vocab;
  bool keep;  // logits kept for backward (else recomputed)
  torch::ScalarType weight_dtype;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << "N" << c.n << " H" << c.h << " V" << c.vocab << (c.keep ? " keep" : " recompute") << " "
      << c.weight_dtype;
}

class HeadLossTest : public ::testing::TestWithParam<Case> {};

TEST_P(HeadLossTest, LossAndGradientMatchCrossEntropy) {
  const Case c = GetParam();
  torch::manual_seed(11);
  torch::Tensor w = (torch::randn({c.vocab, c.h}) * 0.5).to(c.weight_dtype);
  torch::Tensor targets = torch::randint(0, c.vocab, {c.n}, torch::kLong);
  // Rows whose target is the first / last row of a block, and the last vocab row.
  targets[0] = 0;
  if (c.n > 2) targets[1] = std::min<int64_t>(kHeadBlockRows, c.vocab - 1);
  if (c.n > 3) targets[2] = c.vocab - 1;
  // Edges of the smaller recompute blocks (multiples of 256 rows).
  if (c.n > 5) {
    targets[3] = std::min<int64_t>(256, c.vocab - 1);
    targets[4] = std::min<int64_t>(512, c.vocab - 1);
  }
  torch::Tensor base = torch::randn({c.n, c.h}) * 2.0;

  torch::Tensor h1 = base.clone().requires_grad_(true);
  torch::Tensor loss = HeadCrossEntropySum(h1, w, targets, c.keep ? kHeadKeepLogitsBytes : 0);
  (loss * 3.0).backward();  // a non-unit upstream gradient

  torch::Tensor h2 = base.clone().requires_grad_(true);
  torch::Tensor ref = torch::nn::functional::cross_entropy(
      torch::matmul(h2, w.to(torch::kFloat).t()), targets,
      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
  (ref * 3.0).backward();

  ASSERT_EQ(loss.dim(), 0);
  EXPECT_NEAR(loss.item<double>(), ref.item<double>(), 1e-5 * std::abs(ref.item<double>()) + 1e-4);
  const double scale = h2.grad().abs().max().item<double>();
  EXPECT_LT((h1.grad() - h2.grad()).abs().max().item<double>(), 1e-4 * scale + 1e-6);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, HeadLossTest,
    ::testing::Values(Case{9, 16, 100, true, torch::kFloat},           // one block
                      Case{9, 16, 10000, true, torch::kFloat},         // 2 full blocks + a part
                      Case{9, 16, 10000, false, torch::kFloat},        // recomputed in backward
                      Case{5, 24, 8193, true, torch::kBFloat16},       // bf16 head, 1-row tail
                      Case{5, 24, 8192, false, torch::kHalf},          // exact blocks, fp16
                      Case{1, 8, 4097, true, torch::kFloat},           // one position
                      // 2048 positions: recompute blocks of 512 rows (kHeadRecomputeBlockBytes)
                      Case{2048, 8, 1300, false, torch::kFloat},
                      // kept 4096-wide blocks, 8 rows per parallel chunk
                      Case{300, 8, 5000, true, torch::kFloat}));

// The log-sum-exp and softmax kernels split the positions among threads; each
// row is computed the same way whatever the split.
TEST(HeadLossTest, TwoThreadsGiveTheSameLossAndGradientAsOne) {
  torch::manual_seed(12);
  torch::Tensor w = torch::randn({5000, 8});
  torch::Tensor targets = torch::randint(0, 5000, {300}, torch::kLong);
  torch::Tensor base = torch::randn({300, 8}) * 2.0;
  const int saved = at::get_num_threads();
  std::vector<torch::Tensor> loss, grad;
  for (int threads : {1, 2}) {
    at::set_num_threads(threads);
    torch::Tensor h = base.clone().requires_grad_(true);
    torch::Tensor l = HeadCrossEntropySum(h, w, targets);
    l.backward();
    loss.push_back(l.detach());
    grad.push_back(h.grad());
  }
  at::set_num_threads(saved);
  EXPECT_TRUE(torch::equal(loss[0], loss[1]));
  EXPECT_TRUE(torch::allclose(grad[0], grad[1], 1e-6, 1e-7));
}

TEST(HeadLossTest, UnderAutocastTheProductsRunInBf16) {
  torch::manual_seed(12);
  torch::Tensor w = torch::randn({6000, 32}) * 0.3;
  torch::Tensor targets = torch::randint(0, 6000, {7}, torch::kLong);
  torch::Tensor base = torch::randn({7, 32});
  torch::Tensor h1 = base.clone().requires_grad_(true);
  at::autocast::set_cpu_enabled(true);
  at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
  torch::Tensor loss = HeadCrossEntropySum(h1, w, targets);
  at::autocast::set_cpu_enabled(false);
  at::autocast::clear_cache();
  loss.backward();
  ASSERT_EQ(loss.scalar_type(), torch::kFloat);
  ASSERT_EQ(h1.grad().scalar_type(), torch::kFloat);

  // The reference: bf16 logits (what autocast makes of the Linear), fp32 loss.
  torch::Tensor wb = w.to(torch::kBFloat16);
  torch::Tensor h2 = base.clone().requires_grad_(true);
  torch::Tensor ref = torch::nn::functional::cross_entropy(
      torch::matmul(h2.to(torch::kBFloat16), wb.t()).to(torch::kFloat), targets,
      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
  ref.backward();
  EXPECT_NEAR(loss.item<double>(), ref.item<double>(), 1e-3 * std::abs(ref.item<double>()));
  const double scale = h2.grad().abs().max().item<double>();
  EXPECT_LT((h1.grad() - h2.grad()).abs().max().item<double>(), 2e-2 * scale);
  // And it differs from the fp32 head by more than fp32 rounding: bf16 really ran.
  torch::Tensor fp32 = HeadCrossEntropySum(base, w, targets);
  EXPECT_GT(std::abs(fp32.item<double>() - loss.item<double>()), 1e-6);
}

TEST(HeadLossTest, LargeLogitsStayFinite) {
  // Logits around +-1e4: a plain exp would overflow; the running max keeps it finite.
  torch::Tensor w = torch::randn({5000, 4}) * 100.0;
  torch::Tensor h = (torch::randn({3, 4}) * 100.0).requires_grad_(true);
  torch::Tensor targets = torch::tensor({1, 4200, 4999}, torch::kLong);
  torch::Tensor loss = HeadCrossEntropySum(h, w, targets);
  loss.backward();
  torch::Tensor ref = torch::nn::functional::cross_entropy(
      torch::matmul(h.detach(), w.t()), targets,
      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
  EXPECT_TRUE(std::isfinite(loss.item<double>()));
  EXPECT_NEAR(loss.item<double>(), ref.item<double>(), 1e-3 * std::abs(ref.item<double>()) + 1e-2);
  EXPECT_TRUE(torch::isfinite(h.grad()).all().item<bool>());
}

TEST(HeadLossTest, BadInputsAreClearErrors) {
  torch::Tensor w = torch::randn({50, 8});
  torch::Tensor h = torch::randn({4, 8});
  auto message = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const c10::Error& e) {
      return std::string(e.what_without_backtrace());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([&] { HeadCrossEntropySum(h, w, torch::tensor({0, 1, 2, 50}, torch::kLong)); })
                .find("target out of range [0, 50): found 50"),
            std::string::npos);
  EXPECT_NE(message([&] { HeadCrossEntropySum(h, w, torch::tensor({0, -1, 2, 3}, torch::kLong)); })
                .find("found -1"),
            std::string::npos);
  EXPECT_NE(message([&] { HeadCrossEntropySum(h, torch::randn({50, 9}), torch::zeros({4}, torch::kLong)); })
                .find("expected weight [V, 8]"),
            std::string::npos);
  EXPECT_NE(message([&] { HeadCrossEntropySum(h, w, torch::zeros({3}, torch::kLong)); })
                .find("expected int64 targets [4]"),
            std::string::npos);
  EXPECT_NE(message([&] { HeadCrossEntropySum(h.to(torch::kDouble), w, torch::zeros({4}, torch::kLong)); })
                .find("expected fp32 hidden"),
            std::string::npos);
}

TEST(HeadLossTest, NoPositionsIsZeroWithAGradient) {
  torch::Tensor h = torch::randn({0, 8}).requires_grad_(true);
  torch::Tensor loss = HeadCrossEntropySum(h, torch::randn({50, 8}), torch::zeros({0}, torch::kLong));
  EXPECT_EQ(loss.item<double>(), 0.0);
  loss.backward();
  EXPECT_EQ(h.grad().numel(), 0);
}

}  // namespace
}  // namespace fedlora::edge
