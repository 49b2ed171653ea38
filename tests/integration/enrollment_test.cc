// End to end with the real binaries: fedlora-admin issues an enrollment token,
// fedlora-agent enrolls (key generated on the "device"), renews with its current
// certificate, is revoked by fedlora-admin, and is then refused; and the same in
// admin-approval mode (enroll without a token, enroll pending / approve / deny).

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/crypto/crypto.h"
#include "common/crypto/pki.h"
#include "tests/integration/process_util.h"

namespace fedlora::testing {
namespace {

using ::testing::HasSubstr;

class EnrollmentTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = MakeTempDir("fedlora-enrollment"); }
  void TearDown() override {
    if (!HasFailure()) RemoveTree(dir_);
  }
  int Run(const std::vector<std::string>& argv, const std::string& name) {
    return RunToCompletion(argv, dir_ + "/" + name + ".out", dir_ + "/" + name + ".err",
                           std::chrono::seconds(60));
  }
  std::string Out(const std::string& name) { return ReadTextFile(dir_ + "/" + name + ".out"); }
  std::string Err(const std::string& name) { return ReadTextFile(dir_ + "/" + name + ".err"); }
  std::vector<std::string> Admin(std::vector<std::string> args) {
    std::vector<std::string> argv = {BinPath("fedlora-admin"), "--coordinator", main_,
                                     "--ca",  dir_ + "/pki/ca.pem", "--cert",
                                     dir_ + "/pki/admin.pem", "--key", dir_ + "/pki/admin.key"};
    argv.insert(argv.end(), args.begin(), args.end());
    return argv;
  }
  std::string dir_;
  std::string main_;
};

TEST_F(EnrollmentTest, EnrollRenewRevokeWithTheRealBinaries) {
  ASSERT_EQ(Run({BinPath("fedlora-admin"), "pki", "init", dir_ + "/pki"}, "pki"), 0)
      << Err("pki");
  const int port = PickFreePort();
  const int enroll_port = PickFreePort();
  main_ = "127.0.0.1:" + std::to_string(port);
  const std::string enroll = "127.0.0.1:" + std::to_string(enroll_port);
  Process coordinator = Process::Start(
      {BinPath("fedlora-coordinator"), "--listen-address", main_, "--enroll-address", enroll,
       "--ca-key", dir_ + "/pki/ca.key", "--data-dir", dir_ + "/data", "--tls-ca",
       dir_ + "/pki/ca.pem", "--tls-cert", dir_ + "/pki/coordinator.pem", "--tls-key",
       dir_ + "/pki/coordinator.key", "--base-model-hash", std::string(64, 'b'),
       "--min-participants", "5", "--max-participants", "5"},
      dir_ + "/coordinator.out", dir_ + "/coordinator.err");
  // Wait until it serves.
  bool up = false;
  for (int i = 0; i < 200 && !up; ++i) {
    up = Run(Admin({"status"}), "status") == 0;
    if (!up) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(up) << Err("status") << ReadTextFile(dir_ + "/coordinator.err");

  ASSERT_EQ(Run(Admin({"enroll", "create", "--name", "site-a", "--expires", "1h"}), "token"), 0)
      << Err("token");
  const std::string out = Out("token");
  const std::string token = out.substr(out.rfind(":\n") + 2, 64);
  ASSERT_EQ(token.size(), 64u) << out;

  std::filesystem::create_directories(dir_ + "/site");
  const std::vector<std::string> enroll_cmd = {
      BinPath("fedlora-agent"), "enroll", "--coordinator", enroll, "--token", token, "--ca",
      dir_ + "/pki/ca.pem", "--name", "site-a", "--out", dir_ + "/site"};
  ASSERT_EQ(Run(enroll_cmd, "enroll"), 0) << Err("enroll");
  EXPECT_THAT(Out("enroll"), HasSubstr("enrolled 'site-a'"));
  auto id = common::ReadCertIdentity(ReadTextFile(dir_ + "/site/site-a.pem"));
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(id->role, "agent");
  // The token is spent.
  std::filesystem::create_directories(dir_ + "/site2");
  std::vector<std::string> again = enroll_cmd;
  again.back() = dir_ + "/site2";
  EXPECT_EQ(Run(again, "enroll-again"), 1);
  EXPECT_THAT(Err("enroll-again"), HasSubstr("already used"));

  const std::vector<std::string> renew_cmd = {
      BinPath("fedlora-agent"), "renew", "--coordinator", main_, "--ca", dir_ + "/pki/ca.pem",
      "--cert", dir_ + "/site/site-a.pem", "--key", dir_ + "/site/site-a.key"};
  const std::string before = ReadTextFile(dir_ + "/site/site-a.pem");
  ASSERT_EQ(Run(renew_cmd, "renew"), 0) << Err("renew");
  EXPECT_THAT(Out("renew"), HasSubstr("renewed"));
  EXPECT_NE(ReadTextFile(dir_ + "/site/site-a.pem"), before);

  // `run --renew-within-days` renews at start (it then stops: this fleet has no data).
  std::filesystem::create_directories(dir_ + "/no-model");
  ASSERT_TRUE(common::WriteFileAtomic(dir_ + "/empty.jsonl", "").ok());
  const std::string before_run = ReadTextFile(dir_ + "/site/site-a.pem");
  Run({BinPath("fedlora-agent"), "run", "--coordinator", main_, "--ca", dir_ + "/pki/ca.pem",
       "--cert", dir_ + "/site/site-a.pem", "--key", dir_ + "/site/site-a.key", "--model",
       dir_ + "/no-model", "--data", dir_ + "/empty.jsonl", "--eval", dir_ + "/empty.jsonl",
       "--renew-within-days", "3650"},
      "run-renew");
  EXPECT_THAT(Err("run-renew"), HasSubstr("renewed"));
  EXPECT_NE(ReadTextFile(dir_ + "/site/site-a.pem"), before_run);

  ASSERT_EQ(Run(Admin({"agents", "revoke", "site-a", "--reason", "test"}), "revoke"), 0)
      << Err("revoke");
  // Refused in the TLS handshake: the agent sees UNAVAILABLE, the coordinator logs why.
  EXPECT_EQ(Run(renew_cmd, "renew-revoked"), 1);
  EXPECT_THAT(Err("renew-revoked"), HasSubstr("UNAVAILABLE"));
  EXPECT_THAT(ReadTextFile(dir_ + "/coordinator.err"),
              HasSubstr("TLS handshake refused: certificate revoked"));

  coordinator.Signal(SIGTERM);
  EXPECT_EQ(coordinator.Wait(std::chrono::seconds(30)), 0) << ReadTextFile(dir_ + "/coordinator.err");
}

// Admin-approval mode with the real binaries: `fedlora-agent enroll` without a
// token waits, printing its key fingerprint; the admin sees the same fingerprint
// in `enroll pending`, approves (the agent then writes its certificate and exits 0)
// or denies (the agent exits 1 with the reason).
TEST_F(EnrollmentTest, AdminApprovalWithTheRealBinaries) {
  ASSERT_EQ(Run({BinPath("fedlora-admin"), "pki", "init", dir_ + "/pki"}, "pki"), 0)
      << Err("pki");
  main_ = "127.0.0.1:" + std::to_string(PickFreePort());
  const std::string enroll = "127.0.0.1:" + std::to_string(PickFreePort());
  Process coordinator = Process::Start(
      {BinPath("fedlora-coordinator"), "--listen-address", main_, "--enroll-address", enroll,
       "--enrollment-approval", "admin", "--ca-key", dir_ + "/pki/ca.key", "--data-dir",
       dir_ + "/data", "--tls-ca", dir_ + "/pki/ca.pem", "--tls-cert",
       dir_ + "/pki/coordinator.pem", "--tls-key", dir_ + "/pki/coordinator.key",
       "--base-model-hash", std::string(64, 'b'), "--min-participants", "5"},
      dir_ + "/coordinator.out", dir_ + "/coordinator.err");
  bool up = false;
  for (int i = 0; i < 200 && !up; ++i) {
    up = Run(Admin({"status"}), "status") == 0;
    if (!up) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(up) << Err("status") << ReadTextFile(dir_ + "/coordinator.err");

  for (const std::string site : {"site-b", "site-c"}) {
    const bool approve = site == "site-b";
    std::filesystem::create_directories(dir_ + "/" + site);
    Process agent = Process::Start({BinPath("fedlora-agent"), "enroll", "--coordinator", enroll,
                                    "--ca", dir_ + "/pki/ca.pem", "--name", site, "--out",
                                    dir_ + "/" + site, "--poll-s", "1", "--wait-s", "300"},
                                   dir_ + "/agent-" + site + ".out",
                                   dir_ + "/agent-" + site + ".err");
    // The request shows up in `enroll pending`.
    std::string line;
    for (int i = 0; i < 600 && line.empty(); ++i) {
      if (Run(Admin({"enroll", "pending"}), "pending") == 0) {
        std::istringstream in(Out("pending"));
        for (std::string l; std::getline(in, l);) {
          if (l.find("  " + site + "  ") != std::string::npos) line = l;
        }
      }
      if (line.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    ASSERT_FALSE(line.empty()) << Out("pending") << Err("pending");
    std::istringstream fields(line);
    std::string id, name, fingerprint;
    fields >> id >> name >> fingerprint;
    ASSERT_EQ(id.size(), 32u) << line;
    EXPECT_EQ(fingerprint.size(), 64u) << line;
    EXPECT_FALSE(std::filesystem::exists(dir_ + "/" + site + "/" + site + ".pem"));
    // The agent printed the same fingerprint (the out-of-band check).
    bool printed = false;
    for (int i = 0; i < 600 && !printed; ++i) {
      printed = ReadTextFile(dir_ + "/agent-" + site + ".out").find(fingerprint) !=
                std::string::npos;
      if (!printed) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    EXPECT_TRUE(printed) << ReadTextFile(dir_ + "/agent-" + site + ".out");

    ASSERT_EQ(Run(Admin({"enroll", approve ? "approve" : "deny", id, "--reason", "checked"}),
                  "decide"),
              0)
        << Err("decide");
    auto code = agent.Wait(std::chrono::seconds(120));
    ASSERT_TRUE(code.has_value()) << "the agent did not notice the decision";
    const std::string agent_out = ReadTextFile(dir_ + "/agent-" + site + ".out");
    const std::string agent_err = ReadTextFile(dir_ + "/agent-" + site + ".err");
    if (approve) {
      EXPECT_EQ(*code, 0) << agent_err;
      EXPECT_THAT(agent_out, HasSubstr("enrolled 'site-b'"));
      auto cert = common::ReadCertIdentity(ReadTextFile(dir_ + "/site-b/site-b.pem"));
      ASSERT_TRUE(cert.ok());
      EXPECT_EQ(cert->role, "agent");
    } else {
      EXPECT_EQ(*code, 1);
      EXPECT_THAT(agent_err, HasSubstr("denied by admin: checked"));
      EXPECT_FALSE(std::filesystem::exists(dir_ + "/site-c/site-c.key"));
    }
  }
  coordinator.Signal(SIGTERM);
  EXPECT_EQ(coordinator.Wait(std::chrono::seconds(30)), 0) << ReadTextFile(dir_ + "/coordinator.err");
}

}  // namespace
}  // namespace fedlora::testing
