#pragma once
// `fedlora-sim bench gemm`: throughput of the engine's frozen-projection GEMMs
// (edge-agent/gemm.h) on oneDNN against torch::matmul (libtorch's BLAS path)
// in the same process, at the products of a bench-train preset.
//
// RunGemmBench(options) times, for each distinct (M, K, N) of the preset's
// decoder projections and LM head at M = batch * seq rows, the forward product
// x W^T (op "nt") and the input gradient g W (op "nn") with both backends:
// `repeats` runs each after one warm-up, the best time kept (so a busy moment
// on a shared machine counts less). Each result also carries the largest
// absolute difference between the two backends' outputs, and the same
// products in bf16 (operands converted at every call, as under autocast):
// MatmulNTBf16 / MatmulNNBf16 against torch::matmul under CPU autocast. Bad
// options (unknown preset, non-positive sizes) are InvalidArgument naming the flag.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::sim {

struct GemmBenchOptions {
  std::string preset = "smollm135m";  // tiny | smollm135m (bench_train.h)
  int seq = 256;
  int batch = 1;
  int threads = 2;
  int repeats = 15;
};

struct GemmBenchResult {
  std::string what;  // e.g. "q_proj", "lm_head"
  std::string op;    // "nt" (x W^T) or "nn" (g W)
  int64_t m = 0, k = 0, n = 0;
  double onednn_gflops = 0, torch_gflops = 0;
  double max_abs_diff = 0;
  // bf16 products with the fp32 operands converted at each call: MatmulNTBf16 /
  // MatmulNNBf16 against torch::matmul under CPU autocast.
  double onednn_bf16_gflops = 0, torch_autocast_gflops = 0;
};

absl::StatusOr<std::vector<GemmBenchResult>> RunGemmBench(const GemmBenchOptions& options);

// One JSON line (no trailing newline): {"bench":"gemm","preset":..,"threads":..,
// "what":..,"op":..,"m":..,"k":..,"n":..,"onednn_gflops":..,"torch_gflops":..,
// "speedup":..,"max_abs_diff":..,"onednn_bf16_gflops":..,"torch_autocast_gflops":..}
std::string GemmBenchJson(const GemmBenchOptions& options, const GemmBenchResult& result);

}  // namespace fedlora::sim
