#pragma once
// GGUF v3 files (the llama.cpp / ggml model format): writer and validating reader.
//
// Layout (all little-endian), as specified in ggml's docs/gguf.md:
//   "GGUF" magic, u32 version (3), u64 tensor_count, u64 kv_count,
//   kv_count x { string key, u32 value_type, value },
//   tensor_count x { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset },
//   zero padding to `general.alignment` (u32, default 32),
//   tensor data; every tensor's offset (relative to the data section) is a
//   multiple of the alignment. A string is a u64 byte length + bytes (no NUL).
//   An array is u32 element type + u64 count + elements.
//
// Tensor dims are in ggml order: ne[0] is the innermost (contiguous) dimension,
// so a row-major HostTensor of shape [rows, cols] has ne = {cols, rows}. The
// helpers below convert in both directions.
//
// Tensor types supported for data: F32, F16, Q8_0 and Q4_0, with ggml's exact
// block layouts (32 values per block):
//   Q8_0: fp16 d = max|x|/127, then 32 x int8 q = round(x/d); 34 bytes.
//   Q4_0: fp16 d = m/-8 where m is the value of largest magnitude (sign kept),
//         then 16 bytes: byte j holds value j in its low nibble and value j+16
//         in its high nibble, q = min(15, (int)(x/d + 8.5)); x ~ (q-8)*d; 18 bytes.
// Quantized tensors need ne[0] to be a multiple of 32 (rows are quantized
// independently, as ggml does).
//
// The reader validates everything before exposing anything: magic, version
// (2 or 3), counts bounded by the file size, string lengths, known value and
// tensor types, no nested arrays, unique keys and tensor names, bool bytes 0/1,
// general.alignment (u32, power of two), 1..4 dims each >= 1 with a product
// that does not overflow, block-multiple rows, aligned offsets, data in range
// and tensors not overlapping. A bad file is an InvalidArgument error naming the
// source and the key / tensor / field at fault. Bad input never crashes.
//
// Thread-compatible: concurrent const use of one GgufFile is safe.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "common/io/mapped_file.h"
#include "common/tensor/tensor.h"

namespace fedlora::common {

// GGUF metadata value types (numbers as in the file).
enum class GgufType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};
const char* GgufTypeName(GgufType type);

// ggml tensor types this code reads and writes (numbers as in ggml.h).
enum class GgmlType : uint32_t { kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ8_0 = 8 };
const char* GgmlTypeName(GgmlType type);
inline constexpr size_t kGgmlBlockValues = 32;
inline constexpr size_t kQ4_0BlockBytes = 18;
inline constexpr uint32_t kGgufDefaultAlignment = 32;

// Bytes needed for `n` values of `type` (n must be a block multiple for quant types).
size_t GgmlRowBytes(GgmlType type, int64_t n);

// q4_0 blocks as ggml's quantize_row_q4_0_ref writes them. `n` must be a
// multiple of 32 (callers pad); non-finite inputs are treated as 0.
std::string QuantizeQ4_0(const float* x, size_t n);
// `bytes` must hold exactly n/32 blocks.
absl::Status DequantizeQ4_0(std::string_view bytes, size_t n, float* out);

// One metadata value. Scalars keep their exact type; arrays hold scalars or
// strings of one element type (elem_type).
class GgufValue {
 public:
  GgufValue() = default;
  static GgufValue U8(uint8_t v);
  static GgufValue I8(int8_t v);
  static GgufValue U16(uint16_t v);
  static GgufValue I16(int16_t v);
  static GgufValue U32(uint32_t v);
  static GgufValue I32(int32_t v);
  static GgufValue U64(uint64_t v);
  static GgufValue I64(int64_t v);
  static GgufValue F32(float v);
  static GgufValue F64(double v);
  static GgufValue Bool(bool v);
  static GgufValue Str(std::string v);
  // An array; every element must be a scalar or string of type `elem_type`.
  static GgufValue Array(GgufType elem_type, std::vector<GgufValue> items);
  static GgufValue StrArray(const std::vector<std::string>& items);
  static GgufValue I32Array(const std::vector<int32_t>& items);
  static GgufValue F32Array(const std::vector<float>& items);

  GgufType type() const { return type_; }
  GgufType elem_type() const { return elem_type_; }               // arrays only
  const std::vector<GgufValue>& items() const { return items_; }  // arrays only
  const std::string& str() const { return str_; }                 // strings only
  // Integer / bool values (any integer type; bool is 0/1).
  bool is_integer() const;
  uint64_t as_u64() const { return u_; }
  int64_t as_i64() const { return i_; }
  double as_f64() const { return f_; }  // floats
  bool as_bool() const { return u_ != 0; }

  bool operator==(const GgufValue& o) const;
  bool operator!=(const GgufValue& o) const { return !(*this == o); }

 private:
  GgufType type_ = GgufType::kUint32;
  GgufType elem_type_ = GgufType::kUint8;
  uint64_t u_ = 0;
  int64_t i_ = 0;
  double f_ = 0;
  std::string str_;
  std::vector<GgufValue> items_;
};

using GgufMetadata = std::vector<std::pair<std::string, GgufValue>>;

// Builds a GGUF file in memory. Metadata keeps insertion order (Set on an
// existing key replaces the value in place); tensors keep insertion order.
class GgufWriter {
 public:
  GgufWriter();  // sets nothing; alignment 32 unless "general.alignment" is Set
  void Set(const std::string& key, GgufValue value);
  const GgufMetadata& metadata() const { return kv_; }

  // Adds a row-major fp32 tensor stored as `type` (ne = reversed shape).
  // InvalidArgument for a duplicate/empty/too long (>= 64 bytes) name, rank
  // outside 1..4, a zero dim, or a quantized type whose rows are not a multiple of 32.
  absl::Status AddTensor(const std::string& name, const HostTensor& tensor, GgmlType type);
  // Adds already encoded data; `ne` in ggml order. Same checks; bytes must match.
  absl::Status AddRawTensor(const std::string& name, std::vector<int64_t> ne, GgmlType type,
                            std::string bytes);
  size_t tensor_count() const { return tensors_.size(); }

  // The whole file. Deterministic for equal input.
  std::string Serialize() const;
  // Serialize() written to `path` atomically (temp file + rename).
  absl::Status WriteFile(const std::string& path) const;

 private:
  struct Pending {
    std::string name;
    std::vector<int64_t> ne;
    GgmlType type;
    std::string bytes;
  };
  uint32_t Alignment() const;
  GgufMetadata kv_;
  std::vector<Pending> tensors_;
};

// One tensor inside a GgufFile (views stay valid while the file lives).
struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ggml order
  GgmlType type = GgmlType::kF32;
  uint64_t offset = 0;  // relative to the data section
  const uint8_t* data = nullptr;
  size_t nbytes = 0;

  int64_t numel() const;
  // Row-major shape (reversed ne).
  std::vector<int64_t> shape() const;
};

class GgufFile {
 public:
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  static absl::StatusOr<std::unique_ptr<GgufFile>> FromBytes(std::string bytes, std::string source);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  const GgufMetadata& metadata() const { return kv_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const std::string& source() const { return source_; }

  const GgufValue* Find(std::string_view key) const;  // nullptr if absent
  const GgufTensorInfo* FindTensor(std::string_view name) const;

  // Typed getters: NotFound if absent, InvalidArgument naming the key if the
  // type differs (integers accept any integer type whose value fits).
  absl::StatusOr<std::string> GetString(std::string_view key) const;
  absl::StatusOr<uint64_t> GetUint(std::string_view key) const;
  absl::StatusOr<double> GetFloat(std::string_view key) const;  // F32 or F64

  // Dequantizes a tensor to fp32 with the row-major shape.
  absl::StatusOr<HostTensor> ToHost(const GgufTensorInfo& tensor) const;

 private:
  GgufFile() = default;
  absl::Status Parse(const uint8_t* base, size_t size);

  std::string source_;
  std::string owned_;  // FromBytes storage
  MappedFile map_;     // Open storage
  uint32_t version_ = 0;
  uint32_t alignment_ = kGgufDefaultAlignment;
  GgufMetadata kv_;
  std::vector<GgufTensorInfo> tensors_;
};

}  // namespace fedlora::common
