#pragma once
// A decoder-only transformer (Llama / Mistral / Qwen2 / Phi-3) in libtorch,
// fp32 on CPU, loaded from a Hugging Face checkpoint folder.
//
// Matches transformers' modeling code: RMSNorm computed in fp32, rotary
// embeddings with the rotate_half convention (default / linear / llama3
// scaling), grouped-query attention with a causal (and, where the config sets
// one, sliding-window) mask, SwiGLU MLP, final norm, lm_head or tied
// embeddings. Base weights are frozen; LoRA lives in the LoraLinear modules
// (see lora.h).
//
// Weights come from model.safetensors or the shards listed in
// model.safetensors.index.json. F32 tensors are used in place (zero-copy
// views of the read-only mapping, which the Model keeps alive); F16/BF16/F64
// are converted to fp32. A missing or mis-shaped tensor is an
// InvalidArgument error naming the tensor, the file and both shapes.
//
// Not safe for concurrent use. Methods other than Load may throw c10::Error
// (callers at public API boundaries catch it).

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tensor/tensor.h"
#include "edge-agent/lora.h"
#include "edge-agent/model_config.h"

namespace fedlora::edge {

struct DecoderLayer {
  torch::Tensor input_norm;  // [hidden]
  torch::Tensor post_norm;   // [hidden]
  // Llama / Mistral / Qwen2: separate projections. Phi-3: qkv and gate_up fused.
  LoraLinear q_proj, k_proj, v_proj, qkv_proj, o_proj;
  LoraLinear gate_proj, up_proj, gate_up_proj, down_proj;
};

// Per-layer keys and values of the positions seen so far ([B, kv_heads, S, head_dim]).
struct KvCache {
  std::vector<torch::Tensor> k, v;
  int64_t length = 0;
};

struct ModelLoadOptions {
  // "fp32" keeps every weight in fp32. "bf16" / "fp16" store the frozen
  // linear and embedding weights in that dtype (half the memory) and convert
  // them to fp32 per use. "int8" stores the linear weights of the decoder
  // layers as int8 with a per-output-row absmax scale (a quarter of the
  // memory; QLoRA-style dequantization per layer on the fly) and the
  // embeddings / lm_head in bf16. "int4" stores them group-wise 4-bit
  // (LoraLinear::kInt4Group weights per fp32 scale, about 0.56 bytes per
  // weight; see QuantizeInt4) with the embeddings / lm_head in bf16. Norms and
  // biases always stay fp32. Compact weights are dequantized per layer on the
  // fly in forward and again in backward (never kept in fp32), and the
  // converted tensors' pages of the fp32 checkpoint mapping are released.
  std::string base_dtype = "fp32";
  // With base_dtype "fp32" only: the weights that CPU autocast to bf16 reads in
  // bf16 (the decoder projections and an untied lm_head) are stored in bf16,
  // rounded once here exactly as autocast rounds them at every product (to
  // nearest even); the embeddings, norms and biases stay fp32. Every product
  // under bf16 autocast is unchanged (ParityTest.AutocastBf16WeightsChangeNoProduct
  // checks logits and gradients bit for bit); a product outside autocast reads
  // the rounded weight. LoadOptionsFor sets it for base_dtype "auto" with
  // bf16 autocast: a fp32 copy of a frozen weight that is only ever read rounded
  // would cost twice the memory and a conversion at every product.
  bool autocast_bf16_weights = false;
};

// The load options for a user's base dtype choice (ModelLoadOptions::base_dtype,
// or "auto": fp32 with autocast_bf16_weights when the training runs under bf16
// autocast). Other values pass through; Model::Load checks them.
ModelLoadOptions LoadOptionsFor(const std::string& base_dtype, bool bf16_autocast);

class Model {
 public:
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& model_dir,
                                                     const ModelLoadOptions& options = {});

  const ModelConfig& config() const { return config_; }
  const std::string& model_dir() const { return model_dir_; }

  // ids: int64 [B, T] (values checked against the vocabulary). With `cache`,
  // positions continue after cache->length and the cache is extended. With
  // `dropout_gen`, LoRA dropout is active. Returns fp32 logits [B, T, V], or
  // [B, 1, V] for the last position only when `last_only`.
  torch::Tensor Forward(const torch::Tensor& ids, KvCache* cache = nullptr,
                        torch::Generator* dropout_gen = nullptr, bool last_only = false) const;
  // Forward without the head: final-normed hidden states [B, T, H]. Logits()
  // maps any [..., H] to [..., V]; training uses the pair to run the head only
  // on the positions that carry a label.
  torch::Tensor ForwardHidden(const torch::Tensor& ids, KvCache* cache = nullptr,
                              torch::Generator* dropout_gen = nullptr,
                              bool last_only = false) const;
  torch::Tensor Logits(const torch::Tensor& hidden) const;
  // Summed next-token cross-entropy of hidden [N, H] against targets [N]
  // (int64 in [0, V)): the head and the loss fused a block of vocabulary rows at
  // a time (head_loss.h), never holding the [N, V] logits (the blocks are
  // recomputed in backward under gradient checkpointing; under CPU autocast the
  // products run in its dtype). For non-fp32 or non-2-D hidden states it is
  // Logits() + cross_entropy instead.
  torch::Tensor HeadLossSum(const torch::Tensor& hidden, const torch::Tensor& targets) const;
  // Packed sequences (no KV cache): ids, positions and segments are int64
  // [B, T]. positions restart at 0 for each example; segments number the
  // examples of a row (any distinct values; -1 marks padding). A query sees
  // only keys of its own segment at or before it (and within the sliding
  // window), so each example's hidden states equal those of a separate
  // ForwardHidden of that example alone.
  torch::Tensor ForwardHiddenPacked(const torch::Tensor& ids, const torch::Tensor& positions,
                                    const torch::Tensor& segments,
                                    torch::Generator* dropout_gen = nullptr) const;

  // Greedy decoding with a KV cache. Returns the generated ids (at most
  // max_new_tokens); stops after emitting any id in `stop_ids`.
  std::vector<int64_t> GenerateGreedy(const std::vector<int64_t>& prompt, int max_new_tokens,
                                      const std::vector<int64_t>& stop_ids) const;

  // The modules LoRA may adapt, in a fixed order (layer, then module).
  struct Adaptable {
    std::string peft_prefix;  // "base_model.model.model.layers.3.self_attn.q_proj"
    std::string module;       // "q_proj"
    int layer;
    LoraLinear* linear;
  };
  std::vector<Adaptable> AdaptableModules();
  std::vector<const LoraLinear*> AllLinears() const;
  // Short module names this architecture offers ("q_proj", ... or "qkv_proj", ...).
  std::vector<std::string> ModuleNames() const;

  // Gradient checkpointing: while on, a forward with grad enabled and no KV
  // cache keeps only each decoder layer's input and recomputes the layer in
  // backward (same results, same dropout draws; less memory, more compute).
  // By default the layer also keeps the outputs of its frozen projections
  // (x W^T, the costly part of its forward) and the recompute reuses them, so
  // only the cheap element-wise work, attention and the LoRA branches run
  // again; set_checkpoint_keeps_gemm_outputs(false) recomputes everything
  // (least memory).
  void set_gradient_checkpointing(bool on) { gradient_checkpointing_ = on; }
  bool gradient_checkpointing() const { return gradient_checkpointing_; }
  void set_checkpoint_keeps_gemm_outputs(bool on) { checkpoint_keeps_gemm_outputs_ = on; }
  bool checkpoint_keeps_gemm_outputs() const { return checkpoint_keeps_gemm_outputs_; }
  // Decoder layers recomputed in backward under gradient checkpointing, by
  // every Model of the process since it started (for tests and diagnostics).
  static int64_t CheckpointRecomputeCount();

  // Fused causal attention (edge-agent/attention.h) for forwards without a packing
  // mask or a KV-cache prefix: on by default; off runs the plain matmul / softmax
  // path (same results to float rounding; benchmarks compare the two).
  void set_fused_attention(bool on) { fused_attention_ = on; }
  bool fused_attention() const { return fused_attention_; }

  // Decoder layer `i` applied to x [B, T, H] (used by the checkpointing
  // wrapper). `masked`: undefined for the plain causal mask, else a bool
  // [B, 1, T, S] that is true where a query must not see a key.
  torch::Tensor Layer(size_t i, const torch::Tensor& x, const torch::Tensor& cos,
                      const torch::Tensor& sin, KvCache* cache, int64_t past, torch::Generator* gen,
                      const torch::Tensor& masked = {}) const;
  // The LoRA tensors (A, B per adapted module) of layer `i`, in a fixed order.
  std::vector<torch::Tensor> LayerLoraTensors(size_t i) const;

  // Base parameters (excluding LoRA), counting tied embeddings once.
  int64_t NumParameters() const;
  // Checkpoint dtype name ("F32", "BF16", ...) -> number of tensors.
  const std::map<std::string, int>& checkpoint_dtypes() const { return dtypes_; }
  int64_t checkpoint_bytes() const { return checkpoint_bytes_; }

  // The HF parameter name -> tensor map of the base model (for inspection/tests).
  std::map<std::string, torch::Tensor> NamedParameters() const;

 private:
  Model() = default;
  torch::Tensor Embed(const torch::Tensor& ids) const;
  torch::Tensor Rms(const torch::Tensor& x, const torch::Tensor& w) const;
  torch::Tensor Attention(const DecoderLayer& layer, int index, const torch::Tensor& h,
                          const torch::Tensor& cos, const torch::Tensor& sin, KvCache* cache,
                          int64_t past, torch::Generator* gen, const torch::Tensor& masked) const;
  torch::Tensor Mlp(const DecoderLayer& layer, const torch::Tensor& h, torch::Generator* gen) const;
  torch::Tensor CheckpointedLayer(size_t i, const torch::Tensor& x, const torch::Tensor& cos,
                                  const torch::Tensor& sin, torch::Generator* gen,
                                  const torch::Tensor& masked) const;
  // The decoder stack + final norm over embedded x with the given rotary tables.
  torch::Tensor RunLayers(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                          KvCache* cache, int64_t past, torch::Generator* gen,
                          const torch::Tensor& masked) const;
  void CheckIds(const torch::Tensor& ids) const;

  ModelConfig config_;
  std::string model_dir_;
  std::vector<std::shared_ptr<common::SafetensorsFile>> files_;  // keep the mappings alive
  torch::Tensor embed_;                                          // [V, H]
  torch::Tensor norm_;                                           // [H]
  torch::Tensor lm_head_;                                        // [V, H] (== embed_ when tied)
  torch::Tensor inv_freq_;                                       // [head_dim / 2]
  std::vector<DecoderLayer> layers_;
  std::map<std::string, int> dtypes_;
  int64_t checkpoint_bytes_ = 0;
  bool gradient_checkpointing_ = false;
  bool checkpoint_keeps_gemm_outputs_ = true;
  bool fused_attention_ = true;
};

}  // namespace fedlora::edge
