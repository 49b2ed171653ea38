#pragma once
// The parts of a Hugging Face config.json the model engine needs.
//
// Supported architectures: LlamaForCausalLM, MistralForCausalLM,
// Qwen2ForCausalLM (q/k/v biases) and Phi3ForCausalLM (fused qkv_proj and
// gate_up_proj). rope_theta is read from the top level or from
// "rope_parameters" (transformers >= 5 layout); rope scaling "default",
// "linear" and "llama3" are supported, anything else is an error. Every error
// names the file and the field: what was expected and what was found.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::edge {

enum class Architecture { kLlama, kMistral, kQwen2, kPhi3 };

struct RopeScaling {
  std::string type = "default";  // "default", "linear" or "llama3"
  double factor = 1.0;
  double low_freq_factor = 1.0;                     // llama3
  double high_freq_factor = 4.0;                    // llama3
  int64_t original_max_position_embeddings = 8192;  // llama3
};

struct ModelConfig {
  Architecture architecture = Architecture::kLlama;
  std::string architecture_name;  // as in config.json, e.g. "LlamaForCausalLM"
  std::string model_type;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;  // explicit, or hidden_size / num_attention_heads
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;  // 0 = unknown
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v (and o for Llama) biases
  bool o_proj_bias = false;
  bool mlp_bias = false;
  int64_t sliding_window = 0;  // 0 = none
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;  // eos_token_id may be an int or a list
  std::string torch_dtype;             // "float32", "bfloat16", ... ("" if absent)

  // Size of the fused/unfused projections.
  int64_t q_size() const { return num_attention_heads * head_dim; }
  int64_t kv_size() const { return num_key_value_heads * head_dim; }
};

// Parses config.json text; `source` names it in errors.
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json, const std::string& source);
// Reads and parses `<model_dir>/config.json`.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

std::string_view ArchitectureName(Architecture arch);

}  // namespace fedlora::edge
