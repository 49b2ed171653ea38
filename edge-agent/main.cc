// fedlora-agent: the edge agent. Thin wrapper over edge::Agent and edge::RunModelCli.
//
//   fedlora-agent run --coordinator HOST:PORT --ca F --cert F --key F --model DIR
//                     --data TRAIN.jsonl --eval HELDOUT.jsonl [--threads N]
//                     [--max-offline SECONDS] [--seed S] [--max-seq-len N]
//                     [--base-dtype auto|fp32|bf16|fp16|int8|int4] [--bf16] [--pack] [--grad-checkpoint]
//                     [--progress-every N] [--replay GENERAL.jsonl --replay-fraction F]
//                     [--forgetting-probe GENERAL.jsonl] [--eval-generate N]
//   fedlora-agent model inspect|tokenize|logits|generate ...
//   fedlora-agent export --model DIR (--adapter PEFT_DIR | --version-blob FILE) --format F ...
//   fedlora-agent enroll --coordinator HOST:PORT [--token T] --ca CA.pem --name ID [--out DIR]
//                        [--wait-s N] [--poll-s N]
//     Generates this agent's key here (it never leaves), enrolls with a one-time token
//     on the coordinator's enrollment port; writes DIR/ID.key (0600) and DIR/ID.pem.
//     Without --token (coordinator in enrollment_approval: admin) files a request and
//     waits, printing progress, until an admin approves or denies it.
//   fedlora-agent renew --coordinator HOST:PORT --ca F --cert F --key F [--within-days N]
//     (run --renew-within-days N does the same once at start)
//     Renews the certificate with the current one (new key, files replaced atomically).

#include <pthread.h>
#include <signal.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "common/net/enroll_client.h"
#include "edge-agent/agent.h"
#include "edge-agent/data.h"
#include "edge-agent/export_cli.h"
#include "edge-agent/model_cli.h"
#include "edge-agent/trainer.h"

namespace {

struct RunFlags {
  std::string coordinator;
  std::string ca;
  std::string cert;
  std::string key;
  std::string model;
  std::string data;
  std::string eval;
  std::string tls_server_name;
  std::string signing_pub;
  int threads = 0;
  double max_offline_s = 0;
  double rpc_timeout_s = 120;
  uint64_t seed = 0;
  int max_seq_len = 256;
  int64_t renew_within_days = 0;
  std::string base_dtype = "auto";
  bool bf16 = false;
  bool pack = false;
  bool grad_checkpoint = false;
  int progress_every = 10;
  std::string replay;
  float replay_fraction = 0.1f;
  std::string forgetting_probe;
  int eval_generate = 0;
};

// With --renew-within-days N, renews the certificate at start when it expires
// within N days. A failure is a warning while the current certificate is valid.
void MaybeRenewAtStart(const RunFlags& flags) {
  if (flags.renew_within_days <= 0) return;
  fedlora::common::RenewRequestOptions o;
  o.coordinator = flags.coordinator;
  o.ca_cert = flags.ca;
  o.cert = flags.cert;
  o.key = flags.key;
  o.tls_server_name = flags.tls_server_name;
  o.within_days = flags.renew_within_days;
  auto renewed = fedlora::common::RenewAgentCertificate(o);
  if (!renewed.ok()) {
    std::fprintf(stderr, "warning: certificate renewal failed (continuing with the current one): %s\n",
                 renewed.status().ToString().c_str());
  } else if (renewed->renewed) {
    std::fprintf(stderr, "renewed %s (fingerprint %s)\n", flags.cert.c_str(),
                 renewed->fingerprint.c_str());
  }
}

int RunAgent(const RunFlags& flags) {
  using fedlora::edge::Agent;
  MaybeRenewAtStart(flags);
  auto train = fedlora::edge::LoadJsonl(flags.data);
  if (!train.ok()) {
    std::fprintf(stderr, "error: --data: %s\n", train.status().ToString().c_str());
    return 2;
  }
  if (train->empty()) {
    std::fprintf(stderr, "error: --data %s holds no examples\n", flags.data.c_str());
    return 2;
  }
  auto eval = fedlora::edge::LoadJsonl(flags.eval);
  if (!eval.ok()) {
    std::fprintf(stderr, "error: --eval: %s\n", eval.status().ToString().c_str());
    return 2;
  }
  fedlora::edge::EngineOptions engine;
  engine.threads = flags.threads;
  engine.base_dtype = flags.base_dtype;
  engine.bf16_autocast = flags.bf16;
  engine.pack_sequences = flags.pack;
  engine.gradient_checkpointing = flags.grad_checkpoint;
  engine.progress_every = flags.progress_every;
  engine.eval_generate_max_new_tokens = flags.eval_generate;
  if (!flags.replay.empty()) {
    auto replay = fedlora::edge::LoadJsonl(flags.replay);
    if (!replay.ok()) {
      std::fprintf(stderr, "error: --replay: %s\n", replay.status().ToString().c_str());
      return 2;
    }
    if (replay->empty()) {
      std::fprintf(stderr, "error: --replay %s holds no examples\n", flags.replay.c_str());
      return 2;
    }
    engine.replay = std::move(*replay);
    engine.replay_fraction = flags.replay_fraction;
  }
  if (!flags.forgetting_probe.empty()) {
    auto probe = fedlora::edge::LoadJsonl(flags.forgetting_probe);
    if (!probe.ok()) {
      std::fprintf(stderr, "error: --forgetting-probe: %s\n", probe.status().ToString().c_str());
      return 2;
    }
    if (probe->empty()) {
      std::fprintf(stderr, "error: --forgetting-probe %s holds no examples\n",
                   flags.forgetting_probe.c_str());
      return 2;
    }
    engine.forgetting_probe = std::move(*probe);
  }
  auto trainer = fedlora::edge::LoadTrainer(flags.model, engine);
  if (!trainer.ok()) {
    std::fprintf(stderr, "error: --model %s: %s\n", flags.model.c_str(),
                 trainer.status().ToString().c_str());
    return 1;
  }

  fedlora::edge::AgentOptions options;
  options.coordinator = flags.coordinator;
  options.tls = {flags.ca, flags.cert, flags.key};
  options.tls_server_name = flags.tls_server_name;
  options.signing_public_key = flags.signing_pub;
  options.train = std::move(*train);
  options.eval = std::move(*eval);
  options.max_seq_len = flags.max_seq_len;
  options.seed = flags.seed;
  options.max_offline = std::chrono::milliseconds(static_cast<int64_t>(flags.max_offline_s * 1000));
  options.rpc_timeout = std::chrono::milliseconds(static_cast<int64_t>(flags.rpc_timeout_s * 1000));
  auto agent = Agent::Create(std::move(options), trainer->get());
  if (!agent.ok()) {
    std::fprintf(stderr, "error: %s\n", agent.status().ToString().c_str());
    return 1;
  }

  // SIGINT/SIGTERM are blocked in every thread (see main) and taken here.
  std::thread signals([a = agent->get()] {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGUSR1);
    int sig = 0;
    if (sigwait(&set, &sig) == 0 && sig != SIGUSR1) a->Stop();
  });
  absl::Status status = (*agent)->Run();
  pthread_kill(signals.native_handle(), SIGUSR1);  // wakes the signal thread if still waiting
  signals.join();
  if (!status.ok()) {
    std::fprintf(stderr, "error: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Block the stop signals before any thread exists so that every thread
  // (gRPC's included) inherits the mask and only the signal thread takes them.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  if (argc >= 2 && std::string(argv[1]) == "model") {
    return fedlora::edge::RunModelCli(std::vector<std::string>(argv + 2, argv + argc));
  }
  if (argc >= 2 && std::string(argv[1]) == "export") {
    return fedlora::edge::RunExportCli(std::vector<std::string>(argv + 2, argv + argc), std::cout,
                                       std::cerr);
  }

  CLI::App app{"fedlora-agent: federated LoRA fine-tuning edge agent"};
  app.require_subcommand(1);
  RunFlags flags;
  CLI::App* run = app.add_subcommand(
      "run",
      "Join a federation: keep a session with the coordinator, train the LoRA adapter on the "
      "local training set for each round, submit it sealed to the coordinator, and evaluate "
      "every published version on the held-out set. Stops on SIGINT/SIGTERM.");
  run->add_option("--coordinator", flags.coordinator, "Coordinator address HOST:PORT")
      ->required();
  run->add_option("--ca", flags.ca, "Fleet CA certificate (PEM)")
      ->required()
      ->check(CLI::ExistingFile);
  run->add_option("--cert", flags.cert, "This agent's certificate (PEM); its CN is the agent id")
      ->required()
      ->check(CLI::ExistingFile);
  run->add_option("--key", flags.key, "This agent's private key (PEM)")
      ->required()
      ->check(CLI::ExistingFile);
  run->add_option("--model", flags.model,
                  "Base model: Hugging Face checkpoint folder (config.json, *.safetensors, "
                  "tokenizer.json)")
      ->required()
      ->check(CLI::ExistingDirectory);
  run->add_option("--data", flags.data,
                  "Private training set, JSONL of {\"instruction\",\"input\",\"output\"}")
      ->required()
      ->check(CLI::ExistingFile);
  run->add_option("--eval", flags.eval, "Private held-out set, same format as --data")
      ->required()
      ->check(CLI::ExistingFile);
  run->add_option("--threads", flags.threads, "Compute threads (0 = all cores)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  run->add_option("--max-offline", flags.max_offline_s,
                  "Exit (status 0) once the coordinator has been unreachable for this many "
                  "seconds (0 = keep retrying forever)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  run->add_option("--seed", flags.seed, "Seed of local training (mixed with the round id)")
      ->capture_default_str();
  run->add_option("--max-seq-len", flags.max_seq_len, "Longest example in tokens")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  run->add_option("--base-dtype", flags.base_dtype,
                  "Storage of the frozen base weights: auto, fp32, bf16, fp16, int8 or int4 "
                  "(auto: fp32, and with --bf16 the projections and an untied lm_head in bf16, "
                  "which autocast reads rounded anyway: the same products, half their memory)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "fp32", "bf16", "fp16", "int8", "int4"}));
  run->add_flag("--bf16", flags.bf16,
                "Run the training forward under CPU autocast to bfloat16 (LoRA weights and "
                "optimizer state stay fp32)");
  run->add_flag("--pack", flags.pack,
                "Pack several examples into each max-seq-len row (attention does not cross "
                "examples; same loss, less padding)");
  run->add_flag("--grad-checkpoint", flags.grad_checkpoint,
                "Gradient checkpointing: keep each decoder layer's input (and its frozen "
                "projections' outputs) and recompute the rest in backward; less memory, "
                "some more compute");
  run->add_option("--progress-every", flags.progress_every,
                  "Print a progress line to stderr every N local training steps (0 = never)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  run->add_option("--replay", flags.replay,
                  "General data (JSONL; {\"text\"} lines or the --data formats) mixed into "
                  "local training")
      ->check(CLI::ExistingFile);
  run->add_option("--replay-fraction", flags.replay_fraction,
                  "Share of the local training set that --replay examples make up, in [0, 1)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 0.99));
  run->add_option("--forgetting-probe", flags.forgetting_probe,
                  "General-text set (JSONL) whose perplexity is measured before and after each "
                  "round's local training")
      ->check(CLI::ExistingFile);
  run->add_option("--eval-generate", flags.eval_generate,
                  "Also greedy-decode up to N tokens per held-out example and score exact match "
                  "/ token F1 (0 = off)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  run->add_option("--rpc-timeout", flags.rpc_timeout_s,
                  "Deadline of each FetchAdapter / SubmitUpdate call, seconds")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  run->add_option("--tls-server-name", flags.tls_server_name,
                  "Name to verify in the coordinator's certificate (default: HOST)");
  run->add_option("--signing-pub", flags.signing_pub,
                  "Coordinator signing public key (PEM); adapters must verify against it "
                  "(default: coordinator-signing.pub beside --ca, when present)");
  run->add_option("--renew-within-days", flags.renew_within_days,
                  "At start, renew the certificate (Certificates.Renew) when it expires within "
                  "N days (0 = never)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_subcommand("model",
                     "Model tools: inspect | tokenize | logits | generate "
                     "(fedlora-agent model --help)");
  app.add_subcommand("export",
                     "Export an adapter (PEFT dir or version blob) as PEFT, llama.cpp LoRA GGUF "
                     "or merged GGUF (fedlora-agent export --help)");

  fedlora::common::EnrollRequestOptions enroll_options;
  enroll_options.out_dir = ".";
  CLI::App* enroll = app.add_subcommand(
      "enroll",
      "Enroll this agent: generate its key locally, send a CSR with a one-time token to the "
      "coordinator's enrollment port, and write <out>/<name>.key and <out>/<name>.pem. "
      "Without --token (coordinator with enrollment_approval: admin) the CSR waits for "
      "`fedlora-admin enroll approve`; this command polls and prints progress until then "
      "(rerun it to resume an interrupted wait)");
  enroll->add_option("--coordinator", enroll_options.coordinator,
                     "Coordinator enrollment address HOST:PORT")
      ->required();
  enroll->add_option("--token", enroll_options.token,
                     "One-time token (fedlora-admin enroll create); omit to ask an admin to "
                     "approve (enrollment_approval: admin)");
  enroll->add_option("--wait-s", enroll_options.wait_s,
                     "Without --token: give up after N seconds still pending (files kept)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  int enroll_poll_s = 5;
  enroll->add_option("--poll-s", enroll_poll_s, "Without --token: seconds between polls")
      ->capture_default_str()
      ->check(CLI::Range(1, 3600));
  enroll->add_option("--ca", enroll_options.ca_cert, "Fleet CA certificate (PEM)")
      ->required()
      ->check(CLI::ExistingFile);
  enroll->add_option("--name", enroll_options.name, "Agent id: the name the token was made for")
      ->required();
  enroll->add_option("--out", enroll_options.out_dir, "Directory for the key and certificate")
      ->capture_default_str()
      ->check(CLI::ExistingDirectory);
  enroll->add_option("--tls-server-name", enroll_options.tls_server_name,
                     "Name to verify in the coordinator's certificate (default: HOST)");
  fedlora::common::RenewRequestOptions renew_options;
  CLI::App* renew = app.add_subcommand(
      "renew",
      "Renew this agent's certificate with the current one (Certificates.Renew); the key and "
      "certificate files are replaced atomically, the old pair kept as *.old");
  renew->add_option("--coordinator", renew_options.coordinator, "Coordinator address HOST:PORT")
      ->required();
  renew->add_option("--ca", renew_options.ca_cert, "Fleet CA certificate (PEM)")
      ->required()
      ->check(CLI::ExistingFile);
  renew->add_option("--cert", renew_options.cert, "Current certificate (PEM), replaced")
      ->required()
      ->check(CLI::ExistingFile);
  renew->add_option("--key", renew_options.key, "Current private key (PEM), replaced")
      ->required()
      ->check(CLI::ExistingFile);
  renew->add_option("--within-days", renew_options.within_days,
                    "Renew only if the certificate expires within N days (0 = now)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  renew->add_option("--tls-server-name", renew_options.tls_server_name,
                    "Name to verify in the coordinator's certificate (default: HOST)");

  CLI11_PARSE(app, argc, argv);
  if (run->parsed()) return RunAgent(flags);
  if (enroll->parsed()) {
    enroll_options.poll_interval_ms = enroll_poll_s * 1000;
    enroll_options.progress = [](const std::string& line) {
      std::printf("fedlora-agent enroll: %s\n", line.c_str());
      std::fflush(stdout);
    };
    auto files = fedlora::common::EnrollAgent(enroll_options);
    if (!files.ok()) {
      std::fprintf(stderr, "fedlora-agent enroll: %s\n", files.status().ToString().c_str());
      return 1;
    }
    std::printf("enrolled '%s': %s and %s (fingerprint %s, expires unix %lld)\n",
                enroll_options.name.c_str(), files->cert_path.c_str(), files->key_path.c_str(),
                files->fingerprint.c_str(), static_cast<long long>(files->not_after_unix));
    return 0;
  }
  if (renew->parsed()) {
    auto renewed = fedlora::common::RenewAgentCertificate(renew_options);
    if (!renewed.ok()) {
      std::fprintf(stderr, "fedlora-agent renew: %s\n", renewed.status().ToString().c_str());
      return 1;
    }
    std::printf("%s %s (fingerprint %s, expires unix %lld)\n",
                renewed->renewed ? "renewed" : "not due yet; kept", renew_options.cert.c_str(),
                renewed->fingerprint.c_str(), static_cast<long long>(renewed->not_after_unix));
    return 0;
  }
  return 0;
}
