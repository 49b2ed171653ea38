// FusedCausalAttention against the plain matmul / mask / softmax path, values and
// gradients, over the shapes the supported families use.
#include "edge-agent/attention.h"

#include <cmath>
#include <limits>

#include "gtest/gtest.h"

namespace fedlora::edge {
namespace {

// The plain path, written independently of the engine's.
torch::Tensor PlainAttention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             double scale, int64_t window) {
  const int64_t H = q.size(1), Hkv = k.size(1), T = q.size(2);
  torch::Tensor kk = k.repeat_interleave(H / Hkv, 1);
  torch::Tensor vv = v.repeat_interleave(H / Hkv, 1);
  torch::Tensor scores = torch::matmul(q, kk.transpose(-1, -2)) * scale;
  torch::Tensor i = torch::arange(T).unsqueeze(1), j = torch::arange(T).unsqueeze(0);
  torch::Tensor hidden = j > i;
  if (window > 0) hidden = torch::logical_or(hidden, (i - j) >= window);
  scores = scores.masked_fill(hidden, -std::numeric_limits<float>::infinity());
  return torch::matmul(torch::softmax(scores, -1), vv);
}

struct Shape {
  int64_t B, H, Hkv, T, D, window;
};

void PrintTo(const Shape& s, std::ostream* os) {
  *os << "B" << s.B << " H" << s.H << " Hkv" << s.Hkv << " T" << s.T << " D" << s.D << " window"
      << s.window;
}

// Backpropagates the same random upstream gradient through both outputs and
// expects equal gradients for (q, k, v) and (q2, k2, v2), k's not trivially zero
// when `k_moves`.
void ExpectSameGradients(const torch::Tensor& fused, const torch::Tensor& plain,
                         const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                         const torch::Tensor& q2, const torch::Tensor& k2, const torch::Tensor& v2,
                         bool k_moves) {
  torch::Tensor upstream = torch::randn(plain.sizes());
  (fused * upstream).sum().backward();
  (plain * upstream).sum().backward();
  EXPECT_LT((q.grad() - q2.grad()).abs().max().item<float>(), 1e-4);
  EXPECT_LT((k.grad() - k2.grad()).abs().max().item<float>(), 1e-4);
  EXPECT_LT((v.grad() - v2.grad()).abs().max().item<float>(), 1e-4);
  // The gradients are not trivially zero (with one position the softmax is constant,
  // so only v gets a gradient).
  EXPECT_GT(v.grad().abs().max().item<float>(), 1e-3);
  if (k_moves) {
    EXPECT_GT(k.grad().abs().max().item<float>(), 1e-3);
  }
}

class FusedAttentionTest : public ::testing::TestWithParam<Shape> {};

TEST_P(FusedAttentionTest, ValuesAndGradientsMatchThePlainPath) {
  const Shape s = GetParam();
  torch::manual_seed(7);
  // Scaled so that some rows are peaked (large scores) and others flat.
  auto make = [](std::vector<int64_t> sizes) {
    return (torch::randn(sizes, torch::kFloat) * 2.0).requires_grad_(true);
  };
  torch::Tensor q = make({s.B, s.H, s.T, s.D}), k = make({s.B, s.Hkv, s.T, s.D}),
                v = make({s.B, s.Hkv, s.T, s.D});
  torch::Tensor q2 = q.detach().clone().requires_grad_(true);
  torch::Tensor k2 = k.detach().clone().requires_grad_(true);
  torch::Tensor v2 = v.detach().clone().requires_grad_(true);
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.D));
  ASSERT_TRUE(FusedAttentionApplies(q, k, v));

  torch::Tensor fused = FusedCausalAttention(q, k, v, scale, s.window);
  torch::Tensor plain = PlainAttention(q2, k2, v2, scale, s.window);
  ASSERT_EQ(fused.sizes(), plain.sizes());
  EXPECT_LT((fused - plain).abs().max().item<float>(), 2e-5);

  ExpectSameGradients(fused, plain, q, k, v, q2, k2, v2, s.T > 1);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, FusedAttentionTest,
    ::testing::Values(Shape{1, 1, 1, 1, 8, 0},      // one position
                      Shape{2, 4, 4, 17, 16, 0},    // multi-head, odd length
                      Shape{2, 8, 4, 33, 32, 0},    // grouped-query (tiny preset's layout)
                      Shape{1, 9, 3, 40, 64, 0},    // SmolLM2-135M's 9 / 3 heads
                      Shape{1, 4, 1, 30, 96, 0},    // Phi-3's head_dim, multi-query
                      Shape{2, 4, 2, 29, 16, 7},    // sliding window (Mistral)
                      Shape{1, 2, 2, 70, 32, 20},   // window spanning several key blocks
                      Shape{1, 2, 1, 3, 128, 0}));  // head_dim 128, fewer rows than a block

TEST(FusedAttentionTest, NonContiguousInputsAreHandled) {
  torch::manual_seed(3);
  // [B, T, H, D] transposed to [B, H, T, D], as the engine produces them.
  torch::Tensor q = torch::randn({2, 12, 4, 16}).transpose(1, 2);
  torch::Tensor k = torch::randn({2, 12, 2, 16}).transpose(1, 2);
  torch::Tensor v = torch::randn({2, 12, 2, 16}).transpose(1, 2);
  torch::Tensor fused = FusedCausalAttention(q, k, v, 0.25);
  EXPECT_LT((fused - PlainAttention(q, k, v, 0.25, 0)).abs().max().item<float>(), 2e-5);
}

// The heads are split over libtorch's threads, forward and backward (the
// parallel loop is compiled in only when attention.cc is built with OpenMP).
TEST(FusedAttentionTest, HeadsAreSharedAmongThreads) {
  const int before = at::get_num_threads();
  at::set_num_threads(2);
  torch::manual_seed(4);
  torch::Tensor q = torch::randn({2, 4, 16, 16}, torch::requires_grad());
  torch::Tensor k = torch::randn({2, 2, 16, 16}, torch::requires_grad());
  torch::Tensor v = torch::randn({2, 2, 16, 16}, torch::requires_grad());
  torch::Tensor out = FusedCausalAttention(q, k, v, 0.25);
  const int forward_threads = FusedAttentionThreadsUsed();
  out.sum().backward();
  const int backward_threads = FusedAttentionThreadsUsed();
  at::set_num_threads(1);
  FusedCausalAttention(q.detach(), k.detach(), v.detach(), 0.25);
  const int single = FusedAttentionThreadsUsed();
  at::set_num_threads(before);
  EXPECT_EQ(forward_threads, 2);
  EXPECT_EQ(backward_threads, 2);
  EXPECT_EQ(single, 1);
}

// 9 heads (smollm135m's) on 2 threads: each head's query rows are cut in two
// parts of equal causal work, 9 parts per thread; backward sums the parts'
// key / value gradients. Also with a window, grouped-query heads and packed
// starts, which the parts must carry too.
TEST(FusedAttentionTest, OddHeadCountsSplitRowsAmongThreads) {
  const int before = at::get_num_threads();
  at::set_num_threads(2);
  for (int64_t window : {0, 5}) {
    torch::manual_seed(40 + window);
    const int64_t B = 1, H = 9, Hkv = 3, T = 37, D = 16;
    torch::Tensor q = torch::randn({B, H, T, D}, torch::requires_grad());
    torch::Tensor k = torch::randn({B, Hkv, T, D}, torch::requires_grad());
    torch::Tensor v = torch::randn({B, Hkv, T, D}, torch::requires_grad());
    torch::Tensor q2 = q.detach().clone().requires_grad_(true);
    torch::Tensor k2 = k.detach().clone().requires_grad_(true);
    torch::Tensor v2 = v.detach().clone().requires_grad_(true);
    torch::Tensor fused = FusedCausalAttention(q, k, v, 0.25, window);
    EXPECT_EQ(FusedAttentionThreadsUsed(), 2);
    torch::Tensor plain = PlainAttention(q2, k2, v2, 0.25, window);
    EXPECT_LT((fused - plain).abs().max().item<float>(), 1e-5);
    ExpectSameGradients(fused, plain, q, k, v, q2, k2, v2, true);
    EXPECT_EQ(FusedAttentionThreadsUsed(), 2);
  }
  // Packed: two sequences in one row, each query sees its own sequence's keys.
  torch::manual_seed(43);
  const int64_t T = 24;
  torch::Tensor starts = torch::zeros({1, T}, torch::kLong);
  starts.slice(1, 10).fill_(10);
  torch::Tensor q = torch::randn({1, 9, T, 8}), k = torch::randn({1, 9, T, 8});
  torch::Tensor v = torch::randn({1, 9, T, 8});
  torch::Tensor two = FusedCausalAttention(q, k, v, 0.3, 0, starts);
  at::set_num_threads(1);
  torch::Tensor one = FusedCausalAttention(q, k, v, 0.3, 0, starts);
  at::set_num_threads(before);
  EXPECT_LT((two - one).abs().max().item<float>(), 1e-6);
}

TEST(FusedAttentionTest, LargeScoresStayFinite) {
  // exp of very negative arguments must underflow to 0, not to NaN or garbage.
  torch::Tensor q = torch::full({1, 1, 6, 4}, 30.0f);
  torch::Tensor k = torch::randn({1, 1, 6, 4}) * 30.0;
  torch::Tensor v = torch::randn({1, 1, 6, 4});
  torch::Tensor fused = FusedCausalAttention(q, k, v, 1.0);
  EXPECT_TRUE(torch::isfinite(fused).all().item<bool>());
  EXPECT_LT((fused - PlainAttention(q, k, v, 1.0, 0)).abs().max().item<float>(), 1e-5);
}

// The plain path with an explicit [B, 1, T, T] mask (true = hidden).
torch::Tensor MaskedAttention(const torch::Tensor& q, const torch::Tensor& k,
                              const torch::Tensor& v, double scale, const torch::Tensor& masked) {
  const int64_t H = q.size(1), Hkv = k.size(1);
  torch::Tensor scores =
      torch::matmul(q, k.repeat_interleave(H / Hkv, 1).transpose(-1, -2)) * scale;
  scores = scores.masked_fill(masked, -std::numeric_limits<float>::infinity());
  return torch::matmul(torch::softmax(scores, -1), v.repeat_interleave(H / Hkv, 1));
}

// A packing mask: each row holds sequences of the given lengths (then
// padding, its own sequence), each query sees its own sequence up to itself
// and, with window > 0, only the last `window` positions.
torch::Tensor PackingMask(const std::vector<std::vector<int64_t>>& rows, int64_t T,
                          int64_t window) {
  torch::Tensor seg = torch::full({static_cast<int64_t>(rows.size()), T}, -1, torch::kLong);
  for (size_t b = 0; b < rows.size(); ++b) {
    int64_t at = 0, id = 0;
    for (int64_t len : rows[b]) {
      seg[static_cast<int64_t>(b)].slice(0, at, at + len).fill_(id++);
      at += len;
    }
  }
  torch::Tensor i = torch::arange(T).unsqueeze(1), j = torch::arange(T).unsqueeze(0);
  torch::Tensor hidden = (j > i).unsqueeze(0).logical_or(seg.unsqueeze(2) != seg.unsqueeze(1));
  if (window > 0) hidden = hidden.logical_or(((i - j) >= window).unsqueeze(0));
  return hidden.unsqueeze(1);
}

TEST(FusedAttentionTest, PackedSequencesMatchTheMaskedPath) {
  torch::manual_seed(9);
  const int64_t B = 2, H = 4, Hkv = 2, T = 45, D = 16;
  for (int64_t window : {0, 6}) {
    // Row 0: 3 sequences and padding; row 1: a 1-token sequence, then one of 44.
    const torch::Tensor masked = PackingMask({{10, 17, 13}, {1, 44}}, T, window);
    const torch::Tensor starts = VisibleRangeStarts(masked, B, T);
    ASSERT_TRUE(starts.defined()) << "window " << window;
    EXPECT_EQ(starts[0][12].item<int64_t>(), window > 0 ? 10 : 10);
    EXPECT_EQ(starts[0][26].item<int64_t>(), window > 0 ? 21 : 10);
    EXPECT_EQ(starts[1][0].item<int64_t>(), 0);
    EXPECT_EQ(starts[1][1].item<int64_t>(), 1);
    auto make = [](std::vector<int64_t> sizes) {
      return (torch::randn(sizes) * 2.0).requires_grad_(true);
    };
    torch::Tensor q = make({B, H, T, D}), k = make({B, Hkv, T, D}), v = make({B, Hkv, T, D});
    torch::Tensor q2 = q.detach().clone().requires_grad_(true);
    torch::Tensor k2 = k.detach().clone().requires_grad_(true);
    torch::Tensor v2 = v.detach().clone().requires_grad_(true);
    torch::Tensor fused = FusedCausalAttention(q, k, v, 0.25, 0, starts);
    torch::Tensor plain = MaskedAttention(q2, k2, v2, 0.25, masked);
    EXPECT_LT((fused - plain).abs().max().item<float>(), 2e-5) << "window " << window;
    ExpectSameGradients(fused, plain, q, k, v, q2, k2, v2, /*k_moves=*/true);
  }
}

TEST(FusedAttentionTest, MasksThatAreNotRangesKeepTheMaskedPath) {
  const int64_t T = 6;
  torch::Tensor causal = PackingMask({{T}}, T, 0);
  ASSERT_TRUE(VisibleRangeStarts(causal, 1, T).defined());
  torch::Tensor hole = causal.clone();
  hole[0][0][4][2] = true;  // a gap inside query 4's range
  EXPECT_FALSE(VisibleRangeStarts(hole, 1, T).defined());
  torch::Tensor future = causal.clone();
  future[0][0][1][3] = false;  // a later key visible
  EXPECT_FALSE(VisibleRangeStarts(future, 1, T).defined());
  torch::Tensor blind = causal.clone();
  blind[0][0][2].fill_(true);  // a query that sees nothing
  EXPECT_FALSE(VisibleRangeStarts(blind, 1, T).defined());
  EXPECT_FALSE(VisibleRangeStarts(causal, 2, T).defined());                      // wrong batch
  EXPECT_FALSE(VisibleRangeStarts(causal.to(torch::kFloat), 1, T).defined());  // not bool
  // Starts out of range are refused.
  torch::Tensor q = torch::randn({1, 1, T, 8});
  EXPECT_THROW(FusedCausalAttention(q, q, q, 1.0, 0, torch::full({1, T}, 3, torch::kLong)),
               c10::Error);
}

TEST(FusedAttentionTest, UnsupportedInputsAreRefused) {
  torch::Tensor q = torch::randn({1, 3, 5, 8}), k = torch::randn({1, 2, 5, 8});
  EXPECT_FALSE(FusedAttentionApplies(q, k, k));  // 3 heads over 2 kv heads
  torch::Tensor qd = torch::randn({1, 2, 5, 8}, torch::kDouble);
  EXPECT_FALSE(FusedAttentionApplies(qd, k, k));
  EXPECT_FALSE(FusedAttentionApplies(torch::randn({1, 2, 5, 8}), k, torch::randn({1, 2, 4, 8})));
  EXPECT_THROW(FusedCausalAttention(q, k, k, 1.0), c10::Error);
}

}  // namespace
}  // namespace fedlora::edge
