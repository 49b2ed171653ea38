// End to end: the real binaries (fedlora-sim, fedlora-admin, fedlora-coordinator,
// fedlora-agent) run one federated round over loopback mutual TLS; the test then
// opens the coordinator's RocksDB store and checks the published version.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <cmath>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/crypto/crypto.h"
#include "common/storage/store.h"
#include "common/quant/quant.h"
#include "coordinator/state_store.h"
#include "nlohmann/json.hpp"
#include "tests/integration/process_util.h"

namespace fedlora::testing {
namespace {

using ::testing::HasSubstr;
using std::chrono::seconds;

std::string LastNonEmptyLine(const std::string& text) {
  std::istringstream in(text);
  std::string line, last;
  while (std::getline(in, line)) {
    if (!line.empty()) last = line;
  }
  return last;
}

class FederationTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = MakeTempDir("fedlora-federation"); }
  void TearDown() override {
    if (!HasFailure()) RemoveTree(dir_);
  }

  // Runs a setup command that must succeed quickly.
  void MustRun(const std::vector<std::string>& argv, const std::string& log_name) {
    int code = RunToCompletion(argv, dir_ + "/" + log_name + ".out", dir_ + "/" + log_name + ".err",
                               std::chrono::seconds(120));
    ASSERT_EQ(code, 0) << argv[0] << " failed: " << ReadTextFile(dir_ + "/" + log_name + ".err");
  }

  void MakeFleet(int sites) {
    MustRun({BinPath("fedlora-sim"), "make-data", "--out", dir_ + "/data", "--sites",
             std::to_string(sites), "--examples", "48", "--heldout", "12", "--seed", "7"},
            "make-data");
    MustRun({BinPath("fedlora-sim"), "make-model", "--out", dir_ + "/model", "--hidden", "64",
             "--intermediate", "160", "--layers", "2", "--heads", "4", "--kv-heads", "2",
             "--head-dim", "16", "--vocab", "384", "--seed", "3"},
            "make-model");
    MustRun({BinPath("fedlora-admin"), "pki", "init", dir_ + "/pki"}, "pki-init");
    for (int i = 0; i < sites; ++i) {
      MustRun({BinPath("fedlora-admin"), "pki", "issue", "--ca-dir", dir_ + "/pki", "--name",
               "site-" + std::to_string(i), "--role", "agent", "--out", dir_ + "/pki"},
              "pki-issue-" + std::to_string(i));
    }
  }

  Process StartCoordinator(int port, int rounds, int min_participants,
                           const std::string& log_suffix = "") {
    std::vector<std::string> argv = {BinPath("fedlora-coordinator"), "--listen-address", "127.0.0.1:" + std::to_string(port),
         "--data-dir", dir_ + "/coordinator", "--tls-ca", dir_ + "/pki/ca.pem", "--tls-cert",
         dir_ + "/pki/coordinator.pem", "--tls-key", dir_ + "/pki/coordinator.key",
         "--base-model-dir", dir_ + "/model", "--min-participants",
         std::to_string(min_participants), "--rounds", std::to_string(rounds), "--local-steps",
         "6", "--learning-rate", "0.003", "--batch-size", "4", "--eval-grace-s", std::to_string(eval_grace_s_),
         "--heartbeat-interval-ms", "1000"};
    argv.insert(argv.end(), extra_coordinator_args_.begin(), extra_coordinator_args_.end());
    return Process::Start(argv, dir_ + "/coordinator" + log_suffix + ".out",
                          dir_ + "/coordinator" + log_suffix + ".err");
  }

  Process StartAgent(int port, int site) {
    std::string s = std::to_string(site);
    std::vector<std::string> argv = {
        BinPath("fedlora-agent"), "run", "--coordinator", "127.0.0.1:" + std::to_string(port),
        "--ca", dir_ + "/pki/ca.pem", "--cert", dir_ + "/pki/site-" + s + ".pem", "--key",
        dir_ + "/pki/site-" + s + ".key", "--model", dir_ + "/model", "--data",
        dir_ + "/data/site-" + s + "/train.jsonl", "--eval",
        dir_ + "/data/site-" + s + "/heldout.jsonl", "--threads", "1", "--seed", s,
        "--max-offline", std::to_string(max_offline_s_)};
    // Sites choose their own memory settings: site 1 trains with gradient
    // checkpointing (same math, so the federation's results do not depend on it).
    if (site == 1) argv.push_back("--grad-checkpoint");
    return Process::Start(argv, dir_ + "/agent-" + s + ".out", dir_ + "/agent-" + s + ".err");
  }

  std::string Logs() {
    return "\n--- coordinator.err ---\n" + ReadTextFile(dir_ + "/coordinator.err") +
           "\n--- agent-0.err ---\n" + ReadTextFile(dir_ + "/agent-0.err") +
           "\n--- agent-1.err ---\n" + ReadTextFile(dir_ + "/agent-1.err");
  }

  // Runs a 2-agent, 1-round federation, kills the coordinator with SIGKILL as soon
  // as `marker` appears in its log, restarts it on the same data directory and
  // waits for the restarted one to finish the round.
  void CrashAndRestartWhenLogged(const std::string& marker) {
    ASSERT_NO_FATAL_FAILURE(MakeFleet(2));
    max_offline_s_ = 60;
    eval_grace_s_ = 10;  // an agent may have evaluated before the crash and not again after
    int port = PickFreePort();
    Process coordinator = StartCoordinator(port, 1, 2);
    Process agent0 = StartAgent(port, 0);
    Process agent1 = StartAgent(port, 1);
    bool seen = false;
    for (int i = 0; i < 6000 && coordinator.running(); ++i) {  // up to ~5 min
      if (ReadTextFile(dir_ + "/coordinator.err").find(marker) != std::string::npos) {
        seen = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    EXPECT_TRUE(seen) << "never logged '" << marker << "'" << Logs();
    coordinator.Kill();  // SIGKILL: no shutdown path runs
    Process restarted = StartCoordinator(port, /*rounds=*/1, /*min_participants=*/2, "-restarted");
    auto code = restarted.Wait(seconds(400));
    ASSERT_TRUE(code.has_value()) << "restarted coordinator did not finish"
                                  << ReadTextFile(dir_ + "/coordinator-restarted.err") << Logs();
    ASSERT_EQ(*code, 0) << ReadTextFile(dir_ + "/coordinator-restarted.err");
  }

  // After a crash and restart: exactly one version, both agents counted once.
  void ExpectOneCleanVersion() {
    auto store = coordinator::StateStore::Open(dir_ + "/coordinator");
    ASSERT_TRUE(store.ok()) << store.status();
    auto current = (*store)->CurrentVersion();
    ASSERT_TRUE(current.ok());
    EXPECT_EQ(*current, "v000001");
    auto rounds = (*store)->ListRounds();
    ASSERT_TRUE(rounds.ok());
    ASSERT_EQ(rounds->size(), 1u) << "a crash must not open or publish an extra round";
    EXPECT_EQ(rounds->front().version_id, "v000001");
    EXPECT_EQ(rounds->front().updates.size(), 2u);
    auto version = (*store)->GetVersion("v000001");
    ASSERT_TRUE(version.ok() && version->has_value());
    EXPECT_THAT((*version)->contributors, ::testing::UnorderedElementsAre("site-0", "site-1"));
    EXPECT_EQ((*version)->num_examples, 96u) << "an update was lost or counted twice";
    auto blob = (*store)->GetBlob((*version)->sha256);
    ASSERT_TRUE(blob.ok()) << blob.status();
    EXPECT_EQ(common::Sha256Hex(*blob), (*version)->sha256);
    EXPECT_TRUE(common::DecodeAdapterBlob(*blob).ok());
    EXPECT_FALSE((*store)->GetVersion("v000002").value_or(std::nullopt).has_value());
  }

  std::string dir_;
  int max_offline_s_ = 5;
  std::vector<std::string> extra_coordinator_args_;
  int eval_grace_s_ = 60;
};

TEST_F(FederationTest, OneRoundTwoAgentsOverMutualTlsPublishesAVersion) {
  ASSERT_NO_FATAL_FAILURE(MakeFleet(2));
  int port = PickFreePort();
  Process coordinator = StartCoordinator(port, /*rounds=*/1, /*min_participants=*/2);
  // An agent certificate cannot read the status (checked before the agents join: with
  // one round the coordinator exits as soon as it is published). Retried while the
  // coordinator is not listening yet.
  int denied = 0;
  for (int i = 0; i < 100 && coordinator.running(); ++i) {
    denied = RunToCompletion(
        {BinPath("fedlora-admin"), "--coordinator", "127.0.0.1:" + std::to_string(port), "--ca",
         dir_ + "/pki/ca.pem", "--cert", dir_ + "/pki/site-0.pem", "--key",
         dir_ + "/pki/site-0.key", "status"},
        dir_ + "/denied.out", dir_ + "/denied.err", seconds(30));
    if (ReadTextFile(dir_ + "/denied.err").find("Connection refused") == std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_NE(denied, 0);
  EXPECT_THAT(ReadTextFile(dir_ + "/denied.err"), HasSubstr("role admin or viewer"));
  Process agent0 = StartAgent(port, 0);

  // The admin certificate can read the status over TLS: it lists the first agent, online
  // and waiting (the round needs two; on a quiet machine it runs in well under a second,
  // too fast to observe, and the coordinator exits after it).
  bool saw_agents = false;
  for (int i = 0; i < 100 && !saw_agents && coordinator.running(); ++i) {
    int code = RunToCompletion(
        {BinPath("fedlora-admin"), "--coordinator", "127.0.0.1:" + std::to_string(port), "--ca",
         dir_ + "/pki/ca.pem", "--cert", dir_ + "/pki/admin.pem", "--key",
         dir_ + "/pki/admin.key", "status", "--json"},
        dir_ + "/status.out", dir_ + "/status.err", seconds(30));
    if (code == 0) {
      auto status = nlohmann::json::parse(ReadTextFile(dir_ + "/status.out"), nullptr, false);
      if (!status.is_discarded() && status.contains("agents") && status["agents"].size() == 1 &&
          status["agents"][0].dump().find("site-0") != std::string::npos) {
        saw_agents = true;
      }
    }
    if (!saw_agents) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  EXPECT_TRUE(saw_agents) << "admin status never listed the waiting agent; last status: "
                          << ReadTextFile(dir_ + "/status.out") << ReadTextFile(dir_ + "/status.err")
                          << Logs();
  Process agent1 = StartAgent(port, 1);

  auto code = coordinator.Wait(seconds(400));
  ASSERT_TRUE(code.has_value()) << "coordinator did not finish the round" << Logs();
  ASSERT_EQ(*code, 0) << Logs();
  EXPECT_EQ(agent0.Wait(seconds(60)).value_or(-1), 0) << Logs();
  EXPECT_EQ(agent1.Wait(seconds(60)).value_or(-1), 0) << Logs();

  // The summary line.
  std::string out = ReadTextFile(dir_ + "/coordinator.out");
  EXPECT_THAT(out, HasSubstr("round 1: participants=2"));
  auto summary = nlohmann::json::parse(LastNonEmptyLine(out), nullptr, false);
  ASSERT_FALSE(summary.is_discarded()) << out;
  EXPECT_EQ(summary["rounds"], 1);
  ASSERT_EQ(summary["versions"].size(), 1u);
  EXPECT_EQ(summary["versions"][0], "v000001");
  ASSERT_EQ(summary["eval_loss"].size(), 2u);
  for (const auto& v : summary["eval_loss"]) {
    ASSERT_TRUE(v.is_number()) << out;
    EXPECT_TRUE(std::isfinite(v.get<double>()));
    EXPECT_GT(v.get<double>(), 0.0);
  }
  EXPECT_GT(summary["bytes_up"].get<double>(), 0);
  EXPECT_GT(summary["bytes_down"].get<double>(), 0);

  // The stored version, read back from the coordinator's RocksDB store.
  auto store = coordinator::StateStore::Open(dir_ + "/coordinator");
  ASSERT_TRUE(store.ok()) << store.status();
  auto current = (*store)->CurrentVersion();
  ASSERT_TRUE(current.ok()) << current.status();
  EXPECT_EQ(*current, "v000001");
  auto version = (*store)->GetVersion("v000001");
  ASSERT_TRUE(version.ok()) << version.status();
  ASSERT_TRUE(version->has_value());
  const coordinator::VersionRecord& record = **version;
  EXPECT_EQ(record.round_id, 1u);
  EXPECT_EQ(record.quant, "q8_0");
  EXPECT_THAT(record.contributors, ::testing::UnorderedElementsAre("site-0", "site-1"));
  EXPECT_EQ(record.num_examples, 96u);  // 2 sites x 48 training examples

  auto blob = (*store)->GetBlob(record.sha256);
  ASSERT_TRUE(blob.ok()) << blob.status();
  EXPECT_EQ(common::Sha256Hex(*blob), record.sha256);
  EXPECT_EQ(blob->size(), record.size_bytes);
  auto tensors = common::DecodeAdapterBlob(*blob);
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  EXPECT_EQ(tensors->size(), record.shapes.size());
  bool has_q_a = false, has_v_b = false;
  for (const auto& [name, tensor] : *tensors) {
    ASSERT_TRUE(record.shapes.count(name)) << name;
    EXPECT_EQ(tensor.shape, record.shapes.at(name)) << name;
    for (float x : tensor.data) ASSERT_TRUE(std::isfinite(x)) << name;
    if (name.find("self_attn.q_proj.lora_A.weight") != std::string::npos) has_q_a = true;
    if (name.find("self_attn.v_proj.lora_B.weight") != std::string::npos) has_v_b = true;
  }
  EXPECT_TRUE(has_q_a);
  EXPECT_TRUE(has_v_b);

  // The round is closed and its transient updates are gone.
  auto round = (*store)->GetRound(1);
  ASSERT_TRUE(round.ok() && round->has_value());
  EXPECT_EQ((*round)->version_id, "v000001");
  EXPECT_EQ((*round)->updates.size(), 2u);
  auto pending = (*store)->CountUpdates(1);
  ASSERT_TRUE(pending.ok());
  EXPECT_EQ(*pending, 0u);
}

// kill -9 while updates are being collected (one accepted, the round open), then restart
// on the same data directory: the round completes from the stored updates.
TEST_F(FederationTest, CoordinatorKilledDuringCollectResumesTheRound) {
  ASSERT_NO_FATAL_FAILURE(CrashAndRestartWhenLogged("update accepted"));
  auto summary = nlohmann::json::parse(
      LastNonEmptyLine(ReadTextFile(dir_ + "/coordinator-restarted.out")), nullptr, false);
  ASSERT_FALSE(summary.is_discarded());
  EXPECT_EQ(summary["versions"], nlohmann::json::array({"v000001"}));
  ExpectOneCleanVersion();
}

// kill -9 right after the version is published (eval reports still coming): the
// restart keeps the version and publishes nothing twice.
TEST_F(FederationTest, CoordinatorKilledAfterPublishKeepsTheVersion) {
  ASSERT_NO_FATAL_FAILURE(CrashAndRestartWhenLogged("version published"));
  ExpectOneCleanVersion();
}

// kill -9 as soon as the round is opened (SELECT written, tasks on their way): the
// restarted coordinator resends the same round's task; one round, one version.
TEST_F(FederationTest, CoordinatorKilledRightAfterSelectResumesTheSameRound) {
  ASSERT_NO_FATAL_FAILURE(CrashAndRestartWhenLogged("round opened"));
  ExpectOneCleanVersion();
}

// kill -9 once the round entered AGGREGATE (synced before aggregation starts): the
// restart aggregates the stored updates again, each counted once.
TEST_F(FederationTest, CoordinatorKilledDuringAggregateRedoesIt) {
  ASSERT_NO_FATAL_FAILURE(CrashAndRestartWhenLogged("aggregating"));
  ExpectOneCleanVersion();
}

// Async mode (FedBuff): three agents, buffers of two updates, three versions. The
// coordinator is killed with SIGKILL as soon as `marker` is logged and restarted on
// the same directory: every version holds exactly two updates (none lost, none
// counted twice), all three are published once, strategy fedbuff.
class AsyncFederationTest : public FederationTest {
 protected:
  void CrashAndRestartAsyncWhenLogged(const std::string& marker) {
    ASSERT_NO_FATAL_FAILURE(MakeFleet(3));
    max_offline_s_ = 60;
    eval_grace_s_ = 5;
    extra_coordinator_args_ = {
        "--mode", "async", "--async-buffer-size", "2", "--async-max-staleness", "3"};
    int port = PickFreePort();
    Process coordinator = StartCoordinator(port, /*rounds=*/3, /*min_participants=*/1);
    Process agent0 = StartAgent(port, 0);
    Process agent1 = StartAgent(port, 1);
    Process agent2 = StartAgent(port, 2);
    bool seen = false;
    for (int i = 0; i < 6000 && coordinator.running(); ++i) {  // up to ~5 min
      if (ReadTextFile(dir_ + "/coordinator.err").find(marker) != std::string::npos) {
        seen = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ASSERT_TRUE(seen) << "never logged '" << marker << "'" << Logs();
    coordinator.Kill();  // SIGKILL: no shutdown path runs
    Process restarted = StartCoordinator(port, /*rounds=*/3, /*min_participants=*/1, "-restarted");
    auto code = restarted.Wait(seconds(400));
    ASSERT_TRUE(code.has_value()) << "restarted coordinator did not finish"
                                  << ReadTextFile(dir_ + "/coordinator-restarted.err") << Logs();
    ASSERT_EQ(*code, 0) << ReadTextFile(dir_ + "/coordinator-restarted.err");
  }

  void ExpectThreeCleanAsyncVersions() {
    const std::string out = ReadTextFile(dir_ + "/coordinator-restarted.out");
    EXPECT_THAT(out, HasSubstr("strategy=fedbuff mode=async updates=2"));
    auto summary = nlohmann::json::parse(LastNonEmptyLine(out), nullptr, false);
    ASSERT_FALSE(summary.is_discarded()) << out;
    EXPECT_EQ(summary["versions"], nlohmann::json::array({"v000001", "v000002", "v000003"}));
    auto store = coordinator::StateStore::Open(dir_ + "/coordinator");
    ASSERT_TRUE(store.ok()) << store.status();
    EXPECT_EQ((*store)->CurrentVersion().value_or(""), "v000003");
    auto rounds = (*store)->ListRounds();
    ASSERT_TRUE(rounds.ok());
    ASSERT_EQ(rounds->size(), 3u) << "a crash must not open or publish an extra buffer";
    for (const coordinator::RoundRecord& r : *rounds) {
      SCOPED_TRACE(r.round_id);
      EXPECT_EQ(r.mode, "async");
      EXPECT_EQ(r.phase, coordinator::RoundPhase::kDone);
      EXPECT_EQ(r.updates.size(), 2u);
      EXPECT_EQ((*store)->CountUpdates(r.round_id).value_or(99), 0u);
      auto version = (*store)->GetVersion(r.version_id);
      ASSERT_TRUE(version.ok() && version->has_value());
      EXPECT_EQ((*version)->strategy, "fedbuff");
      EXPECT_EQ((*version)->num_examples, 96u) << "an update was lost or counted twice";
      auto blob = (*store)->GetBlob((*version)->sha256);
      ASSERT_TRUE(blob.ok()) << blob.status();
      auto tensors = common::DecodeAdapterBlob(*blob);
      ASSERT_TRUE(tensors.ok()) << tensors.status();
      for (const auto& [name, t] : *tensors) {
        for (float x : t.data) ASSERT_TRUE(std::isfinite(x)) << name;
      }
    }
    EXPECT_FALSE((*store)->GetVersion("v000004").value_or(std::nullopt).has_value());
  }
};

// kill -9 as soon as the first update is buffered.
TEST_F(AsyncFederationTest, KilledWithAnUpdateBufferedKeepsItAndPublishesEachOnce) {
  ASSERT_NO_FATAL_FAILURE(CrashAndRestartAsyncWhenLogged("update accepted"));
  ExpectThreeCleanAsyncVersions();
}

// kill -9 once a buffer went TRAIN -> AGGREGATE: the flush is redone, published once.
TEST_F(AsyncFederationTest, KilledDuringAFlushRedoesIt) {
  ASSERT_NO_FATAL_FAILURE(CrashAndRestartAsyncWhenLogged("aggregating"));
  ExpectThreeCleanAsyncVersions();
}

}  // namespace
}  // namespace fedlora::testing

namespace fedlora::testing {
namespace {

// Bytes of every regular file under `dir`, concatenated (RocksDB SSTs, WAL, logs).
std::string ReadAllFiles(const std::string& dir) {
  std::string all;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file()) all += ReadTextFile(entry.path().string());
  }
  return all;
}

// Three agents: secure aggregation is on by default, here with client-level DP.
// The coordinator publishes a version built from the masked sum only: its store
// holds no individual update (the updates column family stays empty and the only
// blob is the published version), the version records secure aggregation and the
// epsilon spent, and canary strings planted in every site's training data appear
// nowhere in the coordinator's data directory.
TEST_F(FederationTest, SecureAggregationWithDpStoresNoIndividualUpdate) {
  ASSERT_NO_FATAL_FAILURE(MakeFleet(3));
  std::vector<std::string> canaries;
  for (int i = 0; i < 3; ++i) {
    const std::string canary = "CANARY-zq" + std::to_string(7301 * (i + 3)) + "-site";
    canaries.push_back(canary);
    std::ofstream out(dir_ + "/data/site-" + std::to_string(i) + "/train.jsonl", std::ios::app);
    for (int k = 0; k < 8; ++k) {
      out << R"({"instruction":"Extract the fields.","input":"Patient note )" << canary
          << R"( follow-up.","output":"id=)" << canary << R"("})" << "\n";
    }
  }
  extra_coordinator_args_ = {"--dp-clip-norm", "5.0", "--dp-noise-multiplier", "0.3",
                             "--dp-delta", "1e-5"};
  int port = PickFreePort();
  Process coordinator = StartCoordinator(port, /*rounds=*/1, /*min_participants=*/3);
  Process agent0 = StartAgent(port, 0);
  Process agent1 = StartAgent(port, 1);
  Process agent2 = StartAgent(port, 2);
  auto code = coordinator.Wait(seconds(400));
  ASSERT_TRUE(code.has_value()) << "coordinator did not finish the round" << Logs();
  ASSERT_EQ(*code, 0) << Logs();
  const std::string log = ReadTextFile(dir_ + "/coordinator.err");
  EXPECT_THAT(log, HasSubstr("secure aggregation started"));
  EXPECT_THAT(log, HasSubstr("unmasking the sum"));
  EXPECT_THAT(ReadTextFile(dir_ + "/coordinator.out"), HasSubstr("secagg=on"));

  {
    auto store = coordinator::StateStore::Open(dir_ + "/coordinator");
    ASSERT_TRUE(store.ok()) << store.status();
    auto version = (*store)->GetVersion("v000001");
    ASSERT_TRUE(version.ok() && version->has_value()) << Logs();
    const coordinator::VersionRecord& v = **version;
    EXPECT_TRUE(v.secure_aggregation);
    ASSERT_TRUE(v.dp_epsilon.has_value());
    EXPECT_GT(*v.dp_epsilon, 0.0);
    EXPECT_TRUE(std::isfinite(*v.dp_epsilon));
    EXPECT_THAT(v.contributors, ::testing::UnorderedElementsAre("site-0", "site-1", "site-2"));
    auto blob = (*store)->GetBlob(v.sha256);
    ASSERT_TRUE(blob.ok());
    auto tensors = common::DecodeAdapterBlob(*blob);
    ASSERT_TRUE(tensors.ok()) << tensors.status();
    EXPECT_EQ(tensors->size(), v.shapes.size());
    auto round = (*store)->GetRound(1);
    ASSERT_TRUE(round.ok() && round->has_value());
    EXPECT_TRUE((*round)->secure_aggregation);
    EXPECT_EQ((*round)->secagg_contributors.size(), 3u);
    EXPECT_FALSE((*round)->dp_accountant_state.empty());
    // No individual update: nothing in `updates`, one blob (the version) in `blobs`.
    int updates = 0, blobs = 0;
    ASSERT_TRUE((*store)
                    ->raw()
                    ->Scan("updates", "",
                           [&](std::string_view, std::string_view) {
                             ++updates;
                             return true;
                           })
                    .ok());
    ASSERT_TRUE((*store)
                    ->raw()
                    ->Scan("blobs", "",
                           [&](std::string_view, std::string_view) {
                             ++blobs;
                             return true;
                           })
                    .ok());
    EXPECT_EQ(updates, 0);
    EXPECT_EQ(blobs, 1);
  }
  const std::string bytes = ReadAllFiles(dir_ + "/coordinator") + log;
  for (const std::string& canary : canaries) {
    EXPECT_EQ(bytes.find(canary), std::string::npos) << canary << " leaked to the coordinator";
  }
  EXPECT_EQ(agent0.Wait(seconds(60)).value_or(-1), 0) << Logs();
  EXPECT_EQ(agent1.Wait(seconds(60)).value_or(-1), 0) << Logs();
  EXPECT_EQ(agent2.Wait(seconds(60)).value_or(-1), 0) << Logs();
}

}  // namespace
}  // namespace fedlora::testing
