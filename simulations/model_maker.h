#pragma once
// A tiny, randomly initialised Llama checkpoint in Hugging Face layout, for
// simulations and tests (no libtorch needed to make it).
//
// MakeTinyModel(out_dir) writes:
//   config.json             LlamaForCausalLM / model_type "llama", sizes from the options,
//                           vocab_size = the tokenizer's size, bos/eos/pad ids from it,
//                           torch_dtype float32, tie_word_embeddings false
//   model.safetensors       F32, HF names: model.embed_tokens.weight [V,H],
//                           model.layers.N.self_attn.{q,k,v,o}_proj.weight,
//                           model.layers.N.mlp.{gate,up,down}_proj.weight,
//                           model.layers.N.{input,post_attention}_layernorm.weight,
//                           model.norm.weight, lm_head.weight [V,H];
//                           linear/embedding weights ~ N(0, init_std), norms = 1
//   tokenizer.json          byte-level BPE trained on the corpus (sim::TrainByteLevelBpeTokenizerJson)
//                           with specials <|begin_of_text|>, <|end_of_text|>, <|pad|>
//   tokenizer_config.json   bos/eos/pad tokens
//   generation_config.json  bos/eos/pad ids, greedy
// The output is a pure function of the options (weights from a seeded
// std::mt19937_64 with a portable Box-Muller transform). out_dir is created
// if needed; existing files of these names are replaced.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::sim {

inline constexpr char kBosToken[] = "<|begin_of_text|>";
inline constexpr char kEosToken[] = "<|end_of_text|>";
inline constexpr char kPadToken[] = "<|pad|>";

struct TinyModelOptions {
  int hidden_size = 128;
  int intermediate_size = 344;
  int num_layers = 4;
  int num_heads = 4;
  int num_kv_heads = 2;
  int head_dim = 32;
  int vocab_size = 512;  // BPE target, specials included
  int max_position_embeddings = 512;
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-5;
  float init_std = 0.02f;
  uint64_t seed = 0;
  // Tokenizer training texts; empty = SyntheticCorpus(corpus_sites, corpus_examples, seed).
  std::vector<std::string> corpus;
  int corpus_sites = 3;
  int corpus_examples = 200;
};

struct TinyModelInfo {
  int vocab_size = 0;  // as written to config.json
  int bos_token_id = -1;
  int eos_token_id = -1;
  int pad_token_id = -1;
  int64_t num_parameters = 0;
};

// InvalidArgument for non-positive sizes or num_heads % num_kv_heads != 0;
// errors of the tokenizer trainer or of file writes are passed on.
absl::StatusOr<TinyModelInfo> MakeTinyModel(const std::string& out_dir,
                                            const TinyModelOptions& options = {});

}  // namespace fedlora::sim
