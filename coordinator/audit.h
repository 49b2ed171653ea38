#pragma once
// Append-only, hash-chained audit log in the state store's `audit` column family.
//
// Record (key = seq as 20 zero-padded decimal digits, value = JSON):
//   {"action", "actor", "details" (a JSON object), "hash", "prev_hash", "seq", "time_unix_ms"}
// The canonical form of a record is its JSON without "hash", keys sorted, no
// whitespace (nlohmann::json::dump()); hash = hex SHA-256(prev_hash || canonical),
// where prev_hash is the previous record's hash (64 zeros before seq 1).
// meta/"audit_head" = {"seq": N, "hash": H} names the last record; it is written
// in the same atomic batch as every record, so deleting the last record (or
// several) is detected too.
//
// AuditLog::Commit appends one record to a caller's batch (which may also hold
// the state change being audited), commits it synced, and only then advances
// the in-memory head. Appends are serialized by a mutex; safe for concurrent use.
//
// VerifyAuditChain reads the column family in order and reports the first bad
// seq: a gap (deleted record), a record whose hash does not match its content
// (edited), a record whose prev_hash does not match its predecessor's hash
// (the predecessor was rewritten with a recomputed hash; the predecessor's seq is
// named), or a head that names records that are not there. It detects editing
// by anyone who cannot also rewrite every later record and the head; keep the
// head hash it prints somewhere else (docs/security.md).

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/storage/store.h"

namespace fedlora::coordinator {

inline constexpr char kAuditColumnFamily[] = "audit";
inline constexpr char kAuditHeadKey[] = "audit_head";  // in the `meta` column family

struct AuditRecord {
  uint64_t seq = 0;
  uint64_t time_unix_ms = 0;
  std::string actor;         // certificate CN, "coordinator", or "local:<user>"
  std::string action;        // e.g. "round.started", "round.published", "model.exported"
  std::string details_json;  // a JSON object, canonical (sorted keys)
  std::string prev_hash;     // 64 hex
  std::string hash;          // 64 hex
};

std::string AuditKey(uint64_t seq);
// The canonical bytes hashed for `record` (its JSON without "hash").
std::string AuditCanonical(const AuditRecord& record);
std::string AuditHash(const std::string& prev_hash, const std::string& canonical);

class AuditLog {
 public:
  // `store` must outlive the log and have the `audit` and `meta` column families.
  explicit AuditLog(common::Store* store) : store_(store) {}

  // Reads the head from meta (an empty log when absent).
  absl::Status Load();

  // Adds the next record to `batch`, commits the batch (synced) and advances
  // the head. `details_json` must be a JSON object (InvalidArgument otherwise).
  // On failure nothing is written and the head is unchanged.
  absl::Status Commit(common::Store::Batch* batch, const std::string& actor,
                      const std::string& action, const std::string& details_json,
                      uint64_t time_unix_ms);

  uint64_t head_seq() const;
  std::string head_hash() const;

 private:
  common::Store* const store_;
  mutable std::mutex mu_;
  uint64_t head_seq_ = 0;
  std::string head_hash_ = std::string(64, '0');
};

struct AuditVerifyReport {
  bool ok = true;
  uint64_t records = 0;       // records read
  uint64_t head_seq = 0;      // from meta
  std::string head_hash;      // from meta
  uint64_t first_bad_seq = 0; // 0 when ok
  std::string error;          // "" when ok
};

// Read-only: works on a store opened with common::Store::OpenReadOnly. A store
// without an `audit` column family (schema 1) verifies as an empty log.
absl::StatusOr<AuditVerifyReport> VerifyAuditChain(const common::Store& store);

// Records with seq >= from_seq, at most `limit` (0 = all), in seq order. A
// record that does not parse is DataLoss naming its key.
absl::StatusOr<std::vector<AuditRecord>> ListAuditRecords(const common::Store& store,
                                                          uint64_t from_seq, size_t limit);

}  // namespace fedlora::coordinator
