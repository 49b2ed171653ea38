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
// RenewAgentCertificate calls Certificates.Renew on the main port with the
// current certificate and a CSR for a fresh key, checks the answer the same way,
// and replaces `key` and `cert`: both new files are written beside them and
// fsynced, then renamed over the old ones (key first). A crash between the two
// renames leaves a key that does not match the certificate; the old pair is kept
// as <cert>.old / <key>.old until the next renewal for that case.
// Every call has a deadline of timeout_s.

#include <cstdint>
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
  int timeout_s = 30;
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
