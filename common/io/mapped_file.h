#pragma once
// A read-only memory mapping of a whole regular file (RAII over mmap/munmap).
//
// MappedFile::Open maps `path` with PROT_READ / MAP_PRIVATE. An empty file is
// a valid mapping of size 0 (data() is nullptr): format readers report what
// they expected to find. Errors (open/stat/mmap failures, not a regular file)
// name `what` and the path. The bytes stay valid, unchanged by this process,
// while the MappedFile lives; moving transfers the mapping.
// Thread-compatible: concurrent const use is safe.

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace fedlora::common {

class MappedFile {
 public:
  MappedFile() = default;
  // `what` describes the file in errors, e.g. "safetensors file" -> "open safetensors file P".
  static absl::StatusOr<MappedFile> Open(const std::string& path, const std::string& what = "file");
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return static_cast<const uint8_t*>(map_); }
  size_t size() const { return size_; }

 private:
  void Reset();
  void* map_ = nullptr;
  size_t size_ = 0;
};

}  // namespace fedlora::common
