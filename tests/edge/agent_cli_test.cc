// fedlora-agent's command line, run as a separate process (FEDLORA_BIN_DIR).

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "common/crypto/crypto.h"
#include "common/crypto/pki.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/test_util.h"

namespace fedlora::edge {
namespace {

using ::testing::HasSubstr;

using Result = ::fedlora::testutil::CommandResult;

Result RunAgentCli(const std::string& args) {
  return ::fedlora::testutil::RunBinary("fedlora-agent", args);
}

class AgentCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/fedlora_agent_cli_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    for (const char* f : {"ca.pem", "agent.pem", "agent.key"}) {
      ASSERT_TRUE(common::WriteFileAtomic(dir_ + "/" + f, "unused").ok());
    }
    std::filesystem::create_directories(dir_ + "/model");
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string RunArgs(const std::string& data, const std::string& eval) {
    return "run --coordinator localhost:1 --ca " + dir_ + "/ca.pem --cert " + dir_ +
           "/agent.pem --key " + dir_ + "/agent.key --model " + dir_ + "/model --data " + data +
           " --eval " + eval;
  }
  std::string dir_;
};

TEST_F(AgentCliTest, BadTrainingLineIsReportedWithItsLineNumber) {
  const std::string good = R"({"instruction":"a","input":"b","output":"c"})";
  ASSERT_TRUE(common::WriteFileAtomic(dir_ + "/train.jsonl", good + "\n{not json\n").ok());
  ASSERT_TRUE(common::WriteFileAtomic(dir_ + "/eval.jsonl", good + "\n").ok());
  Result r = RunAgentCli(RunArgs(dir_ + "/train.jsonl", dir_ + "/eval.jsonl"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_THAT(r.output, HasSubstr("--data"));
  EXPECT_THAT(r.output, HasSubstr("train.jsonl:2"));
}

TEST_F(AgentCliTest, MissingFlagsAndFilesAreRefused) {
  Result r = RunAgentCli("run --coordinator localhost:1");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("--ca"));
  Result missing = RunAgentCli(RunArgs(dir_ + "/nope.jsonl", dir_ + "/nope.jsonl"));
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_THAT(missing.output, HasSubstr("nope.jsonl"));
  Result help = RunAgentCli("run --help");
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_THAT(help.output, HasSubstr("--max-offline"));
}

TEST_F(AgentCliTest, TrainingAndEvaluationFlags) {
  Result help = RunAgentCli("run --help");
  EXPECT_EQ(help.exit_code, 0);
  for (const char* flag : {"--bf16", "--pack", "--grad-checkpoint", "--progress-every", "--replay",
                           "--replay-fraction",
                           "--forgetting-probe", "--eval-generate", "--base-dtype"}) {
    EXPECT_THAT(help.output, HasSubstr(flag));
  }
  const std::string good = R"({"instruction":"a","input":"b","output":"c"})";
  ASSERT_TRUE(common::WriteFileAtomic(dir_ + "/train.jsonl", good + "\n").ok());
  ASSERT_TRUE(
      common::WriteFileAtomic(dir_ + "/general.jsonl", "{\"text\":\"fine\"}\n{\"text\": 3}\n")
          .ok());
  const std::string base = RunArgs(dir_ + "/train.jsonl", dir_ + "/train.jsonl");
  Result replay = RunAgentCli(base + " --replay " + dir_ + "/general.jsonl");
  EXPECT_EQ(replay.exit_code, 2) << replay.output;
  EXPECT_THAT(replay.output, HasSubstr("--replay"));
  EXPECT_THAT(replay.output, HasSubstr("general.jsonl:2"));
  Result probe = RunAgentCli(base + " --forgetting-probe " + dir_ + "/general.jsonl");
  EXPECT_EQ(probe.exit_code, 2) << probe.output;
  EXPECT_THAT(probe.output, HasSubstr("--forgetting-probe"));
  Result fraction = RunAgentCli(base + " --replay-fraction 1.5");
  EXPECT_NE(fraction.exit_code, 0);
  EXPECT_THAT(fraction.output, HasSubstr("--replay-fraction"));
  Result dtype = RunAgentCli(base + " --base-dtype int3");
  EXPECT_NE(dtype.exit_code, 0);
  EXPECT_THAT(dtype.output, HasSubstr("--base-dtype"));
}

TEST_F(AgentCliTest, BadModelFolderIsAClearError) {
  const std::string good = R"({"instruction":"a","input":"b","output":"c"})";
  ASSERT_TRUE(common::WriteFileAtomic(dir_ + "/train.jsonl", good + "\n").ok());
  Result r = RunAgentCli(RunArgs(dir_ + "/train.jsonl", dir_ + "/train.jsonl"));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_THAT(r.output, HasSubstr("--model"));
}

// Starts fedlora-agent with stdout+stderr to `log`; returns its pid (or -1).
pid_t SpawnAgent(const std::vector<std::string>& args, const std::string& log) {
  const std::string bin = std::string(FEDLORA_BIN_DIR) + "/fedlora-agent";
  std::vector<std::string> all = {bin};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  pid_t pid = -1;
  if (posix_spawn(&pid, bin.c_str(), &actions, nullptr, argv.data(), environ) != 0) pid = -1;
  posix_spawn_file_actions_destroy(&actions);
  return pid;
}

// Waits up to `timeout` for `pid`; returns its exit code, or -1 (killed after the timeout).
int WaitExit(pid_t pid, std::chrono::milliseconds timeout) {
  auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  kill(pid, SIGKILL);
  waitpid(pid, nullptr, 0);
  return -1;
}

class AgentProcessTest : public AgentCliTest {
 protected:
  void SetUp() override {
    AgentCliTest::SetUp();
    ASSERT_TRUE(common::InitPki(dir_ + "/pki").ok());
    ASSERT_TRUE(
        common::IssueCertificate(dir_ + "/pki", "site-9", common::CertRole::kAgent, dir_ + "/pki")
            .ok());
    const std::string good = R"({"instruction":"a","input":"b","output":"c"})";
    ASSERT_TRUE(common::WriteFileAtomic(dir_ + "/train.jsonl", good + "\n").ok());
  }
  std::vector<std::string> Args() {
    // Port 1 on localhost: nothing listens there, connections are refused.
    return {"run", "--coordinator", "127.0.0.1:1", "--ca", dir_ + "/pki/ca.pem", "--cert",
            dir_ + "/pki/site-9.pem", "--key", dir_ + "/pki/site-9.key", "--model",
            std::string(FEDLORA_FIXTURES) + "/hf/llama", "--data", dir_ + "/train.jsonl",
            "--eval", dir_ + "/train.jsonl", "--threads", "1"};
  }
};

TEST_F(AgentProcessTest, SigtermStopsTheAgentCleanly) {
  const std::string log = dir_ + "/agent.log";
  pid_t pid = SpawnAgent(Args(), log);
  ASSERT_GT(pid, 0);
  // Wait until it runs (model loaded, first connection attempt logged).
  for (int i = 0; i < 500; ++i) {
    auto text = common::ReadFileToString(log);
    if (text.ok() && text->find("reconnecting") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_EQ(kill(pid, SIGTERM), 0);
  EXPECT_EQ(WaitExit(pid, std::chrono::seconds(10)), 0);
  auto text = common::ReadFileToString(log);
  ASSERT_TRUE(text.ok());
  EXPECT_THAT(*text, HasSubstr("[agent site-9]"));
  EXPECT_THAT(*text, HasSubstr("stop requested"));
  EXPECT_THAT(*text, HasSubstr("stopped:"));
}

TEST_F(AgentProcessTest, ExitsOnItsOwnAfterMaxOffline) {
  std::vector<std::string> args = Args();
  args.insert(args.end(), {"--max-offline", "0.5"});
  const std::string log = dir_ + "/agent.log";
  pid_t pid = SpawnAgent(args, log);
  ASSERT_GT(pid, 0);
  EXPECT_EQ(WaitExit(pid, std::chrono::seconds(15)), 0);
  auto text = common::ReadFileToString(log);
  ASSERT_TRUE(text.ok());
  EXPECT_THAT(*text, HasSubstr("--max-offline"));
}

}  // namespace
}  // namespace fedlora::edge
