#include "common/crypto/pki.h"

#include <arpa/inet.h>
#include <openssl/ec.h>
#include <openssl/obj_mac.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <string_view>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/crypto/crypto.h"
#include "common/crypto/openssl_util.h"
#include "common/status/status.h"

namespace fedlora::common {
namespace {

constexpr char kServerCommonName[] = "fedlora-coordinator";
constexpr char kCaCommonName[] = "fedlora fleet CA";
constexpr char kOrganization[] = "fedlora";
// Certificates start 5 minutes in the past to tolerate clock skew in a fleet.
constexpr long kBackdateSeconds = 5 * 60;  // NOLINT(runtime/int): OpenSSL's type
constexpr int kMaxValidityDays = 100 * 365;

// absl::string_view is not std::string_view in this abseil build.
inline absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

absl::Status MakeDirs(const std::string& dir) {
  if (dir.empty()) return absl::InvalidArgumentError("PKI: empty directory path");
  std::string partial;
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = dir.find('/', pos + 1);
    partial = dir.substr(0, pos);
    if (partial.empty()) continue;
    if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
      return ErrnoToStatus(errno, "creating directory " + partial);
    }
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0) return ErrnoToStatus(errno, "stat " + dir);
  if (!S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError("PKI: expected a directory at " + dir +
                                         ", found another kind of file");
  }
  return absl::OkStatus();
}

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

absl::StatusOr<EvpPkeyPtr> GenerateP256Key() {
  EvpPkeyPtr key(EVP_EC_gen("P-256"));
  if (!key) return OpenSslError("generating P-256 key");
  return key;
}

absl::StatusOr<std::string> KeyToPem(EVP_PKEY* key) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio ||
      PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr) != 1) {
    return OpenSslError("encoding private key as PEM");
  }
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);  // NOLINT(runtime/int)
  return std::string(data, static_cast<size_t>(len));
}

absl::StatusOr<std::string> CertToPem(X509* cert) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509(bio.get(), cert) != 1) {
    return OpenSslError("encoding certificate as PEM");
  }
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);  // NOLINT(runtime/int)
  return std::string(data, static_cast<size_t>(len));
}

absl::StatusOr<X509Ptr> CertFromPem(std::string_view pem, std::string_view source) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return OpenSslError("BIO for certificate");
  X509Ptr cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) {
    ClearOpenSslErrors();
    return absl::InvalidArgumentError(
        absl::StrCat(Sv(source), ": expected a PEM certificate (BEGIN CERTIFICATE), found none"));
  }
  return cert;
}

absl::StatusOr<EvpPkeyPtr> KeyFromPem(std::string_view pem, std::string_view source) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return OpenSslError("BIO for private key");
  EvpPkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!key) {
    ClearOpenSslErrors();
    return absl::InvalidArgumentError(
        absl::StrCat(Sv(source), ": expected an unencrypted PEM private key, found none"));
  }
  return key;
}

absl::Status AddNameEntry(X509_NAME* name, const char* field, const std::string& value) {
  if (X509_NAME_add_entry_by_txt(name, field, MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(value.c_str()), -1, -1,
                                 0) != 1) {
    return OpenSslError(absl::StrCat("certificate subject ", field, "=", value));
  }
  return absl::OkStatus();
}

// Adds an extension given in openssl.cnf syntax ("critical,CA:TRUE").
absl::Status AddExtension(X509* cert, X509* issuer, int nid, const std::string& value) {
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509ExtensionPtr ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str()));
  if (!ext)
    return OpenSslError(absl::StrCat("certificate extension ", OBJ_nid2sn(nid), "=", value));
  if (X509_add_ext(cert, ext.get(), -1) != 1) {
    return OpenSslError(absl::StrCat("adding certificate extension ", OBJ_nid2sn(nid)));
  }
  return absl::OkStatus();
}

absl::Status SetRandomSerial(X509* cert) {
  // 159 random bits: positive, non-zero with overwhelming probability, <= 20 bytes (RFC 5280).
  std::string bytes = RandomBytes(20);
  bytes[0] = static_cast<char>((static_cast<unsigned char>(bytes[0]) & 0x7f) | 0x01);
  BignumPtr bn(BN_bin2bn(reinterpret_cast<const unsigned char*>(bytes.data()),
                         static_cast<int>(bytes.size()), nullptr));
  if (!bn) return OpenSslError("certificate serial");
  Asn1IntegerPtr serial(BN_to_ASN1_INTEGER(bn.get(), nullptr));
  if (!serial || X509_set_serialNumber(cert, serial.get()) != 1) {
    return OpenSslError("certificate serial");
  }
  return absl::OkStatus();
}

absl::Status CheckValidity(int validity_days) {
  if (validity_days <= 0 || validity_days > kMaxValidityDays) {
    return absl::InvalidArgumentError(absl::StrCat("PKI: expected validity_days in [1, ",
                                                   kMaxValidityDays, "], found ", validity_days));
  }
  return absl::OkStatus();
}

struct CertSpec {
  std::string common_name;
  std::string unit;  // OU
  bool is_ca = false;
  bool server_auth = false;
  std::vector<std::string> sans;  // DNS names or IPs (server certificates)
  int validity_days = 365;
  // Explicit validity window (seconds since the epoch) instead of validity_days.
  int64_t not_before_unix = 0;
  int64_t not_after_unix = 0;
};

bool IsIpAddress(const std::string& s) {
  unsigned char buf[16];
  return inet_pton(AF_INET, s.c_str(), buf) == 1 || inet_pton(AF_INET6, s.c_str(), buf) == 1;
}

absl::StatusOr<std::string> SanList(const std::vector<std::string>& sans) {
  if (sans.empty()) {
    return absl::InvalidArgumentError(
        "PKI: expected at least one server subject alternative name, found none");
  }
  std::vector<std::string> parts;
  for (const std::string& san : sans) {
    if (san.empty() || san.find_first_of(", \t\r\n:") != std::string::npos) {
      if (!IsIpAddress(san)) {  // IPv6 addresses legitimately contain ':'
        return absl::InvalidArgumentError(absl::StrCat(
            "PKI: expected a DNS name or IP address as server SAN, found \"", san, "\""));
      }
    }
    parts.push_back(absl::StrCat(IsIpAddress(san) ? "IP:" : "DNS:", san));
  }
  return absl::StrJoin(parts, ",");
}

// Builds and signs a certificate for `key`. A CA certificate is self-signed
// (issuer == nullptr, issuer_key == key).
absl::StatusOr<X509Ptr> MakeCertificate(const CertSpec& spec, EVP_PKEY* key, X509* issuer,
                                        EVP_PKEY* issuer_key) {
  X509Ptr cert(X509_new());
  if (!cert) return OpenSslError("allocating certificate");
  if (X509_set_version(cert.get(), X509_VERSION_3) != 1) return OpenSslError("certificate version");
  RETURN_IF_ERROR(SetRandomSerial(cert.get()));
  if (spec.not_after_unix != 0) {
    if (ASN1_TIME_set(X509_getm_notBefore(cert.get()),
                      static_cast<time_t>(spec.not_before_unix)) == nullptr ||
        ASN1_TIME_set(X509_getm_notAfter(cert.get()), static_cast<time_t>(spec.not_after_unix)) ==
            nullptr) {
      return OpenSslError("certificate validity window");
    }
  } else if (X509_gmtime_adj(X509_getm_notBefore(cert.get()), -kBackdateSeconds) == nullptr ||
             X509_time_adj_ex(X509_getm_notAfter(cert.get()), spec.validity_days, 0, nullptr) ==
                 nullptr) {
    return OpenSslError("certificate validity");
  }
  if (X509_set_pubkey(cert.get(), key) != 1) return OpenSslError("certificate public key");

  X509_NAME* subject = X509_get_subject_name(cert.get());
  RETURN_IF_ERROR(AddNameEntry(subject, "O", kOrganization));
  if (!spec.unit.empty()) RETURN_IF_ERROR(AddNameEntry(subject, "OU", spec.unit));
  RETURN_IF_ERROR(AddNameEntry(subject, "CN", spec.common_name));
  X509* signer = issuer != nullptr ? issuer : cert.get();
  if (X509_set_issuer_name(cert.get(), X509_get_subject_name(signer)) != 1) {
    return OpenSslError("certificate issuer");
  }

  RETURN_IF_ERROR(AddExtension(cert.get(), signer, NID_subject_key_identifier, "hash"));
  RETURN_IF_ERROR(AddExtension(cert.get(), signer, NID_authority_key_identifier, "keyid:always"));
  if (spec.is_ca) {
    RETURN_IF_ERROR(AddExtension(cert.get(), signer, NID_basic_constraints, "critical,CA:TRUE"));
    RETURN_IF_ERROR(
        AddExtension(cert.get(), signer, NID_key_usage, "critical,keyCertSign,cRLSign"));
  } else {
    RETURN_IF_ERROR(AddExtension(cert.get(), signer, NID_basic_constraints, "critical,CA:FALSE"));
    RETURN_IF_ERROR(
        AddExtension(cert.get(), signer, NID_key_usage, "critical,digitalSignature,keyAgreement"));
    RETURN_IF_ERROR(AddExtension(cert.get(), signer, NID_ext_key_usage,
                                 spec.server_auth ? "serverAuth" : "clientAuth"));
  }
  if (!spec.sans.empty()) {
    ASSIGN_OR_RETURN(std::string sans, SanList(spec.sans));
    RETURN_IF_ERROR(AddExtension(cert.get(), signer, NID_subject_alt_name, sans));
  }
  if (X509_sign(cert.get(), issuer_key, EVP_sha256()) <= 0)
    return OpenSslError("signing certificate");
  return cert;
}

// Writes <dir>/<stem>.pem (0644) and <dir>/<stem>.key (0600).
absl::Status WritePair(const std::string& dir, const std::string& stem, X509* cert, EVP_PKEY* key) {
  ASSIGN_OR_RETURN(std::string cert_pem, CertToPem(cert));
  ASSIGN_OR_RETURN(std::string key_pem, KeyToPem(key));
  // Certificate first: for the CA, an existing ca.key then implies a complete pair.
  RETURN_IF_ERROR(WriteFileAtomic(dir + "/" + stem + ".pem", cert_pem, 0644));
  absl::Status s = WriteFileAtomic(dir + "/" + stem + ".key", key_pem, 0600);
  OPENSSL_cleanse(key_pem.data(), key_pem.size());
  return s;
}

absl::Status CheckNameImpl(const std::string& name) {
  if (name.empty() || name.size() > 64 || name[0] == '.' || name[0] == '-') {
    return absl::InvalidArgumentError(absl::StrCat(
        "certificate name: expected 1-64 characters not starting with '.' or '-', found \"", name,
        "\""));
  }
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_' || c == '.';
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          "certificate name: expected only letters, digits, '-', '_' and '.', found \"", name,
          "\""));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> NameEntry(X509_NAME* name, int nid) {
  int idx = X509_NAME_get_index_by_NID(name, nid, -1);
  if (idx < 0) return std::string();
  X509_NAME_ENTRY* entry = X509_NAME_get_entry(name, idx);
  ASN1_STRING* data = X509_NAME_ENTRY_get_data(entry);
  unsigned char* utf8 = nullptr;
  int len = ASN1_STRING_to_UTF8(&utf8, data);
  if (len < 0) return OpenSslError(absl::StrCat("certificate subject ", OBJ_nid2sn(nid)));
  std::string out(reinterpret_cast<char*>(utf8), static_cast<size_t>(len));
  OPENSSL_free(utf8);
  return out;
}

}  // namespace

const char* CertRoleName(CertRole role) {
  switch (role) {
    case CertRole::kAgent:
      return "agent";
    case CertRole::kAdmin:
      return "admin";
    case CertRole::kViewer:
      return "viewer";
    case CertRole::kServer:
      return "server";
  }
  return "unknown";
}

absl::Status InitPki(const std::string& dir, const PkiOptions& options) {
  RETURN_IF_ERROR(CheckValidity(options.validity_days));
  ASSIGN_OR_RETURN(std::string sans, SanList(options.server_sans));  // validate before writing
  (void)sans;
  RETURN_IF_ERROR(MakeDirs(dir));
  if (FileExists(dir + "/ca.key")) {
    return absl::AlreadyExistsError("PKI: " + dir +
                                    "/ca.key already exists; refusing to overwrite the fleet CA");
  }

  ASSIGN_OR_RETURN(EvpPkeyPtr ca_key, GenerateP256Key());
  CertSpec ca_spec;
  ca_spec.common_name = kCaCommonName;
  ca_spec.is_ca = true;
  // The CA outlives the certificates it signs.
  ca_spec.validity_days = std::min(kMaxValidityDays, options.validity_days * 10);
  ASSIGN_OR_RETURN(X509Ptr ca, MakeCertificate(ca_spec, ca_key.get(), nullptr, ca_key.get()));

  ASSIGN_OR_RETURN(EvpPkeyPtr server_key, GenerateP256Key());
  CertSpec server_spec;
  server_spec.common_name = kServerCommonName;
  server_spec.unit = CertRoleName(CertRole::kServer);
  server_spec.server_auth = true;
  server_spec.sans = options.server_sans;
  server_spec.validity_days = options.validity_days;
  ASSIGN_OR_RETURN(X509Ptr server,
                   MakeCertificate(server_spec, server_key.get(), ca.get(), ca_key.get()));

  ASSIGN_OR_RETURN(EvpPkeyPtr admin_key, GenerateP256Key());
  CertSpec admin_spec;
  admin_spec.common_name = "admin";
  admin_spec.unit = CertRoleName(CertRole::kAdmin);
  admin_spec.validity_days = options.validity_days;
  ASSIGN_OR_RETURN(X509Ptr admin,
                   MakeCertificate(admin_spec, admin_key.get(), ca.get(), ca_key.get()));

  RETURN_IF_ERROR(WritePair(dir, "coordinator", server.get(), server_key.get()));
  RETURN_IF_ERROR(WritePair(dir, "admin", admin.get(), admin_key.get()));
  // ca.key last: its presence marks a complete PKI (a failed run can be retried).
  return WritePair(dir, "ca", ca.get(), ca_key.get());
}

absl::Status IssueCertificate(const std::string& ca_dir, const std::string& name, CertRole role,
                              const std::string& out_dir, int validity_days) {
  RETURN_IF_ERROR(CheckNameImpl(name));
  RETURN_IF_ERROR(CheckValidity(validity_days));
  ASSIGN_OR_RETURN(std::string ca_pem, ReadFileToString(ca_dir + "/ca.pem"));
  ASSIGN_OR_RETURN(std::string ca_key_pem, ReadFileToString(ca_dir + "/ca.key"));
  ASSIGN_OR_RETURN(X509Ptr ca, CertFromPem(ca_pem, ca_dir + "/ca.pem"));
  ASSIGN_OR_RETURN(EvpPkeyPtr ca_key, KeyFromPem(ca_key_pem, ca_dir + "/ca.key"));
  OPENSSL_cleanse(ca_key_pem.data(), ca_key_pem.size());
  if (X509_check_private_key(ca.get(), ca_key.get()) != 1) {
    ClearOpenSslErrors();
    return absl::FailedPreconditionError("PKI: " + ca_dir + "/ca.key does not match " + ca_dir +
                                         "/ca.pem");
  }

  ASSIGN_OR_RETURN(EvpPkeyPtr key, GenerateP256Key());
  CertSpec spec;
  spec.common_name = name;
  spec.unit = CertRoleName(role);
  spec.validity_days = validity_days;
  if (role == CertRole::kServer) {
    spec.server_auth = true;
    spec.sans = {name};
  }
  ASSIGN_OR_RETURN(X509Ptr cert, MakeCertificate(spec, key.get(), ca.get(), ca_key.get()));
  RETURN_IF_ERROR(MakeDirs(out_dir));
  return WritePair(out_dir, name, cert.get(), key.get());
}

using X509ReqPtr = OpenSslPtr<X509_REQ, X509_REQ_free>;

absl::Status CheckCertName(const std::string& name) { return CheckNameImpl(name); }

absl::StatusOr<KeyAndCsr> GenerateKeyAndCsr(const std::string& name) {
  RETURN_IF_ERROR(CheckNameImpl(name));
  ASSIGN_OR_RETURN(EvpPkeyPtr key, GenerateP256Key());
  X509ReqPtr req(X509_REQ_new());
  if (!req || X509_REQ_set_version(req.get(), 0) != 1) return OpenSslError("allocating CSR");
  X509NamePtr subject(X509_NAME_new());
  if (!subject) return OpenSslError("CSR subject");
  RETURN_IF_ERROR(AddNameEntry(subject.get(), "CN", name));
  if (X509_REQ_set_subject_name(req.get(), subject.get()) != 1 ||
      X509_REQ_set_pubkey(req.get(), key.get()) != 1 ||
      X509_REQ_sign(req.get(), key.get(), EVP_sha256()) <= 0) {
    return OpenSslError("signing CSR");
  }
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509_REQ(bio.get(), req.get()) != 1) {
    return OpenSslError("encoding CSR as PEM");
  }
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);  // NOLINT(runtime/int)
  KeyAndCsr out;
  out.csr_pem.assign(data, static_cast<size_t>(len));
  ASSIGN_OR_RETURN(out.key_pem, KeyToPem(key.get()));
  return out;
}

absl::StatusOr<CaMaterial> LoadCa(const std::string& ca_cert_path,
                                  const std::string& ca_key_path) {
  CaMaterial ca;
  ASSIGN_OR_RETURN(ca.cert_pem, ReadFileToString(ca_cert_path));
  ASSIGN_OR_RETURN(ca.key_pem, ReadFileToString(ca_key_path));
  ASSIGN_OR_RETURN(X509Ptr cert, CertFromPem(ca.cert_pem, ca_cert_path));
  ASSIGN_OR_RETURN(EvpPkeyPtr key, KeyFromPem(ca.key_pem, ca_key_path));
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    ClearOpenSslErrors();
    return absl::FailedPreconditionError("PKI: " + ca_key_path + " does not match " +
                                         ca_cert_path);
  }
  return ca;
}

namespace {

struct ParsedCsr {
  EvpPkeyPtr pub;
  std::string common_name;
};

// Parses a PEM CSR and checks its self-signature.
absl::StatusOr<ParsedCsr> ParseCsr(const std::string& csr_pem) {
  if (csr_pem.size() > 16384) {
    return absl::InvalidArgumentError(
        absl::StrCat("CSR: expected at most 16384 bytes of PEM, found ", csr_pem.size()));
  }
  BioPtr bio(BIO_new_mem_buf(csr_pem.data(), static_cast<int>(csr_pem.size())));
  if (!bio) return OpenSslError("BIO for CSR");
  X509ReqPtr req(PEM_read_bio_X509_REQ(bio.get(), nullptr, nullptr, nullptr));
  if (!req) {
    ClearOpenSslErrors();
    return absl::InvalidArgumentError(
        "CSR: expected a PEM certificate request (BEGIN CERTIFICATE REQUEST), found none");
  }
  EvpPkeyPtr pub(X509_REQ_get_pubkey(req.get()));
  if (!pub) {
    ClearOpenSslErrors();
    return absl::InvalidArgumentError("CSR: carries no readable public key");
  }
  if (X509_REQ_verify(req.get(), pub.get()) != 1) {
    ClearOpenSslErrors();
    return absl::InvalidArgumentError(
        "CSR signature does not verify under the CSR's own public key");
  }
  ParsedCsr out;
  ASSIGN_OR_RETURN(out.common_name,
                   NameEntry(X509_REQ_get_subject_name(req.get()), NID_commonName));
  out.pub = std::move(pub);
  return out;
}

}  // namespace

absl::StatusOr<CsrInfo> ReadCsr(const std::string& csr_pem) {
  ASSIGN_OR_RETURN(ParsedCsr parsed, ParseCsr(csr_pem));
  RETURN_IF_ERROR(CheckNameImpl(parsed.common_name));
  unsigned char* der = nullptr;
  const int len = i2d_PUBKEY(parsed.pub.get(), &der);
  if (len <= 0) return OpenSslError("encoding the CSR public key");
  CsrInfo info;
  info.common_name = parsed.common_name;
  info.key_fingerprint =
      Sha256Hex(std::string_view(reinterpret_cast<const char*>(der), static_cast<size_t>(len)));
  OPENSSL_free(der);
  return info;
}

absl::StatusOr<std::string> SignCsr(const CaMaterial& ca, const std::string& csr_pem,
                                    const std::string& expected_cn, CertRole role,
                                    int validity_days) {
  RETURN_IF_ERROR(CheckValidity(validity_days));
  if (role == CertRole::kServer) {
    return absl::InvalidArgumentError("SignCsr: issues client certificates only, not server");
  }
  ASSIGN_OR_RETURN(ParsedCsr parsed, ParseCsr(csr_pem));
  EvpPkeyPtr pub = std::move(parsed.pub);
  const std::string cn = parsed.common_name;
  if (cn != expected_cn) {
    return absl::PermissionDeniedError(absl::StrCat("CSR: expected subject CN '", expected_cn,
                                                    "', found '", cn, "'"));
  }
  ASSIGN_OR_RETURN(X509Ptr ca_cert, CertFromPem(ca.cert_pem, "CA certificate"));
  ASSIGN_OR_RETURN(EvpPkeyPtr ca_key, KeyFromPem(ca.key_pem, "CA key"));
  CertSpec spec;
  spec.common_name = expected_cn;
  spec.unit = CertRoleName(role);
  spec.validity_days = validity_days;
  ASSIGN_OR_RETURN(X509Ptr cert, MakeCertificate(spec, pub.get(), ca_cert.get(), ca_key.get()));
  return CertToPem(cert.get());
}

absl::Status IssueCertificateWindow(const std::string& ca_dir, const std::string& name,
                                    CertRole role, const std::string& out_dir,
                                    int64_t not_before_unix, int64_t not_after_unix) {
  RETURN_IF_ERROR(CheckNameImpl(name));
  if (not_after_unix <= not_before_unix) {
    return absl::InvalidArgumentError(absl::StrCat("PKI: expected not_after > not_before, found ",
                                                   not_after_unix, " <= ", not_before_unix));
  }
  ASSIGN_OR_RETURN(CaMaterial ca, LoadCa(ca_dir + "/ca.pem", ca_dir + "/ca.key"));
  ASSIGN_OR_RETURN(X509Ptr ca_cert, CertFromPem(ca.cert_pem, ca_dir + "/ca.pem"));
  ASSIGN_OR_RETURN(EvpPkeyPtr ca_key, KeyFromPem(ca.key_pem, ca_dir + "/ca.key"));
  ASSIGN_OR_RETURN(EvpPkeyPtr key, GenerateP256Key());
  CertSpec spec;
  spec.common_name = name;
  spec.unit = CertRoleName(role);
  spec.not_before_unix = not_before_unix;
  spec.not_after_unix = not_after_unix;
  ASSIGN_OR_RETURN(X509Ptr cert, MakeCertificate(spec, key.get(), ca_cert.get(), ca_key.get()));
  RETURN_IF_ERROR(MakeDirs(out_dir));
  return WritePair(out_dir, name, cert.get(), key.get());
}

absl::Status CheckIssuedCertificate(const std::string& cert_pem, const std::string& key_pem,
                                    const std::string& ca_pem, const std::string& expected_cn,
                                    CertRole role) {
  ASSIGN_OR_RETURN(X509Ptr cert, CertFromPem(cert_pem, "issued certificate"));
  ASSIGN_OR_RETURN(X509Ptr ca, CertFromPem(ca_pem, "CA certificate"));
  ASSIGN_OR_RETURN(EvpPkeyPtr key, KeyFromPem(key_pem, "new private key"));
  EVP_PKEY* ca_pub = X509_get0_pubkey(ca.get());
  if (ca_pub == nullptr || X509_verify(cert.get(), ca_pub) != 1) {
    ClearOpenSslErrors();
    return absl::PermissionDeniedError(
        "issued certificate: its signature does not verify under the fleet CA given (--ca)");
  }
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    ClearOpenSslErrors();
    return absl::PermissionDeniedError(
        "issued certificate: its public key is not the key generated for the CSR");
  }
  ASSIGN_OR_RETURN(CertIdentity id, ReadCertIdentity(cert_pem));
  if (id.common_name != expected_cn || id.role != CertRoleName(role)) {
    return absl::PermissionDeniedError(absl::StrCat(
        "issued certificate: expected CN '", expected_cn, "' role '", CertRoleName(role),
        "', found CN '", id.common_name, "' role '", id.role, "'"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> CertFingerprint(const std::string& pem) {
  ASSIGN_OR_RETURN(X509Ptr cert, CertFromPem(pem, "certificate"));
  unsigned char* der = nullptr;
  int len = i2d_X509(cert.get(), &der);
  if (len <= 0) return OpenSslError("encoding certificate as DER");
  std::string bytes(reinterpret_cast<char*>(der), static_cast<size_t>(len));
  OPENSSL_free(der);
  return Sha256Hex(bytes);
}

absl::StatusOr<int64_t> CertNotAfterUnix(const std::string& pem) {
  ASSIGN_OR_RETURN(X509Ptr cert, CertFromPem(pem, "certificate"));
  struct tm tm {};
  if (ASN1_TIME_to_tm(X509_get0_notAfter(cert.get()), &tm) != 1) {
    return OpenSslError("certificate notAfter");
  }
  return static_cast<int64_t>(timegm(&tm));
}

absl::StatusOr<CertIdentity> ReadCertIdentity(const std::string& pem) {
  ASSIGN_OR_RETURN(X509Ptr cert, CertFromPem(pem, "certificate"));
  X509_NAME* subject = X509_get_subject_name(cert.get());
  CertIdentity id;
  ASSIGN_OR_RETURN(id.common_name, NameEntry(subject, NID_commonName));
  ASSIGN_OR_RETURN(id.role, NameEntry(subject, NID_organizationalUnitName));
  if (id.common_name.empty()) {
    return absl::InvalidArgumentError("certificate: expected a subject CN, found none");
  }
  return id;
}

}  // namespace fedlora::common
