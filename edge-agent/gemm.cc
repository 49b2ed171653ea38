#include "edge-agent/gemm.h"

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "edge-agent/simd_math.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace fedlora::edge {
namespace {

std::atomic<GemmBackend> g_backend{GemmBackend::kOnednn};
std::atomic<int64_t> g_onednn_calls{0};

// A matmul dst[M, N] = src[M, K] * wei[K, N]: src and dst row-major and dense,
// wei given by its two strides (row-major or column-major view of w).
// Operands are both fp32 or both bf16 (`bf16`); the result is fp32 either way,
// written over dst or, with `accumulate`, added to it (a sum post-op).
struct Key {
  int64_t m, k, n, wei_stride0, wei_stride1, src_stride0, src_stride1, bf16, accumulate;
  std::array<int64_t, 9> Fields() const {
    return {m, k, n, wei_stride0, wei_stride1, src_stride0, src_stride1, bf16, accumulate};
  }
  bool operator<(const Key& o) const { return Fields() < o.Fields(); }
};

// Per-thread oneDNN state: an engine, an in-order stream and the primitives
// made so far (the engine's few distinct shapes; bounded below).
struct ThreadState {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::map<Key, dnnl::matmul> primitives;
};

ThreadState& State() {
  thread_local ThreadState state;
  return state;
}

constexpr size_t kMaxPrimitives = 256;

// Whether oneDNN takes (a [..., K], w 2-D) under the current settings.
bool Applies(const at::Tensor& a, const at::Tensor& w) {
  if (g_backend.load(std::memory_order_relaxed) != GemmBackend::kOnednn) return false;
  if (at::autocast::is_cpu_enabled()) return false;
  if (!a.defined() || !w.defined() || a.dim() < 1 || w.dim() != 2) return false;
  if (a.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat) return false;
  if (!a.device().is_cpu() || !w.device().is_cpu()) return false;
  if (a.numel() == 0 || w.numel() == 0) return false;
  return w.stride(0) == 1 || w.stride(1) == 1;
}

// dst[M, N] (fp32, dense, row-major) = src[M, K] * wei[K, N], where src[m][k] is
// at src_ptr + m * a0 + k * a1 and wei[k][n] at wei_ptr + k * s0 + n * s1
// (elements of fp32, or of bf16 when `bf16`). With `accumulate`, dst += the
// product instead.
void Run(const void* src_ptr, int64_t m, int64_t k, int64_t a0, int64_t a1, const void* wei_ptr,
         int64_t n, int64_t s0, int64_t s1, bool bf16, at::Tensor& dst, bool accumulate = false) {
  ThreadState& st = State();
  using dt = dnnl::memory::data_type;
  const dt in = bf16 ? dt::bf16 : dt::f32;
  const dnnl::memory::desc src({m, k}, in, dnnl::memory::dims{a0, a1});
  const dnnl::memory::desc wei({k, n}, in, dnnl::memory::dims{s0, s1});
  const dnnl::memory::desc out({m, n}, dt::f32, dnnl::memory::dims{n, 1});
  const Key key{m, k, n, s0, s1, a0, a1, bf16, accumulate};
  auto it = st.primitives.find(key);
  if (it == st.primitives.end()) {
    dnnl::primitive_attr attr;
    if (accumulate) {
      dnnl::post_ops ops;
      ops.append_sum(1.0f);
      attr.set_post_ops(ops);
    }
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src, wei, out), attr, st.engine);
    if (st.primitives.size() >= kMaxPrimitives) st.primitives.clear();
    it = st.primitives.emplace(key, dnnl::matmul(pd)).first;
  }
  dnnl::memory src_m(src, st.engine, const_cast<void*>(src_ptr));
  dnnl::memory wei_m(wei, st.engine, const_cast<void*>(wei_ptr));
  dnnl::memory dst_m(out, st.engine, dst.data_ptr<float>());
  it->second.execute(st.stream,
                     {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, wei_m}, {DNNL_ARG_DST, dst_m}});
  st.stream.wait();
  g_onednn_calls.fetch_add(1, std::memory_order_relaxed);
}

// a [..., K] * wei (K x N, strides s0, s1) -> fp32 [..., N]; a and w both fp32
// or both bf16. With `into` (fp32, contiguous, [..., N]) the product is added
// to it and it is returned.
at::Tensor Product(const at::Tensor& a, const at::Tensor& w, int64_t n, int64_t s0, int64_t s1,
                   at::Tensor* into = nullptr) {
  const int64_t k = a.size(-1);
  at::Tensor a2 = a.reshape({-1, k});
  if (!a2.is_contiguous()) a2 = a2.contiguous();
  std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
  shape.back() = n;
  at::Tensor out = into != nullptr ? *into : at::empty(shape, a.options().dtype(at::kFloat));
  at::Tensor out2 = out.view({a2.size(0), n});
  Run(a2.data_ptr(), a2.size(0), k, k, 1, w.data_ptr(), n, s0, s1,
      a.scalar_type() == at::kBFloat16, out2, into != nullptr);
  return out;
}

// out += a w^T (nt) or a w, on oneDNN where MatmulNT / MatmulNN would run and
// out is a contiguous fp32 tensor of the product's shape; else out.add_ of
// their result.
void AccumulateProduct(const at::Tensor& a, const at::Tensor& w, bool nt, at::Tensor& out) {
  const int64_t n = w.dim() == 2 ? w.size(nt ? 0 : 1) : -1;
  if (Applies(a, w) && a.size(-1) == w.size(nt ? 1 : 0) && out.scalar_type() == at::kFloat &&
      out.device().is_cpu() && out.is_contiguous() && out.dim() == a.dim() &&
      out.size(-1) == n && out.numel() == a.numel() / a.size(-1) * n) {
    try {
      if (nt) {
        Product(a, w, n, w.stride(1), w.stride(0), &out);
      } else {
        Product(a, w, n, w.stride(0), w.stride(1), &out);
      }
      return;
    } catch (const dnnl::error&) {
      // Refused when the primitive was made, before anything was written.
    }
  }
  out.add_(nt ? at::matmul(a, w.t()) : at::matmul(a, w));
}

// c10::BFloat16's rounding (round to nearest even; NaN to the quiet NaN 0x7FC0)
// of one float's bits, written so that the loop below vectorises.
inline __attribute__((always_inline)) uint16_t Bf16Bits(uint32_t u) {
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

FEDLORA_MULTI_ISA void ConvertToBf16(const uint32_t* __restrict in, uint16_t* __restrict out,
                                          int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = Bf16Bits(in[i]);
}

// The operand as bf16: as it is when already bf16, else converted (ToBf16).
at::Tensor AsBf16(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? t : ToBf16(t);
}

// Whether oneDNN takes the bf16 product of (a [..., K], w 2-D): the backend,
// fp32 or bf16 CPU operands, a unit stride in w (autocast may be on).
bool AppliesBf16(const at::Tensor& a, const at::Tensor& w) {
  if (g_backend.load(std::memory_order_relaxed) != GemmBackend::kOnednn) return false;
  if (!a.defined() || !w.defined() || a.dim() < 1 || w.dim() != 2) return false;
  for (const at::Tensor* t : {&a, &w}) {
    if (t->scalar_type() != at::kFloat && t->scalar_type() != at::kBFloat16) return false;
    if (!t->device().is_cpu()) return false;
  }
  if (a.numel() == 0 || w.numel() == 0) return false;
  return w.stride(0) == 1 || w.stride(1) == 1;
}

// a w^T (nt) or a w as the fp32 product of the bf16-rounded operands.
at::Tensor Bf16Product(const at::Tensor& a, const at::Tensor& w, bool nt) {
  if (AppliesBf16(a, w) && a.size(-1) == w.size(nt ? 1 : 0)) {
    const at::Tensor ab = AsBf16(a), wb = AsBf16(w);
    try {
      // nt: wei = w^T (wei[k][n] = w[n][k]); else wei = w.
      return nt ? Product(ab, wb, wb.size(0), wb.stride(1), wb.stride(0))
                : Product(ab, wb, wb.size(1), wb.stride(0), wb.stride(1));
    } catch (const dnnl::error&) {
    }
  }
  const at::Tensor wf = AsBf16(w).to(at::kFloat);
  return at::matmul(AsBf16(a).to(at::kFloat), nt ? wf.t() : wf);
}

}  // namespace

void SetGemmBackend(GemmBackend backend) { g_backend.store(backend); }

GemmBackend gemm_backend() { return g_backend.load(); }

int64_t OnednnGemmCount() { return g_onednn_calls.load(); }

at::Tensor MatmulNT(const at::Tensor& x, const at::Tensor& w) {
  if (!Applies(x, w) || x.size(-1) != w.size(1)) return at::matmul(x, w.t());
  try {
    // wei = w^T: wei[k][n] = w[n][k].
    return Product(x, w, w.size(0), w.stride(1), w.stride(0));
  } catch (const dnnl::error&) {
    return at::matmul(x, w.t());  // a shape or layout oneDNN refused
  }
}

at::Tensor ToBf16(const at::Tensor& t) {
  if (t.scalar_type() != at::kFloat || !t.device().is_cpu()) return t.to(at::kBFloat16);
  const at::Tensor c = t.contiguous();
  at::Tensor out = at::empty(c.sizes(), c.options().dtype(at::kBFloat16));
  const auto* in = static_cast<const uint32_t*>(c.data_ptr());
  auto* o = static_cast<uint16_t*>(out.data_ptr());
  // Chunks of 64k elements: a thread's share stays in its cache, small tensors run inline.
  at::parallel_for(0, c.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    ConvertToBf16(in + begin, o + begin, end - begin);
  });
  return out;
}

at::Tensor MatmulTN(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor a2 = a.reshape({-1, a.size(-1)});  // [R, M]
  const at::Tensor b2 = b.reshape({-1, b.size(-1)});  // [R, K]
  if (!Applies(a2, b2) || a2.size(0) != b2.size(0)) return at::matmul(a2.t(), b2);
  try {
    const at::Tensor ac = a2.contiguous(), bc = b2.contiguous();
    const int64_t rows = ac.size(0), m = ac.size(1), k = bc.size(1);
    at::Tensor out = at::empty({m, k}, a.options());
    // src = ac^T [M, R]: src[m][r] = ac[r][m]; wei = bc [R, K] row-major.
    Run(ac.data_ptr<float>(), m, rows, 1, m, bc.data_ptr<float>(), k, k, 1, /*bf16=*/false, out);
    return out;
  } catch (const dnnl::error&) {
    return at::matmul(a2.t(), b2);
  }
}

at::Tensor MatmulNN(const at::Tensor& g, const at::Tensor& w) {
  if (!Applies(g, w) || g.size(-1) != w.size(0)) return at::matmul(g, w);
  try {
    return Product(g, w, w.size(1), w.stride(0), w.stride(1));
  } catch (const dnnl::error&) {
    return at::matmul(g, w);
  }
}

void MatmulNTAccumulate(const at::Tensor& x, const at::Tensor& w, at::Tensor& out) {
  AccumulateProduct(x, w, /*nt=*/true, out);
}

void MatmulNNAccumulate(const at::Tensor& g, const at::Tensor& w, at::Tensor& out) {
  AccumulateProduct(g, w, /*nt=*/false, out);
}

at::Tensor MatmulNTBf16(const at::Tensor& x, const at::Tensor& w) {
  return Bf16Product(x, w, /*nt=*/true);
}

at::Tensor MatmulNNBf16(const at::Tensor& g, const at::Tensor& w) {
  return Bf16Product(g, w, /*nt=*/false);
}

}  // namespace fedlora::edge
