#include "common/tensor/tensor.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status/status.h"
#include "nlohmann/json.hpp"

namespace fedlora::common {
namespace {

// Largest JSON header we accept (the reference implementation uses 100 MB).
constexpr uint64_t kMaxHeaderSize = 100ull * 1024 * 1024;

struct DTypeInfo {
  DType dtype;
  std::string_view name;
  size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::kF32, "F32", 4},   {DType::kF16, "F16", 2}, {DType::kBF16, "BF16", 2},
    {DType::kF64, "F64", 8},   {DType::kI64, "I64", 8}, {DType::kI32, "I32", 4},
    {DType::kI16, "I16", 2},   {DType::kI8, "I8", 1},   {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1},
};

bool ParseDType(std::string_view name, DType* out) {
  for (const auto& info : kDTypes) {
    if (info.name == name) {
      *out = info.dtype;
      return true;
    }
  }
  return false;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

// Little-endian loads: safetensors data is little-endian; so is every host we
// build for, but memcpy keeps unaligned access well defined.
template <typename T>
T LoadUnaligned(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace

int64_t HostTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string_view DTypeName(DType dtype) {
  for (const auto& info : kDTypes) {
    if (info.dtype == dtype) return info.name;
  }
  return "?";
}

size_t DTypeSize(DType dtype) {
  for (const auto& info : kDTypes) {
    if (info.dtype == dtype) return info.size;
  }
  return 0;
}

// ---------------------------------------------------------------------------
// fp16 / bf16

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      // Subnormal half: normalize.
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      mant &= 0x3ffu;
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan (payload kept)
  } else {
    bits = sign | ((exp + (127 - 15)) << 23) | (mant << 13);
  }
  return BitsFloat(bits);
}

uint16_t FloatToHalf(float f) {
  const uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or nan
    if (abs > 0x7f800000u) return sign | 0x7e00u | static_cast<uint16_t>((abs >> 13) & 0x3ffu);
    return sign | 0x7c00u;
  }
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520 -> inf
  const int32_t exp = static_cast<int32_t>(abs >> 23) - 127;
  if (exp < -14) {
    // Subnormal half (or zero). value = abs_f; half ulp = 2^-24.
    if (exp < -25) return sign;  // < 2^-25 rounds to 0 (2^-25 exactly ties to even 0)
    uint32_t mant = (abs & 0x7fffffu) | 0x800000u;  // 24-bit significand
    // value = mant * 2^(exp-23); the half subnormal unit is 2^-24, so the
    // value in units is mant * 2^(exp+1): drop -(exp+1) low bits (14..24).
    const int drop = -exp - 1;
    const uint32_t kept = mant >> drop;
    const uint32_t rem = mant & ((1u << drop) - 1);
    const uint32_t halfway = 1u << (drop - 1);
    uint32_t r = kept;
    if (rem > halfway || (rem == halfway && (kept & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);  // r may carry into the exponent: still correct
  }
  // Normal: re-bias exponent, round 23-bit mantissa to 10 bits.
  uint32_t h = (static_cast<uint32_t>(exp + 15) << 10) | ((abs >> 13) & 0x3ffu);
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // carry may bump exponent: fine
  return sign | static_cast<uint16_t>(h);
}

float BFloat16ToFloat(uint16_t b) { return BitsFloat(static_cast<uint32_t>(b) << 16); }

uint16_t FloatToBFloat16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet nan
  }
  const uint32_t lsb = (u >> 16) & 1u;
  u += 0x7fffu + lsb;
  return static_cast<uint16_t>(u >> 16);
}

// ---------------------------------------------------------------------------
// TensorView

absl::StatusOr<HostTensor> TensorView::ToHost() const {
  HostTensor out;
  out.shape = shape;
  const int64_t n = numel();
  if (static_cast<size_t>(n) * DTypeSize(dtype) != nbytes) {
    return absl::InternalError(absl::StrCat("tensor '", name, "': ", nbytes,
                                            " bytes do not match shape ", ShapeString(shape)));
  }
  out.data.resize(static_cast<size_t>(n));
  switch (dtype) {
    case DType::kF32:
      if (n > 0) std::memcpy(out.data.data(), data, nbytes);
      break;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i)
        out.data[i] = HalfToFloat(LoadUnaligned<uint16_t>(data + 2 * i));
      break;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        out.data[i] = BFloat16ToFloat(LoadUnaligned<uint16_t>(data + 2 * i));
      }
      break;
    case DType::kF64:
      for (int64_t i = 0; i < n; ++i) {
        out.data[i] = static_cast<float>(LoadUnaligned<double>(data + 8 * i));
      }
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "': expected a floating dtype (F32/F16/BF16/F64), found ",
                       std::string(DTypeName(dtype))));
  }
  return out;
}

// ---------------------------------------------------------------------------
// SafetensorsFile

SafetensorsFile::~SafetensorsFile() = default;

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  ASSIGN_OR_RETURN(MappedFile map, MappedFile::Open(path, "safetensors file"));
  if (map.size() < 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": expected at least 8 bytes (header length), found ", map.size(), " bytes"));
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->source_ = path;
  file->map_ = std::move(map);
  RETURN_IF_ERROR(file->Parse(file->map_.data(), file->map_.size()));
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBytes(std::string bytes,
                                                                            std::string source) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->source_ = std::move(source);
  file->owned_ = std::move(bytes);
  RETURN_IF_ERROR(
      file->Parse(reinterpret_cast<const uint8_t*>(file->owned_.data()), file->owned_.size()));
  return file;
}

absl::Status SafetensorsFile::Parse(const uint8_t* base, size_t size) {
  auto bad = [&](const std::string& msg) {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": ", msg));
  };
  if (size < 8) {
    return bad(absl::StrCat("expected at least 8 bytes (header length), found ", size));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];
  if (header_len > kMaxHeaderSize) {
    return bad(absl::StrCat("header length ", header_len, " exceeds the limit of ", kMaxHeaderSize,
                            " bytes"));
  }
  if (header_len > size - 8) {
    return bad(absl::StrCat("header length ", header_len, " exceeds the file size (", size - 8,
                            " bytes after the length prefix)"));
  }
  const char* hp = reinterpret_cast<const char*>(base + 8);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(hp, hp + header_len);
  } catch (const nlohmann::json::exception& e) {
    return bad(absl::StrCat("header is not valid JSON: ", e.what()));
  }
  if (!header.is_object()) {
    return bad(absl::StrCat("header: expected a JSON object, found ", header.type_name()));
  }
  const uint8_t* data_base = base + 8 + header_len;
  const size_t data_size = size - 8 - static_cast<size_t>(header_len);

  struct Span {
    size_t begin, end;
    size_t index;
  };
  std::vector<Span> spans;
  tensors_.clear();
  metadata_.clear();
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        return bad(absl::StrCat("__metadata__: expected an object, found ", entry.type_name()));
      }
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string()) {
          return bad(absl::StrCat("__metadata__.", m.key(), ": expected a string, found ",
                                  m.value().type_name()));
        }
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = absl::StrCat("tensor '", name, "'");
    if (!entry.is_object()) {
      return bad(absl::StrCat(where, ": expected an object, found ", entry.type_name()));
    }
    for (auto f = entry.begin(); f != entry.end(); ++f) {
      if (f.key() != "dtype" && f.key() != "shape" && f.key() != "data_offsets") {
        return bad(absl::StrCat(where, ": unknown field '", f.key(), "'"));
      }
    }
    TensorView view;
    view.name = name;
    // dtype
    auto dt = entry.find("dtype");
    if (dt == entry.end()) return bad(absl::StrCat(where, ": missing field 'dtype'"));
    if (!dt->is_string()) {
      return bad(
          absl::StrCat(where, ": field 'dtype': expected a string, found ", dt->type_name()));
    }
    if (!ParseDType(dt->get<std::string>(), &view.dtype)) {
      return bad(absl::StrCat(where, ": field 'dtype': unknown dtype '", dt->get<std::string>(),
                              "' (expected one of F32, F16, BF16, F64, I64, I32, I16, I8, U8, "
                              "BOOL)"));
    }
    // shape
    auto sh = entry.find("shape");
    if (sh == entry.end()) return bad(absl::StrCat(where, ": missing field 'shape'"));
    if (!sh->is_array()) {
      return bad(
          absl::StrCat(where, ": field 'shape': expected an array, found ", sh->type_name()));
    }
    // Overflow-safe element count: bounded by data_size anyway.
    uint64_t numel = 1;
    bool overflow = false;
    for (const auto& d : *sh) {
      if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0)) {
        return bad(absl::StrCat(where, ": field 'shape': expected non-negative integers, found ",
                                d.dump()));
      }
      const uint64_t v = d.get<uint64_t>();
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return bad(absl::StrCat(where, ": field 'shape': dimension ", v, " is too large"));
      }
      view.shape.push_back(static_cast<int64_t>(v));
      if (v != 0 && numel > std::numeric_limits<uint64_t>::max() / v) overflow = true;
      numel *= v;
    }
    // data_offsets
    auto off = entry.find("data_offsets");
    if (off == entry.end()) return bad(absl::StrCat(where, ": missing field 'data_offsets'"));
    if (!off->is_array() || off->size() != 2 || !(*off)[0].is_number_integer() ||
        !(*off)[1].is_number_integer() ||
        (!(*off)[0].is_number_unsigned() && (*off)[0].get<int64_t>() < 0) ||
        (!(*off)[1].is_number_unsigned() && (*off)[1].get<int64_t>() < 0)) {
      return bad(absl::StrCat(where,
                              ": field 'data_offsets': expected [begin, end] non-negative "
                              "integers, found ",
                              off->dump()));
    }
    const uint64_t begin = (*off)[0].get<uint64_t>();
    const uint64_t end = (*off)[1].get<uint64_t>();
    if (begin > end) {
      return bad(
          absl::StrCat(where, ": field 'data_offsets': begin ", begin, " is after end ", end));
    }
    if (end > data_size) {
      return bad(absl::StrCat(where, ": field 'data_offsets': end ", end,
                              " is past the data section (", data_size, " bytes)"));
    }
    const size_t elem = DTypeSize(view.dtype);
    if (overflow || numel > std::numeric_limits<uint64_t>::max() / elem ||
        numel * elem != end - begin) {
      return bad(absl::StrCat(
          where, ": dtype ", std::string(DTypeName(view.dtype)), " x shape ",
          ShapeString(view.shape), " needs ",
          overflow ? std::string("an overflowing number of") : absl::StrCat(numel * elem),
          " bytes, but data_offsets [", begin, ", ", end, "] span ", end - begin, " bytes"));
    }
    view.data = data_base + begin;
    view.nbytes = static_cast<size_t>(end - begin);
    spans.push_back({static_cast<size_t>(begin), static_cast<size_t>(end), tensors_.size()});
    tensors_.push_back(std::move(view));
  }
  // Spans must tile the data section exactly: sorted by offset, no overlap, no gap.
  std::vector<Span> sorted = spans;
  std::sort(sorted.begin(), sorted.end(), [](const Span& a, const Span& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  size_t cursor = 0;
  for (const Span& s : sorted) {
    const std::string& name = tensors_[s.index].name;
    if (s.begin < cursor) {
      return bad(absl::StrCat("tensor '", name, "': data_offsets [", s.begin, ", ", s.end,
                              "] overlap the previous tensor (which ends at ", cursor, ")"));
    }
    if (s.begin > cursor) {
      return bad(absl::StrCat("tensor '", name, "': data_offsets begin at ", s.begin,
                              ", leaving a gap of ", s.begin - cursor, " bytes after offset ",
                              cursor));
    }
    cursor = s.end;
  }
  if (cursor != data_size) {
    return bad(absl::StrCat("data section is ", data_size, " bytes but tensors cover only ", cursor,
                            " (", data_size - cursor, " trailing bytes)"));
  }
  std::sort(tensors_.begin(), tensors_.end(),
            [](const TensorView& a, const TensorView& b) { return a.name < b.name; });
  return absl::OkStatus();
}

const TensorView* SafetensorsFile::Find(std::string_view name) const {
  auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                             [](const TensorView& v, std::string_view n) { return v.name < n; });
  if (it == tensors_.end() || it->name != name) return nullptr;
  return &*it;
}

absl::StatusOr<TensorMap> SafetensorsFile::ToTensorMap() const {
  TensorMap out;
  for (const TensorView& view : tensors_) {
    auto host = view.ToHost();
    if (!host.ok()) {
      return absl::Status(host.status().code(),
                          absl::StrCat(source_, ": ", host.status().message()));
    }
    out.emplace(view.name, std::move(host).value());
  }
  return out;
}

// ---------------------------------------------------------------------------
// Writer

std::string SerializeSafetensors(const TensorMap& tensors, const Metadata& metadata, DType dtype) {
  if (dtype != DType::kF32 && dtype != DType::kF16 && dtype != DType::kBF16) dtype = DType::kF32;
  const size_t elem = DTypeSize(dtype);
  // nlohmann::json objects are std::map-backed: keys come out sorted, so the
  // header (and the whole file) is deterministic. Data is laid out in name order.
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) {
    nlohmann::json meta = nlohmann::json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = std::move(meta);
  }
  size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    const size_t n = t.data.size();
    nlohmann::json entry = nlohmann::json::object();
    entry["dtype"] = std::string(DTypeName(dtype));
    entry["shape"] = t.shape;
    entry["data_offsets"] = {offset, offset + n * elem};
    header[name] = std::move(entry);
    offset += n * elem;
  }
  std::string header_str = header.dump();
  // Pad with spaces so the data section starts 8-byte aligned (as the reference writer does).
  while ((8 + header_str.size()) % 8 != 0) header_str.push_back(' ');
  std::string out;
  out.resize(8 + header_str.size() + offset);
  uint64_t len = header_str.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  std::memcpy(&out[8], header_str.data(), header_str.size());
  char* p = &out[8 + header_str.size()];
  for (const auto& [name, t] : tensors) {
    (void)name;
    if (dtype == DType::kF32) {
      if (!t.data.empty()) std::memcpy(p, t.data.data(), t.data.size() * 4);
      p += t.data.size() * 4;
    } else {
      for (float v : t.data) {
        const uint16_t h = dtype == DType::kF16 ? FloatToHalf(v) : FloatToBFloat16(v);
        std::memcpy(p, &h, 2);
        p += 2;
      }
    }
  }
  return out;
}

absl::Status WriteSafetensors(const std::string& path, const TensorMap& tensors,
                              const Metadata& metadata, DType dtype) {
  for (const auto& [name, t] : tensors) {
    if (t.numel() != static_cast<int64_t>(t.data.size())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "WriteSafetensors ", path, ": tensor '", name, "' has shape ", ShapeString(t.shape), " (",
          t.numel(), " elements) but ", t.data.size(), " values"));
    }
  }
  const std::string bytes = SerializeSafetensors(tensors, metadata, dtype);
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoToStatus(errno, absl::StrCat("create ", tmp));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return ErrnoToStatus(err, absl::StrCat("write ", tmp));
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    return ErrnoToStatus(err, absl::StrCat("fsync ", tmp));
  }
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return ErrnoToStatus(err, absl::StrCat("close ", tmp));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return ErrnoToStatus(err, absl::StrCat("rename ", tmp, " -> ", path));
  }
  return absl::OkStatus();
}

}  // namespace fedlora::common
