#pragma once
// Dense fp32 and bf16 GEMMs of the engine's frozen projections, on oneDNN.
//
// libtorch 1.13's CPU matmul of fp32 tensors runs on BLAS (OpenBLAS on
// Debian), which reaches about half the throughput of oneDNN's AVX-512 fp32
// kernels at the engine's shapes (decoder projections of 256..4096 rows; see
// docs/benchmarks.md). These functions call oneDNN's matmul primitive
// directly on the tensors' memory (no copy, no layout change) and fall back
// to torch::matmul where oneDNN cannot take the operands.
//
// Contract:
//  * MatmulNT(x, w) == torch::matmul(x, w.t()) for x [..., K] and w [N, K]
//    (result [..., N]); MatmulNN(g, w) == torch::matmul(g, w) for g [..., N]
//    and w [N, K] (result [..., K]). Both to fp32 rounding (the summation order
//    differs from BLAS; tests bound the difference).
//  * MatmulTN(a, b) == a2^T b2 for a [..., M] and b [..., K] with the same
//    leading dims, flattened to a2 [R, M] and b2 [R, K] (result [M, K]): the
//    weight gradient of a product over R rows. oneDNN reads a2 transposed in
//    place (no copy).
//  * oneDNN runs when both operands are fp32 CPU tensors, w is 2-D with a unit
//    stride in either dimension, CPU autocast is off and the backend is
//    kOnednn; otherwise the torch::matmul result is returned (autocast then
//    applies as usual). Neither function records autograd history: callers
//    that need gradients wrap them (FrozenMatmul in lora.h does).
//  * MatmulNTAccumulate(x, w, out): out += MatmulNT(x, w), and
//    MatmulNNAccumulate(g, w, out): out += MatmulNN(g, w), written into out's
//    memory by the GEMM itself (a oneDNN sum post-op: no temporary product, no
//    separate add pass) when oneDNN takes the operands and out is a contiguous
//    fp32 tensor of the product's shape; otherwise out.add_(product). out must
//    not overlap the operands.
//  * MatmulNTBf16(x, w) == bf16(x) bf16(w)^T and MatmulNNBf16(g, w) ==
//    bf16(g) bf16(w): products of the operands rounded to bf16 (as
//    Tensor::to(kBFloat16) rounds: to nearest even), accumulated in fp32 and
//    returned in fp32 (torch::matmul under autocast also rounds its result to
//    bf16; these do not). Operands already bf16 are used as they are; fp32 ones
//    are converted by ToBf16 at each call (a frozen weight stays fp32 in
//    memory). They run on oneDNN when the backend
//    is kOnednn and the operands are fp32 / bf16 CPU tensors with w 2-D of a
//    unit stride, autocast on or off; otherwise torch::matmul of the rounded
//    operands widened to fp32 (the same values, up to summation order).
//  * ToBf16(t) == t.to(kBFloat16) bit for bit except for NaN payloads (NaN
//    becomes the quiet NaN 0x7FC0), contiguous, converted on libtorch's threads.
//  * Thread-safe: each thread keeps its own oneDNN stream and primitive cache.
//    The thread count is the calling thread's OpenMP setting (the one
//    at::set_num_threads sets).
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fedlora::edge {

enum class GemmBackend { kOnednn, kTorch };

// Process-wide choice (default kOnednn; kTorch forces torch::matmul, for
// comparisons in benchmarks and tests).
void SetGemmBackend(GemmBackend backend);
GemmBackend gemm_backend();

// Sets the backend for its lifetime and restores the previous one after.
class GemmBackendScope {
 public:
  explicit GemmBackendScope(GemmBackend backend) : saved_(gemm_backend()) {
    SetGemmBackend(backend);
  }
  ~GemmBackendScope() { SetGemmBackend(saved_); }
  GemmBackendScope(const GemmBackendScope&) = delete;
  GemmBackendScope& operator=(const GemmBackendScope&) = delete;

 private:
  GemmBackend saved_;
};

// Products run on oneDNN so far in this process (all threads); tests use it
// to tell the oneDNN path from the fallback.
int64_t OnednnGemmCount();

at::Tensor MatmulNT(const at::Tensor& x, const at::Tensor& w);
at::Tensor MatmulNN(const at::Tensor& g, const at::Tensor& w);
at::Tensor MatmulTN(const at::Tensor& a, const at::Tensor& b);
void MatmulNTAccumulate(const at::Tensor& x, const at::Tensor& w, at::Tensor& out);
void MatmulNNAccumulate(const at::Tensor& g, const at::Tensor& w, at::Tensor& out);

at::Tensor MatmulNTBf16(const at::Tensor& x, const at::Tensor& w);
at::Tensor MatmulNNBf16(const at::Tensor& g, const at::Tensor& w);
at::Tensor ToBf16(const at::Tensor& t);

}  // namespace fedlora::edge
