#pragma once
// PEFT (Hugging Face `peft`) LoRA adapter directories, torch-free.
//
// A PEFT adapter directory holds
//   adapter_config.json       {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r", "lora_alpha",
//                              "target_modules": [...], "use_rslora", "base_model_name_or_path",
//                              "lora_dropout", "bias": "none", "fan_in_fan_out": false, ...}
//   adapter_model.safetensors tensors named
//     base_model.model.model.layers.<N>.<self_attn|mlp>.<module>.lora_A.weight  [r, in]
//     base_model.model.model.layers.<N>.<self_attn|mlp>.<module>.lora_B.weight  [out, r]
// which is exactly how fedlora TensorMaps key adapters, so tensors are written
// unchanged. The effective update of a module is  W += scale * B @ A  with
// scale = lora_alpha / r, or lora_alpha / sqrt(r) when use_rslora.
//
// This is the coordinator-side exporter/reader (no libtorch); the engine has
// its own loader in edge-agent/peft.h. Thread-safe (no shared state).

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tensor/tensor.h"

namespace fedlora::common {

struct PeftLoraConfig {
  int r = 0;
  double lora_alpha = 0;
  bool use_rslora = false;
  double lora_dropout = 0;
  std::vector<std::string> target_modules;  // e.g. {"q_proj", "v_proj"}
  std::string base_model_name_or_path;      // may be empty (written as null)
  std::string task_type = "CAUSAL_LM";

  // alpha / r, or alpha / sqrt(r) with rsLoRA.
  double Scale() const;
};

// One LoRA pair found in an adapter TensorMap.
struct LoraPair {
  std::string
      module_path;  // "model.layers.0.self_attn.q_proj" (HF base weight name without ".weight")
  int layer = -1;
  std::string module;             // "q_proj"
  const HostTensor* a = nullptr;  // [r, in]
  const HostTensor* b = nullptr;  // [out, r]
};

// Pairs up lora_A / lora_B tensors and checks them against `config`: every
// name has the PEFT form above, both halves are present, A is [r, in], B is
// [out, r], and the module is in target_modules. Errors name the tensor.
absl::StatusOr<std::vector<LoraPair>> CollectLoraPairs(const TensorMap& adapter,
                                                       const PeftLoraConfig& config);

// adapter_config.json text for `config` (deterministic).
std::string PeftConfigJson(const PeftLoraConfig& config);

// Creates `dir` if needed and writes adapter_config.json and
// adapter_model.safetensors (F32), each atomically. Validates first.
absl::Status WritePeftAdapter(const std::string& dir, const TensorMap& adapter,
                              const PeftLoraConfig& config);

struct PeftAdapterFiles {
  PeftLoraConfig config;
  TensorMap tensors;
};

// Reads and validates a PEFT LoRA adapter directory (peft_type must be LORA;
// DoRA, bias training, modules_to_save and per-module rank/alpha patterns are
// rejected as unsupported). Errors name the file and the field or tensor.
absl::StatusOr<PeftAdapterFiles> ReadPeftAdapter(const std::string& dir);

}  // namespace fedlora::common
