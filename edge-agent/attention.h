#pragma once
// Fused causal self-attention for the engine's training and prefill forward.
//
// The plain path (matmul, mask, softmax, matmul) materialises the [B, H, T, T]
// scores and probabilities, keeps the probabilities for backward, runs each
// product as a batched GEMM with an inner dimension of only head_dim (slow on
// CPU) and computes the masked half of every score matrix. This one visits only
// the visible (query, key) pairs, keeps per row only the log-sum-exp for
// backward (which recomputes the probabilities), and shares each key/value head
// among its query heads without copying it (grouped-query attention).
//
// Results equal the plain path's to float rounding (tests/edge/attention_test.cc
// checks outputs and gradients against it).

#include <torch/torch.h>

namespace fedlora::edge {

// q: [B, H, T, D], k and v: [B, Hkv, T, D], float32 (any strides), H a multiple
// of Hkv; query head h reads key/value head h / (H / Hkv). Returns [B, H, T, D]:
//   out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h', j]) v[b, h', j]
// over the keys j visible to query i: j <= i and, when window > 0, i - j < window.
// With `starts` (int64 [B, T], 0 <= starts[b, i] <= i) query i of batch row b
// also sees only keys j >= starts[b, i] (packed sequences: the first position of
// its own sequence). Differentiable with respect to q, k and v. Throws
// c10::Error on other dtypes or shapes (the caller checks FusedAttentionApplies
// first) and on starts out of range.
torch::Tensor FusedCausalAttention(const torch::Tensor& q, const torch::Tensor& k,
                                   const torch::Tensor& v, double scale, int64_t window = 0,
                                   const torch::Tensor& starts = {});

// When the boolean mask `masked` ([B, 1, T, T], true = hidden) leaves each
// query i exactly the keys [s, i] for some s (a causal mask restricted to
// contiguous sequences, as packing makes), returns those s as int64 [B, T];
// otherwise an undefined tensor (the caller then keeps the masked path).
torch::Tensor VisibleRangeStarts(const torch::Tensor& masked, int64_t B, int64_t T);

// Whether FusedCausalAttention handles these inputs (float32, 4-D, matching
// batch / length / head_dim, H a multiple of Hkv, T >= 1).
bool FusedAttentionApplies(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v);

// How many threads shared the heads of the latest FusedCausalAttention forward
// or backward in this process (1 when it ran on the calling thread alone; at
// most at::get_num_threads() and B * H). The benchmark reports it.
int FusedAttentionThreadsUsed();

}  // namespace fedlora::edge
