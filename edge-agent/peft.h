#pragma once
// Hugging Face PEFT LoRA adapter directories: adapter_config.json +
// adapter_model.safetensors.
//
// Supported: peft_type "LORA" with r, lora_alpha, lora_dropout, use_rslora,
// target_modules (list or single name; the adapted modules are taken from
// the tensors present). Rejected with a clear error: DoRA, rank_pattern /
// alpha_pattern, modules_to_save, bias other than "none", fan_in_fan_out.
// Tensor names may carry PEFT's adapter name (".lora_A.default.weight"); it
// is stripped. Torch-free.

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/tensor/tensor.h"
#include "edge-agent/trainer.h"

namespace fedlora::edge {

struct PeftAdapter {
  LoraConfig config;          // rank, alpha, dropout, use_rslora, target_modules
  common::TensorMap tensors;  // PEFT names, fp32
};

absl::StatusOr<PeftAdapter> LoadPeftAdapter(const std::string& dir);

// Writes `dir`/adapter_config.json and `dir`/adapter_model.safetensors
// (atomically, creating `dir` if needed) so that PEFT's
// PeftModel.from_pretrained loads them.
absl::Status WritePeftAdapter(const std::string& dir, const LoraConfig& config,
                              const common::TensorMap& tensors,
                              const std::string& base_model_name_or_path = "");

}  // namespace fedlora::edge
