#include "edge-agent/fused_ops.h"

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

class RmsNormFn : public torch::autograd::Function<RmsNormFn> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& w, double eps) {
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
    if (ctx->needs_input_grad(0)) {
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
    ctx->save_for_backward({gate, up});
    return torch::silu(gate) * up;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor& gate = saved[0];
    const torch::Tensor& up = saved[1];
    const torch::Tensor& g = grads[0];
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
    return x * cos + RotateHalf(x) * sin;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor& g = grads[0];
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
