#pragma once
// Hugging Face Llama-family checkpoints -> llama.cpp GGUF files, torch-free.
//
// Input: an HF model directory with config.json (model_type "llama";
// "mistral", written as llama.cpp's llama architecture like llama.cpp's own
// converter does, so a sliding_window is not carried and llama.cpp attends to
// the whole context; "qwen2": same layout plus q/k/v biases, keys prefixed
// "qwen2.", no Q/K permutation since llama.cpp's qwen2 uses NEOX RoPE like HF;
// "phi3": keys prefixed "phi3.", fused blk.N.attn_qkv ([q; k; v] rows) and
// blk.N.ffn_up ([gate; up] rows, 2 x feed_forward_length) instead of
// attn_q/k/v and ffn_gate/up, no permutation (NEOX RoPE), and
// phi3.attention.sliding_window when config.json has one; other RoPE scaling
// than "default" / "llama3" is refused),
// model.safetensors (F32/F16/BF16) and tokenizer.json (byte-level BPE).
//
// Base / merged model GGUF (what llama.cpp's convert_hf_to_gguf.py writes for
// LlamaForCausalLM):
//   general.architecture "llama", general.name, general.file_type,
//   llama.{context_length, embedding_length, block_count, feed_forward_length,
//   attention.head_count, attention.head_count_kv, attention.key_length,
//   attention.value_length, rope.freq_base, rope.dimension_count,
//   attention.layer_norm_rms_epsilon, vocab_size},
//   tokenizer.ggml.{model "gpt2", pre, tokens, token_type, merges,
//   bos_token_id, eos_token_id (only when config.json gives them),
//   add_bos_token, add_eos_token};
//   tensors token_embd, output_norm, output (absent when embeddings are tied),
//   rope_freqs (only for rope_type "llama3": Llama3RopeFactors; llama.cpp
//   needs no extra metadata key for it, context_length is the scaled
//   max_position_embeddings, as in llama.cpp's converter),
//   blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
//   ffn_up, ffn_down}.weight. Norms are always F32; 2-D weights use the requested
//   type, falling back to F16 where a quantized type's 32-value blocks do not
//   divide the row (as llama.cpp's converter does).
//   (llama only) Q and K rows are permuted from HF's rotate-half layout to ggml's
//   interleaved RoPE layout: within each head of size d, new row 2i+h takes old
//   row h*d/2+i (K uses the KV head count).
//   tokenizer.ggml.pre is chosen from the Split regex of tokenizer.json:
//   Llama-3's -> "llama-bpe", Qwen2's -> "qwen2", plain GPT-2 ByteLevel -> "gpt2";
//   anything else is an error. add_bos_token is true only when the
//   post-processor prepends a special token.
//
// Optional LoRA merge first: W += scale * B @ A for every adapter pair
// (scale = alpha/r, or alpha/sqrt(r) with rsLoRA), on the HF weights.
//
// LoRA adapter GGUF (what convert_lora_to_gguf.py writes; llama.cpp --lora):
//   general.architecture of the base, general.type "adapter", adapter.type "lora",
//   adapter.lora.alpha (F32) = alpha, or alpha*sqrt(r) for rsLoRA (llama.cpp
//   scales by alpha/r); tensors blk.N.<name>.weight.lora_a = A (ne {in, r}) and
//   .lora_b = B (ne {r, out}); for llama, B of attn_q / attn_k gets the same
//   row permutation as the base weight.
//
// Errors name the file and the field or tensor. Thread-safe (no shared state).

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/export/gguf.h"
#include "common/export/peft_export.h"
#include "common/tensor/tensor.h"

namespace fedlora::common {

struct LlamaHParams {
  std::string arch = "llama";  // GGUF architecture: "llama" (model_type llama or mistral),
                               // "qwen2" or "phi3"
  int64_t sliding_window = 0;  // phi3 only (carried as phi3.attention.sliding_window); 0 = none
  bool qkv_bias = false;       // q/k/v projections carry biases (qwen2)
  int64_t n_vocab = 0;
  int64_t n_embd = 0;
  int64_t n_layer = 0;
  int64_t n_ff = 0;
  int64_t n_head = 0;
  int64_t n_head_kv = 0;
  int64_t head_dim = 0;
  int64_t n_ctx = 0;
  double rope_theta = 10000.0;
  // Llama-3.1-style RoPE scaling (rope_type "llama3"); off for "default".
  bool rope_llama3 = false;
  double rope_factor = 1.0;
  double rope_low_freq_factor = 1.0;
  double rope_high_freq_factor = 4.0;
  int64_t rope_original_ctx = 8192;  // original_max_position_embeddings
  double rms_eps = 1e-5;
  bool tie_embeddings = false;
  int64_t bos_id = -1;  // -1: not given
  int64_t eos_id = -1;
};

// Parses config.json (model_type "llama", "mistral", "qwen2" or "phi3"). RoPE: rope_type
// "default", or "llama3" (llama only) with factor, low_freq_factor,
// high_freq_factor (> low_freq_factor) and original_max_position_embeddings
// all given, in rope_scaling or (transformers >= 5) rope_parameters.
absl::StatusOr<LlamaHParams> ReadLlamaHParams(const std::string& config_json_path);

// Llama-3 RoPE scaling as per-dimension divisors of the rotation frequencies,
// the tensor llama.cpp reads as rope_freqs.weight ([head_dim / 2], F32).
// From Meta's published formula (llama3 reference `apply_scaling`): for
// freq_i = rope_theta^(-2i/head_dim) with wavelength w_i = 2*pi / freq_i,
//   w_i < original_ctx / high_freq_factor  -> 1        (kept)
//   w_i > original_ctx / low_freq_factor   -> factor   (freq / factor)
//   otherwise, with s = (original_ctx / w_i - low) / (high - low):
//     1 / ((1 - s) / factor + s)                       (the smooth blend)
// since llama.cpp divides each frequency by its factor. Empty unless rope_llama3.
std::vector<float> Llama3RopeFactors(const LlamaHParams& hp);

// Row permutation of a Q or K projection ([n_head*d, in]) or of its LoRA B
// ([n_head*d, r]) from HF to ggml RoPE layout. InvalidArgument if the rows
// are not n_head * an even head size.
absl::StatusOr<HostTensor> PermuteQkRows(const HostTensor& w, int64_t n_head);

// HF weight name -> GGUF tensor name ("model.layers.3.mlp.up_proj.weight" ->
// "blk.3.ffn_up.weight"); NotFound for names llama.cpp has no tensor for.
absl::StatusOr<std::string> LlamaGgufTensorName(const std::string& hf_name);

// W += scale * B @ A on HF-named base weights ("model.layers.N....weight").
absl::Status MergeLora(TensorMap* base, const TensorMap& adapter, const PeftLoraConfig& config);

struct LlamaGgufOptions {
  GgmlType type = GgmlType::kF16;   // 2-D weights; norms stay F32
  std::string name = "fedlora";     // general.name
  const TensorMap* lora = nullptr;  // merged in when set (with lora_config)
  const PeftLoraConfig* lora_config = nullptr;
};

absl::StatusOr<GgufWriter> BuildLlamaGguf(const std::string& hf_dir,
                                          const LlamaGgufOptions& options);
absl::Status ConvertHfLlamaToGguf(const std::string& hf_dir, const std::string& out_path,
                                  const LlamaGgufOptions& options);

// `type` is F32 or F16 (LoRA ranks are rarely a multiple of 32).
absl::StatusOr<GgufWriter> BuildLoraGguf(const std::string& hf_dir, const TensorMap& adapter,
                                         const PeftLoraConfig& config,
                                         GgmlType type = GgmlType::kF32);
absl::Status ExportLoraGguf(const std::string& hf_dir, const TensorMap& adapter,
                            const PeftLoraConfig& config, const std::string& out_path,
                            GgmlType type = GgmlType::kF32);

}  // namespace fedlora::common
