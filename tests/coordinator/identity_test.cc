// Enrollment, renewal and revocation against the real CoordinatorServer (TLS 1.3,
// mutual TLS on the main port, server-auth TLS on the enrollment port), with the
// agent-side client of common/net/enroll_client.h.
#include "coordinator/identity.h"

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <ctime>
#include <filesystem>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>
#include <vector>

#include "common/crypto/crypto.h"
#include "common/crypto/pki.h"
#include "common/net/enroll_client.h"
#include "common/net/tls.h"
#include "coordinator/audit.h"
#include "coordinator/server.h"
#include "fedlora/v1/fedlora.grpc.pb.h"
#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

namespace v1 = ::fedlora::v1;
using ::testing::HasSubstr;
using testing::In;
using testing::kBaseHash;
using testing::MakeChannel;
using testing::MakeHeader;
using testing::MakeLoraUpdate;
using testing::SealUpdate;
using testing::TempDir;
using testing::WaitFor;

constexpr uint32_t kRank = 4;



// One agent's Session over its own connection.
class Session {
 public:
  explicit Session(std::shared_ptr<grpc::Channel> channel)
      : stub_(v1::Coordinator::NewStub(std::move(channel))) {}
  ~Session() {
    if (stream_) ctx_.TryCancel();
  }
  grpc::Status Connect(const std::string& agent_id) {
    ctx_.set_deadline(In(60));
    stream_ = stub_->Session(&ctx_);
    v1::AgentMessage hello;
    hello.mutable_hello()->set_agent_id(agent_id);
    hello.mutable_hello()->set_base_model_hash(kBaseHash);
    hello.mutable_hello()->set_num_train_examples(10);
    stream_->Write(hello);
    v1::CoordinatorMessage msg;
    if (!stream_->Read(&msg)) return stream_->Finish();
    if (!msg.has_welcome()) return grpc::Status(grpc::StatusCode::INTERNAL, "expected Welcome");
    return grpc::Status::OK;
  }
  bool Read(v1::CoordinatorMessage* msg) { return stream_->Read(msg); }
  grpc::Status Finish() { return stream_->Finish(); }
  grpc::Status Submit(const v1::UpdateHeader& header, const std::string& payload) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(30));
    v1::SubmitUpdateResponse response;
    auto writer = stub_->SubmitUpdate(&ctx, &response);
    v1::UpdateChunk c;
    *c.mutable_header() = header;
    c.set_offset(0);
    c.set_data(payload);
    c.set_chunk_sha256(common::Sha256Hex(payload));
    writer->Write(c);
    writer->WritesDone();
    return writer->Finish();
  }

 private:
  std::unique_ptr<v1::Coordinator::Stub> stub_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::AgentMessage, v1::CoordinatorMessage>> stream_;
};

class IdentityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pki_ = dir_.Sub("pki");
    ASSERT_TRUE(common::InitPki(pki_).ok());
    for (const std::string name : {"agent-1", "agent-2"}) {
      ASSERT_TRUE(common::IssueCertificate(pki_, name, common::CertRole::kAgent, pki_).ok());
    }
    ASSERT_TRUE(common::IssueCertificate(pki_, "viewer-1", common::CertRole::kViewer, pki_).ok());
    config_.listen_address = "127.0.0.1:0";
    config_.enroll_address = "127.0.0.1:0";
    config_.ca_key = pki_ + "/ca.key";
    config_.data_dir = dir_.Sub("data");
    config_.tls_ca = pki_ + "/ca.pem";
    config_.tls_cert = pki_ + "/coordinator.pem";
    config_.tls_key = pki_ + "/coordinator.key";
    config_.base_model_hash = kBaseHash;
    config_.min_participants = 2;
    config_.max_participants = 2;
    config_.lora_rank = kRank;
    config_.round_deadline_s = 600;
    config_.tick_ms = 20;
    StartServer();
  }
  void TearDown() override {
    if (server_) server_->Shutdown();
  }

  void StartServer() {
    ServerOptions options;
    options.out = &out_;
    options.clock = &clock_;
    auto server = CoordinatorServer::Start(config_, options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
  }
  void Restart() {
    server_->Shutdown();
    server_.reset();
    StartServer();
  }

  std::string Target() const { return "127.0.0.1:" + std::to_string(server_->port()); }
  std::string EnrollTarget() const {
    return "127.0.0.1:" + std::to_string(server_->enroll_port());
  }
  std::shared_ptr<grpc::Channel> Channel(const std::string& name, const std::string& dir = "") {
    const std::string d = dir.empty() ? pki_ : dir;
    return MakeChannel(Target(), pki_ + "/ca.pem", d + "/" + name + ".pem", d + "/" + name + ".key");
  }

  grpc::Status CreateToken(const std::string& name, uint64_t ttl_s, std::string* token,
                           const std::string& caller = "admin") {
    auto stub = v1::SecurityAdmin::NewStub(Channel(caller));
    grpc::ClientContext ctx;
    ctx.set_deadline(In(10));
    v1::CreateEnrollmentTokenRequest req;
    req.set_name(name);
    req.set_ttl_seconds(ttl_s);
    v1::CreateEnrollmentTokenResponse resp;
    grpc::Status s = stub->CreateEnrollmentToken(&ctx, req, &resp);
    if (token != nullptr) *token = resp.token();
    return s;
  }

  grpc::Status Revoke(const std::string& agent, v1::RevokeAgentResponse* resp,
                      const std::string& caller = "admin") {
    auto stub = v1::SecurityAdmin::NewStub(Channel(caller));
    grpc::ClientContext ctx;
    ctx.set_deadline(In(10));
    v1::RevokeAgentRequest req;
    req.set_agent_id(agent);
    req.set_reason("test");
    return stub->RevokeAgent(&ctx, req, resp);
  }

  absl::StatusOr<common::EnrolledFiles> Enroll(const std::string& name, const std::string& token,
                                               const std::string& out_dir) {
    common::EnrollRequestOptions o;
    o.coordinator = EnrollTarget();
    o.token = token;
    o.name = name;
    o.ca_cert = pki_ + "/ca.pem";
    o.out_dir = out_dir;
    o.timeout_s = 10;
    std::filesystem::create_directories(out_dir);
    return common::EnrollAgent(o);
  }

  // Every key and value of the security and audit column families.
  std::string SecurityAndAudit() {
    std::string all;
    for (const char* cf : {"security", kAuditColumnFamily}) {
      EXPECT_TRUE(server_->store()
                      ->raw()
                      ->Scan(cf, "",
                             [&](std::string_view k, std::string_view v) {
                               all.append(k).append("=").append(v).append("\n");
                               return true;
                             })
                      .ok());
    }
    return all;
  }

  // The whole store, for "the raw token is nowhere" checks.
  std::string EverythingStored() {
    std::string all;
    for (const char* cf : {"agents", "rounds", "updates", "versions", "blobs", "meta",
                           kAuditColumnFamily, "security"}) {
      (void)server_->store()->raw()->Scan(cf, "", [&](std::string_view k, std::string_view v) {
        all.append(k).append(v);
        return true;
      });
    }
    return all;
  }

  TempDir dir_;
  std::string pki_;
  CoordinatorConfig config_;
  FakeClock clock_{static_cast<uint64_t>(std::time(nullptr)) * 1000};
  std::ostringstream out_;
  std::unique_ptr<CoordinatorServer> server_;
};

TEST_F(IdentityTest, EnrollmentEndToEndAndTokenIsSingleUseAndStoredHashed) {
  ASSERT_GT(server_->enroll_port(), 0);
  std::string token;
  ASSERT_TRUE(CreateToken("site-a", 3600, &token).ok());
  ASSERT_EQ(token.size(), 64u);
  // Stored only as its SHA-256.
  const std::string stored = EverythingStored();
  EXPECT_EQ(stored.find(token), std::string::npos) << "the raw token is in the store";
  EXPECT_NE(stored.find("token/" + common::Sha256Hex(token)), std::string::npos);

  const std::string site = dir_.Sub("site-a");
  auto files = Enroll("site-a", token, site);
  ASSERT_TRUE(files.ok()) << files.status();
  auto pem = common::ReadFileToString(files->cert_path);
  ASSERT_TRUE(pem.ok());
  auto id = common::ReadCertIdentity(*pem);
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(id->common_name, "site-a");
  EXPECT_EQ(id->role, "agent");
  EXPECT_EQ(std::filesystem::status(files->key_path).permissions() &
                std::filesystem::perms::all,
            std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  EXPECT_THAT(SecurityAndAudit(), HasSubstr("enroll.issued"));

  // The enrolled certificate works on the main port.
  Session session(Channel("site-a", site));
  EXPECT_TRUE(session.Connect("site-a").ok());

  // Reuse: refused, nothing written, no files.
  const std::string before = SecurityAndAudit();
  auto again = Enroll("site-a", token, dir_.Sub("site-a-again"));
  EXPECT_EQ(again.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(again.status().message(), HasSubstr("already used"));
  EXPECT_EQ(SecurityAndAudit(), before);
  EXPECT_FALSE(std::filesystem::exists(dir_.Sub("site-a-again/site-a.pem")));
}

TEST_F(IdentityTest, ExpiredUnknownAndMismatchedTokensAreRefusedWithoutStateChange) {
  std::string token;
  ASSERT_TRUE(CreateToken("site-b", 60, &token).ok());
  const std::string before = SecurityAndAudit();

  // Unknown token.
  auto unknown = Enroll("site-b", std::string(64, 'a'), dir_.Sub("u"));
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(unknown.status().message(), HasSubstr("not recognised"));
  // CSR for another name than the token's.
  auto wrong_name = Enroll("site-c", token, dir_.Sub("w"));
  EXPECT_EQ(wrong_name.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(wrong_name.status().message(), HasSubstr("expected subject CN 'site-b'"));
  EXPECT_EQ(SecurityAndAudit(), before);

  // Expired.
  clock_.Advance(61 * 1000);
  auto expired = Enroll("site-b", token, dir_.Sub("e"));
  EXPECT_EQ(expired.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(expired.status().message(), HasSubstr("expired"));
  EXPECT_EQ(SecurityAndAudit(), before);
  EXPECT_FALSE(std::filesystem::exists(dir_.Sub("e/site-b.key")));

  // A fresh token still works (the refusals did not poison the name).
  ASSERT_TRUE(CreateToken("site-b", 60, &token).ok());
  EXPECT_TRUE(Enroll("site-b", token, dir_.Sub("ok")).ok());
}

TEST_F(IdentityTest, OnlyAdminsCreateTokensAndRevoke) {
  for (const std::string caller : {"agent-1", "viewer-1"}) {
    grpc::Status s = CreateToken("site-x", 60, nullptr, caller);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << caller;
    EXPECT_THAT(s.error_message(), HasSubstr("role admin"));
    v1::RevokeAgentResponse r;
    s = Revoke("agent-2", &r, caller);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << caller;
  }
  EXPECT_THAT(SecurityAndAudit(), ::testing::Not(HasSubstr("revoked")));
  EXPECT_THAT(SecurityAndAudit(), ::testing::Not(HasSubstr("token/")));
  Session s2(Channel("agent-2"));
  EXPECT_TRUE(s2.Connect("agent-2").ok());
}

TEST_F(IdentityTest, EnrollmentPortServesOnlyEnroll) {
  auto creds = common::MakeServerAuthChannelCredentials(pki_ + "/ca.pem");
  ASSERT_TRUE(creds.ok());
  auto channel = grpc::CreateChannel(EnrollTarget(), *creds);
  auto admin = v1::Admin::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(In(10));
  v1::StatusResponse r;
  EXPECT_EQ(admin->Status(&ctx, v1::StatusRequest(), &r).error_code(),
            grpc::StatusCode::UNIMPLEMENTED);
  // And the main port still refuses a caller without a client certificate.
  auto main = v1::SecurityAdmin::NewStub(grpc::CreateChannel(Target(), *creds));
  grpc::ClientContext ctx2;
  ctx2.set_deadline(In(10));
  v1::CreateEnrollmentTokenRequest req;
  req.set_name("x");
  v1::CreateEnrollmentTokenResponse resp;
  EXPECT_FALSE(main->CreateEnrollmentToken(&ctx2, req, &resp).ok());
}

TEST_F(IdentityTest, RevocationCutsSessionDiscardsUpdateAndPersists) {
  Session a1(Channel("agent-1"));
  Session a2(Channel("agent-2"));
  ASSERT_TRUE(a1.Connect("agent-1").ok());
  ASSERT_TRUE(a2.Connect("agent-2").ok());
  v1::CoordinatorMessage m;
  ASSERT_TRUE(a1.Read(&m));
  ASSERT_TRUE(m.has_round_task()) << m.DebugString();
  const v1::RoundTask task = m.round_task();
  ASSERT_TRUE(a2.Read(&m));
  const std::string p1 = SealUpdate(MakeLoraUpdate(kRank, 1, 16, 16, 1), task.seal_public_key(),
                                    task.round_id(), "agent-1", "");
  ASSERT_TRUE(a1.Submit(MakeHeader(task.round_id(), "agent-1", "", 5, p1), p1).ok());
  ASSERT_EQ(*server_->store()->CountUpdates(task.round_id()), 1u);

  v1::RevokeAgentResponse r;
  grpc::Status s = Revoke("agent-1", &r);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_FALSE(r.already_revoked());
  EXPECT_TRUE(r.session_closed());
  EXPECT_TRUE(r.update_discarded());
  // The open session ends at once with "certificate revoked".
  while (a1.Read(&m)) {
  }
  grpc::Status ended = a1.Finish();
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(ended.error_message(), HasSubstr("certificate revoked"));
  // Its update is gone; it stays a participant that never reports (as if dropped).
  EXPECT_EQ(*server_->store()->CountUpdates(task.round_id()), 0u);
  auto round = server_->store()->GetRound(task.round_id());
  ASSERT_TRUE(round.ok() && round->has_value());
  EXPECT_EQ((*round)->updates.count("agent-1"), 0u);
  EXPECT_EQ((*round)->phase, RoundPhase::kTrain);
  EXPECT_THAT(SecurityAndAudit(), HasSubstr("agent.revoked"));

  // Every later connection with that certificate fails its TLS handshake (no
  // call reaches a service), also after a restart.
  for (int pass = 0; pass < 2; ++pass) {
    Session again(Channel("agent-1"));
    grpc::Status c = again.Connect("agent-1");
    EXPECT_EQ(c.error_code(), grpc::StatusCode::UNAVAILABLE) << pass << ": " << c.error_message();
    common::RenewRequestOptions o;
    o.coordinator = Target();
    o.ca_cert = pki_ + "/ca.pem";
    o.cert = pki_ + "/agent-1.pem";
    o.key = pki_ + "/agent-1.key";
    o.timeout_s = 10;
    auto renewed = common::RenewAgentCertificate(o);
    EXPECT_EQ(renewed.status().code(), absl::StatusCode::kUnavailable) << pass;
    // The name cannot be enrolled again.
    EXPECT_EQ(CreateToken("agent-1", 60, nullptr).error_code(),
              grpc::StatusCode::FAILED_PRECONDITION);
    if (pass == 0) {
      Restart();
    }
  }
  // Revoking again is idempotent.
  ASSERT_TRUE(Revoke("agent-1", &r).ok());
  EXPECT_TRUE(r.already_revoked());
}

// Revocation at two layers: a new TLS connection with the revoked certificate
// fails in the handshake (UNAVAILABLE; the service's own refusal, UNAUTHENTICATED
// "certificate revoked", is never reached), while a connection opened before the
// revocation gets the per-call refusal. Other agents are unaffected.
TEST_F(IdentityTest, RevokedCertificateFailsTheTlsHandshake) {
  // Opened (and kept) before the revocation.
  auto early = Channel("agent-1");
  ASSERT_TRUE(early->WaitForConnected(In(30)));
  {
    Session before(early);
    ASSERT_TRUE(before.Connect("agent-1").ok());
  }
  v1::RevokeAgentResponse r;
  ASSERT_TRUE(Revoke("agent-1", &r).ok());

  for (int pass = 0; pass < 2; ++pass) {
    auto fresh = Channel("agent-1");
    // A handshake refusal, not a call refusal: the channel never becomes READY.
    EXPECT_FALSE(fresh->WaitForConnected(In(5))) << pass;
    Session s(fresh);
    grpc::Status c = s.Connect("agent-1");
    EXPECT_EQ(c.error_code(), grpc::StatusCode::UNAVAILABLE) << pass << ": " << c.error_message();
    EXPECT_THAT(c.error_message(), ::testing::Not(HasSubstr("certificate revoked")));
    // The same CA, another agent: connects and is served.
    auto other = Channel("agent-2");
    EXPECT_TRUE(other->WaitForConnected(In(30))) << pass;
    Session ok(other);
    EXPECT_TRUE(ok.Connect("agent-2").ok()) << pass;
    if (pass == 0) {
      // The connection from before the revocation: the per-call check refuses it.
      Session late(early);
      grpc::Status l = late.Connect("agent-1");
      EXPECT_EQ(l.error_code(), grpc::StatusCode::UNAUTHENTICATED) << l.error_message();
      EXPECT_THAT(l.error_message(), HasSubstr("certificate revoked"));
      early.reset();
      Restart();  // the revocation is loaded from the store: the handshake still fails
    }
  }
}

TEST_F(IdentityTest, ExpiredAndNotYetValidCertificatesFailTheHandshake) {
  const int64_t now = static_cast<int64_t>(std::time(nullptr));
  const std::string old_dir = dir_.Sub("old");
  ASSERT_TRUE(common::IssueCertificateWindow(pki_, "agent-old", common::CertRole::kAgent, old_dir,
                                             now - 10 * 86400, now - 86400)
                  .ok());
  const std::string future_dir = dir_.Sub("future");
  ASSERT_TRUE(common::IssueCertificateWindow(pki_, "agent-future", common::CertRole::kAgent,
                                             future_dir, now + 86400, now + 10 * 86400)
                  .ok());
  const std::string good_dir = dir_.Sub("good");
  ASSERT_TRUE(common::IssueCertificateWindow(pki_, "agent-good", common::CertRole::kAgent,
                                             good_dir, now - 60, now + 86400)
                  .ok());
  Session old_session(Channel("agent-old", old_dir));
  EXPECT_EQ(old_session.Connect("agent-old").error_code(), grpc::StatusCode::UNAVAILABLE);
  Session future_session(Channel("agent-future", future_dir));
  EXPECT_EQ(future_session.Connect("agent-future").error_code(), grpc::StatusCode::UNAVAILABLE);
  // Same CA, same path, valid window: accepted (the refusals were the dates).
  Session good(Channel("agent-good", good_dir));
  EXPECT_TRUE(good.Connect("agent-good").ok());
}

TEST_F(IdentityTest, RenewalIssuesANewCertificateAndTheOldOneKeepsWorking) {
  const std::string site = dir_.Sub("renew");
  std::filesystem::create_directories(site);
  std::filesystem::copy_file(pki_ + "/agent-2.pem", site + "/agent-2.pem");
  std::filesystem::copy_file(pki_ + "/agent-2.key", site + "/agent-2.key");
  common::RenewRequestOptions o;
  o.coordinator = Target();
  o.ca_cert = pki_ + "/ca.pem";
  o.cert = site + "/agent-2.pem";
  o.key = site + "/agent-2.key";
  // Not due: nothing changes.
  o.within_days = 30;
  auto not_due = common::RenewAgentCertificate(o);
  ASSERT_TRUE(not_due.ok()) << not_due.status();
  EXPECT_FALSE(not_due->renewed);
  const std::string old_fp = not_due->fingerprint;

  o.within_days = 0;
  auto renewed = common::RenewAgentCertificate(o);
  ASSERT_TRUE(renewed.ok()) << renewed.status();
  EXPECT_TRUE(renewed->renewed);
  EXPECT_NE(renewed->fingerprint, old_fp);
  EXPECT_EQ(*common::CertFingerprint(*common::ReadFileToString(site + "/agent-2.pem")),
            renewed->fingerprint);
  EXPECT_EQ(*common::CertFingerprint(*common::ReadFileToString(site + "/agent-2.pem.old")),
            old_fp);
  EXPECT_THAT(SecurityAndAudit(), HasSubstr("cert.renewed"));
  // Both the new and the old certificate work.
  Session fresh(Channel("agent-2", site));
  EXPECT_TRUE(fresh.Connect("agent-2").ok());
  Session old(Channel("agent-2"));
  EXPECT_TRUE(old.Connect("agent-2").ok());
}

TEST_F(IdentityTest, RenewRefusesAnotherNameAndNeedsTheCaKey) {
  // A CSR for another CN, sent with agent-1's certificate.
  auto kc = common::GenerateKeyAndCsr("agent-2");
  ASSERT_TRUE(kc.ok());
  auto stub = v1::Certificates::NewStub(Channel("agent-1"));
  grpc::ClientContext ctx;
  ctx.set_deadline(In(10));
  v1::RenewRequest req;
  req.set_csr_pem(kc->csr_pem);
  v1::CertificateResponse resp;
  grpc::Status s = stub->Renew(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(s.error_message(), HasSubstr("expected subject CN 'agent-1'"));
  // An admin certificate may not renew through the agent call.
  auto admin_stub = v1::Certificates::NewStub(Channel("admin"));
  grpc::ClientContext actx;
  actx.set_deadline(In(10));
  EXPECT_EQ(admin_stub->Renew(&actx, req, &resp).error_code(), grpc::StatusCode::PERMISSION_DENIED);

  config_.ca_key.clear();
  config_.enroll_address.clear();
  Restart();
  EXPECT_EQ(server_->enroll_port(), 0);
  common::RenewRequestOptions o;
  o.coordinator = Target();
  o.ca_cert = pki_ + "/ca.pem";
  o.cert = pki_ + "/agent-1.pem";
  o.key = pki_ + "/agent-1.key";
  auto renewed = common::RenewAgentCertificate(o);
  EXPECT_EQ(renewed.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(renewed.status().message(), HasSubstr("--ca-key"));
}

// Registry-level: a CSR whose signature does not verify is refused and the
// token stays unused.
// ---- Admin-approval mode (enrollment_approval: admin)

class ApprovalTest : public IdentityTest {
 protected:
  void SetUp() override {
    config_.enrollment_approval = "admin";
    IdentityTest::SetUp();
  }

  common::EnrollRequestOptions Options(const std::string& name, const std::string& out_dir) {
    common::EnrollRequestOptions o;
    o.coordinator = EnrollTarget();
    o.name = name;
    o.ca_cert = pki_ + "/ca.pem";
    o.out_dir = out_dir;
    o.timeout_s = 10;
    o.poll_interval_ms = 50;
    o.wait_s = 120;
    o.progress = [this](const std::string& line) {
      std::lock_guard<std::mutex> lock(progress_mu_);
      progress_.push_back(line);
    };
    std::filesystem::create_directories(out_dir);
    return o;
  }
  std::string Progress() {
    std::lock_guard<std::mutex> lock(progress_mu_);
    std::string all;
    for (const std::string& l : progress_) all += l + "\n";
    return all;
  }

  grpc::Status ListPending(v1::ListEnrollmentRequestsResponse* resp,
                           const std::string& caller = "admin") {
    auto stub = v1::SecurityAdmin::NewStub(Channel(caller));
    grpc::ClientContext ctx;
    ctx.set_deadline(In(10));
    return stub->ListEnrollmentRequests(&ctx, v1::ListEnrollmentRequestsRequest(), resp);
  }
  // The one pending request for `name`, once the agent has filed it.
  std::optional<v1::EnrollmentRequestState> WaitPending(const std::string& name) {
    std::optional<v1::EnrollmentRequestState> found;
    WaitFor([&]() {
      v1::ListEnrollmentRequestsResponse resp;
      if (!ListPending(&resp).ok()) return false;
      for (const auto& r : resp.requests()) {
        if (r.agent_id() == name) found = r;
      }
      return found.has_value();
    });
    return found;
  }
  grpc::Status Decide(const std::string& id, bool approve, const std::string& reason,
                      v1::EnrollmentRequestState* resp, const std::string& caller = "admin") {
    auto stub = v1::SecurityAdmin::NewStub(Channel(caller));
    grpc::ClientContext ctx;
    ctx.set_deadline(In(10));
    v1::DecideEnrollmentRequestRequest req;
    req.set_request_id(id);
    req.set_approve(approve);
    req.set_reason(reason);
    return stub->DecideEnrollmentRequest(&ctx, req, resp);
  }
  grpc::Status Poll(const std::string& id, v1::EnrollmentRequestState* resp) {
    auto creds = common::MakeServerAuthChannelCredentials(pki_ + "/ca.pem");
    EXPECT_TRUE(creds.ok());
    auto stub = v1::Enrollment::NewStub(grpc::CreateChannel(EnrollTarget(), *creds));
    grpc::ClientContext ctx;
    ctx.set_deadline(In(10));
    v1::GetEnrollmentRequestRequest req;
    req.set_request_id(id);
    return stub->GetEnrollmentRequest(&ctx, req, resp);
  }

  std::mutex progress_mu_;
  std::vector<std::string> progress_;
};

TEST_F(ApprovalTest, PendingRequestGetsNoCertificateUntilAnAdminApproves) {
  const std::string site = dir_.Sub("site-p");
  absl::StatusOr<common::EnrolledFiles> result = absl::UnknownError("not run");
  std::thread agent([&]() { result = common::EnrollAgent(Options("site-p", site)); });
  auto pending = WaitPending("site-p");
  ASSERT_TRUE(pending.has_value());
  EXPECT_EQ(pending->state(), v1::EnrollmentRequestState::PENDING);
  EXPECT_EQ(pending->request_id().size(), 32u);
  EXPECT_EQ(pending->key_fingerprint().size(), 64u);
  EXPECT_THAT(pending->peer(), HasSubstr("127.0.0.1"));
  EXPECT_GT(pending->requested_unix_ms(), 0u);
  EXPECT_FALSE(pending->has_certificate());
  // The agent printed the same fingerprint the admin sees.
  EXPECT_TRUE(WaitFor([&]() { return Progress().find(pending->key_fingerprint()) != std::string::npos; }))
      << Progress();
  // Pending: no certificate anywhere, not even to a poller with the id.
  v1::EnrollmentRequestState polled;
  ASSERT_TRUE(Poll(pending->request_id(), &polled).ok());
  EXPECT_EQ(polled.state(), v1::EnrollmentRequestState::PENDING);
  EXPECT_FALSE(polled.has_certificate());
  EXPECT_FALSE(std::filesystem::exists(site + "/site-p.pem"));
  EXPECT_TRUE(std::filesystem::exists(site + "/site-p.key"));
  EXPECT_THAT(SecurityAndAudit(), HasSubstr("enroll.requested"));
  EXPECT_THAT(SecurityAndAudit(), ::testing::Not(HasSubstr("enroll.approved")));

  v1::EnrollmentRequestState decided;
  grpc::Status s = Decide(pending->request_id(), true, "site checked by phone", &decided);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(decided.state(), v1::EnrollmentRequestState::APPROVED);
  EXPECT_EQ(decided.decided_by(), "admin");
  agent.join();
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_THAT(Progress(), HasSubstr("approved by admin"));
  auto pem = common::ReadFileToString(result->cert_path);
  ASSERT_TRUE(pem.ok());
  auto id = common::ReadCertIdentity(*pem);
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(id->common_name, "site-p");
  EXPECT_EQ(id->role, "agent");
  EXPECT_FALSE(std::filesystem::exists(site + "/site-p.request"));
  EXPECT_THAT(SecurityAndAudit(), HasSubstr("enroll.approved"));
  // The approved certificate works on the main port.
  Session session(Channel("site-p", site));
  EXPECT_TRUE(session.Connect("site-p").ok());
  // Decided once: a second decision is refused and nothing pends any more.
  s = Decide(pending->request_id(), false, "", &decided);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("is approved"));
  v1::ListEnrollmentRequestsResponse list;
  ASSERT_TRUE(ListPending(&list).ok());
  EXPECT_EQ(list.requests_size(), 0);
}

TEST_F(ApprovalTest, DeniedRequestIsRefusedWithTheReasonAndLeavesNoFiles) {
  const std::string site = dir_.Sub("site-d");
  absl::StatusOr<common::EnrolledFiles> result = absl::UnknownError("not run");
  std::thread agent([&]() { result = common::EnrollAgent(Options("site-d", site)); });
  auto pending = WaitPending("site-d");
  ASSERT_TRUE(pending.has_value());
  v1::EnrollmentRequestState decided;
  ASSERT_TRUE(Decide(pending->request_id(), false, "unknown site", &decided).ok());
  EXPECT_EQ(decided.state(), v1::EnrollmentRequestState::DENIED);
  agent.join();
  EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(result.status().message(), HasSubstr("denied by admin: unknown site"));
  EXPECT_FALSE(std::filesystem::exists(site + "/site-d.pem"));
  EXPECT_FALSE(std::filesystem::exists(site + "/site-d.key"));
  EXPECT_FALSE(std::filesystem::exists(site + "/site-d.request"));
  EXPECT_THAT(SecurityAndAudit(), HasSubstr("enroll.denied"));
  EXPECT_THAT(SecurityAndAudit(), ::testing::Not(HasSubstr("enroll.approved")));
  // A denied request cannot be approved afterwards.
  grpc::Status s = Decide(pending->request_id(), true, "", &decided);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("denied"));
}

TEST_F(ApprovalTest, UnknownIdsNonAdminsAndBadCsrsAreRefusedWithoutStateChange) {
  common::EnrollRequestOptions o = Options("site-u", dir_.Sub("site-u"));
  o.wait_s = 0;  // file the request, poll once, give up (files kept)
  auto first = common::EnrollAgent(o);
  EXPECT_EQ(first.status().code(), absl::StatusCode::kDeadlineExceeded) << first.status();
  auto pending = WaitPending("site-u");
  ASSERT_TRUE(pending.has_value());
  const std::string before = SecurityAndAudit();

  v1::EnrollmentRequestState r;
  grpc::Status s = Decide(std::string(32, '0'), true, "", &r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(s.error_message(), HasSubstr("not found"));
  EXPECT_EQ(Decide("not-an-id", true, "", &r).error_code(), grpc::StatusCode::NOT_FOUND);
  for (const std::string caller : {"agent-1", "viewer-1"}) {
    v1::ListEnrollmentRequestsResponse list;
    s = ListPending(&list, caller);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << caller;
    EXPECT_THAT(s.error_message(), HasSubstr("role admin"));
    s = Decide(pending->request_id(), true, "", &r, caller);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << caller;
  }
  // A corrupted CSR is refused at the door.
  auto kc = common::GenerateKeyAndCsr("site-bad");
  ASSERT_TRUE(kc.ok());
  std::string csr = kc->csr_pem;
  csr[csr.size() / 2] = csr[csr.size() / 2] == 'A' ? 'B' : 'A';
  auto creds = common::MakeServerAuthChannelCredentials(pki_ + "/ca.pem");
  ASSERT_TRUE(creds.ok());
  auto stub = v1::Enrollment::NewStub(grpc::CreateChannel(EnrollTarget(), *creds));
  grpc::ClientContext ctx;
  ctx.set_deadline(In(10));
  v1::RequestEnrollmentRequest req;
  req.set_csr_pem(csr);
  s = stub->RequestEnrollment(&ctx, req, &r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_EQ(SecurityAndAudit(), before);
  ASSERT_TRUE(Poll(pending->request_id(), &r).ok());
  EXPECT_EQ(r.state(), v1::EnrollmentRequestState::PENDING);

  // The interrupted wait resumes on the same request and key once approved.
  ASSERT_TRUE(std::filesystem::exists(dir_.Sub("site-u/site-u.request")));
  ASSERT_TRUE(Decide(pending->request_id(), true, "", &r).ok());
  o.wait_s = 60;
  auto resumed = common::EnrollAgent(o);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_THAT(Progress(), HasSubstr("resuming enrollment request " + pending->request_id()));
  Session session(Channel("site-u", dir_.Sub("site-u")));
  EXPECT_TRUE(session.Connect("site-u").ok());
}

TEST_F(IdentityTest, TokenModeRefusesRequestsWithoutAToken) {
  common::EnrollRequestOptions o;
  o.coordinator = EnrollTarget();
  o.name = "site-t";
  o.ca_cert = pki_ + "/ca.pem";
  o.out_dir = dir_.Sub("site-t");
  o.timeout_s = 10;
  std::filesystem::create_directories(o.out_dir);
  const std::string before = SecurityAndAudit();
  auto r = common::EnrollAgent(o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("one-time tokens only"));
  EXPECT_FALSE(std::filesystem::exists(o.out_dir + "/site-t.key"));
  EXPECT_EQ(SecurityAndAudit(), before);
}

TEST(IdentityRegistryTest, TamperedCsrIsRefusedAndTokenStaysUsable) {
  TempDir dir;
  ASSERT_TRUE(common::InitPki(dir.Sub("pki")).ok());
  auto ca = common::LoadCa(dir.Sub("pki/ca.pem"), dir.Sub("pki/ca.key"));
  ASSERT_TRUE(ca.ok());
  auto store = StateStore::Open(dir.Sub("data"));
  ASSERT_TRUE(store.ok());
  FakeClock clock;
  IdentityOptions options;
  options.ca = *ca;
  IdentityRegistry registry(store->get(), &clock, options);
  ASSERT_TRUE(registry.Load().ok());
  auto token = registry.CreateToken("site-t", 60, "admin");
  ASSERT_TRUE(token.ok());
  auto kc = common::GenerateKeyAndCsr("site-t");
  ASSERT_TRUE(kc.ok());
  // Flip one base64 character inside the signature (near the end of the PEM).
  std::string tampered = kc->csr_pem;
  const size_t pos = tampered.rfind("-----END") - 10;
  tampered[pos] = tampered[pos] == 'A' ? 'B' : 'A';
  auto refused = registry.Enroll(token->token, tampered);
  EXPECT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
  auto ok = registry.Enroll(token->token, kc->csr_pem);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->agent_id, "site-t");
  EXPECT_FALSE(registry.Enroll(token->token, kc->csr_pem).ok());
  EXPECT_TRUE(registry.Revoke("site-t", "lost laptop", "admin").value());
  EXPECT_TRUE(registry.IsRevoked("site-t"));
  IdentityRegistry reloaded(store->get(), &clock, options);
  ASSERT_TRUE(reloaded.Load().ok());
  EXPECT_TRUE(reloaded.IsRevoked("site-t"));
  EXPECT_FALSE(reloaded.IsRevoked("site-u"));
}

}  // namespace
}  // namespace fedlora::coordinator
