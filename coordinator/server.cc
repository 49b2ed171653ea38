#include "coordinator/server.h"

#include <grpcpp/resource_quota.h>

#include <chrono>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"
#include "common/net/tls.h"
#include "common/status/status.h"
#include "coordinator/logging.h"

namespace fedlora::coordinator {

absl::StatusOr<std::unique_ptr<CoordinatorServer>> CoordinatorServer::Start(
    const CoordinatorConfig& config, ServerOptions options) {
  RETURN_IF_ERROR(config.Validate());
  std::unique_ptr<CoordinatorServer> server(new CoordinatorServer());
  server->config_ = config;
  if (!config.base_model_dir.empty()) {
    ASSIGN_OR_RETURN(server->base_model_hash_, common::HashModelDirectory(config.base_model_dir));
  } else {
    server->base_model_hash_ = config.base_model_hash;
  }
  ASSIGN_OR_RETURN(StateStoreOptions store_options, StateStoreOptionsFromConfig(config));
  ASSIGN_OR_RETURN(server->store_, StateStore::Open(config.data_dir, std::move(store_options)));
  const Clock* clock = options.clock != nullptr ? options.clock : SystemClock::Get();
  std::ostream* out = options.out != nullptr ? options.out : &std::cout;
  server->manager_ = std::make_unique<RoundManager>(config, server->store_.get(), clock,
                                                    server->base_model_hash_, out);
  if (options.on_finished) server->manager_->SetFinishedCallback(options.on_finished);

  IdentityOptions identity_options;
  if (!config.ca_key.empty()) {
    ASSIGN_OR_RETURN(identity_options.ca, common::LoadCa(config.tls_ca, config.ca_key));
  }
  identity_options.cert_validity_days = static_cast<int>(config.cert_validity_days);
  ASSIGN_OR_RETURN(identity_options.approval,
                   ParseEnrollmentApproval(config.enrollment_approval));
  server->identity_ = std::make_unique<IdentityRegistry>(server->store_.get(), clock,
                                                         std::move(identity_options));
  RETURN_IF_ERROR(server->identity_->Load());
  // Revoked certificates fail the TLS handshake itself (the per-call check in
  // AuthorizePeer stays for connections opened before the revocation).
  const IdentityRegistry* identity = server->identity_.get();
  ASSIGN_OR_RETURN(
      auto creds,
      common::MakeServerCredentials(
          {config.tls_ca, config.tls_cert, config.tls_key},
          [identity](const std::string& common_name, const std::string&) -> absl::Status {
            if (!identity->IsRevoked(common_name)) return absl::OkStatus();
            Log(LogLevel::kWarn, "TLS handshake refused: certificate revoked",
                {{"agent", common_name}});
            return absl::UnauthenticatedError(
                absl::StrCat("certificate revoked: '", common_name, "' was revoked by an admin"));
          }));
  RETURN_IF_ERROR(server->manager_->Start());

  server->coordinator_service_ = std::make_unique<CoordinatorService>(
      server->manager_.get(), config.max_update_bytes, server->identity_.get(),
      config.max_concurrent_uploads);
  server->admin_service_ =
      std::make_unique<AdminService>(server->manager_.get(), server->identity_.get());
  server->certificates_service_ = std::make_unique<CertificatesService>(server->identity_.get());
  server->security_admin_service_ =
      std::make_unique<SecurityAdminService>(server->identity_.get(), server->manager_.get());
  grpc::ServerBuilder builder;
  builder.AddListeningPort(config.listen_address, creds, &server->port_);
  builder.RegisterService(server->coordinator_service_.get());
  builder.RegisterService(server->admin_service_.get());
  builder.RegisterService(server->certificates_service_.get());
  builder.RegisterService(server->security_admin_service_.get());
  // One chunk (1 MiB of data) plus the header and framing.
  builder.SetMaxReceiveMessageSize(static_cast<int>(kMaxChunkBytes + (64 << 10)));
  // Without BDP probing a stream's receive window stays at 64 KiB: an upload waiting
  // for a slot (max_concurrent_uploads) then holds at most that here.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, config.grpc_bdp_probe ? 1 : 0);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 5000);
  // Without a quota gRPC's socket read buffers reached 180 MB at 300 agents uploading
  // 4 MB each (heaptrack of bench coordinator); under a 64 MiB quota, 10 MB.
  if (config.grpc_memory_quota_mb > 0) {
    grpc::ResourceQuota quota("fedlora-coordinator");
    quota.Resize(static_cast<size_t>(config.grpc_memory_quota_mb) << 20);
    builder.SetResourceQuota(quota);
  }
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    server->manager_->Stop();
    server->manager_->Join();
    return absl::UnavailableError(
        absl::StrCat("cannot listen on '", config.listen_address,
                     "' (address in use, bad address, or TLS files rejected by gRPC)"));
  }
  if (!config.enroll_address.empty()) {
    ASSIGN_OR_RETURN(auto enroll_creds,
                     common::MakeServerAuthOnlyCredentials(config.tls_cert, config.tls_key));
    server->enrollment_service_ = std::make_unique<EnrollmentService>(server->identity_.get());
    grpc::ServerBuilder enroll_builder;
    enroll_builder.AddListeningPort(config.enroll_address, enroll_creds, &server->enroll_port_);
    enroll_builder.RegisterService(server->enrollment_service_.get());
    enroll_builder.SetMaxReceiveMessageSize(64 << 10);
    server->enroll_server_ = enroll_builder.BuildAndStart();
    if (server->enroll_server_ == nullptr || server->enroll_port_ == 0) {
      return absl::UnavailableError(absl::StrCat("cannot listen on enroll_address '",
                                                 config.enroll_address, "'"));
    }
  }
  if (!config.metrics_address.empty()) {
    RoundManager* manager = server->manager_.get();
    auto http = HttpServer::Start(config.metrics_address,
                                  [manager]() { return manager->metrics().Render(); });
    if (!http.ok()) return http.status();  // ~CoordinatorServer shuts the rest down
    server->http_ = std::move(*http);
  }
  Log(LogLevel::kInfo, "coordinator listening",
      {{"address", config.listen_address},
       {"port", std::to_string(server->port_)},
       {"base_model_hash", server->base_model_hash_},
       {"data_dir", config.data_dir}});
  return server;
}

CoordinatorServer::~CoordinatorServer() { Shutdown(); }

void CoordinatorServer::Shutdown() {
  std::lock_guard<std::mutex> lock(shutdown_mu_);
  if (shut_down_) return;
  shut_down_ = true;
  Log(LogLevel::kInfo, "shutting down");
  if (http_) http_->Stop();  // no more HTTP (health goes away first), then gRPC
  if (manager_) manager_->Stop();
  if (enroll_server_) {
    enroll_server_->Shutdown(std::chrono::system_clock::now() +
                             std::chrono::milliseconds(config_.shutdown_grace_ms));
    enroll_server_->Wait();
  }
  if (server_) {
    server_->Shutdown(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(config_.shutdown_grace_ms));
    server_->Wait();
  }
  if (manager_) manager_->Join();
  if (store_) {
    absl::Status s = store_->Flush();
    if (!s.ok()) Log(LogLevel::kWarn, "store flush failed", {{"error", s.ToString()}});
  }
  Log(LogLevel::kInfo, "shut down");
}

}  // namespace fedlora::coordinator
