#include "edge-agent/gemm.h"

#include <ATen/autocast_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"

namespace fedlora::edge {
namespace {

std::atomic<GemmBackend> g_backend{GemmBackend::kOnednn};
std::atomic<int64_t> g_onednn_calls{0};

// A matmul dst[M, N] = src[M, K] * wei[K, N]: src and dst row-major and dense,
// wei given by its two strides (row-major or column-major view of w).
struct Key {
  int64_t m, k, n, wei_stride0, wei_stride1, src_stride0, src_stride1;
  bool operator<(const Key& o) const {
    return std::array<int64_t, 7>{m, k, n, wei_stride0, wei_stride1, src_stride0, src_stride1} <
           std::array<int64_t, 7>{o.m,           o.k,           o.n,          o.wei_stride0,
                                  o.wei_stride1, o.src_stride0, o.src_stride1};
  }
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

// dst[M, N] (dense, row-major) = src[M, K] * wei[K, N], where src[m][k] is at
// src_ptr + m * a0 + k * a1 and wei[k][n] at wei_ptr + k * s0 + n * s1.
void Run(const float* src_ptr, int64_t m, int64_t k, int64_t a0, int64_t a1,
         const float* wei_ptr, int64_t n, int64_t s0, int64_t s1, at::Tensor& dst) {
  ThreadState& st = State();
  using dt = dnnl::memory::data_type;
  const dnnl::memory::desc src({m, k}, dt::f32, dnnl::memory::dims{a0, a1});
  const dnnl::memory::desc wei({k, n}, dt::f32, dnnl::memory::dims{s0, s1});
  const dnnl::memory::desc out({m, n}, dt::f32, dnnl::memory::dims{n, 1});
  const Key key{m, k, n, s0, s1, a0, a1};
  auto it = st.primitives.find(key);
  if (it == st.primitives.end()) {
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src, wei, out), st.engine);
    if (st.primitives.size() >= kMaxPrimitives) st.primitives.clear();
    it = st.primitives.emplace(key, dnnl::matmul(pd)).first;
  }
  dnnl::memory src_m(src, st.engine, const_cast<float*>(src_ptr));
  dnnl::memory wei_m(wei, st.engine, const_cast<float*>(wei_ptr));
  dnnl::memory dst_m(out, st.engine, dst.data_ptr<float>());
  it->second.execute(st.stream,
                     {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, wei_m}, {DNNL_ARG_DST, dst_m}});
  st.stream.wait();
  g_onednn_calls.fetch_add(1, std::memory_order_relaxed);
}

// a [..., K] * wei (K x N, strides s0, s1) -> [..., N].
at::Tensor Product(const at::Tensor& a, const at::Tensor& w, int64_t n, int64_t s0, int64_t s1) {
  const int64_t k = a.size(-1);
  at::Tensor a2 = a.reshape({-1, k});
  if (!a2.is_contiguous()) a2 = a2.contiguous();
  std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, a.options());
  at::Tensor out2 = out.view({a2.size(0), n});
  Run(a2.data_ptr<float>(), a2.size(0), k, k, 1, w.data_ptr<float>(), n, s0, s1, out2);
  return out;
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

at::Tensor MatmulTN(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor a2 = a.reshape({-1, a.size(-1)});  // [R, M]
  const at::Tensor b2 = b.reshape({-1, b.size(-1)});  // [R, K]
  if (!Applies(a2, b2) || a2.size(0) != b2.size(0)) return at::matmul(a2.t(), b2);
  try {
    const at::Tensor ac = a2.contiguous(), bc = b2.contiguous();
    const int64_t rows = ac.size(0), m = ac.size(1), k = bc.size(1);
    at::Tensor out = at::empty({m, k}, a.options());
    // src = ac^T [M, R]: src[m][r] = ac[r][m]; wei = bc [R, K] row-major.
    Run(ac.data_ptr<float>(), m, rows, 1, m, bc.data_ptr<float>(), k, k, 1, out);
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

}  // namespace fedlora::edge
