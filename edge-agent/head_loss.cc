#include "edge-agent/head_loss.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "edge-agent/gemm.h"
#include "torch/csrc/autograd/custom_function.h"

namespace fedlora::edge {
namespace {

torch::Tensor WeightBlock(const torch::Tensor& weight, int64_t r0, int64_t r1) {
  torch::Tensor w = weight.slice(0, r0, r1);
  return w.scalar_type() == torch::kFloat ? w : w.to(torch::kFloat);
}

// Subtracts `value` at each row's target column where the target falls in the
// block [r0, r0 + block.size(1)).
void AddAtTargets(torch::Tensor& block, const torch::Tensor& targets, int64_t r0, float value) {
  const int64_t cols = block.size(1);
  torch::Tensor local = targets - r0;
  torch::Tensor inside = (local >= 0).logical_and_(local < cols);
  torch::Tensor add = inside.to(torch::kFloat).mul_(value).unsqueeze(1);
  block.scatter_add_(1, local.clamp(0, cols - 1).unsqueeze(1), add);
}

class HeadCrossEntropyFn : public torch::autograd::Function<HeadCrossEntropyFn> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& hidden,
                               const torch::Tensor& weight, const torch::Tensor& targets,
                               int64_t keep_logits_bytes) {
    const int64_t n = hidden.size(0), vocab = weight.size(0);
    const bool keep = n * vocab * static_cast<int64_t>(sizeof(float)) <= keep_logits_bytes;
    torch::Tensor h = hidden.contiguous();
    torch::Tensor run_max = torch::full({n}, -std::numeric_limits<float>::infinity(),
                                        h.options());
    torch::Tensor run_sum = torch::zeros({n}, h.options());
    torch::Tensor target_logit = torch::zeros({n}, h.options());
    std::vector<torch::Tensor> saved = {h, targets};
    for (int64_t r0 = 0; r0 < vocab; r0 += kHeadBlockRows) {
      const int64_t r1 = std::min(vocab, r0 + kHeadBlockRows);
      torch::Tensor logits = MatmulNT(h, WeightBlock(weight, r0, r1));  // [n, r1 - r0]
      torch::Tensor new_max = torch::maximum(run_max, std::get<0>(logits.max(1)));
      run_sum.mul_((run_max - new_max).exp_()).add_((logits - new_max.unsqueeze(1)).exp_().sum(1));
      run_max = new_max;
      torch::Tensor local = targets - r0;
      torch::Tensor inside = (local >= 0).logical_and_(local < r1 - r0);
      torch::Tensor picked = logits.gather(1, local.clamp(0, r1 - r0 - 1).unsqueeze(1)).squeeze(1);
      target_logit.add_(picked.mul_(inside));
      if (keep) saved.push_back(logits);
    }
    torch::Tensor lse = run_max.add_(run_sum.log_());
    saved.insert(saved.begin() + 2, lse);
    ctx->save_for_backward(saved);
    ctx->saved_data["weight"] = weight;
    return (lse - target_logit).sum();
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor& h = saved[0];
    const torch::Tensor& targets = saved[1];
    const torch::Tensor lse = saved[2].unsqueeze(1);
    const bool kept = saved.size() > 3;
    const torch::Tensor weight = ctx->saved_data["weight"].toTensor();
    const float g = grads[0].item<float>();
    const int64_t vocab = weight.size(0);
    torch::Tensor gh;
    size_t block = 0;
    for (int64_t r0 = 0; r0 < vocab; r0 += kHeadBlockRows, ++block) {
      const int64_t r1 = std::min(vocab, r0 + kHeadBlockRows);
      torch::Tensor w = WeightBlock(weight, r0, r1);
      // softmax - one-hot, in place on the kept (or recomputed) logits.
      torch::Tensor p = kept ? saved[3 + block] : MatmulNT(h, w);
      p.sub_(lse).exp_();
      AddAtTargets(p, targets, r0, -1.0f);
      if (g != 1.0f) p.mul_(g);
      torch::Tensor part = MatmulNN(p, w);
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
