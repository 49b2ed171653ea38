#include "common/net/tls.h"

#include <grpc/grpc_security_constants.h>
#include <grpcpp/security/auth_context.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_context.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"
#include "common/crypto/pki.h"
#include "common/status/status.h"

namespace fedlora::common {
namespace {

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
    const TlsFiles& files) {
  ASSIGN_OR_RETURN(TlsPem pem, ReadTlsFiles(files));
  grpc::SslServerCredentialsOptions options(
      GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_root_certs = pem.ca;
  options.pem_key_cert_pairs.push_back({pem.key, pem.cert});
  auto creds = grpc::SslServerCredentials(options);
  if (creds == nullptr) return absl::InternalError("grpc::SslServerCredentials returned null");
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
  if (id.common_name.empty()) {
    return absl::UnauthenticatedError("the peer certificate has no subject CN");
  }
  return id;
}

}  // namespace fedlora::common
