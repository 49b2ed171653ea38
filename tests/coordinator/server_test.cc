// In-process gRPC tests: the real CoordinatorServer on 127.0.0.1:0 with a PKI made
// in a temp dir, and fake agents speaking fedlora.v1 through generated stubs.
#include "coordinator/server.h"

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>

#include <chrono>
#include <cmath>
#include <limits>
#include <sstream>
#include <thread>

#include "common/crypto/crypto.h"
#include "common/crypto/pki.h"
#include "common/net/tls.h"
#include "common/quant/quant.h"
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

constexpr uint32_t kRank = 8;



class FakeAgent {
 public:
  FakeAgent(std::string id, std::shared_ptr<grpc::Channel> channel)
      : id_(std::move(id)), stub_(v1::Coordinator::NewStub(channel)) {}
  ~FakeAgent() {
    if (session_) session_ctx_.TryCancel();
  }
  v1::Coordinator::Stub* stub() { return stub_.get(); }

  // Opens the Session and sends Hello; returns the first message (Welcome) or the
  // stream's final status.
  grpc::Status Connect(const std::string& agent_id = "", const std::string& hash = kBaseHash) {
    session_ctx_.set_deadline(In(60));
    session_ = stub_->Session(&session_ctx_);
    v1::AgentMessage hello;
    hello.mutable_hello()->set_agent_id(agent_id.empty() ? id_ : agent_id);
    hello.mutable_hello()->set_base_model_hash(hash);
    hello.mutable_hello()->set_num_train_examples(100);
    session_->Write(hello);
    v1::CoordinatorMessage msg;
    if (!session_->Read(&msg)) return session_->Finish();
    if (!msg.has_welcome()) return grpc::Status(grpc::StatusCode::INTERNAL, "expected Welcome");
    welcome_ = msg.welcome();
    return grpc::Status::OK;
  }

  v1::CoordinatorMessage Read() {
    v1::CoordinatorMessage msg;
    EXPECT_TRUE(session_->Read(&msg)) << id_ << ": session ended while a message was expected";
    return msg;
  }

  void SendEval(const std::string& version, double loss) {
    v1::AgentMessage m;
    m.mutable_eval_report()->set_version_id(version);
    m.mutable_eval_report()->set_eval_loss(loss);
    m.mutable_eval_report()->set_eval_tokens(500);
    ASSERT_TRUE(session_->Write(m));
  }

  // Streams `payload` in chunks; `tamper` may edit each chunk before it is sent.
  grpc::Status Submit(const v1::UpdateHeader& header, const std::string& payload,
                      v1::SubmitUpdateResponse* response = nullptr, size_t chunk = 4096,
                      const std::function<void(v1::UpdateChunk&, int)>& tamper = nullptr) {
    v1::SubmitUpdateResponse local;
    if (response == nullptr) response = &local;
    grpc::ClientContext ctx;
    ctx.set_deadline(In(30));
    auto writer = stub_->SubmitUpdate(&ctx, response);
    size_t offset = 0;
    int index = 0;
    do {
      v1::UpdateChunk c;
      if (index == 0) *c.mutable_header() = header;
      const size_t n = std::min(chunk, payload.size() - offset);
      c.set_offset(offset);
      c.set_data(payload.substr(offset, n));
      c.set_chunk_sha256(common::Sha256Hex(c.data()));
      if (tamper) tamper(c, index);
      if (!writer->Write(c)) break;
      offset += n;
      ++index;
    } while (offset < payload.size());
    writer->WritesDone();
    return writer->Finish();
  }

  absl::StatusOr<std::string> Fetch(const std::string& version, uint64_t offset = 0,
                                    uint32_t chunk_size = 0, std::string* blob_sha = nullptr) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(30));
    v1::FetchAdapterRequest req;
    req.set_version_id(version);
    req.set_offset(offset);
    req.set_chunk_size(chunk_size);
    auto reader = stub_->FetchAdapter(&ctx, req);
    std::string data;
    v1::AdapterChunk c;
    while (reader->Read(&c)) {
      if (c.offset() != offset + data.size()) return absl::InternalError("non-contiguous chunk");
      if (common::Sha256Hex(c.data()) != c.chunk_sha256()) return absl::InternalError("bad chunk");
      if (chunk_size != 0 && c.data().size() > chunk_size) return absl::InternalError("big chunk");
      if (blob_sha) *blob_sha = c.blob_sha256();
      data += c.data();
    }
    grpc::Status s = reader->Finish();
    if (!s.ok())
      return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
    return data;
  }

  void Close() {
    if (!session_) return;
    session_->WritesDone();
    session_ctx_.TryCancel();
    session_->Finish();
    session_.reset();
  }

  const std::string& id() const { return id_; }
  const v1::Welcome& welcome() const { return welcome_; }

 private:
  std::string id_;
  std::unique_ptr<v1::Coordinator::Stub> stub_;
  grpc::ClientContext session_ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::AgentMessage, v1::CoordinatorMessage>> session_;
  v1::Welcome welcome_;
};

// GET http://127.0.0.1:port/path; the whole response (status line, headers, body).
std::string HttpGet(int port, const std::string& path) {
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket socket(io);
  boost::system::error_code ec;
  socket.connect({boost::asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(port)}, ec);
  if (ec) return "connect failed: " + ec.message();
  const std::string request = "GET " + path + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  boost::asio::write(socket, boost::asio::buffer(request), ec);
  std::string out;
  char buf[4096];
  while (!ec) out.append(buf, socket.read_some(boost::asio::buffer(buf), ec));
  return out;
}

class ServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pki_ = dir_.Sub("pki");
    ASSERT_TRUE(common::InitPki(pki_).ok());
    for (const std::string name : {"agent-1", "agent-2", "agent-3"}) {
      ASSERT_TRUE(common::IssueCertificate(pki_, name, common::CertRole::kAgent, pki_).ok());
    }
    ASSERT_TRUE(common::IssueCertificate(pki_, "viewer-1", common::CertRole::kViewer, pki_).ok());
    other_pki_ = dir_.Sub("other");
    ASSERT_TRUE(common::InitPki(other_pki_).ok());
    ASSERT_TRUE(
        common::IssueCertificate(other_pki_, "agent-1", common::CertRole::kAgent, other_pki_).ok());

    config_.listen_address = "127.0.0.1:0";
    config_.metrics_address = "127.0.0.1:0";
    config_.data_dir = dir_.Sub("data");
    config_.tls_ca = pki_ + "/ca.pem";
    config_.tls_cert = pki_ + "/coordinator.pem";
    config_.tls_key = pki_ + "/coordinator.key";
    config_.base_model_hash = kBaseHash;
    config_.min_participants = 2;
    config_.max_participants = 2;
    config_.lora_rank = kRank;
    config_.round_deadline_s = 120;
    config_.max_update_bytes = 1 << 20;
    config_.tick_ms = 20;
    config_.eval_grace_s = 60;
    config_.heartbeat_interval_ms = 1000;
    StartServer();
  }

  void TearDown() override {
    agents_.clear();
    if (server_) server_->Shutdown();
  }

  void StartServer() {
    ServerOptions options;
    options.out = &out_;
    auto server = CoordinatorServer::Start(config_, options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    ASSERT_GT(server_->port(), 0);
    ASSERT_GT(server_->metrics_port(), 0);
  }

  std::string Target() const { return "127.0.0.1:" + std::to_string(server_->port()); }

  FakeAgent* AddAgent(const std::string& name, const std::string& pki = "") {
    const std::string dir = pki.empty() ? pki_ : pki;
    agents_.push_back(std::make_unique<FakeAgent>(
        name, MakeChannel(Target(), pki_ + "/ca.pem", dir + "/" + name + ".pem",
                          dir + "/" + name + ".key")));
    return agents_.back().get();
  }

  grpc::Status AdminStatus(v1::StatusResponse* response, const std::string& name = "admin") {
    auto channel = MakeChannel(Target(), pki_ + "/ca.pem", pki_ + "/" + name + ".pem",
                               pki_ + "/" + name + ".key");
    auto stub = v1::Admin::NewStub(channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(In(10));
    return stub->Status(&ctx, v1::StatusRequest(), response);
  }

  v1::StatusResponse Status() {
    v1::StatusResponse s;
    grpc::Status rpc = AdminStatus(&s);
    EXPECT_TRUE(rpc.ok()) << rpc.error_message();
    return s;
  }

  // Connects agent-1 and agent-2 and reads their RoundTask for round 1.
  void StartRound() {
    a1_ = AddAgent("agent-1");
    a2_ = AddAgent("agent-2");
    ASSERT_TRUE(a1_->Connect().ok());
    ASSERT_TRUE(a2_->Connect().ok());
    for (FakeAgent* a : {a1_, a2_}) {
      v1::CoordinatorMessage m = a->Read();
      ASSERT_TRUE(m.has_round_task()) << a->id() << ": " << m.DebugString();
      task_ = m.round_task();
    }
    ASSERT_EQ(task_.round_id(), 1u);
  }

  std::string SealedFor(const common::TensorMap& update, const std::string& agent,
                        uint64_t round = 1, const std::string& base_version = "") {
    return SealUpdate(update, task_.seal_public_key(), round, agent, base_version);
  }

  // A rejection: status code, counter +1, no update stored, no version.
  void ExpectRejected(const grpc::Status& s, grpc::StatusCode code, uint64_t rejections_before,
                      size_t stored_updates = 0) {
    EXPECT_EQ(s.error_code(), code) << s.error_message();
    v1::StatusResponse st = Status();
    EXPECT_EQ(st.updates_rejected(), rejections_before + 1);
    EXPECT_GE(server_->manager()->metrics().Value(
                  "fedlora_updates_rejected_total",
                  {{"reason", absl::StatusCodeToString(static_cast<absl::StatusCode>(code))}}),
              1)
        << "rejections are counted on /metrics by status code";
    EXPECT_EQ(st.current_version(), "");
    EXPECT_EQ(*server_->store()->CountUpdates(1), stored_updates);
    ASSERT_GE(st.rounds_size(), 1);
    EXPECT_EQ(st.rounds(0).updates_received(), stored_updates);
  }

  TempDir dir_;
  std::string pki_, other_pki_;
  CoordinatorConfig config_;
  std::ostringstream out_;
  std::unique_ptr<CoordinatorServer> server_;
  std::vector<std::unique_ptr<FakeAgent>> agents_;
  FakeAgent* a1_ = nullptr;
  FakeAgent* a2_ = nullptr;
  v1::RoundTask task_;
};

TEST_F(ServerTest, OneFullRound) {
  StartRound();
  EXPECT_EQ(task_.base_version(), "");
  EXPECT_EQ(task_.lora().rank(), kRank);
  EXPECT_EQ(task_.max_update_bytes(), 1u << 20);
  EXPECT_EQ(task_.seal_public_key().size(), 32u);
  EXPECT_EQ(task_.seal_public_key(), a1_->welcome().seal_public_key());
  EXPECT_EQ(a1_->welcome().heartbeat_interval_ms(), 1000u);

  const common::TensorMap u1 = MakeLoraUpdate(kRank, 2, 64, 48, 1);
  const common::TensorMap u2 = MakeLoraUpdate(kRank, 2, 64, 48, 2);
  const std::string p1 = SealedFor(u1, "agent-1");
  const std::string p2 = SealedFor(u2, "agent-2");
  v1::SubmitUpdateResponse r1, r2;
  grpc::Status s1 = a1_->Submit(MakeHeader(1, "agent-1", "", 10, p1, 2.0, 3.0), p1, &r1, 8192);
  ASSERT_TRUE(s1.ok()) << s1.error_message();
  EXPECT_TRUE(r1.accepted());
  EXPECT_EQ(r1.bytes_received(), p1.size());
  v1::StatusResponse mid = Status();
  EXPECT_EQ(mid.current_phase(), "TRAIN");
  ASSERT_EQ(mid.rounds_size(), 1);
  EXPECT_EQ(mid.rounds(0).updates_received(), 1u);

  grpc::Status s2 = a2_->Submit(MakeHeader(1, "agent-2", "", 30, p2, 2.4, 3.4), p2, &r2, 1 << 20);
  ASSERT_TRUE(s2.ok()) << s2.error_message();

  v1::VersionNotice notice;
  for (FakeAgent* a : {a1_, a2_}) {
    v1::CoordinatorMessage m = a->Read();
    ASSERT_TRUE(m.has_version_notice()) << m.DebugString();
    notice = m.version_notice();
  }
  EXPECT_EQ(notice.version_id(), "v000001");
  EXPECT_EQ(notice.round_id(), 1u);

  const std::string page = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_EQ(page.rfind("HTTP/1.1 200 OK", 0), 0u) << page;
  EXPECT_NE(page.find("\nfedlora_updates_accepted_total 2\n"), std::string::npos) << page;
  EXPECT_NE(page.find("\nfedlora_rounds_published_total 1\n"), std::string::npos) << page;
  EXPECT_NE(page.find("\nfedlora_rounds_aborted_total 0\n"), std::string::npos) << page;
  EXPECT_NE(page.find("\nfedlora_agents_connected 2\n"), std::string::npos) << page;
  EXPECT_NE(page.find(absl::StrCat("\nfedlora_update_bytes_received_total ",
                                   p1.size() + p2.size(), "\n")),
            std::string::npos)
      << page;
  EXPECT_NE(page.find("\nfedlora_aggregation_seconds_count 1\n"), std::string::npos) << page;
  EXPECT_NE(page.find("\nfedlora_round_phase_seconds_count{phase=\"aggregate\"} 1\n"),
            std::string::npos)
      << page;
  EXPECT_EQ(HttpGet(server_->metrics_port(), "/healthz").rfind("HTTP/1.1 200 OK", 0), 0u);

  std::string blob_sha;
  auto blob = a1_->Fetch("v000001", 0, 0, &blob_sha);
  ASSERT_TRUE(blob.ok()) << blob.status();
  EXPECT_EQ(blob->size(), notice.size_bytes());
  EXPECT_EQ(common::Sha256Hex(*blob), notice.sha256());
  EXPECT_EQ(blob_sha, notice.sha256());
  const uint64_t half = blob->size() / 2;
  auto tail = a2_->Fetch("v000001", half, 1000);  // resume from the middle, small chunks
  ASSERT_TRUE(tail.ok()) << tail.status();
  EXPECT_EQ(*tail, blob->substr(half));

  common::Metadata meta;
  auto decoded = common::DecodeAdapterBlob(*blob, &meta);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(meta["fedlora.version"], "v000001");
  EXPECT_EQ(meta["fedlora.lora.rank"], std::to_string(kRank));
  EXPECT_EQ(meta["fedlora.lora.alpha"], "16");
  EXPECT_EQ(meta["fedlora.lora.target_modules"], "q_proj,v_proj");
  EXPECT_EQ(meta["fedlora.base_model_hash"], kBaseHash);
  const common::TensorMap ref = testing::NaiveWeightedMean({u1, u2}, {10, 30});
  ASSERT_EQ(decoded->size(), ref.size());
  for (const auto& [name, t] : ref) {
    const common::HostTensor& got = decoded->at(name);
    ASSERT_EQ(got.shape, t.shape) << name;
    float max_abs = 0;
    for (float v : t.data) max_abs = std::max(max_abs, std::fabs(v));
    const float tol = max_abs / 127.0f;  // q8_0: half a step of the block scale, and then some
    for (size_t i = 0; i < t.data.size(); ++i) {
      ASSERT_NEAR(got.data[i], t.data[i], tol) << name << "[" << i << "]";
    }
  }

  // Round 2 opens from v000001 right after the publish.
  for (FakeAgent* a : {a1_, a2_}) {
    v1::CoordinatorMessage m = a->Read();
    ASSERT_TRUE(m.has_round_task()) << m.DebugString();
    EXPECT_EQ(m.round_task().round_id(), 2u);
    EXPECT_EQ(m.round_task().base_version(), "v000001");
  }

  a1_->SendEval("v000001", 2.5);
  a2_->SendEval("v000001", 2.7);
  ASSERT_TRUE(WaitFor([&]() {
    v1::StatusResponse st = Status();
    return st.rounds_size() >= 1 && std::isfinite(st.rounds(0).eval_loss_after());
  }));
  server_->manager()->Sync();
  EXPECT_THAT(out_.str(),
              HasSubstr(absl::StrCat("round 1: participants=2 train_loss=2.2000 eval_loss 3.2000 "
                                     "-> 2.6000 bytes_up/agent=",
                                     (p1.size() + p2.size()) / 2,
                                     " bytes_down/agent=", (blob->size() + blob->size() - half) / 2,
                                     " version=v000001")));

  v1::StatusResponse st = Status();
  EXPECT_EQ(st.current_version(), "v000001");
  EXPECT_EQ(st.current_round(), 2u);
  EXPECT_EQ(st.current_phase(), "TRAIN");
  EXPECT_EQ(st.updates_rejected(), 0u);
  ASSERT_EQ(st.rounds_size(), 2);
  const v1::RoundInfo& r = st.rounds(0);
  EXPECT_EQ(r.phase(), "DONE");
  EXPECT_EQ(r.participants(), 2u);
  EXPECT_EQ(r.updates_received(), 2u);
  EXPECT_EQ(r.version_id(), "v000001");
  EXPECT_NEAR(r.mean_train_loss(), 2.2, 1e-9);
  EXPECT_NEAR(r.eval_loss_before(), 3.2, 1e-9);
  EXPECT_NEAR(r.eval_loss_after(), 2.6, 1e-9);
  EXPECT_EQ(r.bytes_up(), p1.size() + p2.size());
  EXPECT_EQ(r.bytes_down(), blob->size() + (blob->size() - half));
  ASSERT_EQ(st.agents_size(), 2);
  EXPECT_TRUE(st.agents(0).online());
  EXPECT_EQ(st.agents(0).current_version(), "v000001");

  // The published round's updates are gone; the version is stored.
  EXPECT_EQ(*server_->store()->CountUpdates(1), 0u);
  auto version = server_->store()->GetVersion("v000001");
  ASSERT_TRUE(version.ok() && version->has_value());
  EXPECT_EQ((*version)->sha256, notice.sha256());
  EXPECT_EQ((*version)->num_examples, 40u);

  // Updates for the closed round are refused; unknown versions / offsets too.
  grpc::Status late = a1_->Submit(MakeHeader(1, "agent-1", "", 10, p1), p1);
  EXPECT_EQ(late.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << late.error_message();
  EXPECT_EQ(Status().updates_rejected(), 1u);
  EXPECT_EQ(a1_->Fetch("v000009").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(a1_->Fetch("v000001", blob->size() + 1).status().code(), absl::StatusCode::kOutOfRange);
}

TEST_F(ServerTest, MetricsAddressInUseFailsStartCleanly) {
  CoordinatorConfig config = config_;
  config.data_dir = dir_.Sub("data2");
  config.metrics_address = "127.0.0.1:" + std::to_string(server_->metrics_port());
  auto second = CoordinatorServer::Start(config, ServerOptions{nullptr, &out_, {}});
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable) << second.status();
  EXPECT_EQ(HttpGet(server_->metrics_port(), "/healthz").rfind("HTTP/1.1 200 OK", 0), 0u);
}

TEST_F(ServerTest, RejectsWrongShape) {
  StartRound();
  const std::string p = SealedFor(MakeLoraUpdate(kRank / 2, 1, 16, 16, 1), "agent-1");
  ExpectRejected(a1_->Submit(MakeHeader(1, "agent-1", "", 10, p), p),
                 grpc::StatusCode::INVALID_ARGUMENT, 0);
}

TEST_F(ServerTest, RejectsShapeDifferentFromFirstAcceptedUpdate) {
  StartRound();
  const std::string p1 = SealedFor(MakeLoraUpdate(kRank, 1, 16, 16, 1), "agent-1");
  ASSERT_TRUE(a1_->Submit(MakeHeader(1, "agent-1", "", 10, p1), p1).ok());
  const std::string p2 = SealedFor(MakeLoraUpdate(kRank, 1, 17, 16, 2), "agent-2");
  grpc::Status s = a2_->Submit(MakeHeader(1, "agent-2", "", 10, p2), p2);
  EXPECT_THAT(s.error_message(), HasSubstr("expected shape"));
  ExpectRejected(s, grpc::StatusCode::INVALID_ARGUMENT, 0, /*stored_updates=*/1);
}

TEST_F(ServerTest, RejectsNaNUpdate) {
  StartRound();
  common::TensorMap u = MakeLoraUpdate(kRank, 1, 16, 16, 1);
  u.begin()->second.data[3] = std::numeric_limits<float>::quiet_NaN();
  const std::string p = SealedFor(u, "agent-1");
  grpc::Status s = a1_->Submit(MakeHeader(1, "agent-1", "", 10, p), p);
  EXPECT_THAT(s.error_message(), HasSubstr("finite"));
  ExpectRejected(s, grpc::StatusCode::INVALID_ARGUMENT, 0);
}

TEST_F(ServerTest, RejectsOversizePayload) {
  StartRound();
  const std::string p = SealedFor(MakeLoraUpdate(kRank, 1, 16, 16, 1), "agent-1");
  v1::UpdateHeader h = MakeHeader(1, "agent-1", "", 10, p);
  h.set_total_size((1 << 20) + 1);  // claims more than max_update_bytes
  ExpectRejected(a1_->Submit(h, p), grpc::StatusCode::RESOURCE_EXHAUSTED, 0);
  // A real payload over the limit, honestly declared.
  const std::string big = SealedFor(MakeLoraUpdate(kRank, 40, 512, 512, 3), "agent-1");
  ASSERT_GT(big.size(), 1u << 20);
  ExpectRejected(a1_->Submit(MakeHeader(1, "agent-1", "", 10, big), big, nullptr, 1 << 20),
                 grpc::StatusCode::RESOURCE_EXHAUSTED, 1);
}

TEST_F(ServerTest, RejectsBadChunkChecksum) {
  StartRound();
  const std::string p = SealedFor(MakeLoraUpdate(kRank, 2, 64, 64, 1), "agent-1");
  ASSERT_GT(p.size(), 4096u * 2);
  grpc::Status s = a1_->Submit(MakeHeader(1, "agent-1", "", 10, p), p, nullptr, 4096,
                               [](v1::UpdateChunk& c, int i) {
                                 if (i == 1) c.set_chunk_sha256(std::string(64, '0'));
                               });
  EXPECT_THAT(s.error_message(), HasSubstr("SHA-256"));
  ExpectRejected(s, grpc::StatusCode::INVALID_ARGUMENT, 0);
}

TEST_F(ServerTest, RejectsModifiedPayloadAndWrongAad) {
  StartRound();
  const std::string p = SealedFor(MakeLoraUpdate(kRank, 1, 16, 16, 1), "agent-1");
  // Valid chunk checksums, but the payload differs from payload_sha256.
  grpc::Status s = a1_->Submit(MakeHeader(1, "agent-1", "", 10, p), p, nullptr, 4096,
                               [](v1::UpdateChunk& c, int i) {
                                 if (i == 0) {
                                   std::string d = c.data();
                                   d[40] ^= 1;
                                   c.set_data(d);
                                   c.set_chunk_sha256(common::Sha256Hex(d));
                                 }
                               });
  ExpectRejected(s, grpc::StatusCode::INVALID_ARGUMENT, 0);
  // Sealed for another round's AAD: it does not open.
  const std::string other = SealedFor(MakeLoraUpdate(kRank, 1, 16, 16, 1), "agent-1", 7);
  grpc::Status s2 = a1_->Submit(MakeHeader(1, "agent-1", "", 10, other), other);
  EXPECT_THAT(s2.error_message(), HasSubstr("does not open"));
  ExpectRejected(s2, grpc::StatusCode::INVALID_ARGUMENT, 1);
}

// The agent's connection breaks halfway through an upload: nothing is stored, the
// round stays open, and the same agent's complete retry is accepted once.
TEST_F(ServerTest, UploadCutMidwayStoresNothingAndTheRetryIsAccepted) {
  StartRound();
  const std::string p = SealedFor(MakeLoraUpdate(kRank, 2, 64, 64, 1), "agent-1");
  ASSERT_GT(p.size(), 4096u * 4);
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(30));
    v1::SubmitUpdateResponse response;
    auto writer = a1_->stub()->SubmitUpdate(&ctx, &response);
    for (int i = 0; i < 2; ++i) {
      v1::UpdateChunk c;
      if (i == 0) *c.mutable_header() = MakeHeader(1, "agent-1", "", 10, p);
      c.set_offset(i * 4096);
      c.set_data(p.substr(i * 4096, 4096));
      c.set_chunk_sha256(common::Sha256Hex(c.data()));
      ASSERT_TRUE(writer->Write(c));
    }
    ctx.TryCancel();  // the connection is gone
    EXPECT_FALSE(writer->Finish().ok());
  }
  server_->manager()->Sync();
  EXPECT_EQ(*server_->store()->CountUpdates(1), 0u);
  ASSERT_TRUE(a1_->Submit(MakeHeader(1, "agent-1", "", 10, p), p).ok());
  EXPECT_EQ(*server_->store()->CountUpdates(1), 1u);
  ExpectRejected(a1_->Submit(MakeHeader(1, "agent-1", "", 10, p), p),
                 grpc::StatusCode::ALREADY_EXISTS, Status().updates_rejected(),
                 /*stored_updates=*/1);
}

TEST_F(ServerTest, RejectsDuplicateUpdate) {
  StartRound();
  const std::string p = SealedFor(MakeLoraUpdate(kRank, 1, 16, 16, 1), "agent-1");
  ASSERT_TRUE(a1_->Submit(MakeHeader(1, "agent-1", "", 10, p), p).ok());
  ExpectRejected(a1_->Submit(MakeHeader(1, "agent-1", "", 10, p), p),
                 grpc::StatusCode::ALREADY_EXISTS, 0, /*stored_updates=*/1);
}

TEST_F(ServerTest, RejectsUpdateForRoundThatIsNotOpen) {
  StartRound();
  const std::string p = SealedFor(MakeLoraUpdate(kRank, 1, 16, 16, 1), "agent-1", 5);
  ExpectRejected(a1_->Submit(MakeHeader(5, "agent-1", "", 10, p), p),
                 grpc::StatusCode::FAILED_PRECONDITION, 0);
}

TEST_F(ServerTest, RejectsWrongIdentityBaseAndNonParticipant) {
  StartRound();
  const std::string p = SealedFor(MakeLoraUpdate(kRank, 1, 16, 16, 1), "agent-2");
  // agent-1 submitting in agent-2's name.
  ExpectRejected(a1_->Submit(MakeHeader(1, "agent-2", "", 10, p), p),
                 grpc::StatusCode::PERMISSION_DENIED, 0);
  // Wrong base version.
  const std::string pv = SealedFor(MakeLoraUpdate(kRank, 1, 16, 16, 1), "agent-1", 1, "v000042");
  ExpectRejected(a1_->Submit(MakeHeader(1, "agent-1", "v000042", 10, pv), pv),
                 grpc::StatusCode::FAILED_PRECONDITION, 1);
  // agent-3 is online but not a participant (max_participants = 2).
  FakeAgent* a3 = AddAgent("agent-3");
  ASSERT_TRUE(a3->Connect().ok());
  const std::string p3 = SealedFor(MakeLoraUpdate(kRank, 1, 16, 16, 1), "agent-3");
  ExpectRejected(a3->Submit(MakeHeader(1, "agent-3", "", 10, p3), p3),
                 grpc::StatusCode::PERMISSION_DENIED, 2);
}

TEST_F(ServerTest, TlsRequiresFleetClientCertificate) {
  // No client certificate.
  {
    grpc::SslCredentialsOptions options;
    options.pem_root_certs = *common::ReadFileToString(pki_ + "/ca.pem");
    auto stub = v1::Admin::NewStub(grpc::CreateChannel(Target(), grpc::SslCredentials(options)));
    grpc::ClientContext ctx;
    ctx.set_deadline(In(5));
    v1::StatusResponse r;
    EXPECT_FALSE(stub->Status(&ctx, v1::StatusRequest(), &r).ok());
  }
  // A certificate from another CA.
  {
    FakeAgent* stranger = AddAgent("agent-1", other_pki_);
    EXPECT_FALSE(stranger->Connect().ok());
  }
  v1::StatusResponse st = Status();
  EXPECT_EQ(st.agents_size(), 0);
}

TEST_F(ServerTest, RolesAreEnforced) {
  v1::StatusResponse r;
  grpc::Status agent_on_admin = AdminStatus(&r, "agent-1");
  EXPECT_EQ(agent_on_admin.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(agent_on_admin.error_message(), HasSubstr("role 'agent'"));
  EXPECT_TRUE(AdminStatus(&r, "viewer-1").ok());
  // An admin certificate may not act as an agent.
  FakeAgent* admin_as_agent = AddAgent("admin");
  EXPECT_EQ(admin_as_agent->Connect().error_code(), grpc::StatusCode::PERMISSION_DENIED);
}

TEST_F(ServerTest, HelloIsChecked) {
  FakeAgent* liar = AddAgent("agent-1");
  grpc::Status s = liar->Connect("agent-2");
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << s.error_message();
  FakeAgent* wrong_model = AddAgent("agent-2");
  s = wrong_model->Connect("", std::string(64, 'c'));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_EQ(Status().agents_size(), 0);
}

TEST_F(ServerTest, RestartResumesOpenRoundWithStoredUpdates) {
  StartRound();
  const common::TensorMap u1 = MakeLoraUpdate(kRank, 1, 32, 32, 1);
  const common::TensorMap u2 = MakeLoraUpdate(kRank, 1, 32, 32, 2);
  const std::string p1 = SealedFor(u1, "agent-1");
  ASSERT_TRUE(a1_->Submit(MakeHeader(1, "agent-1", "", 5, p1), p1).ok());
  agents_.clear();
  server_->Shutdown();
  server_.reset();

  StartServer();
  v1::StatusResponse st = Status();
  EXPECT_EQ(st.current_round(), 1u);
  EXPECT_EQ(st.current_phase(), "TRAIN");
  ASSERT_EQ(st.rounds_size(), 1);
  EXPECT_EQ(st.rounds(0).updates_received(), 1u);

  FakeAgent* b1 = AddAgent("agent-1");
  FakeAgent* b2 = AddAgent("agent-2");
  ASSERT_TRUE(b1->Connect().ok());
  ASSERT_TRUE(b2->Connect().ok());
  EXPECT_EQ(b2->welcome().seal_public_key(), task_.seal_public_key());  // key persisted
  v1::CoordinatorMessage m = b2->Read();  // agent-2 still owes its update
  ASSERT_TRUE(m.has_round_task());
  EXPECT_EQ(m.round_task().round_id(), 1u);
  const std::string p2 = SealedFor(u2, "agent-2");
  ASSERT_TRUE(b2->Submit(MakeHeader(1, "agent-2", "", 15, p2), p2).ok());
  m = b1->Read();  // agent-1 got no task (it already submitted): next is the notice
  ASSERT_TRUE(m.has_version_notice()) << m.DebugString();
  auto blob = b1->Fetch(m.version_notice().version_id());
  ASSERT_TRUE(blob.ok());
  auto decoded = common::DecodeAdapterBlob(*blob);
  ASSERT_TRUE(decoded.ok());
  const common::TensorMap ref = testing::NaiveWeightedMean({u1, u2}, {5, 15});
  for (const auto& [name, t] : ref) {
    for (size_t i = 0; i < t.data.size(); ++i) {
      ASSERT_NEAR(decoded->at(name).data[i], t.data[i], 0.01) << name;
    }
  }
}

// With `rounds` set, the server reports the summary and calls on_finished once the
// last round is evaluated; Shutdown() from the caller's thread then completes.
TEST_F(ServerTest, RoundsLimitFinishesAfterEvalReports) {
  server_->Shutdown();
  server_.reset();
  config_.rounds = 1;
  std::atomic<bool> finished{false};
  ServerOptions options;
  options.out = &out_;
  options.on_finished = [&]() { finished = true; };
  auto server = CoordinatorServer::Start(config_, options);
  ASSERT_TRUE(server.ok()) << server.status();
  server_ = std::move(*server);
  StartRound();
  for (FakeAgent* a : {a1_, a2_}) {
    const std::string p = SealedFor(MakeLoraUpdate(kRank, 1, 16, 16, a == a1_ ? 1 : 2), a->id());
    ASSERT_TRUE(a->Submit(MakeHeader(1, a->id(), "", 10, p, 2.0, 3.0), p).ok());
  }
  for (FakeAgent* a : {a1_, a2_}) ASSERT_TRUE(a->Read().has_version_notice());
  a1_->SendEval("v000001", 2.0);
  EXPECT_FALSE(finished.load());
  a2_->SendEval("v000001", 2.5);
  ASSERT_TRUE(WaitFor([&]() { return finished.load(); }));
  server_->Shutdown();  // closes the sessions, stops the server, flushes the store
  EXPECT_THAT(out_.str(), HasSubstr("round 1: participants=2"));
  EXPECT_THAT(out_.str(), HasSubstr("{\"rounds\":1,\"eval_loss\":[3.0,2.25],"
                                    "\"versions\":[\"v000001\"],\"bytes_up\":"));
  EXPECT_THAT(out_.str(),
              HasSubstr(",\"bytes_down\":0,\"participants\":[2],\"train_loss\":[2.0]}"));
}

TEST_F(ServerTest, RejectsMalformedChunkStreams) {
  StartRound();
  const std::string p = SealedFor(MakeLoraUpdate(kRank, 2, 64, 64, 1), "agent-1");
  ASSERT_GT(p.size(), 3 * 4096u);
  const v1::UpdateHeader h = MakeHeader(1, "agent-1", "", 10, p);
  uint64_t rejected = 0;
  // The header again on a later chunk.
  grpc::Status s = a1_->Submit(h, p, nullptr, 4096, [&](v1::UpdateChunk& c, int i) {
    if (i == 2) *c.mutable_header() = h;
  });
  EXPECT_THAT(s.error_message(), HasSubstr("only the first chunk"));
  ExpectRejected(s, grpc::StatusCode::INVALID_ARGUMENT, rejected++);
  // A gap in the offsets.
  s = a1_->Submit(h, p, nullptr, 4096, [&](v1::UpdateChunk& c, int i) {
    if (i == 1) c.set_offset(c.offset() + 1);
  });
  EXPECT_THAT(s.error_message(), HasSubstr("contiguous"));
  ExpectRejected(s, grpc::StatusCode::INVALID_ARGUMENT, rejected++);
  // A payload shorter than total_size.
  v1::UpdateHeader longer = h;
  longer.set_total_size(p.size() + 10);
  s = a1_->Submit(longer, p);
  EXPECT_THAT(s.error_message(), HasSubstr("ended after"));
  ExpectRejected(s, grpc::StatusCode::INVALID_ARGUMENT, rejected++);
  // More data than total_size.
  v1::UpdateHeader shorter = h;
  shorter.set_total_size(p.size() - 10);
  s = a1_->Submit(shorter, p);
  EXPECT_THAT(s.error_message(), HasSubstr("more data than"));
  ExpectRejected(s, grpc::StatusCode::INVALID_ARGUMENT, rejected++);
  // No header at all.
  s = a1_->Submit(h, p, nullptr, 4096, [&](v1::UpdateChunk& c, int) { c.clear_header(); });
  ExpectRejected(s, grpc::StatusCode::INVALID_ARGUMENT, rejected++);
  // Zero examples (no FedAvg weight).
  s = a1_->Submit(MakeHeader(1, "agent-1", "", 0, p), p);
  ExpectRejected(s, grpc::StatusCode::INVALID_ARGUMENT, rejected++);
  // A well-formed update still goes through afterwards.
  EXPECT_TRUE(a1_->Submit(h, p).ok());
}

TEST_F(ServerTest, RejectsChunkOverOneMiB) {
  server_->Shutdown();
  server_.reset();
  config_.max_update_bytes = 4 << 20;
  StartServer();
  StartRound();
  const std::string big((1 << 20) + 1, 'x');
  grpc::Status s = a1_->Submit(MakeHeader(1, "agent-1", "", 10, big), big, nullptr, big.size());
  EXPECT_THAT(s.error_message(), HasSubstr("at most 1048576"));
  ExpectRejected(s, grpc::StatusCode::INVALID_ARGUMENT, 0);
}

TEST_F(ServerTest, NonAgentCertificatesCannotUseCoordinatorCalls) {
  StartRound();
  FakeAgent* admin = AddAgent("admin");
  const std::string p = SealedFor(MakeLoraUpdate(kRank, 1, 16, 16, 1), "admin");
  ExpectRejected(admin->Submit(MakeHeader(1, "admin", "", 10, p), p),
                 grpc::StatusCode::PERMISSION_DENIED, 0);
  EXPECT_EQ(admin->Fetch("v000001").status().code(), absl::StatusCode::kPermissionDenied);
}

// Sealed correctly, but the plaintext is not a valid safetensors file.
TEST_F(ServerTest, RejectsSealedGarbage) {
  StartRound();
  uint64_t rejected = 0;
  std::string bad_header(8, '\0');
  bad_header[0] = 9;
  bad_header += "{bad json";
  for (const std::string& plain :
       {std::string("not safetensors"), bad_header, std::string(100, '\xff'), std::string()}) {
    auto sealed = common::SealToPublicKey(task_.seal_public_key(), plain,
                                          UpdateAad(1, "agent-1", kBaseHash, ""));
    ASSERT_TRUE(sealed.ok());
    grpc::Status s = a1_->Submit(MakeHeader(1, "agent-1", "", 10, *sealed), *sealed);
    EXPECT_THAT(s.error_message(), HasSubstr("safetensors"));
    ExpectRejected(s, grpc::StatusCode::INVALID_ARGUMENT, rejected++);
  }
}

// Many agents submitting concurrently: every update is counted once and the
// published version is their weighted mean.
TEST_F(ServerTest, ManyConcurrentAgents) {
  server_->Shutdown();
  server_.reset();
  constexpr int kAgents = 12;
  config_.min_participants = kAgents;
  config_.max_participants = kAgents;
  config_.secure_aggregation = "off";  // the sealed, example-weighted path under load
  StartServer();
  std::vector<FakeAgent*> agents;
  for (int i = 0; i < kAgents; ++i) {
    const std::string name = "many-" + std::to_string(i);
    ASSERT_TRUE(common::IssueCertificate(pki_, name, common::CertRole::kAgent, pki_).ok());
    agents.push_back(AddAgent(name));
  }
  std::vector<common::TensorMap> updates(kAgents);
  std::vector<double> weights(kAgents);
  std::vector<std::string> notices(kAgents);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int i = 0; i < kAgents; ++i) {
    updates[i] = MakeLoraUpdate(kRank, 2, 32, 32, 1000 + i);
    weights[i] = 1 + i;
    threads.emplace_back([&, i]() {
      FakeAgent* a = agents[i];
      if (!a->Connect().ok()) {
        ++failures;
        return;
      }
      v1::CoordinatorMessage task = a->Read();
      if (!task.has_round_task()) {
        ++failures;
        return;
      }
      const std::string p =
          SealUpdate(updates[i], task.round_task().seal_public_key(), 1, a->id(), "");
      if (!a->Submit(MakeHeader(1, a->id(), "", static_cast<uint64_t>(weights[i]), p), p, nullptr,
                     2048)
               .ok()) {
        ++failures;
        return;
      }
      v1::CoordinatorMessage notice = a->Read();
      notices[i] = notice.version_notice().sha256();
    });
  }
  for (auto& t : threads) t.join();
  ASSERT_EQ(failures.load(), 0);
  for (const std::string& sha : notices) EXPECT_EQ(sha, notices.front());
  auto blob = agents[0]->Fetch("v000001");
  ASSERT_TRUE(blob.ok());
  EXPECT_EQ(common::Sha256Hex(*blob), notices.front());
  auto decoded = common::DecodeAdapterBlob(*blob);
  ASSERT_TRUE(decoded.ok());
  const common::TensorMap ref = testing::NaiveWeightedMean(updates, weights);
  for (const auto& [name, t] : ref) {
    float max_abs = 0;
    for (float v : t.data) max_abs = std::max(max_abs, std::fabs(v));
    for (size_t i = 0; i < t.data.size(); ++i) {
      ASSERT_NEAR(decoded->at(name).data[i], t.data[i], max_abs / 127.0f) << name;
    }
  }
  v1::StatusResponse st = Status();
  ASSERT_GE(st.rounds_size(), 1);
  EXPECT_EQ(st.rounds(0).updates_received(), static_cast<uint32_t>(kAgents));
  EXPECT_EQ(st.updates_rejected(), 0u);
  EXPECT_EQ((*server_->store()->GetVersion("v000001"))->contributors.size(),
            static_cast<size_t>(kAgents));
}

}  // namespace
}  // namespace fedlora::coordinator
