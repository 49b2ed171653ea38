#include "common/net/enroll_client.h"

#include <grpcpp/grpcpp.h>
#include <sys/stat.h>

#include <chrono>
#include <ctime>

#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"
#include "common/crypto/pki.h"
#include "common/net/tls.h"
#include "common/status/status.h"
#include "fedlora/v1/fedlora.grpc.pb.h"

namespace fedlora::common {
namespace {

namespace v1 = ::fedlora::v1;

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

std::shared_ptr<grpc::Channel> Channel(const std::string& target,
                                       std::shared_ptr<grpc::ChannelCredentials> creds,
                                       const std::string& server_name) {
  grpc::ChannelArguments args;
  if (!server_name.empty()) args.SetSslTargetNameOverride(server_name);
  return grpc::CreateCustomChannel(target, creds, args);
}

absl::Status FromGrpc(const grpc::Status& s, const std::string& what) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat(what, ": ", s.error_message()));
}

}  // namespace

absl::StatusOr<EnrolledFiles> EnrollAgent(const EnrollRequestOptions& options) {
  RETURN_IF_ERROR(CheckCertName(options.name));
  if (options.token.empty()) return absl::InvalidArgumentError("enroll: expected --token");
  EnrolledFiles files;
  files.cert_path = options.out_dir + "/" + options.name + ".pem";
  files.key_path = options.out_dir + "/" + options.name + ".key";
  for (const std::string& p : {files.cert_path, files.key_path}) {
    if (Exists(p)) {
      return absl::AlreadyExistsError(absl::StrCat("enroll: ", p,
                                                   " already exists; refusing to overwrite it"));
    }
  }
  ASSIGN_OR_RETURN(auto creds, MakeServerAuthChannelCredentials(options.ca_cert));
  ASSIGN_OR_RETURN(std::string ca_pem, ReadFileToString(options.ca_cert));
  ASSIGN_OR_RETURN(KeyAndCsr kc, GenerateKeyAndCsr(options.name));
  auto stub = v1::Enrollment::NewStub(Channel(options.coordinator, creds, options.tls_server_name));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(options.timeout_s));
  v1::EnrollRequest request;
  request.set_token(options.token);
  request.set_csr_pem(kc.csr_pem);
  v1::CertificateResponse response;
  grpc::Status s = stub->Enroll(&ctx, request, &response);
  if (!s.ok()) return FromGrpc(s, absl::StrCat("enroll at ", options.coordinator));
  RETURN_IF_ERROR(CheckIssuedCertificate(response.certificate_pem(), kc.key_pem, ca_pem,
                                         options.name, CertRole::kAgent));
  RETURN_IF_ERROR(WriteFileAtomic(files.key_path, kc.key_pem, 0600));
  RETURN_IF_ERROR(WriteFileAtomic(files.cert_path, response.certificate_pem(), 0644));
  ASSIGN_OR_RETURN(files.fingerprint, CertFingerprint(response.certificate_pem()));
  files.not_after_unix = static_cast<int64_t>(response.not_after_unix());
  return files;
}

absl::StatusOr<RenewedFiles> RenewAgentCertificate(const RenewRequestOptions& options) {
  ASSIGN_OR_RETURN(std::string cert_pem, ReadFileToString(options.cert));
  ASSIGN_OR_RETURN(std::string key_pem, ReadFileToString(options.key));
  ASSIGN_OR_RETURN(std::string ca_pem, ReadFileToString(options.ca_cert));
  ASSIGN_OR_RETURN(CertIdentity id, ReadCertIdentity(cert_pem));
  RenewedFiles out;
  ASSIGN_OR_RETURN(out.not_after_unix, CertNotAfterUnix(cert_pem));
  ASSIGN_OR_RETURN(out.fingerprint, CertFingerprint(cert_pem));
  const int64_t now = static_cast<int64_t>(std::time(nullptr));
  if (options.within_days > 0 && out.not_after_unix - now > options.within_days * 86400) {
    return out;  // not due yet
  }
  ASSIGN_OR_RETURN(auto creds, MakeChannelCredentials({options.ca_cert, options.cert, options.key}));
  ASSIGN_OR_RETURN(KeyAndCsr kc, GenerateKeyAndCsr(id.common_name));
  auto stub =
      v1::Certificates::NewStub(Channel(options.coordinator, creds, options.tls_server_name));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(options.timeout_s));
  v1::RenewRequest request;
  request.set_csr_pem(kc.csr_pem);
  v1::CertificateResponse response;
  grpc::Status s = stub->Renew(&ctx, request, &response);
  if (!s.ok()) return FromGrpc(s, absl::StrCat("renew at ", options.coordinator));
  RETURN_IF_ERROR(CheckIssuedCertificate(response.certificate_pem(), kc.key_pem, ca_pem,
                                         id.common_name, CertRole::kAgent));
  RETURN_IF_ERROR(WriteFileAtomic(options.key + ".old", key_pem, 0600));
  RETURN_IF_ERROR(WriteFileAtomic(options.cert + ".old", cert_pem, 0644));
  RETURN_IF_ERROR(WriteFileAtomic(options.key, kc.key_pem, 0600));
  RETURN_IF_ERROR(WriteFileAtomic(options.cert, response.certificate_pem(), 0644));
  out.renewed = true;
  ASSIGN_OR_RETURN(out.fingerprint, CertFingerprint(response.certificate_pem()));
  out.not_after_unix = static_cast<int64_t>(response.not_after_unix());
  return out;
}

}  // namespace fedlora::common
