#include "simulations/bench_train.h"

#include <stdlib.h>
#include <sys/resource.h>
#include <torch/csrc/autograd/profiler_legacy.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status/status.h"
#include "edge-agent/attention.h"
#include "edge-agent/engine.h"
#include "edge-agent/gemm.h"
#include "edge-agent/lora.h"
#include "edge-agent/model.h"
#include "edge-agent/optim.h"
#include "nlohmann/json.hpp"
#include "simulations/bench_util.h"

namespace fedlora::sim {
namespace {

namespace fs = std::filesystem;

// Removes the temp checkpoint folder on every exit path.
struct TempDirGuard {
  std::string path;
  ~TempDirGuard() {
    if (path.empty()) return;
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

double PeakRssMb() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
}

// Writes config.json and model.safetensors (F32) for preset `p` into `dir`,
// generating each tensor straight into a small buffer that is streamed out.
absl::Status WriteRandomCheckpoint(const std::string& dir, const TrainBenchPreset& p, int max_pos) {
  const int64_t H = p.hidden, I = p.inter, V = p.vocab, D = p.hidden / p.heads;
  struct Spec {
    std::string name;
    std::vector<int64_t> shape;
    bool ones;
  };
  std::vector<Spec> specs;
  specs.push_back({"model.embed_tokens.weight", {V, H}, false});
  for (int64_t l = 0; l < p.layers; ++l) {
    const std::string pre = absl::StrCat("model.layers.", l, ".");
    specs.push_back({pre + "input_layernorm.weight", {H}, true});
    specs.push_back({pre + "post_attention_layernorm.weight", {H}, true});
    specs.push_back({pre + "self_attn.q_proj.weight", {p.heads * D, H}, false});
    specs.push_back({pre + "self_attn.k_proj.weight", {p.kv_heads * D, H}, false});
    specs.push_back({pre + "self_attn.v_proj.weight", {p.kv_heads * D, H}, false});
    specs.push_back({pre + "self_attn.o_proj.weight", {H, p.heads * D}, false});
    specs.push_back({pre + "mlp.gate_proj.weight", {I, H}, false});
    specs.push_back({pre + "mlp.up_proj.weight", {I, H}, false});
    specs.push_back({pre + "mlp.down_proj.weight", {H, I}, false});
  }
  specs.push_back({"model.norm.weight", {H}, true});
  specs.push_back({"lm_head.weight", {V, H}, false});

  nlohmann::ordered_json header;
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (const Spec& s : specs) {
    uint64_t n = 1;
    for (int64_t d : s.shape) n *= static_cast<uint64_t>(d);
    header[s.name] = {
        {"dtype", "F32"}, {"shape", s.shape}, {"data_offsets", {offset, offset + 4 * n}}};
    offset += 4 * n;
  }
  std::string head = header.dump();
  while (head.size() % 8 != 0) head.push_back(' ');

  const std::string path = dir + "/model.safetensors";
  std::ofstream out(path, std::ios::binary);
  if (!out) return absl::InternalError(absl::StrCat("bench train: cannot create ", path));
  uint64_t len = head.size();
  unsigned char len_le[8];
  for (int i = 0; i < 8; ++i) len_le[i] = static_cast<unsigned char>((len >> (8 * i)) & 0xff);
  out.write(reinterpret_cast<const char*>(len_le), 8);
  out.write(head.data(), static_cast<std::streamsize>(head.size()));
  std::mt19937 rng(0);
  // U(-a, a) with std 0.02: a = 0.02 * sqrt(3).
  const float a = 0.02f * std::sqrt(3.0f);
  std::uniform_real_distribution<float> uni(-a, a);
  std::vector<float> buf(1 << 16);
  for (const Spec& s : specs) {
    uint64_t n = 1;
    for (int64_t d : s.shape) n *= static_cast<uint64_t>(d);
    while (n > 0) {
      const size_t k = static_cast<size_t>(std::min<uint64_t>(n, buf.size()));
      for (size_t i = 0; i < k; ++i) buf[i] = s.ones ? 1.0f : uni(rng);
      out.write(reinterpret_cast<const char*>(buf.data()),
                static_cast<std::streamsize>(k * sizeof(float)));
      n -= k;
    }
  }
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("bench train: write failed: ", path));

  nlohmann::ordered_json config;
  config["architectures"] = {"LlamaForCausalLM"};
  config["model_type"] = "llama";
  config["hidden_size"] = H;
  config["intermediate_size"] = I;
  config["num_hidden_layers"] = p.layers;
  config["num_attention_heads"] = p.heads;
  config["num_key_value_heads"] = p.kv_heads;
  config["head_dim"] = D;
  config["hidden_act"] = "silu";
  config["vocab_size"] = V;
  config["max_position_embeddings"] = max_pos;
  config["rope_theta"] = 10000.0;
  config["rms_norm_eps"] = 1e-5;
  config["tie_word_embeddings"] = false;
  config["torch_dtype"] = "float32";
  std::ofstream cfg(dir + "/config.json");
  cfg << config.dump(2) << "\n";
  cfg.close();
  if (!cfg)
    return absl::InternalError(absl::StrCat("bench train: write failed: ", dir, "/config.json"));
  return absl::OkStatus();
}

absl::Status CheckOptions(const TrainBenchOptions& o) {
  auto bad = [](const std::string& field, const std::string& expected, auto found) {
    return absl::InvalidArgumentError(
        absl::StrCat("bench train --", field, ": expected ", expected, ", found ", found));
  };
  if (o.seq < 1) return bad("seq", ">= 1", o.seq);
  if (o.batch < 1) return bad("batch", ">= 1", o.batch);
  if (o.threads < 1) return bad("threads", ">= 1", o.threads);
  if (o.steps < 1) return bad("steps", ">= 1", o.steps);
  if (o.base_dtype != "auto" && o.base_dtype != "fp32" && o.base_dtype != "bf16" &&
      o.base_dtype != "int8" && o.base_dtype != "int4") {
    return bad("base-dtype", "auto, fp32, bf16, int8 or int4",
               absl::StrCat("\"", o.base_dtype, "\""));
  }
  if (o.attention != "fused" && o.attention != "plain") {
    return bad("attention", "fused or plain", absl::StrCat("\"", o.attention, "\""));
  }
  if (o.gemm != "onednn" && o.gemm != "torch") {
    return bad("gemm", "onednn or torch", absl::StrCat("\"", o.gemm, "\""));
  }
  if (!o.profile.empty() && !std::ofstream(o.profile, std::ios::app)) {
    return bad("profile", "a writable file", absl::StrCat("\"", o.profile, "\""));
  }
  return absl::OkStatus();
}

absl::StatusOr<TrainBenchResult> RunImpl(const TrainBenchOptions& o, const TrainBenchPreset& p) {
  edge::ConfigureThreads(o.threads);
  edge::ConfigureAllocator();
  // The GEMM backend for this run only (process-wide; restored on return).
  edge::GemmBackendScope backend_scope(o.gemm == "torch" ? edge::GemmBackend::kTorch
                                                         : edge::GemmBackend::kOnednn);
  std::string root = o.tmp_root;
  if (root.empty()) {
    const char* env = getenv("TMPDIR");
    root = (env != nullptr && *env != '\0') ? env : "/tmp";
  }
  std::string tmpl = root + "/fedlora_bench_train_XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) {
    return absl::InternalError(
        absl::StrCat("bench train: cannot create a temp folder under ", root));
  }
  TempDirGuard guard{std::string(buf.data())};
  RETURN_IF_ERROR(WriteRandomCheckpoint(guard.path, p, std::max(o.seq + 1, 512)));

  // "auto" as the engine resolves it.
  ASSIGN_OR_RETURN(std::unique_ptr<edge::Model> model,
                   edge::Model::Load(guard.path, edge::LoadOptionsFor(o.base_dtype, o.bf16)));
  edge::LoraConfig lora;  // r=8, alpha=16, q,k,v,o,gate,up,down, no dropout
  RETURN_IF_ERROR(edge::InitLora(*model, lora));
  model->set_gradient_checkpointing(o.grad_checkpoint);
  model->set_fused_attention(o.attention == "fused");
  std::vector<torch::Tensor> params = edge::LoraParameters(*model);

  TrainBenchResult result;
  result.options = o;
  for (const auto& t : params) result.trainable_params += t.numel();
  result.frozen_params = model->NumParameters();
  result.load_peak_rss_mb = PeakRssMb();
  result.startup_rss_mb = edge::StartupRssMb();
  result.malloc_name = edge::MallocName();

  torch::manual_seed(0);
  torch::Tensor ids = torch::randint(0, p.vocab, {o.batch, o.seq + 1}, torch::kLong);
  torch::Tensor input = ids.slice(1, 0, o.seq);
  torch::Tensor target = ids.slice(1, 1).reshape({-1});
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-4).weight_decay(0.0));

  auto step = [&]() -> double {
    opt.zero_grad();
    // Mean next-token cross-entropy over all positions (ref_lora.py's loss).
    auto mean_loss = [&] {
      torch::Tensor hidden = model->ForwardHidden(input);
      return model->HeadLossSum(hidden.reshape({-1, p.hidden}), target) / target.numel();
    };
    torch::Tensor loss;
    {
      edge::Bf16Autocast autocast(o.bf16);
      loss = mean_loss();
    }
    loss.backward();
    edge::ClipGradNorm(params, 1.0);
    edge::AdamWStep(opt);
    return loss.item<double>();
  };

  double loss = step();  // warm-up, untimed
  const auto t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < o.steps; ++s) {
    const auto s0 = std::chrono::steady_clock::now();
    loss = step();
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s0).count();
    result.step_ms_min = s == 0 ? ms : std::min(result.step_ms_min, ms);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!std::isfinite(loss)) {
    return absl::InternalError(absl::StrCat("bench train: non-finite loss ", loss));
  }
  result.last_loss = loss;
  result.step_ms_mean = secs * 1000.0 / o.steps;
  result.tokens_per_s = static_cast<double>(o.steps) * o.batch * o.seq / std::max(secs, 1e-9);
  result.peak_rss_mb = PeakRssMb();
  if (!o.profile.empty()) {
    torch::autograd::profiler::RecordProfile trace(o.profile);
    step();
  }
  result.attention_threads = o.attention == "fused" ? edge::FusedAttentionThreadsUsed() : 0;
  result.cpu = bench::CpuModel();
  return result;
}

}  // namespace

absl::StatusOr<TrainBenchPreset> FindTrainBenchPreset(const std::string& name) {
  if (name == "tiny") return TrainBenchPreset{"tiny", 4096, 256, 688, 4, 8, 4};
  if (name == "smollm135m") return TrainBenchPreset{"smollm135m", 49152, 576, 1536, 30, 9, 3};
  return absl::NotFoundError(absl::StrCat(
      "bench train --preset: expected \"tiny\" or \"smollm135m\", found \"", name, "\""));
}

absl::StatusOr<TrainBenchResult> RunTrainBench(const TrainBenchOptions& options) {
  RETURN_IF_ERROR(CheckOptions(options));
  ASSIGN_OR_RETURN(TrainBenchPreset preset, FindTrainBenchPreset(options.preset));
  try {
    return RunImpl(options, preset);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("bench train: libtorch: ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("bench train: ", e.what()));
  }
}

std::string TrainBenchJson(const TrainBenchResult& r) {
  auto round1 = [](double v) { return std::round(v * 10.0) / 10.0; };
  auto round3 = [](double v) { return std::round(v * 1000.0) / 1000.0; };
  nlohmann::ordered_json j;
  j["bench"] = "train";
  j["preset"] = r.options.preset;
  j["seq"] = r.options.seq;
  j["batch"] = r.options.batch;
  j["threads"] = r.options.threads;
  j["base_dtype"] = r.options.base_dtype;
  j["bf16"] = r.options.bf16;
  j["grad_checkpoint"] = r.options.grad_checkpoint;
  j["attention"] = r.options.attention;
  j["gemm"] = r.options.gemm;
  j["steps"] = r.options.steps;
  j["tokens_per_s"] = round1(r.tokens_per_s);
  j["peak_rss_mb"] = round1(r.peak_rss_mb);
  j["load_peak_rss_mb"] = round1(r.load_peak_rss_mb);
  j["startup_rss_mb"] = round1(r.startup_rss_mb);
  j["malloc"] = r.malloc_name;
  j["step_ms_mean"] = round1(r.step_ms_mean);
  j["step_ms_min"] = round1(r.step_ms_min);
  j["last_loss"] = round3(r.last_loss);
  j["trainable_params"] = r.trainable_params;
  j["frozen_params"] = r.frozen_params;
  j["attention_threads"] = r.attention_threads;
  j["cpu"] = r.cpu;
  return j.dump();
}

}  // namespace fedlora::sim
