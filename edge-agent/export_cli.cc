#include "edge-agent/export_cli.h"

#include <exception>
#include <map>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"
#include "common/export/adapter_export.h"
#include "common/export/peft_export.h"
#include "common/quant/quant.h"
#include "common/status/status.h"

namespace fedlora::edge {
namespace {

constexpr char kUsage[] =
    "usage: fedlora-agent export --model DIR (--adapter PEFT_DIR | --version-blob FILE "
    "[--sha256 HEX])\n"
    "                            --format peft|gguf-lora|gguf-merged [--quant "
    "f32|f16|q8_0|q4_0]\n"
    "                            --out PATH [--name NAME]\n"
    "\n"
    "Writes an adapter as files other tools load (same code as fedlora-admin models export):\n"
    "  peft         PEFT adapter directory (adapter_config.json + adapter_model.safetensors)\n"
    "  gguf-lora    llama.cpp LoRA adapter GGUF (llama-cli --lora FILE); f32 (default) or f16\n"
    "  gguf-merged  llama.cpp model GGUF with the adapter merged in; f16 (default), f32, q8_0,\n"
    "               q4_0\n"
    "\n"
    "  --model DIR          base model, a Hugging Face checkpoint folder (config.json,\n"
    "                       model.safetensors, tokenizer.json); the adapter must fit it\n"
    "  --adapter PEFT_DIR   the adapter as a PEFT directory\n"
    "  --version-blob FILE  a published version's adapter blob as the coordinator serves it\n"
    "  --sha256 HEX         expected SHA-256 of --version-blob (refused if it differs)\n"
    "  --out PATH           output directory (peft) or file (gguf-*); nothing is written on "
    "error\n"
    "  --name NAME          GGUF general.name (default \"fedlora\")\n";

const std::set<std::string> kValueFlags = {"--model",  "--adapter", "--version-blob",
                                           "--sha256", "--format",  "--quant",
                                           "--out",    "--name"};

absl::StatusOr<std::map<std::string, std::string>> Parse(const std::vector<std::string>& args) {
  std::map<std::string, std::string> values;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& w = args[i];
    std::string name = w, value;
    bool inline_value = false;
    if (const size_t eq = w.find('='); w.rfind("--", 0) == 0 && eq != std::string::npos) {
      name = w.substr(0, eq);
      value = w.substr(eq + 1);
      inline_value = true;
    }
    if (w.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", w, "'"));
    }
    if (kValueFlags.count(name) == 0) {
      return absl::InvalidArgumentError(absl::StrCat("unknown option '", name, "'"));
    }
    if (!inline_value) {
      if (i + 1 >= args.size()) return absl::InvalidArgumentError(name + " needs a value");
      value = args[++i];
    }
    if (value.empty()) return absl::InvalidArgumentError(name + " needs a non-empty value");
    if (!values.emplace(name, value).second) {
      return absl::InvalidArgumentError(name + " given twice");
    }
  }
  for (const char* required : {"--model", "--format", "--out"}) {
    if (values.count(required) == 0) {
      return absl::InvalidArgumentError(absl::StrCat(required, " is required"));
    }
  }
  if (values.count("--adapter") == values.count("--version-blob")) {
    return absl::InvalidArgumentError("expected exactly one of --adapter and --version-blob");
  }
  if (values.count("--sha256") != 0 && values.count("--version-blob") == 0) {
    return absl::InvalidArgumentError("--sha256 goes with --version-blob");
  }
  return values;
}

struct Input {
  std::string what;  // for the report line
  common::TensorMap tensors;
  common::PeftLoraConfig config;
};

absl::StatusOr<Input> ReadInput(const std::map<std::string, std::string>& v) {
  Input in;
  if (auto it = v.find("--adapter"); it != v.end()) {
    ASSIGN_OR_RETURN(common::PeftAdapterFiles files, common::ReadPeftAdapter(it->second));
    in.what = absl::StrCat("PEFT adapter ", it->second);
    in.tensors = std::move(files.tensors);
    in.config = std::move(files.config);
    return in;
  }
  const std::string& path = v.at("--version-blob");
  auto where = [&](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrCat("--version-blob ", path, ": ", s.message()));
  };
  auto blob = common::ReadFileToString(path);
  if (!blob.ok()) return where(blob.status());
  if (auto it = v.find("--sha256"); it != v.end()) {
    const std::string want = absl::AsciiStrToLower(it->second);
    const std::string got = common::Sha256Hex(*blob);
    if (got != want) {
      return absl::DataLossError(absl::StrCat("--version-blob ", path, ": SHA-256 expected ", want,
                                              ", found ", got));
    }
  }
  common::Metadata metadata;
  auto tensors = common::DecodeAdapterBlob(*blob, &metadata);
  if (!tensors.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--version-blob ", path,
                     ": not a fedlora adapter blob: ", tensors.status().message()));
  }
  auto config = common::LoraConfigFromBlobMetadata(*tensors, metadata);
  if (!config.ok()) return where(config.status());
  in.what = absl::StrCat("version blob ", path);
  in.tensors = std::move(*tensors);
  in.config = std::move(*config);
  return in;
}

}  // namespace

int RunExportCli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  for (const std::string& a : args) {
    if (a == "--help" || a == "-h" || a == "help") {
      out << kUsage;
      return 0;
    }
  }
  auto parsed = Parse(args);
  common::AdapterExportOptions options;
  if (parsed.ok()) {
    const auto& v = *parsed;
    auto format = common::ParseExportFormat(v.at("--format"));
    if (!format.ok()) {
      parsed = absl::InvalidArgumentError(absl::StrCat("--format: ", format.status().message()));
    } else {
      options.format = *format;
      options.base_model_dir = v.at("--model");
      options.out = v.at("--out");
      options.base_flag = "--model";
      if (auto it = v.find("--quant"); it != v.end()) options.quant = it->second;
      if (auto it = v.find("--name"); it != v.end()) options.name = it->second;
      if (auto type = common::CheckExportOptions(options); !type.ok()) parsed = type.status();
    }
  }
  if (!parsed.ok()) {
    err << "error: fedlora-agent export: " << parsed.status().message() << "\n" << kUsage;
    return 2;
  }
  try {
    absl::StatusOr<Input> input = ReadInput(*parsed);
    absl::StatusOr<common::AdapterExportResult> result =
        input.ok() ? common::ExportAdapter(input->tensors, input->config, options)
                   : absl::StatusOr<common::AdapterExportResult>(input.status());
    if (!result.ok()) {
      err << "error: fedlora-agent export: " << result.status().ToString() << "\n";
      return 1;
    }
    out << "exported " << input->what << " (r=" << input->config.r
        << ", alpha=" << input->config.lora_alpha << ") as "
        << common::ExportFormatName(options.format) << " to " << result->out << " ("
        << result->tensor_count << " tensors)\n";
    return 0;
  } catch (const std::exception& e) {
    err << "error: fedlora-agent export: " << e.what() << "\n";
    return 1;
  }
}

}  // namespace fedlora::edge
