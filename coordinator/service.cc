#include "coordinator/service.h"

#include <algorithm>
#include <atomic>
#include <deque>
#include <initializer_list>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/crypto/crypto.h"
#include "common/net/tls.h"
#include "coordinator/logging.h"

namespace fedlora::coordinator {
namespace {

namespace v1 = ::fedlora::v1;

constexpr size_t kMaxSessionQueue = 256;

absl::StatusOr<common::PeerIdentity> Authorize(const grpc::CallbackServerContext* context,
                                               std::initializer_list<const char*> roles,
                                               const char* method,
                                               const IdentityRegistry* identity) {
  return AuthorizePeer(context, roles, method, identity);
}

// ------------------------------------------------------------------ Session

class SessionReactor;

// The RoundManager's handle on a session. Detached when the reactor is done, so
// the manager may keep it without keeping the reactor alive.
class SessionLink final : public AgentLink {
 public:
  SessionLink(SessionReactor* reactor, std::string cn) : reactor_(reactor), cn_(std::move(cn)) {}
  const std::string& peer_cn() const override { return cn_; }
  void Send(const v1::CoordinatorMessage& message) override;
  void Close(const absl::Status& status) override;
  void Detach() {
    std::lock_guard<std::mutex> lock(mu_);
    reactor_ = nullptr;
  }

 private:
  std::mutex mu_;
  SessionReactor* reactor_;
  const std::string cn_;
};

class SessionReactor final
    : public grpc::ServerBidiReactor<v1::AgentMessage, v1::CoordinatorMessage> {
 public:
  SessionReactor(RoundManager* manager, grpc::CallbackServerContext* context,
                 const IdentityRegistry* identity)
      : manager_(manager) {
    auto id = Authorize(context, {"agent"}, "Coordinator.Session", identity);
    if (!id.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      RequestFinishLocked(ToGrpcStatus(id.status()));
      return;
    }
    link_ = std::make_shared<SessionLink>(this, id->common_name);
    StartRead(&in_);
  }

  void Enqueue(const v1::CoordinatorMessage& message) {
    std::lock_guard<std::mutex> lock(mu_);
    if (finish_requested_) return;
    if (queue_.size() >= kMaxSessionQueue) {
      RequestFinishLocked(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                       "the agent does not read its Session stream"));
      return;
    }
    queue_.push_back(message);
    if (!writing_) {
      writing_ = true;
      StartWrite(&queue_.front());
    }
  }

  void Close(const absl::Status& status) {
    std::lock_guard<std::mutex> lock(mu_);
    RequestFinishLocked(ToGrpcStatus(status));
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the agent closed its side, or the call is gone
      std::lock_guard<std::mutex> lock(mu_);
      RequestFinishLocked(grpc::Status::OK);
      return;
    }
    absl::Status s = Handle();
    std::lock_guard<std::mutex> lock(mu_);
    if (!s.ok()) {
      RequestFinishLocked(ToGrpcStatus(s));
      return;
    }
    if (!finish_requested_) StartRead(&in_);
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.pop_front();
    writing_ = false;
    if (!ok) {
      queue_.clear();
      if (!finish_requested_) {
        finish_requested_ = true;
        finish_status_ = grpc::Status(grpc::StatusCode::UNAVAILABLE, "session write failed");
      }
    }
    if (!queue_.empty() && !finish_called_) {
      writing_ = true;
      StartWrite(&queue_.front());
      return;
    }
    if (finish_requested_ && !finish_called_) {
      finish_called_ = true;
      Finish(finish_status_);
    }
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    RequestFinishLocked(grpc::Status::CANCELLED);
  }

  void OnDone() override {
    if (link_) {
      link_->Detach();
      manager_->OnDisconnect(link_);
    }
    delete this;
  }

 private:
  absl::Status Handle() {
    try {
      switch (in_.kind_case()) {
        case v1::AgentMessage::kHello:
          if (saw_hello_) return absl::InvalidArgumentError("Session: a second Hello");
          saw_hello_ = true;
          manager_->OnHello(link_, in_.hello());
          return absl::OkStatus();
        case v1::AgentMessage::kHeartbeat:
          if (!saw_hello_) break;
          manager_->OnHeartbeat(link_, in_.heartbeat());
          return absl::OkStatus();
        case v1::AgentMessage::kEvalReport:
          if (!saw_hello_) break;
          manager_->OnEvalReport(link_, in_.eval_report());
          return absl::OkStatus();
        case v1::AgentMessage::kSecaggReady:
          if (!saw_hello_) break;
          manager_->OnSecAggReady(link_, in_.secagg_ready());
          return absl::OkStatus();
        case v1::AgentMessage::kSecagg:
          if (!saw_hello_) break;
          manager_->OnSecAggMessage(link_, in_.secagg());
          return absl::OkStatus();
        case v1::AgentMessage::KIND_NOT_SET:
          return absl::InvalidArgumentError("Session: an AgentMessage with no kind set");
      }
      return absl::InvalidArgumentError("Session: expected Hello as the first message");
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("Session: ", e.what()));
    }
  }

  // Finishes now, or after the write in flight completes.
  void RequestFinishLocked(const grpc::Status& status) {
    if (finish_requested_) return;
    finish_requested_ = true;
    finish_status_ = status;
    if (!writing_ && !finish_called_) {
      finish_called_ = true;
      Finish(status);
    }
  }

  RoundManager* const manager_;
  std::shared_ptr<SessionLink> link_;
  v1::AgentMessage in_;
  bool saw_hello_ = false;  // reader side only

  std::mutex mu_;
  std::deque<v1::CoordinatorMessage> queue_;  // front() is in flight while writing_
  bool writing_ = false;
  bool finish_requested_ = false;
  bool finish_called_ = false;
  grpc::Status finish_status_;
};

void SessionLink::Send(const v1::CoordinatorMessage& message) {
  std::lock_guard<std::mutex> lock(mu_);
  if (reactor_ != nullptr) reactor_->Enqueue(message);
}

void SessionLink::Close(const absl::Status& status) {
  std::lock_guard<std::mutex> lock(mu_);
  if (reactor_ != nullptr) reactor_->Close(status);
}

// ------------------------------------------------------------------ SubmitUpdate

class UpdateReactor final : public grpc::ServerReadReactor<v1::UpdateChunk> {
 public:
  UpdateReactor(RoundManager* manager, uint64_t max_update_bytes, UploadLimiter* uploads,
                grpc::CallbackServerContext* context, v1::SubmitUpdateResponse* response,
                const IdentityRegistry* identity)
      : manager_(manager),
        max_update_bytes_(max_update_bytes),
        uploads_(uploads),
        context_(context),
        response_(response) {
    auto id = Authorize(context, {"agent"}, "Coordinator.SubmitUpdate", identity);
    if (!id.ok()) {
      Reject(id.status());
      return;
    }
    cn_ = id->common_name;
    // Nothing is read before a slot is granted (maybe at once, maybe later on the
    // thread that releases one).
    ticket_ = uploads_->Acquire([this]() {
      holds_slot_ = true;
      StartRead(&chunk_);
    });
  }

  void OnCancel() override {
    // Only a waiter is finished here: a holder's pending read fails and OnReadDone
    // finishes it; a cancelled waiter has no operation that would.
    if (ticket_ != 0 && uploads_->Cancel(ticket_)) {
      Reject(absl::CancelledError(
          "SubmitUpdate: cancelled or past its deadline while waiting for an upload slot "
          "(max_concurrent_uploads)"));
    }
  }

  void OnReadDone(bool ok) override {
    if (done_) return;
    if (!ok) {
      if (context_->IsCancelled()) {
        done_ = true;
        Finish(grpc::Status::CANCELLED);
        return;
      }
      if (!have_header_) {
        Reject(absl::InvalidArgumentError("SubmitUpdate: the stream carried no UpdateChunk"));
        return;
      }
      if (received_ != header_.total_size()) {
        Reject(absl::InvalidArgumentError(
            absl::StrCat("SubmitUpdate: the payload ended after ", received_,
                         " bytes; UpdateHeader.total_size is ", header_.total_size())));
        return;
      }
      IncomingUpdate update{cn_, header_, std::move(payload_)};
      manager_->SubmitUpdate(std::move(update), [this](absl::Status s) { Complete(s); });
      return;
    }
    const bool first = !have_header_;
    absl::Status s;
    try {
      s = HandleChunk();
    } catch (const std::exception& e) {
      s = absl::InternalError(absl::StrCat("SubmitUpdate: ", e.what()));
    }
    if (!s.ok()) {
      Reject(s);
      return;
    }
    if (first) {
      // Refuse early (closed round, duplicate, ...) before reading the payload.
      manager_->CheckUpdateHeader(cn_, header_, [this](absl::Status status) {
        if (!status.ok()) {
          Reject(status);
        } else {
          // One allocation for the whole payload (size checked against the round's
          // max_update_bytes by the manager), not a regrowth per chunk.
          payload_.reserve(header_.total_size());
          StartRead(&chunk_);
        }
      });
      return;
    }
    StartRead(&chunk_);
  }

  void OnDone() override {
    if (holds_slot_) uploads_->Release();
    delete this;
  }

 private:
  absl::Status HandleChunk() {
    if (!have_header_) {
      if (!chunk_.has_header()) {
        return absl::InvalidArgumentError(
            "SubmitUpdate: the first UpdateChunk must carry the UpdateHeader");
      }
      header_ = chunk_.header();
      have_header_ = true;
      if (header_.total_size() > max_update_bytes_) {
        return absl::ResourceExhaustedError(
            absl::StrCat("SubmitUpdate: UpdateHeader.total_size ", header_.total_size(),
                         " exceeds max_update_bytes ", max_update_bytes_));
      }
    } else if (chunk_.has_header()) {
      return absl::InvalidArgumentError(
          absl::StrCat("SubmitUpdate: UpdateHeader on the chunk at offset ", chunk_.offset(),
                       "; only the first chunk carries it"));
    }
    const std::string& data = chunk_.data();
    if (chunk_.offset() != received_) {
      return absl::InvalidArgumentError(absl::StrCat("SubmitUpdate: chunk offset ", chunk_.offset(),
                                                     ", expected ", received_,
                                                     " (offsets are contiguous from 0)"));
    }
    if (data.size() > kMaxChunkBytes) {
      return absl::InvalidArgumentError(absl::StrCat("SubmitUpdate: chunk at offset ",
                                                     chunk_.offset(), " holds ", data.size(),
                                                     " bytes; at most ", kMaxChunkBytes));
    }
    if (received_ + data.size() > max_update_bytes_) {
      return absl::ResourceExhaustedError(
          absl::StrCat("SubmitUpdate: payload exceeds max_update_bytes ", max_update_bytes_));
    }
    if (received_ + data.size() > header_.total_size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("SubmitUpdate: more data than UpdateHeader.total_size ",
                       header_.total_size(), " (chunk at offset ", chunk_.offset(), ")"));
    }
    const std::string sha = common::Sha256Hex(data);
    if (sha != chunk_.chunk_sha256()) {
      return absl::InvalidArgumentError(
          absl::StrCat("SubmitUpdate: chunk at offset ", chunk_.offset(), " has SHA-256 ", sha,
                       ", chunk_sha256 says '", chunk_.chunk_sha256().substr(0, 80), "'"));
    }
    payload_.append(data);
    received_ += data.size();
    return absl::OkStatus();
  }

  void Reject(const absl::Status& status) {
    if (done_) return;
    done_ = true;
    manager_->CountRejection(status);
    response_->set_accepted(false);
    response_->set_message(std::string(status.message()));
    response_->set_bytes_received(received_);
    Finish(ToGrpcStatus(status));
  }

  void Complete(const absl::Status& status) {
    if (!status.ok()) {
      Reject(status);
      return;
    }
    if (done_) return;
    done_ = true;
    response_->set_accepted(true);
    response_->set_message("accepted");
    response_->set_bytes_received(received_);
    Finish(grpc::Status::OK);
  }

  RoundManager* const manager_;
  const uint64_t max_update_bytes_;
  UploadLimiter* const uploads_;
  uint64_t ticket_ = 0;                 // 0 = no slot asked for (refused before)
  std::atomic<bool> holds_slot_{false};
  grpc::CallbackServerContext* const context_;
  v1::SubmitUpdateResponse* const response_;
  std::string cn_;
  v1::UpdateChunk chunk_;
  v1::UpdateHeader header_;
  bool have_header_ = false;
  std::string payload_;
  uint64_t received_ = 0;
  bool done_ = false;
};

// ------------------------------------------------------------------ FetchAdapter

class FetchReactor final : public grpc::ServerWriteReactor<v1::AdapterChunk> {
 public:
  FetchReactor(RoundManager* manager, grpc::CallbackServerContext* context,
               const v1::FetchAdapterRequest* request, const IdentityRegistry* identity)
      : manager_(manager), request_(*request) {
    auto id = Authorize(context, {"agent"}, "Coordinator.FetchAdapter", identity);
    if (!id.ok()) {
      Finish(ToGrpcStatus(id.status()));
      return;
    }
    chunk_size_ = request_.chunk_size() == 0 || request_.chunk_size() > kMaxChunkBytes
                      ? kMaxChunkBytes
                      : request_.chunk_size();
    manager_->GetVersionBlob(request_.version_id(),
                             [this](absl::StatusOr<BlobRef> blob) { OnBlob(std::move(blob)); });
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "FetchAdapter: write failed"));
      return;
    }
    manager_->RecordBytesDown(blob_.version_id, last_size_);
    pos_ += last_size_;
    NextWrite();
  }

  void OnDone() override { delete this; }

 private:
  void OnBlob(absl::StatusOr<BlobRef> blob) {
    if (!blob.ok()) {
      Finish(ToGrpcStatus(blob.status()));
      return;
    }
    blob_ = std::move(*blob);
    if (request_.offset() > blob_.bytes->size()) {
      Finish(grpc::Status(
          grpc::StatusCode::OUT_OF_RANGE,
          absl::StrCat("FetchAdapter: offset ", request_.offset(), " is past the end of version '",
                       blob_.version_id, "' (", blob_.bytes->size(), " bytes)")));
      return;
    }
    pos_ = request_.offset();
    NextWrite();
  }

  void NextWrite() {
    try {
      NextWriteOrThrow();
    } catch (const std::exception& e) {
      Finish(grpc::Status(grpc::StatusCode::INTERNAL, absl::StrCat("FetchAdapter: ", e.what())));
    }
  }

  void NextWriteOrThrow() {
    const std::string& bytes = *blob_.bytes;
    if (pos_ >= bytes.size()) {
      Finish(grpc::Status::OK);
      return;
    }
    last_size_ = std::min<uint64_t>(chunk_size_, bytes.size() - pos_);
    out_.Clear();
    out_.set_version_id(blob_.version_id);
    out_.set_offset(pos_);
    out_.set_data(bytes.substr(pos_, last_size_));
    out_.set_chunk_sha256(common::Sha256Hex(out_.data()));
    out_.set_total_size(bytes.size());
    out_.set_blob_sha256(blob_.sha256);
    out_.set_signature(blob_.signature);
    StartWrite(&out_);
  }

  RoundManager* const manager_;
  const v1::FetchAdapterRequest request_;
  uint64_t chunk_size_ = kMaxChunkBytes;
  BlobRef blob_;
  uint64_t pos_ = 0;
  uint64_t last_size_ = 0;
  v1::AdapterChunk out_;
};

}  // namespace

absl::StatusOr<common::PeerIdentity> AuthorizePeer(const grpc::CallbackServerContext* context,
                                                   std::initializer_list<const char*> roles,
                                                   const char* method,
                                                   const IdentityRegistry* identity) {
  auto id = common::GetPeerIdentity(*context);
  if (!id.ok()) return id.status();
  if (identity != nullptr && identity->IsRevoked(id->common_name)) {
    return absl::UnauthenticatedError(absl::StrCat(method, ": certificate revoked: '",
                                                   id->common_name, "' was revoked by an admin"));
  }
  for (const char* role : roles) {
    if (id->role == role) return id;
  }
  return absl::PermissionDeniedError(absl::StrCat(method, " requires a certificate with role ",
                                                  absl::StrJoin(roles, " or "), "; '",
                                                  id->common_name, "' has role '", id->role, "'"));
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

CoordinatorService::CoordinatorService(RoundManager* manager, uint64_t max_update_bytes,
                                       const IdentityRegistry* identity,
                                       size_t max_concurrent_uploads)
    : manager_(manager),
      max_update_bytes_(max_update_bytes),
      identity_(identity),
      uploads_(max_concurrent_uploads, &manager->metrics()) {}

grpc::ServerBidiReactor<v1::AgentMessage, v1::CoordinatorMessage>* CoordinatorService::Session(
    grpc::CallbackServerContext* context) {
  return new SessionReactor(manager_, context, identity_);
}

grpc::ServerReadReactor<v1::UpdateChunk>* CoordinatorService::SubmitUpdate(
    grpc::CallbackServerContext* context, v1::SubmitUpdateResponse* response) {
  return new UpdateReactor(manager_, max_update_bytes_, &uploads_, context, response, identity_);
}

grpc::ServerWriteReactor<v1::AdapterChunk>* CoordinatorService::FetchAdapter(
    grpc::CallbackServerContext* context, const v1::FetchAdapterRequest* request) {
  return new FetchReactor(manager_, context, request, identity_);
}

grpc::ServerUnaryReactor* AdminService::Status(grpc::CallbackServerContext* context,
                                               const v1::StatusRequest*,
                                               v1::StatusResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  auto id = Authorize(context, {"admin", "viewer"}, "Admin.Status", identity_);
  if (!id.ok()) {
    reactor->Finish(ToGrpcStatus(id.status()));
    return reactor;
  }
  manager_->GetStatus([reactor, response](v1::StatusResponse status) {
    *response = std::move(status);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

// ------------------------------------------------------------------ Admin: versions and backup

namespace {

// Finishes `reactor` with `result`, moving the value into `response` when OK.
template <typename T>
std::function<void(absl::StatusOr<T>)> FinishWith(grpc::ServerUnaryReactor* reactor, T* response) {
  return [reactor, response](absl::StatusOr<T> result) {
    if (!result.ok()) {
      reactor->Finish(ToGrpcStatus(result.status()));
      return;
    }
    *response = std::move(*result);
    reactor->Finish(grpc::Status::OK);
  };
}

}  // namespace

grpc::ServerUnaryReactor* AdminService::ListVersions(grpc::CallbackServerContext* context,
                                                     const v1::ListVersionsRequest*,
                                                     v1::ListVersionsResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  auto id = Authorize(context, {"admin", "viewer"}, "Admin.ListVersions", identity_);
  if (!id.ok()) {
    reactor->Finish(ToGrpcStatus(id.status()));
    return reactor;
  }
  manager_->ListVersions(FinishWith(reactor, response));
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::RollbackVersion(grpc::CallbackServerContext* context,
                                                        const v1::RollbackVersionRequest* request,
                                                        v1::VersionChangeResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  auto id = Authorize(context, {"admin"}, "Admin.RollbackVersion", identity_);
  if (!id.ok()) {
    reactor->Finish(ToGrpcStatus(id.status()));
    return reactor;
  }
  manager_->MoveCurrentVersion(VersionMove::kRollback, request->to_version(), id->common_name,
                               FinishWith(reactor, response));
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::PromoteVersion(grpc::CallbackServerContext* context,
                                                       const v1::PromoteVersionRequest* request,
                                                       v1::VersionChangeResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  auto id = Authorize(context, {"admin"}, "Admin.PromoteVersion", identity_);
  if (!id.ok()) {
    reactor->Finish(ToGrpcStatus(id.status()));
    return reactor;
  }
  manager_->MoveCurrentVersion(VersionMove::kPromote, request->version_id(), id->common_name,
                               FinishWith(reactor, response));
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::CreateBackup(grpc::CallbackServerContext* context,
                                                     const v1::CreateBackupRequest* request,
                                                     v1::CreateBackupResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  auto id = Authorize(context, {"admin"}, "Admin.CreateBackup", identity_);
  if (!id.ok()) {
    reactor->Finish(ToGrpcStatus(id.status()));
    return reactor;
  }
  manager_->CreateBackup(request->dir(), id->common_name, FinishWith(reactor, response));
  return reactor;
}

}  // namespace fedlora::coordinator
