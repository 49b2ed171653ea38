#include "coordinator/audit.h"

#include <cinttypes>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"
#include "common/status/status.h"

namespace fedlora::coordinator {
namespace {

using nlohmann::json;

constexpr char kMeta[] = "meta";
const std::string& ZeroHash() {
  static const std::string* zero = new std::string(64, '0');
  return *zero;
}

std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

absl::StatusOr<AuditRecord> ParseRecord(std::string_view key, std::string_view value) {
  const std::string where = absl::StrCat("audit/", std::string(key));
  try {
    json j = json::parse(value);
    AuditRecord r;
    r.seq = j.at("seq").get<uint64_t>();
    r.time_unix_ms = j.at("time_unix_ms").get<uint64_t>();
    r.actor = j.at("actor").get<std::string>();
    r.action = j.at("action").get<std::string>();
    const json& details = j.at("details");
    if (!details.is_object()) throw std::runtime_error("details is not an object");
    r.details_json = Dump(details);
    r.prev_hash = j.at("prev_hash").get<std::string>();
    r.hash = j.at("hash").get<std::string>();
    return r;
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat("corrupt audit record ", where, ": ", e.what()));
  }
}

absl::StatusOr<std::pair<uint64_t, std::string>> ReadHead(const common::Store& store) {
  auto value = store.Get(kMeta, kAuditHeadKey);
  if (absl::IsNotFound(value.status())) return std::make_pair(uint64_t{0}, ZeroHash());
  if (!value.ok()) return value.status();
  try {
    json j = json::parse(*value);
    return std::make_pair(j.at("seq").get<uint64_t>(), j.at("hash").get<std::string>());
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat("corrupt meta/", kAuditHeadKey, ": ", e.what()));
  }
}

}  // namespace

std::string AuditKey(uint64_t seq) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%020" PRIu64, seq);
  return buf;
}

std::string AuditCanonical(const AuditRecord& r) {
  json details;
  try {
    details = json::parse(r.details_json.empty() ? "{}" : r.details_json);
  } catch (const std::exception&) {
    details = json(r.details_json);  // never valid for a stored record; hashes still differ
  }
  json j{{"seq", r.seq},       {"time_unix_ms", r.time_unix_ms}, {"actor", r.actor},
         {"action", r.action}, {"details", details},             {"prev_hash", r.prev_hash}};
  return Dump(j);
}

std::string AuditHash(const std::string& prev_hash, const std::string& canonical) {
  return common::Sha256Hex(prev_hash + canonical);
}

absl::Status AuditLog::Load() {
  ASSIGN_OR_RETURN(auto head, ReadHead(*store_));
  std::lock_guard<std::mutex> lock(mu_);
  head_seq_ = head.first;
  head_hash_ = head.second;
  return absl::OkStatus();
}

uint64_t AuditLog::head_seq() const {
  std::lock_guard<std::mutex> lock(mu_);
  return head_seq_;
}

std::string AuditLog::head_hash() const {
  std::lock_guard<std::mutex> lock(mu_);
  return head_hash_;
}

absl::Status AuditLog::Commit(common::Store::Batch* batch, const std::string& actor,
                              const std::string& action, const std::string& details_json,
                              uint64_t time_unix_ms) {
  json details;
  try {
    details = json::parse(details_json.empty() ? "{}" : details_json);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("audit record '", action, "': details are not JSON: ", e.what()));
  }
  if (!details.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("audit record '", action, "': expected details as a JSON object"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  AuditRecord r;
  r.seq = head_seq_ + 1;
  r.time_unix_ms = time_unix_ms;
  r.actor = actor;
  r.action = action;
  r.details_json = Dump(details);
  r.prev_hash = head_hash_;
  const std::string canonical = AuditCanonical(r);
  r.hash = AuditHash(r.prev_hash, canonical);
  json stored = json::parse(canonical);
  stored["hash"] = r.hash;
  batch->Put(kAuditColumnFamily, AuditKey(r.seq), Dump(stored));
  batch->Put(kMeta, kAuditHeadKey, Dump(json{{"seq", r.seq}, {"hash", r.hash}}));
  RETURN_IF_ERROR(batch->Commit(/*sync=*/true));
  head_seq_ = r.seq;
  head_hash_ = r.hash;
  return absl::OkStatus();
}

absl::StatusOr<AuditVerifyReport> VerifyAuditChain(const common::Store& store) {
  AuditVerifyReport report;
  ASSIGN_OR_RETURN(auto head, ReadHead(store));
  report.head_seq = head.first;
  report.head_hash = head.second;
  auto fail = [&report](uint64_t seq, std::string error) {
    if (!report.ok) return;
    report.ok = false;
    report.first_bad_seq = seq;
    report.error = std::move(error);
  };
  uint64_t last_seq = 0;
  std::string last_hash = ZeroHash();
  absl::Status scan = store.Scan(
      kAuditColumnFamily, "", [&](std::string_view key, std::string_view value) {
        const uint64_t expected = last_seq + 1;
        uint64_t key_seq = 0;
        if (key.size() != 20 || !absl::SimpleAtoi(absl::string_view(key.data(), key.size()),
                                                  &key_seq)) {
          fail(expected, absl::StrCat("unexpected key '", std::string(key),
                                      "' in the audit column family"));
          return false;
        }
        if (key_seq != expected) {
          fail(expected, key_seq > expected
                             ? absl::StrCat("seq ", expected, " is missing (deleted); the next "
                                            "record is seq ", key_seq)
                             : absl::StrCat("seq ", key_seq, " appears out of order"));
          return false;
        }
        auto record = ParseRecord(key, value);
        if (!record.ok()) {
          fail(expected, std::string(record.status().message()));
          return false;
        }
        if (record->seq != key_seq) {
          fail(key_seq, absl::StrCat("seq ", key_seq, ": the record says seq ", record->seq,
                                     " (moved or edited)"));
          return false;
        }
        if (AuditHash(record->prev_hash, AuditCanonical(*record)) != record->hash) {
          fail(key_seq, absl::StrCat("seq ", key_seq,
                                     ": hash does not match the record's content (edited)"));
          return false;
        }
        if (record->prev_hash != last_hash) {
          // This record is intact, so its predecessor is the one that changed.
          fail(key_seq - 1,
               absl::StrCat("seq ", key_seq, ": prev_hash does not match the hash of seq ",
                            key_seq - 1, " (seq ", key_seq - 1,
                            " was rewritten with a recomputed hash)"));
          return false;
        }
        ++report.records;
        last_seq = key_seq;
        last_hash = record->hash;
        return true;
      });
  if (absl::IsInvalidArgument(scan)) {
    // No audit column family (a schema 1 store opened read-only): an empty log.
    if (report.head_seq != 0) fail(1, "meta names an audit head but there is no audit log");
    return report;
  }
  RETURN_IF_ERROR(scan);
  if (!report.ok) return report;
  if (report.head_seq > last_seq) {
    fail(last_seq + 1, absl::StrCat("seq ", last_seq + 1, " to ", report.head_seq,
                                    " are missing (deleted); the head names seq ",
                                    report.head_seq));
  } else if (report.head_seq < last_seq) {
    fail(report.head_seq + 1, absl::StrCat("seq ", report.head_seq + 1, " to ", last_seq,
                                           " were appended without advancing the head"));
  } else if (report.head_hash != last_hash) {
    fail(last_seq, absl::StrCat("seq ", last_seq, ": hash differs from the head's hash ",
                                report.head_hash, " (rewritten)"));
  }
  return report;
}

absl::StatusOr<std::vector<AuditRecord>> ListAuditRecords(const common::Store& store,
                                                          uint64_t from_seq, size_t limit) {
  std::vector<AuditRecord> out;
  absl::Status error;
  absl::Status scan = store.Scan(kAuditColumnFamily, "",
                                 [&](std::string_view key, std::string_view value) {
                                   auto r = ParseRecord(key, value);
                                   if (!r.ok()) {
                                     error = r.status();
                                     return false;
                                   }
                                   if (r->seq < from_seq) return true;
                                   out.push_back(std::move(*r));
                                   return limit == 0 || out.size() < limit;
                                 });
  if (absl::IsInvalidArgument(scan)) return out;  // no audit column family
  RETURN_IF_ERROR(scan);
  RETURN_IF_ERROR(error);
  return out;
}

}  // namespace fedlora::coordinator
