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
// The one PEFT reader/writer of the project: the coordinator's exports, the
// agent's `export` command and the engine's adapter loading (edge-agent/peft.h
// forwards here) all use it. No libtorch. Thread-safe (no shared state).

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
// adapter_model.safetensors (F32, metadata {"format": "pt"}), each atomically.
// Validates first (CollectLoraPairs; at least one pair).
absl::Status WritePeftAdapter(const std::string& dir, const TensorMap& adapter,
                              const PeftLoraConfig& config);

struct PeftAdapterFiles {
  PeftLoraConfig config;
  TensorMap tensors;
};

struct PeftReadOptions {
  // Check every tensor's rank dimension against config.r. The engine turns this
  // off: it checks each pair against the model's own shapes and names both.
  bool check_ranks = true;
};

// Reads and validates a PEFT LoRA adapter directory. peft_type must be "LORA"
// (or absent); r an integer in 1..65536; lora_alpha a positive number; DoRA,
// bias training, fan_in_fan_out, modules_to_save and per-module rank/alpha
// patterns are rejected as unsupported. Tensor names may carry PEFT's adapter
// name (".lora_A.default.weight"); it is stripped. config.target_modules is the
// config's list when it gives one, else (a regex string such as "all-linear",
// or nothing) the sorted modules that have tensors. Every tensor must have the
// PEFT name form and a partner (CollectLoraPairs). Errors name the file and the
// field or tensor, with the value found.
absl::StatusOr<PeftAdapterFiles> ReadPeftAdapter(const std::string& dir,
                                                 const PeftReadOptions& options = {});

}  // namespace fedlora::common
