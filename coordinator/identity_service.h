#pragma once
// gRPC services for agent identities (docs/security.md), callback API. Each hands
// its store and signing work to the IdentityRegistry's worker thread; reactors
// never block.
//
//   EnrollmentService  Enrollment.*, on the enrollment port only (no client
//                      certificate): token + CSR -> certificate (role agent); in
//                      admin-approval mode also RequestEnrollment (CSR -> pending
//                      request) and GetEnrollmentRequest (poll by request id).
//   CertificatesService Certificates.Renew, main port, role agent, not revoked: a
//                      new certificate for the caller's own CN.
//   SecurityAdminService SecurityAdmin.CreateEnrollmentToken / RevokeAgent /
//                      ListEnrollmentRequests / DecideEnrollmentRequest, main
//                      port, role admin only (viewers are refused). RevokeAgent
//                      stores the revocation, then cuts the agent's session and
//                      discards its pending update (RoundManager::OnAgentRevoked).
// Thread-safe. The registry and manager must outlive the services and server.

#include <grpcpp/grpcpp.h>

#include "coordinator/identity.h"
#include "coordinator/round_manager.h"
#include "fedlora/v1/fedlora.grpc.pb.h"

namespace fedlora::coordinator {

class EnrollmentService final : public fedlora::v1::Enrollment::CallbackService {
 public:
  explicit EnrollmentService(IdentityRegistry* identity) : identity_(identity) {}
  grpc::ServerUnaryReactor* Enroll(grpc::CallbackServerContext* context,
                                   const fedlora::v1::EnrollRequest* request,
                                   fedlora::v1::CertificateResponse* response) override;
  grpc::ServerUnaryReactor* RequestEnrollment(
      grpc::CallbackServerContext* context, const fedlora::v1::RequestEnrollmentRequest* request,
      fedlora::v1::EnrollmentRequestState* response) override;
  grpc::ServerUnaryReactor* GetEnrollmentRequest(
      grpc::CallbackServerContext* context,
      const fedlora::v1::GetEnrollmentRequestRequest* request,
      fedlora::v1::EnrollmentRequestState* response) override;

 private:
  IdentityRegistry* const identity_;
};

class CertificatesService final : public fedlora::v1::Certificates::CallbackService {
 public:
  explicit CertificatesService(IdentityRegistry* identity) : identity_(identity) {}
  grpc::ServerUnaryReactor* Renew(grpc::CallbackServerContext* context,
                                  const fedlora::v1::RenewRequest* request,
                                  fedlora::v1::CertificateResponse* response) override;

 private:
  IdentityRegistry* const identity_;
};

class SecurityAdminService final : public fedlora::v1::SecurityAdmin::CallbackService {
 public:
  SecurityAdminService(IdentityRegistry* identity, RoundManager* manager)
      : identity_(identity), manager_(manager) {}
  grpc::ServerUnaryReactor* CreateEnrollmentToken(
      grpc::CallbackServerContext* context,
      const fedlora::v1::CreateEnrollmentTokenRequest* request,
      fedlora::v1::CreateEnrollmentTokenResponse* response) override;
  grpc::ServerUnaryReactor* RevokeAgent(grpc::CallbackServerContext* context,
                                        const fedlora::v1::RevokeAgentRequest* request,
                                        fedlora::v1::RevokeAgentResponse* response) override;
  grpc::ServerUnaryReactor* ListEnrollmentRequests(
      grpc::CallbackServerContext* context,
      const fedlora::v1::ListEnrollmentRequestsRequest* request,
      fedlora::v1::ListEnrollmentRequestsResponse* response) override;
  grpc::ServerUnaryReactor* DecideEnrollmentRequest(
      grpc::CallbackServerContext* context,
      const fedlora::v1::DecideEnrollmentRequestRequest* request,
      fedlora::v1::EnrollmentRequestState* response) override;

 private:
  IdentityRegistry* const identity_;
  RoundManager* const manager_;
};

}  // namespace fedlora::coordinator
