// The wire canary (docs/security.md, "What leaves an agent"): three real agents
// (edge::Agent with the libtorch trainer on a tiny model) train on data holding
// unique marker strings and take part in a round with a real coordinator, in
// process. A client interceptor on each agent's channel (AgentOptions::
// channel_interceptors) records the serialized bytes of every message the agent
// sends, on every RPC. The markers, as text and as their token-id sequences
// (little-endian int32 and int64, and decimal text), appear in none of those
// bytes and nowhere in the coordinator's data directory. Run with secure
// aggregation and with plain sealed updates.
//
// The capture is proven to work: it holds each agent's Hello (parsed back, with
// the agent id) and its update chunks, and the agent id, which the agent does
// send, is found by the same search.

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/client_interceptor.h>
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "coordinator/server.h"
#include "edge-agent/agent.h"
#include "edge-agent/data.h"
#include "edge-agent/tokenizer.h"
#include "edge-agent/trainer.h"
#include "fedlora/v1/fedlora.grpc.pb.h"
#include "tests/integration/process_util.h"

namespace fedlora::testing {
namespace {

namespace v1 = ::fedlora::v1;
using ::testing::HasSubstr;

constexpr int kSites = 3;

// Every serialized message sent, per agent, with the method it went on.
struct SentMessage {
  std::string method;
  std::string bytes;
};

class Capture {
 public:
  void Add(const std::string& agent, const std::string& method, std::string bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    sent_[agent].push_back({method, std::move(bytes)});
  }
  std::vector<SentMessage> Of(const std::string& agent) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sent_.find(agent);
    return it == sent_.end() ? std::vector<SentMessage>{} : it->second;
  }

 private:
  mutable std::mutex mu_;
  std::map<std::string, std::vector<SentMessage>> sent_;
};

class RecordingInterceptor final : public grpc::experimental::Interceptor {
 public:
  RecordingInterceptor(Capture* capture, std::string agent, std::string method)
      : capture_(capture), agent_(std::move(agent)), method_(std::move(method)) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_MESSAGE)) {
      grpc::ByteBuffer* buffer = methods->GetSerializedSendMessage();
      std::string bytes;
      if (buffer != nullptr) {
        std::vector<grpc::Slice> slices;
        if (buffer->Dump(&slices).ok()) {
          for (const grpc::Slice& s : slices) {
            bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
          }
        }
      }
      capture_->Add(agent_, method_, std::move(bytes));
    }
    methods->Proceed();
  }

 private:
  Capture* const capture_;
  const std::string agent_;
  const std::string method_;
};

class RecordingFactory final : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  RecordingFactory(Capture* capture, std::string agent)
      : capture_(capture), agent_(std::move(agent)) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* info) override {
    return new RecordingInterceptor(capture_, agent_, info->method());
  }

 private:
  Capture* const capture_;
  const std::string agent_;
};

std::string LittleEndian(const std::vector<int32_t>& ids, size_t width) {
  std::string out;
  for (int32_t id : ids) {
    const int64_t v = id;
    for (size_t b = 0; b < width; ++b) out.push_back(static_cast<char>((v >> (8 * b)) & 0xff));
  }
  return out;
}

std::string Decimal(const std::vector<int32_t>& ids, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i > 0) out += sep;
    out += std::to_string(ids[i]);
  }
  return out;
}

// The byte patterns that would betray `marker`: its text and its token ids
// (tokenized alone and after a space, as it stands in the data) in four encodings.
std::vector<std::pair<std::string, std::string>> Patterns(const std::string& marker,
                                                          const edge::Tokenizer& tokenizer) {
  std::vector<std::pair<std::string, std::string>> out = {{"text", marker}};
  for (const std::string& text : {marker, " " + marker}) {
    const std::vector<int32_t> ids = tokenizer.Encode(text);
    EXPECT_GE(ids.size(), 4u) << "marker too short to be a telling token sequence";
    out.push_back({"int32 ids of '" + text + "'", LittleEndian(ids, 4)});
    out.push_back({"int64 ids of '" + text + "'", LittleEndian(ids, 8)});
    out.push_back({"decimal ids of '" + text + "' (,)", Decimal(ids, ",")});
    out.push_back({"decimal ids of '" + text + "' ( )", Decimal(ids, " ")});
  }
  return out;
}

std::string ReadAllFiles(const std::string& dir) {
  std::string all;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file()) all += ReadTextFile(entry.path().string());
  }
  return all;
}

class CanaryTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override { dir_ = MakeTempDir("fedlora-canary"); }
  void TearDown() override {
    if (!HasFailure()) RemoveTree(dir_);
  }
  void MustRun(const std::vector<std::string>& argv, const std::string& log_name) {
    int code = RunToCompletion(argv, dir_ + "/" + log_name + ".out", dir_ + "/" + log_name + ".err",
                               std::chrono::seconds(120));
    ASSERT_EQ(code, 0) << argv[0] << " failed: " << ReadTextFile(dir_ + "/" + log_name + ".err");
  }
  std::string dir_;
};

TEST_P(CanaryTest, MarkersNeverLeaveAnAgent) {
  const std::string secure_aggregation = GetParam();
  ASSERT_NO_FATAL_FAILURE(MustRun({BinPath("fedlora-sim"), "make-data", "--out", dir_ + "/data",
                                   "--sites", std::to_string(kSites), "--examples", "24",
                                   "--heldout", "6", "--seed", "11"},
                                  "make-data"));
  ASSERT_NO_FATAL_FAILURE(MustRun(
      {BinPath("fedlora-sim"), "make-model", "--out", dir_ + "/model", "--hidden", "64",
       "--intermediate", "160", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim",
       "16", "--vocab", "384", "--seed", "3"},
      "make-model"));
  ASSERT_NO_FATAL_FAILURE(MustRun({BinPath("fedlora-admin"), "pki", "init", dir_ + "/pki"}, "pki"));
  std::vector<std::string> names, markers;
  for (int i = 0; i < kSites; ++i) {
    // The agent id is sent (Hello, update headers): the positive control.
    names.push_back("site-canary-" + std::to_string(i));
    ASSERT_NO_FATAL_FAILURE(MustRun({BinPath("fedlora-admin"), "pki", "issue", "--ca-dir",
                                     dir_ + "/pki", "--name", names.back(), "--role", "agent",
                                     "--out", dir_ + "/pki"},
                                    "issue-" + std::to_string(i)));
    markers.push_back("MRN-QX" + std::to_string(48211 + 977 * i) + "-ZEBRA-VOLT");
    std::ofstream out(dir_ + "/data/site-" + std::to_string(i) + "/train.jsonl", std::ios::app);
    for (int k = 0; k < 8; ++k) {
      out << R"({"instruction":"Give the record number.","input":"Patient note )"
          << markers.back() << R"( follow-up.","output":"record )" << markers.back() << R"("})"
          << "\n";
    }
  }
  auto tokenizer = edge::Tokenizer::FromFile(dir_ + "/model/tokenizer.json");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();

  coordinator::CoordinatorConfig config;
  config.listen_address = "127.0.0.1:0";
  config.data_dir = dir_ + "/coordinator";
  config.tls_ca = dir_ + "/pki/ca.pem";
  config.tls_cert = dir_ + "/pki/coordinator.pem";
  config.tls_key = dir_ + "/pki/coordinator.key";
  config.base_model_dir = dir_ + "/model";
  config.min_participants = kSites;
  config.max_participants = kSites;
  config.rounds = 1;
  config.local_steps = 4;
  config.learning_rate = 0.003;
  config.batch_size = 4;
  config.lora_rank = 4;
  config.eval_grace_s = 30;
  config.round_deadline_s = 300;
  config.heartbeat_interval_ms = 500;
  config.secure_aggregation = secure_aggregation;
  std::mutex mu;
  std::condition_variable cv;
  bool finished = false;
  coordinator::ServerOptions server_options;
  std::ostringstream coordinator_out;
  server_options.out = &coordinator_out;
  server_options.on_finished = [&]() {
    std::lock_guard<std::mutex> lock(mu);
    finished = true;
    cv.notify_all();
  };
  auto server = coordinator::CoordinatorServer::Start(config, server_options);
  ASSERT_TRUE(server.ok()) << server.status();

  Capture capture;
  std::vector<std::unique_ptr<edge::LocalTrainer>> trainers;
  std::vector<std::unique_ptr<edge::Agent>> agents;
  for (int i = 0; i < kSites; ++i) {
    edge::EngineOptions engine;
    engine.threads = 1;
    auto trainer = edge::LoadTrainer(dir_ + "/model", engine);
    ASSERT_TRUE(trainer.ok()) << trainer.status();
    const std::string site = dir_ + "/data/site-" + std::to_string(i);
    auto train = edge::LoadJsonl(site + "/train.jsonl");
    auto eval = edge::LoadJsonl(site + "/heldout.jsonl");
    ASSERT_TRUE(train.ok() && eval.ok());
    edge::AgentOptions o;
    o.coordinator = "127.0.0.1:" + std::to_string((*server)->port());
    o.tls = {dir_ + "/pki/ca.pem", dir_ + "/pki/" + names[i] + ".pem",
             dir_ + "/pki/" + names[i] + ".key"};
    o.train = std::move(*train);
    o.eval = std::move(*eval);
    o.max_seq_len = 256;
    o.seed = static_cast<uint64_t>(i);
    o.channel_interceptors = [&capture, name = names[i]]() {
      std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> v;
      v.push_back(std::make_unique<RecordingFactory>(&capture, name));
      return v;
    };
    auto agent = edge::Agent::Create(std::move(o), trainer->get());
    ASSERT_TRUE(agent.ok()) << agent.status();
    trainers.push_back(std::move(*trainer));
    agents.push_back(std::move(*agent));
  }
  std::vector<std::thread> threads;
  for (auto& agent : agents) {
    threads.emplace_back([a = agent.get()]() { (void)a->Run(); });
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait_for(lock, std::chrono::seconds(400), [&]() { return finished; });
  }
  for (auto& agent : agents) agent->Stop();
  for (auto& t : threads) t.join();
  (*server)->Shutdown();
  ASSERT_TRUE(finished) << "the round did not finish\n" << coordinator_out.str();
  if (secure_aggregation == "on") {
    EXPECT_THAT(coordinator_out.str(), HasSubstr("secagg=on"));
  } else {
    EXPECT_THAT(coordinator_out.str(), ::testing::Not(HasSubstr("secagg=on")));
  }

  const std::string stored = ReadAllFiles(dir_ + "/coordinator");
  for (int i = 0; i < kSites; ++i) {
    const std::vector<SentMessage> sent = capture.Of(names[i]);
    EXPECT_GE(agents[i]->stats().rounds_submitted, 1u) << names[i];
    // The capture saw this agent's Hello (parsed back) and its update chunks.
    bool hello = false;
    size_t update_chunks = 0, update_bytes = 0;
    std::string all;
    for (const SentMessage& m : sent) {
      all += m.bytes;
      if (m.method == "/fedlora.v1.Coordinator/Session") {
        v1::AgentMessage msg;
        if (msg.ParseFromString(m.bytes) && msg.has_hello() &&
            msg.hello().agent_id() == names[i]) {
          hello = true;
        }
      }
      if (m.method == "/fedlora.v1.Coordinator/SubmitUpdate") {
        ++update_chunks;
        update_bytes += m.bytes.size();
      }
    }
    EXPECT_TRUE(hello) << names[i] << ": no Hello captured";
    EXPECT_GE(update_chunks, 1u) << names[i] << ": no update chunk captured";
    EXPECT_GE(update_bytes, agents[i]->stats().bytes_up) << names[i];
    // Positive control: the same search finds what the agent does send.
    EXPECT_NE(all.find(names[i]), std::string::npos) << names[i];
    // The markers (every site's, so also none relayed from another site).
    for (const std::string& marker : markers) {
      for (const auto& [what, pattern] : Patterns(marker, **tokenizer)) {
        EXPECT_EQ(all.find(pattern), std::string::npos)
            << names[i] << " sent " << what << " of " << marker;
        EXPECT_EQ(stored.find(pattern), std::string::npos)
            << "the coordinator's data directory holds " << what << " of " << marker;
      }
    }
  }
  // The pattern search itself finds token ids where they are.
  const std::vector<int32_t> ids = (*tokenizer)->Encode(markers[0]);
  const std::string planted = "xx" + LittleEndian(ids, 4) + "yy" + Decimal(ids, ",");
  for (const auto& [what, pattern] : Patterns(markers[0], **tokenizer)) {
    if (what.find("int32 ids of 'M") == 0 || what.find("decimal ids of 'M") == 0) {
      if (what.find("( )") != std::string::npos) continue;
      EXPECT_NE(planted.find(pattern), std::string::npos) << what;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(SecureAggregationAndSealed, CanaryTest,
                         ::testing::Values("on", "off"),
                         [](const ::testing::TestParamInfo<const char*>& info) {
                           return std::string(info.param) == "on" ? "SecureAggregation"
                                                                  : "SealedUpdates";
                         });

}  // namespace
}  // namespace fedlora::testing
