#include "common/export/gguf_llama.h"

#include <cctype>
#include <cerrno>
#include <cmath>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/crypto/crypto.h"
#include "common/status/status.h"

namespace fedlora::common {
namespace {

// ggml's llama file types (general.file_type).
uint32_t FileType(GgmlType t) {
  switch (t) {
    case GgmlType::kF32:
      return 0;
    case GgmlType::kF16:
      return 1;
    case GgmlType::kQ4_0:
      return 2;
    case GgmlType::kQ8_0:
      return 7;
  }
  return 0;
}

// llama.cpp token types.
constexpr int32_t kTokenNormal = 1;
constexpr int32_t kTokenControl = 3;
constexpr int32_t kTokenUserDefined = 4;
constexpr int32_t kTokenUnused = 5;

constexpr char kLlama3Regex[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
constexpr char kQwen2Regex[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

absl::StatusOr<nlohmann::json> ReadJson(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": expected a JSON object"));
  }
  return j;
}

absl::StatusOr<int64_t> IntField(const nlohmann::json& j, const std::string& path,
                                 const char* field, int64_t min_value) {
  if (!j.contains(field) || !j[field].is_number_integer()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": field '", field, "': expected an integer"));
  }
  const int64_t v = j[field].get<int64_t>();
  if (v < min_value || v > (int64_t{1} << 31)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": field '", field, "': expected >= ", min_value, ", found ", v));
  }
  return v;
}

// Finds the Split regex (if any) and whether a ByteLevel pre-tokenizer uses
// GPT-2's built-in regex.
void ScanPreTokenizer(const nlohmann::json& p, std::string* split_regex, bool* bytelevel_regex,
                      bool* bytelevel) {
  if (!p.is_object()) return;
  const std::string type = p.value("type", "");
  if (type == "Sequence" && p.contains("pretokenizers") && p["pretokenizers"].is_array()) {
    for (const auto& q : p["pretokenizers"])
      ScanPreTokenizer(q, split_regex, bytelevel_regex, bytelevel);
  } else if (type == "Split" && p.contains("pattern") && p["pattern"].is_object() &&
             p["pattern"].contains("Regex") && p["pattern"]["Regex"].is_string()) {
    *split_regex = p["pattern"]["Regex"].get<std::string>();
  } else if (type == "ByteLevel") {
    *bytelevel = true;
    *bytelevel_regex = p.value("use_regex", true);
  }
}

bool PrependsSpecialToken(const nlohmann::json& p) {
  if (!p.is_object()) return false;
  const std::string type = p.value("type", "");
  if (type == "Sequence" && p.contains("processors") && p["processors"].is_array()) {
    for (const auto& q : p["processors"]) {
      if (PrependsSpecialToken(q)) return true;
    }
    return false;
  }
  if (type == "TemplateProcessing" && p.contains("single") && p["single"].is_array() &&
      !p["single"].empty()) {
    return p["single"][0].is_object() && p["single"][0].contains("SpecialToken");
  }
  return false;
}

absl::Status AddTokenizer(GgufWriter* w, const std::string& path, const LlamaHParams& hp) {
  ASSIGN_OR_RETURN(nlohmann::json j, ReadJson(path));
  auto bad = [&](const std::string& field, const std::string& msg) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": field '", field, "': ", msg));
  };
  if (!j.contains("model") || !j["model"].is_object()) return bad("model", "expected an object");
  const nlohmann::json& model = j["model"];
  if (model.value("type", "") != "BPE") return bad("model.type", "expected \"BPE\"");
  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    return bad("model.vocab", "expected an object of token -> id");
  }
  std::string split_regex;
  bool bytelevel_regex = false, bytelevel = false;
  if (j.contains("pre_tokenizer")) {
    ScanPreTokenizer(j["pre_tokenizer"], &split_regex, &bytelevel_regex, &bytelevel);
  }
  if (!bytelevel) {
    return bad("pre_tokenizer", "expected a ByteLevel pre-tokenizer (byte-level BPE)");
  }
  std::string pre;
  if (split_regex == kLlama3Regex) {
    pre = "llama-bpe";
  } else if (split_regex == kQwen2Regex) {
    pre = "qwen2";
  } else if (split_regex.empty() && bytelevel_regex) {
    pre = "gpt-2";  // llama.cpp spells the GPT-2 pre-tokenizer "gpt-2"
  } else {
    return bad(
        "pre_tokenizer",
        absl::StrCat("unsupported split regex (known: Llama-3, Qwen2, GPT-2): ", split_regex));
  }

  std::map<int64_t, std::pair<std::string, int32_t>> by_id;
  for (const auto& [tok, id] : model["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= (1 << 24)) {
      return bad(absl::StrCat("model.vocab[", tok, "]"), "expected an id in 0..2^24");
    }
    by_id[id.get<int64_t>()] = {tok, kTokenNormal};
  }
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (const auto& t : j["added_tokens"]) {
      if (!t.is_object() || !t.contains("id") || !t["id"].is_number_integer() ||
          !t.contains("content") || !t["content"].is_string()) {
        return bad("added_tokens", "expected {id, content, special} objects");
      }
      const int64_t id = t["id"].get<int64_t>();
      if (id < 0 || id >= (1 << 24)) return bad("added_tokens", "id out of range");
      const bool special = t.value("special", false);
      by_id[id] = {t["content"].get<std::string>(), special ? kTokenControl : kTokenUserDefined};
    }
  }
  const int64_t n_tok = by_id.empty() ? 0 : by_id.rbegin()->first + 1;
  const int64_t n_vocab = std::max(n_tok, hp.n_vocab);
  if (n_tok > hp.n_vocab) {
    return bad("model.vocab",
               absl::StrCat("has ids up to ", n_tok - 1, " but config vocab_size is ", hp.n_vocab));
  }
  std::vector<std::string> tokens(static_cast<size_t>(n_vocab));
  std::vector<int32_t> types(static_cast<size_t>(n_vocab), kTokenUnused);
  for (int64_t i = 0; i < n_vocab; ++i) tokens[i] = absl::StrCat("[PAD", i, "]");
  for (auto& [id, tt] : by_id) {
    tokens[id] = tt.first;
    types[id] = tt.second;
  }
  std::vector<std::string> merges;
  if (model.contains("merges") && model["merges"].is_array()) {
    for (const auto& m : model["merges"]) {
      if (m.is_string()) {
        merges.push_back(m.get<std::string>());
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
      } else {
        return bad("model.merges", "expected \"a b\" strings or [\"a\", \"b\"] pairs");
      }
    }
  }
  w->Set("tokenizer.ggml.model", GgufValue::Str("gpt2"));
  w->Set("tokenizer.ggml.pre", GgufValue::Str(pre));
  w->Set("tokenizer.ggml.tokens", GgufValue::StrArray(tokens));
  w->Set("tokenizer.ggml.token_type", GgufValue::I32Array(types));
  w->Set("tokenizer.ggml.merges", GgufValue::StrArray(merges));
  if (hp.bos_id >= 0 && hp.bos_id < n_vocab) {
    w->Set("tokenizer.ggml.bos_token_id", GgufValue::U32(static_cast<uint32_t>(hp.bos_id)));
  }
  if (hp.eos_id >= 0 && hp.eos_id < n_vocab) {
    w->Set("tokenizer.ggml.eos_token_id", GgufValue::U32(static_cast<uint32_t>(hp.eos_id)));
  }
  const bool add_bos = j.contains("post_processor") && PrependsSpecialToken(j["post_processor"]);
  w->Set("tokenizer.ggml.add_bos_token", GgufValue::Bool(add_bos));
  w->Set("tokenizer.ggml.add_eos_token", GgufValue::Bool(false));
  return absl::OkStatus();
}

// Which GGUF type a 2-D weight gets: quantized types need 32 | row length.
GgmlType WeightType(GgmlType want, int64_t row) {
  if ((want == GgmlType::kQ4_0 || want == GgmlType::kQ8_0) &&
      row % static_cast<int64_t>(kGgmlBlockValues) != 0) {
    return GgmlType::kF16;
  }
  return want;
}

std::string ShapeStr(const std::vector<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ","), "]");
}

}  // namespace

absl::StatusOr<LlamaHParams> ReadLlamaHParams(const std::string& path) {
  ASSIGN_OR_RETURN(nlohmann::json j, ReadJson(path));
  const std::string model_type = j.value("model_type", "");
  if (model_type != "llama" && model_type != "qwen2" && model_type != "mistral" &&
      model_type != "phi3") {
    return absl::InvalidArgumentError(
        absl::StrCat(path,
                     ": field 'model_type': expected \"llama\", \"mistral\", \"qwen2\" or "
                     "\"phi3\", found \"",
                     model_type, "\""));
  }
  LlamaHParams hp;
  // Mistral is llama.cpp's llama architecture (its converter does the same).
  hp.arch = model_type == "mistral" ? "llama" : model_type;
  hp.qkv_bias = model_type == "qwen2" || j.value("attention_bias", false);
  if (hp.qkv_bias && model_type != "qwen2") {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": field 'attention_bias': llama.cpp's ", hp.arch,
                     " architecture has no q/k/v biases"));
  }
  if (hp.arch == "phi3" && j.contains("sliding_window") && j["sliding_window"].is_number_integer()) {
    hp.sliding_window = j["sliding_window"].get<int64_t>();
  }
  ASSIGN_OR_RETURN(hp.n_vocab, IntField(j, path, "vocab_size", 1));
  ASSIGN_OR_RETURN(hp.n_embd, IntField(j, path, "hidden_size", 1));
  ASSIGN_OR_RETURN(hp.n_layer, IntField(j, path, "num_hidden_layers", 1));
  ASSIGN_OR_RETURN(hp.n_ff, IntField(j, path, "intermediate_size", 1));
  ASSIGN_OR_RETURN(hp.n_head, IntField(j, path, "num_attention_heads", 1));
  hp.n_head_kv = hp.n_head;
  if (j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()) {
    ASSIGN_OR_RETURN(hp.n_head_kv, IntField(j, path, "num_key_value_heads", 1));
  }
  if (hp.n_head % hp.n_head_kv != 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": num_attention_heads ", hp.n_head,
                                                   " is not a multiple of num_key_value_heads ",
                                                   hp.n_head_kv));
  }
  hp.head_dim = hp.n_embd / hp.n_head;
  if (j.contains("head_dim") && !j["head_dim"].is_null()) {
    ASSIGN_OR_RETURN(hp.head_dim, IntField(j, path, "head_dim", 2));
  }
  if (hp.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": head_dim ", hp.head_dim, " must be even"));
  }
  hp.n_ctx = 2048;
  if (j.contains("max_position_embeddings")) {
    ASSIGN_OR_RETURN(hp.n_ctx, IntField(j, path, "max_position_embeddings", 1));
  }
  if (j.contains("rms_norm_eps") && j["rms_norm_eps"].is_number()) {
    hp.rms_eps = j["rms_norm_eps"].get<double>();
  }
  // transformers >= 5 keeps rope settings in rope_parameters, older in rope_theta/rope_scaling.
  const nlohmann::json* scaling = nullptr;
  std::string scaling_field;
  for (const char* f : {"rope_parameters", "rope_scaling"}) {
    if (j.contains(f) && j[f].is_object()) {
      scaling = &j[f];
      scaling_field = f;
      break;
    }
  }
  if (j.contains("rope_theta") && j["rope_theta"].is_number())
    hp.rope_theta = j["rope_theta"].get<double>();
  if (scaling != nullptr) {
    if (scaling->contains("rope_theta") && (*scaling)["rope_theta"].is_number()) {
      hp.rope_theta = (*scaling)["rope_theta"].get<double>();
    }
    const nlohmann::json& sc = *scaling;
    std::string rt = "default";
    for (const char* key : {"rope_type", "type"}) {
      if (sc.contains(key) && sc[key].is_string()) {
        rt = sc[key].get<std::string>();
        break;
      }
    }
    if (rt != "default" && rt != "llama3") {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": field '", scaling_field, ".rope_type': \"", rt,
                       "\" RoPE scaling is not supported (\"default\" or \"llama3\")"));
    }
    if (rt == "llama3") {
      if (hp.arch != "llama") {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": field 'rope_type': \"llama3\" RoPE scaling is only supported for the llama "
                  "architecture, found model_type \"", hp.arch, "\""));
      }
      auto number = [&](const char* field, double* v) -> absl::Status {
        if (!sc.contains(field) || !sc[field].is_number() || !(sc[field].get<double>() > 0)) {
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": field '", scaling_field, ".", field,
                           "': expected a positive number for llama3 RoPE scaling, found ",
                           sc.contains(field) ? sc[field].dump() : std::string("nothing")));
        }
        *v = sc[field].get<double>();
        return absl::OkStatus();
      };
      hp.rope_llama3 = true;
      RETURN_IF_ERROR(number("factor", &hp.rope_factor));
      RETURN_IF_ERROR(number("low_freq_factor", &hp.rope_low_freq_factor));
      RETURN_IF_ERROR(number("high_freq_factor", &hp.rope_high_freq_factor));
      double original = 0;
      RETURN_IF_ERROR(number("original_max_position_embeddings", &original));
      hp.rope_original_ctx = static_cast<int64_t>(original);
      if (static_cast<double>(hp.rope_original_ctx) != original) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": field '", scaling_field,
            ".original_max_position_embeddings': expected an integer, found ", original));
      }
      if (!(hp.rope_high_freq_factor > hp.rope_low_freq_factor)) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": field '", scaling_field, ".high_freq_factor': expected > low_freq_factor (",
            hp.rope_low_freq_factor, "), found ", hp.rope_high_freq_factor));
      }
    } else if (rt != "default") {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": field 'rope_type': expected \"default\" or \"llama3\", found \"",
                       rt, "\""));
    }
  }
  hp.tie_embeddings = j.value("tie_word_embeddings", false);
  if (j.contains("bos_token_id") && j["bos_token_id"].is_number_integer()) {
    hp.bos_id = j["bos_token_id"].get<int64_t>();
  }
  if (j.contains("eos_token_id") && j["eos_token_id"].is_number_integer()) {
    hp.eos_id = j["eos_token_id"].get<int64_t>();
  } else if (j.contains("eos_token_id") && j["eos_token_id"].is_array() &&
             !j["eos_token_id"].empty() && j["eos_token_id"][0].is_number_integer()) {
    hp.eos_id = j["eos_token_id"][0].get<int64_t>();
  }
  return hp;
}

std::vector<float> Llama3RopeFactors(const LlamaHParams& hp) {
  std::vector<float> factors;
  if (!hp.rope_llama3) return factors;
  const double original = static_cast<double>(hp.rope_original_ctx);
  const double low_wavelen = original / hp.rope_low_freq_factor;
  const double high_wavelen = original / hp.rope_high_freq_factor;
  for (int64_t i = 0; i < hp.head_dim / 2; ++i) {
    const double freq =
        1.0 / std::pow(hp.rope_theta, static_cast<double>(2 * i) / static_cast<double>(hp.head_dim));
    const double wavelen = 2.0 * M_PI / freq;
    double f;
    if (wavelen < high_wavelen) {
      f = 1.0;
    } else if (wavelen > low_wavelen) {
      f = hp.rope_factor;
    } else {
      const double smooth = (original / wavelen - hp.rope_low_freq_factor) /
                            (hp.rope_high_freq_factor - hp.rope_low_freq_factor);
      f = 1.0 / ((1.0 - smooth) / hp.rope_factor + smooth);
    }
    factors.push_back(static_cast<float>(f));
  }
  return factors;
}

absl::StatusOr<HostTensor> PermuteQkRows(const HostTensor& w, int64_t n_head) {
  if (w.shape.size() != 2 || n_head < 1 || w.shape[0] % (2 * n_head) != 0 ||
      w.numel() != static_cast<int64_t>(w.data.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("Q/K permutation: expected [n_head*even, cols] with n_head ", n_head,
                     ", found ", ShapeStr(w.shape)));
  }
  const int64_t rows = w.shape[0], cols = w.shape[1];
  const int64_t hd = rows / n_head, half = hd / 2;
  HostTensor out = w;
  for (int64_t h = 0; h < n_head; ++h) {
    for (int64_t i = 0; i < half; ++i) {
      for (int64_t part = 0; part < 2; ++part) {
        const int64_t src = h * hd + part * half + i;
        const int64_t dst = h * hd + 2 * i + part;
        std::copy(w.data.begin() + src * cols, w.data.begin() + (src + 1) * cols,
                  out.data.begin() + dst * cols);
      }
    }
  }
  return out;
}

absl::StatusOr<std::string> LlamaGgufTensorName(const std::string& hf) {
  if (hf == "model.embed_tokens.weight") return std::string("token_embd.weight");
  if (hf == "model.norm.weight") return std::string("output_norm.weight");
  if (hf == "lm_head.weight") return std::string("output.weight");
  static const std::pair<const char*, const char*> kLayer[] = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"self_attn.q_proj.bias", "attn_q.bias"},
      {"self_attn.k_proj.bias", "attn_k.bias"},
      {"self_attn.v_proj.bias", "attn_v.bias"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"},
      // Phi-3's fused projections.
      {"self_attn.qkv_proj.weight", "attn_qkv.weight"},
      {"mlp.gate_up_proj.weight", "ffn_up.weight"},
  };
  const std::string kPrefix = "model.layers.";
  if (hf.rfind(kPrefix, 0) == 0) {
    size_t p = kPrefix.size(), q = p;
    while (q < hf.size() && std::isdigit(static_cast<unsigned char>(hf[q]))) ++q;
    if (q > p && q - p <= 6 && q < hf.size() && hf[q] == '.') {
      const std::string rest = hf.substr(q + 1);
      for (const auto& [from, to] : kLayer) {
        if (rest == from) return absl::StrCat("blk.", hf.substr(p, q - p), ".", to);
      }
    }
  }
  return absl::NotFoundError(absl::StrCat("no llama.cpp tensor for HF weight '", hf, "'"));
}

absl::Status MergeLora(TensorMap* base, const TensorMap& adapter, const PeftLoraConfig& config) {
  ASSIGN_OR_RETURN(std::vector<LoraPair> pairs, CollectLoraPairs(adapter, config));
  const float scale = static_cast<float>(config.Scale());
  for (const LoraPair& p : pairs) {
    const std::string wname = p.module_path + ".weight";
    auto it = base->find(wname);
    if (it == base->end()) {
      return absl::InvalidArgumentError(absl::StrCat("LoRA merge: adapter module ", p.module_path,
                                                     " has no base weight '", wname, "'"));
    }
    HostTensor& w = it->second;
    const int64_t r = p.a->shape[0], in = p.a->shape[1], out = p.b->shape[0];
    if (w.shape.size() != 2 || w.shape[0] != out || w.shape[1] != in) {
      return absl::InvalidArgumentError(absl::StrCat("LoRA merge: '", wname, "' is ",
                                                     ShapeStr(w.shape), " but B @ A is [", out, ",",
                                                     in, "]"));
    }
    const float* a = p.a->data.data();
    const float* b = p.b->data.data();
    for (int64_t o = 0; o < out; ++o) {
      float* row = w.data.data() + o * in;
      for (int64_t k = 0; k < r; ++k) {
        const float s = scale * b[o * r + k];
        const float* arow = a + k * in;
        for (int64_t i = 0; i < in; ++i) row[i] += s * arow[i];
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<GgufWriter> BuildLlamaGguf(const std::string& hf_dir, const LlamaGgufOptions& opt) {
  ASSIGN_OR_RETURN(LlamaHParams hp, ReadLlamaHParams(hf_dir + "/config.json"));
  ASSIGN_OR_RETURN(auto st, SafetensorsFile::Open(hf_dir + "/model.safetensors"));
  ASSIGN_OR_RETURN(TensorMap weights, st->ToTensorMap());
  if (opt.lora != nullptr) {
    if (opt.lora_config == nullptr) {
      return absl::InvalidArgumentError("BuildLlamaGguf: lora given without lora_config");
    }
    RETURN_IF_ERROR(MergeLora(&weights, *opt.lora, *opt.lora_config));
  }
  GgufWriter w;
  const std::string& a = hp.arch;
  w.Set("general.architecture", GgufValue::Str(a));
  w.Set("general.type", GgufValue::Str("model"));
  w.Set("general.name", GgufValue::Str(opt.name));
  w.Set("general.file_type", GgufValue::U32(FileType(opt.type)));
  w.Set("general.quantization_version", GgufValue::U32(2));
  w.Set(a + ".vocab_size", GgufValue::U32(static_cast<uint32_t>(hp.n_vocab)));
  w.Set(a + ".context_length", GgufValue::U32(static_cast<uint32_t>(hp.n_ctx)));
  w.Set(a + ".embedding_length", GgufValue::U32(static_cast<uint32_t>(hp.n_embd)));
  w.Set(a + ".block_count", GgufValue::U32(static_cast<uint32_t>(hp.n_layer)));
  w.Set(a + ".feed_forward_length", GgufValue::U32(static_cast<uint32_t>(hp.n_ff)));
  w.Set(a + ".attention.head_count", GgufValue::U32(static_cast<uint32_t>(hp.n_head)));
  w.Set(a + ".attention.head_count_kv", GgufValue::U32(static_cast<uint32_t>(hp.n_head_kv)));
  w.Set(a + ".attention.key_length", GgufValue::U32(static_cast<uint32_t>(hp.head_dim)));
  w.Set(a + ".attention.value_length", GgufValue::U32(static_cast<uint32_t>(hp.head_dim)));
  w.Set(a + ".rope.freq_base", GgufValue::F32(static_cast<float>(hp.rope_theta)));
  w.Set(a + ".rope.dimension_count", GgufValue::U32(static_cast<uint32_t>(hp.head_dim)));
  w.Set(a + ".attention.layer_norm_rms_epsilon", GgufValue::F32(static_cast<float>(hp.rms_eps)));
  if (hp.sliding_window > 0) {
    w.Set(a + ".attention.sliding_window", GgufValue::U32(static_cast<uint32_t>(hp.sliding_window)));
  }
  RETURN_IF_ERROR(AddTokenizer(&w, hf_dir + "/tokenizer.json", hp));
  if (hp.rope_llama3) {
    // llama.cpp's converter emits it first, before the weights; always F32.
    HostTensor rope;
    rope.data = Llama3RopeFactors(hp);
    rope.shape = {static_cast<int64_t>(rope.data.size())};
    RETURN_IF_ERROR(w.AddTensor("rope_freqs.weight", rope, GgmlType::kF32));
  }

  // Expected shapes, so a checkpoint that disagrees with config.json fails here
  // (llama.cpp would refuse the file later with a less precise message).
  const int64_t q_rows = hp.n_head * hp.head_dim, kv_rows = hp.n_head_kv * hp.head_dim;
  auto expect = [&](const std::string& gg) -> std::vector<int64_t> {
    auto ends = [&](const char* s) {
      const std::string t = s;
      return gg.size() >= t.size() && gg.compare(gg.size() - t.size(), t.size(), t) == 0;
    };
    if (gg == "token_embd.weight" || gg == "output.weight") return {hp.n_vocab, hp.n_embd};
    if (ends("norm.weight")) return {hp.n_embd};
    if (ends("attn_q.bias")) return {q_rows};
    if (ends("attn_k.bias") || ends("attn_v.bias")) return {kv_rows};
    if (ends("attn_q.weight")) return {q_rows, hp.n_embd};
    if (ends("attn_k.weight") || ends("attn_v.weight")) return {kv_rows, hp.n_embd};
    if (ends("attn_output.weight")) return {hp.n_embd, q_rows};
    if (ends("attn_qkv.weight")) return {q_rows + 2 * kv_rows, hp.n_embd};
    if (hp.arch == "phi3" && ends("ffn_up.weight")) return {2 * hp.n_ff, hp.n_embd};
    if (ends("ffn_gate.weight") || ends("ffn_up.weight")) return {hp.n_ff, hp.n_embd};
    if (ends("ffn_down.weight")) return {hp.n_embd, hp.n_ff};
    return {};
  };
  // Emit in llama.cpp's conventional order: token_embd, blocks, output_norm, output.
  std::vector<std::pair<std::string, std::string>> order;  // gguf name, hf name
  order.emplace_back("token_embd.weight", "model.embed_tokens.weight");
  static const char* kBlock[][2] = {
      {"attn_norm", "input_layernorm"},    {"attn_q", "self_attn.q_proj"},
      {"attn_k", "self_attn.k_proj"},      {"attn_v", "self_attn.v_proj"},
      {"attn_output", "self_attn.o_proj"}, {"ffn_norm", "post_attention_layernorm"},
      {"ffn_gate", "mlp.gate_proj"},       {"ffn_up", "mlp.up_proj"},
      {"ffn_down", "mlp.down_proj"}};
  // Phi-3: fused q/k/v and gate/up (llama.cpp's phi3 splits them when it loads).
  static const char* kPhi3Block[][2] = {
      {"attn_norm", "input_layernorm"},  {"attn_qkv", "self_attn.qkv_proj"},
      {"attn_output", "self_attn.o_proj"}, {"ffn_norm", "post_attention_layernorm"},
      {"ffn_up", "mlp.gate_up_proj"},    {"ffn_down", "mlp.down_proj"}};
  const bool phi3 = hp.arch == "phi3";
  const auto* block = phi3 ? kPhi3Block : kBlock;
  const size_t block_len = phi3 ? std::size(kPhi3Block) : std::size(kBlock);
  for (int64_t l = 0; l < hp.n_layer; ++l) {
    for (size_t i = 0; i < block_len; ++i) {
      const auto& b = block[i];
      order.emplace_back(absl::StrCat("blk.", l, ".", b[0], ".weight"),
                         absl::StrCat("model.layers.", l, ".", b[1], ".weight"));
      const std::string part = b[0];
      if (hp.qkv_bias && (part == "attn_q" || part == "attn_k" || part == "attn_v")) {
        order.emplace_back(absl::StrCat("blk.", l, ".", b[0], ".bias"),
                           absl::StrCat("model.layers.", l, ".", b[1], ".bias"));
      }
    }
  }
  order.emplace_back("output_norm.weight", "model.norm.weight");
  if (weights.count("lm_head.weight") != 0 && !hp.tie_embeddings) {
    order.emplace_back("output.weight", "lm_head.weight");
  }
  for (const auto& [gg, hf] : order) {
    auto it = weights.find(hf);
    if (it == weights.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(hf_dir, "/model.safetensors: missing tensor '", hf, "'"));
    }
    HostTensor t = std::move(it->second);
    weights.erase(it);
    if (t.shape != expect(gg)) {
      return absl::InvalidArgumentError(
          absl::StrCat(hf_dir, "/model.safetensors: tensor '", hf, "': expected shape ",
                       ShapeStr(expect(gg)), " from config.json, found ", ShapeStr(t.shape)));
    }
    if (hp.arch == "llama" && gg.find("attn_q.weight") != std::string::npos) {
      ASSIGN_OR_RETURN(t, PermuteQkRows(t, hp.n_head));
    } else if (hp.arch == "llama" && gg.find("attn_k.weight") != std::string::npos) {
      ASSIGN_OR_RETURN(t, PermuteQkRows(t, hp.n_head_kv));
    }
    const GgmlType type = t.shape.size() == 1 ? GgmlType::kF32 : WeightType(opt.type, t.shape[1]);
    RETURN_IF_ERROR(w.AddTensor(gg, t, type));
  }
  std::vector<std::string> extra;
  for (const auto& [name, t] : weights) {
    const bool tied_head = name == "lm_head.weight" && hp.tie_embeddings;
    if (!tied_head && name.find("rotary_emb.inv_freq") == std::string::npos) extra.push_back(name);
  }
  if (!extra.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(hf_dir, "/model.safetensors: tensors llama.cpp's ", hp.arch,
                     " architecture has no place for: ", absl::StrJoin(extra, ", ")));
  }
  return w;
}

absl::Status ConvertHfLlamaToGguf(const std::string& hf_dir, const std::string& out_path,
                                  const LlamaGgufOptions& options) {
  ASSIGN_OR_RETURN(GgufWriter w, BuildLlamaGguf(hf_dir, options));
  return w.WriteFile(out_path);
}

absl::StatusOr<GgufWriter> BuildLoraGguf(const std::string& hf_dir, const TensorMap& adapter,
                                         const PeftLoraConfig& config, GgmlType type) {
  if (type != GgmlType::kF32 && type != GgmlType::kF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("LoRA GGUF: expected type F32 or F16, found ", GgmlTypeName(type)));
  }
  ASSIGN_OR_RETURN(LlamaHParams hp, ReadLlamaHParams(hf_dir + "/config.json"));
  ASSIGN_OR_RETURN(std::vector<LoraPair> pairs, CollectLoraPairs(adapter, config));
  if (pairs.empty()) return absl::InvalidArgumentError("LoRA GGUF: the adapter has no LoRA pairs");
  GgufWriter w;
  w.Set("general.architecture", GgufValue::Str(hp.arch));
  w.Set("general.type", GgufValue::Str("adapter"));
  w.Set("general.name", GgufValue::Str("fedlora-adapter"));
  w.Set("general.file_type", GgufValue::U32(FileType(type)));
  w.Set("adapter.type", GgufValue::Str("lora"));
  // llama.cpp applies alpha / r; rsLoRA's alpha / sqrt(r) is alpha*sqrt(r) / r.
  const double alpha = config.use_rslora
                           ? config.lora_alpha * std::sqrt(static_cast<double>(config.r))
                           : config.lora_alpha;
  w.Set("adapter.lora.alpha", GgufValue::F32(static_cast<float>(alpha)));
  for (const LoraPair& p : pairs) {
    if (p.layer >= hp.n_layer) {
      return absl::InvalidArgumentError(
          absl::StrCat("LoRA GGUF: module ", p.module_path, " is beyond block_count ", hp.n_layer));
    }
    ASSIGN_OR_RETURN(std::string gg, LlamaGgufTensorName(p.module_path + ".weight"));
    HostTensor b = *p.b;
    if (hp.arch == "llama" && p.module == "q_proj") {
      ASSIGN_OR_RETURN(b, PermuteQkRows(b, hp.n_head));
    } else if (hp.arch == "llama" && p.module == "k_proj") {
      ASSIGN_OR_RETURN(b, PermuteQkRows(b, hp.n_head_kv));
    }
    RETURN_IF_ERROR(w.AddTensor(gg + ".lora_a", *p.a, type));
    RETURN_IF_ERROR(w.AddTensor(gg + ".lora_b", b, type));
  }
  return w;
}

absl::Status ExportLoraGguf(const std::string& hf_dir, const TensorMap& adapter,
                            const PeftLoraConfig& config, const std::string& out_path,
                            GgmlType type) {
  ASSIGN_OR_RETURN(GgufWriter w, BuildLoraGguf(hf_dir, adapter, config, type));
  return w.WriteFile(out_path);
}

}  // namespace fedlora::common
