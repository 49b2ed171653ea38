#pragma once
// The libtorch implementation of LocalTrainer (edge-agent/trainer.h) and the
// torch-free helpers it is built from, exposed for tests and the model CLI.
//
// Example -> token ids:  [bos?] + Encode(prompt) + Encode(response) + [eos?],
// truncated to max_seq_len; labels are -100 on bos + prompt (and padding), the
// token ids elsewhere, so the loss covers only the response (and eos).
//
// Which bos/eos (ResolveSpecialTokens):
//  * bos: tokenizer_config.json "add_bos_token" decides when present (the id
//    from its "bos_token", else config.json bos_token_id). Otherwise a
//    tokenizer.json TemplateProcessing post-processor that starts with a
//    special token decides. Otherwise config.json bos_token_id, if any (never
//    for Qwen2, whose tokenizers add none).
//  * eos: config.json eos_token_id (first if a list), else tokenizer_config's
//    "eos_token"; none if neither exists.
//
// Training (Train): AdamW over the LoRA tensors only (optim.h: libtorch's
// update and state, one pass per tensor); linear warmup for warmup_steps then
// cosine decay to 0 (LearningRateAt); gradient clipping to max_grad_norm
// (<= 0 disables); batches of batch_size examples drawn from a
// shuffled order seeded by options.seed (reshuffled every epoch), right-padded;
// LoRA dropout from a generator seeded by options.seed. Same seed, data and
// thread count => same result. Optimizer state does not persist across Train
// calls (except through a checkpoint file, see TrainOptions::checkpoint_path).
// A non-finite loss aborts training and restores the adapter.
//   * grad_accum_steps k: each step draws k * batch_size examples (the same
//     ones a batch of k * batch_size would get) and runs them as k
//     micro-batches; each micro-batch's summed loss is divided by the step's
//     total response-token count, so the summed gradients equal the big batch's.
//   * freeze_lora_a: A is left out of the optimizer (and of autograd), so it
//     is bit-identical afterwards; weight decay does not touch it either.
//   * prox_mu: after the data gradients, prox_mu/2 * ||w - w_start||^2 over
//     the trained tensors is backpropagated (ProximalTerm in lora.h), before
//     clipping. The reported losses are the data loss only.
//   * gradient_checkpointing: Model::set_gradient_checkpointing during the call.
//   * bf16_autocast: forward + head under CPU autocast to bf16; the logits are
//     cast back to fp32 for the loss; backward, clipping and AdamW in fp32.
//   * pack_sequences: each micro-batch's examples are packed first-fit (in
//     draw order) into rows of <= max_seq_len tokens and run through
//     Model::ForwardHiddenPacked; an example's first token is never a target,
//     so the summed loss and the gradients equal the unpacked ones (up to
//     float rounding; LoRA dropout draws differ because the shapes do).
//   * replay_fraction: the replay examples are tokenized and appended to the
//     data before shuffling (TrainResult::replay_examples says how many).
//   * forgetting_probe: evaluated (as Evaluate) before and after; when
//     progress goes to stderr, one "forgetting probe" line goes there too.
// The engine's EngineOptions settings are applied on top (see trainer.h).
//
// Evaluate: mean response-token loss, perplexity = exp(loss); with
// generation, each example is greedy-decoded (KV cache) from [bos] + prompt,
// stopping at eos, and the decoded text (special tokens skipped) is compared
// with the response (NormalizeAnswer, TokenF1).

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "c10/core/ScalarType.h"
#include "edge-agent/model_config.h"
#include "edge-agent/tokenizer.h"
#include "edge-agent/trainer.h"

namespace fedlora::edge {

struct SpecialTokens {
  std::optional<int32_t> bos;
  std::optional<int32_t> eos;
};

absl::StatusOr<SpecialTokens> ResolveSpecialTokens(const std::string& model_dir,
                                                   const ModelConfig& config,
                                                   const Tokenizer& tokenizer);

struct TokenizedExample {
  std::vector<int64_t> ids;
  std::vector<int64_t> labels;  // -100 where no loss is taken
  int64_t response_tokens() const;
};

constexpr int64_t kIgnoreLabel = -100;

TokenizedExample TokenizeExample(const Tokenizer& tokenizer, const SpecialTokens& special,
                                 const Example& example, int max_seq_len);

// One progress line: "train step 10/200 loss 2.3456 mean 2.5000 tokens/s 812.3 eta 3m07s".
std::string FormatProgress(const TrainProgress& p);

// Learning rate at 0-based `step` (warmup then cosine).
double LearningRateAt(const TrainOptions& options, int step);

// CPU autocast to bf16 for the scope when `on` (else nothing); the previous
// autocast state and dtype come back at the end of the scope, and autocast's
// cast cache is cleared when it was off before.
class Bf16Autocast {
 public:
  explicit Bf16Autocast(bool on);
  ~Bf16Autocast();
  Bf16Autocast(const Bf16Autocast&) = delete;
  Bf16Autocast& operator=(const Bf16Autocast&) = delete;

 private:
  bool on_;
  bool prev_enabled_ = false;
  c10::ScalarType prev_dtype_ = c10::ScalarType::BFloat16;
};

// Sets libtorch's intra-op threads (0 = all cores). The inter-op pool is set
// to 1 thread once per process (libtorch allows it only once).
void ConfigureThreads(int threads);

// Keeps freed tensor memory in the process heap for reuse (glibc mallopt: blocks
// below 32 MiB come from the heap, and the heap top is not returned to the kernel)
// instead of unmapping it and taking fresh, zero-filled pages on the next step.
// Once per process. Only matters where glibc's malloc is the process's
// allocator: fedlora-agent and fedlora-sim link tcmalloc (MallocName()), which
// reuses freed memory by size class with less fragmentation, and on which
// mallopt is a no-op.
void ConfigureAllocator();

// The malloc serving this process: "tcmalloc" when gperftools' tcmalloc has
// replaced glibc's (the programs that train link it), else "glibc".
std::string MallocName();

// The process's resident set (MiB) when this library's static initialisers ran:
// after every shared library (libtorch and the ~280 libraries Debian's libtorch
// loads) was mapped and initialised, before main(). The floor under any peak RSS
// this process reports.
double StartupRssMb();

}  // namespace fedlora::edge
