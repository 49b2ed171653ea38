#pragma once
// Fleet PKI on OpenSSL 3: a CA, the coordinator's server certificate and
// client certificates whose role is carried in the subject's OU
// ("agent", "admin", "viewer") and identity in the CN. Keys are P-256 (ECDSA);
// private key files are written with mode 0600.
//
// InitPki(dir) writes: ca.pem ca.key coordinator.pem coordinator.key admin.pem admin.key.
// IssueCertificate writes <out_dir>/<name>.pem and <name>.key signed by the CA in ca_dir.

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace fedlora::common {

enum class CertRole { kAgent, kAdmin, kViewer, kServer };
const char* CertRoleName(CertRole role);

struct PkiOptions {
  std::vector<std::string> server_sans = {"localhost", "127.0.0.1"};  // DNS names or IPs
  int validity_days = 365;
};

// Creates a new PKI in `dir` (created if absent). Refuses (AlreadyExists) to
// overwrite an existing ca.key.
absl::Status InitPki(const std::string& dir, const PkiOptions& options = {});

// Issues a certificate for `name` with `role`, signed by ca.pem/ca.key in ca_dir.
absl::Status IssueCertificate(const std::string& ca_dir, const std::string& name, CertRole role,
                              const std::string& out_dir, int validity_days = 365);

struct CertIdentity {
  std::string common_name;
  std::string role;  // OU
};
// Parses a PEM certificate and returns its CN and OU.
absl::StatusOr<CertIdentity> ReadCertIdentity(const std::string& pem);

}  // namespace fedlora::common
