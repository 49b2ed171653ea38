#include "common/export/gguf.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/quant/quant.h"
#include "common/tensor/tensor.h"
#include "tests/testing/test_util.h"

namespace fedlora::common {
namespace {

using ::fedlora::testutil::StatusIs;

using ::testing::HasSubstr;

HostTensor Random(std::vector<int64_t> shape, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  HostTensor t;
  t.shape = std::move(shape);
  t.data.resize(static_cast<size_t>(t.numel()));
  for (float& v : t.data) v = normal(rng);
  return t;
}

// Raw little-endian byte builder for hand-made (possibly invalid) files.
struct Raw {
  std::string s;
  Raw& U8(uint8_t v) {
    s.push_back(static_cast<char>(v));
    return *this;
  }
  Raw& U32(uint32_t v) {
    s.append(reinterpret_cast<const char*>(&v), 4);
    return *this;
  }
  Raw& U64(uint64_t v) {
    s.append(reinterpret_cast<const char*>(&v), 8);
    return *this;
  }
  Raw& Str(const std::string& v) {
    U64(v.size());
    s += v;
    return *this;
  }
  Raw& Header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    s += "GGUF";
    U32(version);
    U64(n_tensors);
    return U64(n_kv);
  }
  Raw& KvU32(const std::string& key, uint32_t v) {
    Str(key);
    U32(4);
    return U32(v);
  }
  Raw& TensorInfo(const std::string& name, std::vector<uint64_t> ne, uint32_t type,
                  uint64_t offset) {
    Str(name);
    U32(static_cast<uint32_t>(ne.size()));
    for (uint64_t d : ne) U64(d);
    U32(type);
    return U64(offset);
  }
  Raw& PadTo(size_t align) {
    s.resize((s.size() + align - 1) / align * align, '\0');
    return *this;
  }
  Raw& Zeros(size_t n) {
    s.append(n, '\0');
    return *this;
  }
};

absl::Status Parse(const std::string& bytes) {
  return GgufFile::FromBytes(bytes, "test.gguf").status();
}

TEST(GgufTest, MetadataOfEveryTypeRoundTrips) {
  GgufWriter w;
  w.Set("u8", GgufValue::U8(250));
  w.Set("i8", GgufValue::I8(-120));
  w.Set("u16", GgufValue::U16(65000));
  w.Set("i16", GgufValue::I16(-32000));
  w.Set("u32", GgufValue::U32(4000000000u));
  w.Set("i32", GgufValue::I32(-2000000000));
  w.Set("u64", GgufValue::U64(18000000000000000000ull));
  w.Set("i64", GgufValue::I64(-9000000000000000000ll));
  w.Set("f32", GgufValue::F32(1.5e-5f));
  w.Set("f64", GgufValue::F64(-2.25e300));
  w.Set("bool", GgufValue::Bool(true));
  w.Set("str", GgufValue::Str("h\xc3\xa9llo \0x"));
  w.Set("empty_str", GgufValue::Str(""));
  w.Set("strs", GgufValue::StrArray({"a", "", "Ġthe"}));
  w.Set("i32s", GgufValue::I32Array({1, -2, 3}));
  w.Set("f32s", GgufValue::F32Array({0.5f, -1e10f}));
  w.Set("bools",
        GgufValue::Array(GgufType::kBool, {GgufValue::Bool(false), GgufValue::Bool(true)}));
  w.Set("u64s", GgufValue::Array(GgufType::kUint64, {GgufValue::U64(1ull << 60)}));
  w.Set("empty_arr", GgufValue::Array(GgufType::kInt32, {}));
  w.Set("u32", GgufValue::U32(7));  // replaces in place
  ASSERT_EQ(w.metadata().size(), 19u);

  auto f = GgufFile::FromBytes(w.Serialize(), "mem");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->version(), 3u);
  ASSERT_EQ((*f)->metadata().size(), w.metadata().size());
  for (size_t i = 0; i < w.metadata().size(); ++i) {
    EXPECT_EQ((*f)->metadata()[i].first, w.metadata()[i].first);
    EXPECT_TRUE((*f)->metadata()[i].second == w.metadata()[i].second)
        << "value of " << w.metadata()[i].first;
  }
  EXPECT_EQ((*f)->metadata()[4].first, "u32");
  EXPECT_EQ(*(*f)->GetUint("u32"), 7u);
  EXPECT_EQ(*(*f)->GetUint("u64"), 18000000000000000000ull);
  EXPECT_EQ((*f)->Find("i64")->as_i64(), -9000000000000000000ll);
  EXPECT_FLOAT_EQ(static_cast<float>(*(*f)->GetFloat("f32")), 1.5e-5f);
  EXPECT_EQ(*(*f)->GetString("str"), std::string("h\xc3\xa9llo \0x"));
  EXPECT_EQ((*f)->Find("strs")->items()[2].str(), "Ġthe");
  EXPECT_THAT((*f)->GetString("u32").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'u32'")));
  EXPECT_THAT((*f)->GetUint("i8").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'i8'")));
  EXPECT_THAT((*f)->GetFloat("missing").status(),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("'missing'")));
}

TEST(GgufTest, HeaderBytesFollowTheSpec) {
  GgufWriter w;
  w.Set("general.architecture", GgufValue::Str("llama"));
  HostTensor t = Random({2, 3}, 1);
  ASSERT_TRUE(w.AddTensor("x", t, GgmlType::kF32).ok());
  const std::string b = w.Serialize();
  ASSERT_GE(b.size(), 24u);
  EXPECT_EQ(b.substr(0, 4), "GGUF");
  uint32_t version;
  uint64_t n_tensors, n_kv;
  std::memcpy(&version, b.data() + 4, 4);
  std::memcpy(&n_tensors, b.data() + 8, 8);
  std::memcpy(&n_kv, b.data() + 16, 8);
  EXPECT_EQ(version, 3u);
  EXPECT_EQ(n_tensors, 1u);
  EXPECT_EQ(n_kv, 1u);
  // key: u64 len 20 + "general.architecture" + u32 type 8 + u64 len 5 + "llama"
  uint64_t key_len;
  std::memcpy(&key_len, b.data() + 24, 8);
  EXPECT_EQ(key_len, 20u);
  EXPECT_EQ(b.substr(32, 20), "general.architecture");
  uint32_t vt;
  std::memcpy(&vt, b.data() + 52, 4);
  EXPECT_EQ(vt, 8u);
  // tensor info starts at 24 + 8+20 + 4 + 8+5 = 69: name "x", n_dims 2, ne {3, 2}
  uint64_t ne0, ne1;
  uint32_t n_dims;
  std::memcpy(&n_dims, b.data() + 69 + 9, 4);
  std::memcpy(&ne0, b.data() + 69 + 13, 8);
  std::memcpy(&ne1, b.data() + 69 + 21, 8);
  EXPECT_EQ(n_dims, 2u);
  EXPECT_EQ(ne0, 3u);  // innermost first
  EXPECT_EQ(ne1, 2u);
  // Data starts at the next multiple of 32 after the infos and holds the floats.
  const size_t infos_end = 69 + 9 + 4 + 16 + 4 + 8;
  const size_t data_start = (infos_end + 31) / 32 * 32;
  float first;
  std::memcpy(&first, b.data() + data_start, 4);
  EXPECT_EQ(first, t.data[0]);
  EXPECT_EQ(b.size() % 32, 0u);
}

TEST(GgufTest, TensorsOfEveryTypeRoundTripWithAlignedOffsets) {
  GgufWriter w;
  HostTensor a = Random({3, 5}, 2);
  HostTensor b = Random({7}, 3);
  HostTensor c = Random({4, 64}, 4, 0.1f);
  HostTensor d = Random({2, 96}, 5, 3.0f);
  ASSERT_TRUE(w.AddTensor("a.f32", a, GgmlType::kF32).ok());
  ASSERT_TRUE(w.AddTensor("b.f16", b, GgmlType::kF16).ok());
  ASSERT_TRUE(w.AddTensor("c.q8", c, GgmlType::kQ8_0).ok());
  ASSERT_TRUE(w.AddTensor("d.q4", d, GgmlType::kQ4_0).ok());
  auto f = GgufFile::FromBytes(w.Serialize(), "mem");
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ((*f)->tensors().size(), 4u);
  for (const GgufTensorInfo& t : (*f)->tensors()) {
    EXPECT_EQ(t.offset % 32, 0u) << t.name;
  }
  const GgufTensorInfo* ta = (*f)->FindTensor("a.f32");
  ASSERT_NE(ta, nullptr);
  EXPECT_EQ(ta->ne, (std::vector<int64_t>{5, 3}));
  auto ha = (*f)->ToHost(*ta);
  ASSERT_TRUE(ha.ok());
  EXPECT_EQ(ha->shape, a.shape);
  EXPECT_EQ(ha->data, a.data);

  auto hb = (*f)->ToHost(*(*f)->FindTensor("b.f16"));
  ASSERT_TRUE(hb.ok());
  for (size_t i = 0; i < b.data.size(); ++i) {
    EXPECT_EQ(hb->data[i], HalfToFloat(FloatToHalf(b.data[i])));
  }

  const GgufTensorInfo* tc = (*f)->FindTensor("c.q8");
  EXPECT_EQ(tc->nbytes, 4u * 2 * 34);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(tc->data), tc->nbytes),
            QuantizeQ8_0(c.data.data(), c.data.size()));
  auto hc = (*f)->ToHost(*tc);
  ASSERT_TRUE(hc.ok());
  for (size_t i = 0; i < c.data.size(); ++i) EXPECT_NEAR(hc->data[i], c.data[i], 0.01f);

  const GgufTensorInfo* td = (*f)->FindTensor("d.q4");
  EXPECT_EQ(td->nbytes, 2u * 3 * 18);
  auto hd = (*f)->ToHost(*td);
  ASSERT_TRUE(hd.ok());
  for (size_t blk = 0; blk < d.data.size() / 32; ++blk) {
    float amax = 0;
    for (size_t j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(d.data[blk * 32 + j]));
    for (size_t j = 0; j < 32; ++j) {
      // One step of the 16-level grid is amax/8; rounding error is at most half a step
      // (plus fp16 scale rounding); the top level is clipped to 7 steps.
      EXPECT_NEAR(hd->data[blk * 32 + j], d.data[blk * 32 + j], amax / 8.0f + 1e-3f);
    }
  }
}

TEST(GgufTest, Q4_0MatchesGgmlBlockLayout) {
  // x_j = j - 16: the largest magnitude is -16, so d = -16/-8 = 2, and
  // q = trunc(x/2 + 8.5) capped at 15. Byte j holds q_j (low) and q_{j+16} (high).
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j - 16);
  const std::string q = QuantizeQ4_0(x.data(), x.size());
  ASSERT_EQ(q.size(), 18u);
  EXPECT_EQ(static_cast<uint8_t>(q[0]), 0x00);  // fp16 2.0 = 0x4000
  EXPECT_EQ(static_cast<uint8_t>(q[1]), 0x40);
  const uint8_t expect[16] = {0x80, 0x91, 0x91, 0xA2, 0xA2, 0xB3, 0xB3, 0xC4,
                              0xC4, 0xD5, 0xD5, 0xE6, 0xE6, 0xF7, 0xF7, 0xF8};
  for (int j = 0; j < 16; ++j) EXPECT_EQ(static_cast<uint8_t>(q[2 + j]), expect[j]) << j;
  std::vector<float> back(32);
  ASSERT_TRUE(DequantizeQ4_0(q, 32, back.data()).ok());
  EXPECT_EQ(back[0], -16.0f);
  EXPECT_EQ(back[1], -14.0f);  // q=1 -> (1-8)*2
  EXPECT_EQ(back[31], 14.0f);  // clipped at q=15
  // Positive extreme: the sign of d follows the extreme value.
  std::vector<float> y(32, 0.0f);
  y[3] = 4.0f;
  const std::string qy = QuantizeQ4_0(y.data(), y.size());
  EXPECT_EQ(HalfToFloat(static_cast<uint16_t>(static_cast<uint8_t>(qy[0]) |
                                              (static_cast<uint8_t>(qy[1]) << 8))),
            -0.5f);
  ASSERT_TRUE(DequantizeQ4_0(qy, 32, back.data()).ok());
  EXPECT_EQ(back[3], 4.0f);
  EXPECT_EQ(back[0], 0.0f);
  // Non-finite input does not poison the block.
  y[5] = std::nanf("");
  y[6] = INFINITY;
  ASSERT_TRUE(DequantizeQ4_0(QuantizeQ4_0(y.data(), 32), 32, back.data()).ok());
  EXPECT_EQ(back[3], 4.0f);
  EXPECT_THAT(DequantizeQ4_0(qy, 64, back.data()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("q4_0")));
}

TEST(GgufTest, CustomAlignmentIsHonoured) {
  GgufWriter w;
  w.Set("general.alignment", GgufValue::U32(64));
  ASSERT_TRUE(w.AddTensor("a", Random({3}, 1), GgmlType::kF32).ok());
  ASSERT_TRUE(w.AddTensor("b", Random({5}, 2), GgmlType::kF32).ok());
  auto f = GgufFile::FromBytes(w.Serialize(), "mem");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->alignment(), 64u);
  EXPECT_EQ((*f)->tensors()[1].offset, 64u);
  EXPECT_EQ(((*f)->tensors()[0].data - (*f)->tensors()[1].data), -64);
}

TEST(GgufTest, WriteFileAndOpen) {
  char tmpl[] = "/tmp/gguf_test_XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string path = std::string(tmpl) + "/m.gguf";
  GgufWriter w;
  w.Set("general.name", GgufValue::Str("t"));
  HostTensor t = Random({2, 32}, 9);
  ASSERT_TRUE(w.AddTensor("w", t, GgmlType::kF32).ok());
  ASSERT_TRUE(w.WriteFile(path).ok());
  auto f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(*(*f)->GetString("general.name"), "t");
  EXPECT_EQ((*f)->ToHost(*(*f)->FindTensor("w"))->data, t.data);
  EXPECT_FALSE(GgufFile::Open(std::string(tmpl) + "/missing.gguf").ok());
  unlink(path.c_str());
  rmdir(tmpl);
}

TEST(GgufTest, WriterRejectsBadTensors) {
  GgufWriter w;
  HostTensor t = Random({2, 40}, 1);
  EXPECT_THAT(w.AddTensor("q", t, GgmlType::kQ8_0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("multiple of 32")));
  EXPECT_THAT(w.AddTensor("q", t, GgmlType::kQ4_0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("multiple of 32")));
  ASSERT_TRUE(w.AddTensor("q", t, GgmlType::kF16).ok());
  EXPECT_THAT(w.AddTensor("q", t, GgmlType::kF32),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("added twice")));
  EXPECT_THAT(w.AddTensor(std::string(64, 'n'), t, GgmlType::kF32),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("name")));
  HostTensor bad;
  bad.shape = {3, 3};
  bad.data.resize(8);
  EXPECT_THAT(w.AddTensor("bad", bad, GgmlType::kF32),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'bad'")));
  HostTensor rank5 = Random({1, 1, 1, 1, 2}, 1);
  EXPECT_THAT(w.AddTensor("r5", rank5, GgmlType::kF32),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dims")));
  EXPECT_THAT(w.AddRawTensor("raw", {4}, GgmlType::kF32, std::string(15, '\0')),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("expected 16 bytes")));
  EXPECT_EQ(w.tensor_count(), 1u);
}

// ------------------------------------------------------------- corruption classes

TEST(GgufTest, RejectsBadMagicAndVersion) {
  EXPECT_THAT(Parse(""), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("magic")));
  EXPECT_THAT(Parse("GGML" + std::string(20, '\0')),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("magic")));
  EXPECT_THAT(Parse(Raw().Header(0, 0, 1).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("version")));
  EXPECT_THAT(Parse(Raw().Header(0, 0, 4).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("found 4")));
  EXPECT_TRUE(Parse(Raw().Header(0, 0, 3).s).ok());
  EXPECT_TRUE(Parse(Raw().Header(0, 0, 2).s).ok());
}

TEST(GgufTest, RejectsCountsLargerThanTheFile) {
  EXPECT_THAT(Parse(Raw().Header(0, 1ull << 60).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("kv_count")));
  EXPECT_THAT(Parse(Raw().Header(~0ull, 0).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tensor_count")));
  EXPECT_THAT(Parse(Raw().Header(0, 1).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("kv_count")));
}

TEST(GgufTest, RejectsBadStringsAndValues) {
  // String length beyond the file.
  EXPECT_THAT(Parse(Raw().Header(0, 1).U64(1000).Zeros(20).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("length 1000")));
  // Unknown value type.
  EXPECT_THAT(
      Parse(Raw().Header(0, 1).Str("k").U32(13).U32(0).s),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("key 'k': unknown value type 13")));
  // Unknown array element type.
  EXPECT_THAT(Parse(Raw().Header(0, 1).Str("k").U32(9).U32(77).U64(0).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("element type 77")));
  // Nested arrays.
  EXPECT_THAT(Parse(Raw().Header(0, 1).Str("k").U32(9).U32(9).U64(1).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("nested")));
  // Array count beyond the file.
  EXPECT_THAT(Parse(Raw().Header(0, 1).Str("arr").U32(9).U32(4).U64(1ull << 40).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("key 'arr': array of")));
  // Bool byte other than 0/1.
  EXPECT_THAT(Parse(Raw().Header(0, 1).Str("b").U32(7).U8(2).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("bool")));
  // Duplicate and empty keys.
  EXPECT_THAT(Parse(Raw().Header(0, 2).KvU32("k", 1).KvU32("k", 2).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("duplicate key 'k'")));
  EXPECT_THAT(Parse(Raw().Header(0, 1).KvU32("", 1).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("empty key")));
  // Truncated scalar value.
  EXPECT_THAT(Parse(Raw().Header(0, 1).Str("k").U32(10).U32(0).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("truncated")));
}

TEST(GgufTest, RejectsBadAlignment) {
  EXPECT_THAT(Parse(Raw().Header(0, 1).KvU32("general.alignment", 24).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("power of two")));
  EXPECT_THAT(Parse(Raw().Header(0, 1).KvU32("general.alignment", 0).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("power of two")));
  EXPECT_THAT(Parse(Raw().Header(0, 1).Str("general.alignment").U32(8).Str("32").s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("expected UINT32")));
}

// A valid one-tensor file: f32 [4] at offset 0.
Raw OneTensor(const std::string& name, std::vector<uint64_t> ne, uint32_t type, uint64_t offset,
              size_t data_bytes) {
  Raw r;
  r.Header(1, 0).TensorInfo(name, std::move(ne), type, offset).PadTo(32).Zeros(data_bytes);
  return r;
}

TEST(GgufTest, RejectsBadTensorInfos) {
  EXPECT_TRUE(Parse(OneTensor("t", {4}, 0, 0, 16).s).ok());
  EXPECT_THAT(Parse(OneTensor("", {4}, 0, 0, 16).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tensor #0")));
  EXPECT_THAT(Parse(OneTensor(std::string(64, 'x'), {4}, 0, 0, 16).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("name of 1..63")));
  EXPECT_THAT(
      Parse(OneTensor("t", {}, 0, 0, 16).s),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tensor 't': expected 1..4 dims")));
  EXPECT_THAT(Parse(OneTensor("t", {1, 1, 1, 1, 4}, 0, 0, 16).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("found 5")));
  EXPECT_THAT(Parse(OneTensor("t", {4, 0}, 0, 0, 16).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dim 1 = 0")));
  EXPECT_THAT(Parse(OneTensor("t", {1ull << 40, 1ull << 40}, 0, 0, 16).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("overflow")));
  EXPECT_THAT(Parse(OneTensor("t", {1ull << 40}, 0, 0, 16).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("cannot fit")));
  EXPECT_THAT(Parse(OneTensor("t", {4}, 12, 0, 16).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unsupported ggml type 12")));
  EXPECT_THAT(Parse(OneTensor("t", {48}, 8, 0, 64).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("multiple of 32")));
  EXPECT_THAT(
      Parse(OneTensor("t", {4}, 0, 8, 64).s),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not a multiple of the alignment")));
  EXPECT_THAT(Parse(OneTensor("t", {4}, 0, 32, 16).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("outside the data section")));
  EXPECT_THAT(Parse(OneTensor("t", {4}, 0, 0, 15).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tensor 't': data [0, 16)")));
  EXPECT_THAT(Parse(OneTensor("t", {32}, 8, 0, 33).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("outside")));
  // No data section at all.
  EXPECT_THAT(Parse(Raw().Header(1, 0).TensorInfo("t", {4}, 0, 0).s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("past the end")));
}

TEST(GgufTest, RejectsDuplicateAndOverlappingTensors) {
  Raw dup;
  dup.Header(2, 0).TensorInfo("t", {4}, 0, 0).TensorInfo("t", {4}, 0, 32).PadTo(32).Zeros(64);
  EXPECT_THAT(Parse(dup.s),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("duplicate tensor name 't'")));
  Raw overlap;
  overlap.Header(2, 0).TensorInfo("a", {16}, 0, 0).TensorInfo("b", {4}, 0, 32).PadTo(32).Zeros(96);
  EXPECT_THAT(Parse(overlap.s), StatusIs(absl::StatusCode::kInvalidArgument,
                                         HasSubstr("'b' (offset 32) overlaps tensor 'a'")));
  Raw fine;
  fine.Header(2, 0).TensorInfo("a", {8}, 0, 0).TensorInfo("b", {4}, 0, 32).PadTo(32).Zeros(48);
  EXPECT_TRUE(Parse(fine.s).ok());
}

TEST(GgufTest, EveryTruncationFailsCleanly) {
  GgufWriter w;
  w.Set("general.architecture", GgufValue::Str("llama"));
  w.Set("tokens", GgufValue::StrArray({"a", "b", "c"}));
  ASSERT_TRUE(w.AddTensor("x", Random({2, 32}, 1), GgmlType::kQ8_0).ok());
  ASSERT_TRUE(w.AddTensor("y", Random({3}, 2), GgmlType::kF32).ok());
  const std::string full = w.Serialize();
  ASSERT_TRUE(Parse(full).ok());
  for (size_t n = 0; n + 1 < full.size(); ++n) {
    // The last tensor ends 20 bytes before the end (12 data bytes + padding);
    // cutting padding only is still a valid file.
    absl::Status s = Parse(full.substr(0, n));
    if (n >= full.size() - 20) continue;
    EXPECT_FALSE(s.ok()) << "prefix of " << n << " bytes was accepted";
  }
}

}  // namespace
}  // namespace fedlora::common
