#include "common/export/adapter_export.h"

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
#include "common/export/gguf_llama.h"
#include "common/status/status.h"

namespace fedlora::common {
namespace {

namespace fs = std::filesystem;

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

std::string TempSibling(const std::string& path) {
  static std::atomic<uint64_t> counter{0};
  return absl::StrCat(path, ".tmp-", getpid(), "-", counter.fetch_add(1));
}

// Writes the PEFT adapter to a temporary sibling directory, then moves it into place.
absl::Status WritePeftAtomically(const std::string& out, const TensorMap& adapter,
                                 const PeftLoraConfig& config) {
  std::error_code ec;
  const bool exists = fs::exists(out, ec);
  if (exists && !fs::is_directory(out, ec)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "export peft: --out ", out, " exists and is not a directory (expected a directory)"));
  }
  const std::string tmp = TempSibling(out);
  absl::Status s = WritePeftAdapter(tmp, adapter, config);
  if (s.ok()) {
    if (!exists) {
      fs::rename(tmp, out, ec);
      if (ec) s = ErrnoToStatus(ec.value(), "export peft: renaming " + tmp + " to " + out);
    } else {
      for (const char* f : {"adapter_model.safetensors", "adapter_config.json"}) {
        fs::rename(tmp + "/" + f, out + "/" + f, ec);
        if (ec) {
          s = ErrnoToStatus(ec.value(), absl::StrCat("export peft: moving ", f, " into ", out));
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

absl::StatusOr<PeftLoraConfig> LoraConfigFromBlobMetadata(const TensorMap& tensors,
                                                          const Metadata& md) {
  if (tensors.empty()) return absl::InvalidArgumentError("the adapter has no tensors");
  PeftLoraConfig config;
  auto alpha_it = md.find(kBlobLoraAlphaKey);
  if (alpha_it == md.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("blob metadata lacks '", kBlobLoraAlphaKey, "'"));
  }
  if (!absl::SimpleAtod(alpha_it->second, &config.lora_alpha) || !(config.lora_alpha > 0)) {
    return absl::InvalidArgumentError(absl::StrCat("blob metadata '", kBlobLoraAlphaKey,
                                                   "' expected a positive number, found '",
                                                   alpha_it->second, "'"));
  }
  auto rank_it = md.find(kBlobLoraRankKey);
  if (rank_it != md.end() && !rank_it->second.empty() && rank_it->second != "0") {
    if (!absl::SimpleAtoi(rank_it->second, &config.r) || config.r <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("blob metadata '", kBlobLoraRankKey,
                                                     "' expected a positive integer, found '",
                                                     rank_it->second, "'"));
    }
  } else {
    // From the first lora_A's rows (CollectLoraPairs checks all of them).
    for (const auto& [name, t] : tensors) {
      if (ModuleOf(name).empty() || name.find(".lora_A.") == std::string::npos) continue;
      if (t.shape.size() == 2) config.r = static_cast<int>(t.shape[0]);
      break;
    }
    if (config.r <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "no '", kBlobLoraRankKey, "' metadata and no lora_A tensor to infer it"));
    }
  }
  auto targets_it = md.find(kBlobLoraTargetsKey);
  if (targets_it != md.end() && !targets_it->second.empty()) {
    config.target_modules = absl::StrSplit(targets_it->second, ',', absl::SkipEmpty());
  } else {
    std::set<std::string> modules;
    for (const auto& [name, t] : tensors) {
      const std::string m = ModuleOf(name);
      if (!m.empty()) modules.insert(m);
    }
    config.target_modules.assign(modules.begin(), modules.end());
  }
  RETURN_IF_ERROR(CollectLoraPairs(tensors, config).status());
  return config;
}

absl::Status CheckAdapterFitsBase(const TensorMap& adapter, const PeftLoraConfig& config,
                                  const std::string& hf_dir) {
  ASSIGN_OR_RETURN(std::vector<LoraPair> pairs, CollectLoraPairs(adapter, config));
  const std::string weights_path = hf_dir + "/model.safetensors";
  ASSIGN_OR_RETURN(auto weights, SafetensorsFile::Open(weights_path));
  for (const LoraPair& p : pairs) {
    const std::string wname = p.module_path + ".weight";
    const TensorView* w = weights->Find(wname);
    if (w == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("export: adapter module ", p.module_path, " expects base weight '", wname,
                       "', which ", weights_path, " does not have (wrong base model?)"));
    }
    const std::vector<int64_t> want = {p.b->shape[0], p.a->shape[1]};
    if (w->shape != want) {
      return absl::InvalidArgumentError(
          absl::StrCat("export: adapter does not fit the base model: ", p.module_path,
                       " lora_A is ", ShapeStr(p.a->shape), " and lora_B is ", ShapeStr(p.b->shape),
                       ", so the base weight '", wname, "' should be ", ShapeStr(want), ", but ",
                       weights_path, " has ", ShapeStr(w->shape), " (wrong base model?)"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<GgmlType> CheckExportOptions(const AdapterExportOptions& options) {
  if (options.out.empty()) return absl::InvalidArgumentError("export: --out is required");
  const ExportFormat format = options.format;
  if (format == ExportFormat::kPeft) {
    if (!options.quant.empty() && options.quant != "f32") {
      return absl::InvalidArgumentError(absl::StrCat(
          "export peft: adapters are written as F32; --quant expected f32 or nothing, found '",
          options.quant, "'"));
    }
    return GgmlType::kF32;
  }
  if (options.base_model_dir.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("export ", ExportFormatName(format), ": ",
                                                   options.base_flag,
                                                   " (an HF model directory) is required"));
  }
  const std::string& quant = options.quant;
  const std::string q = quant.empty() ? (format == ExportFormat::kGgufLora ? "f32" : "f16") : quant;
  if (q == "f32") return GgmlType::kF32;
  if (q == "f16") return GgmlType::kF16;
  if (format == ExportFormat::kGgufMerged) {
    if (q == "q8_0") return GgmlType::kQ8_0;
    if (q == "q4_0") return GgmlType::kQ4_0;
    return absl::InvalidArgumentError(absl::StrCat(
        "export gguf-merged: --quant expected f32, f16, q8_0 or q4_0, found '", q, "'"));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "export gguf-lora: --quant expected f32 or f16 (LoRA ranks are rarely a multiple of the "
      "32-value quant block), found '",
      q, "'"));
}

absl::StatusOr<AdapterExportResult> ExportAdapter(const TensorMap& adapter, PeftLoraConfig config,
                                                  const AdapterExportOptions& options) {
  ASSIGN_OR_RETURN(GgmlType type, CheckExportOptions(options));
  AdapterExportResult result;
  result.out = options.out;
  while (result.out.size() > 1 && result.out.back() == '/') result.out.pop_back();
  const std::string& out = result.out;
  if (options.format != ExportFormat::kPeft) {
    // The GGUF is renamed into place: never over a directory or a device node.
    std::error_code ec;
    const fs::file_status st = fs::symlink_status(out, ec);
    if (fs::exists(st) && !fs::is_regular_file(st)) {
      return absl::FailedPreconditionError(
          absl::StrCat("export ", ExportFormatName(options.format), ": --out ", out,
                       " exists and is not a regular file (expected a file path)"));
    }
  }
  if (!options.base_model_dir.empty()) {
    config.base_model_name_or_path = options.base_model_dir;
    RETURN_IF_ERROR(CheckAdapterFitsBase(adapter, config, options.base_model_dir));
  }
  switch (options.format) {
    case ExportFormat::kPeft:
      RETURN_IF_ERROR(WritePeftAtomically(out, adapter, config));
      result.tensor_count = adapter.size();
      break;
    case ExportFormat::kGgufLora: {
      ASSIGN_OR_RETURN(GgufWriter writer,
                       BuildLoraGguf(options.base_model_dir, adapter, config, type));
      writer.Set("general.name", GgufValue::Str(options.name));
      RETURN_IF_ERROR(writer.WriteFile(out));
      result.tensor_count = writer.tensor_count();
      break;
    }
    case ExportFormat::kGgufMerged: {
      LlamaGgufOptions gopt;
      gopt.type = type;
      gopt.name = options.name;
      gopt.lora = &adapter;
      gopt.lora_config = &config;
      ASSIGN_OR_RETURN(GgufWriter writer, BuildLlamaGguf(options.base_model_dir, gopt));
      RETURN_IF_ERROR(writer.WriteFile(out));
      result.tensor_count = writer.tensor_count();
      break;
    }
  }
  return result;
}

}  // namespace fedlora::common
