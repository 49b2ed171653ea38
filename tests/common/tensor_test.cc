#include "common/tensor/tensor.h"

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <set>
#include <sstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace fedlora::common {
namespace {

using ::testing::HasSubstr;

std::string Header(const nlohmann::json& header, size_t data_bytes, char fill = '\0') {
  const std::string h = header.dump();
  std::string out(8, '\0');
  uint64_t len = h.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  out += h;
  out.append(data_bytes, fill);
  return out;
}

absl::Status ParseStatus(std::string bytes) {
  return SafetensorsFile::FromBytes(std::move(bytes), "test.safetensors").status();
}

#define EXPECT_INVALID(bytes, substr1, substr2)                                  \
  do {                                                                           \
    absl::Status _s = ParseStatus(bytes);                                        \
    EXPECT_EQ(_s.code(), absl::StatusCode::kInvalidArgument) << _s;              \
    EXPECT_THAT(std::string(_s.message()), HasSubstr("test.safetensors")) << _s; \
    EXPECT_THAT(std::string(_s.message()), HasSubstr(substr1)) << _s;            \
    EXPECT_THAT(std::string(_s.message()), HasSubstr(substr2)) << _s;            \
  } while (0)

TensorMap SampleTensors() {
  TensorMap m;
  m["b.weight"] = HostTensor{{2, 3}, {1.f, -2.f, 3.5f, 0.f, 1e-3f, -7.25f}};
  m["a.bias"] = HostTensor{{3}, {0.5f, 0.25f, -0.125f}};
  m["scalar"] = HostTensor{{}, {42.f}};
  m["empty"] = HostTensor{{0, 4}, {}};
  return m;
}

TEST(TensorTest, NumelAndDTypes) {
  HostTensor t{{2, 3, 4}, std::vector<float>(24)};
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(HostTensor{}.numel(), 1);  // scalar
  EXPECT_EQ(DTypeName(DType::kBF16), "BF16");
  EXPECT_EQ(DTypeName(DType::kBool), "BOOL");
  EXPECT_EQ(DTypeSize(DType::kF64), 8u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kU8), 1u);
}

TEST(TensorTest, RoundTripF32WithMetadata) {
  const TensorMap in = SampleTensors();
  const Metadata meta{{"format", "pt"}, {"round", "7"}};
  const std::string bytes = SerializeSafetensors(in, meta);
  auto file = SafetensorsFile::FromBytes(bytes, "mem");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata(), meta);
  ASSERT_EQ((*file)->tensors().size(), 4u);
  const TensorView* v = (*file)->Find("b.weight");
  ASSERT_NE(v, nullptr);
  EXPECT_EQ(v->dtype, DType::kF32);
  EXPECT_EQ(v->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(v->nbytes, 24u);
  EXPECT_EQ((*file)->Find("missing"), nullptr);
  auto out = (*file)->ToTensorMap();
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), in.size());
  for (const auto& [name, t] : in) {
    ASSERT_TRUE(out->count(name)) << name;
    EXPECT_EQ(out->at(name).shape, t.shape) << name;
    EXPECT_EQ(out->at(name).data, t.data) << name;
  }
}

TEST(TensorTest, SerializationIsDeterministicAndAligned) {
  const std::string a = SerializeSafetensors(SampleTensors(), {{"k", "v"}});
  const std::string b = SerializeSafetensors(SampleTensors(), {{"k", "v"}});
  EXPECT_EQ(a, b);
  uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = (len << 8) | static_cast<uint8_t>(a[i]);
  EXPECT_EQ((8 + len) % 8, 0u);
  EXPECT_NE(a, SerializeSafetensors(SampleTensors(), {{"k", "w"}}));
}

TEST(TensorTest, RoundTripHalfAndBFloat16) {
  TensorMap in;
  in["x"] = HostTensor{{4}, {1.f, -0.5f, 3.140625f, 65504.f}};
  for (DType dt : {DType::kF16, DType::kBF16}) {
    auto file = SafetensorsFile::FromBytes(SerializeSafetensors(in, {}, dt), "mem");
    ASSERT_TRUE(file.ok()) << file.status();
    const TensorView* v = (*file)->Find("x");
    ASSERT_NE(v, nullptr);
    EXPECT_EQ(v->dtype, dt);
    EXPECT_EQ(v->nbytes, 8u);
    auto host = v->ToHost();
    ASSERT_TRUE(host.ok());
    for (size_t i = 0; i < 4; ++i) {
      const float expect = dt == DType::kF16 ? HalfToFloat(FloatToHalf(in["x"].data[i]))
                                             : BFloat16ToFloat(FloatToBFloat16(in["x"].data[i]));
      EXPECT_EQ(host->data[i], expect);
    }
    EXPECT_EQ(host->data[0], 1.f);
    EXPECT_EQ(host->data[1], -0.5f);
  }
}

TEST(TensorTest, F64AndIntegerDTypes) {
  nlohmann::json h;
  h["d"] = {{"dtype", "F64"}, {"shape", {2}}, {"data_offsets", {0, 16}}};
  h["i"] = {{"dtype", "I32"}, {"shape", {1}}, {"data_offsets", {16, 20}}};
  std::string bytes = Header(h, 0);
  const double d[2] = {1.5, -2.25};
  bytes.append(reinterpret_cast<const char*>(d), 16);
  const int32_t i = 9;
  bytes.append(reinterpret_cast<const char*>(&i), 4);
  auto file = SafetensorsFile::FromBytes(bytes, "test.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  auto host = (*file)->Find("d")->ToHost();
  ASSERT_TRUE(host.ok());
  EXPECT_EQ(host->data, (std::vector<float>{1.5f, -2.25f}));
  auto bad = (*file)->Find("i")->ToHost();
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("'i'"));
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("I32"));
  auto all = (*file)->ToTensorMap();
  EXPECT_FALSE(all.ok());
  EXPECT_THAT(std::string(all.status().message()), HasSubstr("test.safetensors"));
}

TEST(TensorTest, HalfConversionsExhaustive) {
  // Every finite half value round-trips exactly through float.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint16_t hh = static_cast<uint16_t>(h);
    const float f = HalfToFloat(hh);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f))));
      continue;
    }
    ASSERT_EQ(FloatToHalf(f), hh) << "half bits " << h;
  }
  EXPECT_EQ(HalfToFloat(0x3c00), 1.0f);
  EXPECT_EQ(HalfToFloat(0xc000), -2.0f);
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(HalfToFloat(0x7bff), 65504.0f);
  EXPECT_TRUE(std::isinf(HalfToFloat(0x7c00)));
}

TEST(TensorTest, HalfRoundsToNearestEven) {
  // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even (1.0).
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  // 1 + 3*2^-11 is halfway between 1+2^-10 (odd) and 1+2^-9 (even): rounds up.
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  // Slightly above halfway rounds up.
  EXPECT_EQ(FloatToHalf(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)), 0x3c01);
  EXPECT_EQ(FloatToHalf(65519.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);  // overflows to inf
  EXPECT_EQ(FloatToHalf(-1e10f), 0xfc00);
  // Subnormals: 2^-25 ties to 0, just above rounds to the smallest subnormal.
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25)), 0x0000);
  EXPECT_EQ(FloatToHalf(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  EXPECT_EQ(FloatToHalf(3 * std::ldexp(1.0f, -25)), 0x0002);  // 1.5 units ties to even 2
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  EXPECT_EQ(FloatToHalf(1e-30f), 0x0000);
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(std::numeric_limits<float>::quiet_NaN()))));
  // Against a double-precision reference on random inputs.
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-70000.f, 70000.f);
  for (int i = 0; i < 20000; ++i) {
    const float f = dist(rng) * (i % 2 ? 1.f : 1e-4f);
    const uint16_t h = FloatToHalf(f);
    const float back = HalfToFloat(h);
    if (std::isinf(back)) {
      EXPECT_GE(std::fabs(f), 65520.f);
      continue;
    }
    // Neighbours must not be strictly closer.
    const float up = HalfToFloat(static_cast<uint16_t>(h + 1));
    const float down = HalfToFloat(static_cast<uint16_t>(h - 1));
    const double err = std::fabs(static_cast<double>(back) - f);
    if (!std::isnan(up) && !std::isinf(up)) {
      EXPECT_LE(err, std::fabs(static_cast<double>(up) - f)) << f;
    }
    if ((h & 0x7fff) != 0 && !std::isnan(down)) {
      EXPECT_LE(err, std::fabs(static_cast<double>(down) - f)) << f;
    }
  }
}

TEST(TensorTest, BFloat16RoundsToNearestEven) {
  EXPECT_EQ(FloatToBFloat16(1.0f), 0x3f80);
  EXPECT_EQ(BFloat16ToFloat(0x3f80), 1.0f);
  // 1 + 2^-8 is halfway between 1 and 1+2^-7: ties to even (1.0).
  EXPECT_EQ(FloatToBFloat16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(FloatToBFloat16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_EQ(FloatToBFloat16(std::nextafter(1.0f + std::ldexp(1.0f, -8), 2.0f)), 0x3f81);
  EXPECT_EQ(FloatToBFloat16(-2.0f), 0xc000);
  EXPECT_TRUE(
      std::isnan(BFloat16ToFloat(FloatToBFloat16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isinf(BFloat16ToFloat(FloatToBFloat16(std::numeric_limits<float>::infinity()))));
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = BFloat16ToFloat(static_cast<uint16_t>(b));
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToBFloat16(f), b);
  }
}

TEST(TensorTest, WriteIsAtomicAndReadable) {
  const std::string dir = ::testing::TempDir();
  const std::string path = dir + "/tensor_test_write.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, SampleTensors(), {{"a", "b"}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->source(), path);
  EXPECT_EQ((*file)->metadata().at("a"), "b");
  auto map = (*file)->ToTensorMap();
  ASSERT_TRUE(map.ok());
  EXPECT_EQ(map->at("b.weight").data, SampleTensors().at("b.weight").data);
  // No temp file is left behind.
  EXPECT_NE(access((path + ".tmp." + std::to_string(getpid())).c_str(), F_OK), 0);
  // Overwrite with different content.
  TensorMap other;
  other["z"] = HostTensor{{1}, {3.f}};
  ASSERT_TRUE(WriteSafetensors(path, other, {}, DType::kBF16).ok());
  auto file2 = SafetensorsFile::Open(path);
  ASSERT_TRUE(file2.ok());
  ASSERT_EQ((*file2)->tensors().size(), 1u);
  EXPECT_EQ((*file2)->tensors()[0].dtype, DType::kBF16);
  unlink(path.c_str());
}

TEST(TensorTest, WriteRejectsInconsistentTensorAndBadDirectory) {
  TensorMap bad;
  bad["w"] = HostTensor{{2, 2}, {1.f, 2.f, 3.f}};
  absl::Status s = WriteSafetensors(::testing::TempDir() + "/bad.safetensors", bad);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("'w'"));
  EXPECT_FALSE(WriteSafetensors("/nonexistent-dir/x/y.safetensors", SampleTensors()).ok());
}

TEST(TensorTest, OpenMissingAndTinyFiles) {
  auto missing = SafetensorsFile::Open("/nonexistent/model.safetensors");
  EXPECT_FALSE(missing.ok());
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("/nonexistent/model.safetensors"));
  const std::string path = ::testing::TempDir() + "/tiny.safetensors";
  { std::ofstream(path) << "abc"; }
  auto tiny = SafetensorsFile::Open(path);
  EXPECT_EQ(tiny.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tiny.status().message()), HasSubstr(path));
  unlink(path.c_str());
}

// ---- every corruption class ------------------------------------------------

TEST(TensorCorruptionTest, TooShort) { EXPECT_INVALID(std::string(5, '\0'), "8 bytes", "5"); }

TEST(TensorCorruptionTest, HeaderLengthBeyondFile) {
  std::string b = Header(nlohmann::json::object(), 0);
  b[0] = static_cast<char>(0xff);
  EXPECT_INVALID(b, "header length", "exceeds");
}

TEST(TensorCorruptionTest, HeaderLengthAboveLimit) {
  std::string b(16, '\0');
  b[5] = 0x01;  // 2^40
  EXPECT_INVALID(b, "header length", "limit");
}

TEST(TensorCorruptionTest, HeaderNotJson) {
  std::string b(8, '\0');
  const std::string h = "{\"a\": [1, 2";
  b[0] = static_cast<char>(h.size());
  b += h;
  EXPECT_INVALID(b, "not valid JSON", "parse");
}

TEST(TensorCorruptionTest, HeaderNotObject) {
  EXPECT_INVALID(Header({1, 2}, 0), "header", "object");
}

TEST(TensorCorruptionTest, TensorEntryNotObject) {
  nlohmann::json h;
  h["w"] = 5;
  EXPECT_INVALID(Header(h, 0), "'w'", "object");
}

TEST(TensorCorruptionTest, MissingDType) {
  nlohmann::json h;
  h["w"] = {{"shape", {1}}, {"data_offsets", {0, 4}}};
  EXPECT_INVALID(Header(h, 4), "'w'", "dtype");
}

TEST(TensorCorruptionTest, UnknownDType) {
  nlohmann::json h;
  h["w"] = {{"dtype", "F8_E9"}, {"shape", {1}}, {"data_offsets", {0, 4}}};
  EXPECT_INVALID(Header(h, 4), "'w'", "F8_E9");
}

TEST(TensorCorruptionTest, DTypeNotString) {
  nlohmann::json h;
  h["w"] = {{"dtype", 3}, {"shape", {1}}, {"data_offsets", {0, 4}}};
  EXPECT_INVALID(Header(h, 4), "'w'", "dtype");
}

TEST(TensorCorruptionTest, MissingShape) {
  nlohmann::json h;
  h["w"] = {{"dtype", "F32"}, {"data_offsets", {0, 4}}};
  EXPECT_INVALID(Header(h, 4), "'w'", "shape");
}

TEST(TensorCorruptionTest, NegativeShape) {
  nlohmann::json h;
  h["w"] = {{"dtype", "F32"}, {"shape", {-1}}, {"data_offsets", {0, 4}}};
  EXPECT_INVALID(Header(h, 4), "'w'", "shape");
}

TEST(TensorCorruptionTest, ShapeNotArray) {
  nlohmann::json h;
  h["w"] = {{"dtype", "F32"}, {"shape", "big"}, {"data_offsets", {0, 4}}};
  EXPECT_INVALID(Header(h, 4), "'w'", "shape");
}

TEST(TensorCorruptionTest, MissingOffsets) {
  nlohmann::json h;
  h["w"] = {{"dtype", "F32"}, {"shape", {1}}};
  EXPECT_INVALID(Header(h, 4), "'w'", "data_offsets");
}

TEST(TensorCorruptionTest, MalformedOffsets) {
  nlohmann::json h;
  h["w"] = {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0}}};
  EXPECT_INVALID(Header(h, 4), "'w'", "data_offsets");
  h["w"]["data_offsets"] = {-4, 0};
  EXPECT_INVALID(Header(h, 4), "'w'", "data_offsets");
}

TEST(TensorCorruptionTest, OffsetsReversed) {
  nlohmann::json h;
  h["w"] = {{"dtype", "F32"}, {"shape", {0}}, {"data_offsets", {4, 0}}};
  EXPECT_INVALID(Header(h, 4), "'w'", "after end");
}

TEST(TensorCorruptionTest, OffsetsOutOfRange) {
  nlohmann::json h;
  h["w"] = {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}};
  EXPECT_INVALID(Header(h, 4), "'w'", "past the data section");
}

TEST(TensorCorruptionTest, SizeMismatch) {
  nlohmann::json h;
  h["w"] = {{"dtype", "BF16"}, {"shape", {2, 3}}, {"data_offsets", {0, 8}}};
  EXPECT_INVALID(Header(h, 8), "'w'", "[2,3] needs 12 bytes");
}

TEST(TensorCorruptionTest, ShapeOverflow) {
  nlohmann::json h;
  h["w"] = {{"dtype", "F32"},
            {"shape", {uint64_t{1} << 40, uint64_t{1} << 40}},
            {"data_offsets", {0, 4}}};
  EXPECT_INVALID(Header(h, 4), "'w'", "overflow");
}

TEST(TensorCorruptionTest, Overlap) {
  nlohmann::json h;
  h["a"] = {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}};
  h["b"] = {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {4, 12}}};
  EXPECT_INVALID(Header(h, 12), "'b'", "overlap");
}

TEST(TensorCorruptionTest, Gap) {
  nlohmann::json h;
  h["a"] = {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0, 4}}};
  h["b"] = {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {8, 12}}};
  EXPECT_INVALID(Header(h, 12), "'b'", "gap");
}

TEST(TensorCorruptionTest, TrailingBytesNotCovered) {
  nlohmann::json h;
  h["a"] = {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0, 4}}};
  EXPECT_INVALID(Header(h, 12), "8 trailing bytes", "cover");
}

TEST(TensorCorruptionTest, MetadataNotStrings) {
  nlohmann::json h;
  h["__metadata__"] = {{"epoch", 3}};
  EXPECT_INVALID(Header(h, 0), "__metadata__", "epoch");
  h["__metadata__"] = "x";
  EXPECT_INVALID(Header(h, 0), "__metadata__", "object");
}

TEST(TensorCorruptionTest, UnknownField) {
  nlohmann::json h;
  h["w"] = {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0, 4}}, {"extra", 1}};
  EXPECT_INVALID(Header(h, 4), "'w'", "extra");
}

TEST(TensorCorruptionTest, DeeplyNestedHeader) {
  std::string h = "{\"w\": " + std::string(100000, '[') + std::string(100000, ']') + "}";
  std::string b(8, '\0');
  uint64_t len = h.size();
  for (int i = 0; i < 8; ++i) b[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  EXPECT_INVALID(b + h, "'w'", "object");
}

TEST(TensorCorruptionTest, RandomBytesNeverCrash) {
  // Bit flips in a valid file either parse or fail cleanly.
  const std::string good = SerializeSafetensors(SampleTensors(), {{"k", "v"}});
  std::mt19937 rng(1);
  for (int i = 0; i < 2000; ++i) {
    std::string b = good;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) b[rng() % b.size()] ^= static_cast<char>(1u << (rng() % 8));
    if (rng() % 5 == 0) b.resize(rng() % b.size());
    auto file = SafetensorsFile::FromBytes(b, "fuzz");
    if (file.ok()) {
      for (const TensorView& v : (*file)->tensors()) (void)v.ToHost();
    }
  }
}

TEST(TensorFixtureTest, LoadsHuggingFaceLlamaCheckpoint) {
  const std::string path = std::string(FEDLORA_FIXTURES) + "/hf/llama/model.safetensors";
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  std::ifstream ref_in(std::string(FEDLORA_FIXTURES) + "/hf/llama/reference.json");
  ASSERT_TRUE(ref_in.good());
  const nlohmann::json ref = nlohmann::json::parse(ref_in);
  // Every parameter the reference model reports is present (lm_head may be tied).
  std::set<std::string> names;
  for (const TensorView& v : (*file)->tensors()) names.insert(v.name);
  for (const auto& n : ref.at("param_names")) {
    EXPECT_TRUE(names.count(n.get<std::string>())) << n;
  }
  const TensorView* embed = (*file)->Find("model.embed_tokens.weight");
  ASSERT_NE(embed, nullptr);
  EXPECT_EQ(embed->shape, (std::vector<int64_t>{600, 64}));
  const TensorView* q = (*file)->Find("model.layers.0.self_attn.q_proj.weight");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->shape, (std::vector<int64_t>{64, 64}));
  const TensorView* k = (*file)->Find("model.layers.1.self_attn.k_proj.weight");
  ASSERT_NE(k, nullptr);
  EXPECT_EQ(k->shape, (std::vector<int64_t>{32, 64}));
  auto map = (*file)->ToTensorMap();
  ASSERT_TRUE(map.ok()) << map.status();
  EXPECT_EQ(map->size(), (*file)->tensors().size());
  // Norm weights were perturbed away from 1: values are finite and not all equal.
  const HostTensor& norm = map->at("model.norm.weight");
  ASSERT_EQ(norm.numel(), 64);
  bool varied = false;
  for (float v : norm.data) {
    EXPECT_TRUE(std::isfinite(v));
    if (v != norm.data[0]) varied = true;
  }
  EXPECT_TRUE(varied);
  // Re-serializing and re-reading gives identical tensors.
  auto again = SafetensorsFile::FromBytes(SerializeSafetensors(*map), "reserialized");
  ASSERT_TRUE(again.ok());
  auto map2 = (*again)->ToTensorMap();
  ASSERT_TRUE(map2.ok());
  for (const auto& [name, t] : *map) EXPECT_EQ(map2->at(name).data, t.data) << name;
}

}  // namespace
}  // namespace fedlora::common
