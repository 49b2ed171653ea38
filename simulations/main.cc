// fedlora-sim: synthetic models and data for federated runs on one machine.
//
//   fedlora-sim make-model --out DIR [--hidden 128] [--intermediate 344] [--layers 4]
//                          [--heads 4] [--kv-heads 2] [--head-dim 32] [--vocab 512]
//                          [--max-pos 512] [--rope-theta 10000] [--seed 0]
//   fedlora-sim make-data --out DIR [--sites 3] [--examples 200] [--heldout 40] [--seed 0]
//   fedlora-sim bench train --preset tiny|smollm135m [--seq 256] [--batch 4] [--threads 2]
//                           [--steps 5] [--base-dtype auto|fp32|bf16|int8|int4] [--bf16]
//                           [--grad-checkpoint] [--attention fused|plain] [--gemm onednn|torch]
//     prints one JSON line (see simulations/bench_train.h)
//   fedlora-sim bench gemm [--preset smollm135m] [--seq 256] [--batch 1] [--threads 2]
//                          [--repeats 15]
//     prints one JSON line per product (see simulations/bench_gemm.h)
//   fedlora-sim bench secagg [--agents 100] [--params 1000000] [--dropout 0.1]
//                            [--neighbours K] [--threshold T] [--threads 1] [--seed 1]
//     prints one JSON line (see simulations/bench_secagg.h)
//   fedlora-sim bench coordinator [--agents 100] [--params 1000000] [--rounds 3] [--rank 8]
//                                 [--secure-aggregation off] [--max-concurrent-uploads 8]
//                                 [--worker-threads 2] [--client-uploads 64]
//                                 [--prepare-threads 2] [--timeout-s 1800]
//                                 [--coordinator-bin PATH] [--work-dir DIR] [--seed 1]
//     prints one JSON line per round and a summary line (see simulations/bench_coordinator.h)

#include <cstdio>
#include <string>

#include "CLI/CLI.hpp"
#include "simulations/bench_coordinator.h"
#include "simulations/bench_secagg.h"
#include "simulations/bench_gemm.h"
#include "simulations/bench_train.h"
#include "simulations/data_maker.h"
#include "simulations/model_maker.h"

int main(int argc, char** argv) {
  CLI::App app{"fedlora-sim: synthetic models and data for federated LoRA simulations"};
  app.require_subcommand(1);

  fedlora::sim::TinyModelOptions model;
  std::string model_out;
  CLI::App* make_model = app.add_subcommand(
      "make-model",
      "Write a tiny randomly initialised Llama checkpoint (Hugging Face layout: config.json, "
      "model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json) whose "
      "byte-level BPE tokenizer is trained on the synthetic clinical-notes corpus");
  make_model->add_option("--out", model_out, "Output folder (created if absent)")->required();
  make_model->add_option("--hidden", model.hidden_size, "Hidden size")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  make_model->add_option("--intermediate", model.intermediate_size, "MLP intermediate size")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  make_model->add_option("--layers", model.num_layers, "Decoder layers")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  make_model->add_option("--heads", model.num_heads, "Attention heads")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  make_model->add_option("--kv-heads", model.num_kv_heads, "Key/value heads (GQA)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  make_model->add_option("--head-dim", model.head_dim, "Dimension per head")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  make_model->add_option("--vocab", model.vocab_size, "Tokenizer vocabulary size (with specials)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  make_model->add_option("--max-pos", model.max_position_embeddings, "max_position_embeddings")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  make_model->add_option("--rope-theta", model.rope_theta, "RoPE base")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  make_model->add_option("--init-std", model.init_std, "Std of the N(0, std) weight init")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  make_model->add_option("--corpus-sites", model.corpus_sites,
                         "Sites whose synthetic notes train the tokenizer")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  make_model->add_option("--corpus-examples", model.corpus_examples,
                         "Notes per site in the tokenizer corpus")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  make_model->add_option("--seed", model.seed, "Seed of weights and corpus")
      ->capture_default_str();

  std::string data_out;
  int sites = 3;
  int examples = 200;
  int heldout = 40;
  uint64_t data_seed = 0;
  CLI::App* make_data = app.add_subcommand(
      "make-data",
      "Write per-site JSONL data for the synthetic 'clinical notes -> structured fields' task: "
      "<out>/site-N/train.jsonl and heldout.jsonl (each site writes its notes in its own style: "
      "terse, narrative, bullets, repeating) and <out>/manifest.json");
  make_data->add_option("--out", data_out, "Output folder (created if absent)")->required();
  make_data->add_option("--sites", sites, "Number of sites")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  make_data->add_option("--examples", examples, "Training examples per site")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  make_data->add_option("--heldout", heldout, "Held-out examples per site")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  make_data->add_option("--seed", data_seed, "Seed")->capture_default_str();

  fedlora::sim::TrainBenchOptions bench_train;
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks; each prints JSON lines");
  bench->require_subcommand(1);
  CLI::App* bench_train_cmd = bench->add_subcommand(
      "train",
      "LoRA training steps (r=8, alpha=16 on q,k,v,o,gate,up,down; AdamW) on a randomly "
      "initialised Llama of the preset's shapes and random token ids: tokens/s and peak RSS");
  bench_train_cmd->add_option("--preset", bench_train.preset, "tiny | smollm135m")
      ->capture_default_str()
      ->check(CLI::IsMember({"tiny", "smollm135m"}));
  bench_train_cmd->add_option("--seq", bench_train.seq, "Tokens per sequence")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_train_cmd->add_option("--batch", bench_train.batch, "Sequences per step")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_train_cmd->add_option("--threads", bench_train.threads, "libtorch intra-op threads")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_train_cmd->add_option("--steps", bench_train.steps, "Timed steps (after 1 warm-up step)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_train_cmd
      ->add_option("--base-dtype", bench_train.base_dtype,
                   "Frozen base weights dtype (auto: fp32, and with --bf16 the projections and "
                   "lm_head in bf16, as the agent's default; fp32 with --bf16 casts them at every "
                   "product)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "fp32", "bf16", "int8", "int4"}));
  bench_train_cmd->add_flag("--bf16", bench_train.bf16, "Run the forward under bf16 CPU autocast");

  fedlora::sim::GemmBenchOptions bench_gemm;
  CLI::App* bench_gemm_cmd = bench->add_subcommand(
      "gemm",
      "The engine's frozen-projection GEMMs (x W^T and g W) at a preset's shapes: oneDNN vs "
      "torch::matmul (BLAS) in GFLOP/s, best of --repeats; one JSON line per product");
  bench_gemm_cmd->add_option("--preset", bench_gemm.preset, "tiny | smollm135m")
      ->capture_default_str()
      ->check(CLI::IsMember({"tiny", "smollm135m"}));
  bench_gemm_cmd->add_option("--seq", bench_gemm.seq, "Tokens per sequence")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_gemm_cmd->add_option("--batch", bench_gemm.batch, "Sequences (rows = batch x seq)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_gemm_cmd->add_option("--threads", bench_gemm.threads, "Intra-op threads")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_gemm_cmd->add_option("--repeats", bench_gemm.repeats, "Timed runs per product (best kept)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);

  fedlora::sim::SecAggBenchOptions bench_secagg;
  CLI::App* bench_secagg_cmd = bench->add_subcommand(
      "secagg",
      "Secure aggregation (SecAgg/SecAgg+) of N agents in one process: agent masking time, "
      "coordinator unmask time, bytes per agent vs plaintext fp32, exactness of the sum");
  bench_secagg_cmd->add_option("--agents", bench_secagg.agents, "Agents in the round (>= 3)")
      ->capture_default_str()
      ->check(CLI::Range(3, 1000000));
  bench_secagg_cmd->add_option("--params", bench_secagg.params, "Parameters per update")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_secagg_cmd->add_option("--dropout", bench_secagg.dropout,
                               "Fraction of agents dropping after ShareKeys, in [0, 1)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 0.999999));
  bench_secagg_cmd->add_option("--neighbours", bench_secagg.neighbours,
                               "SecAgg+ neighbours k (0 = 2*ceil(1.5*log2 N); >= N-1 = full)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  bench_secagg_cmd->add_option("--threshold", bench_secagg.threshold,
                               "Shamir threshold t per neighbourhood (0 = majority)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  bench_secagg_cmd->add_option("--threads", bench_secagg.threads, "Coordinator unmask threads")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_secagg_cmd->add_option("--seed", bench_secagg.seed, "Seed")->capture_default_str();
  bench_train_cmd->add_flag("--grad-checkpoint", bench_train.grad_checkpoint,
                            "Recompute each decoder layer in backward (gradient checkpointing)");
  bench_train_cmd
      ->add_option("--attention", bench_train.attention,
                   "fused: the engine's fused causal attention; plain: matmul + softmax")
      ->capture_default_str()
      ->check(CLI::IsMember({"fused", "plain"}));
  bench_train_cmd
      ->add_option("--gemm", bench_train.gemm,
                   "onednn: frozen fp32 projections on oneDNN; torch: on torch::matmul (BLAS)")
      ->capture_default_str()
      ->check(CLI::IsMember({"onednn", "torch"}));
  bench_train_cmd->add_option("--profile", bench_train.profile,
                              "Also write a Chrome trace (libtorch profiler: every op and autograd "
                              "node) of one more, untimed step to this file");

  fedlora::sim::CoordinatorBenchOptions bench_coord;
  CLI::App* bench_coord_cmd = bench->add_subcommand(
      "coordinator",
      "The real fedlora-coordinator (child process) under N light agents (random updates, no "
      "training) over loopback gRPC with mutual TLS: sealed FedAvg rounds; round wall time, "
      "aggregation throughput, coordinator peak RSS, updates lost. One JSON line per round, "
      "then a summary line; exit code 1 when an update was lost or a round did not complete");
  bench_coord_cmd->add_option("--agents", bench_coord.agents, "Light agents (each its own "
                              "certificate, channel and Session)")
      ->capture_default_str()
      ->check(CLI::Range(1, 20000));
  bench_coord_cmd->add_option("--params", bench_coord.params,
                              "Parameters per update (LoRA factors on q_proj/v_proj; exact when "
                              "a multiple of --rank)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_coord_cmd->add_option("--rounds", bench_coord.rounds, "Rounds")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_coord_cmd->add_option("--rank", bench_coord.rank, "LoRA rank r")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  bench_coord_cmd->add_option("--secure-aggregation", bench_coord.secure_aggregation,
                              "Only 'off' (sealed updates); secure aggregation: bench secagg")
      ->capture_default_str()
      ->check(CLI::IsMember({"off"}));
  bench_coord_cmd->add_option("--max-concurrent-uploads", bench_coord.max_concurrent_uploads,
                              "The coordinator's upload bound (its --max-concurrent-uploads)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_coord_cmd->add_option("--worker-threads", bench_coord.worker_threads,
                              "The coordinator's --worker-threads")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_coord_cmd->add_option("--client-uploads", bench_coord.client_uploads,
                              "Updates the light agents prepare or upload at once (bench memory)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_coord_cmd->add_option("--prepare-threads", bench_coord.prepare_threads,
                              "Threads making and sealing the light agents' updates")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_coord_cmd->add_option("--timeout-s", bench_coord.timeout_s, "Limit for the whole run")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  bench_coord_cmd->add_option("--coordinator-bin", bench_coord.coordinator_bin,
                              "fedlora-coordinator to run (default: beside fedlora-sim)");
  bench_coord_cmd->add_option("--work-dir", bench_coord.work_dir,
                              "Keep the PKI, store and coordinator log here (default: a temp dir, "
                              "removed)");
  bench_coord_cmd->add_option("--seed", bench_coord.seed, "Seed of the random updates")
      ->capture_default_str();

  CLI11_PARSE(app, argc, argv);

  if (bench_coord_cmd->parsed()) {
    auto result = fedlora::sim::RunCoordinatorBench(bench_coord);
    if (!result.ok()) {
      std::fprintf(stderr, "error: bench coordinator: %s\n", result.status().ToString().c_str());
      return 1;
    }
    for (const auto& round : result->rounds) {
      std::printf("%s\n", fedlora::sim::CoordinatorBenchRoundJson(*result, round).c_str());
    }
    std::printf("%s\n", fedlora::sim::CoordinatorBenchSummaryJson(*result).c_str());
    if (!result->error.empty()) {
      std::fprintf(stderr, "error: bench coordinator: %s\n", result->error.c_str());
    }
    const bool complete = result->error.empty() && result->updates_lost == 0 &&
                          result->rounds_completed == bench_coord.rounds;
    return complete ? 0 : 1;
  }

  if (bench_gemm_cmd->parsed()) {
    auto results = fedlora::sim::RunGemmBench(bench_gemm);
    if (!results.ok()) {
      std::fprintf(stderr, "error: bench gemm: %s\n", results.status().ToString().c_str());
      return 1;
    }
    for (const auto& r : *results) {
      std::printf("%s\n", fedlora::sim::GemmBenchJson(bench_gemm, r).c_str());
    }
    return 0;
  }

  if (bench_train_cmd->parsed()) {
    auto result = fedlora::sim::RunTrainBench(bench_train);
    if (!result.ok()) {
      std::fprintf(stderr, "error: bench train: %s\n", result.status().ToString().c_str());
      return 1;
    }
    std::printf("%s\n", fedlora::sim::TrainBenchJson(*result).c_str());
    return 0;
  }

  if (bench_secagg_cmd->parsed()) {
    auto result = fedlora::sim::RunSecAggBench(bench_secagg);
    if (!result.ok()) {
      std::fprintf(stderr, "error: bench secagg: %s\n", result.status().ToString().c_str());
      return 1;
    }
    std::printf("%s\n", fedlora::sim::SecAggBenchJson(*result).c_str());
    return result->correct ? 0 : 1;
  }

  if (make_model->parsed()) {
    auto info = fedlora::sim::MakeTinyModel(model_out, model);
    if (!info.ok()) {
      std::fprintf(stderr, "error: make-model: %s\n", info.status().ToString().c_str());
      return 1;
    }
    std::printf("wrote %s: llama, %d layers, hidden %d, vocab %d, %lld parameters\n",
                model_out.c_str(), model.num_layers, model.hidden_size, info->vocab_size,
                static_cast<long long>(info->num_parameters));
    return 0;
  }
  if (make_data->parsed()) {
    absl::Status status = fedlora::sim::MakeSiteData(data_out, sites, examples, heldout, data_seed);
    if (!status.ok()) {
      std::fprintf(stderr, "error: make-data: %s\n", status.ToString().c_str());
      return 1;
    }
    std::printf("wrote %s: %d sites x (%d train + %d held-out) examples\n", data_out.c_str(),
                sites, examples, heldout);
    return 0;
  }
  return 0;
}
