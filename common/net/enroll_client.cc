#include "common/net/enroll_client.h"

#include <grpcpp/grpcpp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <ctime>
#include <thread>

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

namespace {

// Admin-approval mode: file (or resume) a request and poll until it is decided.
absl::StatusOr<EnrolledFiles> EnrollByApproval(const EnrollRequestOptions& options,
                                               EnrolledFiles files, const std::string& ca_pem,
                                               v1::Enrollment::Stub* stub) {
  auto say = [&](const std::string& line) {
    if (options.progress) options.progress(line);
  };
  const std::string request_path = options.out_dir + "/" + options.name + ".request";
  std::string request_id;
  std::string key_pem;
  if (Exists(request_path)) {
    ASSIGN_OR_RETURN(request_id, ReadFileToString(request_path));
    while (!request_id.empty() && (request_id.back() == '\n' || request_id.back() == ' ')) {
      request_id.pop_back();
    }
    ASSIGN_OR_RETURN(key_pem, ReadFileToString(files.key_path));
    say(absl::StrCat("resuming enrollment request ", request_id, " for '", options.name, "'"));
  } else {
    ASSIGN_OR_RETURN(KeyAndCsr kc, GenerateKeyAndCsr(options.name));
    ASSIGN_OR_RETURN(CsrInfo csr, ReadCsr(kc.csr_pem));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(options.timeout_s));
    v1::RequestEnrollmentRequest request;
    request.set_csr_pem(kc.csr_pem);
    v1::EnrollmentRequestState state;
    grpc::Status s = stub->RequestEnrollment(&ctx, request, &state);
    if (!s.ok()) return FromGrpc(s, absl::StrCat("enrollment request at ", options.coordinator));
    if (state.key_fingerprint() != csr.key_fingerprint) {
      return absl::InternalError(absl::StrCat(
          "enrollment request: the coordinator reports key fingerprint ", state.key_fingerprint(),
          ", this key's is ", csr.key_fingerprint));
    }
    request_id = state.request_id();
    key_pem = kc.key_pem;
    RETURN_IF_ERROR(WriteFileAtomic(files.key_path, key_pem, 0600));
    RETURN_IF_ERROR(WriteFileAtomic(request_path, request_id + "\n", 0644));
    say(absl::StrCat("enrollment request ", request_id, " filed for '", options.name,
                     "'; key fingerprint ", csr.key_fingerprint));
    say(absl::StrCat("waiting for an admin: fedlora-admin enroll approve ", request_id,
                     " (compare the key fingerprint with `fedlora-admin enroll pending`)"));
  }
  auto forget = [&]() {
    ::unlink(request_path.c_str());
    ::unlink(files.key_path.c_str());
  };
  const auto start = std::chrono::steady_clock::now();
  const auto until = start + std::chrono::seconds(options.wait_s);
  for (int poll = 0;; ++poll) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(options.timeout_s));
    v1::GetEnrollmentRequestRequest request;
    request.set_request_id(request_id);
    v1::EnrollmentRequestState state;
    grpc::Status s = stub->GetEnrollmentRequest(&ctx, request, &state);
    const int64_t waited_s = std::chrono::duration_cast<std::chrono::seconds>(
                                 std::chrono::steady_clock::now() - start)
                                 .count();
    if (!s.ok() && s.error_code() != grpc::StatusCode::UNAVAILABLE) {
      return FromGrpc(s, absl::StrCat("enrollment request ", request_id, " at ",
                                      options.coordinator));
    }
    if (!s.ok()) {
      say(absl::StrCat("coordinator unavailable (", s.error_message(), "); retrying"));
    } else if (state.state() == v1::EnrollmentRequestState::APPROVED) {
      const std::string& pem = state.certificate().certificate_pem();
      RETURN_IF_ERROR(CheckIssuedCertificate(pem, key_pem, ca_pem, options.name,
                                             CertRole::kAgent));
      RETURN_IF_ERROR(WriteFileAtomic(files.cert_path, pem, 0644));
      ::unlink(request_path.c_str());
      say(absl::StrCat("approved by ", state.decided_by(), " after ", waited_s, " s"));
      ASSIGN_OR_RETURN(files.fingerprint, CertFingerprint(pem));
      files.not_after_unix = static_cast<int64_t>(state.certificate().not_after_unix());
      return files;
    } else if (state.state() == v1::EnrollmentRequestState::DENIED) {
      forget();
      return absl::PermissionDeniedError(absl::StrCat(
          "enrollment request ", request_id, " for '", options.name, "' was denied by ",
          state.decided_by(), state.reason().empty() ? "" : ": " + state.reason()));
    } else if (state.state() == v1::EnrollmentRequestState::EXPIRED) {
      forget();
      return absl::FailedPreconditionError(
          absl::StrCat("enrollment request ", request_id, " for '", options.name,
                       "' expired before an admin decided; run enroll again for a new one"));
    } else if (poll % 10 == 0) {
      say(absl::StrCat("still pending after ", waited_s, " s (request ", request_id, ")"));
    }
    const auto next =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(options.poll_interval_ms);
    if (next > until) {
      return absl::DeadlineExceededError(absl::StrCat(
          "enrollment request ", request_id, " for '", options.name, "' still pending after ",
          waited_s, " s; run the same command again (without --token) to keep waiting"));
    }
    std::this_thread::sleep_until(next);
  }
}

}  // namespace

absl::StatusOr<EnrolledFiles> EnrollAgent(const EnrollRequestOptions& options) {
  RETURN_IF_ERROR(CheckCertName(options.name));
  EnrolledFiles files;
  files.cert_path = options.out_dir + "/" + options.name + ".pem";
  files.key_path = options.out_dir + "/" + options.name + ".key";
  const std::string request_path = options.out_dir + "/" + options.name + ".request";
  const bool resume = options.token.empty() && Exists(request_path) && Exists(files.key_path);
  for (const std::string& p : {files.cert_path, files.key_path}) {
    if (Exists(p) && !(resume && p == files.key_path)) {
      return absl::AlreadyExistsError(absl::StrCat("enroll: ", p,
                                                   " already exists; refusing to overwrite it"));
    }
  }
  ASSIGN_OR_RETURN(auto creds, MakeServerAuthChannelCredentials(options.ca_cert));
  ASSIGN_OR_RETURN(std::string ca_pem, ReadFileToString(options.ca_cert));
  auto stub = v1::Enrollment::NewStub(Channel(options.coordinator, creds, options.tls_server_name));
  if (options.token.empty()) return EnrollByApproval(options, files, ca_pem, stub.get());
  ASSIGN_OR_RETURN(KeyAndCsr kc, GenerateKeyAndCsr(options.name));
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
