#include "edge-agent/model_cli.h"

#include <torch/torch.h>

#include <cerrno>
#include <cstdlib>
#include <iostream>
#include <map>
#include <optional>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/crypto/crypto.h"
#include "common/status/status.h"
#include "edge-agent/engine.h"
#include "edge-agent/lora.h"
#include "edge-agent/model.h"
#include "edge-agent/peft.h"
#include "edge-agent/tokenizer.h"
#include "nlohmann/json.hpp"

namespace fedlora::edge {
namespace {

using nlohmann::json;

constexpr char kUsage[] =
    "usage: fedlora-agent model inspect DIR\n"
    "       fedlora-agent model tokenize DIR --text T\n"
    "       fedlora-agent model logits DIR (--ids 1,2,3 | --text T) [--adapter PEFT_DIR "
    "[--merge]]\n"
    "       fedlora-agent model generate DIR (--prompt T | --ids 1,2,3) --max-new N "
    "[--adapter PEFT_DIR] [--json]\n";

struct UsageError {
  std::string message;
};

struct Args {
  std::string command;
  std::string dir;
  std::map<std::string, std::string> values;  // --flag value
  std::set<std::string> switches;             // --flag
};

// Parses "CMD DIR [--flag value | --switch]...", checking flags against `allowed`.
absl::StatusOr<Args> Parse(const std::vector<std::string>& argv) {
  static const std::map<std::string, std::set<std::string>> kValueFlags = {
      {"inspect", {}},
      {"tokenize", {"--text"}},
      {"logits", {"--ids", "--text", "--adapter"}},
      {"generate", {"--prompt", "--ids", "--max-new", "--adapter"}},
  };
  static const std::map<std::string, std::set<std::string>> kSwitches = {
      {"inspect", {}},
      {"tokenize", {}},
      {"logits", {"--merge"}},
      {"generate", {"--json"}},
  };
  Args a;
  if (argv.empty()) return absl::InvalidArgumentError("expected a command");
  a.command = argv[0];
  auto vf = kValueFlags.find(a.command);
  if (vf == kValueFlags.end()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "unknown command '", a.command, "' (expected inspect, tokenize, logits or generate)"));
  }
  const auto& sw = kSwitches.at(a.command);
  for (size_t i = 1; i < argv.size(); ++i) {
    const std::string& w = argv[i];
    if (w.rfind("--", 0) == 0) {
      std::string name = w, value;
      bool inline_value = false;
      if (auto eq = w.find('='); eq != std::string::npos) {
        name = w.substr(0, eq);
        value = w.substr(eq + 1);
        inline_value = true;
      }
      if (sw.count(name)) {
        if (inline_value) return absl::InvalidArgumentError(name + " takes no value");
        a.switches.insert(name);
      } else if (vf->second.count(name)) {
        if (!inline_value) {
          if (i + 1 >= argv.size()) return absl::InvalidArgumentError(name + " needs a value");
          value = argv[++i];
        }
        if (a.values.count(name)) return absl::InvalidArgumentError(name + " given twice");
        a.values[name] = value;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("unknown option '", name, "' for '", a.command, "'"));
      }
    } else if (a.dir.empty()) {
      a.dir = w;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", w, "'"));
    }
  }
  if (a.dir.empty()) return absl::InvalidArgumentError("expected a model directory");
  return a;
}

absl::StatusOr<std::vector<int64_t>> ParseIds(const std::string& text) {
  std::vector<int64_t> ids;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int64_t v;
    if (!absl::SimpleAtoi(part, &v) || v < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--ids: expected comma-separated non-negative integers, found '",
                       std::string(part), "'"));
    }
    ids.push_back(v);
  }
  if (ids.empty()) return absl::InvalidArgumentError("--ids: expected at least one id");
  return ids;
}

absl::Status CheckIds(const std::vector<int64_t>& ids, const ModelConfig& c) {
  for (int64_t id : ids) {
    if (id >= c.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " is outside the vocabulary (size ", c.vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<json> Inspect(const std::string& dir) {
  ASSIGN_OR_RETURN(ModelConfig c, LoadModelConfig(dir));
  std::vector<std::string> shards;
  {
    auto single = common::SafetensorsFile::Open(dir + "/model.safetensors");
    if (single.ok()) {
      shards.push_back("model.safetensors");
    } else {
      ASSIGN_OR_RETURN(std::string idx,
                       common::ReadFileToString(dir + "/model.safetensors.index.json"));
      json j = json::parse(idx, nullptr, false);
      if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(dir, "/model.safetensors.index.json: expected a weight_map object"));
      }
      std::set<std::string> seen;
      for (auto& [k, v] : j["weight_map"].items()) {
        if (v.is_string() && seen.insert(v.get<std::string>()).second) {
          shards.push_back(v.get<std::string>());
        }
      }
    }
  }
  int64_t params = 0, bytes = 0;
  std::map<std::string, int64_t> dtypes;
  for (const std::string& s : shards) {
    if (s.find('/') != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("shard name '", s, "' is not a plain file"));
    }
    ASSIGN_OR_RETURN(auto f, common::SafetensorsFile::Open(dir + "/" + s));
    for (const auto& v : f->tensors()) {
      params += v.numel();
      bytes += static_cast<int64_t>(v.nbytes);
      dtypes[std::string(common::DTypeName(v.dtype))] += v.numel();
    }
  }
  // LoRA parameters at rank 8 on every module (r * (in + out) per module).
  const int64_t H = c.hidden_size, I = c.intermediate_size;
  const int64_t per_layer_io =
      (H + c.q_size()) + 2 * (H + c.kv_size()) + (c.q_size() + H) + 2 * (H + I) + (I + H);
  const int64_t lora_r8 = 8 * per_layer_io * c.num_hidden_layers;
  json out;
  out["architecture"] = c.architecture_name;
  out["model_type"] = c.model_type;
  out["layers"] = c.num_hidden_layers;
  out["hidden"] = H;
  out["intermediate"] = I;
  out["heads"] = c.num_attention_heads;
  out["kv_heads"] = c.num_key_value_heads;
  out["head_dim"] = c.head_dim;
  out["vocab"] = c.vocab_size;
  out["rope_theta"] = c.rope_theta;
  out["rope_scaling"] = c.rope_scaling.type;
  out["tie_word_embeddings"] = c.tie_word_embeddings;
  out["params"] = params;
  out["checkpoint_bytes"] = bytes;
  out["dtypes"] = dtypes;  // dtype -> parameter count
  out["memory_estimate_bytes"] = {
      {"weights_fp32", params * 4},
      {"weights_bf16", params * 2},
      {"lora_r8_params", lora_r8},
      // LoRA fp32 values + grads + two AdamW moments.
      {"lora_r8_training_state", lora_r8 * 4 * 4},
  };
  out["lora_target_modules"] =
      c.architecture == Architecture::kPhi3
          ? std::vector<std::string>{"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
          : std::vector<std::string>{"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                     "gate_proj", "up_proj", "down_proj"};
  ASSIGN_OR_RETURN(std::string hash, common::HashModelDirectory(dir));
  out["base_model_hash"] = hash;
  return out;
}

absl::Status ApplyAdapter(Model& model, const Args& a) {
  auto it = a.values.find("--adapter");
  if (it == a.values.end()) return absl::OkStatus();
  ASSIGN_OR_RETURN(PeftAdapter adapter, LoadPeftAdapter(it->second));
  RETURN_IF_ERROR(SetLora(model, adapter.config, adapter.tensors));
  if (a.switches.count("--merge")) MergeLora(model);
  return absl::OkStatus();
}

// Flag combinations; a failure here is a usage error (exit 2).
absl::Status ValidateUsage(const Args& a) {
  if (a.command == "inspect") return absl::OkStatus();
  if (a.command == "tokenize") {
    if (!a.values.count("--text")) return absl::InvalidArgumentError("tokenize needs --text");
    return absl::OkStatus();
  }
  const std::string text_flag = a.command == "logits" ? "--text" : "--prompt";
  if (a.values.count("--ids") == a.values.count(text_flag)) {
    return absl::InvalidArgumentError(
        absl::StrCat(a.command, " needs exactly one of --ids and ", text_flag));
  }
  if (a.switches.count("--merge") && !a.values.count("--adapter")) {
    return absl::InvalidArgumentError("--merge needs --adapter");
  }
  if (a.command == "generate") {
    int max_new = 0;
    auto mn = a.values.find("--max-new");
    if (mn == a.values.end() || !absl::SimpleAtoi(mn->second, &max_new) || max_new < 0) {
      return absl::InvalidArgumentError("generate needs --max-new N (N >= 0)");
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<json> Run(const Args& a) {
  if (a.command == "inspect") return Inspect(a.dir);
  if (a.command == "tokenize") {
    auto text = a.values.find("--text");
    ASSIGN_OR_RETURN(auto tok, Tokenizer::FromFile(a.dir + "/tokenizer.json"));
    json out;
    out["ids"] = tok->Encode(text->second);
    return out;
  }
  const bool has_ids = a.values.count("--ids") > 0;
  const bool has_text = !has_ids;
  int max_new = 0;
  if (a.command == "generate") (void)absl::SimpleAtoi(a.values.at("--max-new"), &max_new);
  ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(a.dir));
  RETURN_IF_ERROR(ApplyAdapter(*model, a));
  std::unique_ptr<Tokenizer> tok;
  SpecialTokens special;
  if (has_text || a.command == "generate") {
    ASSIGN_OR_RETURN(tok, Tokenizer::FromFile(a.dir + "/tokenizer.json"));
    ASSIGN_OR_RETURN(special, ResolveSpecialTokens(a.dir, model->config(), *tok));
  }
  std::vector<int64_t> ids;
  if (has_ids) {
    ASSIGN_OR_RETURN(ids, ParseIds(a.values.at("--ids")));
  } else if (a.command == "logits") {
    for (int32_t id : tok->Encode(a.values.at("--text"))) ids.push_back(id);
  } else {
    if (special.bos) ids.push_back(*special.bos);
    for (int32_t id : tok->Encode(a.values.at("--prompt"))) ids.push_back(id);
  }
  if (ids.empty()) return absl::InvalidArgumentError("the input has no tokens");
  RETURN_IF_ERROR(CheckIds(ids, model->config()));
  json out;
  if (a.command == "logits") {
    torch::NoGradGuard no_grad;
    torch::Tensor logits =
        model->Forward(torch::tensor(ids, torch::kLong).unsqueeze(0))[0].contiguous();
    json rows = json::array();
    for (int64_t t = 0; t < logits.size(0); ++t) {
      const float* p = logits[t].data_ptr<float>();
      rows.push_back(std::vector<float>(p, p + logits.size(1)));
    }
    out["logits"] = std::move(rows);
    return out;
  }
  std::vector<int64_t> stop = model->config().eos_token_ids;
  if (special.eos) stop.push_back(*special.eos);
  // generation_config.json may list more stop ids (e.g. Llama-3 instruct's <|eot_id|>).
  if (auto gc = common::ReadFileToString(a.dir + "/generation_config.json"); gc.ok()) {
    json g = json::parse(*gc, nullptr, /*allow_exceptions=*/false);
    if (g.is_object() && g.contains("eos_token_id")) {
      const json& e = g["eos_token_id"];
      for (const json& v : e.is_array() ? e : json::array({e})) {
        if (v.is_number_integer()) stop.push_back(v.get<int64_t>());
      }
    }
  }
  std::vector<int64_t> gen = model->GenerateGreedy(ids, max_new, stop);
  std::vector<int32_t> gen32(gen.begin(), gen.end());
  out["ids"] = gen;
  out["text"] = tok->Decode(gen32, /*skip_special=*/true);
  return out;
}

}  // namespace

int RunModelCli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    (args.empty() ? err : out) << kUsage;
    return args.empty() ? 2 : 0;
  }
  auto parsed = Parse(args);
  if (parsed.ok()) {
    if (absl::Status usage = ValidateUsage(*parsed); !usage.ok()) parsed = usage;
  }
  if (!parsed.ok()) {
    err << "error: " << parsed.status().message() << "\n" << kUsage;
    return 2;
  }
  try {
    absl::StatusOr<json> result = Run(*parsed);
    if (!result.ok()) {
      err << "error: " << result.status().ToString() << "\n";
      return 1;
    }
    if (parsed->command == "generate" && !parsed->switches.count("--json")) {
      out << (*result)["text"].get<std::string>() << "\n";  // raw bytes
    } else {
      // Decoded text may hold partial UTF-8 sequences: replace them, never throw.
      out << result->dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
    }
    return 0;
  } catch (const c10::Error& e) {
    err << "error: libtorch: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    err << "error: " << e.what() << "\n";
    return 1;
  }
}

int RunModelCli(const std::vector<std::string>& args) {
  return RunModelCli(args, std::cout, std::cerr);
}

}  // namespace fedlora::edge
