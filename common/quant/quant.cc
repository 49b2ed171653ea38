#include "common/quant/quant.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/export/gguf.h"
#include "common/status/status.h"

namespace fedlora::common {
namespace {

constexpr char kFormatKey[] = "fedlora.format";
constexpr char kFormatValue[] = "adapter-v1";
constexpr char kQuantKey[] = "fedlora.quant";
constexpr char kShapePrefix[] = "fedlora.shape.";
constexpr char kBlobSource[] = "adapter blob";
// Refuse shapes whose element count could not be backed by real data.
constexpr uint64_t kMaxElements = uint64_t{1} << 40;

// absl::string_view is not std::string_view in this abseil build.
inline absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

size_t NumBlocks(size_t n) { return (n + kQ8BlockValues - 1) / kQ8BlockValues; }

// q4_0 of n values with the last block zero-padded (gguf's codec wants whole blocks).
std::string QuantizeQ4_0Padded(const float* x, size_t n) {
  std::vector<float> padded(NumBlocks(n) * kQ8BlockValues, 0.0f);
  if (n > 0) std::memcpy(padded.data(), x, n * sizeof(float));
  return QuantizeQ4_0(padded.data(), padded.size());
}

absl::Status DequantizeQ4_0Padded(std::string_view bytes, size_t n, float* out) {
  std::vector<float> padded(NumBlocks(n) * kQ8BlockValues);
  RETURN_IF_ERROR(DequantizeQ4_0(bytes, padded.size(), padded.data()));
  if (n > 0) std::memcpy(out, padded.data(), n * sizeof(float));
  return absl::OkStatus();
}

size_t BlockBytes(Quant quant) { return quant == Quant::kQ4_0 ? kQ4_0BlockBytes : kQ8BlockBytes; }

// Programmer errors in the input of Encode (it cannot return a Status).
[[noreturn]] void Fatal(const std::string& msg) {
  std::fprintf(stderr, "fatal: EncodeAdapterBlob: %s\n", msg.c_str());
  std::abort();
}

std::string ShapeString(const std::vector<int64_t>& shape) { return absl::StrJoin(shape, ","); }

// Parses "d0,d1,..." ("" is a scalar). Returns the element count.
absl::StatusOr<uint64_t> ParseShape(const std::string& text, const std::string& tensor,
                                    std::vector<int64_t>* shape) {
  shape->clear();
  uint64_t numel = 1;
  if (text.empty()) return numel;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    uint64_t dim = 0;
    bool digits = !part.empty() && std::all_of(part.begin(), part.end(),
                                               [](char c) { return c >= '0' && c <= '9'; });
    if (!digits || !absl::SimpleAtoi(part, &dim) || dim > kMaxElements) {
      return absl::InvalidArgumentError(absl::StrCat(
          kBlobSource, ": tensor '", tensor, "': expected metadata ", kShapePrefix, tensor,
          " as comma-separated non-negative dimensions, found \"", text, "\""));
    }
    shape->push_back(static_cast<int64_t>(dim));
    if (dim != 0 && numel > kMaxElements / dim) {
      return absl::InvalidArgumentError(
          absl::StrCat(kBlobSource, ": tensor '", tensor, "': shape \"", text, "\" is too large"));
    }
    numel *= dim;
  }
  return shape->empty() ? 1 : numel;
}

// One tensor in a safetensors file being written.
struct RawTensor {
  std::string name;
  const char* dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

// Minimal safetensors writer for mixed dtypes (SerializeSafetensors only
// writes float tensors). Tensors are laid out in the given (name) order.
std::string WriteSafetensors(const std::vector<RawTensor>& tensors, const Metadata& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = std::move(meta);
  }
  size_t offset = 0;
  for (const RawTensor& t : tensors) {
    nlohmann::ordered_json entry = nlohmann::ordered_json::object();
    entry["dtype"] = t.dtype;
    entry["shape"] = t.shape;
    entry["data_offsets"] = {offset, offset + t.bytes.size()};
    header[t.name] = std::move(entry);
    offset += t.bytes.size();
  }
  std::string json = header.dump();
  // Pad with spaces so the data starts 8-byte aligned (as the reference writer does).
  json.append((8 - (json.size() % 8)) % 8, ' ');
  std::string out(8, '\0');
  uint64_t len = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  out.reserve(8 + json.size() + offset);
  out += json;
  for (const RawTensor& t : tensors) out += t.bytes;
  return out;
}

void Accumulate(const float* x, const float* y, size_t n, double* max_abs, double* sum_sq,
                double* ref_sq) {
  for (size_t i = 0; i < n; ++i) {
    double e = std::fabs(static_cast<double>(x[i]) - static_cast<double>(y[i]));
    if (!(e <= *max_abs)) *max_abs = e;  // also propagates NaN
    *sum_sq += e * e;
    *ref_sq += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  }
}

}  // namespace

const char* QuantName(Quant quant) {
  switch (quant) {
    case Quant::kQ8_0:
      return "q8_0";
    case Quant::kQ4_0:
      return "q4_0";
    case Quant::kNone:
      break;
  }
  return "f32";
}

absl::StatusOr<Quant> ParseQuant(std::string_view name) {
  if (name == "q8_0") return Quant::kQ8_0;
  if (name == "q4_0") return Quant::kQ4_0;
  if (name == "f32") return Quant::kNone;
  return absl::InvalidArgumentError(
      absl::StrCat("quant: expected q8_0, q4_0 or f32, found '", Sv(name), "'"));
}

std::string QuantizeQ8_0(const float* x, size_t n) {
  const size_t nb = NumBlocks(n);
  std::string out(nb * kQ8BlockBytes, '\0');
  for (size_t b = 0; b < nb; ++b) {
    const size_t begin = b * kQ8BlockValues;
    const size_t count = std::min(kQ8BlockValues, n - begin);
    float amax = 0.0f;
    for (size_t j = 0; j < count; ++j) {
      float a = std::fabs(x[begin + j]);
      if (std::isfinite(a) && a > amax) amax = a;
    }
    // As ggml's quantize_row_q8_0_ref: d = amax/127, q = roundf(x/d) (half away from zero).
    float d = amax / 127.0f;
    // Keep the stored fp16 scale finite: clamp to the largest half (65504).
    if (d > 65504.0f) d = 65504.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t h = FloatToHalf(d);
    char* block = out.data() + b * kQ8BlockBytes;
    block[0] = static_cast<char>(h & 0xff);
    block[1] = static_cast<char>(h >> 8);
    for (size_t j = 0; j < count; ++j) {
      float v = x[begin + j] * id;
      // NaN -> 0 and +-inf (or values beyond a clamped scale) saturate at +-127,
      // so the int8 conversion is always defined.
      float q = std::isnan(v) ? 0.0f : std::clamp(std::round(v), -127.0f, 127.0f);
      block[2 + j] = static_cast<char>(static_cast<int8_t>(q));
    }
  }
  return out;
}

absl::Status DequantizeQ8_0(std::string_view bytes, size_t n, float* out) {
  const size_t nb = NumBlocks(n);
  if (n > std::numeric_limits<size_t>::max() - kQ8BlockValues ||
      bytes.size() != nb * kQ8BlockBytes) {
    return absl::InvalidArgumentError(absl::StrCat("q8_0: expected ", nb * kQ8BlockBytes,
                                                   " bytes (", nb, " blocks of ", kQ8BlockBytes,
                                                   " for ", n, " values), found ", bytes.size()));
  }
  for (size_t b = 0; b < nb; ++b) {
    const unsigned char* block =
        reinterpret_cast<const unsigned char*>(bytes.data()) + b * kQ8BlockBytes;
    const float d = HalfToFloat(static_cast<uint16_t>(block[0] | (block[1] << 8)));
    if (!std::isfinite(d)) {
      return absl::InvalidArgumentError(
          absl::StrCat("q8_0: block ", b, ": expected a finite scale, found ", d));
    }
    const size_t begin = b * kQ8BlockValues;
    const size_t count = std::min(kQ8BlockValues, n - begin);
    for (size_t j = 0; j < count; ++j) {
      out[begin + j] = d * static_cast<float>(static_cast<int8_t>(block[2 + j]));
    }
  }
  return absl::OkStatus();
}

std::string EncodeAdapterBlob(const TensorMap& tensors, Quant quant, const Metadata& metadata,
                              QuantReport* report) {
  Metadata meta = metadata;
  meta[kFormatKey] = kFormatValue;
  meta[kQuantKey] = QuantName(quant);
  std::vector<RawTensor> raw;
  raw.reserve(tensors.size());
  double max_abs = 0, sum_sq = 0, ref_sq = 0;
  uint64_t total = 0;
  std::vector<float> back;
  for (const auto& [name, t] : tensors) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) Fatal(absl::StrCat("tensor '", name, "' has a negative dimension"));
      numel *= static_cast<uint64_t>(d);
    }
    if (numel != t.data.size()) {
      Fatal(absl::StrCat("tensor '", name, "': shape [", ShapeString(t.shape), "] holds ", numel,
                         " values but data has ", t.data.size()));
    }
    meta[kShapePrefix + name] = ShapeString(t.shape);
    RawTensor r;
    r.name = name;
    if (quant == Quant::kQ8_0 || quant == Quant::kQ4_0) {
      const bool q4 = quant == Quant::kQ4_0;
      r.dtype = "U8";
      r.bytes = q4 ? QuantizeQ4_0Padded(t.data.data(), t.data.size())
                   : QuantizeQ8_0(t.data.data(), t.data.size());
      r.shape = {static_cast<int64_t>(r.bytes.size())};
      if (report != nullptr) {
        back.resize(t.data.size());
        absl::Status s = q4 ? DequantizeQ4_0Padded(r.bytes, t.data.size(), back.data())
                            : DequantizeQ8_0(r.bytes, t.data.size(), back.data());
        if (!s.ok()) Fatal(absl::StrCat(QuantName(quant), " output does not round-trip: ", s.message()));
        Accumulate(t.data.data(), back.data(), t.data.size(), &max_abs, &sum_sq, &ref_sq);
      }
    } else {
      r.dtype = "F32";
      r.shape = t.shape;
      r.bytes.resize(t.data.size() * sizeof(float));
      // Little-endian hosts only (as the rest of the safetensors code).
      if (!t.data.empty()) std::memcpy(r.bytes.data(), t.data.data(), r.bytes.size());
    }
    total += t.data.size();
    raw.push_back(std::move(r));
  }
  if (report != nullptr) {
    report->max_abs_error = max_abs;
    report->rms_error = total > 0 ? std::sqrt(sum_sq / static_cast<double>(total)) : 0.0;
    report->relative_l2_error = ref_sq > 0 ? std::sqrt(sum_sq / ref_sq) : 0.0;
  }
  return WriteSafetensors(raw, meta);
}

absl::StatusOr<TensorMap> DecodeAdapterBlob(std::string_view blob, Metadata* metadata) {
  ASSIGN_OR_RETURN(auto file, SafetensorsFile::FromBytes(std::string(blob), kBlobSource));
  const Metadata& meta = file->metadata();
  auto get = [&](const std::string& key) -> const std::string* {
    auto it = meta.find(key);
    return it == meta.end() ? nullptr : &it->second;
  };
  const std::string* format = get(kFormatKey);
  if (format == nullptr || *format != kFormatValue) {
    return absl::InvalidArgumentError(
        absl::StrCat(kBlobSource, ": expected metadata ", kFormatKey, " = \"", kFormatValue,
                     "\", found ", format == nullptr ? "none" : absl::StrCat("\"", *format, "\"")));
  }
  const std::string* quant_name = get(kQuantKey);
  auto parsed_quant = quant_name == nullptr ? absl::InvalidArgumentError("none")
                                            : ParseQuant(*quant_name);
  if (!parsed_quant.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        kBlobSource, ": expected metadata ", kQuantKey, " = \"q8_0\", \"q4_0\" or \"f32\", found ",
        quant_name == nullptr ? "none" : absl::StrCat("\"", *quant_name, "\"")));
  }
  const Quant quant = *parsed_quant;
  // Every shape key must name a tensor that exists.
  for (const auto& [key, value] : meta) {
    if (key.rfind(kShapePrefix, 0) != 0) continue;
    std::string name = key.substr(sizeof(kShapePrefix) - 1);
    if (file->Find(name) == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(kBlobSource, ": metadata ", key,
                                                     " names tensor '", name,
                                                     "', but the blob has no such tensor"));
    }
  }

  TensorMap out;
  for (const TensorView& view : file->tensors()) {
    const std::string where = absl::StrCat(kBlobSource, ": tensor '", view.name, "'");
    const std::string* shape_text = get(kShapePrefix + view.name);
    if (shape_text == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": expected metadata ", kShapePrefix, view.name, ", found none"));
    }
    HostTensor t;
    ASSIGN_OR_RETURN(uint64_t numel, ParseShape(*shape_text, view.name, &t.shape));
    if (quant == Quant::kQ8_0 || quant == Quant::kQ4_0) {
      const char* qname = QuantName(quant);
      if (view.dtype != DType::kU8 || view.shape.size() != 1) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": expected dtype U8 with shape [nbytes] for ", qname, ", found ",
            Sv(DTypeName(view.dtype)), " with ", view.shape.size(), " dimensions"));
      }
      const uint64_t want = NumBlocks(numel) * BlockBytes(quant);
      if (view.nbytes != want) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": expected ", want, " bytes of ",
                                                       qname, " blocks for shape [", *shape_text,
                                                       "], found ", view.nbytes));
      }
      t.data.resize(numel);
      const std::string_view bytes(reinterpret_cast<const char*>(view.data), view.nbytes);
      absl::Status s = quant == Quant::kQ4_0 ? DequantizeQ4_0Padded(bytes, numel, t.data.data())
                                             : DequantizeQ8_0(bytes, numel, t.data.data());
      if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat(where, ": ", s.message()));
    } else {
      if (view.dtype != DType::kF32 || view.shape != t.shape) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": expected dtype F32 with shape [", *shape_text, "], found ",
                         Sv(DTypeName(view.dtype)), " with shape [", ShapeString(view.shape), "]"));
      }
      auto host = view.ToHost();
      if (!host.ok())
        return absl::InvalidArgumentError(absl::StrCat(where, ": ", host.status().message()));
      t.data = std::move(host->data);
      if (t.data.size() != numel) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": expected ", numel, " values, found ", t.data.size()));
      }
      for (size_t i = 0; i < t.data.size(); ++i) {
        if (!std::isfinite(t.data[i])) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, ": expected finite values, found ", t.data[i], " at index ", i));
        }
      }
    }
    out.emplace(view.name, std::move(t));
  }
  if (metadata != nullptr) *metadata = meta;
  return out;
}

}  // namespace fedlora::common
