#include "edge-agent/fused_ops.h"

#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "edge-agent/simd_math.h"
#include "torch/csrc/autograd/custom_function.h"

namespace fedlora::edge {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

torch::Tensor As(const torch::Tensor& t, const torch::Tensor& like) {
  return t.scalar_type() == like.scalar_type() ? t : t.to(like.scalar_type());
}

// Sums a gradient of the broadcast result down to `like`'s (trailing) shape.
torch::Tensor SumTo(const torch::Tensor& g, const torch::Tensor& like) {
  return g.sum_to_size(like.sizes());
}

// rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]).
torch::Tensor RotateHalf(const torch::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return torch::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

// The transpose of rotate_half: cat(y[..., D/2:], -y[..., :D/2]).
torch::Tensor RotateHalfTransposed(const torch::Tensor& y) {
  const int64_t half = y.size(-1) / 2;
  return torch::cat({y.slice(-1, half), -y.slice(-1, 0, half)}, -1);
}

// ---- Single-pass fp32 kernels ------------------------------------------------
// Each runs over rows (or flat chunks) split among libtorch's threads, reading
// every input once and writing every output once; the composites below make 3
// to 9 passes over the same data, each a separate parallel region.

bool Fp32Cpu(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat && t.device().is_cpu();
}

FEDLORA_MULTI_ISA
void RmsForwardRows(const float* __restrict x, const float* __restrict w, float* __restrict y,
                    float* __restrict rstd, int64_t r0, int64_t r1, int64_t n, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < n; ++j) ss += xr[j] * xr[j];
    const float rs = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    rstd[r] = rs;
    for (int64_t j = 0; j < n; ++j) yr[j] = w[j] * (xr[j] * rs);
  }
}

// dx = r (g w) - x r^3 mean((g w) x), per row.
FEDLORA_MULTI_ISA
void RmsBackwardRows(const float* __restrict g, const float* __restrict x,
                     const float* __restrict w, const float* __restrict rstd,
                     float* __restrict dx, int64_t r0, int64_t r1, int64_t n) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* gr = g + r * n;
    const float* xr = x + r * n;
    float* dr = dx + r * n;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < n; ++j) dot += gr[j] * w[j] * xr[j];
    const float rs = rstd[r], c = rs * rs * (dot / static_cast<float>(n));
    for (int64_t j = 0; j < n; ++j) dr[j] = (gr[j] * w[j] - xr[j] * c) * rs;
  }
}

FEDLORA_MULTI_ISA
void SwiGluForwardRange(const float* __restrict a, const float* __restrict u, float* __restrict y,
                        int64_t i0, int64_t i1) {
  const ExpBounds b = OpaqueExpBounds();
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) y[i] = a[i] * Sigmoid(a[i], b) * u[i];
}

// silu(a) = a s(a);  silu'(a) = s (1 + a (1 - s)). Either output may be null.
FEDLORA_MULTI_ISA
void SwiGluBackwardRange(const float* __restrict g, const float* __restrict a,
                         const float* __restrict u, float* __restrict da, float* __restrict du,
                         int64_t i0, int64_t i1) {
  const ExpBounds b = OpaqueExpBounds();
  if (da != nullptr && du != nullptr) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      const float s = Sigmoid(a[i], b);
      du[i] = g[i] * (a[i] * s);
      da[i] = g[i] * u[i] * (s * (1.0f + a[i] * (1.0f - s)));
    }
  } else if (da != nullptr) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      const float s = Sigmoid(a[i], b);
      da[i] = g[i] * u[i] * (s * (1.0f + a[i] * (1.0f - s)));
    }
  } else {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) du[i] = g[i] * (a[i] * Sigmoid(a[i], b));
  }
}

// A 4-D tensor's rows (all but the last dimension, whose stride is 1) as
// pointers: row r of [S0, S1, S2, D] is element (r / (S1 S2), r / S2 % S1, r % S2).
struct Rows4 {
  float* base;
  int64_t st[3];
  int64_t s1, s2;
  Rows4(const torch::Tensor& t, const torch::Tensor& shape_of)
      : base(t.data_ptr<float>()),
        st{t.stride(0), t.stride(1), t.stride(2)},
        s1(shape_of.size(1)),
        s2(shape_of.size(2)) {}
  float* operator()(int64_t r) const {
    return base + (r / (s1 * s2)) * st[0] + (r / s2 % s1) * st[1] + (r % s2) * st[2];
  }
};

// Forward: out = x cos + rotate_half(x) sin. Backward (x the upstream
// gradient): out = x cos + rotate_half^T(x sin).
FEDLORA_MULTI_ISA
void RopeRows(const Rows4 x, const Rows4 c, const Rows4 s, const Rows4 out, int64_t d,
              bool backward, int64_t r0, int64_t r1) {
  const int64_t h = d / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict xr = x(r);
    const float* __restrict cr = c(r);
    const float* __restrict sr = s(r);
    float* __restrict o = out(r);
    if (!backward) {
      for (int64_t j = 0; j < h; ++j) o[j] = xr[j] * cr[j] - xr[j + h] * sr[j];
      for (int64_t j = h; j < d; ++j) o[j] = xr[j] * cr[j] + xr[j - h] * sr[j];
    } else {
      for (int64_t j = 0; j < h; ++j) o[j] = xr[j] * cr[j] + xr[j + h] * sr[j + h];
      for (int64_t j = h; j < d; ++j) o[j] = xr[j] * cr[j] - xr[j - h] * sr[j - h];
    }
  }
}

// The fast RoPE takes fp32 [S0, S1, S2, D] (D even, unit last stride) and
// fp32 cos, sin of one shape that broadcasts to it with a unit last stride.
bool RopeFast(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  return Fp32Cpu(x) && Fp32Cpu(cos) && Fp32Cpu(sin) && x.dim() == 4 && x.size(-1) % 2 == 0 &&
         x.stride(-1) == 1 && cos.sizes() == sin.sizes() && cos.dim() >= 1 &&
         cos.size(-1) == x.size(-1) && cos.stride(-1) == 1 && sin.stride(-1) == 1 &&
         at::is_expandable_to(cos.sizes(), x.sizes());
}

// out (allocated by the caller) = RopeRows over x's rows.
void RunRope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
             const torch::Tensor& out, bool backward) {
  const torch::Tensor c = cos.expand(x.sizes()), s = sin.expand(x.sizes());
  const Rows4 xr(x, x), cr(c, x), sr(s, x), orow(out, x);
  const int64_t d = x.size(3), rows = x.numel() / std::max<int64_t>(1, d);
  at::parallel_for(0, rows, RowsPerChunk(d), [&](int64_t r0, int64_t r1) {
    RopeRows(xr, cr, sr, orow, d, backward, r0, r1);
  });
}

class RmsNormFn : public torch::autograd::Function<RmsNormFn> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& w, double eps) {
    const int64_t n = x.dim() >= 1 ? x.size(-1) : 0;
    if (Fp32Cpu(x) && Fp32Cpu(w) && w.dim() == 1 && w.numel() == n && x.numel() > 0) {
      const torch::Tensor xc = x.contiguous(), wc = w.contiguous();
      std::vector<int64_t> rstd_shape = xc.sizes().vec();
      rstd_shape.back() = 1;
      torch::Tensor y = torch::empty_like(xc);
      torch::Tensor rstd = torch::empty(rstd_shape, xc.options());
      const float* xp = xc.data_ptr<float>();
      const float* wp = wc.data_ptr<float>();
      float* yp = y.data_ptr<float>();
      float* rp = rstd.data_ptr<float>();
      at::parallel_for(0, xc.numel() / n, RowsPerChunk(n), [&](int64_t r0, int64_t r1) {
        RmsForwardRows(xp, wp, yp, rp, r0, r1, n, static_cast<float>(eps));
      });
      ctx->save_for_backward({xc, wc, rstd});
      ctx->saved_data["fast"] = true;
      return y;
    }
    torch::Tensor rstd = torch::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + eps);
    ctx->save_for_backward({x, w, rstd});
    return w * (x * rstd);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor& x = saved[0];
    const torch::Tensor& w = saved[1];
    const torch::Tensor& rstd = saved[2];
    const torch::Tensor& g = grads[0];
    // y = w x r with r = (mean(x^2) + eps)^(-1/2):
    //   dx = r (g w) - x r^3 mean((g w) x).
    torch::Tensor dx;
    if (ctx->needs_input_grad(0) && ctx->saved_data.count("fast") && Fp32Cpu(g)) {
      const torch::Tensor gc = g.contiguous();
      dx = torch::empty_like(x);
      const int64_t n = x.size(-1);
      const float* gp = gc.data_ptr<float>();
      const float* xp = x.data_ptr<float>();
      const float* wp = w.data_ptr<float>();
      const float* rp = rstd.data_ptr<float>();
      float* dp = dx.data_ptr<float>();
      at::parallel_for(0, x.numel() / n, RowsPerChunk(n), [&](int64_t r0, int64_t r1) {
        RmsBackwardRows(gp, xp, wp, rp, dp, r0, r1, n);
      });
    } else if (ctx->needs_input_grad(0)) {
      torch::Tensor gw = g * w;
      torch::Tensor dot = (gw * x).mean(-1, /*keepdim=*/true);
      dx = As(gw.sub_(x * (rstd * rstd * dot)).mul_(rstd), x);
    }
    torch::Tensor dweight;
    if (ctx->needs_input_grad(1)) dweight = As(SumTo(g * (x * rstd), w), w);
    return {dx, dweight, torch::Tensor()};
  }
};

class SwiGluFn : public torch::autograd::Function<SwiGluFn> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& gate,
                               const torch::Tensor& up) {
    if (Fp32Cpu(gate) && Fp32Cpu(up) && gate.sizes() == up.sizes()) {
      const torch::Tensor a = gate.contiguous(), u = up.contiguous();
      torch::Tensor y = torch::empty_like(a);
      const float* ap = a.data_ptr<float>();
      const float* up_p = u.data_ptr<float>();
      float* yp = y.data_ptr<float>();
      at::parallel_for(0, a.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
        SwiGluForwardRange(ap, up_p, yp, i0, i1);
      });
      ctx->save_for_backward({a, u});
      ctx->saved_data["fast"] = true;
      return y;
    }
    ctx->save_for_backward({gate, up});
    return torch::silu(gate) * up;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor& gate = saved[0];
    const torch::Tensor& up = saved[1];
    const torch::Tensor& g = grads[0];
    if (ctx->saved_data.count("fast") && Fp32Cpu(g)) {
      const torch::Tensor gc = g.contiguous();
      torch::Tensor dgate, dup;
      if (ctx->needs_input_grad(0)) dgate = torch::empty_like(gate);
      if (ctx->needs_input_grad(1)) dup = torch::empty_like(up);
      if (!dgate.defined() && !dup.defined()) return {dgate, dup};
      const float* gp = gc.data_ptr<float>();
      const float* ap = gate.data_ptr<float>();
      const float* up_p = up.data_ptr<float>();
      float* dap = dgate.defined() ? dgate.data_ptr<float>() : nullptr;
      float* dup_p = dup.defined() ? dup.data_ptr<float>() : nullptr;
      at::parallel_for(0, gate.numel(), kElementGrain, [&](int64_t i0, int64_t i1) {
        SwiGluBackwardRange(gp, ap, up_p, dap, dup_p, i0, i1);
      });
      return {dgate, dup};
    }
    // silu(a) = a s(a);  silu'(a) = s (1 + a (1 - s)).
    torch::Tensor s = torch::sigmoid(gate);
    torch::Tensor dup;
    if (ctx->needs_input_grad(1)) dup = As(g * (gate * s), up);
    torch::Tensor dgate;
    if (ctx->needs_input_grad(0)) {
      torch::Tensor dsilu = (1 - s).mul_(gate).add_(1).mul_(s);
      dgate = As(dsilu.mul_(g).mul_(up), gate);
    }
    return {dgate, dup};
  }
};

class RopeFn : public torch::autograd::Function<RopeFn> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& cos, const torch::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    if (RopeFast(x, cos, sin)) {
      torch::Tensor out = torch::empty(x.sizes(), x.options());
      RunRope(x, cos, sin, out, /*backward=*/false);
      // The gradient goes back in x's layout (a transposed view of the
      // projection), so the views between here and the projection stay views.
      ctx->saved_data["sizes"] = x.sizes().vec();
      ctx->saved_data["strides"] =
          x.is_non_overlapping_and_dense() ? x.strides().vec() : out.strides().vec();
      return out;
    }
    return x * cos + RotateHalf(x) * sin;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor& g = grads[0];
    if (ctx->saved_data.count("sizes") && Fp32Cpu(g)) {
      const torch::Tensor gc = g.stride(-1) == 1 ? g : g.contiguous();
      if (RopeFast(gc, saved[0], saved[1])) {
        torch::Tensor dx = at::empty_strided(ctx->saved_data["sizes"].toIntVector(),
                                             ctx->saved_data["strides"].toIntVector(), g.options());
        RunRope(gc, saved[0], saved[1], dx, /*backward=*/true);
        return {dx, torch::Tensor(), torch::Tensor()};
      }
    }
    torch::Tensor dx = g * saved[0] + RotateHalfTransposed(g * saved[1]);
    const auto dtype = static_cast<torch::ScalarType>(ctx->saved_data["dtype"].toInt());
    return {dx.scalar_type() == dtype ? dx : dx.to(dtype), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor RmsNorm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  return RmsNormFn::apply(x, w, eps);
}

torch::Tensor SwiGlu(const torch::Tensor& gate, const torch::Tensor& up) {
  return SwiGluFn::apply(gate, up);
}

torch::Tensor Rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  return RopeFn::apply(x, cos, sin);
}

}  // namespace fedlora::edge
