// The hash-chained audit log: records written by StateStore transitions, the
// chain verifying, and each kind of tampering detected with the seq named.
#include "coordinator/audit.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "common/crypto/crypto.h"
#include "coordinator/state_store.h"
#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;
using testing::TempDir;

RoundRecord Round(uint64_t id) {
  RoundRecord r;
  r.round_id = id;
  r.participants = {"a", "b"};
  return r;
}

// Writes 5 records: started 1, published 1, started 2, aborted 2, an admin action.
void WriteHistory(StateStore* store) {
  ASSERT_TRUE(store->StartRound(Round(1)).ok());
  RoundRecord done = Round(1);
  done.phase = RoundPhase::kDone;
  VersionRecord v;
  v.version_id = "v000001";
  v.round_id = 1;
  v.sha256 = common::Sha256Hex("blob");
  ASSERT_TRUE(store->Publish(done, v, "blob").ok());
  ASSERT_TRUE(store->StartRound(Round(2)).ok());
  RoundRecord aborted = Round(2);
  aborted.phase = RoundPhase::kAborted;
  aborted.abort_reason = "deadline";
  ASSERT_TRUE(store->Abort(aborted).ok());
  ASSERT_TRUE(store->AppendAudit("admin-cn", "model.exported", R"({"version":"v000001"})").ok());
}

AuditVerifyReport Verify(StateStore* store) {
  auto report = VerifyAuditChain(store->raw_store());
  EXPECT_TRUE(report.ok()) << report.status();
  return report.ok() ? *report : AuditVerifyReport{};
}

TEST(AuditTest, TransitionsAreRecordedAndTheChainVerifies) {
  TempDir dir;
  auto store = StateStore::Open(dir.path());
  ASSERT_TRUE(store.ok()) << store.status();
  WriteHistory(store->get());
  auto records = ListAuditRecords((*store)->raw_store(), 1, 0);
  ASSERT_TRUE(records.ok()) << records.status();
  ASSERT_EQ(records->size(), 5u);
  std::vector<std::string> actions;
  for (const auto& r : *records) actions.push_back(r.action);
  EXPECT_EQ(actions, (std::vector<std::string>{"round.started", "round.published",
                                               "round.started", "round.aborted",
                                               "model.exported"}));
  EXPECT_EQ((*records)[0].actor, "coordinator");
  EXPECT_EQ((*records)[4].actor, "admin-cn");
  EXPECT_EQ((*records)[0].prev_hash, std::string(64, '0'));
  for (size_t i = 1; i < records->size(); ++i) {
    EXPECT_EQ((*records)[i].seq, i + 1);
    EXPECT_EQ((*records)[i].prev_hash, (*records)[i - 1].hash);
  }
  auto details = nlohmann::json::parse((*records)[3].details_json);
  EXPECT_EQ(details["reason"], "deadline");
  EXPECT_EQ(details["round"], 2);
  AuditVerifyReport report = Verify(store->get());
  EXPECT_TRUE(report.ok) << report.error;
  EXPECT_EQ(report.records, 5u);
  EXPECT_EQ(report.head_seq, 5u);
  EXPECT_EQ(report.head_hash, (*records)[4].hash);

  // The chain continues across a reopen.
  store->reset();
  store = StateStore::Open(dir.path());
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->AppendAudit("x", "y", "{}").ok());
  report = Verify(store->get());
  EXPECT_TRUE(report.ok) << report.error;
  EXPECT_EQ(report.records, 6u);
  // Paging.
  auto page = ListAuditRecords((*store)->raw_store(), 3, 2);
  ASSERT_TRUE(page.ok());
  ASSERT_EQ(page->size(), 2u);
  EXPECT_EQ((*page)[0].seq, 3u);
  EXPECT_EQ((*page)[1].seq, 4u);
  // Details must be a JSON object.
  EXPECT_EQ((*store)->AppendAudit("x", "y", "[1]").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*store)->AppendAudit("x", "y", "{oops").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Verify(store->get()).records, 6u);
}

class AuditTamperTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto store = StateStore::Open(dir_.path());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    WriteHistory(store_.get());
    ASSERT_TRUE(Verify(store_.get()).ok);
  }
  nlohmann::json Raw(uint64_t seq) {
    return nlohmann::json::parse(*store_->raw()->Get(kAuditColumnFamily, AuditKey(seq)));
  }
  void PutRaw(uint64_t seq, const nlohmann::json& j) {
    ASSERT_TRUE(store_->raw()->Put(kAuditColumnFamily, AuditKey(seq), j.dump(), true).ok());
  }

  TempDir dir_;
  std::unique_ptr<StateStore> store_;
};

TEST_F(AuditTamperTest, EditedRecordIsNamed) {
  nlohmann::json j = Raw(3);
  j["actor"] = "someone-else";
  PutRaw(3, j);
  AuditVerifyReport report = Verify(store_.get());
  EXPECT_FALSE(report.ok);
  EXPECT_EQ(report.first_bad_seq, 3u);
  EXPECT_THAT(report.error, HasSubstr("edited"));
}

TEST_F(AuditTamperTest, EditedRecordWithRecomputedHashIsNamed) {
  nlohmann::json j = Raw(2);
  j["details"]["sha256"] = std::string(64, 'e');
  AuditRecord r;
  r.seq = 2;
  r.time_unix_ms = j["time_unix_ms"];
  r.actor = j["actor"];
  r.action = j["action"];
  r.details_json = j["details"].dump();
  r.prev_hash = j["prev_hash"];
  j["hash"] = AuditHash(r.prev_hash, AuditCanonical(r));
  PutRaw(2, j);
  AuditVerifyReport report = Verify(store_.get());
  EXPECT_FALSE(report.ok);
  EXPECT_EQ(report.first_bad_seq, 2u);
  EXPECT_THAT(report.error, HasSubstr("prev_hash"));
}

TEST_F(AuditTamperTest, DeletedMiddleRecordIsNamed) {
  ASSERT_TRUE(store_->raw()->Delete(kAuditColumnFamily, AuditKey(2), true).ok());
  AuditVerifyReport report = Verify(store_.get());
  EXPECT_FALSE(report.ok);
  EXPECT_EQ(report.first_bad_seq, 2u);
  EXPECT_THAT(report.error, HasSubstr("seq 2 is missing"));
}

TEST_F(AuditTamperTest, DeletedLastRecordIsNamed) {
  ASSERT_TRUE(store_->raw()->Delete(kAuditColumnFamily, AuditKey(5), true).ok());
  AuditVerifyReport report = Verify(store_.get());
  EXPECT_FALSE(report.ok);
  EXPECT_EQ(report.first_bad_seq, 5u);
  EXPECT_THAT(report.error, HasSubstr("missing"));
}

TEST_F(AuditTamperTest, DeletedFirstRecordAndReorderedSeqAreNamed) {
  nlohmann::json j = Raw(4);
  j["seq"] = 40;
  PutRaw(4, j);
  AuditVerifyReport report = Verify(store_.get());
  EXPECT_FALSE(report.ok);
  EXPECT_EQ(report.first_bad_seq, 4u);
  ASSERT_TRUE(store_->raw()->Delete(kAuditColumnFamily, AuditKey(1), true).ok());
  report = Verify(store_.get());
  EXPECT_FALSE(report.ok);
  EXPECT_EQ(report.first_bad_seq, 1u);
}

TEST_F(AuditTamperTest, UnparsableRecordIsNamed) {
  ASSERT_TRUE(store_->raw()->Put(kAuditColumnFamily, AuditKey(3), "{not json", true).ok());
  AuditVerifyReport report = Verify(store_.get());
  EXPECT_FALSE(report.ok);
  EXPECT_EQ(report.first_bad_seq, 3u);
}

TEST(AuditSchemaTest, SchemaOneStoreIsUpgradedAndReadOnlyOpenWorks) {
  TempDir dir;
  {
    // A schema 1 store: no audit column family.
    auto raw = common::Store::Open(dir.path(),
                                   {"agents", "rounds", "updates", "versions", "blobs", "meta"});
    ASSERT_TRUE(raw.ok());
    ASSERT_TRUE((*raw)->Put("meta", "schema_version", "1", true).ok());
    ASSERT_TRUE((*raw)->Put("meta", "current_version", "v000001", true).ok());
  }
  {
    auto ro = StateStore::OpenReadOnly(dir.path());
    ASSERT_TRUE(ro.ok()) << ro.status();
    auto report = VerifyAuditChain((*ro)->raw_store());
    ASSERT_TRUE(report.ok()) << report.status();
    EXPECT_TRUE(report->ok);
    EXPECT_EQ(report->records, 0u);
    EXPECT_EQ(*(*ro)->CurrentVersion(), "v000001");
  }
  auto store = StateStore::Open(dir.path());
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ(*(*store)->raw()->Get("meta", "schema_version"), std::to_string(kSchemaVersion));
  EXPECT_EQ(*(*store)->CurrentVersion(), "v000001");
  ASSERT_TRUE((*store)->StartRound(Round(2)).ok());
  AuditVerifyReport report = Verify(store->get());
  EXPECT_TRUE(report.ok) << report.error;
  EXPECT_EQ(report.records, 1u);
}

TEST(AuditTest, ReadOnlyStoreCannotAppend) {
  TempDir dir;
  { ASSERT_TRUE(StateStore::Open(dir.path()).ok()); }
  auto ro = StateStore::OpenReadOnly(dir.path());
  ASSERT_TRUE(ro.ok());
  EXPECT_EQ((*ro)->AppendAudit("a", "b", "{}").code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*ro)->audit().head_seq(), 0u);
}

}  // namespace
}  // namespace fedlora::coordinator
