// RmsNorm, SwiGlu and Rope (single autograd nodes) against the composite
// libtorch ops they replace: forward values, input gradients and dtypes. fp32
// inputs run the single-pass kernels (sums in another order, a polynomial exp:
// close to the composite, not equal); other dtypes run the composite's own ops
// (equal). (What they save shows in `fedlora-sim bench train`'s peak RSS,
// docs/benchmarks.md.)
#include "edge-agent/fused_ops.h"

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include "gtest/gtest.h"

namespace fedlora::edge {
namespace {

torch::Tensor CompositeRms(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  return w * (x * torch::rsqrt(x.pow(2).mean(-1, true) + eps));
}
torch::Tensor CompositeRope(const torch::Tensor& x, const torch::Tensor& cos,
                            const torch::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  return x * cos + torch::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1) * sin;
}

double MaxDiff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

// Runs f and the composite g on copies of the same leaves with the same upstream
// gradient; the outputs must be within fwd_tol of each other relative to their
// largest magnitude (0: equal, the same ops) and the gradients within grad_tol.
template <typename F, typename G>
void ExpectSameAsComposite(F f, G g, std::vector<torch::Tensor> leaves, double grad_tol,
                           double fwd_tol = 0.0) {
  std::vector<torch::Tensor> a, b;
  for (const auto& t : leaves) {
    a.push_back(t.detach().clone().requires_grad_(true));
    b.push_back(t.detach().clone().requires_grad_(true));
  }
  torch::Tensor ya = f(a), yb = g(b);
  ASSERT_EQ(ya.scalar_type(), yb.scalar_type());
  ASSERT_EQ(ya.sizes(), yb.sizes());
  if (fwd_tol == 0.0) {
    EXPECT_TRUE(torch::equal(ya, yb)) << "forward differs by " << MaxDiff(ya, yb);
  } else {
    EXPECT_LE(MaxDiff(ya, yb), fwd_tol * yb.abs().max().item<double>());
  }
  torch::Tensor up = torch::randn(ya.sizes()).to(ya.scalar_type());
  ya.backward(up);
  yb.backward(up);
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(a[i].grad().defined()) << "leaf " << i;
    EXPECT_EQ(a[i].grad().scalar_type(), b[i].grad().scalar_type()) << "leaf " << i;
    const double scale = b[i].grad().abs().max().item<double>();
    EXPECT_LE(MaxDiff(a[i].grad(), b[i].grad()), grad_tol * scale + 1e-7) << "leaf " << i;
  }
}

TEST(FusedOpsTest, RmsNormMatchesTheCompositeWithWeightGradient) {
  torch::manual_seed(1);
  ExpectSameAsComposite([](auto v) { return RmsNorm(v[0], v[1], 1e-5); },
                        [](auto v) { return CompositeRms(v[0], v[1], 1e-5); },
                        {torch::randn({2, 7, 32}) * 3, torch::rand({32}) + 0.5}, 1e-5, 1e-6);
}

TEST(FusedOpsTest, RmsNormOfAFrozenWeightGivesOnlyTheInputGradient) {
  torch::manual_seed(2);
  torch::Tensor w = torch::rand({16}) + 0.5;  // no requires_grad
  torch::Tensor x1 = torch::randn({5, 16}).requires_grad_(true);
  torch::Tensor x2 = x1.detach().clone().requires_grad_(true);
  torch::Tensor up = torch::randn({5, 16});
  RmsNorm(x1, w, 1e-6).backward(up);
  CompositeRms(x2, w, 1e-6).backward(up);
  EXPECT_LE(MaxDiff(x1.grad(), x2.grad()), 1e-5 * x2.grad().abs().max().item<double>());
  EXPECT_FALSE(w.grad().defined());
}

TEST(FusedOpsTest, RmsNormWithABf16WeightReturnsEachGradientInItsDtype) {
  torch::manual_seed(3);
  ExpectSameAsComposite([](auto v) { return RmsNorm(v[0], v[1], 1e-5); },
                        [](auto v) { return CompositeRms(v[0], v[1], 1e-5); },
                        {torch::randn({3, 24}), (torch::rand({24}) + 0.5).to(torch::kBFloat16)},
                        2e-2);
}

TEST(FusedOpsTest, SwiGluMatchesTheComposite) {
  torch::manual_seed(4);
  ExpectSameAsComposite([](auto v) { return SwiGlu(v[0], v[1]); },
                        [](auto v) { return torch::silu(v[0]) * v[1]; },
                        {torch::randn({2, 9, 40}) * 4, torch::randn({2, 9, 40})}, 1e-5, 1e-6);
}

TEST(FusedOpsTest, SwiGluInBf16) {
  torch::manual_seed(5);
  ExpectSameAsComposite([](auto v) { return SwiGlu(v[0], v[1]); },
                        [](auto v) { return torch::silu(v[0]) * v[1]; },
                        {(torch::randn({6, 40}) * 4).to(torch::kBFloat16),
                         torch::randn({6, 40}).to(torch::kBFloat16)},
                        3e-2);
}

TEST(FusedOpsTest, RopeMatchesTheCompositeOnATransposedView) {
  torch::manual_seed(6);
  const int64_t B = 2, T = 5, H = 3, D = 8;
  torch::Tensor cos = torch::rand({T, D}), sin = torch::rand({T, D});
  // As in attention: [B, T, H, D] projected, viewed as [B, H, T, D].
  ExpectSameAsComposite([&](auto v) { return Rope(v[0].transpose(1, 2), cos, sin); },
                        [&](auto v) { return CompositeRope(v[0].transpose(1, 2), cos, sin); },
                        {torch::randn({B, T, H, D})}, 1e-6, 1e-6);
}

TEST(FusedOpsTest, RopeOfABf16InputWidensLikeTheCompositeAndGivesABf16Gradient) {
  torch::manual_seed(7);
  torch::Tensor cos = torch::rand({4, 6}), sin = torch::rand({4, 6});
  ExpectSameAsComposite([&](auto v) { return Rope(v[0], cos, sin); },
                        [&](auto v) { return CompositeRope(v[0], cos, sin); },
                        {torch::randn({2, 4, 6}).to(torch::kBFloat16)}, 1e-2);
}

// Shapes of smollm135m's layers: more rows than one chunk, so the kernels split
// them among threads.
TEST(FusedOpsTest, LayerSizedInputsSplitAmongThreadsMatchTheComposite) {
  torch::manual_seed(10);
  const int saved_threads = at::get_num_threads();
  at::set_num_threads(2);
  ExpectSameAsComposite([](auto v) { return RmsNorm(v[0], v[1], 1e-5); },
                        [](auto v) { return CompositeRms(v[0], v[1], 1e-5); },
                        {torch::randn({1, 256, 576}), torch::rand({576}) + 0.5}, 1e-5, 1e-6);
  ExpectSameAsComposite([](auto v) { return SwiGlu(v[0], v[1]); },
                        [](auto v) { return torch::silu(v[0]) * v[1]; },
                        {torch::randn({1, 256, 1536}) * 3, torch::randn({1, 256, 1536})}, 1e-5,
                        1e-6);
  torch::Tensor cos = torch::rand({256, 64}), sin = torch::rand({256, 64});
  ExpectSameAsComposite([&](auto v) { return Rope(v[0].transpose(1, 2), cos, sin); },
                        [&](auto v) { return CompositeRope(v[0].transpose(1, 2), cos, sin); },
                        {torch::randn({1, 256, 9, 64})}, 1e-6, 1e-6);
  at::set_num_threads(saved_threads);
}

TEST(FusedOpsTest, RopeWithPerRowTablesMatchesTheComposite) {
  torch::manual_seed(11);
  // Packed sequences: per-row tables [B, 1, T, D], broadcast over heads.
  torch::Tensor cos = torch::rand({2, 1, 5, 8}), sin = torch::rand({2, 1, 5, 8});
  ExpectSameAsComposite([&](auto v) { return Rope(v[0].transpose(1, 2), cos, sin); },
                        [&](auto v) { return CompositeRope(v[0].transpose(1, 2), cos, sin); },
                        {torch::randn({2, 5, 3, 8})}, 1e-6, 1e-6);
}

TEST(FusedOpsTest, RopeGradientKeepsTheLayoutOfItsInput) {
  torch::manual_seed(12);
  torch::Tensor x = torch::randn({2, 5, 3, 8}).requires_grad_(true);
  torch::Tensor xv = x.transpose(1, 2);  // [B, H, T, D] over [B, T, H, D] memory
  torch::Tensor cos = torch::rand({5, 8}), sin = torch::rand({5, 8});
  torch::Tensor y = Rope(xv, cos, sin);
  EXPECT_TRUE(y.is_contiguous());
  torch::Tensor g = torch::autograd::grad({y}, {xv}, {torch::randn(y.sizes())})[0];
  EXPECT_EQ(g.strides(), xv.strides());  // so the transpose back is a contiguous view
}

TEST(FusedOpsTest, SwiGluOfLargeGatesStaysFiniteAndExact) {
  torch::Tensor gate = torch::tensor({-1e4f, -100.0f, -20.0f, -1e-3f, 0.0f, 1e-3f, 20.0f, 100.0f, 1e4f});
  torch::Tensor up = torch::ones({9});
  torch::Tensor y = SwiGlu(gate, up), want = torch::silu(gate);
  EXPECT_TRUE(torch::isfinite(y).all().item<bool>());
  EXPECT_LE(MaxDiff(y, want), 1e-6 * want.abs().max().item<double>());
  EXPECT_LE(MaxDiff(y.slice(0, 2, 7), want.slice(0, 2, 7)), 1e-6 * 20.0);
}

TEST(FusedOpsTest, UnderAutocastTheForwardIsTheComposites) {
  torch::manual_seed(8);
  torch::Tensor x = torch::randn({4, 16}), w = torch::rand({16}) + 0.5;
  torch::Tensor gate = torch::randn({4, 16}).to(torch::kBFloat16);
  torch::Tensor up = torch::randn({4, 16}).to(torch::kBFloat16);
  at::autocast::set_cpu_enabled(true);
  at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
  torch::Tensor a = RmsNorm(x, w, 1e-5), b = CompositeRms(x, w, 1e-5);
  torch::Tensor c = SwiGlu(gate, up), d = torch::silu(gate) * up;
  at::autocast::set_cpu_enabled(false);
  at::autocast::clear_cache();
  EXPECT_EQ(a.scalar_type(), b.scalar_type());
  EXPECT_LE(MaxDiff(a, b), 1e-6 * b.abs().max().item<double>());  // fp32: the kernel
  EXPECT_TRUE(torch::equal(c, d));                                // bf16: the composite
  EXPECT_EQ(c.scalar_type(), torch::kBFloat16);
}

TEST(FusedOpsTest, SwiGluGradientsOnlyWhereAsked) {
  torch::manual_seed(9);
  torch::Tensor gate = torch::randn({8, 12});  // frozen
  torch::Tensor up1 = torch::randn({8, 12}).requires_grad_(true);
  torch::Tensor up2 = up1.detach().clone().requires_grad_(true);
  torch::Tensor g = torch::randn({8, 12});
  SwiGlu(gate, up1).backward(g);
  (torch::silu(gate) * up2).backward(g);
  EXPECT_FALSE(gate.grad().defined());
  EXPECT_LE(MaxDiff(up1.grad(), up2.grad()), 1e-6);
}

}  // namespace
}  // namespace fedlora::edge
