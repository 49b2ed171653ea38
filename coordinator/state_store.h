#pragma once
// Typed, durable coordinator state on common::Store (RocksDB).
//
// Column families and encodings (schema version 1):
//   meta      "schema_version" -> "1"; "current_version" -> version id ("" / absent = none);
//             "seal_private_key" -> 32 raw bytes of the X25519 sealing key.
//   agents    agent id -> AgentRecord as JSON.
//   rounds    round id as 20 zero-padded decimal digits -> RoundRecord as JSON.
//   updates   "<round 20 digits>/<agent id>" -> 8-byte little-endian length of the
//             UpdateRecord JSON, the JSON, then the sealed payload bytes.
//   versions  version id ("v000001") -> VersionRecord as JSON.
//   blobs     hex SHA-256 of the blob -> adapter blob (common::EncodeAdapterBlob).
// Records that a round depends on are written with synced writes; multi-record
// transitions (accept an update, publish, abort) are one atomic batch.
// Open() refuses a store whose schema_version is newer than 1 (FailedPrecondition)
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
#include "common/crypto/crypto.h"
#include "common/storage/store.h"

namespace fedlora::coordinator {

inline constexpr int kSchemaVersion = 1;

enum class RoundPhase { kTrain, kAggregate, kDone, kAborted };
const char* RoundPhaseName(RoundPhase phase);  // "TRAIN", "AGGREGATE", "DONE", "ABORTED"
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
};

struct VersionRecord {
  std::string version_id;
  uint64_t round_id = 0;
  std::string parent_version;
  std::string sha256;  // of the blob
  uint64_t size_bytes = 0;
  std::string quant;  // "q8_0"
  uint64_t created_unix_ms = 0;
  uint64_t num_examples = 0;  // total FedAvg weight
  std::vector<std::string> contributors;
  ShapeMap shapes;
};

std::string RoundKey(uint64_t round_id);
std::string UpdateKey(uint64_t round_id, const std::string& agent_id);
std::string VersionId(uint64_t round_id);  // "v%06d"

class StateStore {
 public:
  static absl::StatusOr<std::unique_ptr<StateStore>> Open(const std::string& dir);
  // Opens an existing state store read-only (common::Store::OpenReadOnly), e.g.
  // while the coordinator runs: writes nothing (not even schema_version), still
  // refuses a newer schema (FailedPrecondition). NotFound when `dir` holds no
  // database; FailedPrecondition when it is not a coordinator state store.
  // Every mutating method then fails with FailedPrecondition.
  static absl::StatusOr<std::unique_ptr<StateStore>> OpenReadOnly(const std::string& dir);

  common::Store* raw() { return store_.get(); }

  // Sealing key: loaded from meta, generated and stored (synced) on first use.
  absl::StatusOr<common::X25519KeyPair> LoadOrCreateSealKey();

  absl::StatusOr<std::optional<AgentRecord>> GetAgent(const std::string& agent_id) const;
  absl::Status PutAgent(const AgentRecord& agent, bool sync);
  absl::StatusOr<std::vector<AgentRecord>> ListAgents() const;

  absl::StatusOr<std::optional<RoundRecord>> GetRound(uint64_t round_id) const;
  absl::StatusOr<std::vector<RoundRecord>> ListRounds() const;  // ascending id
  absl::Status PutRound(const RoundRecord& round);              // synced

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

  absl::Status Flush();

 private:
  explicit StateStore(std::unique_ptr<common::Store> store) : store_(std::move(store)) {}
  absl::Status CheckSchema();
  absl::Status DeleteUpdates(uint64_t round_id, common::Store::Batch* batch) const;

  std::unique_ptr<common::Store> store_;
};

// JSON codecs (exposed for tests).
std::string EncodeRound(const RoundRecord& round);
absl::StatusOr<RoundRecord> DecodeRound(const std::string& json, const std::string& where);
std::string EncodeUpdate(const UpdateRecord& update);
absl::StatusOr<UpdateRecord> DecodeUpdate(const std::string& bytes, const std::string& where);

}  // namespace fedlora::coordinator
