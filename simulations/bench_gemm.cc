#include "simulations/bench_gemm.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/status/status.h"
#include "edge-agent/engine.h"
#include "edge-agent/gemm.h"
#include "nlohmann/json.hpp"
#include "simulations/bench_train.h"
#include "simulations/bench_util.h"

namespace fedlora::sim {
namespace {

// Best wall time of `repeats` calls of f after one warm-up call.
double BestSeconds(int repeats, const std::function<torch::Tensor()>& f) {
  f();
  double best = std::numeric_limits<double>::infinity();
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = bench::Clock::now();
    torch::Tensor out = f();
    best = std::min(best, bench::Seconds(t0, bench::Clock::now()));
  }
  return best;
}

}  // namespace

absl::StatusOr<std::vector<GemmBenchResult>> RunGemmBench(const GemmBenchOptions& o) {
  auto bad = [](const char* flag, int value) {
    return absl::InvalidArgumentError(
        absl::StrCat("bench gemm --", flag, ": expected >= 1, found ", value));
  };
  if (o.seq < 1) return bad("seq", o.seq);
  if (o.batch < 1) return bad("batch", o.batch);
  if (o.threads < 1) return bad("threads", o.threads);
  if (o.repeats < 1) return bad("repeats", o.repeats);
  ASSIGN_OR_RETURN(TrainBenchPreset p, FindTrainBenchPreset(o.preset));
  edge::ConfigureThreads(o.threads);
  const int64_t head_dim = p.hidden / p.heads;
  const int64_t m = static_cast<int64_t>(o.batch) * o.seq;
  struct Shape {
    const char* what;
    int64_t k, n;
  };
  const std::vector<Shape> shapes = {{"q_proj/o_proj", p.hidden, p.hidden},
                                     {"k_proj/v_proj", p.hidden, p.kv_heads * head_dim},
                                     {"gate_proj/up_proj", p.hidden, p.inter},
                                     {"down_proj", p.inter, p.hidden},
                                     {"lm_head", p.hidden, p.vocab}};
  edge::GemmBackendScope backend_scope(edge::GemmBackend::kOnednn);  // restored on return
  std::vector<GemmBenchResult> out;
  try {
    torch::manual_seed(0);
    for (const Shape& s : shapes) {
      torch::Tensor w = torch::randn({s.n, s.k}) * 0.02;
      torch::Tensor x = torch::randn({m, s.k});
      torch::Tensor g = torch::randn({m, s.n});
      for (const char* op : {"nt", "nn"}) {
        const bool nt = op[1] == 't';
        auto run = [&] { return nt ? edge::MatmulNT(x, w) : edge::MatmulNN(g, w); };
        GemmBenchResult r;
        r.what = s.what;
        r.op = op;
        r.m = m;
        r.k = nt ? s.k : s.n;
        r.n = nt ? s.n : s.k;
        const double flop = 2.0 * static_cast<double>(m) * s.k * s.n;
        edge::SetGemmBackend(edge::GemmBackend::kOnednn);
        r.onednn_gflops = flop / BestSeconds(o.repeats, run) / 1e9;
        torch::Tensor a = run();
        edge::SetGemmBackend(edge::GemmBackend::kTorch);
        r.torch_gflops = flop / BestSeconds(o.repeats, run) / 1e9;
        r.max_abs_diff = (a - run()).abs().max().item<double>();
        // bf16 products of the fp32 operands, each converted at every call:
        // the engine's autocast path (MatmulNTBf16 / MatmulNNBf16, fp32
        // result) against autocast's own matmul (bf16 result).
        edge::SetGemmBackend(edge::GemmBackend::kOnednn);
        r.onednn_bf16_gflops =
            flop / BestSeconds(o.repeats, [&] {
              return nt ? edge::MatmulNTBf16(x, w) : edge::MatmulNNBf16(g, w);
            }) / 1e9;
        {
          edge::Bf16Autocast autocast(true);
          r.torch_autocast_gflops =
              flop / BestSeconds(o.repeats, [&] {
                return nt ? torch::matmul(x, w.t()) : torch::matmul(g, w);
              }) / 1e9;
        }
        out.push_back(r);
      }
    }
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("bench gemm: ", e.what()));
  }
  return out;
}

std::string GemmBenchJson(const GemmBenchOptions& o, const GemmBenchResult& r) {
  auto round1 = [](double v) { return std::round(v * 10.0) / 10.0; };
  nlohmann::ordered_json j;
  j["bench"] = "gemm";
  j["preset"] = o.preset;
  j["threads"] = o.threads;
  j["what"] = r.what;
  j["op"] = r.op;
  j["m"] = r.m;
  j["k"] = r.k;
  j["n"] = r.n;
  j["onednn_gflops"] = round1(r.onednn_gflops);
  j["torch_gflops"] = round1(r.torch_gflops);
  j["speedup"] = std::round(r.onednn_gflops / std::max(r.torch_gflops, 1e-9) * 100.0) / 100.0;
  j["max_abs_diff"] = r.max_abs_diff;
  j["onednn_bf16_gflops"] = round1(r.onednn_bf16_gflops);
  j["torch_autocast_gflops"] = round1(r.torch_autocast_gflops);
  return j.dump();
}

}  // namespace fedlora::sim
