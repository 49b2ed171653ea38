#include "coordinator/state_store.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;
using testing::TempDir;

RoundRecord SampleRound(uint64_t id) {
  RoundRecord r;
  r.round_id = id;
  r.participants = {"a", "b"};
  r.deadline_unix_ms = 1234;
  r.lora_rank = 8;
  r.lora_alpha = 16;
  r.lora_target_modules = {"q_proj"};
  r.max_update_bytes = 1 << 20;
  r.shapes["x.lora_A.weight"] = {8, 4};
  return r;
}

TEST(StateStoreTest, FreshStoreWritesSchemaAndReopens) {
  TempDir dir;
  std::string seal_public;
  {
    auto store = StateStore::Open(dir.path());
    ASSERT_TRUE(store.ok()) << store.status();
    EXPECT_EQ(*(*store)->raw()->Get("meta", "schema_version"), std::to_string(kSchemaVersion));
    auto key = (*store)->LoadOrCreateSealKey();
    ASSERT_TRUE(key.ok());
    seal_public = key->public_key;
    ASSERT_TRUE((*store)->PutRound(SampleRound(1)).ok());
    EXPECT_EQ(*(*store)->CurrentVersion(), "");
  }
  auto store = StateStore::Open(dir.path());
  ASSERT_TRUE(store.ok()) << store.status();
  auto key = (*store)->LoadOrCreateSealKey();
  ASSERT_TRUE(key.ok());
  EXPECT_EQ(key->public_key, seal_public);  // the sealing key persists
  auto round = (*store)->GetRound(1);
  ASSERT_TRUE(round.ok());
  ASSERT_TRUE(round->has_value());
  EXPECT_EQ((*round)->participants, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ((*round)->shapes.at("x.lora_A.weight"), (std::vector<int64_t>{8, 4}));
  EXPECT_FALSE((*(*store)->GetRound(2)).has_value());
}

TEST(StateStoreTest, RefusesNewerSchema) {
  TempDir dir;
  {
    auto store = StateStore::Open(dir.path());
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE((*store)
                    ->raw()
                    ->Put("meta", "schema_version", std::to_string(kSchemaVersion + 1), true)
                    .ok());
  }
  auto store = StateStore::Open(dir.path());
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(store.status().message()),
              HasSubstr("schema_version is " + std::to_string(kSchemaVersion + 1)));
}

TEST(StateStoreTest, CorruptSchemaAndRecordAreDataLoss) {
  TempDir dir;
  {
    auto store = StateStore::Open(dir.path());
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE((*store)->raw()->Put("rounds", RoundKey(7), "{not json", true).ok());
    auto r = (*store)->GetRound(7);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("rounds/"));
    ASSERT_TRUE((*store)->raw()->Put("meta", "schema_version", "banana", true).ok());
  }
  EXPECT_EQ(StateStore::Open(dir.path()).status().code(), absl::StatusCode::kDataLoss);
}

TEST(StateStoreTest, UpdatesPublishAndAbort) {
  TempDir dir;
  auto opened = StateStore::Open(dir.path());
  ASSERT_TRUE(opened.ok());
  StateStore& store = **opened;
  RoundRecord r = SampleRound(3);
  for (const std::string agent : {"a", "b"}) {
    UpdateRecord u;
    u.round_id = 3;
    u.agent_id = agent;
    u.summary.num_examples = 5;
    u.summary.train_loss = 1.5;
    u.summary.bytes = 4;
    u.sealed = std::string("\0\1\2\3", 4);
    r.updates[agent] = u.summary;
    ASSERT_TRUE(store.AcceptUpdate(u, r).ok());
  }
  EXPECT_EQ(*store.CountUpdates(3), 2u);
  auto u = store.GetUpdate(3, "b");
  ASSERT_TRUE(u.ok() && u->has_value());
  EXPECT_EQ((*u)->sealed, std::string("\0\1\2\3", 4));
  EXPECT_DOUBLE_EQ((*u)->summary.train_loss, 1.5);
  std::vector<std::string> seen;
  ASSERT_TRUE(store
                  .ForEachUpdate(3,
                                 [&](UpdateRecord rec) {
                                   seen.push_back(rec.agent_id);
                                   return absl::OkStatus();
                                 })
                  .ok());
  EXPECT_EQ(seen, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(r.bytes_up(), 8u);
  EXPECT_DOUBLE_EQ(r.mean_train_loss(), 1.5);
  EXPECT_TRUE(std::isnan(r.mean_eval_loss_after()));

  VersionRecord v;
  v.version_id = VersionId(3);
  EXPECT_EQ(v.version_id, "v000003");
  v.round_id = 3;
  v.sha256 = "abc";
  v.size_bytes = 4;
  r.phase = RoundPhase::kDone;
  r.version_id = v.version_id;
  ASSERT_TRUE(store.Publish(r, v, "blob").ok());
  EXPECT_EQ(*store.CountUpdates(3), 0u);
  EXPECT_EQ(*store.CurrentVersion(), "v000003");
  EXPECT_EQ(*store.GetBlob("abc"), "blob");
  auto rounds = store.ListRounds();
  ASSERT_TRUE(rounds.ok());
  ASSERT_EQ(rounds->size(), 1u);
  EXPECT_EQ(rounds->front().phase, RoundPhase::kDone);
  EXPECT_EQ(rounds->front().updates.size(), 2u);  // figures survive the updates

  RoundRecord r4 = SampleRound(4);
  UpdateRecord u4;
  u4.round_id = 4;
  u4.agent_id = "a";
  ASSERT_TRUE(store.AcceptUpdate(u4, r4).ok());
  r4.phase = RoundPhase::kAborted;
  ASSERT_TRUE(store.Abort(r4).ok());
  EXPECT_EQ(*store.CountUpdates(4), 0u);
  EXPECT_EQ((*store.GetRound(4))->phase, RoundPhase::kAborted);
}

TEST(StateStoreTest, RoundCodecRoundTripsNaN) {
  RoundRecord r = SampleRound(9);
  r.eval_after["a"] = std::nan("");
  r.eval_after["b"] = 2.5;
  auto back = DecodeRound(EncodeRound(r), "test");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(std::isnan(back->eval_after.at("a")));
  EXPECT_DOUBLE_EQ(back->eval_after.at("b"), 2.5);
  EXPECT_FALSE(DecodeUpdate("short", "x").ok());
}

TEST(StateStoreTest, AsyncRoundFieldsRoundTripAndOldRecordsReadAsSync) {
  RoundRecord r = SampleRound(4);
  r.mode = "async";
  r.tasks[7] = AsyncTask{"a", 111};
  r.tasks[12] = AsyncTask{"b", 222};
  UpdateSummary u;
  u.num_examples = 5;
  u.agent_id = "a";
  u.task_id = 7;
  u.base_version = "v000002";
  u.staleness = 1;
  r.updates[TaskKey(7)] = u;
  auto back = DecodeRound(EncodeRound(r), "test");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(back->async());
  ASSERT_EQ(back->tasks.size(), 2u);
  EXPECT_EQ(back->tasks.at(12).agent_id, "b");
  EXPECT_EQ(back->tasks.at(12).deadline_unix_ms, 222u);
  const UpdateSummary& got = back->updates.at(TaskKey(7));
  EXPECT_EQ(got.agent_id, "a");
  EXPECT_EQ(got.task_id, 7u);
  EXPECT_EQ(got.base_version, "v000002");
  EXPECT_EQ(got.staleness, 1u);
  // A record written before the async mode: no mode, no tasks.
  nlohmann::json j = nlohmann::json::parse(EncodeRound(SampleRound(5)));
  j.erase("mode");
  j.erase("tasks");
  auto old = DecodeRound(j.dump(), "old");
  ASSERT_TRUE(old.ok()) << old.status();
  EXPECT_FALSE(old->async());
  EXPECT_TRUE(old->tasks.empty());
  j["mode"] = "eventual";
  EXPECT_FALSE(DecodeRound(j.dump(), "bad").ok());

  // An async update record keeps its task id and is stored under the task's key.
  TempDir dir;
  auto store = StateStore::Open(dir.path());
  ASSERT_TRUE(store.ok());
  UpdateRecord rec;
  rec.round_id = 4;
  rec.agent_id = "a";
  rec.task_id = 7;
  rec.summary = u;
  rec.sealed = "sealed-bytes";
  ASSERT_TRUE((*store)->AcceptUpdate(rec, r).ok());
  auto stored = (*store)->GetUpdate(4, TaskKey(7));
  ASSERT_TRUE(stored.ok() && stored->has_value());
  EXPECT_EQ((*stored)->task_id, 7u);
  EXPECT_EQ((*stored)->sealed, "sealed-bytes");
  EXPECT_FALSE((*store)->GetUpdate(4, "a")->has_value());
  r.updates.clear();
  ASSERT_TRUE((*store)->DiscardUpdates(r, {TaskKey(7)}).ok());
  EXPECT_EQ(*(*store)->CountUpdates(4), 0u);
}

}  // namespace
}  // namespace fedlora::coordinator
