#include "edge-agent/model_config.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"
#include "common/status/status.h"
#include "nlohmann/json.hpp"

namespace fedlora::edge {
namespace {

using nlohmann::json;

class Reader {
 public:
  Reader(const json& j, std::string source) : j_(j), source_(std::move(source)) {}

  absl::Status Error(const std::string& field, const std::string& msg) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": field '", field, "': ", msg));
  }

  // Required positive integer.
  absl::Status PositiveInt(const json& obj, const std::string& field, int64_t* out,
                           bool required = true) const {
    auto it = obj.find(field);
    if (it == obj.end() || it->is_null()) {
      if (required) return Error(field, "missing (expected a positive integer)");
      return absl::OkStatus();
    }
    if (!it->is_number_integer() || it->get<int64_t>() <= 0) {
      return Error(field, absl::StrCat("expected a positive integer, found ", it->dump()));
    }
    *out = it->get<int64_t>();
    return absl::OkStatus();
  }

  absl::Status PositiveNumber(const json& obj, const std::string& field, double* out,
                              bool required) const {
    auto it = obj.find(field);
    if (it == obj.end() || it->is_null()) {
      if (required) return Error(field, "missing (expected a positive number)");
      return absl::OkStatus();
    }
    if (!it->is_number() || !(it->get<double>() > 0) || !std::isfinite(it->get<double>())) {
      return Error(field, absl::StrCat("expected a positive number, found ", it->dump()));
    }
    *out = it->get<double>();
    return absl::OkStatus();
  }

  absl::Status Bool(const json& obj, const std::string& field, bool* out) const {
    auto it = obj.find(field);
    if (it == obj.end() || it->is_null()) return absl::OkStatus();
    if (!it->is_boolean())
      return Error(field, absl::StrCat("expected a boolean, found ", it->dump()));
    *out = it->get<bool>();
    return absl::OkStatus();
  }

  absl::Status TokenIds(const std::string& field, std::vector<int64_t>* out) const {
    auto it = j_.find(field);
    if (it == j_.end() || it->is_null()) return absl::OkStatus();
    auto one = [&](const json& v) -> absl::Status {
      if (!v.is_number_integer() || v.get<int64_t>() < 0) {
        return Error(field, absl::StrCat("expected a non-negative token id, found ", v.dump()));
      }
      out->push_back(v.get<int64_t>());
      return absl::OkStatus();
    };
    if (it->is_array()) {
      for (const auto& v : *it) RETURN_IF_ERROR(one(v));
      return absl::OkStatus();
    }
    return one(*it);
  }

 private:
  const json& j_;
  std::string source_;
};

}  // namespace

std::string_view ArchitectureName(Architecture arch) {
  switch (arch) {
    case Architecture::kLlama:
      return "LlamaForCausalLM";
    case Architecture::kMistral:
      return "MistralForCausalLM";
    case Architecture::kQwen2:
      return "Qwen2ForCausalLM";
    case Architecture::kPhi3:
      return "Phi3ForCausalLM";
  }
  return "?";
}

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view text, const std::string& source) {
  json j;
  try {
    j = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON: ", e.what()));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": expected a JSON object, found ", j.type_name()));
  }
  Reader r(j, source);
  ModelConfig c;

  auto arch_it = j.find("architectures");
  if (arch_it == j.end() || !arch_it->is_array() || arch_it->empty() ||
      !(*arch_it)[0].is_string()) {
    return r.Error("architectures",
                   "expected a non-empty array of strings, found " +
                       (arch_it == j.end() ? std::string("nothing") : arch_it->dump()));
  }
  c.architecture_name = (*arch_it)[0].get<std::string>();
  if (c.architecture_name == "LlamaForCausalLM") {
    c.architecture = Architecture::kLlama;
  } else if (c.architecture_name == "MistralForCausalLM") {
    c.architecture = Architecture::kMistral;
  } else if (c.architecture_name == "Qwen2ForCausalLM") {
    c.architecture = Architecture::kQwen2;
  } else if (c.architecture_name == "Phi3ForCausalLM") {
    c.architecture = Architecture::kPhi3;
  } else {
    return r.Error("architectures",
                   absl::StrCat("unsupported architecture '", c.architecture_name,
                                "' (supported: LlamaForCausalLM, MistralForCausalLM, "
                                "Qwen2ForCausalLM, Phi3ForCausalLM)"));
  }
  if (auto it = j.find("model_type"); it != j.end() && it->is_string()) {
    c.model_type = it->get<std::string>();
  }
  if (auto it = j.find("hidden_act"); it != j.end() && !it->is_null()) {
    if (!it->is_string() || (*it != "silu" && *it != "swish")) {
      return r.Error("hidden_act", absl::StrCat("expected \"silu\", found ", it->dump()));
    }
  }

  RETURN_IF_ERROR(r.PositiveInt(j, "hidden_size", &c.hidden_size));
  RETURN_IF_ERROR(r.PositiveInt(j, "intermediate_size", &c.intermediate_size));
  RETURN_IF_ERROR(r.PositiveInt(j, "num_hidden_layers", &c.num_hidden_layers));
  RETURN_IF_ERROR(r.PositiveInt(j, "num_attention_heads", &c.num_attention_heads));
  c.num_key_value_heads = c.num_attention_heads;
  RETURN_IF_ERROR(r.PositiveInt(j, "num_key_value_heads", &c.num_key_value_heads, false));
  RETURN_IF_ERROR(r.PositiveInt(j, "vocab_size", &c.vocab_size));
  RETURN_IF_ERROR(r.PositiveInt(j, "max_position_embeddings", &c.max_position_embeddings, false));
  // Sanity bounds far above any supported model: they keep a corrupt config
  // from driving huge allocations before the weights are checked.
  const struct {
    const char* field;
    int64_t value, limit;
  } kBounds[] = {
      {"hidden_size", c.hidden_size, int64_t{1} << 17},
      {"intermediate_size", c.intermediate_size, int64_t{1} << 19},
      {"num_hidden_layers", c.num_hidden_layers, 1024},
      {"num_attention_heads", c.num_attention_heads, 1024},
      {"vocab_size", c.vocab_size, int64_t{1} << 23},
  };
  for (const auto& b : kBounds) {
    if (b.value > b.limit) {
      return r.Error(b.field, absl::StrCat("expected at most ", b.limit, ", found ", b.value));
    }
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return r.Error("num_key_value_heads",
                   absl::StrCat("expected a divisor of num_attention_heads (",
                                c.num_attention_heads, "), found ", c.num_key_value_heads));
  }
  if (auto it = j.find("head_dim"); it != j.end() && !it->is_null()) {
    RETURN_IF_ERROR(r.PositiveInt(j, "head_dim", &c.head_dim));
  } else {
    if (c.hidden_size % c.num_attention_heads != 0) {
      return r.Error(
          "hidden_size",
          absl::StrCat("expected a multiple of num_attention_heads (", c.num_attention_heads,
                       ") when head_dim is absent, found ", c.hidden_size));
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim > 4096) {
    return r.Error("head_dim", absl::StrCat("expected at most 4096, found ", c.head_dim));
  }
  if (c.head_dim % 2 != 0) {
    return r.Error("head_dim", absl::StrCat("expected an even number (RoPE), found ", c.head_dim));
  }
  RETURN_IF_ERROR(r.PositiveNumber(j, "rms_norm_eps", &c.rms_norm_eps, false));

  // RoPE: top-level rope_theta / rope_scaling, or transformers 5 "rope_parameters".
  RETURN_IF_ERROR(r.PositiveNumber(j, "rope_theta", &c.rope_theta, false));
  const json* scaling = nullptr;
  std::string scaling_field = "rope_scaling";
  if (auto it = j.find("rope_parameters"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) {
      return r.Error("rope_parameters", absl::StrCat("expected an object, found ", it->dump()));
    }
    RETURN_IF_ERROR(r.PositiveNumber(*it, "rope_theta", &c.rope_theta, false));
    scaling = &*it;
    scaling_field = "rope_parameters";
  }
  if (auto it = j.find("rope_scaling"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) {
      return r.Error("rope_scaling", absl::StrCat("expected an object, found ", it->dump()));
    }
    scaling = &*it;
    scaling_field = "rope_scaling";
  }
  if (scaling != nullptr) {
    std::string type = "default";
    for (const char* key : {"rope_type", "type"}) {
      auto t = scaling->find(key);
      if (t != scaling->end() && t->is_string()) {
        type = t->get<std::string>();
        break;
      }
    }
    c.rope_scaling.type = type;
    if (type == "default") {
      // nothing to read
    } else if (type == "linear" || type == "llama3") {
      RETURN_IF_ERROR(r.PositiveNumber(*scaling, "factor", &c.rope_scaling.factor, true));
      if (type == "llama3") {
        RETURN_IF_ERROR(
            r.PositiveNumber(*scaling, "low_freq_factor", &c.rope_scaling.low_freq_factor, true));
        RETURN_IF_ERROR(
            r.PositiveNumber(*scaling, "high_freq_factor", &c.rope_scaling.high_freq_factor, true));
        RETURN_IF_ERROR(r.PositiveInt(*scaling, "original_max_position_embeddings",
                                      &c.rope_scaling.original_max_position_embeddings));
        if (c.rope_scaling.high_freq_factor <= c.rope_scaling.low_freq_factor) {
          return r.Error(scaling_field + ".high_freq_factor",
                         "expected high_freq_factor > low_freq_factor");
        }
      }
    } else {
      return r.Error(scaling_field, absl::StrCat("unsupported rope type '", type,
                                                 "' (supported: default, linear, llama3)"));
    }
  }

  for (const json* obj : std::initializer_list<const json*>{&j, scaling}) {
    if (obj == nullptr) continue;
    auto it = obj->find("partial_rotary_factor");
    if (it != obj->end() && !it->is_null() && !(it->is_number() && it->get<double>() == 1.0)) {
      return r.Error("partial_rotary_factor",
                     absl::StrCat("partial rotary embeddings are not supported (expected 1.0, "
                                  "found ",
                                  it->dump(), ")"));
    }
  }
  RETURN_IF_ERROR(r.Bool(j, "tie_word_embeddings", &c.tie_word_embeddings));
  switch (c.architecture) {
    case Architecture::kLlama: {
      bool bias = false;
      RETURN_IF_ERROR(r.Bool(j, "attention_bias", &bias));
      c.attention_bias = c.o_proj_bias = bias;
      RETURN_IF_ERROR(r.Bool(j, "mlp_bias", &c.mlp_bias));
      break;
    }
    case Architecture::kQwen2:
      c.attention_bias = true;
      break;
    case Architecture::kMistral:
    case Architecture::kPhi3:
      break;
  }
  // Sliding-window attention: Mistral uses it whenever set; Qwen2 only when
  // use_sliding_window is true.
  if (auto it = j.find("sliding_window"); it != j.end() && it->is_number_integer()) {
    bool use = c.architecture == Architecture::kMistral || c.architecture == Architecture::kPhi3;
    if (c.architecture == Architecture::kQwen2)
      RETURN_IF_ERROR(r.Bool(j, "use_sliding_window", &use));
    if (use && it->get<int64_t>() > 0) c.sliding_window = it->get<int64_t>();
  }
  std::vector<int64_t> bos;
  RETURN_IF_ERROR(r.TokenIds("bos_token_id", &bos));
  if (!bos.empty()) c.bos_token_id = bos[0];
  RETURN_IF_ERROR(r.TokenIds("eos_token_id", &c.eos_token_ids));
  if (auto it = j.find("torch_dtype"); it != j.end() && it->is_string()) {
    c.torch_dtype = it->get<std::string>();
  } else if (auto d = j.find("dtype"); d != j.end() && d->is_string()) {
    c.torch_dtype = d->get<std::string>();
  }
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  ASSIGN_OR_RETURN(std::string text, common::ReadFileToString(path));
  return ParseModelConfig(text, path);
}

}  // namespace fedlora::edge
