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
#include <functional>
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

struct TrainProgress;

struct TrainOptions {
  int steps = 20;
  float learning_rate = 1e-3f;
  int batch_size = 4;
  int max_seq_len = 256;
  float weight_decay = 0.0f;
  float max_grad_norm = 1.0f;
  int warmup_steps = 0;
  uint64_t seed = 0;
  // FedProx: adds prox_mu/2 * ||w - w_start||^2 over the LoRA tensors, w_start = the
  // adapter at the start of this call (the round's base version). 0 disables.
  float prox_mu = 0.0f;
  // FFA-LoRA: the A matrices stay frozen (only B is trained and sent back).
  bool freeze_lora_a = false;
  // Gradient accumulation: each optimizer step sums the gradients of this many
  // micro-batches of batch_size examples (effective batch batch_size *
  // grad_accum_steps). The loss is the token-weighted mean over all of them, so
  // k micro-batches of b give the gradient of one batch of k*b.
  int grad_accum_steps = 1;
  // Recompute each decoder layer's activations in backward instead of keeping
  // them (less memory, about one more forward of compute).
  bool gradient_checkpointing = false;
  // Progress: every progress_every optimizer steps (and after the last one)
  // on_progress is called, or, when it is empty, one line goes to stderr.
  // 0 disables. on_progress returning false stops training: Train then returns
  // Cancelled and restores the adapter (a checkpoint, if enabled, is written first).
  int progress_every = 0;
  std::function<bool(const TrainProgress&)> on_progress;
  // Checkpoint / resume of an interrupted run: with checkpoint_path set, the
  // adapter, the AdamW state, the step, the data order and the RNG states are
  // written there atomically every checkpoint_every steps (0 = only when
  // stopped by on_progress). A Train call whose checkpoint file belongs to the
  // same run (same data, options and starting adapter) continues from it and
  // reaches the same final adapter as an uninterrupted run; a file from another
  // run is ignored and overwritten. The file is removed when training completes.
  std::string checkpoint_path;
  int checkpoint_every = 0;
  // bf16 autocast: the forward runs under libtorch's CPU autocast to bfloat16
  // (matmuls in bf16); the LoRA tensors, their gradients, the AdamW state and
  // the loss stay fp32.
  bool bf16_autocast = false;
  // Sequence packing: each micro-batch's examples are packed first-fit into
  // rows of at most max_seq_len tokens; attention does not cross example
  // boundaries (block-diagonal causal mask) and positions restart at 0 for
  // each example, so the loss equals the unpacked loss (less padding compute).
  bool pack_sequences = false;
  // Replay: general examples mixed into the local data so that they make up
  // replay_fraction of it (k = round(f * N / (1 - f)) drawn from `replay`
  // with a generator seeded by `seed`, cycling when k > replay.size()).
  // 0 disables; must be in [0, 1) and needs a non-empty `replay` when > 0.
  // A general-text example is {prompt "", response text} (see data.h).
  float replay_fraction = 0.0f;
  std::vector<Example> replay;
  // Forgetting probe: when non-empty, Train evaluates these examples (loss
  // and perplexity) with the adapter before and after training and reports
  // both in TrainResult (probe_before / probe_after).
  std::vector<Example> forgetting_probe;
};

struct TrainProgress {
  int step = 0;             // optimizer steps done (1-based)
  int total_steps = 0;
  double loss = 0;          // loss of this step
  double mean_loss = 0;     // mean over the steps so far
  uint64_t tokens = 0;      // tokens processed so far
  double tokens_per_s = 0;  // since this call started (or resumed)
  double eta_seconds = 0;   // at the current rate
};

struct EvalResult {
  double loss = 0;        // mean cross-entropy over response tokens
  double perplexity = 0;  // exp(loss)
  uint64_t tokens = 0;    // response tokens scored
  // Greedy generation (EvalOptions::generate_max_new_tokens > 0): the response
  // decoded greedily from each example's prompt, compared with the reference
  // after whitespace normalisation (NormalizeAnswer). 0 examples = not run.
  uint64_t generated_examples = 0;
  double exact_match = 0;  // fraction of examples whose answer equals the reference
  double token_f1 = 0;     // mean whitespace-token F1 (SQuAD-style bag of tokens)
};

struct TrainResult {
  double mean_loss = 0;   // mean of per-step training losses
  double last_loss = 0;
  uint64_t tokens = 0;    // tokens processed (including prompt)
  double seconds = 0;
  uint64_t replay_examples = 0;  // general examples mixed in (TrainOptions::replay_fraction)
  // Forgetting probe (TrainOptions::forgetting_probe non-empty): perplexity on
  // the general set before vs after this call's training.
  bool has_probe = false;
  EvalResult probe_before;
  EvalResult probe_after;
};

struct EvalOptions {
  int max_seq_len = 256;
  // > 0: also greedy-decode up to this many tokens per example (stopping at
  // eos) and fill exact_match / token_f1. 0: loss and perplexity only.
  int generate_max_new_tokens = 0;
};

// Collapses every run of whitespace to one space and trims both ends.
std::string NormalizeAnswer(const std::string& text);
// SQuAD-style token F1 of two answers split on whitespace (after
// NormalizeAnswer): 2PR/(P+R) over the multiset overlap; 1 when both are
// empty, 0 when exactly one is.
double TokenF1(const std::string& prediction, const std::string& reference);

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
  // Evaluate with generation metrics. The default implementation serves
  // implementations without generation: Unimplemented when
  // generate_max_new_tokens > 0, else Evaluate(data, max_seq_len).
  virtual absl::StatusOr<EvalResult> EvaluateWith(const std::vector<Example>& data,
                                                  const EvalOptions& options);
};

// Device-local settings of the engine, applied to every call on top of what
// the caller (the agent, per round) asks for:
//  * bf16_autocast / pack_sequences / gradient_checkpointing: on when either
//    the call's TrainOptions or these ask for it;
//  * progress_every: used when the call's TrainOptions.progress_every is 0;
//  * replay / replay_fraction, forgetting_probe: used when the call's
//    TrainOptions leave them empty / 0;
//  * eval_generate_max_new_tokens: Evaluate(data, max_seq_len) runs as
//    EvaluateWith(data, {max_seq_len, eval_generate_max_new_tokens}).
struct EngineOptions {
  int threads = 0;               // 0 = all cores
  // fp32 | bf16 | fp16 | int8 | int4 (ModelLoadOptions), or "auto": fp32, with
  // the projections and an untied lm_head stored in bf16 when bf16_autocast is
  // on (autocast reads them rounded to bf16 anyway; autocast_bf16_weights).
  std::string base_dtype = "auto";
  bool bf16_autocast = false;
  bool pack_sequences = false;
  bool gradient_checkpointing = false;
  int progress_every = 0;
  float replay_fraction = 0.0f;
  std::vector<Example> replay;
  std::vector<Example> forgetting_probe;
  int eval_generate_max_new_tokens = 0;
};

// Loads a Hugging Face checkpoint folder into the libtorch engine.
absl::StatusOr<std::unique_ptr<LocalTrainer>> LoadTrainer(const std::string& model_dir,
                                                          const EngineOptions& options = {});

}  // namespace fedlora::edge
