#include "common/net/tls.h"

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/grpc_security_constants.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/auth_context.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_certificate_verifier.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <grpcpp/server_context.h>

#include <cstdlib>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"
#include "common/crypto/pki.h"
#include "common/status/status.h"

// The server-auth-only (enrollment) port: gRPC 1.51 (Debian 12) keeps the TLS
// version range of SSL server credentials in core
// (grpc_ssl_server_credentials::set_min_tls_version, an exported, non-virtual
// member) but offers no C or C++ API to set it. We declare just that member and
// call it on the credentials that grpc_ssl_server_credentials_create_with_options
// returns (a grpc_ssl_server_credentials; single inheritance, same address). The
// TLS 1.2 refusal test in tests/common/tls_test.cc guards this.
class grpc_ssl_server_credentials {
 public:
  void set_min_tls_version(grpc_tls_version version);
};

namespace fedlora::common {
namespace {

// The mutual-TLS port needs a certificate verifier that runs in the handshake
// (PeerCertificateCheck), which only gRPC's TLS credentials
// (grpc::experimental::TlsServerCredentials) offer. Their core options
// (grpc_tls_credentials_options) keep a TLS version range, default TLS 1.2..1.3,
// that TlsServerSecurityConnector hands to the handshaker factory, but gRPC 1.51
// has no API to set it (later releases added one). In 1.51.1 (libgrpc.so.29) the
// fields sit at fixed offsets, read off the library's own code:
// grpc_tls_credentials_options_set_cert_request_type writes 0x18,
// grpc_tls_credentials_options_set_verify_server_cert 0x1c, and
// TlsServerSecurityConnector::UpdateHandshakerFactoryLocked reads min at 0x20 and
// max at 0x24. We write min only after checking the gRPC version and that these
// four fields hold exactly what we set and the defaults; any mismatch is an error
// at start (never a silently TLS 1.2 port). The TLS 1.2 refusal test in
// tests/common/tls_test.cc guards it too.
constexpr size_t kCertRequestTypeOffset = 0x18;
constexpr size_t kVerifyServerCertOffset = 0x1c;
constexpr size_t kMinTlsVersionOffset = 0x20;
constexpr size_t kMaxTlsVersionOffset = 0x24;

absl::Status SetMinTls13(grpc_tls_credentials_options* options,
                         grpc_ssl_client_certificate_request_type request_type) {
  const std::string version = grpc::Version();
  if (version.rfind("1.51.", 0) != 0) {
    return absl::InternalError(absl::StrCat(
        "TLS 1.3-only mutual TLS is implemented for gRPC 1.51 (see common/net/tls.cc); this "
        "process runs gRPC ",
        version));
  }
  auto* base = reinterpret_cast<unsigned char*>(options);
  auto read_int = [&](size_t offset) {
    int32_t v;
    std::memcpy(&v, base + offset, sizeof(v));
    return v;
  };
  bool verify_server = false;
  std::memcpy(&verify_server, base + kVerifyServerCertOffset, sizeof(bool));
  if (read_int(kCertRequestTypeOffset) != static_cast<int32_t>(request_type) || !verify_server ||
      read_int(kMinTlsVersionOffset) != static_cast<int32_t>(grpc_tls_version::TLS1_2) ||
      read_int(kMaxTlsVersionOffset) != static_cast<int32_t>(grpc_tls_version::TLS1_3)) {
    return absl::InternalError(
        "gRPC's TLS credential options do not have the layout common/net/tls.cc expects; "
        "refusing to serve without a TLS 1.3 minimum");
  }
  const int32_t tls13 = static_cast<int32_t>(grpc_tls_version::TLS1_3);
  std::memcpy(base + kMinTlsVersionOffset, &tls13, sizeof(tls13));
  return absl::OkStatus();
}

// Runs a PeerCertificateCheck synchronously inside the handshake.
class PeerCheckVerifier final : public grpc::experimental::ExternalCertificateVerifier {
 public:
  explicit PeerCheckVerifier(PeerCertificateCheck check) : check_(std::move(check)) {}

  bool Verify(grpc::experimental::TlsCustomVerificationCheckRequest* request,
              std::function<void(grpc::Status)> /*callback*/,
              grpc::Status* sync_status) override {
    const grpc::string_ref pem_ref = request->peer_cert();
    const std::string pem(pem_ref.data(), pem_ref.size());
    auto id = ReadCertIdentity(pem);
    if (!id.ok()) {
      *sync_status = grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                                  absl::StrCat("cannot read the client certificate: ",
                                               id.status().message()));
      return true;
    }
    absl::Status s = check_ ? check_(id->common_name, pem) : absl::OkStatus();
    *sync_status = s.ok() ? grpc::Status::OK
                          : grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                                         std::string(s.message()));
    return true;  // synchronous
  }
  void Cancel(grpc::experimental::TlsCustomVerificationCheckRequest*) override {}

 private:
  const PeerCertificateCheck check_;
};

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeMutualTls13ServerCredentials(
    const std::string& ca_pem, const std::string& cert_pem, const std::string& key_pem,
    PeerCertificateCheck check) {
  auto provider = std::make_shared<grpc::experimental::StaticDataCertificateProvider>(
      ca_pem, std::vector<grpc::experimental::IdentityKeyCertPair>{{key_pem, cert_pem}});
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  const auto request_type = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  options.set_cert_request_type(request_type);
  options.set_certificate_verifier(
      grpc::experimental::ExternalCertificateVerifier::Create<PeerCheckVerifier>(
          std::move(check)));
  RETURN_IF_ERROR(SetMinTls13(options.c_credentials_options(), request_type));
  auto creds = grpc::experimental::TlsServerCredentials(options);
  if (creds == nullptr) return absl::InternalError("grpc TlsServerCredentials returned null");
  return creds;
}

// grpc::ServerCredentials over a core grpc_server_credentials (owned).
class CoreServerCredentials final : public grpc::ServerCredentials {
 public:
  explicit CoreServerCredentials(grpc_server_credentials* creds) : creds_(creds) {}
  ~CoreServerCredentials() override { grpc_server_credentials_release(creds_); }
  // Not used by fedlora; a processor would be silently ignored, so refuse loudly.
  void SetAuthMetadataProcessor(const std::shared_ptr<grpc::AuthMetadataProcessor>&) override {
    std::abort();
  }

 private:
  int AddPortToServer(const std::string& addr, grpc_server* server) override {
    return grpc_server_add_http2_port(server, addr.c_str(), creds_);
  }
  grpc_server_credentials* const creds_;
};

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeTls13ServerCredentials(
    const std::string& ca_pem, const std::string& cert_pem, const std::string& key_pem,
    grpc_ssl_client_certificate_request_type request_type) {
  grpc_ssl_pem_key_cert_pair pair{key_pem.c_str(), cert_pem.c_str()};
  grpc_ssl_server_certificate_config* config = grpc_ssl_server_certificate_config_create(
      ca_pem.empty() ? nullptr : ca_pem.c_str(), &pair, 1);
  if (config == nullptr) return absl::InternalError("grpc_ssl_server_certificate_config_create");
  grpc_ssl_server_credentials_options* options =
      grpc_ssl_server_credentials_create_options_using_config(request_type, config);
  if (options == nullptr) {
    return absl::InternalError("grpc_ssl_server_credentials_create_options_using_config");
  }
  grpc_server_credentials* creds = grpc_ssl_server_credentials_create_with_options(options);
  if (creds == nullptr) {
    return absl::InternalError("grpc_ssl_server_credentials_create_with_options returned null");
  }
  reinterpret_cast<grpc_ssl_server_credentials*>(creds)->set_min_tls_version(TLS1_3);
  return std::make_shared<CoreServerCredentials>(creds);
}

struct TlsPem {
  std::string ca;
  std::string cert;
  std::string key;
};

absl::StatusOr<TlsPem> ReadTlsFiles(const TlsFiles& files) {
  if (files.ca_cert.empty() || files.cert.empty() || files.key.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("TLS needs a CA certificate, a certificate and a key; got ca_cert='",
                     files.ca_cert, "' cert='", files.cert, "' key='", files.key, "'"));
  }
  TlsPem pem;
  ASSIGN_OR_RETURN(pem.ca, ReadFileToString(files.ca_cert));
  ASSIGN_OR_RETURN(pem.cert, ReadFileToString(files.cert));
  ASSIGN_OR_RETURN(pem.key, ReadFileToString(files.key));
  for (const auto* p : {&pem.ca, &pem.cert}) {
    if (p->find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("expected a PEM certificate in '",
                                                     p == &pem.ca ? files.ca_cert : files.cert,
                                                     "', found no BEGIN CERTIFICATE block"));
    }
  }
  if (pem.key.find("PRIVATE KEY-----") == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("expected a PEM private key in '", files.key, "', found none"));
  }
  return pem;
}

std::string FirstProperty(const grpc::AuthContext& auth, const char* name) {
  auto values = auth.FindPropertyValues(name);
  if (values.empty()) return "";
  return std::string(values.front().data(), values.front().size());
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFiles& files, PeerCertificateCheck check) {
  ASSIGN_OR_RETURN(TlsPem pem, ReadTlsFiles(files));
  return MakeMutualTls13ServerCredentials(pem.ca, pem.cert, pem.key, std::move(check));
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerAuthOnlyCredentials(
    const std::string& cert, const std::string& key) {
  // ReadTlsFiles wants a CA; the certificate stands in for it (never used: no
  // client certificate is requested).
  ASSIGN_OR_RETURN(TlsPem pem, ReadTlsFiles({cert, cert, key}));
  return MakeTls13ServerCredentials("", pem.cert, pem.key,
                                    GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeServerAuthChannelCredentials(
    const std::string& ca_cert) {
  if (ca_cert.empty()) {
    return absl::InvalidArgumentError("TLS needs the fleet CA certificate to verify the server");
  }
  ASSIGN_OR_RETURN(std::string ca, ReadFileToString(ca_cert));
  if (ca.find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "expected a PEM certificate in '", ca_cert, "', found no BEGIN CERTIFICATE block"));
  }
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = ca;
  auto creds = grpc::SslCredentials(options);
  if (creds == nullptr) return absl::InternalError("grpc::SslCredentials returned null");
  return creds;
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsFiles& files) {
  ASSIGN_OR_RETURN(TlsPem pem, ReadTlsFiles(files));
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = pem.ca;
  options.pem_private_key = pem.key;
  options.pem_cert_chain = pem.cert;
  auto creds = grpc::SslCredentials(options);
  if (creds == nullptr) return absl::InternalError("grpc::SslCredentials returned null");
  return creds;
}

absl::StatusOr<PeerIdentity> GetPeerIdentity(const grpc::ServerContextBase& context) {
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth == nullptr || !auth->IsPeerAuthenticated()) {
    return absl::UnauthenticatedError("the peer presented no verified client certificate");
  }
  PeerIdentity id;
  id.common_name = FirstProperty(*auth, GRPC_X509_CN_PROPERTY_NAME);
  const std::string pem = FirstProperty(*auth, GRPC_X509_PEM_CERT_PROPERTY_NAME);
  if (pem.empty()) {
    return absl::UnauthenticatedError("the peer's certificate is not available (x509_pem_cert)");
  }
  auto cert = ReadCertIdentity(pem);
  if (!cert.ok()) {
    return absl::UnauthenticatedError(
        absl::StrCat("cannot read the peer certificate: ", cert.status().message()));
  }
  if (id.common_name.empty()) id.common_name = cert->common_name;
  id.role = cert->role;
  auto fingerprint = CertFingerprint(pem);
  if (!fingerprint.ok()) return absl::UnauthenticatedError("cannot hash the peer certificate");
  id.fingerprint = *fingerprint;
  if (id.common_name.empty()) {
    return absl::UnauthenticatedError("the peer certificate has no subject CN");
  }
  return id;
}

}  // namespace fedlora::common
