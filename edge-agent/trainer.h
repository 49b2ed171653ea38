#pragma once
// The agent-facing contract of the model engine. No libtorch types here, so
// the agent loop, the simulator and their tests include it cheaply.
//
// LocalTrainer owns one base model plus one LoRA adapter. Adapters cross this
// boundary as common::TensorMap keyed by PEFT names, e.g.
//   base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  [r, in]
//   base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight  [out, r]
// A LocalTrainer is not safe for concurrent use; one thread drives it.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/tensor/tensor.h"

namespace fedlora::edge {

struct LoraConfig {
  int rank = 8;
  float alpha = 16.0f;
  std::vector<std::string> target_modules = {"q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"};
  float dropout = 0.0f;
  bool use_rslora = false;  // scale = alpha / sqrt(r) instead of alpha / r
  uint64_t init_seed = 0;   // A ~ Kaiming-uniform(seed), B = 0 (PEFT's init)
};

// One supervised example. The loss covers `response` tokens only.
struct Example {
  std::string prompt;    // already formatted instruction (+ input)
  std::string response;  // target text
};

struct TrainOptions {
  int steps = 20;
  float learning_rate = 1e-3f;
  int batch_size = 4;
  int max_seq_len = 256;
  float weight_decay = 0.0f;
  float max_grad_norm = 1.0f;
  int warmup_steps = 0;
  uint64_t seed = 0;
};

struct TrainResult {
  double mean_loss = 0;   // mean of per-step training losses
  double last_loss = 0;
  uint64_t tokens = 0;    // tokens processed (including prompt)
  double seconds = 0;
};

struct EvalResult {
  double loss = 0;        // mean cross-entropy over response tokens
  uint64_t tokens = 0;    // response tokens scored
};

class LocalTrainer {
 public:
  virtual ~LocalTrainer() = default;

  // Hex SHA-256 of the base model directory (common::HashModelDirectory).
  virtual std::string BaseModelHash() const = 0;

  // Replaces the adapter with a fresh one (A Kaiming-uniform from init_seed, B zero).
  virtual absl::Status InitAdapter(const LoraConfig& config) = 0;
  // Replaces the adapter with the given tensors (shapes validated against the
  // model; a missing, extra or mis-shaped tensor is InvalidArgument naming it).
  virtual absl::Status SetAdapter(const LoraConfig& config, const common::TensorMap& tensors) = 0;
  virtual absl::StatusOr<common::TensorMap> GetAdapter() const = 0;

  virtual absl::StatusOr<TrainResult> Train(const std::vector<Example>& data,
                                            const TrainOptions& options) = 0;
  virtual absl::StatusOr<EvalResult> Evaluate(const std::vector<Example>& data,
                                              int max_seq_len) = 0;
};

struct EngineOptions {
  int threads = 0;               // 0 = all cores
  std::string base_dtype = "fp32";
};

// Loads a Hugging Face checkpoint folder into the libtorch engine.
absl::StatusOr<std::unique_ptr<LocalTrainer>> LoadTrainer(const std::string& model_dir,
                                                          const EngineOptions& options = {});

}  // namespace fedlora::edge
