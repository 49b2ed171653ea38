#include "edge-agent/attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "edge-agent/simd_math.h"

namespace fedlora::edge {
namespace {

// The hot loops are multi-ISA (simd_math.h). Reductions use `omp simd`, the
// rest auto-vectorises.

// The kernels work on 16-float vectors (GCC vector extensions: one zmm with
// AVX-512, two ymm with AVX2, four xmm otherwise) and on blocks of kRows query
// rows, so that every key or value vector loaded feeds kRows multiply-adds.
// head_dim is zero-padded to a multiple of 16 and the transposed keys / values
// ([D, T]) to a length that is one, so no loop has a scalar tail.
typedef float Vec __attribute__((vector_size(64)));
constexpr int64_t kW = 16;
constexpr int64_t kRows = 4;

FEDLORA_KERNEL_INLINE Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FEDLORA_KERNEL_INLINE void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }
FEDLORA_KERNEL_INLINE int64_t RoundUp(int64_t n) { return (n + kW - 1) / kW * kW; }

struct Dims {
  int64_t T = 0, Tp = 0, D = 0, window = 0;  // D padded; Tp = RoundUp(T)
  float scale = 1.0f;
  int64_t First(int64_t i) const { return window > 0 ? std::max<int64_t>(0, i - window + 1) : 0; }
};

// The first key query i sees: the window's, or a later per-row start (packed
// sequences: the first position of i's own sequence); starts may be null.
FEDLORA_KERNEL_INLINE int64_t Lo(const Dims& d, const int64_t* starts, int64_t i) {
  return starts != nullptr ? std::max(d.First(i), starts[i]) : d.First(i);
}

// The first key any of the n rows from i0 sees, rounded down to a vector.
FEDLORA_KERNEL_INLINE int64_t BlockStart(const Dims& d, const int64_t* starts, int64_t i0, int64_t n) {
  int64_t lo = Lo(d, starts, i0);
  for (int64_t r = 1; r < n; ++r) lo = std::min(lo, Lo(d, starts, i0 + r));
  return lo / kW * kW;
}

// The three products below keep a block of results (or of loop-invariant
// operands) in vector registers across their inner loop: up to kBlocks vectors
// per row of the kRows rows, 16 registers, so that each vector loaded feeds
// kRows multiply-adds and each broadcast feeds up to kBlocks. Each sums in the
// same order as a plain loop over its inner index would.
constexpr int kBlocks = 4;

// out[r][off .. off + NB * 16) = sum_{t in [t0, t1)} lhs[r][t] * rhs[t][off ..]
// for the kRows rows, given the row strides of lhs, rhs and out.
template <int NB>
FEDLORA_KERNEL_INLINE void BlockProduct(const float* __restrict lhs, int64_t lhs_stride,
                                        const float* __restrict rhs, int64_t rhs_stride,
                                        int64_t t0, int64_t t1, int64_t off,
                                        float* __restrict out, int64_t out_stride) {
  Vec acc[kRows][NB] = {};
  for (int64_t t = t0; t < t1; ++t) {
    Vec x[NB];
#pragma GCC unroll 4
    for (int k = 0; k < NB; ++k) x[k] = Load(rhs + t * rhs_stride + off + k * kW);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const float lr = lhs[r * lhs_stride + t];
#pragma GCC unroll 4
      for (int k = 0; k < NB; ++k) acc[r][k] += lr * x[k];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int k = 0; k < NB; ++k) Store(out + r * out_stride + off + k * kW, acc[r][k]);
  }
}

// out[r][j] = sum_c a[r][c] * bt[c][j] for the kRows rows of a ([kRows, D]) and
// j in [j0, j1), multiples of 16; bt is [D, Tp]; out rows have stride Tp.
FEDLORA_KERNEL_INLINE void RowsTimesTransposed(const Dims& d, const float* __restrict a,
                                               const float* __restrict bt, int64_t j0,
                                               int64_t j1, float* __restrict out) {
  int64_t j = j0;
  for (; j + kBlocks * kW <= j1; j += kBlocks * kW) {
    BlockProduct<kBlocks>(a, d.D, bt, d.Tp, 0, d.D, j, out, d.Tp);
  }
  for (; j < j1; j += kW) BlockProduct<1>(a, d.D, bt, d.Tp, 0, d.D, j, out, d.Tp);
}

// out[r][:] = sum_{j in [j0, j1)} w[r][j] * b[j][:] (w rows of stride Tp, b [T, D]).
FEDLORA_KERNEL_INLINE void WeightsTimesRows(const Dims& d, const float* __restrict w,
                                            const float* __restrict b, int64_t j0, int64_t j1,
                                            float* __restrict out) {
  int64_t c = 0;
  for (; c + kBlocks * kW <= d.D; c += kBlocks * kW) {
    BlockProduct<kBlocks>(w, d.Tp, b, d.D, j0, j1, c, out, d.D);
  }
  for (; c < d.D; c += kW) BlockProduct<1>(w, d.Tp, b, d.D, j0, j1, c, out, d.D);
}

// acc[j][c0 .. c0 + NB * 16) += sum_r w[r][j] * a[r][c0 ..] for j in [j0, j1),
// a's block held in registers across j.
template <int NB>
FEDLORA_KERNEL_INLINE void AddWeightedBlock(const Dims& d, const float* __restrict w,
                                            const float* __restrict a, int64_t j0, int64_t j1,
                                            int64_t c0, float* __restrict acc) {
  Vec av[kRows][NB];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int k = 0; k < NB; ++k) av[r][k] = Load(a + r * d.D + c0 + k * kW);
  }
  for (int64_t j = j0; j < j1; ++j) {
    const float w0 = w[j], w1 = w[d.Tp + j], w2 = w[2 * d.Tp + j], w3 = w[3 * d.Tp + j];
    float* row = acc + j * d.D + c0;
#pragma GCC unroll 4
    for (int k = 0; k < NB; ++k) {
      Store(row + k * kW, Load(row + k * kW) + w0 * av[0][k] + w1 * av[1][k] + w2 * av[2][k] +
                              w3 * av[3][k]);
    }
  }
}

// acc[j][:] += sum_r w[r][j] * a[r][:] for j in [j0, j1) (acc [T, D], a [kRows, D]).
FEDLORA_KERNEL_INLINE void AddWeightedRows(const Dims& d, const float* __restrict w,
                                           const float* __restrict a, int64_t j0, int64_t j1,
                                           float* __restrict acc) {
  int64_t c = 0;
  for (; c + kBlocks * kW <= d.D; c += kBlocks * kW) {
    AddWeightedBlock<kBlocks>(d, w, a, j0, j1, c, acc);
  }
  for (; c < d.D; c += kW) AddWeightedBlock<1>(d, w, a, j0, j1, c, acc);
}

// Copies rows [i0, i0 + n) of x ([T, D]) into buf ([kRows, D]), zero rows after n.
FEDLORA_KERNEL_INLINE void GatherRows(const Dims& d, const float* x, int64_t i0, int64_t n, float* buf) {
  std::memcpy(buf, x + i0 * d.D, static_cast<size_t>(n * d.D) * sizeof(float));
  std::fill(buf + n * d.D, buf + kRows * d.D, 0.0f);
}

// Query rows [row_begin, row_end) (a multiple of kRows apart, or to T) of one
// (batch, head): out [T, D] and lse [T] from q, v [T, D] and kt [D, Tp].
// starts: this batch row's [T] first visible keys, or null. s: [kRows, Tp]
// scratch, qa and ob: [kRows, D] scratch.
FEDLORA_MULTI_ISA
void ForwardHead(const Dims d, int64_t row_begin, int64_t row_end,
                 const int64_t* __restrict starts, const float* __restrict q,
                 const float* __restrict kt, const float* __restrict v, float* __restrict out,
                 float* __restrict lse, float* __restrict s, float* __restrict qa,
                 float* __restrict ob) {
  const ExpBounds eb = OpaqueExpBounds();
  for (int64_t i0 = row_begin; i0 < row_end; i0 += kRows) {
    const int64_t n = std::min(kRows, d.T - i0), hi = i0 + n - 1;
    const int64_t j0 = BlockStart(d, starts, i0, n);
    GatherRows(d, q, i0, n, qa);
    RowsTimesTransposed(d, qa, kt, j0, RoundUp(hi + 1), s);
    float inv[kRows] = {0, 0, 0, 0};
    for (int64_t r = 0; r < kRows; ++r) {
      float* row = s + r * d.Tp;
      if (r >= n) {
        std::fill(row + j0, row + hi + 1, 0.0f);
        continue;
      }
      const int64_t i = i0 + r, lo = Lo(d, starts, i);
      float m = -INFINITY;
#pragma omp simd reduction(max : m)
      for (int64_t j = lo; j <= i; ++j) m = std::max(m, row[j] * d.scale);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = lo; j <= i; ++j) {
        const float p = ExpNonPositive(row[j] * d.scale - m, eb);
        row[j] = p;
        sum += p;
      }
      std::fill(row + j0, row + lo, 0.0f);
      std::fill(row + i + 1, row + hi + 1, 0.0f);
      inv[r] = 1.0f / sum;
      lse[i] = m + std::log(sum);
    }
    WeightsTimesRows(d, s, v, j0, hi + 1, ob);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t c = 0; c < d.D; ++c) out[(i0 + r) * d.D + c] = ob[r * d.D + c] * inv[r];
    }
  }
}

// Query rows [row_begin, row_end) of one (batch, head) of backward: their rows
// of dq [T, D]; dk and dv [T, D] are these rows' contributions (zeroed here,
// summed over row parts and the group by the caller). delta[i] =
// dout[i] . out[i]. Scratch: s and g [kRows, Tp], qa, ga and ob [kRows, D].
FEDLORA_MULTI_ISA
void BackwardHead(const Dims d, int64_t row_begin, int64_t row_end,
                  const int64_t* __restrict starts, const float* __restrict q,
                  const float* __restrict k, const float* __restrict kt, const float* __restrict vt,
                  const float* __restrict dout, const float* __restrict delta,
                  const float* __restrict lse, float* __restrict dq, float* __restrict dk,
                  float* __restrict dv, float* __restrict s, float* __restrict g,
                  float* __restrict qa, float* __restrict ga, float* __restrict ob) {
  const ExpBounds eb = OpaqueExpBounds();
  std::fill(dk, dk + d.T * d.D, 0.0f);
  std::fill(dv, dv + d.T * d.D, 0.0f);
  for (int64_t i0 = row_begin; i0 < row_end; i0 += kRows) {
    const int64_t n = std::min(kRows, d.T - i0), hi = i0 + n - 1;
    const int64_t j0 = BlockStart(d, starts, i0, n), j1 = RoundUp(hi + 1);
    GatherRows(d, q, i0, n, qa);
    GatherRows(d, dout, i0, n, ga);
    RowsTimesTransposed(d, qa, kt, j0, j1, s);  // raw scores
    RowsTimesTransposed(d, ga, vt, j0, j1, g);  // dout . v_j
    for (int64_t r = 0; r < kRows; ++r) {
      float* ps = s + r * d.Tp;
      float* pg = g + r * d.Tp;
      if (r >= n) {
        std::fill(ps + j0, ps + hi + 1, 0.0f);
        std::fill(pg + j0, pg + hi + 1, 0.0f);
        continue;
      }
      const int64_t i = i0 + r, lo = Lo(d, starts, i);
      const float l = lse[i], dl = delta[i];
      for (int64_t j = lo; j <= i; ++j) {
        const float p = ExpNonPositive(ps[j] * d.scale - l, eb);
        ps[j] = p;                            // probability
        pg[j] = p * (pg[j] - dl) * d.scale;   // gradient w.r.t. the raw score q_i . k_j
      }
      for (float* row : {ps, pg}) {
        std::fill(row + j0, row + lo, 0.0f);
        std::fill(row + i + 1, row + hi + 1, 0.0f);
      }
    }
    WeightsTimesRows(d, g, k, j0, hi + 1, ob);
    std::memcpy(dq + i0 * d.D, ob, static_cast<size_t>(n * d.D) * sizeof(float));
    AddWeightedRows(d, g, qa, j0, hi + 1, dk);
    AddWeightedRows(d, s, ga, j0, hi + 1, dv);
  }
}

// The per-query starts of (batch, head) bh's batch row, or null without starts
// (an empty tensor).
struct RowStarts {
  const torch::Tensor& starts;
  int64_t H, T;
  const int64_t* operator()(int64_t bh) const {
    return starts.numel() > 0 ? starts.data_ptr<int64_t>() + (bh / H) * T : nullptr;
  }
};

// x [..., D] padded with zero columns to Dp, contiguous.
torch::Tensor PadLast(const torch::Tensor& x, int64_t to) {
  const int64_t n = x.size(-1);
  return n == to ? x.contiguous() : torch::constant_pad_nd(x, {0, to - n}).contiguous();
}

// Chunks handed out by the latest parallel_for over heads: one per thread.
std::atomic<int> threads_used{0};

// The work of B * H heads as `parts` row ranges per head, parts chosen so that
// the heads' row ranges split evenly among the threads (9 heads on 2 threads
// ran 5 on one and 4 on the other: 2 parts each make 18 of equal work). Part p
// of a causal head covers rows [T sqrt(p / parts), T sqrt((p + 1) / parts)),
// rounded to kRows, which holds 1 / parts of the visible (query, key) pairs.
struct HeadParts {
  int64_t heads, parts;
  std::vector<int64_t> bounds;  // parts + 1 row boundaries
  HeadParts(int64_t heads_in, int64_t T) : heads(heads_in) {
    const int64_t threads = std::max(1, at::get_num_threads());
    parts = 1;
    while ((heads * parts) % threads != 0 && parts < threads) ++parts;
    if ((heads * parts) % threads != 0 || T < parts * kRows) parts = 1;
    for (int64_t p = 0; p <= parts; ++p) {
      const double at = static_cast<double>(T) * std::sqrt(static_cast<double>(p) / parts);
      bounds.push_back(p == parts ? T : std::min(T, static_cast<int64_t>(at) / kRows * kRows));
    }
  }
  int64_t items() const { return heads * parts; }
};

// Runs body(bh, part, row_begin, row_end) over every (head, part) on
// libtorch's threads, counting them.
template <typename F>
void ForEachHeadPart(const HeadParts& hp, const F& body) {
  std::atomic<int> chunks{0};
  at::parallel_for(0, hp.items(), 1, [&](int64_t begin, int64_t end) {
    chunks.fetch_add(1, std::memory_order_relaxed);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t bh = it / hp.parts, part = it % hp.parts;
      body(bh, part, hp.bounds[part], hp.bounds[part + 1]);
    }
  });
  threads_used.store(chunks.load(), std::memory_order_relaxed);
}

class FusedAttentionFn : public torch::autograd::Function<FusedAttentionFn> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& q_in,
                               const torch::Tensor& k_in, const torch::Tensor& v_in, double scale,
                               int64_t window, const torch::Tensor& starts) {
    const int64_t B = q_in.size(0), H = q_in.size(1), T = q_in.size(2), D0 = q_in.size(3);
    const int64_t Hkv = k_in.size(1), rep = H / Hkv;
    const Dims d{T, RoundUp(T), RoundUp(D0), window, static_cast<float>(scale)};
    const torch::Tensor q = PadLast(q_in, d.D), k = PadLast(k_in, d.D), v = PadLast(v_in, d.D);
    const torch::Tensor kt = PadLast(k.transpose(-1, -2), d.Tp);
    torch::Tensor out = torch::empty_like(q);
    torch::Tensor lse = torch::empty({B, H, T}, q.options());
    const float* qp = q.data_ptr<float>();
    const float* ktp = kt.data_ptr<float>();
    const float* vp = v.data_ptr<float>();
    float* op = out.data_ptr<float>();
    float* lp = lse.data_ptr<float>();
    const RowStarts starts_of{starts, H, T};
    const HeadParts hp(B * H, T);
    ForEachHeadPart(hp, [&](int64_t bh, int64_t, int64_t r0, int64_t r1) {
      thread_local std::vector<float> s, qa, ob;
      s.resize(static_cast<size_t>(kRows * d.Tp));
      qa.resize(static_cast<size_t>(kRows * d.D));
      ob.resize(qa.size());
      const int64_t kv = (bh / H) * Hkv + (bh % H) / rep;
      ForwardHead(d, r0, r1, starts_of(bh), qp + bh * T * d.D, ktp + kv * d.D * d.Tp,
                  vp + kv * T * d.D, op + bh * T * d.D, lp + bh * T, s.data(), qa.data(),
                  ob.data());
    });
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window"] = window;
    ctx->saved_data["head_dim"] = D0;
    ctx->saved_data["starts"] = starts;
    return D0 == d.D ? out : out.narrow(-1, 0, D0);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3],
                        &lse = saved[4];
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2);
    const int64_t Hkv = k.size(1), rep = H / Hkv, D0 = ctx->saved_data["head_dim"].toInt();
    const Dims d{T, RoundUp(T), q.size(3), ctx->saved_data["window"].toInt(),
                 static_cast<float>(ctx->saved_data["scale"].toDouble())};
    const torch::Tensor dout = PadLast(grads[0], d.D);
    const torch::Tensor delta = (dout * out).sum(-1).contiguous();  // [B, H, T]
    const torch::Tensor kt = PadLast(k.transpose(-1, -2), d.Tp);
    const torch::Tensor vt = PadLast(v.transpose(-1, -2), d.Tp);
    torch::Tensor dq = torch::empty_like(q);
    const HeadParts hp(B * H, T);
    const int64_t P = hp.parts;
    // Each (head, part) writes its own dk / dv contribution: [P, B, H, T, D].
    torch::Tensor dk_parts = torch::empty({P, B, H, T, d.D}, q.options());
    torch::Tensor dv_parts = torch::empty({P, B, H, T, d.D}, q.options());
    const float* qp = q.data_ptr<float>();
    const float* kp = k.data_ptr<float>();
    const float* ktp = kt.data_ptr<float>();
    const float* vtp = vt.data_ptr<float>();
    const float* gp = dout.data_ptr<float>();
    const float* dlp = delta.data_ptr<float>();
    const float* lp = lse.data_ptr<float>();
    float* dqp = dq.data_ptr<float>();
    float* dkp = dk_parts.data_ptr<float>();
    float* dvp = dv_parts.data_ptr<float>();
    const torch::Tensor starts = ctx->saved_data["starts"].toTensor();
    const RowStarts starts_of{starts, H, T};
    const int64_t part_stride = B * H * T * d.D;
    ForEachHeadPart(hp, [&](int64_t bh, int64_t part, int64_t r0, int64_t r1) {
      thread_local std::vector<float> s, g, qa, ga, ob;
      s.resize(static_cast<size_t>(kRows * d.Tp));
      g.resize(s.size());
      qa.resize(static_cast<size_t>(kRows * d.D));
      ga.resize(qa.size());
      ob.resize(qa.size());
      const int64_t kv = (bh / H) * Hkv + (bh % H) / rep;
      const int64_t at = bh * T * d.D, pat = part * part_stride + at;
      BackwardHead(d, r0, r1, starts_of(bh), qp + at, kp + kv * T * d.D, ktp + kv * d.D * d.Tp,
                   vtp + kv * d.D * d.Tp, gp + at, dlp + bh * T, lp + bh * T, dqp + at,
                   dkp + pat, dvp + pat, s.data(), g.data(), qa.data(), ga.data(), ob.data());
    });
    // Sum over the row parts (in place into part 0: one pass each; a reduction
    // over two dimensions at once took longer than the kernels), then over the
    // query heads sharing each key/value head.
    torch::Tensor dk_heads = dk_parts[0], dv_heads = dv_parts[0];
    for (int64_t p = 1; p < P; ++p) {
      dk_heads.add_(dk_parts[p]);
      dv_heads.add_(dv_parts[p]);
    }
    torch::Tensor dk = rep == 1 ? dk_heads : dk_heads.view({B, Hkv, rep, T, d.D}).sum(2);
    torch::Tensor dv = rep == 1 ? dv_heads : dv_heads.view({B, Hkv, rep, T, d.D}).sum(2);
    if (D0 != d.D) {
      dq = dq.narrow(-1, 0, D0);
      dk = dk.narrow(-1, 0, D0);
      dv = dv.narrow(-1, 0, D0);
    }
    return {dq, dk, dv, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

int FusedAttentionThreadsUsed() { return threads_used.load(std::memory_order_relaxed); }

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
                                   const torch::Tensor& v, double scale, int64_t window,
                                   const torch::Tensor& starts) {
  TORCH_CHECK(FusedAttentionApplies(q, k, v),
              "FusedCausalAttention: needs float32 q [B,H,T,D] and k, v [B,Hkv,T,D] with H % Hkv "
              "== 0; got q ",
              q.sizes(), " ", q.scalar_type(), ", k ", k.sizes(), ", v ", v.sizes());
  torch::Tensor st = torch::empty({0}, torch::kLong);  // none (apply needs a defined tensor)
  if (starts.defined()) {
    const int64_t B = q.size(0), T = q.size(2);
    TORCH_CHECK(starts.scalar_type() == torch::kLong && starts.dim() == 2 &&
                    starts.size(0) == B && starts.size(1) == T,
                "FusedCausalAttention: expected int64 starts [", B, ", ", T, "], found ",
                starts.scalar_type(), " ", starts.sizes());
    st = starts.contiguous();
    const torch::Tensor pos = torch::arange(T, torch::kLong).unsqueeze(0);
    TORCH_CHECK(torch::logical_and(st >= 0, st <= pos).all().item<bool>(),
                "FusedCausalAttention: every start must be in [0, i] for its query i");
  }
  return FusedAttentionFn::apply(q, k, v, scale, window, st);
}

torch::Tensor VisibleRangeStarts(const torch::Tensor& masked, int64_t B, int64_t T) {
  if (!masked.defined() || masked.scalar_type() != torch::kBool || masked.dim() != 4 ||
      masked.size(0) != B || masked.size(1) != 1 || masked.size(2) != T || masked.size(3) != T) {
    return {};
  }
  const torch::Tensor visible = masked.squeeze(1).logical_not();  // [B, T, T]
  if (visible.triu(1).any().item<bool>()) return {};              // a later key is visible
  const torch::Tensor starts = visible.to(torch::kByte).argmax(-1);  // first visible key
  const torch::Tensor counts = visible.sum(-1);
  const torch::Tensor pos = torch::arange(T, torch::kLong).unsqueeze(0);
  // No later key visible, the first at `start` and i - start + 1 in all: [start, i].
  if (!counts.eq(pos - starts + 1).all().item<bool>()) return {};
  return starts;
}

}  // namespace fedlora::edge
