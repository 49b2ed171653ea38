#pragma once
// Agent identities the coordinator manages itself (docs/security.md): one-time
// enrollment tokens, certificates issued from CSRs (enrollment and renewal) and
// revocations.
//
// Stored in the state store's `security` column family, every change in one
// synced, audited batch:
//   token/<hex SHA-256 of the raw token> -> {"name","created_unix_ms",
//        "expires_unix_ms","created_by","used_unix_ms" (0 = unused),"cert_fingerprint"}
//   cert/<hex SHA-256 of the certificate DER> -> {"agent_id","issued_unix_ms",
//        "not_after_unix","how": "enroll"|"renew"}
//   revoked/<agent id> -> {"agent_id","revoked_unix_ms","actor","reason"}
//   enroll_request/<32 hex id> -> {"agent_id","csr_pem","key_fingerprint","peer",
//        "requested_unix_ms","expires_unix_ms","state": "pending"|"approved"|"denied",
//        "decided_by","decided_unix_ms","reason","certificate_pem","not_after_unix"}
// The raw token (32 random bytes, 64 hex chars) is returned once and never stored.
//
// Admin-approval mode (IdentityOptions::approval = kAdmin, config
// `enrollment_approval: admin`): a CSR may come without a token. It is filed as a
// pending request (the CSR, its key fingerprint, the requester's address) and
// gets no certificate until an admin approves it; a denial or the request's
// expiry (request_ttl_s) ends it. Tokens keep working in this mode (an admin who
// created a token has approved ahead). At most max_pending_requests unexpired
// requests wait at once (ResourceExhausted beyond), so callers without any
// credential cannot grow the store without bound.
//
// A revocation names an agent id (certificate CN): every certificate with that CN
// is refused from then on, whichever was presented (the enrolled one, a renewed
// one, one issued offline by `pki issue`), and the name cannot be enrolled or given
// a token again. Revocations are loaded at start (they survive restarts).
//
// Threading: IsRevoked() is safe from any thread and never blocks on I/O. The
// other operations write to the store and sign; they block and must run on the
// registry's own worker thread (Post) or in tools/tests, never in a gRPC reactor.
// Enroll/Renew/CreateToken/Revoke are serialized by a mutex, so one token cannot
// be spent twice.

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <boost/asio/thread_pool.hpp>

#include "absl/status/statusor.h"
#include "common/crypto/pki.h"
#include "coordinator/clock.h"
#include "coordinator/state_store.h"

namespace fedlora::coordinator {

enum class EnrollmentApproval { kToken, kAdmin };

// "token" / "admin" (config enrollment_approval); InvalidArgument otherwise.
absl::StatusOr<EnrollmentApproval> ParseEnrollmentApproval(const std::string& text);

struct IdentityOptions {
  // Signs CSRs (enrollment and renewal); none = both are FailedPrecondition.
  std::optional<common::CaMaterial> ca;
  EnrollmentApproval approval = EnrollmentApproval::kToken;
  uint64_t request_ttl_s = 24 * 3600;
  size_t max_pending_requests = 100;
  int cert_validity_days = 90;
  uint64_t default_token_ttl_s = 24 * 3600;
  uint64_t max_token_ttl_s = 30 * 24 * 3600;
};

struct CreatedToken {
  std::string token;  // raw, 64 hex chars: show once
  uint64_t expires_unix_ms = 0;
};

struct IssuedCertificate {
  std::string agent_id;
  std::string certificate_pem;
  std::string ca_pem;
  std::string fingerprint;
  int64_t not_after_unix = 0;
};

// One enrollment request of admin-approval mode, as stored (state "expired" is
// reported for a pending one past expires_unix_ms).
struct EnrollmentRequestInfo {
  std::string id;
  std::string agent_id;
  std::string key_fingerprint;
  std::string peer;
  std::string state;  // "pending", "approved", "denied", "expired"
  uint64_t requested_unix_ms = 0;
  uint64_t expires_unix_ms = 0;
  std::string decided_by;
  std::string reason;
  std::string certificate_pem;  // approved only
  std::string ca_pem;           // approved only
  int64_t not_after_unix = 0;   // approved only
};

class IdentityRegistry {
 public:
  // `store` and `clock` must outlive the registry.
  IdentityRegistry(StateStore* store, const Clock* clock, IdentityOptions options);
  ~IdentityRegistry();  // waits for posted work
  IdentityRegistry(const IdentityRegistry&) = delete;
  IdentityRegistry& operator=(const IdentityRegistry&) = delete;

  // Loads the revocations from the store.
  absl::Status Load();

  // Runs fn on the registry's worker thread (one thread: operations are ordered).
  void Post(std::function<void()> fn);

  bool IsRevoked(const std::string& agent_id) const;
  bool can_sign() const { return options_.ca.has_value(); }

  // A token for agent `name` valid for ttl_s (0 = default). InvalidArgument for a
  // bad name or ttl; FailedPrecondition when `name` is revoked.
  absl::StatusOr<CreatedToken> CreateToken(const std::string& name, uint64_t ttl_s,
                                           const std::string& actor);

  // Spends `token` on `csr_pem`: the token must be known, unused and unexpired,
  // the CSR's signature valid and its CN the token's name (not revoked); the
  // certificate gets role agent whatever the CSR asks. The token is marked used in
  // the same batch that records the certificate. Every refusal is
  // PermissionDenied / InvalidArgument / FailedPrecondition and writes nothing.
  absl::StatusOr<IssuedCertificate> Enroll(const std::string& token, const std::string& csr_pem);

  // A new agent certificate for `agent_id` (the caller's verified, unrevoked CN)
  // from a CSR with that CN. The old certificate stays valid until it expires.
  absl::StatusOr<IssuedCertificate> Renew(const std::string& agent_id, const std::string& csr_pem);

  // --- Admin-approval mode (FailedPrecondition in token mode).
  // Files `csr_pem` (self-signature and CN checked; CN not revoked) as a pending
  // request from `peer`; synced and audited "enroll.requested".
  absl::StatusOr<EnrollmentRequestInfo> RequestEnrollment(const std::string& csr_pem,
                                                          const std::string& peer);
  // The request `id` (NotFound if unknown or malformed).
  absl::StatusOr<EnrollmentRequestInfo> GetEnrollmentRequest(const std::string& id) const;
  // The pending, unexpired requests, oldest first.
  absl::StatusOr<std::vector<EnrollmentRequestInfo>> ListPendingRequests() const;
  // Approves (signs the CSR: role agent) or denies the pending request `id`, in
  // one synced batch audited "enroll.approved" / "enroll.denied" by `actor`.
  // NotFound: unknown id; FailedPrecondition: decided already, expired, or (on
  // approval) the name was revoked meanwhile. A refusal writes nothing.
  absl::StatusOr<EnrollmentRequestInfo> DecideEnrollmentRequest(const std::string& id,
                                                                bool approve,
                                                                const std::string& reason,
                                                                const std::string& actor);
  EnrollmentApproval approval() const { return options_.approval; }

  // Records the revocation of `agent_id` (synced, audited) and adds it to the
  // in-memory set. Returns false when it was already revoked (nothing written).
  absl::StatusOr<bool> Revoke(const std::string& agent_id, const std::string& reason,
                              const std::string& actor);

 private:
  absl::StatusOr<IssuedCertificate> Issue(const std::string& agent_id, const std::string& csr_pem,
                                          const char* how,
                                          std::vector<std::pair<std::string, std::string>> extra,
                                          const std::string& actor, const char* action);

  StateStore* const store_;
  const Clock* const clock_;
  const IdentityOptions options_;
  std::mutex op_mu_;  // serializes the blocking operations
  mutable std::mutex revoked_mu_;
  std::set<std::string> revoked_;
  boost::asio::thread_pool pool_{1};
};

}  // namespace fedlora::coordinator
