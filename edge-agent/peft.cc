#include "edge-agent/peft.h"

#include <set>

#include "common/export/peft_export.h"
#include "common/status/status.h"

namespace fedlora::edge {

absl::StatusOr<PeftAdapter> LoadPeftAdapter(const std::string& dir) {
  common::PeftReadOptions options;
  options.check_ranks = false;
  ASSIGN_OR_RETURN(common::PeftAdapterFiles files, common::ReadPeftAdapter(dir, options));
  PeftAdapter out;
  out.config.rank = files.config.r;
  out.config.alpha = static_cast<float>(files.config.lora_alpha);
  out.config.dropout = static_cast<float>(files.config.lora_dropout);
  out.config.use_rslora = files.config.use_rslora;
  // Names are validated ("...<module>.lora_A|lora_B.weight"): the module is
  // the component before ".lora_X.weight".
  std::set<std::string> modules;
  for (const auto& [name, t] : files.tensors) {
    const std::string path = name.substr(0, name.size() - std::string(".lora_A.weight").size());
    modules.insert(path.substr(path.rfind('.') + 1));
  }
  out.tensors = std::move(files.tensors);
  out.config.target_modules.assign(modules.begin(), modules.end());
  return out;
}

absl::Status WritePeftAdapter(const std::string& dir, const LoraConfig& config,
                              const common::TensorMap& tensors,
                              const std::string& base_model_name_or_path) {
  common::PeftLoraConfig peft;
  peft.r = config.rank;
  peft.lora_alpha = config.alpha;
  peft.lora_dropout = config.dropout;
  peft.use_rslora = config.use_rslora;
  peft.target_modules = config.target_modules;
  peft.base_model_name_or_path = base_model_name_or_path;
  return common::WritePeftAdapter(dir, tensors, peft);
}

}  // namespace fedlora::edge
