#pragma once
// The LM head and its cross-entropy in one step, a block of vocabulary rows at
// a time.
//
// The plain path (logits = h W^T, then cross_entropy) materialises the [N, V]
// logits, their log-softmax (kept for backward) and two [N, V] gradients; at a
// 49k vocabulary and 256 positions each is 50 MB, above glibc's largest mmap
// threshold, so every step maps, faults in and unmaps them. This one computes
// the logits kHeadBlockRows vocabulary rows at a time with a running
// log-sum-exp, keeps only the log-sum-exp per position (and the logit blocks
// themselves when they are small, else recomputes them in backward), and
// forms the gradient block by block: softmax minus one-hot, times the block
// of W.
//
// Under CPU autocast the block products run in the autocast dtype (as the
// head's Linear would), the log-sum-exp and softmax in fp32.
//
// Results equal log_softmax + nll_loss to float rounding
// (tests/edge/head_loss_test.cc checks the loss and the gradient against
// torch::nn::functional::cross_entropy).
#include <torch/torch.h>

#include <cstdint>

namespace fedlora::edge {

constexpr int64_t kHeadBlockRows = 4096;
// When the blocks are recomputed, fewer rows per block (a multiple of 256, at
// least 256) so that one fp32 block of N positions takes about this many bytes.
constexpr int64_t kHeadRecomputeBlockBytes = 4ll << 20;
// The logit blocks of a call are kept for backward when N * V fp32 values take
// at most this many bytes; above it backward recomputes them (one more GEMM).
constexpr int64_t kHeadKeepLogitsBytes = 64ll << 20;

// hidden: fp32 [N, H]; weight: [V, H] in fp32, bf16 or fp16 (converted a block
// at a time); targets: int64 [N], every value in [0, V). Returns the fp32 scalar
//   sum_i ( logsumexp_j (hidden_i . weight_j) - hidden_i . weight_{targets_i} ),
// differentiable with respect to hidden (no gradient for weight). Throws
// c10::Error on other dtypes, shapes or out-of-range targets.
torch::Tensor HeadCrossEntropySum(const torch::Tensor& hidden, const torch::Tensor& weight,
                                  const torch::Tensor& targets,
                                  int64_t keep_logits_bytes = kHeadKeepLogitsBytes);

}  // namespace fedlora::edge
