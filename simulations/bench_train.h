#pragma once
// `fedlora-sim bench train`: LoRA training throughput and peak memory of the
// edge engine on a randomly initialised Llama of fixed preset shapes, for a
// side-by-side comparison with /work/shared/bench/ref_lora.py (PyTorch eager).
//
// RunTrainBench(options):
//  * writes a random fp32 checkpoint (config.json + model.safetensors, HF Llama
//    names, untied lm_head, weights ~ U(-0.02*sqrt(3), 0.02*sqrt(3)), norms 1)
//    of the preset's shapes into a fresh temp folder, streaming it to disk so
//    the weights are never held in this process's memory while writing;
//  * loads it through the real loader (edge::Model::Load with base_dtype),
//    attaches LoRA r=8, alpha=16 on q,k,v,o,gate,up,down (edge::InitLora);
//  * runs 1 warm-up step + `steps` timed steps on fixed random token ids
//    [batch, seq + 1]: next-token cross-entropy (mean) over all seq positions
//    (the engine's fused head + loss, edge::Model::HeadLossSum),
//    backward, gradient clipping to 1.0 and AdamW (lr 1e-4) over the LoRA
//    tensors only -- the same ops as the engine's Train step;
//  * removes the temp folder (also on error).
// Peak RSS is getrusage(RUSAGE_SELF).ru_maxrss of the whole process (so it
// includes the resident mmapped checkpoint pages, and the RSS the process had
// before main(), reported as startup_rss_mb). "malloc" names the allocator
// (fedlora-sim links tcmalloc; a test binary runs on glibc's malloc).
// Bad options (unknown preset or dtype, non-positive sizes) are
// InvalidArgument naming the field; bf16 autocast (options.bf16) runs the
// forward under CPU autocast to bfloat16; grad_checkpoint turns on the
// model's gradient checkpointing (edge::Model::set_gradient_checkpointing);
// attention "plain" turns the fused attention kernel off (the engine's matmul /
// softmax path, the reference's algorithm); gemm "torch" runs the frozen
// projections' fp32 products on torch::matmul (BLAS) instead of oneDNN
// (edge::SetGemmBackend, for the comparison in the same run).

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace fedlora::sim {

struct TrainBenchPreset {
  std::string name;
  int64_t vocab = 0, hidden = 0, inter = 0, layers = 0, heads = 0, kv_heads = 0;
};

// "tiny" or "smollm135m" (the shapes of ref_lora.py's CONFIGS); NotFound otherwise.
absl::StatusOr<TrainBenchPreset> FindTrainBenchPreset(const std::string& name);

struct TrainBenchOptions {
  std::string preset = "tiny";
  int seq = 256;
  int batch = 4;
  int threads = 2;
  int steps = 5;
  // auto | fp32 | bf16 | int8 | int4; "auto" as EngineOptions::base_dtype: fp32,
  // and with bf16 the projections and lm_head stored in bf16 (the dtype autocast
  // reads them in). "fp32" with bf16 keeps them fp32, cast at every product.
  std::string base_dtype = "auto";
  bool bf16 = false;                // autocast the forward to bf16
  bool grad_checkpoint = false;     // edge::Model gradient checkpointing
  std::string attention = "fused";  // fused | plain (edge::Model::set_fused_attention)
  std::string gemm = "onednn";      // onednn | torch (edge::SetGemmBackend)
  std::string tmp_root = "";        // where the temp checkpoint goes; "" = $TMPDIR or /tmp
  // When set: one more step after the timed ones, under libtorch's profiler,
  // written here as a Chrome trace (chrome://tracing, Perfetto): every ATen op
  // and autograd node with its duration. Not part of the figures.
  std::string profile = "";
};

struct TrainBenchResult {
  TrainBenchOptions options;
  double tokens_per_s = 0;
  double peak_rss_mb = 0;
  double load_peak_rss_mb = 0;  // peak RSS once the model is loaded, before any step
  double startup_rss_mb = 0;    // RSS before main(): libraries mapped (edge::StartupRssMb)
  std::string malloc_name;      // "tcmalloc" or "glibc" (edge::MallocName)
  double step_ms_mean = 0;
  double step_ms_min = 0;  // the fastest timed step (less sensitive to a busy host)
  double last_loss = 0;
  int64_t trainable_params = 0;
  int64_t frozen_params = 0;
  int attention_threads = 0;  // threads that shared the fused attention (0: plain path)
  std::string cpu;            // /proc/cpuinfo model name
};

absl::StatusOr<TrainBenchResult> RunTrainBench(const TrainBenchOptions& options);

// One JSON line (no trailing newline): {"bench":"train","preset":..,"seq":..,
// "batch":..,"threads":..,"base_dtype":..,"bf16":..,"grad_checkpoint":..,"attention":..,"gemm":..,"steps":..,"tokens_per_s":..,
// "peak_rss_mb":..,"load_peak_rss_mb":..,"startup_rss_mb":..,"malloc":..,"step_ms_mean":..,"step_ms_min":..,"last_loss":..,"trainable_params":..,"frozen_params":..,
// "attention_threads":..,"cpu":..}
std::string TrainBenchJson(const TrainBenchResult& result);

}  // namespace fedlora::sim
