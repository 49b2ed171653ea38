#pragma once
// Coordinator configuration: defaults, a YAML file and command-line flags.
//
// Precedence: flags > YAML file (--config) > defaults. The YAML file is a flat
// mapping whose keys are the flag names with '_' for '-' (e.g. `min_participants: 3`,
// `lora_target_modules: [q_proj, v_proj]`). An unknown key, a value of the wrong type
// or an out-of-range value is an InvalidArgument error naming the file, line and key.
// Validate() checks cross-field rules (min <= max, TLS files present, ...).
// One nested section: `aggregation:` with keys strategy, prox_mu, server_lr, beta1,
// beta2, tau (flags --strategy, --prox-mu, --server-lr, --beta1, --beta2, --tau;
// docs/aggregation.md).

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "coordinator/fedbuff.h"
#include "coordinator/robust_aggregator.h"
#include "coordinator/strategy.h"

namespace CLI {
class App;
}

namespace fedlora::coordinator {

struct CoordinatorConfig {
  std::string coordinator_id = "fedlora-coordinator";
  std::string listen_address = "0.0.0.0:7443";
  // Plain-HTTP /metrics and /healthz (coordinator/http_server.h), HOST:PORT; "" = off.
  std::string metrics_address = "";
  std::string data_dir = "fedlora-data";
  // Mutual TLS (common/net/tls.h).
  std::string tls_ca = "";
  std::string tls_cert = "";
  std::string tls_key = "";
  // Security at rest (docs/security.md): the AES-256-GCM key file for sealed
  // updates and blobs ("" = off), and the Ed25519 key signing published versions
  // ("" = coordinator-signing.key beside tls_key when present, else unsigned).
  std::string at_rest_key = "";
  std::string signing_key = "";
  // Enrollment and renewal (docs/security.md): the CA key that signs agent CSRs
  // ("" = enrollment and renewal are refused), the enrollment port (server-auth
  // TLS 1.3, HOST:PORT; "" = off) and the validity of the certificates issued.
  std::string ca_key = "";
  std::string enroll_address = "";
  uint32_t cert_validity_days = 90;
  // How enrollment is approved: "token" (a one-time token from `fedlora-admin
  // enroll create` only) or "admin" (also token-less requests that wait for
  // `fedlora-admin enroll approve`; needs enroll_address).
  std::string enrollment_approval = "token";
  // The base model agents must hold: its hash, or a directory to hash
  // (common::HashModelDirectory). Exactly one is required.
  std::string base_model_hash = "";
  std::string base_model_dir = "";

  uint32_t min_participants = 2;
  uint32_t max_participants = 1000;
  uint64_t rounds = 0;  // 0 = run forever
  // Once min_participants are online, wait this long (or until max_participants are
  // online) before selecting, so that agents connecting together join one round.
  uint32_t select_wait_ms = 0;

  // Training task sent to agents (RoundTask).
  uint32_t local_steps = 10;
  double learning_rate = 1e-4;
  uint32_t batch_size = 4;
  uint32_t lora_rank = 8;
  double lora_alpha = 16;
  std::vector<std::string> lora_target_modules = {"q_proj", "v_proj"};
  uint64_t lora_init_seed = 42;

  uint64_t round_deadline_s = 600;           // TRAIN phase length
  uint64_t max_update_bytes = 256ull << 20;  // sealed payload limit
  // SubmitUpdate calls holding payload bytes at once, coordinator-wide; more wait
  // (their bytes stay in the client) until one finishes (coordinator/upload_limiter.h).
  // Payload memory is about max_concurrent_uploads x update size.
  uint32_t max_concurrent_uploads = 8;
  // gRPC's HTTP/2 BDP probing on the main port. Off: each stream's receive window
  // stays at gRPC's 64 KiB default, so an upload waiting for a slot holds at most
  // that in the coordinator. On: windows grow with the measured bandwidth-delay
  // product (faster single uploads over long-RTT links), and a waiting upload may
  // hold up to that window (megabytes on fast links) in coordinator memory.
  bool grpc_bdp_probe = false;
  // Memory of all gRPC connections of the main port together (MiB; a
  // grpc::ResourceQuota). Under its pressure gRPC reads sockets in smaller pieces
  // and gives back buffers it holds for later reads; at the quota it may cancel
  // calls (RESOURCE_EXHAUSTED). 0 = no quota (gRPC's default).
  uint32_t grpc_memory_quota_mb = 128;
  // RocksDB memtables of all column families together (MiB, common::StoreTuning);
  // 0 = RocksDB's defaults (up to 2 x 64 MiB per column family).
  uint32_t store_memtable_mb = 64;
  uint32_t heartbeat_interval_ms = 10000;
  uint64_t eval_grace_s = 60;         // wait for eval reports after publish
  uint32_t tick_ms = 200;             // round manager timer period
  uint32_t shutdown_grace_ms = 5000;  // server->Shutdown deadline
  uint32_t worker_threads = 2;        // crypto / parsing / aggregation pool
  std::string log_format = "text";    // "text" | "json"
  std::string log_level = "info";     // "debug" | "info" | "warn" | "error"

  // Quantization of published adapter blobs: "q8_0" | "q4_0" (docs/operations.md).
  std::string publish_quant = "q8_0";

  // How updates become the next version (coordinator/strategy.h).
  StrategyParams aggregation;

  // Round mode (docs/protocol.md): "sync" = rounds of selected agents with a
  // deadline; "async" = FedBuff (coordinator/fedbuff.h): idle agents get a task
  // whenever fewer than async_concurrency are training, accepted updates fill a
  // buffer and every async_buffer_size updates are aggregated (staleness-weighted)
  // into a new version. Async needs strategy fedavg or fedprox, no secure
  // aggregation ("auto" = off, "on" is refused), no DP and robust_rule none.
  std::string mode = "sync";
  uint32_t async_buffer_size = 10;   // K: updates per published version
  uint32_t async_concurrency = 100;  // agents training at once
  // Updates whose base version is more than this many versions behind are refused.
  uint32_t async_max_staleness = 10;
  std::string async_staleness_weight = "polynomial";  // constant | polynomial
  double async_staleness_exponent = 0.5;              // a in s(tau) = 1/(1+tau)^a
  double async_server_lr = 1.0;                       // x' = x + server_lr * weighted mean delta
  bool async_mode() const { return mode == "async"; }
  // The FedBuff options of a valid config.
  FedBuffOptions fedbuff() const;

  // Secure aggregation (docs/privacy.md): "auto" = on for rounds of >= 3 agents,
  // "on" = every round (>= 3 agents, else the round waits), "off" = sealed updates.
  std::string secure_aggregation = "auto";
  uint32_t secagg_neighbours = 0;        // k; 0 = SecAgg+ default for the cohort size
  uint32_t secagg_threshold = 0;         // t; 0 = a majority of each neighbourhood
  double secagg_clip_range = 1.0;        // fixed point: adapter values clipped to [-R, R]
  uint32_t secagg_phase_timeout_s = 60;  // each key / masked-input / unmask phase
  // Client-level differential privacy (secure-aggregation rounds only): agents clip
  // their update to dp_clip_norm (0 = no DP) and add Gaussian noise shares with
  // this multiplier; rounds that would raise epsilon past dp_epsilon_budget (at
  // dp_delta) are not started (0 = no limit, epsilon is still reported).
  double dp_clip_norm = 0;
  double dp_noise_multiplier = 1.0;
  double dp_epsilon_budget = 0;
  double dp_delta = 1e-5;
  // Robust aggregation (coordinator/robust_aggregator.h) of sealed updates: "none" (the
  // strategy's weighted mean), "mean" (norm bounding only), "trimmed-mean" or "median".
  // It needs each update, so it implies no secure aggregation ("auto" then turns
  // it off; "on" with it is refused) and no DP; its result goes through the strategy's
  // server step like the mean would (fedavg, fedprox, fedadam, fedyogi only).
  std::string robust_rule = "none";
  double robust_trim_fraction = 0.1;               // beta of trimmed-mean, in [0, 0.5)
  std::string robust_norm_bound = "median-multiple";  // none | absolute | median-multiple
  double robust_norm_bound_value = 2.0;            // B, or the multiple of the median norm
  // True when a round of `participants` agents uses secure aggregation.
  bool SecureAggregationFor(size_t participants) const;

  absl::Status Validate() const;
};

// The robust aggregation options of a config whose robust_rule is not "none";
// InvalidArgument naming the field.
absl::StatusOr<RobustOptions> RobustOptionsFromConfig(const CoordinatorConfig& config);

// Applies a YAML file on top of `config`.
absl::Status LoadYamlFile(const std::string& path, CoordinatorConfig* config);
absl::Status LoadYamlString(const std::string& yaml, const std::string& source,
                            CoordinatorConfig* config);

// Parses argv: defaults, then --config FILE, then flags. On --help, prints help to
// stdout and returns a Status with code kCancelled (caller exits 0). Also validates.
absl::StatusOr<CoordinatorConfig> ParseCoordinatorFlags(int argc, const char* const* argv);

// The help text (lists every flag).
std::string CoordinatorHelp();

}  // namespace fedlora::coordinator
