#pragma once
// LoRA on the linear layers of a Model (libtorch; only engine code includes this).
//
//   y = x W^T + b + scale * (dropout(x) A^T) B^T,   scale = alpha / r
//   (alpha / sqrt(r) with rsLoRA), A: [r, in], B: [out, r].
//
// Initialization matches PEFT's default: A ~ Kaiming-uniform with a = sqrt(5)
// (i.e. U(-1/sqrt(in), 1/sqrt(in))), B = 0. A is drawn from a portable
// generator (std::mt19937_64 seeded with LoraConfig::init_seed, 24-bit
// uniforms), visiting modules in layer order then module order, so every agent
// that uses the same seed and model gets bit-identical A on any platform.
//
// Adapter tensors are exported/imported under PEFT names:
//   base_model.model.model.layers.N.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
//   base_model.model.model.layers.N.mlp.{gate,up,down}_proj.lora_{A,B}.weight
// Phi-3 has fused projections; its LoRA targets are the fused modules
// (self_attn.qkv_proj, mlp.gate_up_proj) exactly as PEFT does for Phi-3. In a
// target list for Phi-3, any of q_proj/k_proj/v_proj selects qkv_proj and
// gate_proj/up_proj selects gate_up_proj (one adapter on the fused weight).

#include <torch/torch.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/tensor/tensor.h"
#include "edge-agent/trainer.h"

namespace fedlora::edge {

class Model;

// A frozen linear layer with an optional LoRA adapter.
struct LoraLinear {
  torch::Tensor weight;  // [out, in]; frozen (may alias a read-only mmap: never write in place).
                         // fp32, bf16/fp16, or int8 with weight_scale.
  torch::Tensor weight_scale;  // [out] fp32 per-row scale when weight is int8, else undefined
  torch::Tensor bias;          // [out] or undefined
  torch::Tensor lora_a;        // [r, in] or undefined (no adapter)
  torch::Tensor lora_b;        // [out, r]
  double scale = 0.0;
  double dropout = 0.0;

  int64_t in_features() const { return weight.size(1); }
  int64_t out_features() const { return weight.size(0); }
  bool has_lora() const { return lora_a.defined(); }
  // The base weight as fp32 [out, in] (dequantized / converted when stored otherwise).
  torch::Tensor DenseWeight() const;
  // x: [..., in] fp32. With `dropout_gen` set and dropout > 0, LoRA dropout is
  // applied (training); otherwise none.
  torch::Tensor forward(const torch::Tensor& x, torch::Generator* dropout_gen = nullptr) const;
};

// The scale a config implies (alpha/r or alpha/sqrt(r)).
double LoraScale(const LoraConfig& config);

// Validates rank, alpha, dropout and the target module names against `model`.
absl::Status ValidateLoraConfig(const Model& model, const LoraConfig& config);

// Replaces the model's adapter with a fresh one (see above). Parameters require grad.
absl::Status InitLora(Model& model, const LoraConfig& config);
// Replaces the adapter with `tensors` (PEFT names). Missing, extra,
// mis-shaped or non-finite tensors are InvalidArgument naming the tensor.
// On error the model's previous adapter is kept.
absl::Status SetLora(Model& model, const LoraConfig& config, const common::TensorMap& tensors);
// Copies the adapter out under PEFT names (empty if none).
common::TensorMap ExportLora(const Model& model);
// Trainable tensors (A and B of every adapted module), in a fixed order.
std::vector<torch::Tensor> LoraParameters(const Model& model);
// Removes the adapter.
void ClearLora(Model& model);
// Folds the adapter into the base weights (W += scale * B A) and removes it.
// Base weights that alias the checkpoint mapping are copied first.
void MergeLora(Model& model);

// PEFT tensor names of one module ("...q_proj" prefix + ".lora_A.weight").
std::string LoraAName(const std::string& peft_prefix);
std::string LoraBName(const std::string& peft_prefix);

}  // namespace fedlora::edge
