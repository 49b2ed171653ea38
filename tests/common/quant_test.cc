#include "common/quant/quant.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "common/tensor/tensor.h"
#include "tests/testing/test_util.h"

namespace fedlora::common {
namespace {

using ::fedlora::testutil::StatusIs;

using ::testing::HasSubstr;

float Scale(const std::string& q, size_t block) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(q.data()) + block * kQ8BlockBytes;
  return HalfToFloat(static_cast<uint16_t>(p[0] | (p[1] << 8)));
}

TEST(Q8_0, ExactKnownBlockRoundsHalfAwayFromZero) {
  // amax = 127 gives d = 1.0 exactly (fp16 0x3C00), so q = round(x).
  std::vector<float> x(32, 0.0f);
  const float in[] = {127.0f, -127.0f, 0.5f,  -0.5f,  1.5f, -1.5f,
                      2.5f,   -2.5f,   0.49f, -0.49f, 3.0f, 100.4f};
  std::memcpy(x.data(), in, sizeof(in));
  std::string q = QuantizeQ8_0(x.data(), x.size());
  ASSERT_EQ(q.size(), 34u);
  EXPECT_EQ(static_cast<unsigned char>(q[0]), 0x00);
  EXPECT_EQ(static_cast<unsigned char>(q[1]), 0x3C);
  const int8_t expected[] = {127, -127, 1, -1, 2, -2, 3, -3, 0, 0, 3, 100};
  for (size_t j = 0; j < 32; ++j) {
    int8_t want = j < sizeof(expected) ? expected[j] : 0;
    EXPECT_EQ(static_cast<int8_t>(q[2 + j]), want) << "value " << j;
  }
  std::vector<float> back(32);
  ASSERT_TRUE(DequantizeQ8_0(q, 32, back.data()).ok());
  EXPECT_EQ(back[0], 127.0f);
  EXPECT_EQ(back[2], 1.0f);
  EXPECT_EQ(back[7], -3.0f);
}

TEST(Q8_0, ScaleIsMaxAbsOver127) {
  std::vector<float> x = {0.1f, -2.54f, 0.3f};
  std::string q = QuantizeQ8_0(x.data(), x.size());
  ASSERT_EQ(q.size(), 34u);
  EXPECT_EQ(Scale(q, 0), HalfToFloat(FloatToHalf(2.54f / 127.0f)));
  EXPECT_EQ(static_cast<int8_t>(q[3]), -127);
  // Zero-padded tail.
  for (size_t j = 3; j < 32; ++j) EXPECT_EQ(q[2 + j], 0) << j;
}

TEST(Q8_0, ZerosAndEmpty) {
  std::vector<float> zeros(40, 0.0f);
  std::string q = QuantizeQ8_0(zeros.data(), zeros.size());
  ASSERT_EQ(q.size(), 2 * kQ8BlockBytes);
  EXPECT_EQ(q, std::string(68, '\0'));
  std::vector<float> back(40, 1.0f);
  ASSERT_TRUE(DequantizeQ8_0(q, 40, back.data()).ok());
  for (float v : back) EXPECT_EQ(v, 0.0f);
  EXPECT_EQ(QuantizeQ8_0(nullptr, 0), "");
  EXPECT_TRUE(DequantizeQ8_0("", 0, nullptr).ok());
}

TEST(Q8_0, ErrorBoundPerBlock) {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> log_mag(-7.0f, 3.0f);
  const size_t n = 32 * 500 + 17;  // ragged last block
  std::vector<float> x(n);
  for (size_t b = 0; b * 32 < n; ++b) {
    float mag =
        std::pow(10.0f, log_mag(rng));  // blocks from 1e-7 to 1e3: fp16 subnormal scales too
    for (size_t j = b * 32; j < std::min(n, b * 32 + 32); ++j) x[j] = normal(rng) * mag;
  }
  std::string q = QuantizeQ8_0(x.data(), n);
  ASSERT_EQ(q.size(), ((n + 31) / 32) * 34);
  std::vector<float> back(n);
  ASSERT_TRUE(DequantizeQ8_0(q, n, back.data()).ok());
  for (size_t b = 0; b * 32 < n; ++b) {
    size_t end = std::min(n, b * 32 + 32);
    float amax = 0;
    for (size_t j = b * 32; j < end; ++j) amax = std::max(amax, std::fabs(x[j]));
    double d = amax / 127.0;
    double d16 = Scale(q, b);
    // Rounding to the integer grid costs d/2; the fp16 scale costs up to 127 |d - d16|.
    double bound = d / 2 + 127 * std::fabs(d - d16) + 1e-6 * amax;
    for (size_t j = b * 32; j < end; ++j) {
      ASSERT_LE(std::fabs(static_cast<double>(x[j]) - back[j]), bound)
          << "block " << b << " value " << j << " x=" << x[j] << " got " << back[j];
    }
  }
}

TEST(Q8_0, NonFiniteInputNeverProducesNonFiniteScale) {
  std::vector<float> x = {std::numeric_limits<float>::quiet_NaN(),
                          std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity(),
                          1.0f,
                          1e30f,
                          -1e30f};
  std::string q = QuantizeQ8_0(x.data(), x.size());
  ASSERT_EQ(q.size(), 34u);
  EXPECT_TRUE(std::isfinite(Scale(q, 0)));
  EXPECT_EQ(Scale(q, 0), 65504.0f);            // clamped to the largest half
  EXPECT_EQ(static_cast<int8_t>(q[2]), 0);     // NaN
  EXPECT_EQ(static_cast<int8_t>(q[3]), 127);   // +inf saturates
  EXPECT_EQ(static_cast<int8_t>(q[4]), -127);  // -inf saturates
  EXPECT_EQ(static_cast<int8_t>(q[6]), 127);   // 1e30 beyond the clamped scale
  std::vector<float> back(x.size());
  ASSERT_TRUE(DequantizeQ8_0(q, x.size(), back.data()).ok());
  for (float v : back) EXPECT_TRUE(std::isfinite(v));
}

TEST(Q8_0, DequantizeValidates) {
  std::vector<float> x(33, 1.0f);
  std::string q = QuantizeQ8_0(x.data(), x.size());
  std::vector<float> out(64);
  EXPECT_THAT(DequantizeQ8_0(q, 65, out.data()),
              StatusIs(absl::StatusCode::kInvalidArgument, "expected 102 bytes"));
  EXPECT_THAT(DequantizeQ8_0(q.substr(0, 67), 33, out.data()),
              StatusIs(absl::StatusCode::kInvalidArgument, "found 67"));
  std::string bad = q;
  bad[34] = 0x00;
  bad[35] = 0x7C;  // +inf in block 1
  EXPECT_THAT(DequantizeQ8_0(bad, 33, out.data()),
              StatusIs(absl::StatusCode::kInvalidArgument, "block 1"));
  bad[35] = 0x7E;  // NaN
  EXPECT_THAT(DequantizeQ8_0(bad, 33, out.data()),
              StatusIs(absl::StatusCode::kInvalidArgument, "finite scale"));
}

// ---- adapter blobs -------------------------------------------------------------

HostTensor RandomTensor(std::vector<int64_t> shape, float scale, std::mt19937* rng) {
  HostTensor t;
  t.shape = std::move(shape);
  int64_t n = 1;
  for (int64_t d : t.shape) n *= d;
  std::normal_distribution<float> normal(0.0f, scale);
  t.data.resize(static_cast<size_t>(n));
  for (float& v : t.data) v = normal(*rng);
  return t;
}

TensorMap SampleAdapter() {
  std::mt19937 rng(7);
  TensorMap m;
  m["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] =
      RandomTensor({8, 64}, 0.02f, &rng);
  m["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] =
      RandomTensor({64, 8}, 0.001f, &rng);
  m["odd"] = RandomTensor({3, 11}, 5.0f, &rng);
  m["scalar"] = RandomTensor({}, 1.0f, &rng);
  m["empty"] = RandomTensor({0, 4}, 1.0f, &rng);
  return m;
}

TEST(AdapterBlob, Q8RoundTripWithReport) {
  TensorMap in = SampleAdapter();
  QuantReport report;
  Metadata meta = {{"fedlora.round", "12"}, {"parent", "v000011"}};
  std::string blob = EncodeAdapterBlob(in, Quant::kQ8_0, meta, &report);
  EXPECT_EQ(blob, EncodeAdapterBlob(in, Quant::kQ8_0, meta));  // deterministic

  Metadata out_meta;
  auto out = DecodeAdapterBlob(blob, &out_meta);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), in.size());
  double max_err = 0, sum_sq = 0;
  size_t count = 0;
  for (const auto& [name, t] : in) {
    auto it = out->find(name);
    ASSERT_NE(it, out->end()) << name;
    EXPECT_EQ(it->second.shape, t.shape) << name;
    ASSERT_EQ(it->second.data.size(), t.data.size()) << name;
    float amax = 0;
    for (float v : t.data) amax = std::max(amax, std::fabs(v));
    for (size_t i = 0; i < t.data.size(); ++i) {
      double e = std::fabs(static_cast<double>(t.data[i]) - it->second.data[i]);
      // d/2 plus the fp16 scale error (larger for subnormal scales).
      EXPECT_LE(e, amax / 127.0 * 0.7 + 1e-7) << name << "[" << i << "]";
      max_err = std::max(max_err, e);
      sum_sq += e * e;
      ++count;
    }
  }
  EXPECT_GT(max_err, 0.0);
  EXPECT_NEAR(report.max_abs_error, max_err, 1e-12);
  EXPECT_NEAR(report.rms_error, std::sqrt(sum_sq / count), 1e-9);
  EXPECT_EQ(out_meta.at("fedlora.format"), "adapter-v1");
  EXPECT_EQ(out_meta.at("fedlora.quant"), "q8_0");
  EXPECT_EQ(out_meta.at("fedlora.shape.odd"), "3,11");
  EXPECT_EQ(out_meta.at("fedlora.shape.scalar"), "");
  EXPECT_EQ(out_meta.at("parent"), "v000011");
  EXPECT_EQ(out_meta.at("fedlora.round"), "12");

  // On disk: U8 tensors of shape [nbytes] holding ceil(n/32) blocks.
  auto file = SafetensorsFile::FromBytes(blob, "blob");
  ASSERT_TRUE(file.ok()) << file.status();
  const TensorView* odd = (*file)->Find("odd");
  ASSERT_NE(odd, nullptr);
  EXPECT_EQ(odd->dtype, DType::kU8);
  EXPECT_EQ(odd->shape, std::vector<int64_t>{2 * 34});
  EXPECT_EQ(odd->nbytes, 68u);
  // The payload is 34/128 of fp32 (plus padding of ragged last blocks).
  size_t q8_bytes = 0, f32_bytes = 0;
  for (const TensorView& v : (*file)->tensors()) q8_bytes += v.nbytes;
  for (const auto& [name, t] : in) f32_bytes += 4 * t.data.size();
  EXPECT_EQ(q8_bytes, size_t{16 * 34 + 16 * 34 + 2 * 34 + 34});
  EXPECT_LT(q8_bytes, f32_bytes / 3);
}

TEST(AdapterBlob, RealPeftAdapterRoundTrip) {
  auto file = SafetensorsFile::Open(std::string(FEDLORA_FIXTURES) +
                                    "/hf/llama/adapter/adapter_model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  auto in = (*file)->ToTensorMap();
  ASSERT_TRUE(in.ok()) << in.status();
  ASSERT_FALSE(in->empty());
  QuantReport report;
  std::string blob = EncodeAdapterBlob(*in, Quant::kQ8_0, {}, &report);
  auto out = DecodeAdapterBlob(blob);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), in->size());
  double max_err = 0;
  for (const auto& [name, t] : *in) {
    const HostTensor& got = out->at(name);
    ASSERT_EQ(got.shape, t.shape) << name;
    float amax = 0;
    for (float v : t.data) amax = std::max(amax, std::fabs(v));
    for (size_t i = 0; i < t.data.size(); ++i) {
      double e = std::fabs(static_cast<double>(t.data[i]) - got.data[i]);
      ASSERT_LE(e, amax / 127.0 * 0.7 + 1e-7) << name << "[" << i << "]";
      max_err = std::max(max_err, e);
    }
  }
  EXPECT_GT(report.max_abs_error, 0.0);
  EXPECT_NEAR(report.max_abs_error, max_err, 1e-12);
  EXPECT_LE(report.rms_error, report.max_abs_error);
}

TEST(AdapterBlob, F32RoundTripIsExact) {
  TensorMap in = SampleAdapter();
  QuantReport report;
  report.max_abs_error = 99;
  std::string blob =
      EncodeAdapterBlob(in, Quant::kNone, {{"fedlora.format", "overridden"}}, &report);
  EXPECT_EQ(report.max_abs_error, 0.0);
  EXPECT_EQ(report.rms_error, 0.0);
  Metadata meta;
  auto out = DecodeAdapterBlob(blob, &meta);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(meta.at("fedlora.quant"), "f32");
  EXPECT_EQ(meta.at("fedlora.format"), "adapter-v1");
  ASSERT_EQ(out->size(), in.size());
  for (const auto& [name, t] : in) {
    EXPECT_EQ(out->at(name).shape, t.shape) << name;
    EXPECT_EQ(out->at(name).data, t.data) << name;
  }
}

TEST(AdapterBlob, EmptyMap) {
  auto out = DecodeAdapterBlob(EncodeAdapterBlob({}, Quant::kQ8_0));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(out->empty());
}

// Hand-written safetensors, to build blobs the encoder would never produce.
struct RawEntry {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};
std::string MakeSafetensors(const std::vector<RawEntry>& entries, const Metadata& meta) {
  nlohmann::json header = nlohmann::json::object();
  if (!meta.empty()) header["__metadata__"] = meta;
  size_t off = 0;
  std::string data;
  for (const RawEntry& e : entries) {
    header[e.name] = {
        {"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {off, off + e.bytes.size()}}};
    off += e.bytes.size();
    data += e.bytes;
  }
  std::string json = header.dump();
  std::string out(8, '\0');
  uint64_t len = json.size();
  std::memcpy(out.data(), &len, 8);
  return out + json + data;
}

std::string Q8Bytes(size_t n) {
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = 0.01f * static_cast<float>(i);
  return QuantizeQ8_0(x.data(), n);
}

Metadata GoodMeta() {
  return {{"fedlora.format", "adapter-v1"},
          {"fedlora.quant", "q8_0"},
          {"fedlora.shape.lora_A", "4,16"},
          {"fedlora.shape.lora_B", "16,4"}};
}
std::vector<RawEntry> GoodEntries() {
  return {{"lora_A", "U8", {68}, Q8Bytes(64)}, {"lora_B", "U8", {68}, Q8Bytes(64)}};
}

TEST(AdapterBlob, HandWrittenGoodBlobDecodes) {
  auto out = DecodeAdapterBlob(MakeSafetensors(GoodEntries(), GoodMeta()));
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->at("lora_B").shape, (std::vector<int64_t>{16, 4}));
  EXPECT_NEAR(out->at("lora_A").data[10], 0.1f, 0.01f);
}

TEST(AdapterBlob, CorruptedBlobsAreRejectedNamingTheTensor) {
  auto expect_bad = [](const std::vector<RawEntry>& entries, const Metadata& meta,
                       const std::string& substr) {
    auto r = DecodeAdapterBlob(MakeSafetensors(entries, meta));
    EXPECT_THAT(r.status(), StatusIs(absl::StatusCode::kInvalidArgument, substr));
  };
  Metadata m = GoodMeta();
  m.erase("fedlora.format");
  expect_bad(GoodEntries(), m, "fedlora.format");
  m = GoodMeta();
  m["fedlora.format"] = "adapter-v2";
  expect_bad(GoodEntries(), m, "adapter-v2");
  m = GoodMeta();
  m["fedlora.quant"] = "q4_0";
  expect_bad(GoodEntries(), m, "q4_0");
  m = GoodMeta();
  m.erase("fedlora.quant");
  expect_bad(GoodEntries(), m, "fedlora.quant");
  m = GoodMeta();
  m.erase("fedlora.shape.lora_B");
  expect_bad(GoodEntries(), m, "'lora_B'");
  m = GoodMeta();
  m["fedlora.shape.lora_B"] = "16,x";
  expect_bad(GoodEntries(), m, "'lora_B'");
  m["fedlora.shape.lora_B"] = "16,,4";
  expect_bad(GoodEntries(), m, "'lora_B'");
  m["fedlora.shape.lora_B"] = "-16,4";
  expect_bad(GoodEntries(), m, "'lora_B'");
  m["fedlora.shape.lora_B"] = "99999999999999999999,4";
  expect_bad(GoodEntries(), m, "'lora_B'");
  m["fedlora.shape.lora_B"] = "1048576,1048576,1048576";
  expect_bad(GoodEntries(), m, "'lora_B'");
  m["fedlora.shape.lora_B"] = "16,5";  // byte count no longer matches
  expect_bad(GoodEntries(), m, "'lora_B'");
  m = GoodMeta();
  m["fedlora.shape.lora_C"] = "1";  // shape for a tensor that is not there
  expect_bad(GoodEntries(), m, "lora_C");

  // Non-finite scale in lora_B's second block.
  std::vector<RawEntry> e = GoodEntries();
  e[1].bytes[34] = 0x00;
  e[1].bytes[35] = 0x7C;
  expect_bad(e, GoodMeta(), "'lora_B'");
  // Wrong dtype / rank / size.
  e = GoodEntries();
  e[0].dtype = "I8";
  expect_bad(e, GoodMeta(), "'lora_A'");
  e = GoodEntries();
  e[0].shape = {2, 34};
  expect_bad(e, GoodMeta(), "'lora_A'");
  e = GoodEntries();
  e[1].bytes.resize(34);
  e[1].shape = {34};
  expect_bad(e, GoodMeta(), "'lora_B'");

  // f32 blobs: dtype, shape and finite values are checked too.
  Metadata fm = GoodMeta();
  fm["fedlora.quant"] = "f32";
  fm["fedlora.shape.lora_A"] = "2";
  fm.erase("fedlora.shape.lora_B");
  float vals[2] = {1.0f, std::numeric_limits<float>::quiet_NaN()};
  std::string fbytes(reinterpret_cast<const char*>(vals), sizeof(vals));
  expect_bad({{"lora_A", "F32", {2}, fbytes}}, fm, "'lora_A'");
  vals[1] = 2.0f;
  fbytes.assign(reinterpret_cast<const char*>(vals), sizeof(vals));
  EXPECT_TRUE(DecodeAdapterBlob(MakeSafetensors({{"lora_A", "F32", {2}, fbytes}}, fm)).ok());
  expect_bad({{"lora_A", "F32", {1, 2}, fbytes}}, fm, "'lora_A'");
  expect_bad({{"lora_A", "U8", {8}, fbytes}}, fm, "'lora_A'");
}

TEST(AdapterBlob, GarbageIsRejected) {
  EXPECT_EQ(DecodeAdapterBlob("").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodeAdapterBlob("not a safetensors file at all").status().code(),
            absl::StatusCode::kInvalidArgument);
  std::string blob = EncodeAdapterBlob(SampleAdapter(), Quant::kQ8_0);
  EXPECT_EQ(DecodeAdapterBlob(blob.substr(0, blob.size() - 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(AdapterBlob, Q4RoundTripWithReportMatchesRecomputation) {
  TensorMap in = SampleAdapter();
  QuantReport report;
  std::string blob = EncodeAdapterBlob(in, Quant::kQ4_0, {{"fedlora.round", "3"}}, &report);
  Metadata out_meta;
  auto out = DecodeAdapterBlob(blob, &out_meta);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out_meta.at("fedlora.quant"), "q4_0");
  ASSERT_EQ(out->size(), in.size());
  double max_err = 0, sum_sq = 0, ref_sq = 0;
  for (const auto& [name, t] : in) {
    const HostTensor& back = out->at(name);
    EXPECT_EQ(back.shape, t.shape) << name;
    ASSERT_EQ(back.data.size(), t.data.size()) << name;
    // Per 32-value block: |e| <= |d| (q4_0 truncates x/d + 8.5; plus fp16 scale error).
    for (size_t b = 0; b * 32 < t.data.size(); ++b) {
      float amax = 0;
      for (size_t i = b * 32; i < std::min(t.data.size(), b * 32 + 32); ++i) {
        amax = std::max(amax, std::fabs(t.data[i]));
      }
      for (size_t i = b * 32; i < std::min(t.data.size(), b * 32 + 32); ++i) {
        double e = std::fabs(static_cast<double>(t.data[i]) - back.data[i]);
        EXPECT_LE(e, amax / 8.0 * 1.01 + 1e-7) << name << "[" << i << "]";
        max_err = std::max(max_err, e);
        sum_sq += e * e;
        ref_sq += static_cast<double>(t.data[i]) * t.data[i];
      }
    }
  }
  EXPECT_GT(max_err, 0.0);
  EXPECT_NEAR(report.max_abs_error, max_err, 1e-12);
  EXPECT_NEAR(report.relative_l2_error, std::sqrt(sum_sq / ref_sq), 1e-9);
  // q4_0 loses more than q8_0 and takes about half the bytes.
  QuantReport q8;
  std::string blob8 = EncodeAdapterBlob(in, Quant::kQ8_0, {{"fedlora.round", "3"}}, &q8);
  EXPECT_GT(report.relative_l2_error, q8.relative_l2_error);
  EXPECT_LT(blob.size(), blob8.size());
  auto file = SafetensorsFile::FromBytes(blob, "blob");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->Find("odd")->nbytes, 2u * 18);  // 33 values: 2 blocks, last padded
}

TEST(AdapterBlob, Q4WrongByteCountIsRejected) {
  TensorMap in;
  in["w"] = HostTensor{{40}, std::vector<float>(40, 0.25f)};
  std::string blob = EncodeAdapterBlob(in, Quant::kQ4_0);
  // Claim a shape that needs 3 blocks: the 2 stored blocks no longer fit.
  const std::string from = "\"fedlora.shape.w\":\"40\"";
  const size_t at = blob.find(from);
  ASSERT_NE(at, std::string::npos);
  blob.replace(at, from.size(), "\"fedlora.shape.w\":\"80\"");
  EXPECT_THAT(DecodeAdapterBlob(blob).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "bytes of q4_0 blocks"));
}

TEST(Quant, NamesRoundTrip) {
  for (Quant q : {Quant::kNone, Quant::kQ8_0, Quant::kQ4_0}) {
    auto parsed = ParseQuant(QuantName(q));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, q);
  }
  EXPECT_THAT(ParseQuant("q5_1").status(), StatusIs(absl::StatusCode::kInvalidArgument, "q5_1"));
}

}  // namespace
}  // namespace fedlora::common
