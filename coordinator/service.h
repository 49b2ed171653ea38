#pragma once
// gRPC services of the coordinator (callback API; docs/protocol.md).
//
// CoordinatorService (role "agent" only, else PERMISSION_DENIED; no verified client
// certificate: UNAUTHENTICATED):
//   Session      ServerBidiReactor. The first message must be Hello; the RoundManager
//                answers Welcome or ends the stream with the protocol's status. Each
//                session has its own outbound queue with one write in flight.
//   SubmitUpdate ServerReadReactor. Takes a slot of the coordinator-wide UploadLimiter
//                (max_concurrent_uploads) before reading anything: without a slot no
//                read is issued and flow control keeps the bytes in the client; a call
//                cancelled or past its deadline while waiting is finished CANCELLED
//                (and counted as a refusal). The slot is held until the reactor is
//                done. Checks every chunk (header on the first chunk only,
//                contiguous offsets, <= 1 MiB of data, chunk_sha256, size limits); the
//                header is checked with the RoundManager before more data is read; the
//                whole payload is then verified, opened and validated off the gRPC
//                threads. Every refusal is counted (Admin.Status updates_rejected).
//   FetchAdapter ServerWriteReactor. Streams a version blob from `offset` in chunks of
//                chunk_size (0 or > 1 MiB: 1 MiB), each with its SHA-256.
// AdminService: Status and ListVersions for roles "admin" and "viewer"; version moves
// and backups for "admin" only.
//
// Reactors never block: store and crypto work goes to the RoundManager (its thread
// and worker pool). No exception escapes a reactor. Thread-safe.

#include <grpcpp/grpcpp.h>

#include <memory>
#include <mutex>
#include <set>
#include <string>

#include "common/net/tls.h"
#include "coordinator/identity.h"
#include "coordinator/round_manager.h"
#include "coordinator/upload_limiter.h"
#include "fedlora/v1/fedlora.grpc.pb.h"

namespace fedlora::coordinator {

inline constexpr size_t kMaxChunkBytes = 1 << 20;

grpc::Status ToGrpcStatus(const absl::Status& status);

// The caller's verified certificate identity if its role is one of `roles` and
// (with `identity`) it is not revoked: else UNAUTHENTICATED (no verified client
// certificate, or "certificate revoked") or PERMISSION_DENIED (role). Every RPC of
// the main port starts with it.
absl::StatusOr<common::PeerIdentity> AuthorizePeer(const grpc::CallbackServerContext* context,
                                                   std::initializer_list<const char*> roles,
                                                   const char* method,
                                                   const IdentityRegistry* identity);

class CoordinatorService final : public fedlora::v1::Coordinator::CallbackService {
 public:
  // `manager` (and `identity`, if any: revoked agents are refused) must outlive
  // the service and the server. `max_concurrent_uploads` (>= 1) bounds the
  // SubmitUpdate calls holding payload bytes at once (coordinator/upload_limiter.h;
  // its gauges go to manager->metrics()).
  CoordinatorService(RoundManager* manager, uint64_t max_update_bytes,
                     const IdentityRegistry* identity = nullptr,
                     size_t max_concurrent_uploads = 8);

  grpc::ServerBidiReactor<fedlora::v1::AgentMessage, fedlora::v1::CoordinatorMessage>* Session(
      grpc::CallbackServerContext* context) override;
  grpc::ServerReadReactor<fedlora::v1::UpdateChunk>* SubmitUpdate(
      grpc::CallbackServerContext* context, fedlora::v1::SubmitUpdateResponse* response) override;
  grpc::ServerWriteReactor<fedlora::v1::AdapterChunk>* FetchAdapter(
      grpc::CallbackServerContext* context,
      const fedlora::v1::FetchAdapterRequest* request) override;

 private:
  RoundManager* const manager_;
  const uint64_t max_update_bytes_;
  const IdentityRegistry* const identity_;
  UploadLimiter uploads_;

 public:
  const UploadLimiter& upload_limiter() const { return uploads_; }  // for tests
};

class AdminService final : public fedlora::v1::Admin::CallbackService {
 public:
  explicit AdminService(RoundManager* manager, const IdentityRegistry* identity = nullptr)
      : manager_(manager), identity_(identity) {}

  grpc::ServerUnaryReactor* Status(grpc::CallbackServerContext* context,
                                   const fedlora::v1::StatusRequest* request,
                                   fedlora::v1::StatusResponse* response) override;

  // Versions and backup (docs/operations.md): ListVersions for "admin" and
  // "viewer"; RollbackVersion, PromoteVersion and CreateBackup for "admin" only,
  // audited with the client certificate's CN as the actor.
  grpc::ServerUnaryReactor* ListVersions(grpc::CallbackServerContext* context,
                                         const fedlora::v1::ListVersionsRequest* request,
                                         fedlora::v1::ListVersionsResponse* response) override;
  grpc::ServerUnaryReactor* RollbackVersion(grpc::CallbackServerContext* context,
                                            const fedlora::v1::RollbackVersionRequest* request,
                                            fedlora::v1::VersionChangeResponse* response) override;
  grpc::ServerUnaryReactor* PromoteVersion(grpc::CallbackServerContext* context,
                                           const fedlora::v1::PromoteVersionRequest* request,
                                           fedlora::v1::VersionChangeResponse* response) override;
  grpc::ServerUnaryReactor* CreateBackup(grpc::CallbackServerContext* context,
                                         const fedlora::v1::CreateBackupRequest* request,
                                         fedlora::v1::CreateBackupResponse* response) override;

 private:
  RoundManager* const manager_;
  const IdentityRegistry* const identity_;
};

}  // namespace fedlora::coordinator
