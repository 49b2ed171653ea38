// fedlora-admin end to end, in process: PKI commands, and `status` against a
// real server started on 127.0.0.1:0.
#include "coordinator/admin/admin_cli.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <sstream>

#include "common/crypto/crypto.h"
#include "common/crypto/pki.h"
#include "coordinator/server.h"
#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;
using testing::kBaseHash;
using testing::TempDir;

struct CliResult {
  int code;
  std::string out;
  std::string err;
};

CliResult RunCli(std::vector<std::string> args) {
  args.insert(args.begin(), "fedlora-admin");
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  std::ostringstream out, err;
  int code = RunAdminCli(static_cast<int>(argv.size()), argv.data(), out, err);
  return {code, out.str(), err.str()};
}

TEST(AdminCliTest, PkiInitIssueAndStatus) {
  TempDir dir;
  const std::string pki = dir.Sub("pki");
  CliResult init = RunCli({"pki", "init", pki, "--san", "localhost", "--san", "127.0.0.1"});
  ASSERT_EQ(init.code, 0) << init.err;
  for (const char* f : {"ca.pem", "ca.key", "coordinator.pem", "admin.pem", "admin.key"}) {
    EXPECT_TRUE(common::ReadFileToString(pki + "/" + f).ok()) << f;
  }
  // A second init refuses to overwrite the CA.
  EXPECT_EQ(RunCli({"pki", "init", pki}).code, 1);

  CliResult issue = RunCli(
      {"pki", "issue", "--ca-dir", pki, "--name", "agent-7", "--role", "agent", "--out", pki});
  ASSERT_EQ(issue.code, 0) << issue.err;
  auto pem = common::ReadFileToString(pki + "/agent-7.pem");
  ASSERT_TRUE(pem.ok());
  auto id = common::ReadCertIdentity(*pem);
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(id->common_name, "agent-7");
  EXPECT_EQ(id->role, "agent");
  EXPECT_EQ(
      RunCli({"pki", "issue", "--ca-dir", pki, "--name", "x", "--role", "root", "--out", pki}).code,
      2);

  CoordinatorConfig config;
  config.listen_address = "127.0.0.1:0";
  config.data_dir = dir.Sub("data");
  config.tls_ca = pki + "/ca.pem";
  config.tls_cert = pki + "/coordinator.pem";
  config.tls_key = pki + "/coordinator.key";
  config.base_model_hash = kBaseHash;
  config.coordinator_id = "coord-under-test";
  std::ostringstream server_out;
  ServerOptions options;
  options.out = &server_out;
  auto server = CoordinatorServer::Start(config, options);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string target = "127.0.0.1:" + std::to_string((*server)->port());
  const std::vector<std::string> admin = {"--coordinator", target,
                                          "--ca",          pki + "/ca.pem",
                                          "--cert",        pki + "/admin.pem",
                                          "--key",         pki + "/admin.key",
                                          "--timeout-s",   "10"};
  std::vector<std::string> args = admin;
  args.push_back("status");
  CliResult text = RunCli(args);
  ASSERT_EQ(text.code, 0) << text.err;
  EXPECT_THAT(text.out, HasSubstr("coordinator:      coord-under-test"));
  EXPECT_THAT(text.out, HasSubstr("round:            0 (IDLE)"));
  EXPECT_THAT(text.out, HasSubstr("updates rejected: 0"));

  args.push_back("--json");
  CliResult json = RunCli(args);
  ASSERT_EQ(json.code, 0) << json.err;
  auto j = nlohmann::json::parse(json.out);
  EXPECT_EQ(j["coordinator_id"], "coord-under-test");
  EXPECT_EQ(j["current_phase"], "IDLE");

  // An agent certificate may not call Admin.Status.
  std::vector<std::string> as_agent = {"--coordinator", target,
                                       "--ca",          pki + "/ca.pem",
                                       "--cert",        pki + "/agent-7.pem",
                                       "--key",         pki + "/agent-7.key",
                                       "status"};
  CliResult denied = RunCli(as_agent);
  EXPECT_EQ(denied.code, 1);
  EXPECT_THAT(denied.err, HasSubstr("code 7"));
  EXPECT_THAT(denied.err, HasSubstr("role 'agent'"));

  // Missing connection flags is a usage error.
  EXPECT_EQ(RunCli({"status"}).code, 2);
  EXPECT_EQ(RunCli({}).code, 2);
  (*server)->Shutdown();
}

TEST(AdminCliTest, HelpExitsZero) {
  CliResult help = RunCli({"--help"});
  EXPECT_EQ(help.code, 0);
  EXPECT_THAT(help.out, HasSubstr("status"));
  CliResult issue_help = RunCli({"pki", "issue", "--help"});
  EXPECT_EQ(issue_help.code, 0);
  EXPECT_THAT(issue_help.out, HasSubstr("--role"));
}

}  // namespace
}  // namespace fedlora::coordinator
