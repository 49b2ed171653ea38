#include "common/export/peft_export.h"

#include <sys/stat.h>

#include <cctype>
#include <cerrno>
#include <cmath>
#include <map>
#include <set>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/crypto/crypto.h"
#include "common/status/status.h"

namespace fedlora::common {
namespace {

constexpr char kPrefix[] = "base_model.model.";

std::string ShapeStr(const std::vector<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ","), "]");
}

// Splits "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight" into
// module path "model.layers.3.self_attn.q_proj", half 'A', layer 3, module "q_proj".
bool ParseName(const std::string& name, std::string* module_path, char* half, int* layer,
               std::string* module) {
  if (name.rfind(kPrefix, 0) != 0) return false;
  std::string rest = name.substr(sizeof(kPrefix) - 1);
  size_t pos = rest.find(".lora_");
  if (pos == std::string::npos || pos + 7 > rest.size()) return false;
  const char h = rest[pos + 6];
  if (h != 'A' && h != 'B') return false;
  if (rest.substr(pos + 7) != ".weight") return false;
  *module_path = rest.substr(0, pos);
  *half = h;
  const std::string kLayers = "model.layers.";
  if (module_path->rfind(kLayers, 0) != 0) return false;
  size_t p = kLayers.size();
  size_t q = p;
  while (q < module_path->size() && std::isdigit(static_cast<unsigned char>((*module_path)[q])))
    ++q;
  if (q == p || q - p > 6 || q >= module_path->size() || (*module_path)[q] != '.') return false;
  *layer = std::stoi(module_path->substr(p, q - p));
  const size_t dot = module_path->rfind('.');
  *module = module_path->substr(dot + 1);
  return !module->empty();
}

// "....q_proj.lora_A.<adapter name>.weight" -> "....q_proj.lora_A.weight" (PEFT
// keys saved tensors by adapter name in some versions); other names unchanged.
std::string StripAdapterName(const std::string& name) {
  for (const char* half : {".lora_A.", ".lora_B."}) {
    const size_t pos = name.rfind(half);
    if (pos == std::string::npos) continue;
    const size_t rest = pos + 8;  // after ".lora_X."
    if (name.compare(rest, std::string::npos, "weight") == 0) return name;
    const size_t dot = name.find('.', rest);
    if (dot != std::string::npos && dot > rest &&
        name.compare(dot, std::string::npos, ".weight") == 0) {
      return name.substr(0, rest) + "weight";
    }
  }
  return name;
}

absl::StatusOr<std::vector<LoraPair>> CollectPairs(const TensorMap& adapter,
                                                  const PeftLoraConfig& config, bool check_rank);

absl::Status MakeDirs(const std::string& dir) {
  std::string cur;
  for (size_t i = 0; i <= dir.size(); ++i) {
    if (i == dir.size() || dir[i] == '/') {
      if (!cur.empty() && ::mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST) {
        return ErrnoToStatus(errno, absl::StrCat("mkdir ", cur));
      }
    }
    if (i < dir.size()) cur.push_back(dir[i]);
  }
  return absl::OkStatus();
}

}  // namespace

double PeftLoraConfig::Scale() const {
  if (r <= 0) return 0;
  return use_rslora ? lora_alpha / std::sqrt(static_cast<double>(r)) : lora_alpha / r;
}

namespace {

absl::StatusOr<std::vector<LoraPair>> CollectPairs(const TensorMap& adapter,
                                                  const PeftLoraConfig& config, bool check_rank) {
  if (check_rank && config.r <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("LoRA config: expected r > 0, found ", config.r));
  }
  std::map<std::string, LoraPair> pairs;
  for (const auto& [name, t] : adapter) {
    std::string path, module;
    char half = 0;
    int layer = -1;
    if (!ParseName(name, &path, &half, &layer, &module)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adapter tensor '", name,
          "': expected base_model.model.model.layers.<N>.<...>.<module>.lora_A|lora_B.weight"));
    }
    bool targeted = false;
    for (const std::string& m : config.target_modules) targeted |= (m == module);
    if (!targeted) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adapter tensor '", name, "': module '", module, "' is not in target_modules [",
          absl::StrJoin(config.target_modules, ","), "]"));
    }
    if (t.shape.size() != 2 || t.numel() != static_cast<int64_t>(t.data.size())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adapter tensor '", name, "': expected a 2-D tensor, found shape ", ShapeStr(t.shape)));
    }
    const int64_t rank_dim = half == 'A' ? t.shape[0] : t.shape[1];
    if (check_rank && rank_dim != config.r) {
      return absl::InvalidArgumentError(absl::StrCat("adapter tensor '", name, "': expected rank ",
                                                     config.r, " in dim ", half == 'A' ? 0 : 1,
                                                     ", found shape ", ShapeStr(t.shape)));
    }
    LoraPair& p = pairs[path];
    p.module_path = path;
    p.layer = layer;
    p.module = module;
    const HostTensor*& slot = half == 'A' ? p.a : p.b;
    if (slot != nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adapter tensor '", name, "': lora_", std::string(1, half), " given twice for ", path));
    }
    slot = &t;
  }
  std::vector<LoraPair> out;
  for (auto& [path, p] : pairs) {
    if (p.a == nullptr || p.b == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("adapter module ", path, ": lora_",
                                                     p.a == nullptr ? "A" : "B", " is missing"));
    }
    out.push_back(p);
  }
  return out;
}

}  // namespace

absl::StatusOr<std::vector<LoraPair>> CollectLoraPairs(const TensorMap& adapter,
                                                       const PeftLoraConfig& config) {
  return CollectPairs(adapter, config, /*check_rank=*/true);
}

std::string PeftConfigJson(const PeftLoraConfig& config) {
  nlohmann::ordered_json j;
  j["base_model_name_or_path"] = config.base_model_name_or_path.empty()
                                     ? nlohmann::ordered_json(nullptr)
                                     : nlohmann::ordered_json(config.base_model_name_or_path);
  j["bias"] = "none";
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["lora_alpha"] = config.lora_alpha;
  j["lora_dropout"] = config.lora_dropout;
  j["modules_to_save"] = nullptr;
  j["peft_type"] = "LORA";
  j["r"] = config.r;
  j["target_modules"] = config.target_modules;
  j["task_type"] = config.task_type.empty() ? nlohmann::ordered_json(nullptr)
                                            : nlohmann::ordered_json(config.task_type);
  j["use_dora"] = false;
  j["use_rslora"] = config.use_rslora;
  return j.dump(2) + "\n";
}

absl::Status WritePeftAdapter(const std::string& dir, const TensorMap& adapter,
                              const PeftLoraConfig& config) {
  ASSIGN_OR_RETURN(std::vector<LoraPair> pairs, CollectLoraPairs(adapter, config));
  if (pairs.empty()) {
    return absl::InvalidArgumentError(
        "WritePeftAdapter: expected at least one LoRA pair, found none");
  }
  RETURN_IF_ERROR(MakeDirs(dir));
  RETURN_IF_ERROR(
      WriteSafetensors(dir + "/adapter_model.safetensors", adapter, {{"format", "pt"}}));
  return WriteFileAtomic(dir + "/adapter_config.json", PeftConfigJson(config), 0644);
}

absl::StatusOr<PeftAdapterFiles> ReadPeftAdapter(const std::string& dir,
                                                  const PeftReadOptions& options) {
  const std::string cfg_path = dir + "/adapter_config.json";
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(cfg_path));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  auto bad = [&](const std::string& field, const std::string& msg) {
    return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": field '", field, "': ", msg));
  };
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": expected a JSON object"));
  }
  // A present field that is null counts as absent (PEFT writes many nulls).
  auto has = [&](const char* f) { return j.contains(f) && !j[f].is_null(); };
  PeftAdapterFiles out;
  PeftLoraConfig& c = out.config;
  if (has("peft_type") && j["peft_type"] != "LORA") {
    return bad("peft_type", "expected \"LORA\", found " + j["peft_type"].dump());
  }
  if (!has("r") || !j["r"].is_number_integer() || j["r"].get<int64_t>() <= 0 ||
      j["r"].get<int64_t>() > 65536) {
    return bad("r", "expected an integer in 1..65536, found " +
                        (has("r") ? j["r"].dump() : std::string("nothing")));
  }
  c.r = j["r"].get<int>();
  if (!has("lora_alpha") || !j["lora_alpha"].is_number() ||
      !(j["lora_alpha"].get<double>() > 0)) {
    return bad("lora_alpha", "expected a positive number, found " +
                                 (has("lora_alpha") ? j["lora_alpha"].dump() : "nothing"));
  }
  c.lora_alpha = j["lora_alpha"].get<double>();
  if (has("use_rslora")) {
    if (!j["use_rslora"].is_boolean()) {
      return bad("use_rslora", "expected a bool, found " + j["use_rslora"].dump());
    }
    c.use_rslora = j["use_rslora"].get<bool>();
  }
  if (has("lora_dropout")) {
    if (!j["lora_dropout"].is_number()) {
      return bad("lora_dropout", "expected a number, found " + j["lora_dropout"].dump());
    }
    c.lora_dropout = j["lora_dropout"].get<double>();
  }
  c.task_type = has("task_type") && j["task_type"].is_string() ? j["task_type"].get<std::string>()
                                                               : std::string();
  if (has("base_model_name_or_path") && j["base_model_name_or_path"].is_string()) {
    c.base_model_name_or_path = j["base_model_name_or_path"].get<std::string>();
  }
  // A list names the modules exactly; a string (a regex, or "all-linear") or
  // nothing means "the modules that have tensors", filled in below.
  bool modules_from_tensors = true;
  if (has("target_modules")) {
    const nlohmann::json& tm = j["target_modules"];
    if (tm.is_array()) {
      for (const auto& m : tm) {
        if (!m.is_string()) return bad("target_modules", "expected strings, found " + m.dump());
        c.target_modules.push_back(m.get<std::string>());
      }
      modules_from_tensors = false;
    } else if (!tm.is_string()) {
      return bad("target_modules", "expected a list of module names or a name, found " + tm.dump());
    }
  }
  if (j.contains("use_dora") && j["use_dora"].is_boolean() && j["use_dora"].get<bool>()) {
    return bad("use_dora", "DoRA adapters are not supported");
  }
  if (has("bias") && j["bias"] != "none") {
    return bad("bias",
               "expected \"none\" (trained biases are not supported), found " + j["bias"].dump());
  }
  if (j.contains("fan_in_fan_out") && j["fan_in_fan_out"].is_boolean() &&
      j["fan_in_fan_out"].get<bool>()) {
    return bad("fan_in_fan_out", "expected false (transposed Conv1D weights are not supported)");
  }
  if (has("modules_to_save") &&
      !(j["modules_to_save"].is_array() && j["modules_to_save"].empty())) {
    return bad("modules_to_save", "expected null (full-module training is not supported), found " +
                                      j["modules_to_save"].dump());
  }
  for (const char* f : {"rank_pattern", "alpha_pattern"}) {
    if (has(f) && !(j[f].is_object() && j[f].empty())) {
      return bad(f, "per-module rank/alpha is not supported, found " + j[f].dump());
    }
  }
  const std::string st_path = dir + "/adapter_model.safetensors";
  ASSIGN_OR_RETURN(auto st, SafetensorsFile::Open(st_path));
  ASSIGN_OR_RETURN(TensorMap raw, st->ToTensorMap());
  std::set<std::string> present;
  for (auto& [name, t] : raw) {
    const std::string key = StripAdapterName(name);
    std::string path, module;
    char half = 0;
    int layer = -1;
    if (!ParseName(key, &path, &half, &layer, &module)) {
      return absl::InvalidArgumentError(absl::StrCat(
          st_path, ": tensor '", name,
          "': expected base_model.model.model.layers.<N>.<...>.<module>.lora_A|lora_B.weight"));
    }
    present.insert(module);
    if (!out.tensors.emplace(key, std::move(t)).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(st_path, ": tensor '", key, "' appears twice (under two adapter names?)"));
    }
  }
  if (out.tensors.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(st_path, ": expected LoRA tensors, found none"));
  }
  if (modules_from_tensors) c.target_modules.assign(present.begin(), present.end());
  auto pairs = CollectPairs(out.tensors, c, options.check_ranks);
  if (!pairs.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(st_path, ": ", pairs.status().message()));
  }
  return out;
}

}  // namespace fedlora::common
