#include "coordinator/identity.h"

#include <algorithm>

#include <boost/asio/post.hpp>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"
#include "common/status/status.h"
#include "coordinator/logging.h"

namespace fedlora::coordinator {
namespace {

using nlohmann::json;

constexpr char kTokenPrefix[] = "token/";
constexpr char kCertPrefix[] = "cert/";
constexpr char kRevokedPrefix[] = "revoked/";
constexpr char kRequestPrefix[] = "enroll_request/";
constexpr size_t kTokenHexChars = 64;
constexpr size_t kRequestIdHexChars = 32;

bool IsLowerHex(const std::string& s) {
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

absl::StatusOr<json> ParseRecord(const std::string& value, const std::string& where) {
  json j = json::parse(value, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::DataLossError(absl::StrCat("security/", where, ": expected a JSON object"));
  }
  return j;
}

EnrollmentRequestInfo RequestFromJson(const std::string& id, const json& j, uint64_t now) {
  EnrollmentRequestInfo r;
  r.id = id;
  r.agent_id = j.value("agent_id", "");
  r.key_fingerprint = j.value("key_fingerprint", "");
  r.peer = j.value("peer", "");
  r.state = j.value("state", "");
  r.requested_unix_ms = j.value("requested_unix_ms", uint64_t{0});
  r.expires_unix_ms = j.value("expires_unix_ms", uint64_t{0});
  r.decided_by = j.value("decided_by", "");
  r.reason = j.value("reason", "");
  r.certificate_pem = j.value("certificate_pem", "");
  r.not_after_unix = j.value("not_after_unix", int64_t{0});
  if (r.state == "pending" && now >= r.expires_unix_ms) r.state = "expired";
  return r;
}

absl::Status RequireAdminMode(EnrollmentApproval approval) {
  if (approval == EnrollmentApproval::kAdmin) return absl::OkStatus();
  return absl::FailedPreconditionError(
      "this coordinator enrolls with one-time tokens only (enrollment_approval: token); ask an "
      "admin for a token (fedlora-admin enroll create)");
}

}  // namespace

absl::StatusOr<EnrollmentApproval> ParseEnrollmentApproval(const std::string& text) {
  if (text == "token") return EnrollmentApproval::kToken;
  if (text == "admin") return EnrollmentApproval::kAdmin;
  return absl::InvalidArgumentError(
      absl::StrCat("enrollment_approval: expected 'token' or 'admin', found '", text, "'"));
}

IdentityRegistry::IdentityRegistry(StateStore* store, const Clock* clock, IdentityOptions options)
    : store_(store), clock_(clock), options_(std::move(options)) {}

IdentityRegistry::~IdentityRegistry() { pool_.join(); }

absl::Status IdentityRegistry::Load() {
  std::set<std::string> revoked;
  RETURN_IF_ERROR(store_->ScanSecurityRecords(
      kRevokedPrefix, [&](std::string_view key, std::string_view) {
        revoked.emplace(key.substr(sizeof(kRevokedPrefix) - 1));
      }));
  std::lock_guard<std::mutex> lock(revoked_mu_);
  revoked_ = std::move(revoked);
  return absl::OkStatus();
}

void IdentityRegistry::Post(std::function<void()> fn) {
  boost::asio::post(pool_, [fn = std::move(fn)]() {
    try {
      fn();
    } catch (const std::exception& e) {
      Log(LogLevel::kError, "unexpected exception in the identity registry", {{"what", e.what()}});
    }
  });
}

bool IdentityRegistry::IsRevoked(const std::string& agent_id) const {
  std::lock_guard<std::mutex> lock(revoked_mu_);
  return revoked_.count(agent_id) > 0;
}

absl::StatusOr<CreatedToken> IdentityRegistry::CreateToken(const std::string& name,
                                                           uint64_t ttl_s,
                                                           const std::string& actor) {
  RETURN_IF_ERROR(common::CheckCertName(name));
  if (ttl_s == 0) ttl_s = options_.default_token_ttl_s;
  if (ttl_s > options_.max_token_ttl_s) {
    return absl::InvalidArgumentError(absl::StrCat("enrollment token: expected a lifetime of at "
                                                   "most ",
                                                   options_.max_token_ttl_s, " s, found ", ttl_s));
  }
  std::lock_guard<std::mutex> lock(op_mu_);
  if (IsRevoked(name)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "agent '", name, "' is revoked; a revoked name cannot be enrolled again (choose another)"));
  }
  CreatedToken out;
  out.token = common::HexEncode(common::RandomBytes(32));
  const uint64_t now = clock_->NowUnixMs();
  out.expires_unix_ms = now + ttl_s * 1000;
  const std::string hash = common::Sha256Hex(out.token);
  json record{{"name", name},
              {"created_unix_ms", now},
              {"expires_unix_ms", out.expires_unix_ms},
              {"created_by", actor},
              {"used_unix_ms", 0},
              {"cert_fingerprint", ""}};
  json details{{"name", name},
               {"token_sha256_prefix", hash.substr(0, 16)},
               {"expires_unix_ms", out.expires_unix_ms}};
  RETURN_IF_ERROR(store_->PutSecurityRecordsAudited({{kTokenPrefix + hash, record.dump()}}, actor,
                                                    "enroll.token_created", details.dump()));
  return out;
}

absl::StatusOr<IssuedCertificate> IdentityRegistry::Issue(
    const std::string& agent_id, const std::string& csr_pem, const char* how,
    std::vector<std::pair<std::string, std::string>> extra, const std::string& actor,
    const char* action) {
  if (!options_.ca.has_value()) {
    return absl::FailedPreconditionError(
        "this coordinator cannot sign certificates: it was started without --ca-key");
  }
  ASSIGN_OR_RETURN(std::string pem,
                   common::SignCsr(*options_.ca, csr_pem, agent_id, common::CertRole::kAgent,
                                   options_.cert_validity_days));
  IssuedCertificate out;
  out.agent_id = agent_id;
  out.certificate_pem = pem;
  out.ca_pem = options_.ca->cert_pem;
  ASSIGN_OR_RETURN(out.fingerprint, common::CertFingerprint(pem));
  ASSIGN_OR_RETURN(out.not_after_unix, common::CertNotAfterUnix(pem));
  json cert{{"agent_id", agent_id},
            {"issued_unix_ms", clock_->NowUnixMs()},
            {"not_after_unix", out.not_after_unix},
            {"how", how}};
  extra.emplace_back(kCertPrefix + out.fingerprint, cert.dump());
  json details{{"agent_id", agent_id},
               {"cert_fingerprint", out.fingerprint},
               {"not_after_unix", out.not_after_unix}};
  RETURN_IF_ERROR(store_->PutSecurityRecordsAudited(extra, actor, action, details.dump()));
  return out;
}

absl::StatusOr<IssuedCertificate> IdentityRegistry::Enroll(const std::string& token,
                                                           const std::string& csr_pem) {
  if (token.size() != kTokenHexChars || !IsLowerHex(token)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "enrollment token: expected ", kTokenHexChars, " lowercase hex characters, found ",
        token.size(), " characters"));
  }
  std::lock_guard<std::mutex> lock(op_mu_);
  const std::string hash = common::Sha256Hex(token);
  const std::string key = kTokenPrefix + hash;
  ASSIGN_OR_RETURN(std::optional<std::string> value, store_->GetSecurityRecord(key));
  if (!value.has_value()) {
    return absl::PermissionDeniedError("enrollment token not recognised (wrong, or never issued)");
  }
  ASSIGN_OR_RETURN(json record, ParseRecord(*value, key));
  const std::string name = record.value("name", "");
  const uint64_t used = record.value("used_unix_ms", uint64_t{0});
  const uint64_t expires = record.value("expires_unix_ms", uint64_t{0});
  const uint64_t now = clock_->NowUnixMs();
  if (used != 0) {
    return absl::PermissionDeniedError(absl::StrCat("enrollment token for '", name,
                                                    "' was already used (at unix ms ", used,
                                                    "); tokens are single use"));
  }
  if (now >= expires) {
    return absl::PermissionDeniedError(absl::StrCat("enrollment token for '", name,
                                                    "' expired at unix ms ", expires, " (now ",
                                                    now, ")"));
  }
  if (IsRevoked(name)) {
    return absl::PermissionDeniedError(absl::StrCat("agent '", name, "' is revoked"));
  }
  record["used_unix_ms"] = now;
  // The fingerprint is known only after signing; Issue writes the cert record,
  // and the token record names the agent. Both go in Issue's one batch.
  ASSIGN_OR_RETURN(IssuedCertificate cert,
                   Issue(name, csr_pem, "enroll", {{key, record.dump()}},
                         absl::StrCat("enroll:", name), "enroll.issued"));
  return cert;
}

absl::StatusOr<IssuedCertificate> IdentityRegistry::Renew(const std::string& agent_id,
                                                          const std::string& csr_pem) {
  std::lock_guard<std::mutex> lock(op_mu_);
  if (IsRevoked(agent_id)) {
    return absl::PermissionDeniedError(absl::StrCat("agent '", agent_id, "' is revoked"));
  }
  return Issue(agent_id, csr_pem, "renew", {}, agent_id, "cert.renewed");
}

absl::StatusOr<EnrollmentRequestInfo> IdentityRegistry::RequestEnrollment(
    const std::string& csr_pem, const std::string& peer) {
  RETURN_IF_ERROR(RequireAdminMode(options_.approval));
  if (!options_.ca.has_value()) {
    return absl::FailedPreconditionError(
        "this coordinator cannot sign certificates: it was started without --ca-key");
  }
  ASSIGN_OR_RETURN(common::CsrInfo csr, common::ReadCsr(csr_pem));
  std::lock_guard<std::mutex> lock(op_mu_);
  if (IsRevoked(csr.common_name)) {
    return absl::PermissionDeniedError(absl::StrCat("agent '", csr.common_name, "' is revoked"));
  }
  ASSIGN_OR_RETURN(std::vector<EnrollmentRequestInfo> pending, ListPendingRequests());
  if (pending.size() >= options_.max_pending_requests) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "enrollment: ", pending.size(), " requests already wait for an admin (at most ",
        options_.max_pending_requests, "); try again after they are decided or expire"));
  }
  const uint64_t now = clock_->NowUnixMs();
  const std::string id = common::HexEncode(common::RandomBytes(kRequestIdHexChars / 2));
  json record{{"agent_id", csr.common_name},
              {"csr_pem", csr_pem},
              {"key_fingerprint", csr.key_fingerprint},
              {"peer", peer},
              {"requested_unix_ms", now},
              {"expires_unix_ms", now + options_.request_ttl_s * 1000},
              {"state", "pending"},
              {"decided_by", ""},
              {"decided_unix_ms", 0},
              {"reason", ""},
              {"certificate_pem", ""},
              {"not_after_unix", 0}};
  json details{{"request_id", id},
               {"agent_id", csr.common_name},
               {"key_fingerprint", csr.key_fingerprint},
               {"peer", peer}};
  RETURN_IF_ERROR(store_->PutSecurityRecordsAudited({{kRequestPrefix + id, record.dump()}},
                                                    absl::StrCat("enroll-request:", csr.common_name),
                                                    "enroll.requested", details.dump()));
  return RequestFromJson(id, record, now);
}

absl::StatusOr<EnrollmentRequestInfo> IdentityRegistry::GetEnrollmentRequest(
    const std::string& id) const {
  RETURN_IF_ERROR(RequireAdminMode(options_.approval));
  if (id.size() != kRequestIdHexChars || !IsLowerHex(id)) {
    return absl::NotFoundError(absl::StrCat("enrollment request '", id, "': expected ",
                                            kRequestIdHexChars, " lowercase hex characters"));
  }
  ASSIGN_OR_RETURN(std::optional<std::string> value,
                   store_->GetSecurityRecord(kRequestPrefix + id));
  if (!value.has_value()) {
    return absl::NotFoundError(absl::StrCat("enrollment request '", id, "' not found"));
  }
  ASSIGN_OR_RETURN(json record, ParseRecord(*value, kRequestPrefix + id));
  EnrollmentRequestInfo info = RequestFromJson(id, record, clock_->NowUnixMs());
  if (info.state == "approved" && options_.ca.has_value()) info.ca_pem = options_.ca->cert_pem;
  return info;
}

absl::StatusOr<std::vector<EnrollmentRequestInfo>> IdentityRegistry::ListPendingRequests() const {
  RETURN_IF_ERROR(RequireAdminMode(options_.approval));
  const uint64_t now = clock_->NowUnixMs();
  std::vector<EnrollmentRequestInfo> out;
  absl::Status parse_error;
  RETURN_IF_ERROR(store_->ScanSecurityRecords(
      kRequestPrefix, [&](std::string_view key, std::string_view value) {
        auto record = ParseRecord(std::string(value), std::string(key));
        if (!record.ok()) {
          parse_error = record.status();
          return;
        }
        EnrollmentRequestInfo info =
            RequestFromJson(std::string(key.substr(sizeof(kRequestPrefix) - 1)), *record, now);
        if (info.state == "pending") out.push_back(std::move(info));
      }));
  RETURN_IF_ERROR(parse_error);
  std::stable_sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return a.requested_unix_ms < b.requested_unix_ms;
  });
  return out;
}

absl::StatusOr<EnrollmentRequestInfo> IdentityRegistry::DecideEnrollmentRequest(
    const std::string& id, bool approve, const std::string& reason, const std::string& actor) {
  RETURN_IF_ERROR(RequireAdminMode(options_.approval));
  std::lock_guard<std::mutex> lock(op_mu_);
  ASSIGN_OR_RETURN(EnrollmentRequestInfo info, GetEnrollmentRequest(id));
  if (info.state != "pending") {
    return absl::FailedPreconditionError(absl::StrCat(
        "enrollment request '", id, "' for '", info.agent_id, "' is ", info.state,
        info.decided_by.empty() ? "" : absl::StrCat(" (by ", info.decided_by, ")"),
        "; only a pending request can be decided"));
  }
  const std::string key = kRequestPrefix + id;
  ASSIGN_OR_RETURN(std::optional<std::string> value, store_->GetSecurityRecord(key));
  ASSIGN_OR_RETURN(json record, ParseRecord(value.value_or(""), key));
  const uint64_t now = clock_->NowUnixMs();
  record["decided_by"] = actor;
  record["decided_unix_ms"] = now;
  record["reason"] = reason;
  if (!approve) {
    record["state"] = "denied";
    json details{{"request_id", id}, {"agent_id", info.agent_id}, {"reason", reason}};
    RETURN_IF_ERROR(store_->PutSecurityRecordsAudited({{key, record.dump()}}, actor,
                                                      "enroll.denied", details.dump()));
    return RequestFromJson(id, record, now);
  }
  if (IsRevoked(info.agent_id)) {
    return absl::FailedPreconditionError(
        absl::StrCat("agent '", info.agent_id, "' is revoked; deny this request instead"));
  }
  // The certificate is known only after signing; Issue writes the request record
  // (state approved, with the certificate) and the cert record in one batch.
  if (!options_.ca.has_value()) {
    return absl::FailedPreconditionError(
        "this coordinator cannot sign certificates: it was started without --ca-key");
  }
  ASSIGN_OR_RETURN(std::string pem,
                   common::SignCsr(*options_.ca, record.value("csr_pem", ""), info.agent_id,
                                   common::CertRole::kAgent, options_.cert_validity_days));
  ASSIGN_OR_RETURN(std::string fingerprint, common::CertFingerprint(pem));
  ASSIGN_OR_RETURN(int64_t not_after, common::CertNotAfterUnix(pem));
  record["state"] = "approved";
  record["certificate_pem"] = pem;
  record["not_after_unix"] = not_after;
  json cert{{"agent_id", info.agent_id},
            {"issued_unix_ms", now},
            {"not_after_unix", not_after},
            {"how", "approve"}};
  json details{{"request_id", id},
               {"agent_id", info.agent_id},
               {"key_fingerprint", info.key_fingerprint},
               {"cert_fingerprint", fingerprint},
               {"not_after_unix", not_after}};
  RETURN_IF_ERROR(store_->PutSecurityRecordsAudited(
      {{key, record.dump()}, {kCertPrefix + fingerprint, cert.dump()}}, actor, "enroll.approved",
      details.dump()));
  EnrollmentRequestInfo out = RequestFromJson(id, record, now);
  out.ca_pem = options_.ca->cert_pem;
  return out;
}

absl::StatusOr<bool> IdentityRegistry::Revoke(const std::string& agent_id,
                                              const std::string& reason,
                                              const std::string& actor) {
  RETURN_IF_ERROR(common::CheckCertName(agent_id));
  std::lock_guard<std::mutex> lock(op_mu_);
  if (IsRevoked(agent_id)) return false;
  json record{{"agent_id", agent_id},
              {"revoked_unix_ms", clock_->NowUnixMs()},
              {"actor", actor},
              {"reason", reason}};
  json details{{"agent_id", agent_id}, {"reason", reason}};
  RETURN_IF_ERROR(store_->PutSecurityRecordsAudited({{kRevokedPrefix + agent_id, record.dump()}},
                                                    actor, "agent.revoked", details.dump()));
  std::lock_guard<std::mutex> rlock(revoked_mu_);
  revoked_.insert(agent_id);
  return true;
}

}  // namespace fedlora::coordinator
