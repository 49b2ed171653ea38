#include "coordinator/admin/security_cli.h"

#include <grpcpp/grpcpp.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <ctime>

#include "absl/strings/str_cat.h"
#include "common/net/tls.h"
#include "fedlora/v1/fedlora.grpc.pb.h"

namespace fedlora::coordinator {
namespace {

namespace v1 = ::fedlora::v1;

std::string Utc(uint64_t unix_ms) {
  std::time_t secs = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

}  // namespace

std::optional<uint64_t> ParseDurationSeconds(const std::string& text, std::string* error) {
  auto fail = [&]() -> std::optional<uint64_t> {
    *error = absl::StrCat("expected a duration like 90s, 30m, 24h or 7d, found '", text, "'");
    return std::nullopt;
  };
  if (text.size() < 2) return fail();
  uint64_t unit = 0;
  switch (text.back()) {
    case 's': unit = 1; break;
    case 'm': unit = 60; break;
    case 'h': unit = 3600; break;
    case 'd': unit = 86400; break;
    default: return fail();
  }
  uint64_t n = 0;
  for (size_t i = 0; i + 1 < text.size(); ++i) {
    if (text[i] < '0' || text[i] > '9' || n > 1000000) return fail();
    n = n * 10 + static_cast<uint64_t>(text[i] - '0');
  }
  if (n == 0) return fail();
  return n * unit;
}

SecurityCommands::SecurityCommands(CLI::App& app) {
  CLI::App* enroll = app.add_subcommand("enroll", "Enrollment of new agents: tokens, and requests waiting for approval");
  enroll->require_subcommand(1);
  enroll_create_ = enroll->add_subcommand(
      "create",
      "Issue a one-time enrollment token for agent NAME (SecurityAdmin.CreateEnrollmentToken); "
      "needs --coordinator --ca --cert --key of an admin");
  enroll_create_->add_option("--name", name_, "Agent id (its certificate CN)")->required();
  enroll_create_->add_option("--expires", expires_, "Token lifetime: N s|m|h|d")
      ->capture_default_str();
  enroll_pending_ = enroll->add_subcommand(
      "pending",
      "List enrollment requests waiting for an admin (enrollment_approval: admin): id, name, "
      "key fingerprint, time, requester");
  enroll_approve_ = enroll->add_subcommand(
      "approve",
      "Approve enrollment request ID: sign its CSR (role agent); compare the key fingerprint "
      "with the one the agent printed first");
  enroll_approve_->add_option("ID", request_id_, "Request id (enroll pending)")->required();
  enroll_approve_->add_option("--reason", reason_, "Recorded in the audit log");
  enroll_deny_ = enroll->add_subcommand("deny", "Deny enrollment request ID");
  enroll_deny_->add_option("ID", request_id_, "Request id (enroll pending)")->required();
  enroll_deny_->add_option("--reason", reason_, "Recorded in the audit log and shown to the agent");
  CLI::App* agents = app.add_subcommand("agents", "Agent identities");
  agents->require_subcommand(1);
  agents_revoke_ = agents->add_subcommand(
      "revoke",
      "Revoke agent ID now: cut its session, discard its pending update, refuse its "
      "certificates (SecurityAdmin.RevokeAgent)");
  agents_revoke_->add_option("ID", agent_id_, "Agent id (certificate CN)")->required();
  agents_revoke_->add_option("--reason", reason_, "Recorded in the audit log");
}

std::optional<int> SecurityCommands::Run(const AdminConnection& c, std::ostream& out,
                                         std::ostream& err) const {
  const bool create = enroll_create_->parsed();
  const bool revoke = agents_revoke_->parsed();
  const bool pending = enroll_pending_->parsed();
  const bool approve = enroll_approve_->parsed();
  const bool deny = enroll_deny_->parsed();
  if (!create && !revoke && !pending && !approve && !deny) return std::nullopt;
  const char* cmd = create    ? "fedlora-admin enroll create"
                    : revoke  ? "fedlora-admin agents revoke"
                    : pending ? "fedlora-admin enroll pending"
                    : approve ? "fedlora-admin enroll approve"
                              : "fedlora-admin enroll deny";
  uint64_t ttl_s = 0;
  if (create) {
    std::string error;
    auto ttl = ParseDurationSeconds(expires_, &error);
    if (!ttl.has_value()) {
      err << cmd << ": --expires: " << error << "\n";
      return 2;
    }
    ttl_s = *ttl;
  }
  if (c.coordinator.empty() || c.ca.empty() || c.cert.empty() || c.key.empty()) {
    err << cmd << ": needs --coordinator, --ca, --cert and --key\n";
    return 2;
  }
  auto creds = common::MakeChannelCredentials({c.ca, c.cert, c.key});
  if (!creds.ok()) {
    err << cmd << ": " << creds.status().ToString() << "\n";
    return 1;
  }
  auto stub = v1::SecurityAdmin::NewStub(grpc::CreateChannel(c.coordinator, *creds));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(c.timeout_s * 1000)));
  grpc::Status rpc;
  if (create) {
    v1::CreateEnrollmentTokenRequest request;
    request.set_name(name_);
    request.set_ttl_seconds(ttl_s);
    v1::CreateEnrollmentTokenResponse response;
    rpc = stub->CreateEnrollmentToken(&context, request, &response);
    if (rpc.ok()) {
      out << "enrollment token for '" << name_ << "' (single use, expires "
          << Utc(response.expires_unix_ms()) << "; shown only now):\n"
          << response.token() << "\n";
      return 0;
    }
  } else if (pending) {
    v1::ListEnrollmentRequestsResponse response;
    rpc = stub->ListEnrollmentRequests(&context, v1::ListEnrollmentRequestsRequest(), &response);
    if (rpc.ok()) {
      if (response.requests().empty()) {
        out << "no enrollment requests pending\n";
        return 0;
      }
      out << "ID                                NAME  KEY_FINGERPRINT  REQUESTED  EXPIRES  FROM\n";
      for (const v1::EnrollmentRequestState& r : response.requests()) {
        out << r.request_id() << "  " << r.agent_id() << "  " << r.key_fingerprint() << "  "
            << Utc(r.requested_unix_ms()) << "  " << Utc(r.expires_unix_ms()) << "  " << r.peer()
            << "\n";
      }
      return 0;
    }
  } else if (approve || deny) {
    v1::DecideEnrollmentRequestRequest request;
    request.set_request_id(request_id_);
    request.set_approve(approve);
    request.set_reason(reason_);
    v1::EnrollmentRequestState response;
    rpc = stub->DecideEnrollmentRequest(&context, request, &response);
    if (rpc.ok()) {
      out << "enrollment request " << response.request_id() << " for '" << response.agent_id()
          << "' (key " << response.key_fingerprint() << ") "
          << (approve ? "approved: the agent picks up its certificate at its next poll"
                      : "denied")
          << "\n";
      return 0;
    }
  } else {
    v1::RevokeAgentRequest request;
    request.set_agent_id(agent_id_);
    request.set_reason(reason_);
    v1::RevokeAgentResponse response;
    rpc = stub->RevokeAgent(&context, request, &response);
    if (rpc.ok()) {
      out << "agent '" << agent_id_ << "' "
          << (response.already_revoked() ? "was already revoked" : "revoked")
          << "; session " << (response.session_closed() ? "cut" : "not open")
          << "; pending update " << (response.update_discarded() ? "discarded" : "none")
          << "\n";
      return 0;
    }
  }
  err << cmd << ": on " << c.coordinator << " failed: code " << static_cast<int>(rpc.error_code())
      << ": " << rpc.error_message() << "\n";
  return 1;
}

}  // namespace fedlora::coordinator
