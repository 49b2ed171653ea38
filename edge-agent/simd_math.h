#pragma once
// Helpers of the engine's hand-written CPU kernels (attention.cc, fused_ops.cc,
// head_loss.cc, optim.cc, gemm.cc);
// internal to fedlora_edge, not an API.
//
// Contract:
//  * FEDLORA_MULTI_ISA on a kernel function compiles it for AVX-512, AVX2 and
//    baseline x86-64 (GCC target_clones); the loader picks the widest the CPU
//    has. Elsewhere it expands to nothing.
//  * FEDLORA_KERNEL_INLINE forces a helper inline into each clone, so that it
//    is compiled for that clone's ISA: GCC keeps a large `inline` helper out of
//    line, compiled for the baseline (SSE2), which ran the attention products
//    at a fraction of the speed.
//  * ExpBounds: the clamp bounds of the functions below, read once outside a
//    loop (OpaqueExpBounds()) and passed in. They are hidden from the
//    optimiser on purpose: with a known constant bound GCC threads a second
//    path through the loop body for the clamped lanes (everything after the
//    clamp folds to a constant there), and a loop with two paths does not
//    vectorise; the softmax exp loops of attention.cc ran scalar that way.
//  * ExpNonPositive(x, b) = exp(x) for x <= 0 within ~1e-7 relative (Cody-Waite
//    range reduction and a degree-6 polynomial), clamped at exp(-87) below.
//  * ExpClamped(x, b) = exp(x) within ~1e-7 relative for x in [-87, 88]; the
//    argument is clamped into that range first (so no inf, no denormals).
//  * Sigmoid(x, b) = 1 / (1 + ExpClamped(-x, b)): within ~1e-7 relative of
//    the exact value for |x| <= 87, and 0 or 1 to within 1e-38 beyond.
//  All are branch-free so that loops over them vectorise.
//  * kElementGrain: elements per chunk of an at::parallel_for over a flat
//    range (ATen's own grain for element-wise loops); RowsPerChunk(width): rows
//    of `width` elements per chunk for about as many, at least 1.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FEDLORA_MULTI_ISA __attribute__((target_clones("avx512f", "avx2", "default")))
#define FEDLORA_KERNEL_INLINE inline __attribute__((always_inline))
#else
#define FEDLORA_MULTI_ISA
#define FEDLORA_KERNEL_INLINE inline
#endif

namespace fedlora::edge {

constexpr int64_t kElementGrain = 32768;

inline int64_t RowsPerChunk(int64_t width) {
  return std::max<int64_t>(1, kElementGrain / std::max<int64_t>(1, width));
}

struct ExpBounds {
  float lo, hi;
};

FEDLORA_KERNEL_INLINE ExpBounds OpaqueExpBounds() {
  ExpBounds b{-87.0f, 88.0f};
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(b.lo), "+x"(b.hi));
#elif defined(__GNUC__)
  __asm__("" : "+r"(b.lo), "+r"(b.hi));
#endif
  return b;
}

// 2^n p(x - n ln 2) for n = round(x / ln 2), given.
FEDLORA_KERNEL_INLINE float ExpReduced(float x, int32_t n) {
  const float nf = static_cast<float>(n);
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  const float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return y * two_n;
}

FEDLORA_KERNEL_INLINE float ExpNonPositive(float x, const ExpBounds& b) {
  x = std::max(x, b.lo);
  // Round to nearest: truncation of fx - 0.5 for fx <= 0.
  return ExpReduced(x, static_cast<int32_t>(x * 1.44269504088896341f - 0.5f));
}

FEDLORA_KERNEL_INLINE float ExpClamped(float x, const ExpBounds& b) {
  x = std::min(std::max(x, b.lo), b.hi);
  // Round to nearest: x / ln 2 + 128.5 is positive, so truncation floors it.
  return ExpReduced(x, static_cast<int32_t>(x * 1.44269504088896341f + 128.5f) - 128);
}

FEDLORA_KERNEL_INLINE float Sigmoid(float x, const ExpBounds& b) {
  return 1.0f / (1.0f + ExpClamped(-x, b));
}

}  // namespace fedlora::edge
