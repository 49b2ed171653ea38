#pragma once
// The edge agent runtime: the client side of docs/protocol.md.
//
// An Agent drives one LocalTrainer against the coordinator over gRPC with
// mutual TLS. It keeps one `Coordinator.Session` stream open (Hello, then
// heartbeats on a timer), and for each message coming down the stream:
//   RoundTask     -> apply base_version (fetch + verify + SetAdapter, or
//                    InitAdapter for ""), Evaluate held-out (eval_loss_before),
//                    Train, GetAdapter -> safetensors -> SealToPublicKey with AAD
//                    "fedlora-update-v1|<round>|<agent>|<base hash>|<base version>"
//                    -> SubmitUpdate in <= 1 MiB checksummed chunks.
//   VersionNotice -> fetch + verify (SHA-256 per chunk and of the whole blob),
//                    apply, Evaluate, send EvalReport.
// Adapter signatures (docs/security.md): with the coordinator's signing public
// key (AgentOptions::signing_public_key, or coordinator-signing.pub beside the
// CA file when it exists) every version is applied only after its signed
// statement (VersionNotice.signature or AdapterChunk.signature) verifies and
// names this version, the blob's SHA-256 and this agent's base-model hash, and
// the blob's own metadata agrees with it. A version that fails is refused
// (adapters_refused, a clear error in last_error): the agent keeps its last good
// version and reports nothing for the refused one. Without a key, versions are
// applied after the hash checks only, and the agent logs that once.
// FetchAdapter resumes from the last good byte after a broken stream (bounded
// retries with backoff). A dropped session is re-opened with backoff.
//
// Run() blocks until Stop() is called (from any thread, e.g. a signal
// thread), until the coordinator has been unreachable for longer than
// `max_offline` (when set), or until the coordinator refuses the agent for
// good (PERMISSION_DENIED / FAILED_PRECONDITION / INVALID_ARGUMENT /
// UNIMPLEMENTED / UNAUTHENTICATED on Hello), which Run() returns as an error.
// Stop() interrupts waits and in-flight RPCs at once; a Train() or Evaluate()
// call already running finishes first (the trainer cannot be interrupted).
//
// Threads: Run()'s thread owns the trainer and does all training, fetching and
// submitting; per session a reader thread reads the stream and a heartbeat
// thread writes heartbeats. Writes to the stream are serialized by a mutex.
// Stop() and stats() are safe to call concurrently with Run(); Run() may be
// called once.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <grpcpp/support/client_interceptor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/crypto/sign.h"
#include "common/net/tls.h"
#include "common/tensor/tensor.h"
#include "edge-agent/secagg_client.h"
#include "edge-agent/trainer.h"

namespace grpc {
class Channel;
class ClientContext;
}  // namespace grpc

namespace fedlora::v1 {
class RoundTask;
class VersionNotice;
class CoordinatorMessage;
}  // namespace fedlora::v1

namespace fedlora::edge {

inline constexpr size_t kUpdateChunkBytes = 1 << 20;  // protocol maximum per chunk
inline constexpr char kAgentSoftwareVersion[] = "fedlora-agent/0.1.0";

struct AgentOptions {
  std::string coordinator;         // "host:port"
  common::TlsFiles tls;            // fleet CA, own certificate and key (PEM paths)
  std::string tls_server_name;     // overrides the name checked in the server certificate
  std::vector<Example> train;      // private training set (num_examples = its size)
  std::vector<Example> eval;       // private held-out set
  int max_seq_len = 256;
  uint64_t seed = 0;               // mixed with the round id into TrainOptions::seed

  // 0 = retry forever. Otherwise Run() returns OK once no session could be
  // established for this long (measured from start or from the last drop).
  std::chrono::milliseconds max_offline{0};
  std::chrono::milliseconds hello_timeout{10000};   // wait for Welcome
  std::chrono::milliseconds rpc_timeout{120000};    // deadline of each FetchAdapter/SubmitUpdate call
  std::chrono::milliseconds backoff_initial{250};   // reconnect/retry backoff, doubled per failure
  std::chrono::milliseconds backoff_max{5000};
  int fetch_max_attempts = 6;      // FetchAdapter calls per blob before giving up
  int submit_max_attempts = 3;     // SubmitUpdate calls per update (UNAVAILABLE/DEADLINE only)
  uint32_t fetch_chunk_size = 0;   // requested chunk size (0 = server default)
  uint64_t max_adapter_bytes = 1ull << 30;  // refuse larger blobs
  // Coordinator signing public key (PEM). "" = coordinator-signing.pub beside
  // tls.ca_cert when that file exists, else versions are not signature-checked.
  std::string signing_public_key;
  // Tests only (never set by fedlora-agent): client interceptors for the agent's
  // channel, e.g. to record every message it sends (the canary test). Called
  // once, in Create().
  std::function<std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>>()>
      channel_interceptors;
};

struct AgentStats {
  uint64_t bytes_up = 0;           // update payload bytes sent (chunk data)
  uint64_t bytes_down = 0;         // adapter blob bytes received (chunk data)
  uint64_t sessions = 0;           // sessions welcomed
  uint64_t rounds_submitted = 0;   // updates accepted by the coordinator
  uint64_t rounds_failed = 0;      // tasks that did not end in an accepted update
  uint64_t evals_reported = 0;
  uint64_t heartbeats_sent = 0;
  uint64_t adapters_refused = 0;   // blobs that failed a checksum or did not decode
  std::string current_version;     // version last applied and kept ("" = none)
  std::string last_error;          // last problem logged
};

class Agent {
 public:
  // Validates the options (certificate readable, CN present) and builds the
  // channel; connects lazily in Run(). The agent id is the certificate CN.
  // `trainer` is borrowed and must outlive the Agent.
  static absl::StatusOr<std::unique_ptr<Agent>> Create(AgentOptions options, LocalTrainer* trainer);
  ~Agent();
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  absl::Status Run();
  void Stop();  // thread-safe, idempotent

  const std::string& agent_id() const { return agent_id_; }
  AgentStats stats() const;

 private:
  struct Session;
  struct Round;

  Agent(AgentOptions options, LocalTrainer* trainer, std::string agent_id,
        std::shared_ptr<grpc::Channel> channel);

  // One session: Hello, Welcome, then messages until the stream ends or Stop().
  // Returns the stream's final status; `welcomed` says whether it got that far.
  absl::Status RunSession(bool* welcomed);
  void HandleRoundTask(const v1::RoundTask& task, Session* session);
  // Secure-aggregation rounds (edge-agent/secagg_client.h).
  void HandleSecAggSetup(const v1::SecAggSetup& setup, Session* session);
  void HandleSecAggMessage(const v1::SecAggMessage& message, Session* session);
  void HandleVersionNotice(const v1::VersionNotice& notice, Session* session);

  // Puts the trainer's adapter at `version` ("" = fresh from `lora`).
  // `lora` nullptr = infer from the blob (InferLoraConfig). Expected sha/size
  // empty/0 = not known (RoundTask); a VersionNotice gives them.
  // `signature` / `round_id`: the VersionNotice's ("" / 0 = not known).
  absl::Status ApplyVersion(const std::string& version, const LoraConfig* lora,
                            const std::string& expected_sha256, uint64_t expected_size,
                            const std::string& signature = "", uint64_t round_id = 0);
  // `signature` (may be null) receives the chunks' signed statement.
  absl::StatusOr<std::string> FetchBlob(const std::string& version,
                                        const std::string& expected_sha256,
                                        uint64_t expected_size, std::string* signature = nullptr);
  // Checks a fetched blob against its signed statement (see above).
  absl::StatusOr<common::AdapterStatement> VerifyVersion(const std::string& version,
                                                         const std::string& blob,
                                                         const std::string& signature,
                                                         uint64_t round_id) const;
  // `masked`: the payload is a secure-aggregation masked input (UpdateHeader.masked).
  absl::Status SubmitUpdate(const v1::RoundTask& task, const std::string& payload,
                            const TrainResult& train, double eval_before, bool masked = false);
  absl::Status SubmitOnce(const v1::RoundTask& task, const std::string& payload,
                          const TrainResult& train, double eval_before, bool masked);

  // Sleeps `d` (backoff) while driving the channel's reconnection; returns
  // false as soon as Stop() was called.
  bool SleepUnlessStopped(std::chrono::milliseconds d);
  std::chrono::milliseconds Backoff(int failures);
  void RegisterCall(grpc::ClientContext* ctx);
  void UnregisterCall(grpc::ClientContext* ctx);
  void NoteError(const std::string& message);
  // Counts a refused adapter and records `status` as the last error; returns it.
  absl::Status CountRefusal(absl::Status status);
  void Log(const std::string& message) const;

  const AgentOptions options_;
  LocalTrainer* const trainer_;
  const std::string agent_id_;
  std::shared_ptr<grpc::Channel> channel_;
  std::string base_model_hash_;
  std::optional<common::VerifyKey> signing_key_;  // set in Create

  // Owned by Run()'s thread.
  std::string seal_public_key_;      // from Welcome; RoundTask's takes precedence
  std::optional<LoraConfig> lora_;   // from the last RoundTask
  std::string cached_version_;       // the version whose tensors are cached
  common::TensorMap cached_tensors_;
  common::Metadata cached_metadata_;
  uint64_t rng_state_ = 0;
  // The secure-aggregation round this agent trained for and awaits messages of
  // (kept across sessions; replaced by the next secure task).
  std::unique_ptr<SecAggClientRound> secagg_;

  mutable std::mutex mu_;            // guards everything below
  std::condition_variable stop_cv_;
  bool stop_ = false;
  std::set<grpc::ClientContext*> calls_;
  AgentStats stats_;
  bool ran_ = false;
};

// AAD binding a sealed update to its round, agent, base model and base version.
std::string UpdateAad(uint64_t round_id, const std::string& agent_id,
                      const std::string& base_model_hash, const std::string& base_version);

// Lora settings for a blob when no RoundTask told them: rank and target
// modules from the PEFT tensor names/shapes, alpha from blob metadata
// "fedlora.lora.alpha" when present (else `fallback.alpha`).
LoraConfig InferLoraConfig(const common::TensorMap& tensors, const common::Metadata& metadata,
                           const LoraConfig& fallback);

}  // namespace fedlora::edge
