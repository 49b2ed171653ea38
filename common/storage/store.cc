#include "common/storage/store.h"

#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/slice.h>
#include <rocksdb/status.h>
#include <rocksdb/utilities/checkpoint.h>
#include <rocksdb/write_batch.h>
#include <rocksdb/write_buffer_manager.h>

#include <algorithm>
#include <filesystem>
#include <system_error>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status/status.h"

namespace fedlora::common {
namespace {

// absl::string_view is not std::string_view in this abseil build.
inline absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

rocksdb::Slice ToSlice(std::string_view s) { return rocksdb::Slice(s.data(), s.size()); }

// Keys may be binary: show them escaped and bounded in messages.
std::string ShowKey(std::string_view key) {
  constexpr size_t kMax = 64;
  std::string shown = absl::CHexEscape(Sv(key.substr(0, kMax)));
  if (key.size() > kMax) shown += "...";
  return shown;
}

}  // namespace

absl::Status FromRocksStatus(const rocksdb::Status& s, std::string_view context) {
  if (s.ok()) return absl::OkStatus();
  std::string msg = absl::StrCat(Sv(context), ": ", s.ToString());
  using C = rocksdb::Status::Code;
  switch (s.code()) {
    case C::kOk:
      return absl::OkStatus();
    case C::kNotFound:
      return absl::NotFoundError(msg);
    case C::kCorruption:
      return absl::DataLossError(msg);
    case C::kNotSupported:
      return absl::UnimplementedError(msg);
    case C::kInvalidArgument:
      return absl::InvalidArgumentError(msg);
    case C::kIOError:
      if (s.subcode() == rocksdb::Status::kNoSpace) return absl::ResourceExhaustedError(msg);
      if (s.subcode() == rocksdb::Status::kPathNotFound) return absl::NotFoundError(msg);
      // The LOCK file held by another process: a transient condition.
      if (msg.find("lock") != std::string::npos) return absl::UnavailableError(msg);
      return absl::InternalError(msg);
    case C::kMergeInProgress:
    case C::kAborted:
      return absl::AbortedError(msg);
    case C::kBusy:
    case C::kTryAgain:
    case C::kShutdownInProgress:
      return absl::UnavailableError(msg);
    case C::kTimedOut:
    case C::kExpired:
      return absl::DeadlineExceededError(msg);
    case C::kCompactionTooLarge:
      return absl::ResourceExhaustedError(msg);
    case C::kColumnFamilyDropped:
      return absl::FailedPreconditionError(msg);
    case C::kIncomplete:
    default:
      return absl::InternalError(msg);
  }
}

// ---- Batch ----------------------------------------------------------------

Store::Batch::Batch(Store* store)
    : store_(store), batch_(std::make_unique<rocksdb::WriteBatch>()) {}

Store::Batch::~Batch() = default;

void Store::Batch::Put(std::string_view cf, std::string_view key, std::string_view value) {
  if (!error_.ok()) return;
  rocksdb::ColumnFamilyHandle* h = store_->Handle(cf);
  if (h == nullptr) {
    error_ = absl::InvalidArgumentError(absl::StrCat("batch put of key \"", ShowKey(key),
                                                     "\": unknown column family '", Sv(cf), "'"));
    return;
  }
  error_ = FromRocksStatus(batch_->Put(h, ToSlice(key), ToSlice(value)),
                           absl::StrCat("batch put ", Sv(cf), "/", ShowKey(key)));
}

void Store::Batch::Delete(std::string_view cf, std::string_view key) {
  if (!error_.ok()) return;
  rocksdb::ColumnFamilyHandle* h = store_->Handle(cf);
  if (h == nullptr) {
    error_ = absl::InvalidArgumentError(absl::StrCat("batch delete of key \"", ShowKey(key),
                                                     "\": unknown column family '", Sv(cf), "'"));
    return;
  }
  error_ = FromRocksStatus(batch_->Delete(h, ToSlice(key)),
                           absl::StrCat("batch delete ", Sv(cf), "/", ShowKey(key)));
}

absl::Status Store::Batch::Commit(bool sync) {
  // After Commit (success or not) the batch is empty and may be reused.
  absl::Status s = error_;
  if (s.ok()) s = store_->CheckWritable("batch commit");
  if (s.ok()) {
    rocksdb::WriteOptions opts;
    opts.sync = sync;
    s = FromRocksStatus(store_->db_->Write(opts, batch_.get()), "committing write batch");
  }
  batch_->Clear();
  error_ = absl::OkStatus();
  return s;
}

// ---- Store ----------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Store>> Store::Open(const std::string& dir,
                                                   const std::vector<std::string>& column_families,
                                                   const StoreTuning& tuning) {
  if (dir.empty())
    return absl::InvalidArgumentError("store: expected a directory path, found \"\"");
  for (const std::string& cf : column_families) {
    if (cf.empty()) {
      return absl::InvalidArgumentError("store " + dir + ": column family names must not be empty");
    }
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return ErrnoToStatus(ec.value(), "store: creating directory " + dir);

  rocksdb::Options options;
  options.create_if_missing = true;
  options.create_missing_column_families = true;
  options.paranoid_checks = true;
  if (tuning.memtable_budget_bytes > 0) {
    constexpr uint64_t kMinMemtable = 1 << 20;
    const uint64_t per_cf = std::max<uint64_t>(kMinMemtable, tuning.memtable_budget_bytes / 2);
    options.write_buffer_size = std::min<uint64_t>(options.write_buffer_size, per_cf);
    options.write_buffer_manager = std::make_shared<rocksdb::WriteBufferManager>(
        tuning.memtable_budget_bytes, /*cache=*/nullptr, /*allow_stall=*/false);
  }

  // An existing database must be opened with all of its column families.
  std::vector<std::string> names;
  rocksdb::Status ls = rocksdb::DB::ListColumnFamilies(options, dir, &names);
  if (!ls.ok()) {
    // No CURRENT file means no database yet; otherwise the listing error is real.
    if (std::filesystem::exists(dir + "/CURRENT", ec)) {
      return FromRocksStatus(ls, "store: listing column families of " + dir);
    }
    names.clear();
  }
  auto add = [&names](const std::string& n) {
    if (std::find(names.begin(), names.end(), n) == names.end()) names.push_back(n);
  };
  add(rocksdb::kDefaultColumnFamilyName);
  for (const std::string& cf : column_families) add(cf);

  std::vector<rocksdb::ColumnFamilyDescriptor> descriptors;
  descriptors.reserve(names.size());
  for (const std::string& n : names) {
    descriptors.emplace_back(n, rocksdb::ColumnFamilyOptions(options));
  }
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  RETURN_IF_ERROR(FromRocksStatus(rocksdb::DB::Open(options, dir, descriptors, &handles, &raw),
                                  "store: opening " + dir));
  std::unique_ptr<Store> store(new Store());
  store->db_.reset(raw);
  store->names_ = std::move(names);
  store->handles_ = std::move(handles);
  return store;
}

absl::StatusOr<std::unique_ptr<Store>> Store::OpenReadOnly(const std::string& dir) {
  if (dir.empty())
    return absl::InvalidArgumentError("store: expected a directory path, found \"\"");
  std::error_code ec;
  if (!std::filesystem::exists(dir + "/CURRENT", ec)) {
    return absl::NotFoundError("store: no database in " + dir + " (expected " + dir +
                               "/CURRENT) to open read-only");
  }
  rocksdb::Options options;
  options.create_if_missing = false;
  options.paranoid_checks = true;
  std::vector<std::string> names;
  RETURN_IF_ERROR(FromRocksStatus(rocksdb::DB::ListColumnFamilies(options, dir, &names),
                                  "store: listing column families of " + dir));
  std::vector<rocksdb::ColumnFamilyDescriptor> descriptors;
  descriptors.reserve(names.size());
  for (const std::string& n : names) {
    descriptors.emplace_back(n, rocksdb::ColumnFamilyOptions(options));
  }
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  RETURN_IF_ERROR(
      FromRocksStatus(rocksdb::DB::OpenForReadOnly(options, dir, descriptors, &handles, &raw),
                      "store: opening " + dir + " read-only"));
  std::unique_ptr<Store> store(new Store());
  store->db_.reset(raw);
  store->names_ = std::move(names);
  store->handles_ = std::move(handles);
  store->read_only_ = true;
  return store;
}

absl::Status Store::CheckWritable(std::string_view op) const {
  if (!read_only_) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("store ", Sv(op), ": the store was opened read-only"));
}

Store::~Store() {
  if (!db_) return;
  for (rocksdb::ColumnFamilyHandle* h : handles_) db_->DestroyColumnFamilyHandle(h);
  handles_.clear();
  db_->Close();  // best effort: errors are already durable-or-lost by now
  db_.reset();
}

rocksdb::ColumnFamilyHandle* Store::Handle(std::string_view cf) const {
  for (size_t i = 0; i < names_.size(); ++i) {
    if (names_[i] == cf) return handles_[i];
  }
  return nullptr;
}

namespace {
absl::Status UnknownCf(std::string_view op, std::string_view cf,
                       const std::vector<std::string>& names) {
  return absl::InvalidArgumentError(
      absl::StrCat("store ", Sv(op), ": unknown column family '", Sv(cf),
                   "' (expected one of: ", absl::StrJoin(names, ", "), ")"));
}
}  // namespace

absl::Status Store::Put(std::string_view cf, std::string_view key, std::string_view value,
                        bool sync) {
  RETURN_IF_ERROR(CheckWritable(absl::StrCat("put ", Sv(cf), "/", ShowKey(key))));
  rocksdb::ColumnFamilyHandle* h = Handle(cf);
  if (h == nullptr) return UnknownCf("put", cf, names_);
  rocksdb::WriteOptions opts;
  opts.sync = sync;
  return FromRocksStatus(db_->Put(opts, h, ToSlice(key), ToSlice(value)),
                         absl::StrCat("store put ", Sv(cf), "/", ShowKey(key)));
}

absl::StatusOr<std::string> Store::Get(std::string_view cf, std::string_view key) const {
  rocksdb::ColumnFamilyHandle* h = Handle(cf);
  if (h == nullptr) return UnknownCf("get", cf, names_);
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), h, ToSlice(key), &value);
  if (s.IsNotFound()) {
    return absl::NotFoundError(absl::StrCat("store: key \"", ShowKey(key),
                                            "\" not found in column family '", Sv(cf), "'"));
  }
  RETURN_IF_ERROR(FromRocksStatus(s, absl::StrCat("store get ", Sv(cf), "/", ShowKey(key))));
  return value;
}

absl::Status Store::Delete(std::string_view cf, std::string_view key, bool sync) {
  RETURN_IF_ERROR(CheckWritable(absl::StrCat("delete ", Sv(cf), "/", ShowKey(key))));
  rocksdb::ColumnFamilyHandle* h = Handle(cf);
  if (h == nullptr) return UnknownCf("delete", cf, names_);
  rocksdb::WriteOptions opts;
  opts.sync = sync;
  return FromRocksStatus(db_->Delete(opts, h, ToSlice(key)),
                         absl::StrCat("store delete ", Sv(cf), "/", ShowKey(key)));
}

absl::Status Store::Scan(std::string_view cf, std::string_view prefix,
                         const std::function<bool(std::string_view, std::string_view)>& fn) const {
  rocksdb::ColumnFamilyHandle* h = Handle(cf);
  if (h == nullptr) return UnknownCf("scan", cf, names_);
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), h));
  for (it->Seek(ToSlice(prefix)); it->Valid(); it->Next()) {
    rocksdb::Slice k = it->key();
    std::string_view key(k.data(), k.size());
    if (key.substr(0, prefix.size()) != prefix) break;
    rocksdb::Slice v = it->value();
    if (!fn(key, std::string_view(v.data(), v.size()))) break;
  }
  return FromRocksStatus(it->status(), absl::StrCat("store scan ", Sv(cf), "/", ShowKey(prefix)));
}

absl::Status Store::Checkpoint(const std::string& dir) const {
  if (read_only_) {
    return absl::UnimplementedError("store: checkpoint into " + dir +
                                    ": not supported on a store opened read-only");
  }
  rocksdb::Checkpoint* raw = nullptr;
  RETURN_IF_ERROR(FromRocksStatus(rocksdb::Checkpoint::Create(db_.get(), &raw),
                                  "store: creating checkpoint object"));
  std::unique_ptr<rocksdb::Checkpoint> cp(raw);
  return FromRocksStatus(cp->CreateCheckpoint(dir), "store: checkpoint into " + dir);
}

absl::Status Store::Flush() {
  RETURN_IF_ERROR(CheckWritable("flush"));
  rocksdb::FlushOptions opts;
  opts.wait = true;
  RETURN_IF_ERROR(FromRocksStatus(db_->Flush(opts, handles_), "store: flushing memtables"));
  return FromRocksStatus(db_->FlushWAL(/*sync=*/true), "store: syncing WAL");
}

absl::StatusOr<uint64_t> Store::IntProperty(std::string_view cf, std::string_view name) const {
  rocksdb::ColumnFamilyHandle* h = Handle(cf);
  if (h == nullptr) return UnknownCf(absl::StrCat("property ", Sv(name)), cf, names_);
  uint64_t value = 0;
  if (!db_->GetIntProperty(h, ToSlice(name), &value)) {
    return absl::NotFoundError(absl::StrCat("store: RocksDB has no integer property '", Sv(name),
                                            "' for column family '", Sv(cf), "'"));
  }
  return value;
}

}  // namespace fedlora::common
