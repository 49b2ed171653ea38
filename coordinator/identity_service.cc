#include "coordinator/identity_service.h"

#include "absl/strings/str_cat.h"
#include "coordinator/logging.h"
#include "coordinator/service.h"

namespace fedlora::coordinator {
namespace {

namespace v1 = ::fedlora::v1;

constexpr size_t kMaxCsrBytes = 16384;

void FillCertificate(const IssuedCertificate& cert, v1::CertificateResponse* response) {
  response->set_agent_id(cert.agent_id);
  response->set_certificate_pem(cert.certificate_pem);
  response->set_ca_pem(cert.ca_pem);
  response->set_not_after_unix(static_cast<uint64_t>(cert.not_after_unix));
}

void FillRequestState(const EnrollmentRequestInfo& info, bool with_certificate,
                      v1::EnrollmentRequestState* out) {
  out->set_request_id(info.id);
  if (info.state == "pending") {
    out->set_state(v1::EnrollmentRequestState::PENDING);
  } else if (info.state == "approved") {
    out->set_state(v1::EnrollmentRequestState::APPROVED);
  } else if (info.state == "denied") {
    out->set_state(v1::EnrollmentRequestState::DENIED);
  } else if (info.state == "expired") {
    out->set_state(v1::EnrollmentRequestState::EXPIRED);
  }
  out->set_agent_id(info.agent_id);
  out->set_key_fingerprint(info.key_fingerprint);
  out->set_requested_unix_ms(info.requested_unix_ms);
  out->set_expires_unix_ms(info.expires_unix_ms);
  out->set_peer(info.peer);
  out->set_decided_by(info.decided_by);
  out->set_reason(info.reason);
  if (with_certificate && info.state == "approved") {
    v1::CertificateResponse* cert = out->mutable_certificate();
    cert->set_agent_id(info.agent_id);
    cert->set_certificate_pem(info.certificate_pem);
    cert->set_ca_pem(info.ca_pem);
    cert->set_not_after_unix(static_cast<uint64_t>(info.not_after_unix));
  }
}

}  // namespace

grpc::ServerUnaryReactor* EnrollmentService::RequestEnrollment(
    grpc::CallbackServerContext* context, const v1::RequestEnrollmentRequest* request,
    v1::EnrollmentRequestState* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (request->csr_pem().size() > kMaxCsrBytes) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 absl::StrCat("RequestEnrollment: csr_pem holds ",
                                              request->csr_pem().size(), " bytes; at most ",
                                              kMaxCsrBytes)));
    return reactor;
  }
  IdentityRegistry* identity = identity_;
  identity_->Post([identity, reactor, request, response, peer = context->peer()]() {
    auto info = identity->RequestEnrollment(request->csr_pem(), peer);
    if (!info.ok()) {
      Log(LogLevel::kWarn, "enrollment request refused",
          {{"peer", peer}, {"error", info.status().ToString()}});
      reactor->Finish(ToGrpcStatus(info.status()));
      return;
    }
    Log(LogLevel::kInfo, "enrollment request waits for an admin",
        {{"agent", info->agent_id},
         {"request_id", info->id},
         {"key_fingerprint", info->key_fingerprint},
         {"peer", peer}});
    FillRequestState(*info, /*with_certificate=*/false, response);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerUnaryReactor* EnrollmentService::GetEnrollmentRequest(
    grpc::CallbackServerContext* context, const v1::GetEnrollmentRequestRequest* request,
    v1::EnrollmentRequestState* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  IdentityRegistry* identity = identity_;
  identity_->Post([identity, reactor, request, response]() {
    auto info = identity->GetEnrollmentRequest(request->request_id());
    if (!info.ok()) {
      reactor->Finish(ToGrpcStatus(info.status()));
      return;
    }
    FillRequestState(*info, /*with_certificate=*/true, response);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerUnaryReactor* EnrollmentService::Enroll(grpc::CallbackServerContext* context,
                                                    const v1::EnrollRequest* request,
                                                    v1::CertificateResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (request->csr_pem().size() > kMaxCsrBytes) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 absl::StrCat("Enroll: csr_pem holds ", request->csr_pem().size(),
                                              " bytes; at most ", kMaxCsrBytes)));
    return reactor;
  }
  IdentityRegistry* identity = identity_;
  identity_->Post([identity, reactor, request, response, peer = context->peer()]() {
    auto cert = identity->Enroll(request->token(), request->csr_pem());
    if (!cert.ok()) {
      Log(LogLevel::kWarn, "enrollment refused", {{"peer", peer}, {"error", cert.status().ToString()}});
      reactor->Finish(ToGrpcStatus(cert.status()));
      return;
    }
    Log(LogLevel::kInfo, "agent enrolled",
        {{"agent", cert->agent_id}, {"fingerprint", cert->fingerprint}, {"peer", peer}});
    FillCertificate(*cert, response);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerUnaryReactor* CertificatesService::Renew(grpc::CallbackServerContext* context,
                                                     const v1::RenewRequest* request,
                                                     v1::CertificateResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  auto id = AuthorizePeer(context, {"agent"}, "Certificates.Renew", identity_);
  if (!id.ok()) {
    reactor->Finish(ToGrpcStatus(id.status()));
    return reactor;
  }
  if (request->csr_pem().size() > kMaxCsrBytes) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "Renew: csr_pem too large"));
    return reactor;
  }
  IdentityRegistry* identity = identity_;
  identity_->Post([identity, reactor, request, response, cn = id->common_name]() {
    auto cert = identity->Renew(cn, request->csr_pem());
    if (!cert.ok()) {
      reactor->Finish(ToGrpcStatus(cert.status()));
      return;
    }
    Log(LogLevel::kInfo, "certificate renewed",
        {{"agent", cn}, {"fingerprint", cert->fingerprint}});
    FillCertificate(*cert, response);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerUnaryReactor* SecurityAdminService::CreateEnrollmentToken(
    grpc::CallbackServerContext* context, const v1::CreateEnrollmentTokenRequest* request,
    v1::CreateEnrollmentTokenResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  auto id = AuthorizePeer(context, {"admin"}, "SecurityAdmin.CreateEnrollmentToken", identity_);
  if (!id.ok()) {
    reactor->Finish(ToGrpcStatus(id.status()));
    return reactor;
  }
  IdentityRegistry* identity = identity_;
  identity_->Post([identity, reactor, request, response, actor = id->common_name]() {
    auto token = identity->CreateToken(request->name(), request->ttl_seconds(), actor);
    if (!token.ok()) {
      reactor->Finish(ToGrpcStatus(token.status()));
      return;
    }
    response->set_token(token->token);
    response->set_expires_unix_ms(token->expires_unix_ms);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerUnaryReactor* SecurityAdminService::RevokeAgent(
    grpc::CallbackServerContext* context, const v1::RevokeAgentRequest* request,
    v1::RevokeAgentResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  auto id = AuthorizePeer(context, {"admin"}, "SecurityAdmin.RevokeAgent", identity_);
  if (!id.ok()) {
    reactor->Finish(ToGrpcStatus(id.status()));
    return reactor;
  }
  IdentityRegistry* identity = identity_;
  RoundManager* manager = manager_;
  identity_->Post([identity, manager, reactor, request, response, actor = id->common_name]() {
    auto stored = identity->Revoke(request->agent_id(), request->reason(), actor);
    if (!stored.ok()) {
      reactor->Finish(ToGrpcStatus(stored.status()));
      return;
    }
    response->set_already_revoked(!*stored);
    // Also for an already revoked agent: a session opened before the first
    // revocation finished is cut now.
    manager->OnAgentRevoked(request->agent_id(),
                            [reactor, response](bool session_closed, bool update_discarded) {
                              response->set_session_closed(session_closed);
                              response->set_update_discarded(update_discarded);
                              reactor->Finish(grpc::Status::OK);
                            });
  });
  return reactor;
}

grpc::ServerUnaryReactor* SecurityAdminService::ListEnrollmentRequests(
    grpc::CallbackServerContext* context, const v1::ListEnrollmentRequestsRequest* /*request*/,
    v1::ListEnrollmentRequestsResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  auto id = AuthorizePeer(context, {"admin"}, "SecurityAdmin.ListEnrollmentRequests", identity_);
  if (!id.ok()) {
    reactor->Finish(ToGrpcStatus(id.status()));
    return reactor;
  }
  IdentityRegistry* identity = identity_;
  identity_->Post([identity, reactor, response]() {
    auto pending = identity->ListPendingRequests();
    if (!pending.ok()) {
      reactor->Finish(ToGrpcStatus(pending.status()));
      return;
    }
    for (const EnrollmentRequestInfo& info : *pending) {
      FillRequestState(info, /*with_certificate=*/false, response->add_requests());
    }
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerUnaryReactor* SecurityAdminService::DecideEnrollmentRequest(
    grpc::CallbackServerContext* context, const v1::DecideEnrollmentRequestRequest* request,
    v1::EnrollmentRequestState* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  auto id = AuthorizePeer(context, {"admin"}, "SecurityAdmin.DecideEnrollmentRequest", identity_);
  if (!id.ok()) {
    reactor->Finish(ToGrpcStatus(id.status()));
    return reactor;
  }
  IdentityRegistry* identity = identity_;
  identity_->Post([identity, reactor, request, response, actor = id->common_name]() {
    auto info = identity->DecideEnrollmentRequest(request->request_id(), request->approve(),
                                                  request->reason(), actor);
    if (!info.ok()) {
      reactor->Finish(ToGrpcStatus(info.status()));
      return;
    }
    Log(LogLevel::kInfo, request->approve() ? "enrollment approved" : "enrollment denied",
        {{"agent", info->agent_id}, {"request_id", info->id}, {"by", actor}});
    FillRequestState(*info, /*with_certificate=*/false, response);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

}  // namespace fedlora::coordinator
