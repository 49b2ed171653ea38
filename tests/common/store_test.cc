#include "common/storage/store.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <rocksdb/status.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>
#include "tests/testing/test_util.h"

namespace fedlora::common {
namespace {

using ::fedlora::testutil::TempDir;
using ::fedlora::testutil::StatusIs;

const std::vector<std::string> kCfs = {"agents", "rounds", "updates", "versions",
                                       "blobs",  "audit",  "meta"};

std::unique_ptr<Store> MustOpen(const std::string& dir,
                                const std::vector<std::string>& cfs = kCfs) {
  auto s = Store::Open(dir, cfs);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

std::map<std::string, std::string> ScanAll(const Store& store, const std::string& cf,
                                           const std::string& prefix = "") {
  std::map<std::string, std::string> out;
  absl::Status s = store.Scan(cf, prefix, [&](std::string_view k, std::string_view v) {
    out.emplace(std::string(k), std::string(v));
    return true;
  });
  EXPECT_TRUE(s.ok()) << s;
  return out;
}

TEST(Store, PutGetDeleteAcrossColumnFamilies) {
  TempDir dir;
  auto store = MustOpen(dir.path() + "/db/nested");
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->Put("agents", "a1", "online", /*sync=*/true).ok());
  ASSERT_TRUE(store->Put("meta", "a1", "other family", /*sync=*/false).ok());
  std::string binary("\0\xff\x01key", 6);
  ASSERT_TRUE(store->Put("blobs", binary, std::string(1 << 20, 'z'), true).ok());

  EXPECT_EQ(*store->Get("agents", "a1"), "online");
  EXPECT_EQ(*store->Get("meta", "a1"), "other family");
  EXPECT_EQ(store->Get("blobs", binary)->size(), size_t{1} << 20);
  EXPECT_THAT(store->Get("rounds", "a1").status(), StatusIs(absl::StatusCode::kNotFound, "rounds"));

  ASSERT_TRUE(store->Put("agents", "a1", "offline", true).ok());  // overwrite
  EXPECT_EQ(*store->Get("agents", "a1"), "offline");
  ASSERT_TRUE(store->Delete("agents", "a1", true).ok());
  EXPECT_EQ(store->Get("agents", "a1").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store->Delete("agents", "never-there", true).ok());
  EXPECT_EQ(*store->Get("meta", "a1"), "other family");
}

TEST(Store, UnknownColumnFamilyIsInvalidArgument) {
  TempDir dir;
  auto store = MustOpen(dir.path());
  ASSERT_TRUE(store);
  EXPECT_THAT(store->Put("nope", "k", "v", true),
              StatusIs(absl::StatusCode::kInvalidArgument, "unknown column family 'nope'"));
  EXPECT_THAT(store->Get("nope", "k").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "agents"));  // lists known ones
  EXPECT_EQ(store->Delete("nope", "k", false).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store->Scan("nope", "", [](std::string_view, std::string_view) { return true; }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Store::Open(dir.path() + "/x", {"ok", ""}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(Store, BatchIsAtomic) {
  TempDir dir;
  auto store = MustOpen(dir.path());
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->Put("updates", "r1/a1", "sealed", true).ok());
  {
    Store::Batch batch(store.get());
    batch.Put("blobs", "sha", "blob bytes");
    batch.Put("versions", "v000001", "meta");
    batch.Put("meta", "current", "v000001");
    batch.Delete("updates", "r1/a1");
    ASSERT_TRUE(batch.Commit(/*sync=*/true).ok());
  }
  EXPECT_EQ(*store->Get("blobs", "sha"), "blob bytes");
  EXPECT_EQ(*store->Get("meta", "current"), "v000001");
  EXPECT_EQ(store->Get("updates", "r1/a1").status().code(), absl::StatusCode::kNotFound);

  // One bad operation: nothing of the batch is applied.
  Store::Batch bad(store.get());
  bad.Put("meta", "current", "v000002");
  bad.Put("versions", "v000002", "meta");
  bad.Put("no_such_cf", "k", "v");
  bad.Put("blobs", "sha2", "more");
  EXPECT_THAT(bad.Commit(true), StatusIs(absl::StatusCode::kInvalidArgument, "no_such_cf"));
  EXPECT_EQ(*store->Get("meta", "current"), "v000001");
  EXPECT_EQ(store->Get("versions", "v000002").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store->Get("blobs", "sha2").status().code(), absl::StatusCode::kNotFound);
  // After Commit the batch is empty and reusable.
  bad.Put("meta", "current", "v000003");
  ASSERT_TRUE(bad.Commit(false).ok());
  EXPECT_EQ(*store->Get("meta", "current"), "v000003");
  EXPECT_EQ(store->Get("versions", "v000002").status().code(), absl::StatusCode::kNotFound);
}

TEST(Store, ReopenPersistsDataAndKeepsExistingFamilies) {
  TempDir dir;
  {
    auto store = MustOpen(dir.path(), {"agents", "extra"});
    ASSERT_TRUE(store);
    ASSERT_TRUE(store->Put("agents", "a1", "v1", true).ok());
    ASSERT_TRUE(store->Put("extra", "k", "in extra", true).ok());
  }
  {
    // Reopen asking for fewer families: the existing ones still open, and new ones appear.
    auto store = MustOpen(dir.path(), {"agents", "audit"});
    ASSERT_TRUE(store);
    EXPECT_EQ(*store->Get("agents", "a1"), "v1");
    EXPECT_EQ(*store->Get("extra", "k"), "in extra");
    ASSERT_TRUE(store->Put("audit", "0001", "entry", true).ok());
    ASSERT_TRUE(store->Flush().ok());
  }
  auto store = MustOpen(dir.path(), {});
  ASSERT_TRUE(store);
  EXPECT_EQ(*store->Get("audit", "0001"), "entry");
  EXPECT_EQ(*store->Get("agents", "a1"), "v1");
}

TEST(Store, SecondOpenOfSameDirectoryIsUnavailable) {
  TempDir dir;
  auto first = MustOpen(dir.path());
  ASSERT_TRUE(first);
  auto second = Store::Open(dir.path(), kCfs);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable) << second.status();
  EXPECT_THAT(std::string(second.status().message()), ::testing::HasSubstr(dir.path()));
}

TEST(Store, BadDirectoriesAreErrorsNotCrashes) {
  TempDir dir;
  std::string file = dir.path() + "/plain_file";
  { std::ofstream(file) << "x"; }
  EXPECT_FALSE(Store::Open(file, kCfs).ok());
  EXPECT_FALSE(Store::Open(file + "/db", kCfs).ok());

  // A database whose CURRENT file is damaged is reported, not recreated.
  std::string db = dir.path() + "/db";
  {
    auto store = MustOpen(db);
    ASSERT_TRUE(store);
    ASSERT_TRUE(store->Put("meta", "k", "v", true).ok());
  }
  { std::ofstream(db + "/CURRENT", std::ios::trunc) << "MANIFEST-999999\n"; }
  auto reopened = Store::Open(db, kCfs);
  EXPECT_FALSE(reopened.ok());
  EXPECT_THAT(std::string(reopened.status().message()), ::testing::HasSubstr(db));
}

TEST(Store, ScanByPrefixInKeyOrderAndStopsEarly) {
  TempDir dir;
  auto store = MustOpen(dir.path());
  ASSERT_TRUE(store);
  for (const char* k : {"r/000002/b", "r/000001/a", "r/000002/a", "q/zzz", "r0", "s/1"}) {
    ASSERT_TRUE(store->Put("rounds", k, std::string("v:") + k, false).ok());
  }
  std::vector<std::string> keys;
  ASSERT_TRUE(store
                  ->Scan("rounds", "r/",
                         [&](std::string_view k, std::string_view v) {
                           EXPECT_EQ(v, "v:" + std::string(k));
                           keys.emplace_back(k);
                           return true;
                         })
                  .ok());
  EXPECT_EQ(keys, (std::vector<std::string>{"r/000001/a", "r/000002/a", "r/000002/b"}));

  keys.clear();
  ASSERT_TRUE(store
                  ->Scan("rounds", "r/",
                         [&](std::string_view k, std::string_view) {
                           keys.emplace_back(k);
                           return keys.size() < 2;
                         })
                  .ok());
  EXPECT_EQ(keys.size(), 2u);
  EXPECT_EQ(ScanAll(*store, "rounds").size(), 6u);
  EXPECT_TRUE(ScanAll(*store, "rounds", "t").empty());
  EXPECT_TRUE(ScanAll(*store, "agents").empty());
}

TEST(Store, CheckpointOpensWithSameData) {
  TempDir dir;
  auto store = MustOpen(dir.path() + "/db");
  ASSERT_TRUE(store);
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(store->Put("versions", "v" + std::to_string(i), std::to_string(i * i), i % 2).ok());
  }
  ASSERT_TRUE(store->Put("meta", "current", "v99", true).ok());
  ASSERT_TRUE(store->Checkpoint(dir.path() + "/ckpt").ok());
  // Later writes do not leak into the checkpoint.
  ASSERT_TRUE(store->Put("meta", "current", "v100", true).ok());
  EXPECT_FALSE(store->Checkpoint(dir.path() + "/ckpt").ok());  // target must not exist

  auto copy = MustOpen(dir.path() + "/ckpt");
  ASSERT_TRUE(copy);
  EXPECT_EQ(*copy->Get("meta", "current"), "v99");
  EXPECT_EQ(ScanAll(*copy, "versions"), ScanAll(*store, "versions"));
  EXPECT_EQ(ScanAll(*copy, "versions").size(), 100u);
  EXPECT_EQ(*store->Get("meta", "current"), "v100");
}

TEST(Store, ConcurrentWriters) {
  TempDir dir;
  auto store = MustOpen(dir.path());
  ASSERT_TRUE(store);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&store, t] {
      for (int i = 0; i < 200; ++i) {
        EXPECT_TRUE(
            store->Put("audit", std::to_string(t) + "/" + std::to_string(i), "x", false).ok());
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(ScanAll(*store, "audit").size(), 800u);
}

TEST(Store, ReadOnlyOpenWhileAnotherInstanceWrites) {
  TempDir dir;
  auto writer = Store::Open(dir.path(), {"a", "b"});
  ASSERT_TRUE(writer.ok()) << writer.status();
  ASSERT_TRUE((*writer)->Put("a", "k1", "v1", /*sync=*/true).ok());
  ASSERT_TRUE((*writer)->Put("b", "k2", "v2", /*sync=*/true).ok());

  // The writer still holds the LOCK; a read-only open still works and sees
  // every column family and the synced (WAL-only, unflushed) writes.
  auto ro = Store::OpenReadOnly(dir.path());
  ASSERT_TRUE(ro.ok()) << ro.status();
  EXPECT_TRUE((*ro)->read_only());
  EXPECT_FALSE((*writer)->read_only());
  EXPECT_EQ(*(*ro)->Get("a", "k1"), "v1");
  EXPECT_EQ(*(*ro)->Get("b", "k2"), "v2");
  EXPECT_EQ((*ro)->Get("a", "nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*ro)->Get("zzz", "k1").status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<std::string> keys;
  ASSERT_TRUE((*ro)->Scan("a", "", [&](std::string_view k, std::string_view) {
                      keys.emplace_back(k);
                      return true;
                    })
                  .ok());
  EXPECT_EQ(keys, std::vector<std::string>{"k1"});

  // Every write is refused, and nothing changes.
  EXPECT_THAT((*ro)->Put("a", "k3", "v3", true), StatusIs(absl::StatusCode::kFailedPrecondition,
                                                          "read-only"));
  EXPECT_THAT((*ro)->Delete("a", "k1", true),
              StatusIs(absl::StatusCode::kFailedPrecondition, "read-only"));
  Store::Batch batch(ro->get());
  batch.Put("a", "k4", "v4");
  EXPECT_THAT(batch.Commit(true), StatusIs(absl::StatusCode::kFailedPrecondition, "read-only"));
  EXPECT_THAT((*ro)->Flush(), StatusIs(absl::StatusCode::kFailedPrecondition, "read-only"));
  EXPECT_EQ((*ro)->Checkpoint(dir.path() + "/cp").code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ((*writer)->Get("a", "k3").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(*(*writer)->Get("a", "k1"), "v1");

  // The writer keeps working while the reader is open.
  ASSERT_TRUE((*writer)->Put("a", "k5", "v5", true).ok());
  EXPECT_EQ(*(*writer)->Get("a", "k5"), "v5");
}

TEST(Store, ReadOnlyOpenOfMissingDatabaseIsNotFound) {
  TempDir dir;
  EXPECT_THAT(Store::OpenReadOnly(dir.path() + "/absent").status(),
              StatusIs(absl::StatusCode::kNotFound, "absent"));
  EXPECT_EQ(Store::OpenReadOnly("").status().code(), absl::StatusCode::kInvalidArgument);
  // And nothing was created.
  EXPECT_FALSE(std::filesystem::exists(dir.path() + "/absent"));
}

TEST(Store, MemtableBudgetFlushesAndKeepsEveryValue) {
  TempDir dir;
  StoreTuning tuning;
  tuning.memtable_budget_bytes = 4 << 20;
  const std::string big(512 << 10, 'x');
  auto value = [&](int i) { return std::to_string(i) + big; };
  {
    auto opened = Store::Open(dir.path(), kCfs, tuning);
    ASSERT_TRUE(opened.ok()) << opened.status();
    Store& store = **opened;
    // 20 MiB into one column family: RocksDB's default (64 MiB memtables) would
    // hold all of it in memory; the 4 MiB budget must have flushed some to SST files.
    for (int i = 0; i < 40; ++i) {
      ASSERT_TRUE(store.Put("updates", "u" + std::to_string(i), value(i), /*sync=*/i % 8 == 0).ok());
    }
    uint64_t sst = 0;
    for (int wait = 0; wait < 200 && sst == 0; ++wait) {
      auto size = store.IntProperty("updates", "rocksdb.live-sst-files-size");
      ASSERT_TRUE(size.ok()) << size.status();
      sst = *size;
      if (sst == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    EXPECT_GT(sst, 0u);
    auto memtables = store.IntProperty("updates", "rocksdb.cur-size-all-mem-tables");
    ASSERT_TRUE(memtables.ok()) << memtables.status();
    EXPECT_LT(*memtables, 20u << 20);
    for (int i = 0; i < 40; ++i) {
      auto got = store.Get("updates", "u" + std::to_string(i));
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(*got, value(i));
    }
    EXPECT_THAT(store.IntProperty("updates", "rocksdb.no-such-property").status(),
                StatusIs(absl::StatusCode::kNotFound, "no-such-property"));
    EXPECT_THAT(store.IntProperty("nope", "rocksdb.live-sst-files-size").status(),
                StatusIs(absl::StatusCode::kInvalidArgument, "unknown column family 'nope'"));
  }
  // Reopened with RocksDB's defaults, and with the budget again: every value is there.
  for (uint64_t budget : {uint64_t{0}, uint64_t{4} << 20}) {
    StoreTuning again;
    again.memtable_budget_bytes = budget;
    auto reopened = Store::Open(dir.path(), kCfs, again);
    ASSERT_TRUE(reopened.ok()) << reopened.status();
    auto all = ScanAll(**reopened, "updates");
    ASSERT_EQ(all.size(), 40u) << "budget " << budget;
    for (int i = 0; i < 40; ++i) EXPECT_EQ(all["u" + std::to_string(i)], value(i));
  }
}

TEST(FromRocksStatus, MapsCodes) {
  EXPECT_TRUE(FromRocksStatus(rocksdb::Status::OK(), "ctx").ok());
  EXPECT_THAT(FromRocksStatus(rocksdb::Status::NotFound("k"), "ctx"),
              StatusIs(absl::StatusCode::kNotFound, "ctx"));
  EXPECT_EQ(FromRocksStatus(rocksdb::Status::Corruption("bad block"), "ctx").code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(FromRocksStatus(rocksdb::Status::InvalidArgument("x"), "ctx").code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(FromRocksStatus(rocksdb::Status::NotSupported("x"), "ctx").code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(FromRocksStatus(rocksdb::Status::IOError("disk on fire"), "ctx").code(),
            absl::StatusCode::kInternal);
  EXPECT_EQ(FromRocksStatus(rocksdb::Status::NoSpace("full"), "ctx").code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(FromRocksStatus(rocksdb::Status::Busy(), "ctx").code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(FromRocksStatus(rocksdb::Status::TimedOut(), "ctx").code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(FromRocksStatus(rocksdb::Status::Aborted(), "ctx").code(), absl::StatusCode::kAborted);
  EXPECT_THAT(FromRocksStatus(rocksdb::Status::Corruption("bad block"), "opening /db"),
              StatusIs(absl::StatusCode::kDataLoss, "bad block"));
}

}  // namespace
}  // namespace fedlora::common
