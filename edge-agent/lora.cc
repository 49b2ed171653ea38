#include "edge-agent/lora.h"

#include <cmath>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status/status.h"
#include "edge-agent/model.h"

namespace fedlora::edge {
namespace {

std::string ShapeStr(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

// Which modules `config` adapts. For Phi-3, unfused names select the fused module.
absl::StatusOr<std::set<std::string>> ResolveTargets(const Model& model, const LoraConfig& config) {
  const std::vector<std::string> names = model.ModuleNames();
  const bool phi3 = model.config().architecture == Architecture::kPhi3;
  std::set<std::string> out;
  for (const std::string& t : config.target_modules) {
    std::string name = t;
    if (phi3 && (t == "q_proj" || t == "k_proj" || t == "v_proj")) name = "qkv_proj";
    if (phi3 && (t == "gate_proj" || t == "up_proj")) name = "gate_up_proj";
    if (std::find(names.begin(), names.end(), name) == names.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "LoRA target module '", t, "' does not exist in ", model.config().architecture_name,
          " (expected one of: ", absl::StrJoin(names, ", "), ")"));
    }
    out.insert(name);
  }
  if (out.empty()) {
    return absl::InvalidArgumentError(
        "LoRA target_modules: expected at least one module, found none");
  }
  return out;
}

// Portable U(-bound, bound) with 24-bit resolution.
float Uniform(std::mt19937_64& rng, float bound) {
  const float u = static_cast<float>(rng() >> 40) * (1.0f / 16777216.0f);  // [0, 1)
  return (2.0f * u - 1.0f) * bound;
}

}  // namespace

double LoraScale(const LoraConfig& config) {
  return config.use_rslora ? config.alpha / std::sqrt(static_cast<double>(config.rank))
                           : config.alpha / static_cast<double>(config.rank);
}

absl::Status ValidateLoraConfig(const Model& model, const LoraConfig& config) {
  if (config.rank <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("LoRA rank: expected a positive integer, found ", config.rank));
  }
  if (!(config.alpha > 0) || !std::isfinite(config.alpha)) {
    return absl::InvalidArgumentError(
        absl::StrCat("LoRA alpha: expected a positive number, found ", config.alpha));
  }
  if (!(config.dropout >= 0 && config.dropout < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("LoRA dropout: expected a value in [0, 1), found ", config.dropout));
  }
  return ResolveTargets(model, config).status();
}

std::string LoraAName(const std::string& peft_prefix) { return peft_prefix + ".lora_A.weight"; }
std::string LoraBName(const std::string& peft_prefix) { return peft_prefix + ".lora_B.weight"; }

absl::Status InitLora(Model& model, const LoraConfig& config) {
  RETURN_IF_ERROR(ValidateLoraConfig(model, config));
  ASSIGN_OR_RETURN(std::set<std::string> targets, ResolveTargets(model, config));
  std::mt19937_64 rng(config.init_seed);
  const double scale = LoraScale(config);
  ClearLora(model);
  for (const Model::Adaptable& a : model.AdaptableModules()) {
    if (!targets.count(a.module)) continue;
    LoraLinear& l = *a.linear;
    const int64_t in = l.in_features(), out = l.out_features();
    std::vector<float> values(static_cast<size_t>(config.rank * in));
    const float bound = 1.0f / std::sqrt(static_cast<float>(in));
    for (float& v : values) v = Uniform(rng, bound);
    l.lora_a = torch::tensor(values).reshape({config.rank, in}).set_requires_grad(true);
    l.lora_b = torch::zeros({out, config.rank}).set_requires_grad(true);
    l.scale = scale;
    l.dropout = config.dropout;
  }
  return absl::OkStatus();
}

absl::Status SetLora(Model& model, const LoraConfig& config, const common::TensorMap& tensors) {
  RETURN_IF_ERROR(ValidateLoraConfig(model, config));
  ASSIGN_OR_RETURN(std::set<std::string> targets, ResolveTargets(model, config));
  struct Pending {
    LoraLinear* linear;
    const common::HostTensor* a;
    const common::HostTensor* b;
  };
  std::vector<Pending> pending;
  std::set<std::string> expected;
  auto check = [&](const std::string& name, std::vector<int64_t> shape,
                   const common::HostTensor** out) -> absl::Status {
    expected.insert(name);
    auto it = tensors.find(name);
    if (it == tensors.end()) {
      return absl::InvalidArgumentError(absl::StrCat("adapter is missing tensor '", name,
                                                     "' (expected shape ", ShapeStr(shape), ")"));
    }
    const common::HostTensor& t = it->second;
    if (t.shape != shape || static_cast<int64_t>(t.data.size()) != t.numel()) {
      return absl::InvalidArgumentError(absl::StrCat("adapter tensor '", name, "': expected shape ",
                                                     ShapeStr(shape), ", found ",
                                                     ShapeStr(t.shape)));
    }
    for (float v : t.data) {
      if (!std::isfinite(v)) {
        return absl::InvalidArgumentError(
            absl::StrCat("adapter tensor '", name, "': expected finite values, found ", v));
      }
    }
    *out = &t;
    return absl::OkStatus();
  };
  for (const Model::Adaptable& a : model.AdaptableModules()) {
    if (!targets.count(a.module)) continue;
    Pending p{a.linear, nullptr, nullptr};
    RETURN_IF_ERROR(check(LoraAName(a.peft_prefix), {config.rank, a.linear->in_features()}, &p.a));
    RETURN_IF_ERROR(check(LoraBName(a.peft_prefix), {a.linear->out_features(), config.rank}, &p.b));
    pending.push_back(p);
  }
  for (const auto& [name, t] : tensors) {
    if (!expected.count(name)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adapter has unexpected tensor '", name, "' (not a LoRA tensor of the targeted modules ",
          absl::StrJoin(targets, ","), " at rank ", config.rank, ")"));
    }
  }
  ClearLora(model);
  const double scale = LoraScale(config);
  for (const Pending& p : pending) {
    p.linear->lora_a = torch::tensor(p.a->data).reshape(p.a->shape).set_requires_grad(true);
    p.linear->lora_b = torch::tensor(p.b->data).reshape(p.b->shape).set_requires_grad(true);
    p.linear->scale = scale;
    p.linear->dropout = config.dropout;
  }
  return absl::OkStatus();
}

common::TensorMap ExportLora(const Model& model) {
  common::TensorMap out;
  auto copy = [](const torch::Tensor& t) {
    torch::Tensor c = t.detach().to(torch::kFloat).contiguous();
    common::HostTensor h;
    h.shape = c.sizes().vec();
    h.data.assign(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
    return h;
  };
  for (const Model::Adaptable& a : const_cast<Model&>(model).AdaptableModules()) {
    if (!a.linear->has_lora()) continue;
    out[LoraAName(a.peft_prefix)] = copy(a.linear->lora_a);
    out[LoraBName(a.peft_prefix)] = copy(a.linear->lora_b);
  }
  return out;
}

std::vector<torch::Tensor> LoraParameters(const Model& model) {
  std::vector<torch::Tensor> out;
  for (const Model::Adaptable& a : const_cast<Model&>(model).AdaptableModules()) {
    if (!a.linear->has_lora()) continue;
    out.push_back(a.linear->lora_a);
    out.push_back(a.linear->lora_b);
  }
  return out;
}

torch::Tensor ProximalTerm(const std::vector<torch::Tensor>& params,
                           const std::vector<torch::Tensor>& anchors, double mu) {
  TORCH_CHECK(params.size() == anchors.size(), "ProximalTerm: ", params.size(), " params but ",
              anchors.size(), " anchors");
  torch::Tensor sum = torch::zeros({}, torch::kFloat);
  for (size_t i = 0; i < params.size(); ++i) {
    sum = sum + (params[i] - anchors[i]).pow(2).sum();
  }
  return sum * (mu / 2.0);
}

void ClearLora(Model& model) {
  for (const Model::Adaptable& a : model.AdaptableModules()) {
    a.linear->lora_a = torch::Tensor();
    a.linear->lora_b = torch::Tensor();
    a.linear->scale = 0;
    a.linear->dropout = 0;
  }
}

void MergeLora(Model& model) {
  torch::NoGradGuard no_grad;
  for (const Model::Adaptable& a : model.AdaptableModules()) {
    LoraLinear& l = *a.linear;
    if (!l.has_lora()) continue;
    const torch::Tensor delta = torch::matmul(l.lora_b, l.lora_a) * l.scale;
    // A fresh tensor: the old weight may be a view of the read-only mapping.
    // An int8 / int4 weight becomes fp32 (re-quantizing would lose the adapter's
    // small contribution); bf16/fp16 keep their dtype.
    torch::Tensor merged = l.DenseWeight() + delta;
    if (l.weight.scalar_type() == torch::kChar || l.is_int4()) {
      l.weight_scale = torch::Tensor();
      l.int4_in = 0;
    } else {
      merged = merged.to(l.weight.scalar_type());
    }
    l.weight = merged;
    l.lora_a = torch::Tensor();
    l.lora_b = torch::Tensor();
    l.scale = 0;
  }
}

}  // namespace fedlora::edge
