// edge::Agent against an in-process fake coordinator (sync gRPC service over
// mutual TLS with a fresh PKI) and a fake LocalTrainer.

#include "edge-agent/agent.h"

#include <grpcpp/grpcpp.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/crypto/crypto.h"
#include "common/crypto/pki.h"
#include "common/crypto/sign.h"
#include "common/net/tls.h"
#include "common/quant/quant.h"
#include "common/tensor/tensor.h"
#include "fedlora/v1/fedlora.grpc.pb.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fedlora::edge {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using namespace std::chrono_literals;

constexpr char kModelHash[] = "5d41402abc4b2a76b9719d911017c592aa5d41402abc4b2a76b9719d911017c5";
constexpr char kAgentName[] = "agent-7";

bool WaitFor(const std::function<bool()>& pred, std::chrono::milliseconds timeout = 15s) {
  auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return pred();
}

common::HostTensor Filled(std::vector<int64_t> shape, float start, float step) {
  common::HostTensor t;
  t.shape = std::move(shape);
  int64_t n = 1;
  for (int64_t d : t.shape) n *= d;
  t.data.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t.data[i] = start + step * static_cast<float>(i % 1000);
  return t;
}

// PEFT-named adapter; `wide` makes the serialized payload exceed 2 MiB.
common::TensorMap MakeAdapter(float start, int64_t in_features) {
  common::TensorMap m;
  const std::string p = "base_model.model.model.layers.0.self_attn.";
  m[p + "q_proj.lora_A.weight"] = Filled({4, in_features}, start, 0.001f);
  m[p + "q_proj.lora_B.weight"] = Filled({64, 4}, start, -0.002f);
  m[p + "v_proj.lora_A.weight"] = Filled({4, in_features}, -start, 0.003f);
  m[p + "v_proj.lora_B.weight"] = Filled({32, 4}, start * 2, 0.001f);
  return m;
}

void ExpectSameTensors(const common::TensorMap& a, const common::TensorMap& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, t] : a) {
    auto it = b.find(name);
    ASSERT_NE(it, b.end()) << name;
    EXPECT_EQ(t.shape, it->second.shape) << name;
    EXPECT_EQ(t.data, it->second.data) << name;
  }
}

// ---------------------------------------------------------------- fake trainer

class FakeTrainer : public LocalTrainer {
 public:
  explicit FakeTrainer(common::TensorMap fresh) : fresh_(std::move(fresh)) {}

  std::string BaseModelHash() const override { return kModelHash; }

  absl::Status InitAdapter(const LoraConfig& config) override {
    std::lock_guard<std::mutex> lock(mu_);
    init_configs_.push_back(config);
    adapter_ = fresh_;
    return absl::OkStatus();
  }
  absl::Status SetAdapter(const LoraConfig& config, const common::TensorMap& tensors) override {
    std::lock_guard<std::mutex> lock(mu_);
    set_configs_.push_back(config);
    set_tensors_.push_back(tensors);
    adapter_ = tensors;
    return absl::OkStatus();
  }
  absl::StatusOr<common::TensorMap> GetAdapter() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return adapter_;
  }
  absl::StatusOr<TrainResult> Train(const std::vector<Example>& data,
                                    const TrainOptions& options) override {
    std::lock_guard<std::mutex> lock(mu_);
    train_options_.push_back(options);
    train_sizes_.push_back(data.size());
    for (auto& [name, t] : adapter_) {
      for (float& v : t.data) v += 0.25f;  // "training" moves every weight
    }
    TrainResult r;
    r.mean_loss = 1.25;
    r.last_loss = 1.0;
    r.tokens = 1234;
    r.seconds = 0.5;
    return r;
  }
  absl::StatusOr<EvalResult> Evaluate(const std::vector<Example>& data, int max_seq_len) override {
    std::lock_guard<std::mutex> lock(mu_);
    ++evals_;
    EvalResult r;
    r.loss = 3.0 - 0.125 * evals_;
    r.tokens = 77 * data.size();
    return r;
  }

  std::vector<LoraConfig> init_configs() const { std::lock_guard<std::mutex> l(mu_); return init_configs_; }
  std::vector<LoraConfig> set_configs() const { std::lock_guard<std::mutex> l(mu_); return set_configs_; }
  std::vector<common::TensorMap> set_tensors() const { std::lock_guard<std::mutex> l(mu_); return set_tensors_; }
  std::vector<TrainOptions> train_options() const { std::lock_guard<std::mutex> l(mu_); return train_options_; }
  int evals() const { std::lock_guard<std::mutex> l(mu_); return evals_; }

 private:
  mutable std::mutex mu_;
  common::TensorMap fresh_;
  common::TensorMap adapter_;
  std::vector<LoraConfig> init_configs_;
  std::vector<LoraConfig> set_configs_;
  std::vector<common::TensorMap> set_tensors_;
  std::vector<TrainOptions> train_options_;
  std::vector<size_t> train_sizes_;
  int evals_ = 0;
};

// ---------------------------------------------------------------- fake coordinator

struct Submission {
  std::vector<v1::UpdateChunk> chunks;
  std::string payload;
  std::string peer_cn;
};

struct FakeBlob {
  std::string bytes;
  std::string advertised_sha;  // blob_sha256 put in every chunk
  std::string signature;       // AdapterChunk.signature ("" = none)
};

class FakeCoordinator final : public v1::Coordinator::Service {
 public:
  explicit FakeCoordinator(common::X25519KeyPair seal) : seal_(std::move(seal)) {}

  // -- test controls
  void Push(v1::CoordinatorMessage message) {
    std::lock_guard<std::mutex> lock(mu_);
    outbox_.push_back(std::move(message));
    cv_.notify_all();
  }
  void DropSession() {
    std::lock_guard<std::mutex> lock(mu_);
    drop_session_ = true;
    cv_.notify_all();
  }
  void ShutDown() {
    std::lock_guard<std::mutex> lock(mu_);
    shutting_down_ = true;
    cv_.notify_all();
  }
  void AddBlob(const std::string& version, std::string bytes, std::string advertised_sha,
               std::string signature = "") {
    std::lock_guard<std::mutex> lock(mu_);
    blobs_[version] = {std::move(bytes), std::move(advertised_sha), std::move(signature)};
  }
  void set_hello_reject(grpc::StatusCode code) { hello_reject_ = code; }
  void set_fetch_chunk(size_t n) { fetch_chunk_ = n; }
  // On the first FetchAdapter call: end with UNAVAILABLE after this many chunks (0 = never).
  void set_break_first_fetch_after(int n) { break_first_fetch_after_ = n; }
  // On the first FetchAdapter call: send chunk number `n` with a flipped byte (-1 = never).
  void set_corrupt_first_fetch_chunk(int n) { corrupt_first_fetch_chunk_ = n; }
  // The first SubmitUpdate fails with `code` (OK: it does not fail).
  void set_fail_first_submit(grpc::StatusCode code) { first_submit_code_ = code; }

  // -- observations
  std::vector<v1::Hello> hellos() const { std::lock_guard<std::mutex> l(mu_); return hellos_; }
  std::vector<std::string> peer_cns() const { std::lock_guard<std::mutex> l(mu_); return peer_cns_; }
  int heartbeats() const { std::lock_guard<std::mutex> l(mu_); return heartbeats_; }
  std::vector<v1::EvalReport> eval_reports() const { std::lock_guard<std::mutex> l(mu_); return eval_reports_; }
  std::vector<Submission> submissions() const { std::lock_guard<std::mutex> l(mu_); return submissions_; }
  std::vector<v1::FetchAdapterRequest> fetches() const { std::lock_guard<std::mutex> l(mu_); return fetches_; }

  // -- service
  grpc::Status Session(grpc::ServerContext* ctx,
                       grpc::ServerReaderWriter<v1::CoordinatorMessage, v1::AgentMessage>* stream)
      override {
    v1::AgentMessage first;
    if (!stream->Read(&first) || !first.has_hello()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "expected Hello first");
    }
    auto peer = common::GetPeerIdentity(*ctx);
    {
      std::lock_guard<std::mutex> lock(mu_);
      hellos_.push_back(first.hello());
      peer_cns_.push_back(peer.ok() ? peer->common_name : "<" + peer.status().ToString() + ">");
    }
    if (hello_reject_ != grpc::StatusCode::OK) {
      return grpc::Status(hello_reject_, "refused by the test");
    }
    v1::CoordinatorMessage welcome;
    welcome.mutable_welcome()->set_coordinator_id("fake-coordinator");
    welcome.mutable_welcome()->set_seal_public_key(seal_.public_key);
    welcome.mutable_welcome()->set_heartbeat_interval_ms(40);
    stream->Write(welcome);

    bool reader_done = false;
    std::thread reader([&] {
      v1::AgentMessage m;
      while (stream->Read(&m)) {
        std::lock_guard<std::mutex> lock(mu_);
        if (m.has_heartbeat()) ++heartbeats_;
        if (m.has_eval_report()) eval_reports_.push_back(m.eval_report());
        cv_.notify_all();
      }
      std::lock_guard<std::mutex> lock(mu_);
      reader_done = true;
      cv_.notify_all();
    });
    grpc::Status result = grpc::Status::OK;
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait_for(lock, 20ms, [&] {
        return !outbox_.empty() || drop_session_ || reader_done || shutting_down_;
      });
      if (drop_session_) {
        drop_session_ = false;
        result = grpc::Status(grpc::StatusCode::UNAVAILABLE, "session dropped by the test");
        break;
      }
      if (reader_done || shutting_down_ || ctx->IsCancelled()) break;
      while (!outbox_.empty()) {
        v1::CoordinatorMessage m = std::move(outbox_.front());
        outbox_.pop_front();
        lock.unlock();
        stream->Write(m);
        lock.lock();
      }
    }
    lock.unlock();
    ctx->TryCancel();  // unblocks the reader if the agent is still sending
    reader.join();
    return result;
  }

  grpc::Status SubmitUpdate(grpc::ServerContext* ctx, grpc::ServerReader<v1::UpdateChunk>* reader,
                            v1::SubmitUpdateResponse* response) override {
    Submission s;
    auto peer = common::GetPeerIdentity(*ctx);
    s.peer_cn = peer.ok() ? peer->common_name : "";
    v1::UpdateChunk chunk;
    while (reader->Read(&chunk)) {
      s.payload += chunk.data();
      s.chunks.push_back(chunk);
    }
    grpc::StatusCode fail = grpc::StatusCode::OK;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (submissions_.empty()) fail = first_submit_code_;
      submissions_.push_back(s);
    }
    if (fail != grpc::StatusCode::OK) return grpc::Status(fail, "injected submit failure");
    response->set_accepted(true);
    response->set_bytes_received(s.payload.size());
    return grpc::Status::OK;
  }

  grpc::Status FetchAdapter(grpc::ServerContext* ctx, const v1::FetchAdapterRequest* request,
                            grpc::ServerWriter<v1::AdapterChunk>* writer) override {
    FakeBlob blob;
    bool first_call;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fetches_.push_back(*request);
      first_call = fetches_.size() == 1;
      auto it = blobs_.find(request->version_id());
      if (it == blobs_.end()) {
        return grpc::Status(grpc::StatusCode::NOT_FOUND, "no such version");
      }
      blob = it->second;
    }
    int index = 0;
    for (size_t off = request->offset(); off < blob.bytes.size(); off += fetch_chunk_, ++index) {
      v1::AdapterChunk chunk;
      chunk.set_version_id(request->version_id());
      chunk.set_offset(off);
      chunk.set_data(blob.bytes.substr(off, fetch_chunk_));
      chunk.set_chunk_sha256(common::Sha256Hex(chunk.data()));
      chunk.set_total_size(blob.bytes.size());
      chunk.set_blob_sha256(blob.advertised_sha);
      chunk.set_signature(blob.signature);
      if (first_call && index == corrupt_first_fetch_chunk_) {
        (*chunk.mutable_data())[0] ^= 0x5A;
      }
      if (!writer->Write(chunk)) break;
      if (first_call && break_first_fetch_after_ > 0 && index + 1 == break_first_fetch_after_) {
        return grpc::Status(grpc::StatusCode::UNAVAILABLE, "injected broken stream");
      }
    }
    return grpc::Status::OK;
  }

 private:
  const common::X25519KeyPair seal_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<v1::CoordinatorMessage> outbox_;
  bool drop_session_ = false;
  bool shutting_down_ = false;
  std::map<std::string, FakeBlob> blobs_;
  std::atomic<grpc::StatusCode> hello_reject_{grpc::StatusCode::OK};
  std::atomic<size_t> fetch_chunk_{1 << 20};
  std::atomic<int> break_first_fetch_after_{0};
  std::atomic<int> corrupt_first_fetch_chunk_{-1};
  std::atomic<grpc::StatusCode> first_submit_code_{grpc::StatusCode::OK};

  std::vector<v1::Hello> hellos_;
  std::vector<std::string> peer_cns_;
  int heartbeats_ = 0;
  std::vector<v1::EvalReport> eval_reports_;
  std::vector<Submission> submissions_;
  std::vector<v1::FetchAdapterRequest> fetches_;
};

// ---------------------------------------------------------------- fixture

class AgentTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/fedlora_agent_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    ASSERT_TRUE(common::InitPki(dir_).ok());
    ASSERT_TRUE(common::IssueCertificate(dir_, kAgentName, common::CertRole::kAgent, dir_).ok());
    auto seal = common::GenerateX25519KeyPair();
    ASSERT_TRUE(seal.ok());
    seal_ = *seal;
    fake_ = std::make_unique<FakeCoordinator>(seal_);
    trainer_ = std::make_unique<FakeTrainer>(MakeAdapter(0.5f, 80000));  // ~2.6 MB
  }

  void StartServer() { StartServerOn(fake_.get(), 0); }

  void StartServerOn(FakeCoordinator* service, int port) {
    auto creds = common::MakeServerCredentials(
        {dir_ + "/ca.pem", dir_ + "/coordinator.pem", dir_ + "/coordinator.key"});
    ASSERT_TRUE(creds.ok()) << creds.status();
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:" + std::to_string(port), *creds, &port_);
    builder.RegisterService(service);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port_, 0);
  }

  AgentOptions Options() {
    AgentOptions o;
    o.coordinator = "127.0.0.1:" + std::to_string(port_);
    o.tls = {dir_ + "/ca.pem", dir_ + "/" + kAgentName + ".pem", dir_ + "/" + kAgentName + ".key"};
    for (int i = 0; i < 5; ++i) o.train.push_back({"prompt " + std::to_string(i), "answer"});
    for (int i = 0; i < 3; ++i) o.eval.push_back({"held " + std::to_string(i), "out"});
    o.seed = 11;
    o.hello_timeout = 3s;
    o.rpc_timeout = 10s;
    o.backoff_initial = 20ms;
    o.backoff_max = 200ms;
    return o;
  }

  void StartAgent(AgentOptions options) {
    auto agent = Agent::Create(std::move(options), trainer_.get());
    ASSERT_TRUE(agent.ok()) << agent.status();
    agent_ = std::move(*agent);
    agent_thread_ = std::thread([this] { run_status_ = agent_->Run(); });
  }

  void StopAgent() {
    if (agent_) agent_->Stop();
    if (agent_thread_.joinable()) agent_thread_.join();
  }

  void TearDown() override {
    StopAgent();
    if (server_) {
      fake_->ShutDown();
      server_->Shutdown(std::chrono::system_clock::now() + 2s);
      server_->Wait();
    }
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  v1::CoordinatorMessage Task(uint64_t round, const std::string& base_version) {
    v1::CoordinatorMessage m;
    v1::RoundTask* t = m.mutable_round_task();
    t->set_round_id(round);
    t->set_base_version(base_version);
    t->mutable_lora()->set_rank(4);
    t->mutable_lora()->set_alpha(8);
    t->mutable_lora()->add_target_modules("q_proj");
    t->mutable_lora()->add_target_modules("v_proj");
    t->mutable_lora()->set_init_seed(42);
    t->set_local_steps(7);
    t->set_learning_rate(0.01f);
    t->set_batch_size(2);
    t->set_deadline_unix_ms(
        static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                  std::chrono::system_clock::now().time_since_epoch())
                                  .count()) +
        60000);
    t->set_max_update_bytes(64 << 20);
    t->set_seal_public_key(seal_.public_key);
    return m;
  }

  v1::CoordinatorMessage Notice(const std::string& version, uint64_t round, const std::string& sha,
                                uint64_t size) {
    v1::CoordinatorMessage m;
    m.mutable_version_notice()->set_version_id(version);
    m.mutable_version_notice()->set_round_id(round);
    m.mutable_version_notice()->set_sha256(sha);
    m.mutable_version_notice()->set_size_bytes(size);
    return m;
  }

  // Publishes `tensors` as `version` (f32 blob) and returns the blob.
  std::string Publish(const std::string& version, const common::TensorMap& tensors) {
    std::string blob = common::EncodeAdapterBlob(tensors, common::Quant::kNone);
    fake_->AddBlob(version, blob, common::Sha256Hex(blob));
    return blob;
  }

  // A welcomed agent given round 1, whose first SubmitUpdate fails with `code`.
  void PushRoundFailingFirstSubmit(grpc::StatusCode code) {
    fake_->set_fail_first_submit(code);
    StartServer();
    StartAgent(Options());
    ASSERT_TRUE(WaitWelcomed());
    fake_->Push(Task(1, ""));
  }

  bool WaitWelcomed() {
    return WaitFor([&] { return agent_->stats().sessions >= 1; });
  }

  std::string dir_;
  common::X25519KeyPair seal_;
  std::unique_ptr<FakeCoordinator> fake_;
  std::unique_ptr<FakeTrainer> trainer_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::unique_ptr<Agent> agent_;
  std::thread agent_thread_;
  absl::Status run_status_;
};

// ---------------------------------------------------------------- tests

TEST(AgentHelpersTest, UpdateAadBindsRoundAgentModelAndVersion) {
  EXPECT_EQ(UpdateAad(12, "site-a", "abcd", "v000011"), "fedlora-update-v1|12|site-a|abcd|v000011");
  EXPECT_EQ(UpdateAad(1, "x", "h", ""), "fedlora-update-v1|1|x|h|");
}

TEST(AgentHelpersTest, InferLoraConfigReadsRankModulesAndAlpha) {
  common::TensorMap tensors = MakeAdapter(0.1f, 16);
  LoraConfig fallback;
  fallback.alpha = 3;
  LoraConfig c = InferLoraConfig(tensors, {}, fallback);
  EXPECT_EQ(c.rank, 4);
  EXPECT_THAT(c.target_modules, ElementsAre("q_proj", "v_proj"));
  EXPECT_FLOAT_EQ(c.alpha, 3);
  c = InferLoraConfig(tensors, {{"fedlora.lora.alpha", "32"}}, fallback);
  EXPECT_FLOAT_EQ(c.alpha, 32);
}

TEST_F(AgentTest, CreateRefusesANonAgentCertificate) {
  StartServer();
  AgentOptions o = Options();
  o.tls.cert = dir_ + "/admin.pem";
  o.tls.key = dir_ + "/admin.key";
  auto agent = Agent::Create(std::move(o), trainer_.get());
  ASSERT_FALSE(agent.ok());
  EXPECT_EQ(agent.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(agent.status().message(), HasSubstr("expected 'agent'"));
}

TEST_F(AgentTest, HelloCarriesIdentityAndHeartbeatsFollow) {
  StartServer();
  StartAgent(Options());
  EXPECT_EQ(agent_->agent_id(), kAgentName);
  ASSERT_TRUE(WaitFor([&] { return fake_->heartbeats() >= 3; }));
  auto hellos = fake_->hellos();
  ASSERT_EQ(hellos.size(), 1u);
  EXPECT_EQ(hellos[0].agent_id(), kAgentName);
  EXPECT_EQ(hellos[0].base_model_hash(), kModelHash);
  EXPECT_EQ(hellos[0].num_train_examples(), 5u);
  EXPECT_EQ(hellos[0].current_version(), "");
  EXPECT_THAT(hellos[0].agent_version(), HasSubstr("fedlora-agent"));
  EXPECT_THAT(fake_->peer_cns(), ElementsAre(kAgentName));  // mutual TLS with the agent cert
  StopAgent();
  EXPECT_TRUE(run_status_.ok()) << run_status_;
}

TEST_F(AgentTest, FreshRoundTrainsAndSubmitsSealedChunkedUpdate) {
  StartServer();
  StartAgent(Options());
  ASSERT_TRUE(WaitWelcomed());
  fake_->Push(Task(3, ""));
  ASSERT_TRUE(WaitFor([&] { return agent_->stats().rounds_submitted == 1; }));

  // The trainer got the round's LoRA and training settings, and was evaluated first.
  auto inits = trainer_->init_configs();
  ASSERT_EQ(inits.size(), 1u);
  EXPECT_EQ(inits[0].rank, 4);
  EXPECT_FLOAT_EQ(inits[0].alpha, 8);
  EXPECT_THAT(inits[0].target_modules, ElementsAre("q_proj", "v_proj"));
  EXPECT_EQ(inits[0].init_seed, 42u);
  auto train = trainer_->train_options();
  ASSERT_EQ(train.size(), 1u);
  EXPECT_EQ(train[0].steps, 7);
  EXPECT_FLOAT_EQ(train[0].learning_rate, 0.01f);
  EXPECT_EQ(train[0].batch_size, 2);
  EXPECT_EQ(trainer_->evals(), 1);

  auto subs = fake_->submissions();
  ASSERT_EQ(subs.size(), 1u);
  const Submission& s = subs[0];
  EXPECT_EQ(s.peer_cn, kAgentName);
  ASSERT_GE(s.chunks.size(), 3u);  // ~2.6 MB sealed payload
  uint64_t offset = 0;
  for (size_t i = 0; i < s.chunks.size(); ++i) {
    const v1::UpdateChunk& c = s.chunks[i];
    EXPECT_EQ(c.has_header(), i == 0) << "chunk " << i;
    EXPECT_EQ(c.offset(), offset) << "chunk " << i;
    EXPECT_LE(c.data().size(), kUpdateChunkBytes) << "chunk " << i;
    EXPECT_GT(c.data().size(), 0u) << "chunk " << i;
    EXPECT_EQ(c.chunk_sha256(), common::Sha256Hex(c.data())) << "chunk " << i;
    offset += c.data().size();
  }
  const v1::UpdateHeader& h = s.chunks[0].header();
  EXPECT_EQ(h.round_id(), 3u);
  EXPECT_EQ(h.agent_id(), kAgentName);
  EXPECT_EQ(h.base_model_hash(), kModelHash);
  EXPECT_EQ(h.base_version(), "");
  EXPECT_EQ(h.num_examples(), 5u);
  EXPECT_EQ(h.total_size(), s.payload.size());
  EXPECT_EQ(h.payload_sha256(), common::Sha256Hex(s.payload));
  EXPECT_DOUBLE_EQ(h.metrics().train_loss(), 1.25);
  EXPECT_DOUBLE_EQ(h.metrics().eval_loss_before(), 3.0 - 0.125);
  EXPECT_EQ(h.metrics().train_tokens(), 1234u);

  // The payload opens with the coordinator's key and exactly this AAD.
  const std::string aad = std::string("fedlora-update-v1|3|") + kAgentName + "|" + kModelHash + "|";
  auto plain = common::OpenSealed(seal_, s.payload, aad);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE(common::OpenSealed(seal_, s.payload,
                                  std::string("fedlora-update-v1|4|") + kAgentName + "|" +
                                      kModelHash + "|")
                   .ok());
  auto file = common::SafetensorsFile::FromBytes(*plain, "update");
  ASSERT_TRUE(file.ok()) << file.status();
  auto tensors = (*file)->ToTensorMap();
  ASSERT_TRUE(tensors.ok());
  auto trained = trainer_->GetAdapter();
  ASSERT_TRUE(trained.ok());
  ExpectSameTensors(*tensors, *trained);
  EXPECT_FLOAT_EQ(tensors->begin()->second.data[0], 0.5f + 0.25f);  // the trained, not fresh, A

  EXPECT_EQ(agent_->stats().bytes_up, s.payload.size());
}

TEST_F(AgentTest, SubmitRetriesAfterUnavailable) {
  ASSERT_NO_FATAL_FAILURE(PushRoundFailingFirstSubmit(grpc::StatusCode::UNAVAILABLE));
  ASSERT_TRUE(WaitFor([&] { return agent_->stats().rounds_submitted == 1; }));
  auto subs = fake_->submissions();
  ASSERT_EQ(subs.size(), 2u);
  EXPECT_EQ(subs[0].payload, subs[1].payload);  // the same sealed bytes again
  EXPECT_EQ(agent_->stats().rounds_failed, 0u);
}

// A call the server cancelled (e.g. gRPC under its memory quota) is retried too.
TEST_F(AgentTest, SubmitRetriesACancelledCall) {
  ASSERT_NO_FATAL_FAILURE(PushRoundFailingFirstSubmit(grpc::StatusCode::CANCELLED));
  ASSERT_TRUE(WaitFor([&] { return agent_->stats().rounds_submitted == 1; }));
  EXPECT_EQ(fake_->submissions().size(), 2u);
  EXPECT_EQ(agent_->stats().rounds_failed, 0u);
}

TEST_F(AgentTest, SubmitRefusedAsTooLargeIsNotRetried) {
  ASSERT_NO_FATAL_FAILURE(PushRoundFailingFirstSubmit(grpc::StatusCode::RESOURCE_EXHAUSTED));
  ASSERT_TRUE(WaitFor([&] { return agent_->stats().rounds_failed == 1; }));
  EXPECT_EQ(fake_->submissions().size(), 1u);
  EXPECT_EQ(agent_->stats().rounds_submitted, 0u);
}

TEST_F(AgentTest, VersionNoticeFetchResumesAfterBrokenStreamAndReportsEval) {
  fake_->set_fetch_chunk(4096);
  fake_->set_break_first_fetch_after(2);
  StartServer();
  StartAgent(Options());
  ASSERT_TRUE(WaitWelcomed());
  common::TensorMap published = MakeAdapter(-1.5f, 3000);
  std::string blob = Publish("v000001", published);
  ASSERT_GT(blob.size(), 3u * 4096);
  fake_->Push(Notice("v000001", 1, common::Sha256Hex(blob), blob.size()));
  ASSERT_TRUE(WaitFor([&] { return agent_->stats().evals_reported == 1; }));
  ASSERT_TRUE(WaitFor([&] { return !fake_->eval_reports().empty(); }));

  auto fetches = fake_->fetches();
  ASSERT_EQ(fetches.size(), 2u);
  EXPECT_EQ(fetches[0].offset(), 0u);
  EXPECT_EQ(fetches[1].offset(), 2u * 4096);  // resumed from the last good byte
  EXPECT_EQ(fetches[1].version_id(), "v000001");

  auto sets = trainer_->set_tensors();
  ASSERT_EQ(sets.size(), 1u);
  ExpectSameTensors(sets[0], published);
  // No RoundTask came: rank and modules inferred from the blob.
  EXPECT_EQ(trainer_->set_configs()[0].rank, 4);

  auto reports = fake_->eval_reports();
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_EQ(reports[0].version_id(), "v000001");
  EXPECT_DOUBLE_EQ(reports[0].eval_loss(), 3.0 - 0.125);  // the fake's first evaluation
  EXPECT_EQ(reports[0].eval_tokens(), 77u * 3);
  AgentStats stats = agent_->stats();
  EXPECT_EQ(stats.current_version, "v000001");
  EXPECT_EQ(stats.bytes_down, blob.size());  // nothing fetched twice
  EXPECT_EQ(stats.evals_reported, 1u);
}

TEST_F(AgentTest, CorruptChunkIsDroppedAndFetchResumesAtIt) {
  fake_->set_fetch_chunk(4096);
  fake_->set_corrupt_first_fetch_chunk(1);
  StartServer();
  StartAgent(Options());
  ASSERT_TRUE(WaitWelcomed());
  common::TensorMap published = MakeAdapter(0.75f, 3000);
  std::string blob = Publish("v000004", published);
  fake_->Push(Notice("v000004", 4, common::Sha256Hex(blob), blob.size()));
  ASSERT_TRUE(WaitFor([&] { return !fake_->eval_reports().empty(); }));
  auto fetches = fake_->fetches();
  ASSERT_EQ(fetches.size(), 2u);
  EXPECT_EQ(fetches[1].offset(), 4096u);
  auto sets = trainer_->set_tensors();
  ASSERT_EQ(sets.size(), 1u);
  ExpectSameTensors(sets[0], published);
}

TEST_F(AgentTest, BlobWithWrongSha256IsRefusedAndNotApplied) {
  StartServer();
  StartAgent(Options());
  ASSERT_TRUE(WaitWelcomed());
  // v000002: the coordinator announces a SHA-256 its bytes do not have.
  common::TensorMap bad = MakeAdapter(9.0f, 100);
  std::string bad_blob = common::EncodeAdapterBlob(bad, common::Quant::kNone);
  std::string wrong_sha = common::Sha256Hex("something else");
  fake_->AddBlob("v000002", bad_blob, wrong_sha);
  fake_->Push(Notice("v000002", 2, wrong_sha, bad_blob.size()));
  // v000003: a good blob, but the notice names another hash.
  std::string other = Publish("v000003", MakeAdapter(8.0f, 100));
  fake_->Push(Notice("v000003", 3, common::Sha256Hex("not the blob"), other.size()));
  // v000005: good; its EvalReport proves the two before were handled.
  common::TensorMap good = MakeAdapter(2.0f, 100);
  std::string good_blob = Publish("v000005", good);
  fake_->Push(Notice("v000005", 5, common::Sha256Hex(good_blob), good_blob.size()));
  ASSERT_TRUE(WaitFor([&] { return !fake_->eval_reports().empty(); }));

  auto reports = fake_->eval_reports();
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_EQ(reports[0].version_id(), "v000005");
  auto sets = trainer_->set_tensors();
  ASSERT_EQ(sets.size(), 1u);  // neither refused blob reached the trainer
  ExpectSameTensors(sets[0], good);
  AgentStats stats = agent_->stats();
  EXPECT_EQ(stats.adapters_refused, 2u);
  EXPECT_EQ(stats.current_version, "v000005");
  EXPECT_THAT(stats.last_error, HasSubstr("v000003"));
}

TEST_F(AgentTest, RoundFromPublishedVersionStartsFromItsTensors) {
  StartServer();
  StartAgent(Options());
  ASSERT_TRUE(WaitWelcomed());
  common::TensorMap published = MakeAdapter(-0.25f, 1000);
  std::string blob = Publish("v000006", published);
  fake_->Push(Notice("v000006", 6, common::Sha256Hex(blob), blob.size()));
  fake_->Push(Task(7, "v000006"));
  ASSERT_TRUE(WaitFor([&] { return agent_->stats().rounds_submitted == 1; }));

  EXPECT_EQ(fake_->fetches().size(), 1u);  // the version was cached, not fetched again
  auto sets = trainer_->set_tensors();
  ASSERT_EQ(sets.size(), 2u);  // applied on the notice, then reset to it for the round
  ExpectSameTensors(sets[1], published);
  EXPECT_TRUE(trainer_->init_configs().empty());
  EXPECT_EQ(trainer_->set_configs()[1].rank, 4);
  EXPECT_FLOAT_EQ(trainer_->set_configs()[1].alpha, 8);

  auto subs = fake_->submissions();
  ASSERT_EQ(subs.size(), 1u);
  EXPECT_EQ(subs[0].chunks[0].header().base_version(), "v000006");
  const std::string aad =
      std::string("fedlora-update-v1|7|") + kAgentName + "|" + kModelHash + "|v000006";
  auto plain = common::OpenSealed(seal_, subs[0].payload, aad);
  ASSERT_TRUE(plain.ok()) << plain.status();
  auto file = common::SafetensorsFile::FromBytes(*plain, "update");
  ASSERT_TRUE(file.ok());
  auto tensors = (*file)->ToTensorMap();
  ASSERT_TRUE(tensors.ok());
  const auto& a = tensors->at("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  EXPECT_FLOAT_EQ(a.data[0], -0.25f + 0.25f);  // published value + the fake's training step
}

TEST_F(AgentTest, Q4AndQ8VersionsApplyAsTheirDecodedTensors) {
  StartServer();
  StartAgent(Options());
  ASSERT_TRUE(WaitWelcomed());
  const common::TensorMap published = MakeAdapter(0.3f, 200);
  const common::Quant quants[] = {common::Quant::kQ4_0, common::Quant::kQ8_0};
  for (size_t i = 0; i < 2; ++i) {
    const std::string version = "v00000" + std::to_string(i + 1);
    const std::string blob = common::EncodeAdapterBlob(published, quants[i]);
    fake_->AddBlob(version, blob, common::Sha256Hex(blob));
    fake_->Push(Notice(version, i + 1, common::Sha256Hex(blob), blob.size()));
    ASSERT_TRUE(WaitFor([&] { return trainer_->set_tensors().size() == i + 1; })) << version;
    auto decoded = common::DecodeAdapterBlob(blob);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    ExpectSameTensors(trainer_->set_tensors()[i], *decoded);  // what the coordinator published
  }
  EXPECT_EQ(agent_->stats().current_version, "v000002");
  EXPECT_EQ(agent_->stats().adapters_refused, 0u);
}

TEST_F(AgentTest, ReconnectsAfterTheSessionDropsAndReportsItsVersion) {
  StartServer();
  StartAgent(Options());
  ASSERT_TRUE(WaitWelcomed());
  std::string blob = Publish("v000001", MakeAdapter(1.0f, 100));
  fake_->Push(Notice("v000001", 1, common::Sha256Hex(blob), blob.size()));
  ASSERT_TRUE(WaitFor([&] { return !fake_->eval_reports().empty(); }));
  fake_->DropSession();
  ASSERT_TRUE(WaitFor([&] { return fake_->hellos().size() >= 2; }));
  EXPECT_EQ(fake_->hellos()[1].current_version(), "v000001");
  ASSERT_TRUE(WaitFor([&] { return agent_->stats().sessions >= 2; }));
}

TEST_F(AgentTest, ReconnectsToARestartedCoordinator) {
  StartServer();
  // Production-like backoff. (In one process the server's pollers also drive
  // the client's sockets, so this cannot show the TLS-handshake stall that
  // Agent::SleepUnlessStopped prevents between separate processes.)
  AgentOptions o = Options();
  o.backoff_initial = 1500ms;
  o.backoff_max = 1500ms;
  StartAgent(std::move(o));
  ASSERT_TRUE(WaitWelcomed());
  const int port = port_;
  fake_->ShutDown();
  server_->Shutdown(std::chrono::system_clock::now() + 1s);
  server_->Wait();
  server_.reset();
  // Down for longer than one backoff: the agent's channel sees a refused
  // connection and sits in TRANSIENT_FAILURE, where calls fail fast.
  std::this_thread::sleep_for(2500ms);
  // The same address again, a new process as far as the agent can tell.
  auto restarted = std::make_unique<FakeCoordinator>(seal_);
  StartServerOn(restarted.get(), port);
  ASSERT_EQ(port_, port);
  EXPECT_TRUE(WaitFor([&] { return agent_->stats().sessions >= 2; }, 6s));
  EXPECT_EQ(restarted->hellos().size(), 1u);
  StopAgent();
  restarted->ShutDown();
  server_->Shutdown(std::chrono::system_clock::now() + 1s);
  server_->Wait();
  server_.reset();
}

TEST_F(AgentTest, RefusedHelloEndsRunWithTheCoordinatorsStatus) {
  fake_->set_hello_reject(grpc::StatusCode::FAILED_PRECONDITION);
  StartServer();
  StartAgent(Options());
  agent_thread_.join();
  EXPECT_EQ(run_status_.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(run_status_.message(), HasSubstr("refused by the test"));
  EXPECT_EQ(fake_->hellos().size(), 1u);
}

TEST_F(AgentTest, ExitsCleanlyAfterMaxOffline) {
  // A port that nothing listens on: start and stop a server to learn one.
  StartServer();
  fake_->ShutDown();
  server_->Shutdown(std::chrono::system_clock::now());
  server_->Wait();
  server_.reset();
  AgentOptions o = Options();
  o.max_offline = 600ms;
  auto start = std::chrono::steady_clock::now();
  StartAgent(std::move(o));
  agent_thread_.join();
  auto took = std::chrono::steady_clock::now() - start;
  EXPECT_TRUE(run_status_.ok()) << run_status_;
  EXPECT_GE(took, 600ms);
  EXPECT_LT(took, 8s);
  EXPECT_EQ(agent_->stats().sessions, 0u);
}

TEST_F(AgentTest, StopEndsRunPromptly) {
  StartServer();
  StartAgent(Options());
  ASSERT_TRUE(WaitWelcomed());
  auto start = std::chrono::steady_clock::now();
  agent_->Stop();
  agent_thread_.join();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 3s);
  EXPECT_TRUE(run_status_.ok()) << run_status_;
}

// ---------------------------------------------------------------- signed adapters

// The coordinator's signing key in the PKI directory, where the agent finds the
// public half by default (beside ca.pem).
class SignedAgentTest : public AgentTest {
 protected:
  void SetUp() override {
    AgentTest::SetUp();
    ASSERT_TRUE(common::WriteNewSigningKeyPair(dir_ + "/coordinator-signing.key",
                                               dir_ + "/coordinator-signing.pub")
                    .ok());
    auto key = common::SigningKey::LoadFile(dir_ + "/coordinator-signing.key");
    ASSERT_TRUE(key.ok()) << key.status();
    key_ = std::make_unique<common::SigningKey>(std::move(*key));
  }

  std::string Statement(const common::SigningKey& key, const std::string& version, uint64_t round,
                        const std::string& blob, const std::string& base_hash = kModelHash) {
    common::AdapterStatement st;
    st.version_id = version;
    st.round_id = round;
    st.blob_sha256 = common::Sha256Hex(blob);
    st.base_model_hash = base_hash;
    st.quant = "f32";
    auto encoded = common::SignAdapterStatement(key, st);
    EXPECT_TRUE(encoded.ok()) << encoded.status();
    return encoded.ok() ? *encoded : std::string();
  }

  // Serves `blob` as `version` (advertising its real hash) and sends a notice
  // carrying `signature`.
  void Announce(const std::string& version, uint64_t round, const std::string& blob,
                const std::string& signature) {
    fake_->AddBlob(version, blob, common::Sha256Hex(blob));
    v1::CoordinatorMessage m = Notice(version, round, common::Sha256Hex(blob), blob.size());
    m.mutable_version_notice()->set_signature(signature);
    fake_->Push(std::move(m));
  }

  std::unique_ptr<common::SigningKey> key_;
};

TEST_F(SignedAgentTest, SignedVersionsApplyFromNoticeAndFromFetchedChunks) {
  StartServer();
  StartAgent(Options());
  ASSERT_TRUE(WaitWelcomed());
  common::TensorMap v1_tensors = MakeAdapter(1.5f, 200);
  std::string blob = common::EncodeAdapterBlob(v1_tensors, common::Quant::kNone);
  Announce("v000001", 1, blob, Statement(*key_, "v000001", 1, blob));
  ASSERT_TRUE(WaitFor([&] { return agent_->stats().evals_reported == 1; }));
  EXPECT_EQ(agent_->stats().current_version, "v000001");

  // A round based on a version the agent never got a notice for: the statement
  // comes with the fetched chunks.
  common::TensorMap v2_tensors = MakeAdapter(-2.5f, 200);
  std::string blob2 = common::EncodeAdapterBlob(v2_tensors, common::Quant::kNone);
  fake_->AddBlob("v000002", blob2, common::Sha256Hex(blob2),
                 Statement(*key_, "v000002", 2, blob2));
  fake_->Push(Task(3, "v000002"));
  ASSERT_TRUE(WaitFor([&] { return agent_->stats().rounds_submitted == 1; }));
  auto sets = trainer_->set_tensors();
  ASSERT_EQ(sets.size(), 2u);
  ExpectSameTensors(sets[0], v1_tensors);
  ExpectSameTensors(sets[1], v2_tensors);
  EXPECT_EQ(agent_->stats().adapters_refused, 0u);
}

TEST_F(SignedAgentTest, TamperedUnsignedOrMislabeledVersionsAreRefusedAndTheLastGoodIsKept) {
  StartServer();
  StartAgent(Options());
  ASSERT_TRUE(WaitWelcomed());
  common::TensorMap good = MakeAdapter(0.5f, 200);
  std::string good_blob = common::EncodeAdapterBlob(good, common::Quant::kNone);
  Announce("v000001", 1, good_blob, Statement(*key_, "v000001", 1, good_blob));
  ASSERT_TRUE(WaitFor([&] { return agent_->stats().evals_reported == 1; }));

  // v2: the blob was swapped in transit (hashes recomputed, signature of the original).
  std::string original = common::EncodeAdapterBlob(MakeAdapter(2.0f, 200), common::Quant::kNone);
  std::string swapped = common::EncodeAdapterBlob(MakeAdapter(66.0f, 200), common::Quant::kNone);
  Announce("v000002", 2, swapped, Statement(*key_, "v000002", 2, original));
  // v3: a bit of the signature flipped.
  std::string blob3 = common::EncodeAdapterBlob(MakeAdapter(3.0f, 200), common::Quant::kNone);
  std::string sig3 = Statement(*key_, "v000003", 3, blob3);
  const size_t at = sig3.find("signature=") + 20;
  sig3[at] = sig3[at] == '0' ? '1' : '0';
  Announce("v000003", 3, blob3, sig3);
  // v4: signed by another key.
  auto other = common::SigningKey::Generate();
  ASSERT_TRUE(other.ok());
  std::string blob4 = common::EncodeAdapterBlob(MakeAdapter(4.0f, 200), common::Quant::kNone);
  Announce("v000004", 4, blob4, Statement(*other, "v000004", 4, blob4));
  // v5: not signed at all.
  std::string blob5 = common::EncodeAdapterBlob(MakeAdapter(5.0f, 200), common::Quant::kNone);
  Announce("v000005", 5, blob5, "");
  // v6: a valid statement of v000001 replayed for another version.
  Announce("v000006", 6, good_blob, Statement(*key_, "v000001", 1, good_blob));
  // v7: signed for another base model.
  std::string blob7 = common::EncodeAdapterBlob(MakeAdapter(7.0f, 200), common::Quant::kNone);
  Announce("v000007", 7, blob7, Statement(*key_, "v000007", 7, blob7, std::string(64, 'a')));
  // v8: signed correctly, but the blob's own metadata names another round.
  std::string blob8 = common::EncodeAdapterBlob(MakeAdapter(8.0f, 200), common::Quant::kNone,
                                                {{"fedlora.round", "99"}});
  Announce("v000008", 8, blob8, Statement(*key_, "v000008", 8, blob8));
  ASSERT_TRUE(WaitFor([&] { return agent_->stats().adapters_refused == 7; }))
      << agent_->stats().adapters_refused << " " << agent_->stats().last_error;

  AgentStats stats = agent_->stats();
  EXPECT_EQ(stats.current_version, "v000001");  // the last good version is kept
  EXPECT_EQ(stats.evals_reported, 1u);          // nothing reported for the refused ones
  EXPECT_THAT(stats.last_error, HasSubstr("v000008"));
  EXPECT_THAT(stats.last_error, HasSubstr("keeping v000001"));
  auto sets = trainer_->set_tensors();
  ASSERT_EQ(sets.size(), 1u);  // no refused blob reached the trainer
  ExpectSameTensors(sets[0], good);
  auto reports = fake_->eval_reports();
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_EQ(reports[0].version_id(), "v000001");
  // After a reconnect the agent still says it holds v000001.
  fake_->DropSession();
  ASSERT_TRUE(WaitFor([&] { return fake_->hellos().size() >= 2; }));
  EXPECT_EQ(fake_->hellos()[1].current_version(), "v000001");
  // A round based on a refused version fails without submitting anything.
  fake_->Push(Task(9, "v000003"));
  ASSERT_TRUE(WaitFor([&] { return agent_->stats().rounds_failed == 1; }));
  EXPECT_TRUE(fake_->submissions().empty());
  EXPECT_THAT(agent_->stats().last_error, HasSubstr("v000003 is not signed"));
}

TEST_F(SignedAgentTest, ExplicitWrongKeyRefusesAndABadKeyFileFailsCreate) {
  auto other = common::SigningKey::Generate();
  ASSERT_TRUE(other.ok());
  auto pem = other->PublicPem();
  ASSERT_TRUE(pem.ok());
  ASSERT_TRUE(common::WriteFileAtomic(dir_ + "/other.pub", *pem).ok());
  StartServer();
  AgentOptions o = Options();
  o.signing_public_key = dir_ + "/other.pub";
  StartAgent(std::move(o));
  ASSERT_TRUE(WaitWelcomed());
  std::string blob = common::EncodeAdapterBlob(MakeAdapter(1.0f, 200), common::Quant::kNone);
  Announce("v000001", 1, blob, Statement(*key_, "v000001", 1, blob));
  ASSERT_TRUE(WaitFor([&] { return agent_->stats().adapters_refused == 1; }));
  EXPECT_EQ(agent_->stats().current_version, "");
  EXPECT_THAT(agent_->stats().last_error, HasSubstr(key_->key_id()));
  EXPECT_TRUE(trainer_->set_tensors().empty());

  AgentOptions bad = Options();
  bad.signing_public_key = dir_ + "/ca.pem";  // a certificate, not an Ed25519 public key
  auto agent = Agent::Create(std::move(bad), trainer_.get());
  EXPECT_EQ(agent.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(agent.status().message(), HasSubstr("ca.pem"));
}

}  // namespace
}  // namespace fedlora::edge
