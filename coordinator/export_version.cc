#include "coordinator/export_version.h"

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <set>
#include <system_error>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/crypto/crypto.h"
#include "common/export/gguf.h"
#include "common/export/gguf_llama.h"
#include "common/quant/quant.h"
#include "common/status/status.h"

namespace fedlora::coordinator {
namespace {

namespace fs = std::filesystem;

constexpr char kRankKey[] = "fedlora.lora.rank";
constexpr char kAlphaKey[] = "fedlora.lora.alpha";
constexpr char kTargetsKey[] = "fedlora.lora.target_modules";

std::string ShapeStr(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

// "....q_proj.lora_A.weight" -> "q_proj"; "" when the name has another form.
std::string ModuleOf(const std::string& name) {
  for (const char* half : {".lora_A.weight", ".lora_B.weight"}) {
    const std::string suffix = half;
    if (name.size() > suffix.size() &&
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      const std::string path = name.substr(0, name.size() - suffix.size());
      const size_t dot = path.rfind('.');
      return dot == std::string::npos ? path : path.substr(dot + 1);
    }
  }
  return "";
}

absl::StatusOr<common::GgmlType> GgufType(ExportFormat format, const std::string& quant) {
  const std::string q = quant.empty() ? (format == ExportFormat::kGgufLora ? "f32" : "f16") : quant;
  if (q == "f32") return common::GgmlType::kF32;
  if (q == "f16") return common::GgmlType::kF16;
  if (format == ExportFormat::kGgufMerged) {
    if (q == "q8_0") return common::GgmlType::kQ8_0;
    if (q == "q4_0") return common::GgmlType::kQ4_0;
    return absl::InvalidArgumentError(absl::StrCat(
        "export gguf-merged: --quant expected f32, f16, q8_0 or q4_0, found '", q, "'"));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "export gguf-lora: --quant expected f32 or f16 (LoRA ranks are rarely a multiple of the "
      "32-value quant block), found '",
      q, "'"));
}

std::string TempSibling(const std::string& path) {
  static std::atomic<uint64_t> counter{0};
  return absl::StrCat(path, ".tmp-", getpid(), "-", counter.fetch_add(1));
}

// Writes the PEFT adapter to a temporary sibling directory, then moves it into place.
absl::Status WritePeftAtomically(const std::string& out, const common::TensorMap& adapter,
                                 const common::PeftLoraConfig& config) {
  std::error_code ec;
  const bool exists = fs::exists(out, ec);
  if (exists && !fs::is_directory(out, ec)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "export peft: --out ", out, " exists and is not a directory (expected a directory)"));
  }
  const std::string tmp = TempSibling(out);
  absl::Status s = common::WritePeftAdapter(tmp, adapter, config);
  if (s.ok()) {
    if (!exists) {
      fs::rename(tmp, out, ec);
      if (ec) s = common::ErrnoToStatus(ec.value(), "export peft: renaming " + tmp + " to " + out);
    } else {
      for (const char* f : {"adapter_model.safetensors", "adapter_config.json"}) {
        fs::rename(tmp + "/" + f, out + "/" + f, ec);
        if (ec) {
          s = common::ErrnoToStatus(ec.value(),
                                    absl::StrCat("export peft: moving ", f, " into ", out));
          break;
        }
      }
    }
  }
  fs::remove_all(tmp, ec);  // best effort; absent after a successful rename
  return s;
}

}  // namespace

const char* ExportFormatName(ExportFormat format) {
  switch (format) {
    case ExportFormat::kPeft:
      return "peft";
    case ExportFormat::kGgufLora:
      return "gguf-lora";
    case ExportFormat::kGgufMerged:
      return "gguf-merged";
  }
  return "?";
}

absl::StatusOr<ExportFormat> ParseExportFormat(const std::string& name) {
  for (ExportFormat f : {ExportFormat::kPeft, ExportFormat::kGgufLora, ExportFormat::kGgufMerged}) {
    if (name == ExportFormatName(f)) return f;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("export format: expected peft, gguf-lora or gguf-merged, found '", name, "'"));
}

absl::StatusOr<LoadedAdapter> LoadVersionAdapter(const StateStore& store,
                                                 const std::string& version) {
  LoadedAdapter loaded;
  if (version.empty() || version == "latest" || version == "current") {
    ASSIGN_OR_RETURN(loaded.version_id, store.CurrentVersion());
    if (loaded.version_id.empty()) {
      return absl::NotFoundError(absl::StrCat("export: version '",
                                              version.empty() ? "latest" : version,
                                              "': no version has been published yet"));
    }
  } else {
    loaded.version_id = version;
  }
  const std::string& id = loaded.version_id;
  ASSIGN_OR_RETURN(std::optional<VersionRecord> record, store.GetVersion(id));
  if (!record.has_value()) {
    return absl::NotFoundError(absl::StrCat("export: version '", id, "' not found"));
  }
  auto blob = store.GetBlob(record->sha256);
  if (absl::IsNotFound(blob.status())) {
    return absl::DataLossError(absl::StrCat("export: version ", id, ": its blob ", record->sha256,
                                            " is missing from the store"));
  }
  RETURN_IF_ERROR(blob.status());
  const std::string actual = common::Sha256Hex(*blob);
  if (actual != record->sha256) {
    return absl::DataLossError(absl::StrCat("export: version ", id, ": blob SHA-256 expected ",
                                            record->sha256, ", found ", actual));
  }
  auto tensors = common::DecodeAdapterBlob(*blob, &loaded.metadata);
  if (!tensors.ok()) {
    return absl::DataLossError(
        absl::StrCat("export: version ", id, ": ", tensors.status().message()));
  }
  loaded.tensors = std::move(*tensors);
  if (loaded.tensors.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("export: version ", id, " has no tensors"));
  }

  common::PeftLoraConfig& config = loaded.config;
  const common::Metadata& md = loaded.metadata;
  // Alpha: required (the scale alpha/r cannot be guessed).
  auto alpha_it = md.find(kAlphaKey);
  if (alpha_it == md.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("export: version ", id, ": blob metadata lacks '", kAlphaKey, "'"));
  }
  if (!absl::SimpleAtod(alpha_it->second, &config.lora_alpha) || !(config.lora_alpha > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("export: version ", id, ": blob metadata '", kAlphaKey,
                     "' expected a positive number, found '", alpha_it->second, "'"));
  }
  // Rank: from metadata, else from the first lora_A's rows (CollectLoraPairs checks all).
  auto rank_it = md.find(kRankKey);
  if (rank_it != md.end() && !rank_it->second.empty() && rank_it->second != "0") {
    if (!absl::SimpleAtoi(rank_it->second, &config.r) || config.r <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("export: version ", id, ": blob metadata '", kRankKey,
                       "' expected a positive integer, found '", rank_it->second, "'"));
    }
  } else {
    for (const auto& [name, t] : loaded.tensors) {
      if (ModuleOf(name).empty() || name.find(".lora_A.") == std::string::npos) continue;
      if (t.shape.size() == 2) config.r = static_cast<int>(t.shape[0]);
      break;
    }
    if (config.r <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("export: version ", id, ": no '", kRankKey,
                       "' metadata and no lora_A tensor to infer it"));
    }
  }
  // Target modules: from metadata, else from the tensor names.
  auto targets_it = md.find(kTargetsKey);
  if (targets_it != md.end() && !targets_it->second.empty()) {
    config.target_modules = absl::StrSplit(targets_it->second, ',', absl::SkipEmpty());
  } else {
    std::set<std::string> modules;
    for (const auto& [name, t] : loaded.tensors) {
      const std::string m = ModuleOf(name);
      if (!m.empty()) modules.insert(m);
    }
    config.target_modules.assign(modules.begin(), modules.end());
  }
  auto pairs = common::CollectLoraPairs(loaded.tensors, config);
  if (!pairs.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("export: version ", id, ": ", pairs.status().message()));
  }
  return loaded;
}

absl::Status CheckAdapterFitsBase(const common::TensorMap& adapter,
                                  const common::PeftLoraConfig& config, const std::string& hf_dir) {
  ASSIGN_OR_RETURN(std::vector<common::LoraPair> pairs, common::CollectLoraPairs(adapter, config));
  const std::string weights_path = hf_dir + "/model.safetensors";
  ASSIGN_OR_RETURN(auto weights, common::SafetensorsFile::Open(weights_path));
  for (const common::LoraPair& p : pairs) {
    const std::string wname = p.module_path + ".weight";
    const common::TensorView* w = weights->Find(wname);
    if (w == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("export: adapter module ", p.module_path, " expects base weight '", wname,
                       "', which ", weights_path, " does not have (wrong --base-model?)"));
    }
    const std::vector<int64_t> want = {p.b->shape[0], p.a->shape[1]};
    if (w->shape != want) {
      return absl::InvalidArgumentError(
          absl::StrCat("export: adapter does not fit the base model: ", p.module_path,
                       " lora_A is ", ShapeStr(p.a->shape), " and lora_B is ", ShapeStr(p.b->shape),
                       ", so the base weight '", wname, "' should be ", ShapeStr(want), ", but ",
                       weights_path, " has ", ShapeStr(w->shape), " (wrong --base-model?)"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ExportResult> ExportVersion(const StateStore& store, const ExportOptions& options) {
  if (options.out.empty()) return absl::InvalidArgumentError("export: --out is required");
  std::string out = options.out;
  while (out.size() > 1 && out.back() == '/') out.pop_back();
  const bool gguf = options.format != ExportFormat::kPeft;
  if (gguf && options.base_model_dir.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("export ", ExportFormatName(options.format),
                                                   ": --base-model (an HF model directory) is "
                                                   "required"));
  }
  common::GgmlType type = common::GgmlType::kF32;
  if (gguf) {
    ASSIGN_OR_RETURN(type, GgufType(options.format, options.quant));
  } else if (!options.quant.empty() && options.quant != "f32") {
    return absl::InvalidArgumentError(absl::StrCat(
        "export peft: adapters are written as F32; --quant expected f32 or nothing, found '",
        options.quant, "'"));
  }

  ASSIGN_OR_RETURN(LoadedAdapter loaded, LoadVersionAdapter(store, options.version));
  if (!options.base_model_dir.empty()) {
    loaded.config.base_model_name_or_path = options.base_model_dir;
    RETURN_IF_ERROR(CheckAdapterFitsBase(loaded.tensors, loaded.config, options.base_model_dir));
  }

  ExportResult result;
  result.version_id = loaded.version_id;
  result.out = out;
  result.config = loaded.config;
  switch (options.format) {
    case ExportFormat::kPeft:
      RETURN_IF_ERROR(WritePeftAtomically(out, loaded.tensors, loaded.config));
      result.tensor_count = loaded.tensors.size();
      break;
    case ExportFormat::kGgufLora: {
      ASSIGN_OR_RETURN(
          common::GgufWriter writer,
          common::BuildLoraGguf(options.base_model_dir, loaded.tensors, loaded.config, type));
      writer.Set("general.name", common::GgufValue::Str("fedlora " + loaded.version_id));
      RETURN_IF_ERROR(writer.WriteFile(out));
      result.tensor_count = writer.tensor_count();
      break;
    }
    case ExportFormat::kGgufMerged: {
      common::LlamaGgufOptions gopt;
      gopt.type = type;
      gopt.name = "fedlora " + loaded.version_id;
      gopt.lora = &loaded.tensors;
      gopt.lora_config = &loaded.config;
      ASSIGN_OR_RETURN(common::GgufWriter writer,
                       common::BuildLlamaGguf(options.base_model_dir, gopt));
      RETURN_IF_ERROR(writer.WriteFile(out));
      result.tensor_count = writer.tensor_count();
      break;
    }
  }
  return result;
}

absl::StatusOr<ExportResult> ExportVersionFromDataDir(const std::string& data_dir,
                                                      const ExportOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<StateStore> store, StateStore::OpenReadOnly(data_dir));
  return ExportVersion(*store, options);
}

}  // namespace fedlora::coordinator
