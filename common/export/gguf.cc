#include "common/export/gguf.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/crypto/crypto.h"
#include "common/quant/quant.h"
#include "common/status/status.h"

namespace fedlora::common {
namespace {

constexpr char kMagic[4] = {'G', 'G', 'U', 'F'};
constexpr size_t kMaxNameBytes = 63;  // ggml's GGML_MAX_NAME is 64 including the NUL
constexpr uint32_t kMaxDims = 4;

bool KnownValueType(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::kFloat64); }

bool KnownGgmlType(uint32_t t) { return t == 0 || t == 1 || t == 2 || t == 8; }

// Fixed size of a scalar value type; 0 for string/array.
size_t ScalarSize(GgufType t) {
  switch (t) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kBool:
      return 1;
    case GgufType::kUint16:
    case GgufType::kInt16:
      return 2;
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kFloat32:
      return 4;
    case GgufType::kUint64:
    case GgufType::kInt64:
    case GgufType::kFloat64:
      return 8;
    case GgufType::kString:
    case GgufType::kArray:
      return 0;
  }
  return 0;
}

uint64_t AlignUp(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

// ---------------------------------------------------------------- writing

class Out {
 public:
  void U8(uint8_t v) { s_.push_back(static_cast<char>(v)); }
  void U32(uint32_t v) { Raw(&v, 4); }
  void U64(uint64_t v) { Raw(&v, 8); }
  void Str(std::string_view v) {
    U64(v.size());
    s_.append(v.data(), v.size());
  }
  void Raw(const void* p, size_t n) { s_.append(static_cast<const char*>(p), n); }
  void PadTo(uint64_t align) { s_.resize(AlignUp(s_.size(), align), '\0'); }
  std::string& str() { return s_; }

 private:
  std::string s_;  // little-endian host assumed (x86-64 / aarch64), as ggml does
};

void WriteScalar(Out* out, const GgufValue& v) {
  switch (v.type()) {
    case GgufType::kUint8:
    case GgufType::kBool:
      out->U8(static_cast<uint8_t>(v.as_u64()));
      break;
    case GgufType::kInt8: {
      int8_t x = static_cast<int8_t>(v.as_i64());
      out->Raw(&x, 1);
      break;
    }
    case GgufType::kUint16: {
      uint16_t x = static_cast<uint16_t>(v.as_u64());
      out->Raw(&x, 2);
      break;
    }
    case GgufType::kInt16: {
      int16_t x = static_cast<int16_t>(v.as_i64());
      out->Raw(&x, 2);
      break;
    }
    case GgufType::kUint32:
      out->U32(static_cast<uint32_t>(v.as_u64()));
      break;
    case GgufType::kInt32: {
      int32_t x = static_cast<int32_t>(v.as_i64());
      out->Raw(&x, 4);
      break;
    }
    case GgufType::kFloat32: {
      float x = static_cast<float>(v.as_f64());
      out->Raw(&x, 4);
      break;
    }
    case GgufType::kUint64:
      out->U64(v.as_u64());
      break;
    case GgufType::kInt64: {
      int64_t x = v.as_i64();
      out->Raw(&x, 8);
      break;
    }
    case GgufType::kFloat64: {
      double x = v.as_f64();
      out->Raw(&x, 8);
      break;
    }
    case GgufType::kString:
      out->Str(v.str());
      break;
    case GgufType::kArray:
      out->U32(static_cast<uint32_t>(v.elem_type()));
      out->U64(v.items().size());
      for (const GgufValue& item : v.items()) WriteScalar(out, item);
      break;
  }
}

// ---------------------------------------------------------------- reading

class In {
 public:
  In(const uint8_t* base, size_t size, const std::string& source)
      : p_(base), size_(size), source_(source) {}
  size_t pos() const { return pos_; }
  size_t left() const { return size_ - pos_; }

  absl::Status Need(size_t n, const std::string& what) const {
    if (n > left()) {
      return absl::InvalidArgumentError(absl::StrCat(source_, ": truncated at byte ", pos_,
                                                     " reading ", what, ": expected ", n,
                                                     " more bytes, found ", left()));
    }
    return absl::OkStatus();
  }
  template <typename T>
  absl::StatusOr<T> Get(const std::string& what) {
    RETURN_IF_ERROR(Need(sizeof(T), what));
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  absl::StatusOr<std::string> Str(const std::string& what) {
    ASSIGN_OR_RETURN(uint64_t len, Get<uint64_t>(what));
    if (len > left()) {
      return absl::InvalidArgumentError(absl::StrCat(source_, ": ", what, " at byte ", pos_ - 8,
                                                     " has length ", len, " but only ", left(),
                                                     " bytes remain in the file"));
    }
    std::string s(reinterpret_cast<const char*>(p_ + pos_), static_cast<size_t>(len));
    pos_ += static_cast<size_t>(len);
    return s;
  }

 private:
  const uint8_t* p_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& source_;
};

absl::StatusOr<GgufValue> ReadScalar(In* in, GgufType t, const std::string& what,
                                     const std::string& source) {
  switch (t) {
    case GgufType::kUint8: {
      ASSIGN_OR_RETURN(uint8_t v, in->Get<uint8_t>(what));
      return GgufValue::U8(v);
    }
    case GgufType::kInt8: {
      ASSIGN_OR_RETURN(int8_t v, in->Get<int8_t>(what));
      return GgufValue::I8(v);
    }
    case GgufType::kUint16: {
      ASSIGN_OR_RETURN(uint16_t v, in->Get<uint16_t>(what));
      return GgufValue::U16(v);
    }
    case GgufType::kInt16: {
      ASSIGN_OR_RETURN(int16_t v, in->Get<int16_t>(what));
      return GgufValue::I16(v);
    }
    case GgufType::kUint32: {
      ASSIGN_OR_RETURN(uint32_t v, in->Get<uint32_t>(what));
      return GgufValue::U32(v);
    }
    case GgufType::kInt32: {
      ASSIGN_OR_RETURN(int32_t v, in->Get<int32_t>(what));
      return GgufValue::I32(v);
    }
    case GgufType::kFloat32: {
      ASSIGN_OR_RETURN(float v, in->Get<float>(what));
      return GgufValue::F32(v);
    }
    case GgufType::kUint64: {
      ASSIGN_OR_RETURN(uint64_t v, in->Get<uint64_t>(what));
      return GgufValue::U64(v);
    }
    case GgufType::kInt64: {
      ASSIGN_OR_RETURN(int64_t v, in->Get<int64_t>(what));
      return GgufValue::I64(v);
    }
    case GgufType::kFloat64: {
      ASSIGN_OR_RETURN(double v, in->Get<double>(what));
      return GgufValue::F64(v);
    }
    case GgufType::kBool: {
      ASSIGN_OR_RETURN(uint8_t v, in->Get<uint8_t>(what));
      if (v > 1) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": ", what, ": expected a bool byte 0 or 1, found ", int{v}));
      }
      return GgufValue::Bool(v != 0);
    }
    case GgufType::kString: {
      ASSIGN_OR_RETURN(std::string s, in->Str(what));
      return GgufValue::Str(std::move(s));
    }
    case GgufType::kArray:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat(source, ": ", what, ": nested arrays are not supported"));
}

}  // namespace

// ---------------------------------------------------------------- names, sizes

const char* GgufTypeName(GgufType type) {
  switch (type) {
    case GgufType::kUint8:
      return "UINT8";
    case GgufType::kInt8:
      return "INT8";
    case GgufType::kUint16:
      return "UINT16";
    case GgufType::kInt16:
      return "INT16";
    case GgufType::kUint32:
      return "UINT32";
    case GgufType::kInt32:
      return "INT32";
    case GgufType::kFloat32:
      return "FLOAT32";
    case GgufType::kBool:
      return "BOOL";
    case GgufType::kString:
      return "STRING";
    case GgufType::kArray:
      return "ARRAY";
    case GgufType::kUint64:
      return "UINT64";
    case GgufType::kInt64:
      return "INT64";
    case GgufType::kFloat64:
      return "FLOAT64";
  }
  return "?";
}

const char* GgmlTypeName(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
      return "F32";
    case GgmlType::kF16:
      return "F16";
    case GgmlType::kQ4_0:
      return "Q4_0";
    case GgmlType::kQ8_0:
      return "Q8_0";
  }
  return "?";
}

size_t GgmlRowBytes(GgmlType type, int64_t n) {
  const size_t un = static_cast<size_t>(n);
  switch (type) {
    case GgmlType::kF32:
      return un * 4;
    case GgmlType::kF16:
      return un * 2;
    case GgmlType::kQ4_0:
      return un / kGgmlBlockValues * kQ4_0BlockBytes;
    case GgmlType::kQ8_0:
      return un / kGgmlBlockValues * kQ8BlockBytes;
  }
  return 0;
}

// ---------------------------------------------------------------- q4_0

std::string QuantizeQ4_0(const float* x, size_t n) {
  const size_t nb = n / kGgmlBlockValues;
  std::string out(nb * kQ4_0BlockBytes, '\0');
  for (size_t b = 0; b < nb; ++b) {
    const float* v = x + b * kGgmlBlockValues;
    float amax = 0.0f;
    float max = 0.0f;
    for (size_t j = 0; j < kGgmlBlockValues; ++j) {
      const float a = std::isfinite(v[j]) ? v[j] : 0.0f;
      if (std::fabs(a) > amax) {
        amax = std::fabs(a);
        max = a;
      }
    }
    float d = max / -8.0f;
    if (d > 65504.0f) d = 65504.0f;
    if (d < -65504.0f) d = -65504.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t h = FloatToHalf(d);
    char* block = out.data() + b * kQ4_0BlockBytes;
    block[0] = static_cast<char>(h & 0xff);
    block[1] = static_cast<char>(h >> 8);
    for (size_t j = 0; j < kGgmlBlockValues / 2; ++j) {
      const float a0 = std::isfinite(v[j]) ? v[j] : 0.0f;
      const float a1 = std::isfinite(v[j + 16]) ? v[j + 16] : 0.0f;
      // As ggml: truncation toward zero of x/d + 8.5, capped at 15. |x/d| <= 8,
      // so the sum lies in [0.5, 16.5] and the cast is defined.
      const float s0 = std::clamp(a0 * id + 8.5f, 0.0f, 16.5f);
      const float s1 = std::clamp(a1 * id + 8.5f, 0.0f, 16.5f);
      const int q0 = std::min(15, static_cast<int>(static_cast<int8_t>(s0)));
      const int q1 = std::min(15, static_cast<int>(static_cast<int8_t>(s1)));
      block[2 + j] = static_cast<char>(q0 | (q1 << 4));
    }
  }
  return out;
}

absl::Status DequantizeQ4_0(std::string_view bytes, size_t n, float* out) {
  if (n % kGgmlBlockValues != 0 || bytes.size() != n / kGgmlBlockValues * kQ4_0BlockBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("q4_0: expected ", n / kGgmlBlockValues * kQ4_0BlockBytes, " bytes for ", n,
                     " values (a multiple of 32), found ", bytes.size()));
  }
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  for (size_t b = 0; b < n / kGgmlBlockValues; ++b) {
    const uint8_t* block = p + b * kQ4_0BlockBytes;
    const float d = HalfToFloat(static_cast<uint16_t>(block[0] | (block[1] << 8)));
    if (!std::isfinite(d)) {
      return absl::InvalidArgumentError(
          absl::StrCat("q4_0: block ", b, ": expected a finite scale, found ", d));
    }
    for (size_t j = 0; j < 16; ++j) {
      out[b * 32 + j] = static_cast<float>((block[2 + j] & 0x0f) - 8) * d;
      out[b * 32 + j + 16] = static_cast<float>((block[2 + j] >> 4) - 8) * d;
    }
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------- GgufValue

GgufValue GgufValue::U8(uint8_t v) {
  GgufValue x;
  x.type_ = GgufType::kUint8;
  x.u_ = v;
  x.i_ = v;
  return x;
}
GgufValue GgufValue::I8(int8_t v) {
  GgufValue x;
  x.type_ = GgufType::kInt8;
  x.i_ = v;
  x.u_ = static_cast<uint64_t>(static_cast<int64_t>(v));
  return x;
}
GgufValue GgufValue::U16(uint16_t v) {
  GgufValue x = U8(0);
  x.type_ = GgufType::kUint16;
  x.u_ = v;
  x.i_ = v;
  return x;
}
GgufValue GgufValue::I16(int16_t v) {
  GgufValue x = I8(0);
  x.type_ = GgufType::kInt16;
  x.i_ = v;
  x.u_ = static_cast<uint64_t>(static_cast<int64_t>(v));
  return x;
}
GgufValue GgufValue::U32(uint32_t v) {
  GgufValue x;
  x.type_ = GgufType::kUint32;
  x.u_ = v;
  x.i_ = v;
  return x;
}
GgufValue GgufValue::I32(int32_t v) {
  GgufValue x;
  x.type_ = GgufType::kInt32;
  x.i_ = v;
  x.u_ = static_cast<uint64_t>(static_cast<int64_t>(v));
  return x;
}
GgufValue GgufValue::U64(uint64_t v) {
  GgufValue x;
  x.type_ = GgufType::kUint64;
  x.u_ = v;
  x.i_ = static_cast<int64_t>(v);
  return x;
}
GgufValue GgufValue::I64(int64_t v) {
  GgufValue x;
  x.type_ = GgufType::kInt64;
  x.i_ = v;
  x.u_ = static_cast<uint64_t>(v);
  return x;
}
GgufValue GgufValue::F32(float v) {
  GgufValue x;
  x.type_ = GgufType::kFloat32;
  x.f_ = v;
  return x;
}
GgufValue GgufValue::F64(double v) {
  GgufValue x;
  x.type_ = GgufType::kFloat64;
  x.f_ = v;
  return x;
}
GgufValue GgufValue::Bool(bool v) {
  GgufValue x;
  x.type_ = GgufType::kBool;
  x.u_ = v ? 1 : 0;
  x.i_ = v ? 1 : 0;
  return x;
}
GgufValue GgufValue::Str(std::string v) {
  GgufValue x;
  x.type_ = GgufType::kString;
  x.str_ = std::move(v);
  return x;
}
GgufValue GgufValue::Array(GgufType elem_type, std::vector<GgufValue> items) {
  GgufValue x;
  x.type_ = GgufType::kArray;
  x.elem_type_ = elem_type;
  x.items_ = std::move(items);
  return x;
}
GgufValue GgufValue::StrArray(const std::vector<std::string>& items) {
  std::vector<GgufValue> v;
  v.reserve(items.size());
  for (const std::string& s : items) v.push_back(Str(s));
  return Array(GgufType::kString, std::move(v));
}
GgufValue GgufValue::I32Array(const std::vector<int32_t>& items) {
  std::vector<GgufValue> v;
  v.reserve(items.size());
  for (int32_t s : items) v.push_back(I32(s));
  return Array(GgufType::kInt32, std::move(v));
}
GgufValue GgufValue::F32Array(const std::vector<float>& items) {
  std::vector<GgufValue> v;
  v.reserve(items.size());
  for (float s : items) v.push_back(F32(s));
  return Array(GgufType::kFloat32, std::move(v));
}

bool GgufValue::is_integer() const {
  switch (type_) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kUint16:
    case GgufType::kInt16:
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kUint64:
    case GgufType::kInt64:
    case GgufType::kBool:
      return true;
    default:
      return false;
  }
}

bool GgufValue::operator==(const GgufValue& o) const {
  if (type_ != o.type_) return false;
  switch (type_) {
    case GgufType::kString:
      return str_ == o.str_;
    case GgufType::kArray:
      return elem_type_ == o.elem_type_ && items_ == o.items_;
    case GgufType::kFloat32:
    case GgufType::kFloat64:
      // Bitwise-ish: NaN equals NaN so a round trip compares equal.
      return f_ == o.f_ || (std::isnan(f_) && std::isnan(o.f_));
    default:
      return u_ == o.u_ && i_ == o.i_;
  }
}

// ---------------------------------------------------------------- GgufWriter

GgufWriter::GgufWriter() = default;

void GgufWriter::Set(const std::string& key, GgufValue value) {
  for (auto& [k, v] : kv_) {
    if (k == key) {
      v = std::move(value);
      return;
    }
  }
  kv_.emplace_back(key, std::move(value));
}

uint32_t GgufWriter::Alignment() const {
  for (const auto& [k, v] : kv_) {
    if (k == "general.alignment" && v.type() == GgufType::kUint32 && v.as_u64() != 0 &&
        (v.as_u64() & (v.as_u64() - 1)) == 0) {
      return static_cast<uint32_t>(v.as_u64());
    }
  }
  return kGgufDefaultAlignment;
}

absl::Status GgufWriter::AddRawTensor(const std::string& name, std::vector<int64_t> ne,
                                      GgmlType type, std::string bytes) {
  if (name.empty() || name.size() > kMaxNameBytes) {
    return absl::InvalidArgumentError(absl::StrCat("GGUF tensor name '", name, "': expected 1..",
                                                   kMaxNameBytes, " bytes, found ", name.size()));
  }
  for (const Pending& p : tensors_) {
    if (p.name == name) {
      return absl::InvalidArgumentError(absl::StrCat("GGUF tensor '", name, "' added twice"));
    }
  }
  if (ne.empty() || ne.size() > kMaxDims) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF tensor '", name, "': expected 1..4 dims, found ", ne.size()));
  }
  int64_t numel = 1;
  for (int64_t d : ne) {
    if (d < 1 || numel > std::numeric_limits<int64_t>::max() / d) {
      return absl::InvalidArgumentError(
          absl::StrCat("GGUF tensor '", name, "': bad dims [", absl::StrJoin(ne, ","), "]"));
    }
    numel *= d;
  }
  if ((type == GgmlType::kQ4_0 || type == GgmlType::kQ8_0) && ne[0] % kGgmlBlockValues != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF tensor '", name, "': ", GgmlTypeName(type),
                     " needs rows (ne[0]) that are a multiple of 32, found ", ne[0]));
  }
  const size_t expect = GgmlRowBytes(type, ne[0]) * static_cast<size_t>(numel / ne[0]);
  if (bytes.size() != expect) {
    return absl::InvalidArgumentError(absl::StrCat("GGUF tensor '", name, "': expected ", expect,
                                                   " bytes of ", GgmlTypeName(type), ", found ",
                                                   bytes.size()));
  }
  tensors_.push_back(Pending{name, std::move(ne), type, std::move(bytes)});
  return absl::OkStatus();
}

absl::Status GgufWriter::AddTensor(const std::string& name, const HostTensor& tensor,
                                   GgmlType type) {
  if (tensor.shape.empty() || tensor.numel() != static_cast<int64_t>(tensor.data.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF tensor '", name, "': shape [", absl::StrJoin(tensor.shape, ","),
                     "] does not match ", tensor.data.size(), " values"));
  }
  std::vector<int64_t> ne(tensor.shape.rbegin(), tensor.shape.rend());
  const int64_t row = ne[0];
  if ((type == GgmlType::kQ4_0 || type == GgmlType::kQ8_0) &&
      (row < 1 || row % static_cast<int64_t>(kGgmlBlockValues) != 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF tensor '", name, "': ", GgmlTypeName(type),
                     " needs rows (last dim) that are a multiple of 32, found ", row));
  }
  std::string bytes;
  const float* x = tensor.data.data();
  const size_t n = tensor.data.size();
  switch (type) {
    case GgmlType::kF32:
      bytes.assign(reinterpret_cast<const char*>(x), n * sizeof(float));
      break;
    case GgmlType::kF16: {
      bytes.resize(n * 2);
      for (size_t i = 0; i < n; ++i) {
        const uint16_t h = FloatToHalf(x[i]);
        std::memcpy(bytes.data() + 2 * i, &h, 2);
      }
      break;
    }
    case GgmlType::kQ8_0:
      // Rows are a multiple of 32, so blocks never straddle rows and the flat
      // quantization equals ggml's row-by-row one.
      bytes = QuantizeQ8_0(x, n);
      break;
    case GgmlType::kQ4_0:
      bytes = QuantizeQ4_0(x, n);
      break;
  }
  return AddRawTensor(name, std::move(ne), type, std::move(bytes));
}

std::string GgufWriter::Serialize() const {
  const uint32_t align = Alignment();
  Out out;
  out.Raw(kMagic, 4);
  out.U32(3);
  out.U64(tensors_.size());
  out.U64(kv_.size());
  for (const auto& [k, v] : kv_) {
    out.Str(k);
    out.U32(static_cast<uint32_t>(v.type()));
    WriteScalar(&out, v);
  }
  uint64_t offset = 0;
  for (const Pending& t : tensors_) {
    out.Str(t.name);
    out.U32(static_cast<uint32_t>(t.ne.size()));
    for (int64_t d : t.ne) out.U64(static_cast<uint64_t>(d));
    out.U32(static_cast<uint32_t>(t.type));
    out.U64(offset);
    offset = AlignUp(offset + t.bytes.size(), align);
  }
  out.PadTo(align);
  const size_t data_start = out.str().size();
  for (const Pending& t : tensors_) {
    out.Raw(t.bytes.data(), t.bytes.size());
    const size_t rel = out.str().size() - data_start;
    out.str().resize(data_start + AlignUp(rel, align), '\0');
  }
  return std::move(out.str());
}

absl::Status GgufWriter::WriteFile(const std::string& path) const {
  return WriteFileAtomic(path, Serialize(), 0644);
}

// ---------------------------------------------------------------- GgufFile

int64_t GgufTensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  return n;
}

std::vector<int64_t> GgufTensorInfo::shape() const {
  return std::vector<int64_t>(ne.rbegin(), ne.rend());
}

GgufFile::~GgufFile() = default;

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  ASSIGN_OR_RETURN(MappedFile map, MappedFile::Open(path, "GGUF file"));
  if (map.size() == 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": empty file, expected a GGUF header"));
  }
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->source_ = path;
  file->map_ = std::move(map);
  RETURN_IF_ERROR(file->Parse(file->map_.data(), file->map_.size()));
  return file;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::FromBytes(std::string bytes,
                                                              std::string source) {
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->source_ = std::move(source);
  file->owned_ = std::move(bytes);
  RETURN_IF_ERROR(
      file->Parse(reinterpret_cast<const uint8_t*>(file->owned_.data()), file->owned_.size()));
  return file;
}

absl::Status GgufFile::Parse(const uint8_t* base, size_t size) {
  const std::string& src = source_;
  auto bad = [&](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat(src, ": ", parts...));
  };
  In in(base, size, src);
  RETURN_IF_ERROR(in.Need(4, "magic"));
  if (std::memcmp(base, kMagic, 4) != 0) {
    return bad("expected magic \"GGUF\" at byte 0, found bytes ",
               absl::StrJoin(std::vector<int>{base[0], base[1], base[2], base[3]}, ","));
  }
  in.Get<uint32_t>("magic").IgnoreError();
  ASSIGN_OR_RETURN(version_, in.Get<uint32_t>("version"));
  if (version_ != 2 && version_ != 3) {
    return bad("expected GGUF version 2 or 3, found ", version_);
  }
  ASSIGN_OR_RETURN(uint64_t n_tensors, in.Get<uint64_t>("tensor_count"));
  ASSIGN_OR_RETURN(uint64_t n_kv, in.Get<uint64_t>("kv_count"));
  // Smallest encodings: a kv is key length (8) + type (4) + a 1-byte value;
  // a tensor info is name length (8) + n_dims (4) + one dim (8) + type (4) + offset (8).
  if (n_kv > in.left() / 13) {
    return bad("kv_count ", n_kv, " cannot fit in the ", in.left(), " bytes left");
  }
  if (n_tensors > in.left() / 32) {
    return bad("tensor_count ", n_tensors, " cannot fit in the ", in.left(), " bytes left");
  }
  kv_.reserve(static_cast<size_t>(n_kv));
  for (uint64_t i = 0; i < n_kv; ++i) {
    const std::string where = absl::StrCat("key #", i);
    ASSIGN_OR_RETURN(std::string key, in.Str(where));
    if (key.empty()) return bad(where, " at byte ", in.pos(), ": empty key");
    for (const auto& kv : kv_) {
      if (kv.first == key) return bad("duplicate key '", key, "'");
    }
    const std::string what = absl::StrCat("key '", key, "'");
    ASSIGN_OR_RETURN(uint32_t t, in.Get<uint32_t>(what + " type"));
    if (!KnownValueType(t)) return bad(what, ": unknown value type ", t);
    const auto type = static_cast<GgufType>(t);
    if (type != GgufType::kArray) {
      ASSIGN_OR_RETURN(GgufValue v, ReadScalar(&in, type, what, src));
      kv_.emplace_back(std::move(key), std::move(v));
      continue;
    }
    ASSIGN_OR_RETURN(uint32_t et, in.Get<uint32_t>(what + " array element type"));
    if (!KnownValueType(et)) return bad(what, ": unknown array element type ", et);
    const auto elem = static_cast<GgufType>(et);
    if (elem == GgufType::kArray) return bad(what, ": nested arrays are not supported");
    ASSIGN_OR_RETURN(uint64_t count, in.Get<uint64_t>(what + " array length"));
    const size_t min_elem = elem == GgufType::kString ? 8 : ScalarSize(elem);
    if (count > in.left() / min_elem) {
      return bad(what, ": array of ", count, " ", GgufTypeName(elem), " cannot fit in the ",
                 in.left(), " bytes left");
    }
    std::vector<GgufValue> items;
    items.reserve(static_cast<size_t>(count));
    for (uint64_t j = 0; j < count; ++j) {
      ASSIGN_OR_RETURN(GgufValue v, ReadScalar(&in, elem, absl::StrCat(what, "[", j, "]"), src));
      items.push_back(std::move(v));
    }
    kv_.emplace_back(std::move(key), GgufValue::Array(elem, std::move(items)));
  }
  if (const GgufValue* a = Find("general.alignment")) {
    if (a->type() != GgufType::kUint32) {
      return bad("key 'general.alignment': expected UINT32, found ", GgufTypeName(a->type()));
    }
    const uint64_t v = a->as_u64();
    if (v == 0 || (v & (v - 1)) != 0) {
      return bad("key 'general.alignment': expected a power of two, found ", v);
    }
    alignment_ = static_cast<uint32_t>(v);
  }

  tensors_.reserve(static_cast<size_t>(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    const std::string where = absl::StrCat("tensor #", i);
    ASSIGN_OR_RETURN(std::string name, in.Str(where + " name"));
    if (name.empty() || name.size() > kMaxNameBytes) {
      return bad(where, ": expected a name of 1..", kMaxNameBytes, " bytes, found ", name.size());
    }
    const std::string what = absl::StrCat("tensor '", name, "'");
    ASSIGN_OR_RETURN(uint32_t n_dims, in.Get<uint32_t>(what + " n_dims"));
    if (n_dims < 1 || n_dims > kMaxDims) {
      return bad(what, ": expected 1..4 dims, found ", n_dims);
    }
    GgufTensorInfo info;
    info.name = std::move(name);
    int64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      ASSIGN_OR_RETURN(uint64_t ne, in.Get<uint64_t>(what + " dim"));
      if (ne < 1 || ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          numel > std::numeric_limits<int64_t>::max() / static_cast<int64_t>(ne)) {
        return bad(what, ": dim ", d, " = ", ne, " is zero or makes the element count overflow");
      }
      info.ne.push_back(static_cast<int64_t>(ne));
      numel *= static_cast<int64_t>(ne);
    }
    ASSIGN_OR_RETURN(uint32_t gt, in.Get<uint32_t>(what + " type"));
    if (!KnownGgmlType(gt)) {
      return bad(what, ": unsupported ggml type ", gt,
                 " (expected F32=0, F16=1, Q4_0=2 or Q8_0=8)");
    }
    info.type = static_cast<GgmlType>(gt);
    if ((info.type == GgmlType::kQ4_0 || info.type == GgmlType::kQ8_0) &&
        info.ne[0] % static_cast<int64_t>(kGgmlBlockValues) != 0) {
      return bad(what, ": ", GgmlTypeName(info.type), " needs ne[0] to be a multiple of 32, found ",
                 info.ne[0]);
    }
    ASSIGN_OR_RETURN(info.offset, in.Get<uint64_t>(what + " offset"));
    if (info.offset % alignment_ != 0) {
      return bad(what, ": offset ", info.offset, " is not a multiple of the alignment ",
                 alignment_);
    }
    // numel fits in the file only if it is below size * 2 (q4_0 is the densest type).
    if (static_cast<uint64_t>(numel) / 2 > size) {
      return bad(what, ": ", numel, " elements cannot fit in a file of ", size, " bytes");
    }
    info.nbytes = GgmlRowBytes(info.type, info.ne[0]) * static_cast<size_t>(numel / info.ne[0]);
    for (const GgufTensorInfo& t : tensors_) {
      if (t.name == info.name) return bad("duplicate tensor name '", info.name, "'");
    }
    tensors_.push_back(std::move(info));
  }
  const uint64_t data_start = AlignUp(in.pos(), alignment_);
  if (data_start > size) {
    if (!tensors_.empty()) {
      return bad("data section starts at byte ", data_start, " past the end of the file (", size,
                 " bytes)");
    }
  }
  const uint64_t data_size = data_start > size ? 0 : size - data_start;
  for (GgufTensorInfo& t : tensors_) {
    if (t.offset > data_size || t.nbytes > data_size - t.offset) {
      return bad("tensor '", t.name, "': data [", t.offset, ", ", t.offset + t.nbytes,
                 ") is outside the data section of ", data_size, " bytes");
    }
    t.data = base + data_start + t.offset;
  }
  std::vector<const GgufTensorInfo*> by_offset;
  for (const GgufTensorInfo& t : tensors_) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const GgufTensorInfo* a = by_offset[i - 1];
    const GgufTensorInfo* b = by_offset[i];
    if (a->offset + a->nbytes > b->offset) {
      return bad("tensor '", b->name, "' (offset ", b->offset, ") overlaps tensor '", a->name,
                 "' (offset ", a->offset, ", ", a->nbytes, " bytes)");
    }
  }
  return absl::OkStatus();
}

const GgufValue* GgufFile::Find(std::string_view key) const {
  for (const auto& [k, v] : kv_) {
    if (k == key) return &v;
  }
  return nullptr;
}

const GgufTensorInfo* GgufFile::FindTensor(std::string_view name) const {
  for (const GgufTensorInfo& t : tensors_) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

absl::StatusOr<std::string> GgufFile::GetString(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr)
    return absl::NotFoundError(absl::StrCat(source_, ": no key '", std::string(key), "'"));
  if (v->type() != GgufType::kString) {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": key '", std::string(key),
                                                   "': expected STRING, found ",
                                                   GgufTypeName(v->type())));
  }
  return v->str();
}

absl::StatusOr<uint64_t> GgufFile::GetUint(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr)
    return absl::NotFoundError(absl::StrCat(source_, ": no key '", std::string(key), "'"));
  const bool is_signed = v->type() == GgufType::kInt8 || v->type() == GgufType::kInt16 ||
                         v->type() == GgufType::kInt32 || v->type() == GgufType::kInt64;
  if (!v->is_integer() || v->type() == GgufType::kBool || (is_signed && v->as_i64() < 0)) {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": key '", std::string(key),
                                                   "': expected a non-negative integer, found ",
                                                   GgufTypeName(v->type())));
  }
  return v->as_u64();
}

absl::StatusOr<double> GgufFile::GetFloat(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (v == nullptr)
    return absl::NotFoundError(absl::StrCat(source_, ": no key '", std::string(key), "'"));
  if (v->type() != GgufType::kFloat32 && v->type() != GgufType::kFloat64) {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": key '", std::string(key),
                                                   "': expected FLOAT32/FLOAT64, found ",
                                                   GgufTypeName(v->type())));
  }
  return v->as_f64();
}

absl::StatusOr<HostTensor> GgufFile::ToHost(const GgufTensorInfo& t) const {
  HostTensor out;
  out.shape = t.shape();
  const size_t n = static_cast<size_t>(t.numel());
  out.data.resize(n);
  const std::string_view bytes(reinterpret_cast<const char*>(t.data), t.nbytes);
  switch (t.type) {
    case GgmlType::kF32:
      std::memcpy(out.data.data(), t.data, n * sizeof(float));
      break;
    case GgmlType::kF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, t.data + 2 * i, 2);
        out.data[i] = HalfToFloat(h);
      }
      break;
    case GgmlType::kQ8_0: {
      absl::Status s = DequantizeQ8_0(bytes, n, out.data.data());
      if (!s.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source_, ": tensor '", t.name, "': ", s.message()));
      }
      break;
    }
    case GgmlType::kQ4_0: {
      absl::Status s = DequantizeQ4_0(bytes, n, out.data.data());
      if (!s.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source_, ": tensor '", t.name, "': ", s.message()));
      }
      break;
    }
  }
  return out;
}

}  // namespace fedlora::common
