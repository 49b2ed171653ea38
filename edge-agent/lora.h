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
  torch::Tensor weight;  // frozen (may alias a read-only mmap: never write in place):
                         // fp32 / bf16 / fp16 [out, in]; int8 [out, in] with weight_scale;
                         // int4: uint8 [out, ceil(in / kInt4Group) * kInt4Group / 2], two
                         // 4-bit codes per byte (low nibble = even column), code c means
                         // (c - 8) * scale of its group; the padding columns are zero.
  torch::Tensor weight_scale;  // int8: [out] fp32 per-row scale; int4: [out, groups] fp32
  torch::Tensor bias;          // [out] or undefined
  torch::Tensor lora_a;        // [r, in] or undefined (no adapter)
  torch::Tensor lora_b;        // [out, r]
  double scale = 0.0;
  double dropout = 0.0;
  int64_t int4_in = 0;  // in-features of an int4 weight (its packed width is padded)

  static constexpr int64_t kInt4Group = 64;  // weights per int4 scale (along `in`)

  bool is_int4() const { return weight.scalar_type() == torch::kByte; }
  int64_t in_features() const { return is_int4() ? int4_in : weight.size(1); }
  int64_t out_features() const { return weight.size(0); }
  bool has_lora() const { return lora_a.defined(); }
  // The base weight as fp32 [out, in] (dequantized / converted when stored otherwise).
  torch::Tensor DenseWeight() const;
  // x: [..., in] fp32. With `dropout_gen` set and dropout > 0, LoRA dropout is
  // applied (training); otherwise none. A base weight stored in another dtype
  // is converted for the product and again in backward: the fp32 copy is never
  // kept for autograd (QLoRA-style, per layer, on the fly).
  torch::Tensor forward(const torch::Tensor& x, torch::Generator* dropout_gen = nullptr) const;
};

// The forwards of projections that read the same x (q, k, v; gate, up): the
// results of each one's forward(x, dropout_gen), in order. In training on the
// oneDNN path, when all have adapters of one rank and scale and each would run
// as one node (no dropout in effect, no checkpointed layer, fp32 or direct bf16
// products), all run as one autograd node that stacks the adapters' A: one GEMM
// instead of one per projection for x A^T, its weight gradient and the
// adapters' input gradient, and the frozen input gradients added up by the
// GEMMs (tests/edge/model_test.cc, LoraBranchTest).
std::vector<torch::Tensor> ForwardSharedInput(const std::vector<const LoraLinear*>& projections,
                                              const torch::Tensor& x,
                                              torch::Generator* dropout_gen = nullptr);

// Group-wise symmetric 4-bit quantization of a fp32 [out, in] weight (see
// LoraLinear::weight): scale = max|w| of the group / 7, code = round(w / scale) + 8,
// so every weight is within scale / 2 of its dequantized value.
void QuantizeInt4(const torch::Tensor& w, LoraLinear* l);

// y = x W^T with W stored in `weight`'s dtype (see LoraLinear): dequantized in
// forward and again in backward instead of being saved, a block of rows at a
// time (so a vocab-sized lm_head is never converted to fp32 whole). No
// gradient for W.
torch::Tensor FrozenMatmul(const torch::Tensor& x, const torch::Tensor& weight,
                           const torch::Tensor& weight_scale, int64_t int4_in);
torch::Tensor DequantizeWeight(const torch::Tensor& weight, const torch::Tensor& weight_scale,
                               int64_t int4_in);

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
// FedProx's proximal term mu/2 * sum_i ||params[i] - anchors[i]||^2 (a scalar
// that autograd differentiates to mu * (params[i] - anchors[i])). Shapes must match.
torch::Tensor ProximalTerm(const std::vector<torch::Tensor>& params,
                           const std::vector<torch::Tensor>& anchors, double mu);
// Removes the adapter.
void ClearLora(Model& model);
// Folds the adapter into the base weights (W += scale * B A) and removes it.
// Base weights that alias the checkpoint mapping are copied first.
void MergeLora(Model& model);

// PEFT tensor names of one module ("...q_proj" prefix + ".lora_A.weight").
std::string LoraAName(const std::string& peft_prefix);
std::string LoraBName(const std::string& peft_prefix);

}  // namespace fedlora::edge
