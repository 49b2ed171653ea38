#pragma once
// Fleet PKI on OpenSSL 3: a CA, the coordinator's server certificate and
// client certificates whose role is carried in the subject's OU
// ("agent", "admin", "viewer") and identity in the CN. Keys are P-256 (ECDSA);
// private key files are written with mode 0600.
//
// InitPki(dir) writes: ca.pem ca.key coordinator.pem coordinator.key admin.pem admin.key.
// IssueCertificate writes <out_dir>/<name>.pem and <name>.key signed by the CA in ca_dir.

#include <cstdint>
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

// ---- Enrollment and renewal (docs/security.md, "Enrollment")

// Checks a certificate name (CN): 1-64 of [A-Za-z0-9._-], not starting with '.' or '-'.
absl::Status CheckCertName(const std::string& name);

// A fresh P-256 key (PEM, PKCS#8) and a certificate signing request for CN=name,
// signed by that key. The key never leaves the caller.
struct KeyAndCsr {
  std::string key_pem;
  std::string csr_pem;
};
absl::StatusOr<KeyAndCsr> GenerateKeyAndCsr(const std::string& name);

// A CA able to sign: its certificate and private key (PEM). LoadCa checks that
// they match; errors name `where`.
struct CaMaterial {
  std::string cert_pem;
  std::string key_pem;
};
absl::StatusOr<CaMaterial> LoadCa(const std::string& ca_cert_path, const std::string& ca_key_path);

// Reads a CSR for admin review (approval-mode enrollment): checks its
// self-signature (InvalidArgument) and its CN (CheckCertName), and returns the
// CN and the key fingerprint: hex SHA-256 of the DER SubjectPublicKeyInfo, which
// the agent prints and the admin compares before approving.
struct CsrInfo {
  std::string common_name;
  std::string key_fingerprint;
};
absl::StatusOr<CsrInfo> ReadCsr(const std::string& csr_pem);

// Signs a CSR: checks its self-signature (InvalidArgument "CSR signature does not
// verify") and that its subject CN equals `expected_cn` (PermissionDenied), then
// issues a client certificate for that CN with `role` in the OU whatever the CSR
// asks for (no extension of the CSR is copied). Returns the certificate PEM.
absl::StatusOr<std::string> SignCsr(const CaMaterial& ca, const std::string& csr_pem,
                                    const std::string& expected_cn, CertRole role,
                                    int validity_days);

// Issues <out_dir>/<name>.pem/.key valid from not_before_unix to not_after_unix
// (seconds since the epoch; may lie in the past — tests of expired certificates).
absl::Status IssueCertificateWindow(const std::string& ca_dir, const std::string& name,
                                    CertRole role, const std::string& out_dir,
                                    int64_t not_before_unix, int64_t not_after_unix);

// Checks a certificate received from the coordinator: signed by ca_pem, CN =
// expected_cn, OU = role, and its public key is the one of key_pem.
absl::Status CheckIssuedCertificate(const std::string& cert_pem, const std::string& key_pem,
                                    const std::string& ca_pem, const std::string& expected_cn,
                                    CertRole role);

// Hex SHA-256 of the certificate's DER encoding (its fingerprint).
absl::StatusOr<std::string> CertFingerprint(const std::string& pem);
// notAfter of a PEM certificate, seconds since the epoch.
absl::StatusOr<int64_t> CertNotAfterUnix(const std::string& pem);

}  // namespace fedlora::common
