#pragma once
// Host tensors and the safetensors file format.
//
// HostTensor is a dense, row-major fp32 tensor owned by the process. A
// TensorMap names tensors (ordered by name, so serialization is
// deterministic). Adapters and updates travel as TensorMaps; the coordinator
// works only with these (it never links libtorch).
//
// SafetensorsFile reads the safetensors format
// (https://huggingface.co/docs/safetensors): an 8-byte little-endian header
// length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__":
// {str: str}}, then the raw data. Files are memory-mapped; views point into
// the mapping and stay valid while the SafetensorsFile lives. Every header
// field is validated (offsets in range and non-overlapping, sizes matching
// dtype x shape); a bad file is an InvalidArgument error naming the file and
// the tensor at fault. Thread-compatible: concurrent const use is safe.

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/io/mapped_file.h"

namespace fedlora::common {

struct HostTensor {
  std::vector<int64_t> shape;
  std::vector<float> data;  // row-major, size == product(shape)

  int64_t numel() const;
};

using TensorMap = std::map<std::string, HostTensor>;
using Metadata = std::map<std::string, std::string>;

enum class DType { kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU8, kBool };

// "F32", "BF16", ... as spelled by safetensors.
std::string_view DTypeName(DType dtype);
size_t DTypeSize(DType dtype);

// A read-only view of one tensor inside a safetensors buffer.
struct TensorView {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;

  int64_t numel() const;
  // Converts F32/F16/BF16/F64 data to fp32. Other dtypes: InvalidArgument.
  absl::StatusOr<HostTensor> ToHost() const;
};

class SafetensorsFile {
 public:
  // Memory-maps and validates `path`.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // Parses an in-memory buffer (copied). `source` names it in errors.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromBytes(std::string bytes,
                                                                    std::string source);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::vector<TensorView>& tensors() const { return tensors_; }
  const TensorView* Find(std::string_view name) const;  // nullptr if absent
  const Metadata& metadata() const { return metadata_; }
  const std::string& source() const { return source_; }

  // All tensors converted to fp32.
  absl::StatusOr<TensorMap> ToTensorMap() const;

 private:
  SafetensorsFile() = default;
  absl::Status Parse(const uint8_t* base, size_t size);

  std::string source_;
  std::string owned_;  // FromBytes storage
  MappedFile map_;     // Open storage
  std::vector<TensorView> tensors_;
  Metadata metadata_;
};

// Serializes tensors as safetensors with dtype F32 (or BF16/F16 when
// `dtype` says so) and the given metadata. Deterministic for equal input.
std::string SerializeSafetensors(const TensorMap& tensors, const Metadata& metadata = {},
                                 DType dtype = DType::kF32);

// Writes SerializeSafetensors() output to `path` atomically (temp + rename).
absl::Status WriteSafetensors(const std::string& path, const TensorMap& tensors,
                              const Metadata& metadata = {}, DType dtype = DType::kF32);

// fp16 / bf16 conversions (round-to-nearest-even).
float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);
float BFloat16ToFloat(uint16_t b);
uint16_t FloatToBFloat16(float f);

}  // namespace fedlora::common
