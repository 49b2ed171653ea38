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
    config.enrollment_approval = approval_;
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
  std::string approval_ = "token";
  std::ostringstream out_;
  std::unique_ptr<CoordinatorServer> server_;
};

class SecurityCliApprovalTest : public SecurityCliServerTest {
 protected:
  void SetUp() override {
    approval_ = "admin";
    SecurityCliServerTest::SetUp();
  }
  // Files a request for `name` as an agent would (enrollment port, no token).
  EnrollmentRequestInfo File(const std::string& name) {
    auto kc = common::GenerateKeyAndCsr(name);
    EXPECT_TRUE(kc.ok());
    auto info = server_->identity()->RequestEnrollment(kc->csr_pem, "ipv4:192.0.2.7:5555");
    EXPECT_TRUE(info.ok()) << info.status();
    return *info;
  }
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

TEST_F(SecurityCliApprovalTest, EnrollPendingApproveDeny) {
  CliResult r = Run({"enroll", "pending"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("no enrollment requests pending"));
  const EnrollmentRequestInfo a = File("site-a");
  const EnrollmentRequestInfo b = File("site-b");
  r = Run({"enroll", "pending"});
  ASSERT_EQ(r.code, 0) << r.err;
  for (const EnrollmentRequestInfo* x : {&a, &b}) {
    EXPECT_THAT(r.out, HasSubstr(x->id + "  " + x->agent_id + "  " + x->key_fingerprint));
  }
  EXPECT_THAT(r.out, HasSubstr("ipv4:192.0.2.7:5555"));
  EXPECT_LT(r.out.find("site-a"), r.out.find("site-b")) << "oldest first";

  r = Run({"enroll", "approve", a.id, "--reason", "called the site"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("for 'site-a' (key " + a.key_fingerprint + ") approved"));
  EXPECT_EQ(server_->identity()->GetEnrollmentRequest(a.id)->state, "approved");
  r = Run({"enroll", "deny", b.id, "--reason", "unknown"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("denied"));
  EXPECT_EQ(server_->identity()->GetEnrollmentRequest(b.id)->state, "denied");
  r = Run({"enroll", "pending"});
  EXPECT_THAT(r.out, HasSubstr("no enrollment requests pending"));

  // Errors: decided already, unknown id, not an admin.
  r = Run({"enroll", "approve", b.id});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("is denied"));
  r = Run({"enroll", "approve", std::string(32, 'f')});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("not found"));
  const EnrollmentRequestInfo c = File("site-c");
  for (const std::string who : {"viewer-1", "agent-1"}) {
    r = Run({"enroll", "approve", c.id}, who);
    EXPECT_EQ(r.code, 1) << who;
    EXPECT_THAT(r.err, HasSubstr("role admin")) << who;
    EXPECT_EQ(Run({"enroll", "pending"}, who).code, 1) << who;
  }
  EXPECT_EQ(server_->identity()->GetEnrollmentRequest(c.id)->state, "pending");
}

TEST_F(SecurityCliServerTest, EnrollPendingInTokenModeSaysSo) {
  CliResult r = Run({"enroll", "pending"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("one-time tokens only"));
}

}  // namespace
}  // namespace fedlora::coordinator
