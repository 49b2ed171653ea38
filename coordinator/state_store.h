#pragma once
// Typed, durable coordinator state on common::Store (RocksDB).
//
// Column families and encodings (schema version 2):
//   meta      "schema_version" -> "2"; "current_version" -> version id ("" / absent = none);
//             "seal_private_key" -> 32 raw bytes of the X25519 sealing key;
//             "at_rest_key_id" / "at_rest_check" (encryption at rest, below);
//             "audit_head" (coordinator/audit.h).
//   agents    agent id -> AgentRecord as JSON.
//   rounds    round id as 20 zero-padded decimal digits -> RoundRecord as JSON.
//   updates   "<round 20 digits>/<agent id>" (async rounds: "<round>/<task 20 digits>")
//             -> 8-byte little-endian length of the UpdateRecord JSON, the JSON, then
//             the sealed payload bytes.
//   versions  version id ("v000001") -> VersionRecord as JSON.
//   blobs     hex SHA-256 of the blob -> adapter blob (common::EncodeAdapterBlob).
//   audit     seq (20 digits) -> hash-chained audit record (coordinator/audit.h).
//   security  enrollment tokens and revocations (coordinator/identity.h owns the
//             keys and encodings); created on open, no schema change needed.
// Schema 1 stores (no audit column family) are upgraded on a writable open.
//
// Encryption at rest (StateStoreOptions::at_rest, common/crypto/at_rest.h): the
// values of `updates`, `blobs` and meta/seal_private_key are AES-256-GCM records
// with AAD "<cf>/<key>"; meta/at_rest_key_id names the key and meta/at_rest_check
// is a known plaintext encrypted under it. Open() with the wrong key, or a
// writable open of an encrypted store without a key, is FailedPrecondition and
// writes nothing. Opening a plaintext store with a key encrypts its existing
// records in one synced batch (audited). A read-only open without the key works
// (audit, rounds, versions) but reading an encrypted record is FailedPrecondition.
// Other values (agents, rounds, versions, audit) are not encrypted.
//
// Signing (StateStoreOptions::signing_key): SignVersion sets VersionRecord::signature
// to a signed adapter statement (common/crypto/sign.h).
// Audit: StartRound, Publish, Abort and AppendAudit write one audit record in
// the same synced batch as the change.
// Records that a round depends on are written with synced writes; multi-record
// transitions (accept an update, publish, abort) are one atomic batch.
// Open() refuses a store whose schema_version is newer than 2 (FailedPrecondition)
// and a corrupt record reads as DataLoss naming the column family and key.
// Safe for concurrent use (each call is independent; callers order transitions).

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/crypto/at_rest.h"
#include "common/crypto/crypto.h"
#include "common/crypto/sign.h"
#include "common/storage/store.h"
#include "coordinator/audit.h"

namespace fedlora::coordinator {

inline constexpr int kSchemaVersion = 2;

// kSecAgg: a secure-aggregation round between training and aggregation (key
// exchange, masked inputs, unmasking; the protocol state lives in memory only).
enum class RoundPhase { kTrain, kSecAgg, kAggregate, kDone, kAborted };
// "TRAIN", "SECAGG", "AGGREGATE", "DONE", "ABORTED"
const char* RoundPhaseName(RoundPhase phase);
absl::StatusOr<RoundPhase> ParseRoundPhase(const std::string& name);

using ShapeMap = std::map<std::string, std::vector<int64_t>>;

struct AgentRecord {
  std::string agent_id;
  std::string base_model_hash;
  std::string agent_version;
  std::string current_version;
  uint64_t num_train_examples = 0;
  uint64_t first_seen_unix_ms = 0;
  uint64_t last_seen_unix_ms = 0;
};

// Metrics of one accepted update, kept in the round after the update itself is gone.
struct UpdateSummary {
  uint64_t num_examples = 0;
  double train_loss = 0;
  double eval_loss_before = 0;
  uint64_t train_tokens = 0;
  double train_seconds = 0;
  uint64_t bytes = 0;  // sealed payload size
  // Async (FedBuff) rounds only, where `RoundRecord::updates` is keyed by TaskKey:
  // the agent, the task (RoundTask.round_id of the update), the version the task
  // started from and its staleness tau when accepted (versions published since).
  std::string agent_id;
  uint64_t task_id = 0;
  std::string base_version;
  uint64_t staleness = 0;
};

// An async task handed out while a round was open (RoundRecord::tasks).
struct AsyncTask {
  std::string agent_id;
  uint64_t deadline_unix_ms = 0;  // the agent's training slot frees after this
};

struct RoundRecord {
  uint64_t round_id = 0;
  RoundPhase phase = RoundPhase::kTrain;
  std::vector<std::string> participants;
  std::string base_version;  // "" = fresh LoRA
  uint64_t created_unix_ms = 0;
  uint64_t deadline_unix_ms = 0;
  uint64_t finished_unix_ms = 0;  // publish or abort time
  // The task as sent (so a restarted coordinator resends the same task).
  uint32_t local_steps = 0;
  double learning_rate = 0;
  uint32_t batch_size = 0;
  uint32_t lora_rank = 0;
  double lora_alpha = 0;
  std::vector<std::string> lora_target_modules;
  uint64_t lora_init_seed = 0;
  uint64_t max_update_bytes = 0;
  // Names and shapes every update must have: the base version's, or (fresh LoRA)
  // the first accepted update's. Empty until known.
  ShapeMap shapes;
  std::map<std::string, UpdateSummary> updates;  // agent id -> accepted update
  std::map<std::string, double> eval_after;      // agent id -> eval_loss of version_id
  std::string version_id;                        // set at publish
  std::string abort_reason;
  uint64_t bytes_down = 0;     // bytes of version_id served by FetchAdapter
  bool eval_complete = false;  // all participants reported, or the grace passed
  // Aggregation (docs/aggregation.md): the strategy the task was sent with, its
  // agent-side knobs, and (lora-product) the energy the rank-r re-factoring dropped.
  std::string strategy = "fedavg";
  double prox_mu = 0;          // fedprox (RoundTask.prox_mu)
  bool freeze_lora_a = false;  // ffa-lora (RoundTask.freeze_lora_a)
  std::optional<double> discarded_energy;
  // Secure aggregation (docs/privacy.md): `updates` then holds the agents that
  // reported SecAggReady (their metrics; bytes = masked input size once received)
  // and `secagg_contributors` the ones whose masked input is in the unmasked sum.
  bool secure_aggregation = false;
  std::vector<std::string> secagg_contributors;
  // Client-level DP of the round (0 = none) and the accountant after charging it
  // (DpBudget::StateJson, "" = not charged) with the cumulative epsilon.
  double dp_clip_norm = 0;
  double dp_noise_multiplier = 0;
  std::string dp_accountant_state;
  std::optional<double> dp_epsilon;
  // Round mode: "sync", or "async" for a FedBuff buffer (coordinator/fedbuff.h):
  // the round is the buffer of updates that becomes version_id; `participants`
  // are the agents whose updates are in it, `updates` is keyed by TaskKey (one
  // entry per update; an agent may contribute several), `tasks` the tasks handed
  // out while it was open (task id -> task; RoundTask.round_id carries the task
  // id, and a task starts from this round's base_version). deadline_unix_ms is 0.
  std::string mode = "sync";
  std::map<uint64_t, AsyncTask> tasks;
  bool async() const { return mode == "async"; }

  uint64_t bytes_up() const;
  double mean_train_loss() const;        // NaN when no update
  double mean_eval_loss_before() const;  // NaN when no update
  double mean_eval_loss_after() const;   // NaN when no report
  bool IsParticipant(const std::string& agent_id) const;
};

struct UpdateRecord {
  uint64_t round_id = 0;
  std::string agent_id;
  std::string base_version;
  UpdateSummary summary;
  std::string payload_sha256;
  uint64_t received_unix_ms = 0;
  std::string sealed;  // the sealed payload as received
  // Async rounds: the task id the payload is sealed with (UpdateAad's round); the
  // record is stored under UpdateKey(round_id, TaskKey(task_id)). 0 = sync.
  uint64_t task_id = 0;
};

struct VersionRecord {
  std::string version_id;
  uint64_t round_id = 0;
  std::string parent_version;
  std::string sha256;  // of the blob
  uint64_t size_bytes = 0;
  std::string quant;  // "q8_0" | "q4_0"
  uint64_t created_unix_ms = 0;
  uint64_t num_examples = 0;  // total FedAvg weight
  std::vector<std::string> contributors;
  ShapeMap shapes;
  std::string strategy = "fedavg";         // aggregation strategy that produced it
  std::optional<double> discarded_energy;  // lora-product: dropped sigma^2 / total
  std::string server_state_sha256;         // fedadam/fedyogi: blob of the moments ("" = none)
  bool secure_aggregation = false;   // built from the masked sum only
  std::optional<double> dp_epsilon;  // cumulative epsilon after its round (none = no DP)
  std::string base_model_hash;  // hex; "" in records written before signing existed
  std::string signature;        // encoded signed adapter statement ("" = unsigned)
  // Reconstruction error of the quantized blob vs the fp32 aggregate (common::QuantReport);
  // absent in records written before publish_quant existed.
  std::optional<double> quant_rel_l2_error;
  std::optional<double> quant_max_abs_error;
};

struct StateStoreOptions {
  std::optional<common::AtRestCipher> at_rest;   // encrypt updates, blobs and the seal key
  std::optional<common::SigningKey> signing_key;  // sign published versions
  std::string actor = "coordinator";              // audit actor of the store's transitions
  // A writable open with `at_rest` of a plaintext store encrypts it (true) or
  // refuses (false, FailedPrecondition) as a read-only open does.
  bool encrypt_existing = true;
  // Memtable budget of all column families (common::StoreTuning; 0 = RocksDB's
  // defaults, up to 2 x 64 MiB per column family).
  uint64_t memtable_budget_bytes = 64ull << 20;
};

struct CoordinatorConfig;
// Loads config.at_rest_key and config.signing_key (default: coordinator-signing.key
// beside config.tls_key, when that file exists); the actor is the CN of
// config.tls_cert when readable. Errors name the file.
absl::StatusOr<StateStoreOptions> StateStoreOptionsFromConfig(const CoordinatorConfig& config);
// The signed statement of a version (key id filled in by signing).
common::AdapterStatement VersionStatement(const VersionRecord& version);

std::string RoundKey(uint64_t round_id);
std::string UpdateKey(uint64_t round_id, const std::string& agent_id);
std::string VersionId(uint64_t round_id);  // "v%06d"
std::string TaskKey(uint64_t task_id);     // 20 zero-padded decimal digits

class StateStore {
 public:
  static absl::StatusOr<std::unique_ptr<StateStore>> Open(const std::string& dir,
                                                          StateStoreOptions options = {});
  // Opens an existing state store read-only (common::Store::OpenReadOnly), e.g.
  // while the coordinator runs: writes nothing (not even schema_version), still
  // refuses a newer schema (FailedPrecondition). NotFound when `dir` holds no
  // database; FailedPrecondition when it is not a coordinator state store.
  // Every mutating method then fails with FailedPrecondition.
  static absl::StatusOr<std::unique_ptr<StateStore>> OpenReadOnly(const std::string& dir,
                                                                  StateStoreOptions options = {});

  common::Store* raw() { return store_.get(); }
  const common::Store& raw_store() const { return *store_; }
  bool encrypted() const { return options_.at_rest.has_value(); }
  const std::string& actor() const { return options_.actor; }

  // Sealing key: loaded from meta, generated and stored (synced) on first use.
  absl::StatusOr<common::X25519KeyPair> LoadOrCreateSealKey();

  absl::StatusOr<std::optional<AgentRecord>> GetAgent(const std::string& agent_id) const;
  absl::Status PutAgent(const AgentRecord& agent, bool sync);
  absl::StatusOr<std::vector<AgentRecord>> ListAgents() const;

  absl::StatusOr<std::optional<RoundRecord>> GetRound(uint64_t round_id) const;
  absl::StatusOr<std::vector<RoundRecord>> ListRounds() const;  // ascending id
  absl::Status PutRound(const RoundRecord& round);              // synced
  // A new round: PutRound plus a "round.started" audit record, one synced batch.
  absl::Status StartRound(const RoundRecord& round);

  // Accepts an update: the update and the updated round in one synced batch.
  absl::Status AcceptUpdate(const UpdateRecord& update, const RoundRecord& round);
  absl::StatusOr<std::optional<UpdateRecord>> GetUpdate(uint64_t round_id,
                                                        const std::string& agent_id) const;
  // Calls fn for each stored update of the round (one in memory at a time).
  absl::Status ForEachUpdate(uint64_t round_id,
                             const std::function<absl::Status(UpdateRecord)>& fn) const;
  absl::StatusOr<size_t> CountUpdates(uint64_t round_id) const;

  // Publish: blob, version, meta/current_version, the DONE round, and deletion
  // of the round's updates, in one synced batch.
  absl::Status Publish(const RoundRecord& round, const VersionRecord& version,
                       const std::string& blob);
  // Abort: the ABORTED round and deletion of its updates, one synced batch.
  absl::Status Abort(const RoundRecord& round);

  absl::StatusOr<std::string> CurrentVersion() const;  // "" when none
  absl::StatusOr<std::optional<VersionRecord>> GetVersion(const std::string& version_id) const;
  absl::StatusOr<std::string> GetBlob(const std::string& sha256_hex) const;
  // Stores `bytes` (synced) content-addressed in blobs, sealed at rest like adapter
  // blobs, and returns its hex SHA-256 (aggregation: server optimizer moments).
  absl::StatusOr<std::string> PutBlob(const std::string& bytes);

  // Sets version->signature from version's fields (VersionStatement) when a
  // signing key is configured; leaves it "" (OK) when none is.
  absl::Status SignVersion(VersionRecord* version) const;
  bool can_sign() const { return options_.signing_key.has_value(); }

  // Appends an audit record on its own (admin actions, exports); synced.
  absl::Status AppendAudit(const std::string& actor, const std::string& action,
                           const std::string& details_json);
  const AuditLog& audit() const { return *audit_; }

  absl::Status Flush();

  // --- Versions and backup (docs/operations.md)
  // Every stored version, ascending id.
  absl::StatusOr<std::vector<VersionRecord>> ListVersions() const;
  // Moves meta/current_version to `version_id` with one audit record (`actor`,
  // `action`, details) in one synced batch; only the pointer changes (versions and
  // blobs are immutable). NotFound (writing nothing) when no such version is stored.
  // Callers check the blob (coordinator/versions.h) first.
  absl::Status SetCurrentVersion(const std::string& version_id, const std::string& actor,
                                 const std::string& action, const std::string& details_json);
  // A consistent on-line copy of the whole store (rocksdb::Checkpoint, hard links
  // where possible) in the new directory `dir`, then a synced "backup.created"
  // audit record by `actor` (the backup holds the chain up to the record before it).
  // `dir` must be absolute (InvalidArgument), must not exist (AlreadyExists) and
  // its parent must (NotFound); nothing
  // is written to the store on error. Safe while the coordinator serves.
  absl::Status CreateBackup(const std::string& dir, const std::string& actor);
  // --- Security records (column family "security"; coordinator/identity.h).
  absl::StatusOr<std::optional<std::string>> GetSecurityRecord(const std::string& key) const;
  absl::Status ScanSecurityRecords(
      const std::string& prefix,
      const std::function<void(std::string_view key, std::string_view value)>& fn) const;
  // Puts every (key, value) and one audit record (actor, action, details) in one
  // synced batch.
  absl::Status PutSecurityRecordsAudited(
      const std::vector<std::pair<std::string, std::string>>& records, const std::string& actor,
      const std::string& action, const std::string& details_json);
  // Revocation: deletes the agent's stored update of `round` and writes `round`
  // (without it), one synced batch.
  absl::Status DiscardUpdate(const RoundRecord& round, const std::string& agent_id);
  // The same for several entries of `round` (agent ids, or TaskKeys in an async
  // round), one synced batch.
  absl::Status DiscardUpdates(const RoundRecord& round, const std::vector<std::string>& entries);

 private:
  StateStore(std::unique_ptr<common::Store> store, StateStoreOptions options);
  absl::Status CheckAtRest();
  absl::Status EncryptExistingRecords(const std::string& dir);
  // At-rest encoding of a value of `cf`/`key` (identity when not encrypted).
  absl::StatusOr<std::string> SealValue(const char* cf, const std::string& key,
                                        std::string_view value) const;
  absl::StatusOr<std::string> OpenValue(const char* cf, const std::string& key,
                                        std::string value) const;
  absl::Status CommitAudited(common::Store::Batch* batch, const std::string& action,
                             const std::string& details_json);
  absl::Status DeleteUpdates(uint64_t round_id, common::Store::Batch* batch) const;

  std::unique_ptr<common::Store> store_;
  StateStoreOptions options_;
  std::unique_ptr<AuditLog> audit_;
  std::string encrypted_key_id_;  // meta/at_rest_key_id ("" = plaintext store)
};

// JSON codecs (exposed for tests).
std::string EncodeRound(const RoundRecord& round);
absl::StatusOr<RoundRecord> DecodeRound(const std::string& json, const std::string& where);
std::string EncodeUpdate(const UpdateRecord& update);
absl::StatusOr<UpdateRecord> DecodeUpdate(const std::string& bytes, const std::string& where);

}  // namespace fedlora::coordinator
