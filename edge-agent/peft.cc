#include "edge-agent/peft.h"

#include <sys/stat.h>

#include <cerrno>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"
#include "common/status/status.h"
#include "nlohmann/json.hpp"

namespace fedlora::edge {
namespace {

using nlohmann::json;

// "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
//  -> "...q_proj.lora_A.weight"
std::string StripAdapterName(const std::string& name) {
  for (const char* ab : {".lora_A.", ".lora_B."}) {
    const size_t pos = name.find(ab);
    if (pos == std::string::npos) continue;
    const size_t rest = pos + 8;
    if (name.compare(rest, std::string::npos, "weight") == 0) return name;
    const size_t dot = name.find('.', rest);
    if (dot != std::string::npos && name.compare(dot, std::string::npos, ".weight") == 0) {
      return name.substr(0, rest) + "weight";
    }
  }
  return name;
}

}  // namespace

absl::StatusOr<PeftAdapter> LoadPeftAdapter(const std::string& dir) {
  const std::string cfg_path = dir + "/adapter_config.json";
  ASSIGN_OR_RETURN(std::string text, common::ReadFileToString(cfg_path));
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": not valid JSON: ", e.what()));
  }
  auto err = [&](const std::string& field, const std::string& msg) {
    return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": field '", field, "': ", msg));
  };
  if (!j.is_object()) return err("(root)", "expected a JSON object");
  PeftAdapter out;
  if (auto it = j.find("peft_type"); it != j.end() && !it->is_null() && *it != "LORA") {
    return err("peft_type", absl::StrCat("expected \"LORA\", found ", it->dump()));
  }
  auto r = j.find("r");
  if (r == j.end() || !r->is_number_integer() || r->get<int64_t>() <= 0) {
    return err("r", absl::StrCat("expected a positive integer, found ",
                                 r == j.end() ? std::string("nothing") : r->dump()));
  }
  out.config.rank = r->get<int>();
  auto alpha = j.find("lora_alpha");
  if (alpha == j.end() || !alpha->is_number() || !(alpha->get<double>() > 0)) {
    return err("lora_alpha",
               absl::StrCat("expected a positive number, found ",
                            alpha == j.end() ? std::string("nothing") : alpha->dump()));
  }
  out.config.alpha = alpha->get<float>();
  if (auto it = j.find("lora_dropout"); it != j.end() && !it->is_null()) {
    if (!it->is_number()) return err("lora_dropout", "expected a number, found " + it->dump());
    out.config.dropout = it->get<float>();
  }
  if (auto it = j.find("use_rslora"); it != j.end() && !it->is_null()) {
    if (!it->is_boolean()) return err("use_rslora", "expected a boolean, found " + it->dump());
    out.config.use_rslora = it->get<bool>();
  }
  if (auto it = j.find("use_dora"); it != j.end() && it->is_boolean() && it->get<bool>()) {
    return err("use_dora", "DoRA adapters are not supported");
  }
  for (const char* f : {"rank_pattern", "alpha_pattern"}) {
    if (auto it = j.find(f); it != j.end() && !it->is_null() && !it->empty()) {
      return err(f, "per-module ranks/alphas are not supported, found " + it->dump());
    }
  }
  if (auto it = j.find("modules_to_save"); it != j.end() && !it->is_null() && !it->empty()) {
    return err("modules_to_save",
               "fully trained extra modules are not supported, found " + it->dump());
  }
  if (auto it = j.find("bias"); it != j.end() && !it->is_null() && *it != "none") {
    return err("bias", "expected \"none\", found " + it->dump());
  }
  if (auto it = j.find("fan_in_fan_out"); it != j.end() && it->is_boolean() && it->get<bool>()) {
    return err("fan_in_fan_out", "transposed (Conv1D) weights are not supported");
  }

  const std::string st_path = dir + "/adapter_model.safetensors";
  ASSIGN_OR_RETURN(auto file, common::SafetensorsFile::Open(st_path));
  ASSIGN_OR_RETURN(common::TensorMap raw, file->ToTensorMap());
  std::set<std::string> modules;
  for (auto& [name, t] : raw) {
    const std::string clean = StripAdapterName(name);
    if (!absl::EndsWith(clean, ".lora_A.weight") && !absl::EndsWith(clean, ".lora_B.weight")) {
      return absl::InvalidArgumentError(
          absl::StrCat(st_path, ": tensor '", name, "': expected only lora_A / lora_B weights"));
    }
    const std::string prefix = clean.substr(0, clean.size() - std::string(".lora_A.weight").size());
    modules.insert(prefix.substr(prefix.rfind('.') + 1));
    if (!out.tensors.emplace(clean, std::move(t)).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(st_path, ": tensor '", clean, "' appears twice"));
    }
  }
  if (out.tensors.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(st_path, ": no LoRA tensors"));
  }
  out.config.target_modules.assign(modules.begin(), modules.end());
  return out;
}

absl::Status WritePeftAdapter(const std::string& dir, const LoraConfig& config,
                              const common::TensorMap& tensors,
                              const std::string& base_model_name_or_path) {
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    return common::ErrnoToStatus(errno, absl::StrCat("mkdir ", dir));
  }
  json j;
  j["peft_type"] = "LORA";
  j["task_type"] = "CAUSAL_LM";
  j["r"] = config.rank;
  j["lora_alpha"] = config.alpha;
  j["lora_dropout"] = config.dropout;
  j["use_rslora"] = config.use_rslora;
  j["target_modules"] = config.target_modules;
  j["bias"] = "none";
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["use_dora"] = false;
  j["modules_to_save"] = nullptr;
  j["base_model_name_or_path"] =
      base_model_name_or_path.empty() ? json(nullptr) : json(base_model_name_or_path);
  RETURN_IF_ERROR(
      common::WriteSafetensors(dir + "/adapter_model.safetensors", tensors, {{"format", "pt"}}));
  return common::WriteFileAtomic(dir + "/adapter_config.json", j.dump(2) + "\n");
}

}  // namespace fedlora::edge
