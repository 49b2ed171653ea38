#pragma once
// Embedded key-value store on RocksDB, one column family per data kind.
//
// Store::Open creates the directory and every requested column family. Writes
// take a `sync` flag: state a round depends on is written with sync=true
// (WAL fsync before returning). A WriteBatch applies atomically across column
// families. Safe for concurrent use (RocksDB's guarantees).
//
// Store::OpenReadOnly opens an existing database with all of its column
// families without taking the LOCK file, so it works while another process
// (e.g. the running coordinator) holds the database open for writing. It sees
// the state as of the open (later writes of the other process are not seen).
// Every write (Put, Delete, Batch::Commit, Flush) on a read-only store returns
// FailedPrecondition; Checkpoint is Unimplemented there.
//
// StoreTuning bounds the store's memory with a memtable budget shared by all
// column families. It does not change durability: every write still goes to the
// WAL first (fsynced when sync=true); a smaller budget only flushes sooner.

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace rocksdb {
class DB;
class ColumnFamilyHandle;
class WriteBatch;
class Status;
}  // namespace rocksdb

namespace fedlora::common {

absl::Status FromRocksStatus(const rocksdb::Status& s, std::string_view context);

struct StoreTuning {
  // Memtable memory of all column families together, in bytes (a RocksDB
  // WriteBufferManager: past it the largest memtable is flushed; writes do not
  // stall). Each column family's memtable is then at most half of it. 0 = RocksDB's
  // defaults: up to 2 x 64 MiB per column family.
  uint64_t memtable_budget_bytes = 0;
};

class Store {
 public:
  class Batch {
   public:
    explicit Batch(Store* store);
    ~Batch();
    void Put(std::string_view cf, std::string_view key, std::string_view value);
    void Delete(std::string_view cf, std::string_view key);
    // Applies all operations atomically. Unknown column family: InvalidArgument.
    absl::Status Commit(bool sync);

   private:
    Store* store_;
    std::unique_ptr<rocksdb::WriteBatch> batch_;
    absl::Status error_;
  };

  static absl::StatusOr<std::unique_ptr<Store>> Open(const std::string& dir,
                                                     const std::vector<std::string>& column_families,
                                                     const StoreTuning& tuning = {});
  // NotFound when `dir` holds no database; Get/Scan of a column family the
  // database does not have: InvalidArgument (as for Open).
  static absl::StatusOr<std::unique_ptr<Store>> OpenReadOnly(const std::string& dir);
  ~Store();

  bool read_only() const { return read_only_; }

  absl::Status Put(std::string_view cf, std::string_view key, std::string_view value, bool sync);
  // NotFound when absent.
  absl::StatusOr<std::string> Get(std::string_view cf, std::string_view key) const;
  absl::Status Delete(std::string_view cf, std::string_view key, bool sync);
  // Calls fn(key, value) for keys starting with prefix, in key order, until fn returns false.
  absl::Status Scan(std::string_view cf, std::string_view prefix,
                    const std::function<bool(std::string_view, std::string_view)>& fn) const;
  // Consistent on-line checkpoint (hard links) into a new directory.
  absl::Status Checkpoint(const std::string& dir) const;
  absl::Status Flush();
  // RocksDB's property `name` of column family `cf` (e.g. "rocksdb.live-sst-files-size",
  // "rocksdb.cur-size-all-mem-tables"); NotFound when RocksDB does not know it.
  absl::StatusOr<uint64_t> IntProperty(std::string_view cf, std::string_view name) const;

 private:
  Store() = default;
  rocksdb::ColumnFamilyHandle* Handle(std::string_view cf) const;
  absl::Status CheckWritable(std::string_view op) const;

  std::unique_ptr<rocksdb::DB> db_;
  std::vector<std::string> names_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
  bool read_only_ = false;
};

}  // namespace fedlora::common
