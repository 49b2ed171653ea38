// fedlora-admin enroll create / agents revoke against a real coordinator.
#include "coordinator/admin/security_cli.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sstream>

#include "common/crypto/crypto.h"
#include "common/crypto/pki.h"
#include "coordinator/admin/admin_cli.h"
#include "coordinator/server.h"
#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;
using testing::kBaseHash;
using testing::CliResult;
using testing::RunCli;
using testing::TempDir;


TEST(SecurityCliTest, ParseDuration) {
  std::string error;
  EXPECT_EQ(ParseDurationSeconds("90s", &error), 90u);
  EXPECT_EQ(ParseDurationSeconds("30m", &error), 1800u);
  EXPECT_EQ(ParseDurationSeconds("24h", &error), 86400u);
  EXPECT_EQ(ParseDurationSeconds("7d", &error), 7u * 86400);
  for (const char* bad : {"", "h", "0h", "12", "1.5h", "-3h", "3w", "99999999999h"}) {
    EXPECT_FALSE(ParseDurationSeconds(bad, &error).has_value()) << bad;
    EXPECT_THAT(error, HasSubstr("expected a duration"));
  }
}

class SecurityCliServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pki_ = dir_.Sub("pki");
    ASSERT_TRUE(common::InitPki(pki_).ok());
    ASSERT_TRUE(common::IssueCertificate(pki_, "agent-1", common::CertRole::kAgent, pki_).ok());
    ASSERT_TRUE(common::IssueCertificate(pki_, "viewer-1", common::CertRole::kViewer, pki_).ok());
    CoordinatorConfig config;
    config.listen_address = "127.0.0.1:0";
    config.enroll_address = "127.0.0.1:0";
    config.ca_key = pki_ + "/ca.key";
    config.data_dir = dir_.Sub("data");
    config.tls_ca = pki_ + "/ca.pem";
    config.tls_cert = pki_ + "/coordinator.pem";
    config.tls_key = pki_ + "/coordinator.key";
    config.base_model_hash = kBaseHash;
    ServerOptions options;
    options.out = &out_;
    auto server = CoordinatorServer::Start(config, options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
  }

  CliResult Run(std::vector<std::string> args, const std::string& who = "admin") {
    std::vector<std::string> full = {"--coordinator",
                                     "127.0.0.1:" + std::to_string(server_->port()),
                                     "--ca",
                                     pki_ + "/ca.pem",
                                     "--cert",
                                     pki_ + "/" + who + ".pem",
                                     "--key",
                                     pki_ + "/" + who + ".key"};
    full.insert(full.end(), args.begin(), args.end());
    return RunCli(std::move(full));
  }

  TempDir dir_;
  std::string pki_;
  std::ostringstream out_;
  std::unique_ptr<CoordinatorServer> server_;
};

TEST_F(SecurityCliServerTest, EnrollCreatePrintsATokenOnce) {
  CliResult r = Run({"enroll", "create", "--name", "site-a", "--expires", "2h"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("enrollment token for 'site-a'"));
  const std::string token = r.out.substr(r.out.rfind(":\n") + 2, 64);
  auto record = server_->store()->GetSecurityRecord("token/" + common::Sha256Hex(token));
  ASSERT_TRUE(record.ok());
  EXPECT_TRUE(record->has_value()) << "the printed token is the stored one";

  CliResult viewer = Run({"enroll", "create", "--name", "site-b"}, "viewer-1");
  EXPECT_EQ(viewer.code, 1);
  EXPECT_THAT(viewer.err, HasSubstr("role admin"));
  CliResult bad = Run({"enroll", "create", "--name", "site-b", "--expires", "soon"});
  EXPECT_EQ(bad.code, 2);
  CliResult bad_name = Run({"enroll", "create", "--name", "../x"});
  EXPECT_EQ(bad_name.code, 1);
  EXPECT_THAT(bad_name.err, HasSubstr("certificate name"));
}

TEST_F(SecurityCliServerTest, AgentsRevoke) {
  CliResult r = Run({"agents", "revoke", "agent-1", "--reason", "stolen"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("agent 'agent-1' revoked"));
  EXPECT_TRUE(server_->identity()->IsRevoked("agent-1"));
  r = Run({"agents", "revoke", "agent-1"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("already revoked"));
  CliResult agent = Run({"agents", "revoke", "agent-1"}, "agent-1");
  EXPECT_EQ(agent.code, 1);
}

}  // namespace
}  // namespace fedlora::coordinator
