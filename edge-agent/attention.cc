#include "edge-agent/attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fedlora::edge {
namespace {

// The hot loops are compiled for AVX-512, AVX2 and baseline x86-64; the loader
// picks the widest the CPU has. Reductions use `omp simd` (built with
// -fopenmp-simd, no OpenMP runtime), the rest auto-vectorises.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FEDLORA_MULTI_ISA __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FEDLORA_MULTI_ISA
#endif

// exp(x) for x <= 0 (softmax arguments after subtracting the row maximum):
// Cody-Waite range reduction and a degree-6 polynomial (relative error ~1e-7),
// branch-free so that loops over it vectorise.
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);
  const float fx = x * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(fx - 0.5f);  // round to nearest (fx <= 0)
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

struct Dims {
  int64_t T = 0, D = 0, window = 0;
  float scale = 1.0f;
  int64_t First(int64_t i) const { return window > 0 ? std::max<int64_t>(0, i - window + 1) : 0; }
};

// All per-row loops run over keys j with j-contiguous rows of the transposed
// keys / values ([D, T]), so every inner loop is a long unit-stride vector loop.

// s[j] = scale * q . k_j for j in [lo, i], with kt the head's keys transposed [D, T].
inline void Scores(const Dims& d, const float* __restrict q, const float* __restrict kt,
                   int64_t lo, int64_t i, float* __restrict s) {
  for (int64_t j = lo; j <= i; ++j) s[j] = 0.0f;
  for (int64_t c = 0; c < d.D; ++c) {
    const float qc = q[c] * d.scale;
    const float* __restrict row = kt + c * d.T;
    for (int64_t j = lo; j <= i; ++j) s[j] += qc * row[j];
  }
}

// One (batch, head): out [T, D] and lse [T] from q [T, D], kt and vt [D, T].
FEDLORA_MULTI_ISA
void ForwardHead(const Dims d, const float* __restrict q, const float* __restrict kt,
                 const float* __restrict vt, float* __restrict out, float* __restrict lse,
                 float* __restrict s) {
  for (int64_t i = 0; i < d.T; ++i) {
    const int64_t lo = d.First(i);
    Scores(d, q + i * d.D, kt, lo, i, s);
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = lo; j <= i; ++j) m = std::max(m, s[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = lo; j <= i; ++j) {
      const float p = ExpNonPositive(s[j] - m);
      s[j] = p;
      sum += p;
    }
    const float inv = 1.0f / sum;
    float* __restrict o = out + i * d.D;
    for (int64_t c = 0; c < d.D; ++c) {
      const float* __restrict row = vt + c * d.T;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = lo; j <= i; ++j) acc += s[j] * row[j];
      o[c] = acc * inv;
    }
    lse[i] = m + std::log(sum);
  }
}

// One (batch, head) of backward. dq [T, D] is this head's; dkt and dvt [D, T]
// are this head's contributions, transposed (summed over the group by the caller).
FEDLORA_MULTI_ISA
void BackwardHead(const Dims d, const float* __restrict q, const float* __restrict kt,
                  const float* __restrict vt, const float* __restrict out,
                  const float* __restrict dout, const float* __restrict lse, float* __restrict dq,
                  float* __restrict dkt, float* __restrict dvt, float* __restrict s,
                  float* __restrict g) {
  std::fill(dkt, dkt + d.T * d.D, 0.0f);
  std::fill(dvt, dvt + d.T * d.D, 0.0f);
  for (int64_t i = 0; i < d.T; ++i) {
    const int64_t lo = d.First(i);
    const float* __restrict qi = q + i * d.D;
    const float* __restrict gi = dout + i * d.D;
    const float* __restrict oi = out + i * d.D;
    float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
    for (int64_t c = 0; c < d.D; ++c) delta += gi[c] * oi[c];
    Scores(d, qi, kt, lo, i, s);
    const float l = lse[i];
    for (int64_t j = lo; j <= i; ++j) s[j] = ExpNonPositive(s[j] - l);  // probabilities
    for (int64_t j = lo; j <= i; ++j) g[j] = 0.0f;
    for (int64_t c = 0; c < d.D; ++c) {  // g = dO_i . v_j
      const float gc = gi[c];
      const float* __restrict row = vt + c * d.T;
      for (int64_t j = lo; j <= i; ++j) g[j] += gc * row[j];
    }
    // g becomes the gradient w.r.t. q_i . k_j (the softmax backward, times scale).
    for (int64_t j = lo; j <= i; ++j) g[j] = s[j] * (g[j] - delta) * d.scale;
    float* __restrict dqi = dq + i * d.D;
    for (int64_t c = 0; c < d.D; ++c) {
      const float qc = qi[c], gc = gi[c];
      const float* __restrict krow = kt + c * d.T;
      float* __restrict dkrow = dkt + c * d.T;
      float* __restrict dvrow = dvt + c * d.T;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = lo; j <= i; ++j) {
        dkrow[j] += g[j] * qc;
        dvrow[j] += s[j] * gc;
        acc += g[j] * krow[j];
      }
      dqi[c] = acc;
    }
  }
}

class FusedAttentionFn : public torch::autograd::Function<FusedAttentionFn> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& q_in,
                               const torch::Tensor& k_in, const torch::Tensor& v_in, double scale,
                               int64_t window) {
    const torch::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
    const int64_t Hkv = k.size(1), rep = H / Hkv;
    const torch::Tensor kt = k.transpose(-1, -2).contiguous();
    const torch::Tensor vt = v.transpose(-1, -2).contiguous();
    torch::Tensor out = torch::empty_like(q);
    torch::Tensor lse = torch::empty({B, H, T}, q.options());
    const Dims d{T, D, window, static_cast<float>(scale)};
    const float* qp = q.data_ptr<float>();
    const float* ktp = kt.data_ptr<float>();
    const float* vtp = vt.data_ptr<float>();
    float* op = out.data_ptr<float>();
    float* lp = lse.data_ptr<float>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> s(static_cast<size_t>(T));
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t kv = (bh / H) * Hkv + (bh % H) / rep;
        ForwardHead(d, qp + bh * T * D, ktp + kv * D * T, vtp + kv * D * T, op + bh * T * D,
                    lp + bh * T, s.data());
      }
    });
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window"] = window;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3],
                        &lse = saved[4];
    const torch::Tensor dout = grads[0].contiguous();
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
    const int64_t Hkv = k.size(1), rep = H / Hkv;
    const torch::Tensor kt = k.transpose(-1, -2).contiguous();
    const torch::Tensor vt = v.transpose(-1, -2).contiguous();
    torch::Tensor dq = torch::empty_like(q);
    torch::Tensor dkt_heads = torch::empty({B, H, D, T}, q.options());
    torch::Tensor dvt_heads = torch::empty({B, H, D, T}, q.options());
    const Dims d{T, D, ctx->saved_data["window"].toInt(),
                 static_cast<float>(ctx->saved_data["scale"].toDouble())};
    const float* qp = q.data_ptr<float>();
    const float* ktp = kt.data_ptr<float>();
    const float* vtp = vt.data_ptr<float>();
    const float* op = out.data_ptr<float>();
    const float* gp = dout.data_ptr<float>();
    const float* lp = lse.data_ptr<float>();
    float* dqp = dq.data_ptr<float>();
    float* dkp = dkt_heads.data_ptr<float>();
    float* dvp = dvt_heads.data_ptr<float>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> s(static_cast<size_t>(T)), g(static_cast<size_t>(T));
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t kv = (bh / H) * Hkv + (bh % H) / rep;
        const int64_t at = bh * T * D;
        BackwardHead(d, qp + at, ktp + kv * D * T, vtp + kv * D * T, op + at, gp + at,
                     lp + bh * T, dqp + at, dkp + at, dvp + at, s.data(), g.data());
      }
    });
    torch::Tensor dk = dkt_heads.view({B, Hkv, rep, D, T}).sum(2).transpose(-1, -2);
    torch::Tensor dv = dvt_heads.view({B, Hkv, rep, D, T}).sum(2).transpose(-1, -2);
    return {dq, dk, dv, torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

bool FusedAttentionApplies(const torch::Tensor& q, const torch::Tensor& k,
                           const torch::Tensor& v) {
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return false;
  for (const torch::Tensor* t : {&q, &k, &v}) {
    if (t->scalar_type() != torch::kFloat || t->device().type() != torch::kCPU) return false;
  }
  return k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
         q.size(3) == k.size(3) && q.size(2) >= 1 && k.size(1) >= 1 &&
         q.size(1) % k.size(1) == 0;
}

torch::Tensor FusedCausalAttention(const torch::Tensor& q, const torch::Tensor& k,
                                   const torch::Tensor& v, double scale, int64_t window) {
  TORCH_CHECK(FusedAttentionApplies(q, k, v),
              "FusedCausalAttention: needs float32 q [B,H,T,D] and k, v [B,Hkv,T,D] with H % Hkv "
              "== 0; got q ",
              q.sizes(), " ", q.scalar_type(), ", k ", k.sizes(), ", v ", v.sizes());
  return FusedAttentionFn::apply(q, k, v, scale, window);
}

}  // namespace fedlora::edge
