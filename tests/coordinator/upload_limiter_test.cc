// The coordinator-wide upload bound (coordinator/upload_limiter.h): the limiter on
// its own, and the real CoordinatorServer with max_concurrent_uploads = 1.
#include "coordinator/upload_limiter.h"

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <sstream>
#include <thread>
#include <vector>

#include "common/crypto/crypto.h"
#include "common/crypto/pki.h"
#include "coordinator/server.h"
#include "fedlora/v1/fedlora.grpc.pb.h"
#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

namespace v1 = ::fedlora::v1;
using ::testing::ElementsAre;
using testing::In;
using testing::kBaseHash;
using testing::MakeChannel;
using testing::MakeHeader;
using testing::MakeLoraUpdate;
using testing::SealUpdate;
using testing::TempDir;
using testing::WaitFor;

constexpr uint32_t kRank = 4;

// ------------------------------------------------------------------ the limiter alone

TEST(UploadLimiterTest, GrantsUpToTheBoundThenHandsReleasedSlotsToWaitersInOrder) {
  MetricsRegistry metrics;
  UploadLimiter limiter(2, &metrics);
  std::vector<int> granted;
  for (int i = 0; i < 5; ++i) limiter.Acquire([&granted, i]() { granted.push_back(i); });
  EXPECT_THAT(granted, ElementsAre(0, 1));
  EXPECT_EQ(limiter.in_flight(), 2u);
  EXPECT_EQ(limiter.waiting(), 3u);
  EXPECT_EQ(metrics.Value("fedlora_uploads_in_flight"), 2);
  EXPECT_EQ(metrics.Value("fedlora_uploads_waiting"), 3);
  limiter.Release();
  EXPECT_THAT(granted, ElementsAre(0, 1, 2));
  EXPECT_EQ(limiter.in_flight(), 2u);
  limiter.Release();
  limiter.Release();
  EXPECT_THAT(granted, ElementsAre(0, 1, 2, 3, 4));
  limiter.Release();
  limiter.Release();
  EXPECT_EQ(limiter.in_flight(), 0u);
  EXPECT_EQ(limiter.waiting(), 0u);
  EXPECT_EQ(limiter.peak_in_flight(), 2u);
  EXPECT_EQ(limiter.peak_waiting(), 3u);
  EXPECT_EQ(metrics.Value("fedlora_uploads_in_flight"), 0);
  EXPECT_EQ(metrics.Value("fedlora_uploads_in_flight_peak"), 2);
  EXPECT_EQ(metrics.Value("fedlora_uploads_waiting_peak"), 3);
}

TEST(UploadLimiterTest, CancelRemovesOnlyWaiters) {
  UploadLimiter limiter(1);
  int runs = 0;
  const uint64_t holder = limiter.Acquire([&]() { ++runs; });
  const uint64_t waiter = limiter.Acquire([&]() { runs += 100; });
  const uint64_t second = limiter.Acquire([&]() { runs += 10; });
  EXPECT_FALSE(limiter.Cancel(holder)) << "a granted ticket is released, not cancelled";
  EXPECT_TRUE(limiter.Cancel(waiter));
  EXPECT_FALSE(limiter.Cancel(waiter)) << "twice";
  EXPECT_FALSE(limiter.Cancel(12345)) << "unknown ticket";
  EXPECT_EQ(limiter.waiting(), 1u);
  limiter.Release();
  EXPECT_EQ(runs, 11) << "the cancelled waiter never runs; the next one does";
  EXPECT_FALSE(limiter.Cancel(second));
  limiter.Release();
  EXPECT_EQ(limiter.in_flight(), 0u);
}

TEST(UploadLimiterTest, ZeroIsTreatedAsOne) {
  UploadLimiter limiter(0);
  EXPECT_EQ(limiter.max_in_flight(), 1u);
}

TEST(UploadLimiterTest, ConcurrentUsersNeverExceedTheBound) {
  UploadLimiter limiter(3);
  std::atomic<int> holders{0};
  std::atomic<int> worst{0};
  std::atomic<int> done{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&]() {
      for (int i = 0; i < 200; ++i) {
        std::atomic<bool> mine{false};
        limiter.Acquire([&]() {
          const int now = ++holders;
          int w = worst.load();
          while (now > w && !worst.compare_exchange_weak(w, now)) {
          }
          mine = true;
        });
        // The grant may run on another thread's Release: wait for it (no sleeps).
        while (!mine.load()) std::this_thread::yield();
        --holders;
        limiter.Release();
        ++done;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(done.load(), 1600);
  EXPECT_LE(worst.load(), 3);
  EXPECT_LE(limiter.peak_in_flight(), 3u);
  EXPECT_EQ(limiter.in_flight(), 0u);
  EXPECT_EQ(limiter.waiting(), 0u);
}

// ------------------------------------------------------------------ the real server

class UploadBoundServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pki_ = dir_.Sub("pki");
    ASSERT_TRUE(common::InitPki(pki_).ok());
    for (const std::string name : {"agent-1", "agent-2", "agent-3"}) {
      ASSERT_TRUE(common::IssueCertificate(pki_, name, common::CertRole::kAgent, pki_).ok());
    }
    config_.listen_address = "127.0.0.1:0";
    config_.data_dir = dir_.Sub("data");
    config_.tls_ca = pki_ + "/ca.pem";
    config_.tls_cert = pki_ + "/coordinator.pem";
    config_.tls_key = pki_ + "/coordinator.key";
    config_.base_model_hash = kBaseHash;
    config_.min_participants = 3;
    config_.max_participants = 3;
    config_.secure_aggregation = "off";
    config_.lora_rank = kRank;
    config_.round_deadline_s = 300;
    config_.tick_ms = 20;
    config_.max_concurrent_uploads = 1;
    ServerOptions options;
    options.out = &out_;
    auto server = CoordinatorServer::Start(config_, options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    const std::string target = "127.0.0.1:" + std::to_string(server_->port());
    for (const std::string name : {"agent-1", "agent-2", "agent-3"}) {
      Agent a;
      a.id = name;
      a.stub = v1::Coordinator::NewStub(
          MakeChannel(target, pki_ + "/ca.pem", pki_ + "/" + name + ".pem", pki_ + "/" + name + ".key"));
      agents_.push_back(std::move(a));
    }
    // Sessions: Hello, Welcome, then the round-1 task.
    for (Agent& a : agents_) {
      a.session_ctx = std::make_unique<grpc::ClientContext>();
      a.session_ctx->set_deadline(In(120));
      a.session = a.stub->Session(a.session_ctx.get());
      v1::AgentMessage hello;
      hello.mutable_hello()->set_agent_id(a.id);
      hello.mutable_hello()->set_base_model_hash(kBaseHash);
      hello.mutable_hello()->set_num_train_examples(10);
      ASSERT_TRUE(a.session->Write(hello));
      v1::CoordinatorMessage m;
      ASSERT_TRUE(a.session->Read(&m));
      ASSERT_TRUE(m.has_welcome()) << m.DebugString();
    }
    for (Agent& a : agents_) {
      v1::CoordinatorMessage m;
      ASSERT_TRUE(a.session->Read(&m));
      ASSERT_TRUE(m.has_round_task()) << a.id << ": " << m.DebugString();
      task_ = m.round_task();
      a.update = MakeLoraUpdate(kRank, 2, 128, 128, 7 + a.id.size() + a.id.back());
      a.payload = SealUpdate(a.update, task_.seal_public_key(), 1, a.id, "");
      ASSERT_GT(a.payload.size(), 3 * kChunk) << "the payload needs several chunks";
    }
  }

  void TearDown() override {
    for (Agent& a : agents_) {
      if (a.session_ctx) a.session_ctx->TryCancel();
    }
    if (server_) server_->Shutdown();
  }

  static constexpr size_t kChunk = 4096;

  struct Agent {
    std::string id;
    std::unique_ptr<v1::Coordinator::Stub> stub;
    std::unique_ptr<grpc::ClientContext> session_ctx;
    std::unique_ptr<grpc::ClientReaderWriter<v1::AgentMessage, v1::CoordinatorMessage>> session;
    common::TensorMap update;
    std::string payload;
  };

  static v1::UpdateChunk Chunk(const Agent& a, size_t offset) {
    v1::UpdateChunk c;
    if (offset == 0) *c.mutable_header() = MakeHeader(1, a.id, "", 10, a.payload);
    c.set_offset(offset);
    c.set_data(a.payload.substr(offset, kChunk));
    c.set_chunk_sha256(common::Sha256Hex(c.data()));
    return c;
  }

  // Streams the whole payload; `after_first` runs after the first chunk is written.
  static grpc::Status Upload(Agent& a, grpc::ClientContext* ctx,
                             const std::function<void()>& after_first = nullptr) {
    v1::SubmitUpdateResponse response;
    auto writer = a.stub->SubmitUpdate(ctx, &response);
    for (size_t offset = 0; offset < a.payload.size(); offset += kChunk) {
      if (!writer->Write(Chunk(a, offset))) break;
      if (offset == 0 && after_first) after_first();
    }
    writer->WritesDone();
    grpc::Status s = writer->Finish();
    if (s.ok() && !response.accepted()) {
      return grpc::Status(grpc::StatusCode::INTERNAL, "not accepted: " + response.message());
    }
    return s;
  }

  const UploadLimiter& limiter() { return server_->upload_limiter(); }
  double Metric(const std::string& name) { return server_->manager()->metrics().Value(name); }

  TempDir dir_;
  std::string pki_;
  CoordinatorConfig config_;
  std::ostringstream out_;
  std::unique_ptr<CoordinatorServer> server_;
  std::vector<Agent> agents_;
  v1::RoundTask task_;
};

TEST_F(UploadBoundServerTest, ThreeConcurrentUploadsWithBoundOneAllSucceedOneAtATime) {
  ASSERT_EQ(limiter().max_in_flight(), 1u);
  // agent-1 takes the only slot and stalls after its first chunk until agent-2 and
  // agent-3 are both waiting: three uploads are open at once.
  grpc::Status s1, s2, s3;
  std::thread t1([&]() {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(120));
    s1 = Upload(agents_[0], &ctx, [&]() {
      EXPECT_TRUE(WaitFor([&]() { return limiter().waiting() == 2; },
                          std::chrono::milliseconds(60000)))
          << "the other two uploads never waited";
    });
  });
  ASSERT_TRUE(WaitFor([&]() { return limiter().in_flight() == 1; }, std::chrono::milliseconds(60000)));
  std::thread t2([&]() {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(120));
    s2 = Upload(agents_[1], &ctx);
  });
  std::thread t3([&]() {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(120));
    s3 = Upload(agents_[2], &ctx);
  });
  t1.join();
  t2.join();
  t3.join();
  EXPECT_TRUE(s1.ok()) << s1.error_message();
  EXPECT_TRUE(s2.ok()) << s2.error_message();
  EXPECT_TRUE(s3.ok()) << s3.error_message();
  EXPECT_EQ(limiter().peak_in_flight(), 1u) << "never more than one payload buffered";
  EXPECT_EQ(limiter().peak_waiting(), 2u);
  EXPECT_EQ(Metric("fedlora_uploads_in_flight_peak"), 1);
  EXPECT_EQ(Metric("fedlora_uploads_waiting_peak"), 2);
  // The round completes with all three updates (nothing lost).
  for (Agent& a : agents_) {
    v1::CoordinatorMessage m;
    ASSERT_TRUE(a.session->Read(&m));
    ASSERT_TRUE(m.has_version_notice()) << m.DebugString();
    EXPECT_EQ(m.version_notice().round_id(), 1u);
  }
  auto version = server_->store()->GetVersion("v000001");
  ASSERT_TRUE(version.ok() && version->has_value());
  EXPECT_EQ((*version)->contributors.size(), 3u);
  EXPECT_EQ(server_->manager()->rejections(), 0u);
  ASSERT_TRUE(WaitFor([&]() { return limiter().in_flight() == 0 && limiter().waiting() == 0; }));
  EXPECT_EQ(Metric("fedlora_uploads_in_flight"), 0);
}

TEST_F(UploadBoundServerTest, AWaiterPastItsDeadlineIsFinishedAndFreesNothingItDidNotHold) {
  // agent-1 holds the slot; agent-2 waits with a short deadline and gives up.
  std::atomic<bool> waiter_done{false};
  grpc::Status s1, s2;
  std::thread t1([&]() {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(120));
    s1 = Upload(agents_[0], &ctx, [&]() {
      EXPECT_TRUE(WaitFor([&]() { return waiter_done.load(); }, std::chrono::milliseconds(60000)));
    });
  });
  ASSERT_TRUE(WaitFor([&]() { return limiter().in_flight() == 1; }, std::chrono::milliseconds(60000)));
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(1500));
    s2 = Upload(agents_[1], &ctx);
    waiter_done = true;
  }
  t1.join();
  EXPECT_TRUE(s1.ok()) << s1.error_message();
  EXPECT_TRUE(s2.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED ||
              s2.error_code() == grpc::StatusCode::CANCELLED)
      << s2.error_code() << " " << s2.error_message();
  ASSERT_TRUE(WaitFor([&]() { return limiter().in_flight() == 0 && limiter().waiting() == 0; }));
  EXPECT_TRUE(WaitFor([&]() { return server_->manager()->rejections() == 1; }))
      << "the abandoned wait is counted as a refusal";
  EXPECT_EQ(limiter().peak_in_flight(), 1u);
  EXPECT_EQ(*server_->store()->CountUpdates(1), 1u) << "agent-1's update is stored";
  // agent-2 retries and gets the slot; agent-3 follows; the round completes.
  for (int i : {1, 2}) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(120));
    grpc::Status s = Upload(agents_[i], &ctx);
    EXPECT_TRUE(s.ok()) << agents_[i].id << ": " << s.error_message();
  }
  for (Agent& a : agents_) {
    v1::CoordinatorMessage m;
    ASSERT_TRUE(a.session->Read(&m));
    ASSERT_TRUE(m.has_version_notice()) << m.DebugString();
  }
  EXPECT_EQ(limiter().peak_in_flight(), 1u);
}

TEST(UploadBoundConfigTest, YamlFlagAndValidation) {
  TempDir dir;
  const std::string path = dir.Sub("coordinator.yaml");
  ASSERT_TRUE(common::WriteFileAtomic(path, "tls_ca: ca.pem\ntls_cert: c.pem\ntls_key: c.key\n"
                                            "base_model_hash: " + std::string(64, 'd') +
                                                "\nmax_concurrent_uploads: 3\n")
                  .ok());
  EXPECT_EQ(CoordinatorConfig().max_concurrent_uploads, 8u);  // the documented default
  std::vector<const char*> argv = {"fedlora-coordinator", "--config", path.c_str()};
  auto cfg = ParseCoordinatorFlags(static_cast<int>(argv.size()), argv.data());
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->max_concurrent_uploads, 3u);
  std::vector<const char*> flag = {"fedlora-coordinator", "--config", path.c_str(),
                                   "--max-concurrent-uploads", "64"};
  cfg = ParseCoordinatorFlags(static_cast<int>(flag.size()), flag.data());
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->max_concurrent_uploads, 64u);
  std::vector<const char*> zero = {"fedlora-coordinator", "--config", path.c_str(),
                                   "--max-concurrent-uploads", "0"};
  auto refused = ParseCoordinatorFlags(static_cast<int>(zero.size()), zero.data());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.status().message()), ::testing::HasSubstr("max_concurrent_uploads"));
  EXPECT_THAT(CoordinatorHelp(), ::testing::HasSubstr("--max-concurrent-uploads"));
  // BDP probing (which lets waiting uploads park large windows) is off unless asked for.
  EXPECT_FALSE(CoordinatorConfig().grpc_bdp_probe);
  std::vector<const char*> bdp = {"fedlora-coordinator", "--config", path.c_str(),
                                  "--grpc-bdp-probe", "true"};
  cfg = ParseCoordinatorFlags(static_cast<int>(bdp.size()), bdp.data());
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_TRUE(cfg->grpc_bdp_probe);
  EXPECT_THAT(CoordinatorHelp(), ::testing::HasSubstr("--grpc-bdp-probe"));
}

}  // namespace
}  // namespace fedlora::coordinator
