#include "simulations/model_maker.h"

#include <cmath>
#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/crypto/crypto.h"
#include "common/status/status.h"
#include "common/tensor/tensor.h"
#include "nlohmann/json.hpp"
#include "simulations/bpe_trainer.h"
#include "simulations/data_maker.h"

namespace fedlora::sim {
namespace {

// N(0, 1) by Box-Muller on mt19937_64 output (std::normal_distribution is
// implementation-defined; this is the same everywhere).
class Gaussian {
 public:
  explicit Gaussian(uint64_t seed) : engine_(seed) {}
  float Next() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    constexpr double kTwoPi = 6.283185307179586476925286766559;
    double u1 = (static_cast<double>(engine_() >> 11) + 0.5) * 0x1.0p-53;  // (0, 1)
    double u2 = static_cast<double>(engine_() >> 11) * 0x1.0p-53;          // [0, 1)
    double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = static_cast<float>(r * std::sin(kTwoPi * u2));
    has_spare_ = true;
    return static_cast<float>(r * std::cos(kTwoPi * u2));
  }

 private:
  std::mt19937_64 engine_;
  bool has_spare_ = false;
  float spare_ = 0;
};

common::HostTensor Normal(Gaussian& g, int64_t rows, int64_t cols, float std) {
  common::HostTensor t;
  t.shape = {rows, cols};
  t.data.resize(static_cast<size_t>(rows * cols));
  for (float& v : t.data) v = g.Next() * std;
  return t;
}

common::HostTensor Ones(int64_t n) {
  common::HostTensor t;
  t.shape = {n};
  t.data.assign(static_cast<size_t>(n), 1.0f);
  return t;
}

struct TokenizerFacts {
  int vocab_size = 0;
  int bos = -1;
  int eos = -1;
  int pad = -1;
};

absl::StatusOr<TokenizerFacts> ReadTokenizerFacts(const std::string& json_text) {
  nlohmann::json j = nlohmann::json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InternalError("tokenizer trainer returned text that is not a JSON object");
  }
  TokenizerFacts facts;
  int max_id = -1;
  if (!j.contains("model") || !j["model"].contains("vocab") || !j["model"]["vocab"].is_object()) {
    return absl::InternalError("tokenizer.json from the trainer has no model.vocab object");
  }
  for (const auto& [token, id] : j["model"]["vocab"].items()) {
    if (!id.is_number_integer()) {
      return absl::InternalError(
          absl::StrCat("tokenizer.json model.vocab[\"", token, "\"] is not an integer"));
    }
    max_id = std::max(max_id, id.get<int>());
  }
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (const auto& t : j["added_tokens"]) {
      if (!t.contains("id") || !t["id"].is_number_integer() || !t.contains("content") ||
          !t["content"].is_string()) {
        return absl::InternalError("tokenizer.json added_tokens entry without id/content");
      }
      int id = t["id"].get<int>();
      max_id = std::max(max_id, id);
      const std::string content = t["content"].get<std::string>();
      if (content == kBosToken) facts.bos = id;
      if (content == kEosToken) facts.eos = id;
      if (content == kPadToken) facts.pad = id;
    }
  }
  // Specials may also live only in model.vocab.
  auto& vocab = j["model"]["vocab"];
  if (facts.bos < 0 && vocab.contains(kBosToken)) facts.bos = vocab[kBosToken].get<int>();
  if (facts.eos < 0 && vocab.contains(kEosToken)) facts.eos = vocab[kEosToken].get<int>();
  if (facts.pad < 0 && vocab.contains(kPadToken)) facts.pad = vocab[kPadToken].get<int>();
  if (facts.bos < 0 || facts.eos < 0 || facts.pad < 0) {
    return absl::InternalError(absl::StrFormat(
        "tokenizer.json lacks a special token: %s=%d %s=%d %s=%d", kBosToken, facts.bos,
        kEosToken, facts.eos, kPadToken, facts.pad));
  }
  facts.vocab_size = max_id + 1;
  return facts;
}

absl::Status CheckOptions(const TinyModelOptions& o) {
  const std::pair<const char*, int> sizes[] = {
      {"hidden_size", o.hidden_size},       {"intermediate_size", o.intermediate_size},
      {"num_layers", o.num_layers},         {"num_heads", o.num_heads},
      {"num_kv_heads", o.num_kv_heads},     {"head_dim", o.head_dim},
      {"vocab_size", o.vocab_size},         {"max_position_embeddings", o.max_position_embeddings},
  };
  for (const auto& [name, value] : sizes) {
    if (value <= 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("MakeTinyModel: %s must be > 0, got %d", name, value));
    }
  }
  if (o.num_heads % o.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "MakeTinyModel: num_heads (%d) must be a multiple of num_kv_heads (%d)", o.num_heads,
        o.num_kv_heads));
  }
  if (o.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("MakeTinyModel: head_dim must be even (rotary), got %d", o.head_dim));
  }
  if (!(o.init_std > 0) || !(o.rope_theta > 0) || !(o.rms_norm_eps > 0)) {
    return absl::InvalidArgumentError(
        "MakeTinyModel: init_std, rope_theta and rms_norm_eps must be > 0");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TinyModelInfo> MakeTinyModel(const std::string& out_dir,
                                            const TinyModelOptions& options) {
  RETURN_IF_ERROR(CheckOptions(options));
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat("MakeTinyModel: cannot create directory ", out_dir, ": ", ec.message()));
  }

  // Tokenizer first: it fixes the vocabulary size.
  std::vector<std::string> corpus = options.corpus;
  if (corpus.empty()) {
    corpus = SyntheticCorpus(options.corpus_sites, options.corpus_examples, options.seed);
  }
  ASSIGN_OR_RETURN(std::string tokenizer_json,
                   TrainByteLevelBpeTokenizerJson(corpus, options.vocab_size,
                                                  {kBosToken, kEosToken, kPadToken}));
  ASSIGN_OR_RETURN(TokenizerFacts tok, ReadTokenizerFacts(tokenizer_json));

  const int64_t hidden = options.hidden_size;
  const int64_t inter = options.intermediate_size;
  const int64_t q_dim = static_cast<int64_t>(options.num_heads) * options.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(options.num_kv_heads) * options.head_dim;
  const int64_t vocab = tok.vocab_size;
  const float std = options.init_std;

  // One generator, a fixed order of tensors: deterministic output.
  Gaussian g(options.seed ^ 0x6C6C616D61ull);  // "llama"
  common::TensorMap tensors;
  tensors["model.embed_tokens.weight"] = Normal(g, vocab, hidden, std);
  for (int layer = 0; layer < options.num_layers; ++layer) {
    const std::string p = absl::StrCat("model.layers.", layer, ".");
    tensors[p + "self_attn.q_proj.weight"] = Normal(g, q_dim, hidden, std);
    tensors[p + "self_attn.k_proj.weight"] = Normal(g, kv_dim, hidden, std);
    tensors[p + "self_attn.v_proj.weight"] = Normal(g, kv_dim, hidden, std);
    tensors[p + "self_attn.o_proj.weight"] = Normal(g, hidden, q_dim, std);
    tensors[p + "mlp.gate_proj.weight"] = Normal(g, inter, hidden, std);
    tensors[p + "mlp.up_proj.weight"] = Normal(g, inter, hidden, std);
    tensors[p + "mlp.down_proj.weight"] = Normal(g, hidden, inter, std);
    tensors[p + "input_layernorm.weight"] = Ones(hidden);
    tensors[p + "post_attention_layernorm.weight"] = Ones(hidden);
  }
  tensors["model.norm.weight"] = Ones(hidden);
  tensors["lm_head.weight"] = Normal(g, vocab, hidden, std);

  TinyModelInfo info;
  info.vocab_size = tok.vocab_size;
  info.bos_token_id = tok.bos;
  info.eos_token_id = tok.eos;
  info.pad_token_id = tok.pad;
  for (const auto& [name, t] : tensors) info.num_parameters += t.numel();

  nlohmann::ordered_json config;
  config["architectures"] = {"LlamaForCausalLM"};
  config["model_type"] = "llama";
  config["hidden_size"] = options.hidden_size;
  config["intermediate_size"] = options.intermediate_size;
  config["num_hidden_layers"] = options.num_layers;
  config["num_attention_heads"] = options.num_heads;
  config["num_key_value_heads"] = options.num_kv_heads;
  config["head_dim"] = options.head_dim;
  config["hidden_act"] = "silu";
  config["vocab_size"] = tok.vocab_size;
  config["max_position_embeddings"] = options.max_position_embeddings;
  config["rope_theta"] = options.rope_theta;
  config["rope_scaling"] = nullptr;
  config["rms_norm_eps"] = options.rms_norm_eps;
  config["attention_bias"] = false;
  config["mlp_bias"] = false;
  config["attention_dropout"] = 0.0;
  config["initializer_range"] = std::round(static_cast<double>(options.init_std) * 1e6) / 1e6;
  config["tie_word_embeddings"] = false;
  config["bos_token_id"] = tok.bos;
  config["eos_token_id"] = tok.eos;
  config["pad_token_id"] = tok.pad;
  config["torch_dtype"] = "float32";
  config["use_cache"] = true;

  nlohmann::ordered_json tokenizer_config;
  tokenizer_config["bos_token"] = kBosToken;
  tokenizer_config["eos_token"] = kEosToken;
  tokenizer_config["pad_token"] = kPadToken;
  tokenizer_config["add_bos_token"] = true;
  tokenizer_config["add_eos_token"] = false;
  tokenizer_config["model_max_length"] = options.max_position_embeddings;
  tokenizer_config["clean_up_tokenization_spaces"] = false;
  tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast";

  nlohmann::ordered_json generation;
  generation["bos_token_id"] = tok.bos;
  generation["eos_token_id"] = tok.eos;
  generation["pad_token_id"] = tok.pad;
  generation["do_sample"] = false;

  RETURN_IF_ERROR(common::WriteSafetensors(out_dir + "/model.safetensors", tensors,
                                           {{"format", "pt"}}));
  RETURN_IF_ERROR(common::WriteFileAtomic(out_dir + "/config.json", config.dump(2) + "\n"));
  RETURN_IF_ERROR(common::WriteFileAtomic(out_dir + "/tokenizer.json", tokenizer_json));
  RETURN_IF_ERROR(common::WriteFileAtomic(out_dir + "/tokenizer_config.json",
                                          tokenizer_config.dump(2) + "\n"));
  RETURN_IF_ERROR(common::WriteFileAtomic(out_dir + "/generation_config.json",
                                          generation.dump(2) + "\n"));
  return info;
}

}  // namespace fedlora::sim
