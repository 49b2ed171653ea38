#pragma once
// The coordinator process: state store + round manager + gRPC server over mutual TLS.
//
//   ASSIGN_OR_RETURN(auto server, CoordinatorServer::Start(config));
//   ... server->port() ...
//   server->Shutdown();  // graceful: round manager -> gRPC Shutdown(deadline) -> Wait -> flush
//
// Start() opens (or resumes) the store in config.data_dir, computes the base model
// hash when config.base_model_dir is set, and listens on config.listen_address
// (port 0 = any free port; port() reports the one chosen). Shutdown() is idempotent
// and safe to call from any thread except gRPC and round-manager callbacks.
// With config.metrics_address set, /metrics and /healthz are served over plain HTTP
// (coordinator/http_server.h); metrics_port() reports the port chosen (0 = off).
// Shutdown() turns /healthz to 503 and stops the HTTP server before the gRPC server.
// Every gRPC port is TLS 1.3 only. The main port also serves Certificates.Renew and
// SecurityAdmin (coordinator/identity_service.h); with config.enroll_address set,
// Enrollment.Enroll is served there (server-auth TLS, no client certificate) and
// enroll_port() reports it. A revoked agent's certificate fails the TLS handshake
// on the main port (a new connection never reaches a service), and every call on a
// connection opened before the revocation is refused (AuthorizePeer).

#include <grpcpp/grpcpp.h>

#include <memory>
#include <mutex>
#include <ostream>
#include <string>

#include "absl/status/statusor.h"
#include "coordinator/clock.h"
#include "coordinator/config.h"
#include "coordinator/http_server.h"
#include "coordinator/identity.h"
#include "coordinator/identity_service.h"
#include "coordinator/round_manager.h"
#include "coordinator/service.h"
#include "coordinator/state_store.h"

namespace fedlora::coordinator {

struct ServerOptions {
  const Clock* clock = nullptr;       // nullptr = system clock
  std::ostream* out = nullptr;        // round lines and summary; nullptr = std::cout
  std::function<void()> on_finished;  // `rounds` rounds done (runs on the manager thread)
};

class CoordinatorServer {
 public:
  static absl::StatusOr<std::unique_ptr<CoordinatorServer>> Start(const CoordinatorConfig& config,
                                                                  ServerOptions options = {});
  ~CoordinatorServer();  // Shutdown()

  int port() const { return port_; }
  int metrics_port() const { return http_ ? http_->port() : 0; }
  int enroll_port() const { return enroll_port_; }
  IdentityRegistry* identity() { return identity_.get(); }
  const std::string& base_model_hash() const { return base_model_hash_; }
  RoundManager* manager() { return manager_.get(); }
  StateStore* store() { return store_.get(); }  // for tests and tools
  const UploadLimiter& upload_limiter() const { return coordinator_service_->upload_limiter(); }
  void Shutdown();

 private:
  CoordinatorServer() = default;

  CoordinatorConfig config_;
  std::string base_model_hash_;
  std::unique_ptr<StateStore> store_;
  std::unique_ptr<RoundManager> manager_;
  std::unique_ptr<CoordinatorService> coordinator_service_;
  std::unique_ptr<AdminService> admin_service_;
  std::unique_ptr<IdentityRegistry> identity_;
  std::unique_ptr<CertificatesService> certificates_service_;
  std::unique_ptr<SecurityAdminService> security_admin_service_;
  std::unique_ptr<EnrollmentService> enrollment_service_;
  std::unique_ptr<grpc::Server> enroll_server_;
  int enroll_port_ = 0;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<HttpServer> http_;
  int port_ = 0;
  std::mutex shutdown_mu_;
  bool shut_down_ = false;
};

}  // namespace fedlora::coordinator
