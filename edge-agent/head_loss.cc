#include "edge-agent/head_loss.h"

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "edge-agent/gemm.h"
#include "edge-agent/simd_math.h"
#include "torch/csrc/autograd/custom_function.h"

namespace fedlora::edge {
namespace {

// An operand in the dtype the products run in: fp32, or the autocast dtype
// (`low`) when the call began under CPU autocast (h once per call, the weight
// once per block).
torch::Tensor InProductDtype(const torch::Tensor& t, torch::ScalarType low) {
  if (t.scalar_type() == low) return t;
  return low == torch::kBFloat16 ? ToBf16(t) : t.to(low);
}

// Rows [r0, r1) of the weight in the products' dtype.
torch::Tensor WeightBlock(const torch::Tensor& weight, int64_t r0, int64_t r1,
                          torch::ScalarType low) {
  return InProductDtype(weight.slice(0, r0, r1), low);
}

// h W_block^T as fp32 [N, rows], h and w in the same dtype: bf16 products
// accumulate into fp32 (MatmulNTBf16); MatmulNT falls back to torch::matmul
// for fp16, or under autocast.
torch::Tensor BlockLogits(const torch::Tensor& h, const torch::Tensor& w) {
  if (w.scalar_type() == torch::kBFloat16) return MatmulNTBf16(h, w);
  torch::Tensor out = MatmulNT(h, w);
  return out.scalar_type() == torch::kFloat ? out : out.to(torch::kFloat);
}

// p W_block as fp32 [N, H] (p fp32, w fp32 or low precision).
torch::Tensor BlockGradInput(const torch::Tensor& p, const torch::Tensor& w) {
  if (w.scalar_type() == torch::kBFloat16) return MatmulNNBf16(p, w);
  torch::Tensor out = MatmulNN(p.scalar_type() == w.scalar_type() ? p : p.to(w.scalar_type()), w);
  return out.scalar_type() == torch::kFloat ? out : out.to(torch::kFloat);
}

// Vocabulary rows per block: kHeadBlockRows when the blocks are kept (they
// are all resident anyway); when recomputed, few enough that one fp32 block of
// n rows stays near kHeadRecomputeBlockBytes (a multiple of 256, at least 256).
int64_t BlockRows(int64_t n, bool keep) {
  if (keep || n == 0) return kHeadBlockRows;
  const int64_t rows = kHeadRecomputeBlockBytes / (n * static_cast<int64_t>(sizeof(float)));
  return std::clamp<int64_t>(rows / 256 * 256, 256, kHeadBlockRows);
}

// Rows [i0, i1) of a fp32 [n, cols] logit block (vocabulary rows r0 ..): the
// running log-sum-exp state (max m, sum of exp(l - m)) takes the block in, one
// read of each row for its max and one for its exps; the target logit of rows
// whose target falls in the block is added to target_logit.
FEDLORA_MULTI_ISA
void LseUpdateRows(const float* __restrict logits, int64_t cols, const int64_t* __restrict targets,
                   int64_t r0, float* __restrict run_max, float* __restrict run_sum,
                   float* __restrict target_logit, int64_t i0, int64_t i1) {
  const ExpBounds b = OpaqueExpBounds();
  for (int64_t i = i0; i < i1; ++i) {
    const float* row = logits + i * cols;
    float m = run_max[i];
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < cols; ++j) m = std::max(m, row[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) sum += ExpNonPositive(row[j] - m, b);
    run_sum[i] = run_sum[i] * ExpNonPositive(run_max[i] - m, b) + sum;
    run_max[i] = m;
    const int64_t t = targets[i] - r0;
    if (t >= 0 && t < cols) target_logit[i] += row[t];
  }
}

// In place on rows [i0, i1) of a fp32 [n, cols] logit block: g times
// (softmax - one-hot), p = exp(l - lse) and minus 1 at the target column.
FEDLORA_MULTI_ISA
void SoftmaxGradRows(float* __restrict logits, int64_t cols, const float* __restrict lse,
                     const int64_t* __restrict targets, int64_t r0, float g, int64_t i0,
                     int64_t i1) {
  const ExpBounds b = OpaqueExpBounds();
  for (int64_t i = i0; i < i1; ++i) {
    float* row = logits + i * cols;
    const float l = lse[i];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) row[j] = ExpNonPositive(row[j] - l, b) * g;
    const int64_t t = targets[i] - r0;
    if (t >= 0 && t < cols) row[t] -= g;
  }
}

class HeadCrossEntropyFn : public torch::autograd::Function<HeadCrossEntropyFn> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& hidden,
                               const torch::Tensor& weight, const torch::Tensor& targets,
                               int64_t keep_logits_bytes) {
    const int64_t n = hidden.size(0), vocab = weight.size(0);
    const bool keep = n * vocab * static_cast<int64_t>(sizeof(float)) <= keep_logits_bytes;
    // Under CPU autocast the products run in its dtype (as a Linear would),
    // the log-sum-exp and the gradient's softmax in fp32.
    const torch::ScalarType low =
        at::autocast::is_cpu_enabled() ? at::autocast::get_autocast_cpu_dtype() : torch::kFloat;
    torch::Tensor h = hidden.contiguous();
    const torch::Tensor h_low = InProductDtype(h, low);
    torch::Tensor run_max = torch::full({n}, -std::numeric_limits<float>::infinity(),
                                        h.options());
    torch::Tensor run_sum = torch::zeros({n}, h.options());
    torch::Tensor target_logit = torch::zeros({n}, h.options());
    const torch::Tensor tc = targets.contiguous();
    std::vector<torch::Tensor> saved = {h, tc};
    const int64_t rows = BlockRows(n, keep);
    for (int64_t r0 = 0; r0 < vocab; r0 += rows) {
      const int64_t r1 = std::min(vocab, r0 + rows);
      torch::Tensor logits =
          BlockLogits(h_low, WeightBlock(weight, r0, r1, low)).contiguous();  // [n, r1 - r0]
      const float* lp = logits.data_ptr<float>();
      const int64_t* tp = tc.data_ptr<int64_t>();
      float* mp = run_max.data_ptr<float>();
      float* sp = run_sum.data_ptr<float>();
      float* xp = target_logit.data_ptr<float>();
      at::parallel_for(0, n, RowsPerChunk(r1 - r0), [&](int64_t i0, int64_t i1) {
        LseUpdateRows(lp, r1 - r0, tp, r0, mp, sp, xp, i0, i1);
      });
      if (keep) saved.push_back(logits);
    }
    torch::Tensor lse = run_max.add_(run_sum.log_());
    saved.insert(saved.begin() + 2, lse);
    ctx->save_for_backward(saved);
    ctx->saved_data["weight"] = weight;
    ctx->saved_data["low"] = static_cast<int64_t>(low);
    ctx->saved_data["rows"] = rows;
    return (lse - target_logit).sum();
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor& h = saved[0];
    const torch::Tensor& targets = saved[1];
    const torch::Tensor lse = saved[2].contiguous();
    const bool kept = saved.size() > 3;
    const torch::Tensor weight = ctx->saved_data["weight"].toTensor();
    const auto low = static_cast<torch::ScalarType>(ctx->saved_data["low"].toInt());
    const float g = grads[0].item<float>();
    const int64_t vocab = weight.size(0), rows = ctx->saved_data["rows"].toInt();
    torch::Tensor gh, h_low;
    if (!kept) h_low = InProductDtype(h, low);
    size_t block = 0;
    for (int64_t r0 = 0; r0 < vocab; r0 += rows, ++block) {
      const int64_t r1 = std::min(vocab, r0 + rows);
      torch::Tensor w = WeightBlock(weight, r0, r1, low);
      // g (softmax - one-hot), in place on the kept (or recomputed) logits.
      torch::Tensor p = kept ? saved[3 + block] : BlockLogits(h_low, w).contiguous();
      float* pp = p.data_ptr<float>();
      const float* lp = lse.data_ptr<float>();
      const int64_t* tp = targets.data_ptr<int64_t>();
      at::parallel_for(0, p.size(0), RowsPerChunk(r1 - r0), [&](int64_t i0, int64_t i1) {
        SoftmaxGradRows(pp, r1 - r0, lp, tp, r0, g, i0, i1);
      });
      torch::Tensor part = BlockGradInput(p, w);
      gh = gh.defined() ? gh.add_(part) : part;
    }
    return {gh, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor HeadCrossEntropySum(const torch::Tensor& hidden, const torch::Tensor& weight,
                                  const torch::Tensor& targets, int64_t keep_logits_bytes) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == torch::kFloat,
              "HeadCrossEntropySum: expected fp32 hidden [N, H], found ", hidden.scalar_type(), " ",
              hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1),
              "HeadCrossEntropySum: expected weight [V, ", hidden.size(1), "], found ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == torch::kFloat || weight.scalar_type() == torch::kBFloat16 ||
                  weight.scalar_type() == torch::kHalf,
              "HeadCrossEntropySum: expected a fp32, bf16 or fp16 weight, found ",
              weight.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) &&
                  targets.scalar_type() == torch::kLong,
              "HeadCrossEntropySum: expected int64 targets [", hidden.size(0), "], found ",
              targets.scalar_type(), " ", targets.sizes());
  if (targets.numel() > 0) {
    const int64_t lo = targets.min().item<int64_t>(), hi = targets.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < weight.size(0), "HeadCrossEntropySum: target out of range [0, ",
                weight.size(0), "): found ", lo < 0 ? lo : hi);
  }
  if (hidden.size(0) == 0) return (hidden.sum() * 0.0).sum();
  return HeadCrossEntropyFn::apply(hidden, weight, targets, keep_logits_bytes);
}

}  // namespace fedlora::edge
