// MatmulNT / MatmulNN (oneDNN) against torch::matmul, and their fallbacks.
#include "edge-agent/gemm.h"

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <array>
#include <limits>
#include <vector>

#include "gtest/gtest.h"

namespace fedlora::edge {
namespace {

// Tolerance for fp32 products of inner dimension k with values ~ N(0, 1):
// summation order differs between oneDNN and BLAS.
double Tol(int64_t k) { return 2e-5 * static_cast<double>(k); }

struct Dims {
  int64_t m, k, n;
};

class GemmShapeTest : public ::testing::TestWithParam<Dims> {};

TEST_P(GemmShapeTest, MatchesTorchMatmul) {
  const Dims d = GetParam();
  torch::manual_seed(3);
  torch::Tensor x = torch::randn({d.m, d.k});
  torch::Tensor w = torch::randn({d.n, d.k});
  torch::Tensor g = torch::randn({d.m, d.n});
  const int64_t before = OnednnGemmCount();
  torch::Tensor y = MatmulNT(x, w);
  torch::Tensor gx = MatmulNN(g, w);
  EXPECT_EQ(OnednnGemmCount() - before, 2);  // both on oneDNN, not the fallback
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{d.m, d.n}));
  ASSERT_EQ(gx.sizes(), (std::vector<int64_t>{d.m, d.k}));
  EXPECT_LT((y - torch::matmul(x, w.t())).abs().max().item<double>(), Tol(d.k));
  EXPECT_LT((gx - torch::matmul(g, w)).abs().max().item<double>(), Tol(d.n));
}

// Decoder projections of the presets, an odd size, a single row (decoding),
// and a vocabulary-sized head block.
INSTANTIATE_TEST_SUITE_P(Shapes, GemmShapeTest,
                         ::testing::Values(Dims{256, 576, 192}, Dims{1024, 256, 688},
                                           Dims{37, 61, 13}, Dims{1, 576, 1536},
                                           Dims{64, 96, 4096}));

TEST(GemmTest, BatchedAndNonContiguousInputs) {
  torch::manual_seed(4);
  torch::Tensor x = torch::randn({3, 5, 40});
  torch::Tensor w = torch::randn({24, 40});
  torch::Tensor y = MatmulNT(x, w);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{3, 5, 24}));
  EXPECT_LT((y - torch::matmul(x, w.t())).abs().max().item<double>(), Tol(40));

  // A column slice (row stride larger than its width) and a transposed weight.
  torch::Tensor wide = torch::randn({7, 90});
  torch::Tensor xs = wide.slice(1, 10, 50);
  torch::Tensor wt = torch::randn({40, 24}).t();  // [24, 40], stride(0) == 1
  ASSERT_FALSE(xs.is_contiguous());
  ASSERT_EQ(wt.stride(0), 1);
  EXPECT_LT((MatmulNT(xs, wt) - torch::matmul(xs, wt.t())).abs().max().item<double>(), Tol(40));
  torch::Tensor g = torch::randn({2, 7, 24}).transpose(0, 1);  // [7, 2, 24], non-contiguous
  EXPECT_LT((MatmulNN(g, wt) - torch::matmul(g, wt)).abs().max().item<double>(), Tol(24));
  // A weight slice with a storage offset (the head's vocabulary blocks).
  torch::Tensor big = torch::randn({100, 40});
  torch::Tensor block = big.slice(0, 30, 70);
  EXPECT_LT((MatmulNT(x, block) - torch::matmul(x, block.t())).abs().max().item<double>(),
            Tol(40));
}

// MatmulTN: the weight gradient of a product over R rows, a2^T b2.
TEST(GemmTest, TransposedLeftOperandMatchesTorch) {
  torch::manual_seed(6);
  for (const auto& [rows, m, k] : std::vector<std::array<int64_t, 3>>{
           {1024, 688, 8}, {1024, 8, 256}, {256, 576, 8}, {37, 13, 61}, {1, 5, 3}}) {
    torch::Tensor a = torch::randn({rows, m});
    torch::Tensor b = torch::randn({rows, k});
    const int64_t before = OnednnGemmCount();
    torch::Tensor out = MatmulTN(a, b);
    EXPECT_EQ(OnednnGemmCount() - before, 1) << rows << "x" << m << "x" << k;
    ASSERT_EQ(out.sizes(), (std::vector<int64_t>{m, k}));
    EXPECT_LT((out - torch::matmul(a.t(), b)).abs().max().item<double>(), Tol(rows));
  }
  // Leading dimensions flatten into rows; a non-contiguous operand is fine.
  torch::Tensor a3 = torch::randn({2, 6, 9}).transpose(0, 1);  // [6, 2, 9]
  torch::Tensor b3 = torch::randn({6, 2, 4});
  torch::Tensor ref = torch::matmul(a3.reshape({12, 9}).t(), b3.reshape({12, 4}));
  EXPECT_LT((MatmulTN(a3, b3) - ref).abs().max().item<double>(), Tol(12));
  // The torch fallback gives the same.
  GemmBackendScope torch_only(GemmBackend::kTorch);
  EXPECT_LT((MatmulTN(a3, b3) - ref).abs().max().item<double>(), 1e-5);
}

TEST(GemmTest, OneDnnAndTorchBackendsAgreeAndBackendSwitches) {
  GemmBackendScope guard(GemmBackend::kOnednn);  // restores the previous backend
  torch::manual_seed(5);
  torch::Tensor x = torch::randn({33, 70});
  torch::Tensor w = torch::randn({50, 70});
  SetGemmBackend(GemmBackend::kTorch);
  EXPECT_EQ(gemm_backend(), GemmBackend::kTorch);
  const int64_t before = OnednnGemmCount();
  torch::Tensor via_torch = MatmulNT(x, w);
  EXPECT_EQ(OnednnGemmCount(), before);
  EXPECT_TRUE(torch::equal(via_torch, torch::matmul(x, w.t())));  // the very same call
  SetGemmBackend(GemmBackend::kOnednn);
  torch::Tensor via_onednn = MatmulNT(x, w);
  EXPECT_EQ(OnednnGemmCount(), before + 1);
  EXPECT_LT((via_onednn - via_torch).abs().max().item<double>(), Tol(70));
}

TEST(GemmTest, OtherDtypesAndAutocastFallBackToTorch) {
  torch::manual_seed(6);
  torch::Tensor x = torch::randn({8, 32});
  torch::Tensor w = torch::randn({16, 32});
  const int64_t before = OnednnGemmCount();
  torch::Tensor yb = MatmulNT(x.to(torch::kBFloat16), w.to(torch::kBFloat16));
  EXPECT_EQ(yb.scalar_type(), torch::kBFloat16);
  torch::Tensor yd = MatmulNN(torch::randn({8, 16}, torch::kDouble), w.to(torch::kDouble));
  EXPECT_EQ(yd.scalar_type(), torch::kDouble);
  at::autocast::set_cpu_enabled(true);
  at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
  torch::Tensor ya = MatmulNT(x, w);
  at::autocast::set_cpu_enabled(false);
  at::autocast::clear_cache();
  EXPECT_EQ(ya.scalar_type(), torch::kBFloat16);  // autocast applied, as torch::matmul does
  EXPECT_EQ(OnednnGemmCount(), before);
  EXPECT_LT((ya.to(torch::kFloat) - torch::matmul(x, w.t())).abs().max().item<double>(), 0.5);
}

// ToBf16 rounds as Tensor::to(kBFloat16), bit for bit: ties to even,
// infinities, signed zero, subnormals, values that round up to infinity, and a
// strided input; NaN stays NaN (torch's own scalar and vector conversions give
// NaNs different bits).
TEST(GemmTest, ToBf16RoundsAsTorchDoes) {
  torch::manual_seed(7);
  torch::Tensor special = torch::tensor(
      {0.0f, -0.0f, 1.0f, 1.00390625f /* tie, rounds down to even */,
       1.01171875f /* tie, rounds up to even */, std::numeric_limits<float>::infinity(),
       -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(),
       -std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::denorm_min(),
       1e-40f, std::numeric_limits<float>::max(), -3.3895314e38f});
  torch::Tensor values = torch::cat({special, torch::randn({300000}) * 100});
  const torch::Tensor ours = ToBf16(values);
  const torch::Tensor ref = values.to(torch::kBFloat16);
  ASSERT_EQ(ours.scalar_type(), torch::kBFloat16);
  const torch::Tensor nan = torch::isnan(values);
  EXPECT_TRUE(torch::equal(torch::isnan(ours), nan));
  EXPECT_EQ(nan.sum().item<int64_t>(), 2);
  EXPECT_TRUE(torch::equal(ours.view(torch::kShort).masked_fill(nan, 0),
                           ref.view(torch::kShort).masked_fill(nan, 0)));
  const torch::Tensor strided = torch::randn({64, 80}).t();
  EXPECT_TRUE(torch::equal(ToBf16(strided).view(torch::kShort),
                           strided.to(torch::kBFloat16).contiguous().view(torch::kShort)));
}

// MatmulNTBf16 / MatmulNNBf16 give the fp32 product of the operands rounded to
// bf16, on oneDNN (shapes with sizes that are not multiples of the vector
// width too), with the torch backend, and with bf16 operands as given.
TEST(GemmTest, Bf16ProductsAreTheProductsOfRoundedOperands) {
  torch::manual_seed(8);
  auto rounded = [](const torch::Tensor& t) { return t.to(torch::kBFloat16).to(torch::kFloat); };
  struct Case {
    int64_t m, k, n;
  };
  for (const Case& c : {Case{37, 576, 1000}, Case{256, 1000, 300}, Case{5, 24, 16}}) {
    const torch::Tensor x = torch::randn({c.m, c.k});
    const torch::Tensor w = torch::randn({c.n, c.k}) * 0.05;
    const torch::Tensor g = torch::randn({c.m, c.n});
    const torch::Tensor ref_nt = torch::matmul(rounded(x), rounded(w).t());
    const torch::Tensor ref_nn = torch::matmul(rounded(g), rounded(w));
    auto close = [](const torch::Tensor& a, const torch::Tensor& b) {
      return (a - b).abs().max().item<double>() <= 1e-5 * b.abs().max().item<double>() + 1e-6;
    };
    const int64_t before = OnednnGemmCount();
    const torch::Tensor nt = MatmulNTBf16(x, w), nn = MatmulNNBf16(g, w);
    EXPECT_GT(OnednnGemmCount(), before);
    EXPECT_EQ(nt.scalar_type(), torch::kFloat);
    EXPECT_EQ(nt.sizes(), ref_nt.sizes());
    EXPECT_EQ(nn.sizes(), ref_nn.sizes());
    EXPECT_TRUE(close(nt, ref_nt)) << c.m << "x" << c.k << "x" << c.n;
    EXPECT_TRUE(close(nn, ref_nn)) << c.m << "x" << c.k << "x" << c.n;
    // bf16 operands are used as they are; leading dimensions are kept.
    EXPECT_TRUE(close(MatmulNTBf16(x.to(torch::kBFloat16).view({1, c.m, c.k}), w.to(torch::kBFloat16))
                          .view({c.m, c.n}),
                      ref_nt));
    // Under autocast too (autocast would otherwise round the result to bf16).
    at::autocast::set_cpu_enabled(true);
    at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
    const torch::Tensor under = MatmulNTBf16(x, w);
    at::autocast::set_cpu_enabled(false);
    at::autocast::clear_cache();
    EXPECT_EQ(under.scalar_type(), torch::kFloat);
    EXPECT_TRUE(close(under, ref_nt));
    GemmBackendScope scope(GemmBackend::kTorch);
    const int64_t before_torch = OnednnGemmCount();
    EXPECT_TRUE(close(MatmulNTBf16(x, w), ref_nt));
    EXPECT_TRUE(close(MatmulNNBf16(g, w), ref_nn));
    EXPECT_EQ(OnednnGemmCount(), before_torch);
  }
  // The rounding is real: the fp32 product differs.
  const torch::Tensor x = torch::randn({8, 64}), w = torch::randn({16, 64});
  EXPECT_GT((MatmulNTBf16(x, w) - torch::matmul(x, w.t())).abs().max().item<double>(), 1e-4);
}

TEST(GemmTest, MismatchedShapesThrowLikeTorch) {
  torch::Tensor x = torch::randn({4, 10});
  torch::Tensor w = torch::randn({6, 11});
  EXPECT_THROW(MatmulNT(x, w), c10::Error);
  EXPECT_THROW(MatmulNN(torch::randn({4, 5}), w), c10::Error);
}

// The accumulating products add into the given tensor's own memory: on oneDNN
// (one call, no temporary) for a dense fp32 target, else through add_; the
// same sums either way.
TEST(GemmTest, AccumulateAddsTheProductIntoTheTarget) {
  torch::manual_seed(30);
  const torch::Tensor x = torch::randn({2, 9, 40}), w = torch::randn({24, 40});
  const torch::Tensor g = torch::randn({2, 9, 24});
  const torch::Tensor base_nt = torch::randn({2, 9, 24}), base_nn = torch::randn({2, 9, 40});
  const torch::Tensor want_nt = base_nt + torch::matmul(x, w.t());
  const torch::Tensor want_nn = base_nn + torch::matmul(g, w);
  for (GemmBackend backend : {GemmBackend::kOnednn, GemmBackend::kTorch}) {
    GemmBackendScope scope(backend);
    torch::Tensor out_nt = base_nt.clone(), out_nn = base_nn.clone();
    const void* p_nt = out_nt.data_ptr();
    const int64_t before = OnednnGemmCount();
    MatmulNTAccumulate(x, w, out_nt);
    MatmulNNAccumulate(g, w, out_nn);
    EXPECT_EQ(OnednnGemmCount() - before, backend == GemmBackend::kOnednn ? 2 : 0);
    EXPECT_EQ(out_nt.data_ptr(), p_nt);
    EXPECT_LT((out_nt - want_nt).abs().max().item<double>(), 1e-4);
    EXPECT_LT((out_nn - want_nn).abs().max().item<double>(), 1e-4);
  }
  // A strided target takes the add_ path, with the same result.
  torch::Tensor wide = torch::zeros({2, 9, 48});
  torch::Tensor strided = wide.slice(-1, 0, 24);
  strided.copy_(base_nt);
  const int64_t before = OnednnGemmCount();
  MatmulNTAccumulate(x, w, strided);
  EXPECT_EQ(OnednnGemmCount(), before);
  EXPECT_LT((strided - want_nt).abs().max().item<double>(), 1e-4);
  EXPECT_EQ(wide.slice(-1, 24).abs().max().item<float>(), 0.0f);
}

}  // namespace
}  // namespace fedlora::edge
