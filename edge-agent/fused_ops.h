#pragma once
// Element-wise pieces of the decoder layer as single autograd nodes that save
// only what their backward needs.
//
// Written as plain libtorch ops, each of these makes autograd keep extra
// full-size tensors for backward: RMSNorm keeps x * rstd, SwiGLU keeps
// silu(gate), RoPE keeps rotate_half(x). These functions save only their
// inputs (and RMSNorm's per-row rstd); backward recomputes the rest. At
// smollm135m shapes that is about 3.5 MB fewer per layer and 256 positions
// (docs/benchmarks.md).
//
// fp32 CPU inputs run single-pass kernels (rows split among libtorch's
// threads; the composites take 3 to 9 passes, each its own parallel region):
// results within ~1e-6 relative of the composite's (the row sums run in
// another order, SwiGLU's sigmoid is simd_math.h's polynomial exp). RoPE's
// input gradient comes back in the layout of its input (a transposed view of
// the projection stays one, so no copy on the way back). Other dtypes run the
// composite's own ops: results equal them bit for bit.
//
// Contracts (tests/edge/fused_ops_test.cc checks values and gradients against
// the composite ops, fp32 and bf16, and under CPU autocast):
//  * RmsNorm(x, w, eps) = w * (x * rsqrt(mean(x^2, -1) + eps)); x [..., H],
//    w [H]; gradients for x and, when it requires grad, w.
//  * SwiGlu(gate, up) = silu(gate) * up, same shapes.
//  * Rope(x, cos, sin) = x * cos + rotate_half(x) * sin, with rotate_half(x) =
//    cat(-x[..., D/2:], x[..., :D/2]); x [..., T, D], cos and sin broadcast to
//    it and get no gradient.
// Each returns a tensor of the composite's dtype; the input gradients come back
// in the inputs' dtypes.
#include <torch/torch.h>

namespace fedlora::edge {

torch::Tensor RmsNorm(const torch::Tensor& x, const torch::Tensor& w, double eps);
torch::Tensor SwiGlu(const torch::Tensor& gate, const torch::Tensor& up);
torch::Tensor Rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

}  // namespace fedlora::edge
