#pragma once
// The engine's view of Hugging Face PEFT LoRA adapter directories
// (adapter_config.json + adapter_model.safetensors), in edge::LoraConfig terms.
//
// Thin forwarding layer over common/export/peft_export.h, the project's one
// PEFT reader/writer (same validation and error messages). Differences, both
// for the engine's sake:
//  - LoadPeftAdapter does not check tensor ranks against "r": SetLora checks
//    each pair against the model and names both shapes;
//  - config.target_modules is the sorted list of modules that have tensors.
// Torch-free. Thread-safe (no shared state).

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/tensor/tensor.h"
#include "edge-agent/trainer.h"

namespace fedlora::edge {

struct PeftAdapter {
  LoraConfig config;          // rank, alpha, dropout, use_rslora, target_modules
  common::TensorMap tensors;  // PEFT names (adapter name stripped), fp32
};

absl::StatusOr<PeftAdapter> LoadPeftAdapter(const std::string& dir);

// Writes `dir`/adapter_config.json and `dir`/adapter_model.safetensors
// (atomically, creating `dir` if needed) so that PEFT's
// PeftModel.from_pretrained loads them (common::WritePeftAdapter).
absl::Status WritePeftAdapter(const std::string& dir, const LoraConfig& config,
                              const common::TensorMap& tensors,
                              const std::string& base_model_name_or_path = "");

}  // namespace fedlora::edge
