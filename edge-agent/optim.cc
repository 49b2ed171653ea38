#include "edge-agent/optim.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <memory>

#include "edge-agent/simd_math.h"

namespace fedlora::edge {
namespace {

bool Fp32Dense(const torch::Tensor& t) {
  return t.defined() && t.scalar_type() == torch::kFloat && t.device().is_cpu() &&
         t.is_contiguous();
}

FEDLORA_MULTI_ISA
double SumOfSquares(const float* __restrict g, int64_t n) {
  double total = 0;
  constexpr int64_t kChunk = 4096;  // float partial sums, added up in double
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = i0; i < i1; ++i) s += g[i] * g[i];
    total += s;
  }
  return total;
}

FEDLORA_MULTI_ISA
void Scale(float* __restrict g, int64_t n, float c) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) g[i] *= c;
}

struct AdamScalars {
  float decay;      // 1 - lr * weight_decay
  bool has_decay;
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float sqrt_bc2;   // sqrt(1 - beta2^step)
  float eps;
  float neg_step;   // -lr / (1 - beta1^step)
};

// libtorch's sequence: p *= decay; m = m b1 + (1 - b1) g; v = v b2 + (1 - b2) g g;
// p += -step_size * m / (sqrt(v) / sqrt_bc2 + eps).
FEDLORA_MULTI_ISA
void AdamWUpdate(float* __restrict p, const float* __restrict g, float* __restrict m,
                 float* __restrict v, int64_t n, const AdamScalars s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float pi = s.has_decay ? p[i] * s.decay : p[i];
    const float mi = m[i] * s.beta1 + s.one_minus_beta1 * g[i];
    const float vi = v[i] * s.beta2 + s.one_minus_beta2 * g[i] * g[i];
    m[i] = mi;
    v[i] = vi;
    p[i] = pi + s.neg_step * (mi / (std::sqrt(vi) / s.sqrt_bc2 + s.eps));
  }
}

}  // namespace

std::string AdamStateKey(const torch::Tensor& param) {
  return c10::guts::to_string(param.unsafeGetTensorImpl());
}

double ClipGradNorm(const std::vector<torch::Tensor>& params, double max_norm) {
  std::vector<torch::Tensor> grads;
  bool dense = true;
  for (const torch::Tensor& p : params) {
    if (!p.grad().defined()) continue;
    grads.push_back(p.grad());
    dense = dense && Fp32Dense(grads.back());
  }
  if (!dense) return torch::nn::utils::clip_grad_norm_(params, max_norm);
  std::vector<double> squares(grads.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(grads.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      squares[i] = SumOfSquares(grads[i].data_ptr<float>(), grads[i].numel());
    }
  });
  double total = 0;
  for (double s : squares) total += s;
  const double norm = std::sqrt(total);
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0) {
    at::parallel_for(0, static_cast<int64_t>(grads.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        Scale(grads[i].data_ptr<float>(), grads[i].numel(), static_cast<float>(coef));
      }
    });
  }
  return norm;
}

void AdamWStep(torch::optim::AdamW& opt) {
  torch::NoGradGuard no_grad;
  struct Item {
    torch::Tensor p, g;
    torch::optim::AdamWParamState* state;
    AdamScalars s;
  };
  std::vector<Item> items;
  auto& states = opt.state();
  // Check everything before changing anything: a fallback must see the
  // optimizer as it was.
  for (auto& group : opt.param_groups()) {
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
    if (o.amsgrad()) return (void)opt.step();
    for (const torch::Tensor& p : group.params()) {
      if (!p.grad().defined()) continue;
      if (!Fp32Dense(p) || !Fp32Dense(p.grad())) return (void)opt.step();
      auto it = states.find(AdamStateKey(p));
      if (it != states.end()) {
        auto& st = static_cast<torch::optim::AdamWParamState&>(*it->second);
        if (!Fp32Dense(st.exp_avg()) || !Fp32Dense(st.exp_avg_sq()) ||
            st.exp_avg().sizes() != p.sizes() || st.exp_avg_sq().sizes() != p.sizes()) {
          return (void)opt.step();
        }
      }
    }
  }
  for (auto& group : opt.param_groups()) {
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
    const double beta1 = std::get<0>(o.betas()), beta2 = std::get<1>(o.betas());
    for (const torch::Tensor& p : group.params()) {
      if (!p.grad().defined()) continue;
      const std::string key = AdamStateKey(p);
      auto it = states.find(key);
      if (it == states.end()) {
        auto st = std::make_unique<torch::optim::AdamWParamState>();
        st->step(0);
        st->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Contiguous));
        st->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Contiguous));
        it = states.emplace(key, std::move(st)).first;
      }
      auto& st = static_cast<torch::optim::AdamWParamState&>(*it->second);
      st.step(st.step() + 1);
      const double bc1 = 1 - std::pow(beta1, static_cast<double>(st.step()));
      const double bc2 = 1 - std::pow(beta2, static_cast<double>(st.step()));
      AdamScalars s;
      s.has_decay = o.weight_decay() != 0;
      s.decay = static_cast<float>(1 - o.lr() * o.weight_decay());
      s.beta1 = static_cast<float>(beta1);
      s.one_minus_beta1 = static_cast<float>(1 - beta1);
      s.beta2 = static_cast<float>(beta2);
      s.one_minus_beta2 = static_cast<float>(1 - beta2);
      s.sqrt_bc2 = static_cast<float>(std::sqrt(bc2));
      s.eps = static_cast<float>(o.eps());
      s.neg_step = static_cast<float>(-o.lr() / bc1);
      items.push_back({p, p.grad(), &st, s});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      Item& it = items[static_cast<size_t>(i)];
      AdamWUpdate(it.p.data_ptr<float>(), it.g.data_ptr<float>(),
                  it.state->exp_avg().data_ptr<float>(), it.state->exp_avg_sq().data_ptr<float>(),
                  it.p.numel(), it.s);
    }
  });
}

}  // namespace fedlora::edge
