// fedlora-admin versions / backup end to end, in process: a real coordinator on
// 127.0.0.1:0 serving a data dir seeded with a chain of versions, driven through
// RunAdminCli (Admin.ListVersions / RollbackVersion / PromoteVersion / CreateBackup),
// then a second coordinator started on the backup (the documented restore).
#include "coordinator/admin/ops_cli.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/crypto/at_rest.h"
#include "common/crypto/crypto.h"
#include "common/crypto/pki.h"
#include "coordinator/admin/admin_cli.h"
#include "coordinator/audit.h"
#include "coordinator/server.h"
#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;
using testing::kBaseHash;
using testing::SeedVersionChain;
using testing::CliResult;
using testing::RunCli;
using testing::TempDir;



class OpsCliTest : public ::testing::TestWithParam<bool> {  // param: encrypted at rest
 protected:
  void SetUp() override {
    pki_ = dir_.Sub("pki");
    ASSERT_TRUE(common::InitPki(pki_).ok());
    ASSERT_TRUE(common::IssueCertificate(pki_, "viewer-1", common::CertRole::kViewer, pki_).ok());
    config_.listen_address = "127.0.0.1:0";
    config_.data_dir = dir_.Sub("data");
    config_.tls_ca = pki_ + "/ca.pem";
    config_.tls_cert = pki_ + "/coordinator.pem";
    config_.tls_key = pki_ + "/coordinator.key";
    config_.base_model_hash = kBaseHash;
    config_.min_participants = 2;
    config_.tick_ms = 20;
    if (GetParam()) {
      config_.at_rest_key = dir_.Sub("at-rest.key");
      ASSERT_TRUE(common::WriteNewAtRestKeyFile(config_.at_rest_key).ok());
    }
    {
      auto options = StateStoreOptionsFromConfig(config_);
      ASSERT_TRUE(options.ok()) << options.status();
      auto store = StateStore::Open(config_.data_dir, *options);
      ASSERT_TRUE(store.ok()) << store.status();
      versions_ = SeedVersionChain(store->get(), 3);
    }
    server_ = Start(config_);
    ASSERT_NE(server_, nullptr);
  }
  void TearDown() override {
    if (server_) server_->Shutdown();
  }

  std::unique_ptr<CoordinatorServer> Start(const CoordinatorConfig& config) {
    ServerOptions options;
    options.out = &server_out_;
    auto server = CoordinatorServer::Start(config, options);
    EXPECT_TRUE(server.ok()) << server.status();
    return server.ok() ? std::move(*server) : nullptr;
  }

  // Global connection flags for `name`'s certificate, then `args`.
  std::vector<std::string> As(const std::string& name, std::vector<std::string> args,
                              CoordinatorServer* server = nullptr) {
    if (server == nullptr) server = server_.get();
    std::vector<std::string> out = {"--coordinator", "127.0.0.1:" + std::to_string(server->port()),
                                    "--ca",          pki_ + "/ca.pem",
                                    "--cert",        pki_ + "/" + name + ".pem",
                                    "--key",         pki_ + "/" + name + ".key",
                                    "--timeout-s",   "20"};
    out.insert(out.end(), args.begin(), args.end());
    return out;
  }

  std::string Current() { return *server_->store()->CurrentVersion(); }

  TempDir dir_;
  std::string pki_;
  CoordinatorConfig config_;
  std::ostringstream server_out_;
  std::unique_ptr<CoordinatorServer> server_;
  std::vector<VersionRecord> versions_;
};

TEST_P(OpsCliTest, VersionsListFromTheDataDirAndThroughTheAdminService) {
  // Read-only on the data dir while the coordinator holds it.
  CliResult local = RunCli({"versions", "list", "--data-dir", config_.data_dir});
  ASSERT_EQ(local.code, 0) << local.err;
  EXPECT_THAT(local.out, HasSubstr("current version: v000003"));
  EXPECT_THAT(local.out, HasSubstr("* v000003"));
  EXPECT_THAT(local.out, HasSubstr("  v000002"));
  EXPECT_THAT(local.out, HasSubstr(versions_[1].sha256));
  CliResult remote = RunCli(As("viewer-1", {"versions", "list"}));
  ASSERT_EQ(remote.code, 0) << remote.err;
  EXPECT_EQ(remote.out, local.out);  // the same view either way

  CliResult json = RunCli(As("admin", {"versions", "list", "--json"}));
  ASSERT_EQ(json.code, 0) << json.err;
  auto j = nlohmann::json::parse(json.out);
  EXPECT_EQ(j["current_version"], "v000003");
  ASSERT_EQ(j["versions"].size(), 3u);
  EXPECT_EQ(j["versions"][1]["parent_version"], "v000001");
  EXPECT_EQ(j["versions"][1]["quant"], "q8_0");
  EXPECT_NEAR(j["versions"][1]["quant_rel_l2_error"].get<double>(), 0.02, 1e-12);
  EXPECT_EQ(j["versions"][2]["current"], true);
  EXPECT_EQ(j["versions"][0]["current"], false);
  EXPECT_EQ(j["versions"][0]["sha256"], versions_[0].sha256);

  // Admin.Status reports the current version's quantization error too.
  CliResult status = RunCli(As("viewer-1", {"status"}));
  ASSERT_EQ(status.code, 0) << status.err;
  EXPECT_THAT(status.out,
              HasSubstr("version quant:    q8_0 (rel_l2_error 0.03, max_abs_error 0.003)"));

  EXPECT_EQ(RunCli({"versions", "list"}).code, 2);  // neither --data-dir nor --coordinator
  CliResult missing = RunCli({"versions", "list", "--data-dir", dir_.Sub("nope")});
  EXPECT_EQ(missing.code, 1);
  EXPECT_FALSE(std::filesystem::exists(dir_.Sub("nope")));
}

TEST_P(OpsCliTest, RollbackAndPromoteAreAdminOnlyAuditedAndChecked) {
  const uint64_t head = server_->store()->audit().head_seq();
  // A viewer may list but not move the pointer.
  CliResult denied = RunCli(As("viewer-1", {"versions", "rollback"}));
  EXPECT_EQ(denied.code, 1);
  EXPECT_THAT(denied.err, HasSubstr("code 7"));  // PERMISSION_DENIED
  EXPECT_THAT(denied.err, HasSubstr("role 'viewer'"));
  EXPECT_EQ(RunCli(As("viewer-1", {"versions", "promote", "v000001"})).code, 1);
  // Bad targets: clear errors, nothing changes.
  CliResult unknown = RunCli(As("admin", {"versions", "promote", "v000009"}));
  EXPECT_EQ(unknown.code, 1);
  EXPECT_THAT(unknown.err, HasSubstr("'v000009' does not exist"));
  CliResult not_ancestor = RunCli(As("admin", {"versions", "rollback", "--to", "v000003"}));
  EXPECT_EQ(not_ancestor.code, 1);
  EXPECT_EQ(Current(), "v000003");
  EXPECT_EQ(server_->store()->audit().head_seq(), head);

  CliResult back = RunCli(As("admin", {"versions", "rollback"}));
  ASSERT_EQ(back.code, 0) << back.err;
  EXPECT_THAT(back.out, HasSubstr("current version: v000003 -> v000002"));
  EXPECT_EQ(Current(), "v000002");
  CliResult to = RunCli(As("admin", {"versions", "rollback", "--to", "v000001"}));
  ASSERT_EQ(to.code, 0) << to.err;
  EXPECT_EQ(Current(), "v000001");
  CliResult no_parent = RunCli(As("admin", {"versions", "rollback"}));
  EXPECT_EQ(no_parent.code, 1);
  EXPECT_THAT(no_parent.err, HasSubstr("has no parent"));
  CliResult promote = RunCli(As("admin", {"versions", "promote", "v000003"}));
  ASSERT_EQ(promote.code, 0) << promote.err;
  EXPECT_THAT(promote.out, HasSubstr("v000001 -> v000003"));
  EXPECT_EQ(Current(), "v000003");

  auto records = ListAuditRecords(server_->store()->raw_store(), head + 1, 0);
  ASSERT_TRUE(records.ok());
  std::vector<std::string> got;
  for (const AuditRecord& r : *records) got.push_back(r.actor + " " + r.action);
  EXPECT_THAT(got, ::testing::ElementsAre("admin version.rollback", "admin version.rollback",
                                          "admin version.promoted"));
  EXPECT_THAT((*records)[0].details_json, HasSubstr("\"from\":\"v000003\""));
  EXPECT_EQ(RunCli({"versions", "rollback"}).code, 2);  // no connection flags
}

TEST_P(OpsCliTest, BackupWhileServingThenRestoreOnTheBackup) {
  const std::string backup = dir_.Sub("backup");
  // Viewers may not back up.
  EXPECT_EQ(RunCli(As("viewer-1", {"backup", "create", backup})).code, 1);
  EXPECT_FALSE(std::filesystem::exists(backup));

  CliResult made = RunCli(As("admin", {"backup", "create", backup}));
  ASSERT_EQ(made.code, 0) << made.err;
  EXPECT_THAT(made.out, HasSubstr("backup created in " + backup));
  EXPECT_THAT(made.out, HasSubstr("current version v000003"));
  CliResult again = RunCli(As("admin", {"backup", "create", backup}));
  EXPECT_EQ(again.code, 1);
  EXPECT_THAT(again.err, HasSubstr("already exists"));
  auto records = ListAuditRecords(server_->store()->raw_store(), 1, 0);
  ASSERT_TRUE(records.ok());
  ASSERT_FALSE(records->empty());
  EXPECT_EQ(records->back().action, "backup.created");
  EXPECT_EQ(records->back().actor, "admin");
  // The live coordinator moves on; the backup keeps the state it copied.
  ASSERT_EQ(RunCli(As("admin", {"versions", "rollback"})).code, 0);
  ASSERT_EQ(Current(), "v000002");

  // Restore: a coordinator started with --data-dir on the backup.
  CoordinatorConfig restored_config = config_;
  restored_config.data_dir = backup;
  if (GetParam()) {
    // Encrypted backups stay encrypted: they need the same key.
    CoordinatorConfig no_key = restored_config;
    no_key.at_rest_key = "";
    ServerOptions options;
    options.out = &server_out_;
    auto refused = CoordinatorServer::Start(no_key, options);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition)
        << refused.status();
    auto raw = common::Store::OpenReadOnly(backup);
    ASSERT_TRUE(raw.ok());
    EXPECT_TRUE(common::AtRestCipher::IsEncrypted(*(*raw)->Get("blobs", versions_[2].sha256)));
  }
  std::unique_ptr<CoordinatorServer> restored = Start(restored_config);
  ASSERT_NE(restored, nullptr);
  EXPECT_EQ(*restored->store()->CurrentVersion(), "v000003");
  for (const VersionRecord& v : versions_) {
    auto blob = restored->store()->GetBlob(v.sha256);
    ASSERT_TRUE(blob.ok()) << v.version_id << ": " << blob.status();
    EXPECT_EQ(common::Sha256Hex(*blob), v.sha256);
  }
  auto report = VerifyAuditChain(restored->store()->raw_store());
  ASSERT_TRUE(report.ok());
  EXPECT_TRUE(report->ok) << report->error;
  CliResult listed = RunCli(As("admin", {"versions", "list", "--json"}, restored.get()));
  ASSERT_EQ(listed.code, 0) << listed.err;
  auto j = nlohmann::json::parse(listed.out);
  EXPECT_EQ(j["current_version"], "v000003");
  EXPECT_EQ(j["versions"].size(), 3u);
  // The restored coordinator serves version moves like the original.
  ASSERT_EQ(RunCli(As("admin", {"versions", "promote", "v000001"}, restored.get())).code, 0);
  EXPECT_EQ(*restored->store()->CurrentVersion(), "v000001");
  restored->Shutdown();
}

INSTANTIATE_TEST_SUITE_P(AtRest, OpsCliTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? std::string("Encrypted") : std::string("Plain");
                         });

}  // namespace
}  // namespace fedlora::coordinator
