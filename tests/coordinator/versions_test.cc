// Version management: the VersionInfo view, the checks of a rollback / promote
// target (coordinator/versions.h) and the StateStore methods behind them
// (ListVersions, SetCurrentVersion, CreateBackup).
#include "coordinator/versions.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "common/crypto/at_rest.h"
#include "common/crypto/crypto.h"
#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;
using testing::SeedVersionChain;
using testing::TempDir;

MATCHER_P2(StatusIs, code, message, "") {
  const absl::Status s = arg;
  if (s.code() != code) {
    *result_listener << "status is " << s;
    return false;
  }
  return ::testing::ExplainMatchResult(message, std::string(s.message()), result_listener);
}

class VersionsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto store = StateStore::Open(dir_.Sub("data"));
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    versions_ = SeedVersionChain(store_.get(), 3);
  }

  absl::StatusOr<VersionRecord> Resolve(VersionMove move, const std::string& target,
                                        const std::string& current = "v000003") {
    return ResolveVersionMove(*store_, current, move, target);
  }

  TempDir dir_;
  std::unique_ptr<StateStore> store_;
  std::vector<VersionRecord> versions_;
};

TEST_F(VersionsTest, ListAndInfo) {
  auto listed = store_->ListVersions();
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->size(), 3u);
  EXPECT_EQ((*listed)[0].version_id, "v000001");
  EXPECT_EQ((*listed)[2].parent_version, "v000002");
  EXPECT_EQ(*(*listed)[1].quant_rel_l2_error, 0.02);  // the error survives the JSON record
  EXPECT_EQ(*store_->CurrentVersion(), "v000003");

  fedlora::v1::VersionInfo info = ToVersionInfo((*listed)[2], "v000003");
  EXPECT_TRUE(info.current());
  EXPECT_EQ(info.parent_version(), "v000002");
  EXPECT_EQ(info.sha256(), versions_[2].sha256);
  EXPECT_EQ(info.quant(), "q8_0");
  EXPECT_DOUBLE_EQ(info.quant_rel_l2_error(), 0.03);
  EXPECT_DOUBLE_EQ(info.quant_max_abs_error(), 0.003);
  EXPECT_FALSE(info.is_signed());
  EXPECT_EQ(info.contributors_size(), 1);
  EXPECT_FALSE(ToVersionInfo((*listed)[0], "v000003").current());
  VersionRecord old = (*listed)[0];
  old.quant_rel_l2_error.reset();
  old.quant_max_abs_error.reset();
  old.signature = "sig";
  EXPECT_EQ(ToVersionInfo(old, "").quant_rel_l2_error(), -1.0);  // not recorded
  EXPECT_TRUE(ToVersionInfo(old, "").is_signed());
}

TEST_F(VersionsTest, RollbackGoesToTheParentOrANamedAncestor) {
  auto to = Resolve(VersionMove::kRollback, "");
  ASSERT_TRUE(to.ok()) << to.status();
  EXPECT_EQ(to->version_id, "v000002");
  to = Resolve(VersionMove::kRollback, "v000001");
  ASSERT_TRUE(to.ok()) << to.status();
  EXPECT_EQ(to->version_id, "v000001");
  // Not an ancestor: use promote.
  EXPECT_THAT(Resolve(VersionMove::kRollback, "v000003", "v000002").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("use promote")));
  EXPECT_THAT(Resolve(VersionMove::kRollback, "v000009").status(),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("v000009")));
  // No parent / no current version.
  EXPECT_THAT(Resolve(VersionMove::kRollback, "", "v000001").status(),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("has no parent")));
  EXPECT_THAT(Resolve(VersionMove::kRollback, "", "").status(),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("no current version")));
}

TEST_F(VersionsTest, PromoteChecksTheTarget) {
  auto to = Resolve(VersionMove::kPromote, "v000003", "v000001");
  ASSERT_TRUE(to.ok()) << to.status();
  EXPECT_EQ(to->version_id, "v000003");
  EXPECT_THAT(Resolve(VersionMove::kPromote, "v000007").status(),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("'v000007' does not exist")));
  EXPECT_THAT(Resolve(VersionMove::kPromote, "v000003").status(),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("already the current")));
  EXPECT_EQ(Resolve(VersionMove::kPromote, "").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(VersionsTest, MissingOrCorruptBlobIsRefused) {
  ASSERT_TRUE(store_->raw()->Delete("blobs", versions_[0].sha256, true).ok());
  EXPECT_THAT(Resolve(VersionMove::kRollback, "v000001").status(),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("is missing")));
  ASSERT_TRUE(store_->raw()->Put("blobs", versions_[1].sha256, "not the blob", true).ok());
  EXPECT_THAT(Resolve(VersionMove::kRollback, "").status(),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("does not match its SHA-256")));
  EXPECT_THAT(Resolve(VersionMove::kPromote, "v000002").status(),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("v000002")));
}

TEST_F(VersionsTest, SetCurrentVersionMovesOnlyThePointerAndIsAudited) {
  const uint64_t head = store_->audit().head_seq();
  const std::string before = *store_->raw()->Get("versions", "v000003");
  ASSERT_TRUE(store_->SetCurrentVersion("v000001", "alice", "version.rollback",
                                        R"({"from":"v000003","to":"v000001"})")
                  .ok());
  EXPECT_EQ(*store_->CurrentVersion(), "v000001");
  EXPECT_EQ(*store_->raw()->Get("versions", "v000003"), before);  // immutable
  EXPECT_EQ(store_->ListVersions()->size(), 3u);
  auto records = ListAuditRecords(store_->raw_store(), head + 1, 0);
  ASSERT_TRUE(records.ok());
  ASSERT_EQ(records->size(), 1u);
  EXPECT_EQ((*records)[0].actor, "alice");
  EXPECT_EQ((*records)[0].action, "version.rollback");
  // Unknown version: nothing written.
  EXPECT_EQ(store_->SetCurrentVersion("v000042", "alice", "version.promoted", "{}").code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(*store_->CurrentVersion(), "v000001");
  EXPECT_EQ(store_->audit().head_seq(), head + 1);
}

TEST_F(VersionsTest, BackupIsAConsistentAuditedCopyAndRefusesAnExistingDir) {
  const std::string backup = dir_.Sub("backup");
  const uint64_t head = store_->audit().head_seq();
  ASSERT_TRUE(store_->CreateBackup(backup, "alice").ok());
  EXPECT_EQ(store_->audit().head_seq(), head + 1);
  auto records = ListAuditRecords(store_->raw_store(), head + 1, 0);
  ASSERT_TRUE(records.ok());
  ASSERT_EQ(records->size(), 1u);
  EXPECT_EQ((*records)[0].action, "backup.created");
  EXPECT_THAT((*records)[0].details_json, HasSubstr(backup));
  // Later changes of the live store are not in the backup.
  ASSERT_TRUE(store_->SetCurrentVersion("v000001", "alice", "version.promoted", "{}").ok());
  {
    auto copy = StateStore::OpenReadOnly(backup);
    ASSERT_TRUE(copy.ok()) << copy.status();
    EXPECT_EQ(*(*copy)->CurrentVersion(), "v000003");
    EXPECT_EQ((*copy)->ListVersions()->size(), 3u);
    auto blob = (*copy)->GetBlob(versions_[2].sha256);
    ASSERT_TRUE(blob.ok());
    EXPECT_EQ(common::Sha256Hex(*blob), versions_[2].sha256);
    auto report = VerifyAuditChain((*copy)->raw_store());
    ASSERT_TRUE(report.ok());
    EXPECT_TRUE(report->ok) << report->error;
    EXPECT_EQ(report->head_seq, head);
  }
  // An existing directory, a missing parent, "": refused, nothing audited.
  const uint64_t after = store_->audit().head_seq();
  EXPECT_THAT(store_->CreateBackup(backup, "alice"),
              StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("already exists")));
  EXPECT_THAT(store_->CreateBackup(dir_.Sub("no/such/parent"), "alice"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("does not exist")));
  EXPECT_EQ(store_->CreateBackup("", "alice").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(store_->CreateBackup("relative/backup", "alice"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("absolute")));
  EXPECT_EQ(store_->audit().head_seq(), after);
  EXPECT_FALSE(std::filesystem::exists(dir_.Sub("no")));
}

TEST(VersionsEncryptedTest, BackupOfAnEncryptedStoreStaysEncrypted) {
  TempDir dir;
  const std::string key_file = dir.Sub("at-rest.key");
  ASSERT_TRUE(common::WriteNewAtRestKeyFile(key_file).ok());
  auto cipher = common::AtRestCipher::LoadFile(key_file);
  ASSERT_TRUE(cipher.ok()) << cipher.status();
  StateStoreOptions options;
  options.at_rest = *cipher;
  std::vector<VersionRecord> versions;
  {
    auto store = StateStore::Open(dir.Sub("data"), options);
    ASSERT_TRUE(store.ok()) << store.status();
    versions = SeedVersionChain(store->get(), 2);
    ASSERT_TRUE((*store)->CreateBackup(dir.Sub("backup"), "alice").ok());
  }
  // The blob is stored encrypted in the backup: raw bytes are not the blob.
  {
    auto raw = common::Store::OpenReadOnly(dir.Sub("backup"));
    ASSERT_TRUE(raw.ok());
    auto value = (*raw)->Get("blobs", versions[1].sha256);
    ASSERT_TRUE(value.ok());
    EXPECT_TRUE(common::AtRestCipher::IsEncrypted(*value));
  }
  // Without the key: a writable open is refused, a read-only one cannot read blobs.
  EXPECT_EQ(StateStore::Open(dir.Sub("backup")).status().code(),
            absl::StatusCode::kFailedPrecondition);
  {
    auto ro = StateStore::OpenReadOnly(dir.Sub("backup"));
    ASSERT_TRUE(ro.ok()) << ro.status();
    EXPECT_EQ((*ro)->GetBlob(versions[1].sha256).status().code(),
              absl::StatusCode::kFailedPrecondition);
  }
  // With the same key it opens writable and reads everything.
  auto restored = StateStore::Open(dir.Sub("backup"), options);
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ(*(*restored)->CurrentVersion(), "v000002");
  auto blob = (*restored)->GetBlob(versions[1].sha256);
  ASSERT_TRUE(blob.ok()) << blob.status();
  EXPECT_EQ(common::Sha256Hex(*blob), versions[1].sha256);
  auto report = VerifyAuditChain((*restored)->raw_store());
  ASSERT_TRUE(report.ok());
  EXPECT_TRUE(report->ok) << report->error;
}

}  // namespace
}  // namespace fedlora::coordinator
