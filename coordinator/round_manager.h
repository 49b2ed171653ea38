#pragma once
// The round state machine (docs/protocol.md, "A round"):
//
//   (no round) --select--> TRAIN --all updates | deadline & >= min--> AGGREGATE
//        ^                   |                                           |
//        |                   +--deadline & < min--> ABORTED              v
//        +-------------------------------------------------------- DONE (published)
//
// All state lives on one Boost.Asio io_context thread (the "manager thread"); every
// public method is safe to call from any thread (gRPC reactors): it posts work and
// answers through a callback, which runs on the manager thread or on a worker thread
// and must not block. CPU-heavy work (payload hashing, opening sealed updates,
// parsing safetensors, NaN checks, aggregation, quantization) runs on a small worker
// pool; aggregation of sealed updates reads, opens and parses up to worker_threads
// stored updates ahead on threads of its own while one thread adds them in agent
// order (memory O(worker_threads x adapter), whatever the number of updates).
// Every transition is written to the StateStore (synced) before it takes
// effect; Start() resumes an open round from the store (a TRAIN round keeps its
// stored updates; an AGGREGATE round is aggregated again).
//
// Async mode (config mode: async; FedBuff, coordinator/fedbuff.h, docs/protocol.md
// "Async rounds"): the open round is a buffer. Whenever an online agent has no
// task and fewer than async_concurrency agents are training, it gets a task from
// the current version (the task, with its deadline, is written to the round
// synced before it is sent; RoundTask.round_id carries the task id). An update is
// checked against its task (owner, not yet submitted: else ALREADY_EXISTS; base
// version; staleness tau = versions published since the task's base, at most
// async_max_staleness: else FAILED_PRECONDITION) and stored synced in the open
// buffer. Every async_buffer_size updates the buffer goes TRAIN -> AGGREGATE
// (synced), is aggregated (new = current + server_lr * staleness-weighted mean of
// update - its base version) and published like a sync round (strategy
// "fedbuff"); the next buffer opens at once and idle agents get new tasks.
// Updates arriving while a buffer is being aggregated wait (in memory, their RPC
// open) for the next buffer. A restart keeps the stored buffer (each update once)
// and redoes an aggregation in progress; tasks are rebuilt from the rounds. While
// no version exists, at most async_buffer_size tasks are out (an update trained
// from the fresh adapter cannot be merged once a version exists: refused).
//
// Deadlines use the injected Clock; a periodic timer (tick_ms) checks them, and
// Tick() runs one check synchronously (tests with a FakeClock).
//
// Round figures: when a published round's evaluation completes (every participant
// sent an EvalReport for its version, or eval_grace_s passed) one line is written to
// the output stream; with `rounds` set, once that many rounds are published and
// evaluated, a final JSON summary line is written and the finished callback runs.
//
// Shutdown: Stop() closes all agent sessions, stops transitions and answers any later
// request with UNAVAILABLE; Join() (after the gRPC server is down) drains the worker
// pool and ends the manager thread.

#include <atomic>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/crypto/crypto.h"
#include "common/quant/quant.h"
#include "common/tensor/tensor.h"
#include "coordinator/clock.h"
#include "coordinator/config.h"
#include "coordinator/dp_budget.h"
#include "coordinator/metrics.h"
#include "coordinator/secagg_round.h"
#include "coordinator/state_store.h"
#include "coordinator/versions.h"
#include "fedlora/v1/fedlora.pb.h"

namespace fedlora::coordinator {

// AAD an update is sealed with: "fedlora-update-v1|<round>|<agent>|<base hash>|<base version>".
std::string UpdateAad(uint64_t round_id, const std::string& agent_id,
                      const std::string& base_model_hash, const std::string& base_version);

// The down direction of one agent's Session stream. Implemented by the gRPC service
// (and by fakes in tests). Thread-safe and non-blocking.
class AgentLink {
 public:
  virtual ~AgentLink() = default;
  // The verified certificate CN of the peer.
  virtual const std::string& peer_cn() const = 0;
  // Queues a message; messages arrive in the order they were sent.
  virtual void Send(const fedlora::v1::CoordinatorMessage& message) = 0;
  // Ends the stream with `status` after queued messages are written.
  virtual void Close(const absl::Status& status) = 0;
};

struct IncomingUpdate {
  std::string peer_cn;
  fedlora::v1::UpdateHeader header;
  std::string payload;  // sealed bytes, already checked chunk by chunk
};

struct BlobRef {
  std::string version_id;
  std::string sha256;
  std::shared_ptr<const std::string> bytes;
  std::string signature;  // the version's signed statement ("" = unsigned)
};

class RoundManager {
 public:
  // `store` and `clock` must outlive the manager. `base_model_hash` is the hash
  // agents must present. `out` receives the round lines and the summary.
  RoundManager(const CoordinatorConfig& config, StateStore* store, const Clock* clock,
               std::string base_model_hash, std::ostream* out);
  ~RoundManager();  // Stop() + Join()
  RoundManager(const RoundManager&) = delete;
  RoundManager& operator=(const RoundManager&) = delete;

  // Loads the sealing key and the rounds from the store, resumes an open round and
  // starts the manager thread and timer.
  absl::Status Start();
  void Stop();
  void Join();

  // Runs once, on the manager thread, when `rounds` rounds are published and evaluated.
  void SetFinishedCallback(std::function<void()> callback);

  // --- Session (Coordinator.Session)
  void OnHello(std::shared_ptr<AgentLink> link, fedlora::v1::Hello hello);
  void OnHeartbeat(std::shared_ptr<AgentLink> link, fedlora::v1::Heartbeat heartbeat);
  void OnEvalReport(std::shared_ptr<AgentLink> link, fedlora::v1::EvalReport report);
  void OnDisconnect(std::shared_ptr<AgentLink> link);
  // Secure-aggregation rounds (docs/privacy.md): an agent's report after training,
  // and its protocol messages. A refused message is counted and logged; it never
  // ends the session (the agent is then treated as dropped by the protocol).
  void OnSecAggReady(std::shared_ptr<AgentLink> link, fedlora::v1::SecAggReady ready);
  void OnSecAggMessage(std::shared_ptr<AgentLink> link, fedlora::v1::SecAggMessage message);

  // --- Updates (Coordinator.SubmitUpdate)
  using StatusCallback = std::function<void(absl::Status)>;
  // Checks a header before the payload is read: round open, participant, duplicate,
  // base hash/version, size, metrics.
  void CheckUpdateHeader(std::string peer_cn, fedlora::v1::UpdateHeader header,
                         StatusCallback done);
  // Verifies, opens, parses, validates and (if all passes) stores the update synced,
  // then answers OK. Any failure answers the protocol's status and stores nothing.
  void SubmitUpdate(IncomingUpdate update, StatusCallback done);
  // Counts a refused update (shown as updates_rejected in Admin.Status).
  void CountRejection(const absl::Status& status);
  uint64_t rejections() const { return rejections_.load(); }

  // --- Adapters (Coordinator.FetchAdapter)
  void GetVersionBlob(std::string version_id, std::function<void(absl::StatusOr<BlobRef>)> done);
  void RecordBytesDown(std::string version_id, uint64_t bytes);

  // --- Admin
  void GetStatus(std::function<void(fedlora::v1::StatusResponse)> done);

  // --- Admin: versions and backup (docs/operations.md)
  void ListVersions(std::function<void(absl::StatusOr<fedlora::v1::ListVersionsResponse>)> done);
  // Moves the current pointer on the manager thread. The target is checked first
  // (ResolveVersionMove; nothing changes on error). An open round (its base is the
  // old current version) is aborted, then the pointer is written (synced, audited
  // with `actor`), and only then the in-memory current version changes: online
  // agents get a VersionNotice of the new current version and the next round
  // starts from it.
  void MoveCurrentVersion(
      VersionMove move, std::string target, std::string actor,
      std::function<void(absl::StatusOr<fedlora::v1::VersionChangeResponse>)> done);
  // StateStore::CreateBackup on a worker thread, then opens the backup read-only
  // and verifies its audit chain (DataLoss when broken).
  void CreateBackup(std::string dir, std::string actor,
                    std::function<void(absl::StatusOr<fedlora::v1::CreateBackupResponse>)> done);
  // --- Revocation (coordinator/identity.h; call after the revocation is stored)
  // Cuts the agent's Session (PERMISSION_DENIED "certificate revoked"), takes it
  // offline, refuses its later Hello and updates (also uploads already in flight),
  // and in a TRAIN round deletes its stored update: it stays a participant that
  // never reports, as if it had dropped (the deadline rule applies). In AGGREGATE
  // its update is already being aggregated and stays. done(session_closed,
  // update_discarded).
  void OnAgentRevoked(std::string agent_id, std::function<void(bool, bool)> done);

  // --- Operations: the fedlora_* metrics (docs/operations.md), rendered by /metrics.
  MetricsRegistry& metrics() { return metrics_; }

  // --- Tests
  void Tick();  // runs one timer check on the manager thread and waits for it
  void Sync();  // waits until everything posted before it has run
  const std::string& seal_public_key() const { return seal_key_.public_key; }
  const std::string& base_model_hash() const { return base_model_hash_; }

 private:
  struct OnlineAgent {
    std::shared_ptr<AgentLink> link;
    fedlora::v1::Hello hello;
    uint64_t last_seen_unix_ms = 0;
  };
  struct Aggregated {
    std::string blob;
    std::string sha256;
    ShapeMap shapes;
    uint64_t num_examples = 0;
    std::vector<std::string> contributors;
    std::string strategy;
    std::optional<double> discarded_energy;  // lora-product
    std::string server_state_sha256;         // fedadam/fedyogi, already stored
    std::string quant;                       // publish_quant
    common::QuantReport quant_report;        // vs the fp32 aggregate
  };

  // Posts fn to the manager thread, catching (and logging) any exception.
  void Post(std::function<void()> fn);
  void ScheduleTick();
  void TickLocked();  // "Locked" = runs on the manager thread
  void MaybeOpenRound();
  void SendTask(const RoundRecord& round, const std::string& agent_id);
  absl::Status PrecheckLocked(const std::string& peer_cn,
                              const fedlora::v1::UpdateHeader& header) const;
  void CommitUpdate(IncomingUpdate update, common::TensorMap tensors, StatusCallback done);
  void EndTrainPhase();  // TRAIN is over: secure aggregation or plain aggregation
  // Writes `round` in phase `to` (synced) and records the train phase time; false
  // (logged, `round` unchanged) when the store write failed.
  bool LeaveTrainPhase(RoundRecord& round, RoundPhase to);
  void StartAggregate();
  // Worker thread. `secagg_mean`: the unmasked mean of a secure round (else the
  // stored updates are read).
  void RunAggregation(RoundRecord round, std::shared_ptr<common::TensorMap> secagg_mean = nullptr);
  void StartSecAgg();
  void AdvanceSecAgg();  // closes the current secure-aggregation phase
  absl::Status CommitMaskedInput(IncomingUpdate update);
  // Checks (at round open) and charges (before unmasking) the DP budget.
  absl::Status CheckDpBudget(const RoundRecord& round) const;
  void FinishAggregation(uint64_t round_id, absl::StatusOr<Aggregated> result);
  void AbortOpenRound(const std::string& reason);
  void CompleteEval(RoundRecord& round);
  void MaybeFinish();
  void PrintRoundLine(const RoundRecord& round);
  RoundRecord* FindRoundByVersion(const std::string& version_id);
  void CacheBlob(const std::string& version_id, BlobRef ref);
  // Size, hash and metric checks of an update header (both modes).
  static absl::Status CheckHeaderFields(const fedlora::v1::UpdateHeader& header,
                                        uint64_t max_update_bytes);
  // Version metadata, quantization and blob of an aggregate (worker thread).
  absl::Status EncodeAggregate(const RoundRecord& round, const common::TensorMap& adapter,
                               Aggregated* out) const;
  void NoteUpdateAccepted();
  void NoteRoundOpened(uint64_t round_id);

  // --- Async (FedBuff) mode, coordinator/round_manager_async.cc (manager thread
  // unless said otherwise).
  struct TaskState {
    uint64_t round_id = 0;  // the round open when it was handed out (its base version)
    std::string agent_id;
    uint64_t deadline_unix_ms = 0;
    uint64_t accepted_in = 0;  // round whose buffer took its update (0 = none yet)
  };
  struct PendingCommit {
    IncomingUpdate update;
    common::TensorMap tensors;
    StatusCallback done;
  };
  void RebuildAsyncTasks();  // Start(), before the manager thread runs
  void UpdateAsyncGauges();  // fedlora_async_* (docs/operations.md)
  void OpenAsyncRound();
  void AsyncTick(uint64_t now);
  void DispatchAsyncTasks();
  void SendAsyncTask(uint64_t task_id);
  // Versions published since the base of tasks handed out in round `task_round`.
  uint64_t StalenessOf(uint64_t task_round) const;
  absl::Status PrecheckAsyncLocked(const std::string& peer_cn,
                                   const fedlora::v1::UpdateHeader& header) const;
  void CommitAsyncUpdate(IncomingUpdate update, common::TensorMap tensors, StatusCallback done);
  void RunPendingAsyncCommits();
  // A refused update ends its task (frees the agent's slot) unless the refusal is
  // UNAVAILABLE (the agent retries).
  void OnAsyncRefusal(const std::string& agent, uint64_t task_id, const absl::Status& status);
  bool DropAsyncUpdatesOf(const std::string& agent);                    // revocation
  absl::StatusOr<Aggregated> AggregateAsync(const RoundRecord& round);  // worker thread

  const CoordinatorConfig config_;
  StateStore* const store_;
  const Clock* const clock_;
  const std::string base_model_hash_;
  std::ostream* const out_;
  common::X25519KeyPair seal_key_;

  boost::asio::io_context io_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> guard_;
  boost::asio::steady_timer timer_;
  std::unique_ptr<boost::asio::thread_pool> workers_;
  std::thread thread_;
  std::atomic<bool> started_{false};
  std::atomic<bool> stopping_{false};
  std::atomic<bool> joined_{false};
  std::atomic<uint64_t> rejections_{0};
  MetricsRegistry metrics_;

  // Manager-thread state.
  std::map<std::string, OnlineAgent> online_;
  std::map<uint64_t, RoundRecord> rounds_;  // every round, by id
  std::optional<uint64_t> open_round_;      // TRAIN or AGGREGATE
  uint64_t last_round_id_ = 0;
  std::string current_version_;
  ShapeMap current_shapes_;
  uint64_t select_wait_since_ms_ = 0;
  uint64_t aggregate_started_unix_ms_ = 0;
  std::set<uint64_t> dirty_rounds_;  // bytes_down changed, persist at the next tick
  bool finished_ = false;
  std::function<void()> finished_callback_;
  std::set<std::string> revoked_;  // revoked while running (the services check the store's)

  // The open secure-aggregation round's protocol state (memory only).
  std::shared_ptr<SecAggRound> secagg_;  // shared with the worker that unmasks
  uint64_t secagg_deadline_ms_ = 0;
  std::optional<DpBudget> dp_budget_;  // when config_.dp_clip_norm > 0
  std::string dp_refusal_logged_;      // last budget refusal logged (once each)

  // Async mode (manager thread).
  std::map<uint64_t, TaskState> async_tasks_;        // every task handed out, by id
  std::map<std::string, uint64_t> async_busy_;       // agent -> task holding its slot
  std::map<std::string, uint64_t> async_last_task_;  // agent -> its latest task id
  uint64_t last_task_id_ = 0;
  std::vector<PendingCommit> async_pending_;  // updates waiting for the next buffer

  std::mutex rejection_mu_;
  std::map<std::string, uint64_t> rejections_by_code_;

  std::mutex blob_mu_;
  std::map<std::string, BlobRef> blob_cache_;  // a few recent versions
};

}  // namespace fedlora::coordinator
