#pragma once
// The agent side of enrollment and renewal (docs/security.md). Used by
// `fedlora-agent enroll` and `fedlora-agent renew`; torch-free.
//
// EnrollAgent generates the agent's P-256 key here (it never leaves the machine),
// sends a CSR with the one-time token to the coordinator's enrollment port
// (server-authenticated TLS 1.3 against `ca_cert`), checks the certificate it gets
// back (CN = name, role agent, public key = the new key, signed by `ca_cert`) and
// writes <out_dir>/<name>.key (0600) and <out_dir>/<name>.pem. Refuses to
// overwrite an existing key or certificate (AlreadyExists).
//
// Without a token (the coordinator runs `enrollment_approval: admin`), EnrollAgent
// files the CSR as a request for an admin to decide: it writes <name>.key (0600)
// and <name>.request (the request id) first, reports the request id and the key
// fingerprint through `progress` (the admin compares the fingerprint with
// `fedlora-admin enroll pending`), then polls every poll_interval_ms. Approved:
// the certificate is checked as above, <name>.pem written, <name>.request removed.
// Denied or expired: the key and request files are removed and the error says why
// (PermissionDenied / FailedPrecondition). Still pending after wait_s:
// DeadlineExceeded, files kept; running the same command again (no token) resumes
// waiting on the same request. UNAVAILABLE while polling (coordinator restarting)
// is reported and retried.
//
// RenewAgentCertificate calls Certificates.Renew on the main port with the
// current certificate and a CSR for a fresh key, checks the answer the same way,
// and replaces `key` and `cert`: both new files are written beside them and
// fsynced, then renamed over the old ones (key first). A crash between the two
// renames leaves a key that does not match the certificate; the old pair is kept
// as <cert>.old / <key>.old until the next renewal for that case.
// Every call has a deadline of timeout_s.

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"

namespace fedlora::common {

struct EnrollRequestOptions {
  std::string coordinator;      // enrollment address HOST:PORT
  std::string token;
  std::string name;             // agent id = certificate CN
  std::string ca_cert;          // fleet CA (PEM path)
  std::string out_dir;
  std::string tls_server_name;  // "" = HOST of coordinator
  int timeout_s = 30;           // per call
  // Admin-approval mode (token empty) only:
  int poll_interval_ms = 5000;
  int64_t wait_s = 3600;
  std::function<void(const std::string& line)> progress;  // may be empty
};

struct EnrolledFiles {
  std::string cert_path;
  std::string key_path;
  std::string fingerprint;
  int64_t not_after_unix = 0;
};

absl::StatusOr<EnrolledFiles> EnrollAgent(const EnrollRequestOptions& options);

struct RenewRequestOptions {
  std::string coordinator;  // main address HOST:PORT
  std::string ca_cert;
  std::string cert;         // current certificate (replaced)
  std::string key;          // current key (replaced)
  std::string tls_server_name;
  int timeout_s = 30;
  // Renew only when the current certificate expires within this many days
  // (0 = always). When it does not, returns the current files unchanged.
  int64_t within_days = 0;
};

struct RenewedFiles {
  bool renewed = false;
  std::string fingerprint;
  int64_t not_after_unix = 0;
};

absl::StatusOr<RenewedFiles> RenewAgentCertificate(const RenewRequestOptions& options);

}  // namespace fedlora::common
