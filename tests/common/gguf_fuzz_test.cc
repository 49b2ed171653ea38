// Fuzz-style robustness tests for the GGUF reader (no libFuzzer needed):
// seeded random mutations of valid GGUF files, with edits aimed at the
// length / count / offset fields. Parsing must never crash, a rejection must
// be InvalidArgument with a message, and whatever is accepted must be
// self-consistent: every tensor lies inside the buffer, dequantizes, and the
// file re-serializes to something that parses to the same content.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/export/gguf.h"
#include "common/tensor/tensor.h"

namespace fedlora::common {
namespace {

std::string ValidFile() {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.5f);
  auto random = [&](std::vector<int64_t> shape) {
    HostTensor t;
    t.shape = std::move(shape);
    t.data.resize(static_cast<size_t>(t.numel()));
    for (float& v : t.data) v = normal(rng);
    return t;
  };
  GgufWriter w;
  w.Set("general.architecture", GgufValue::Str("llama"));
  w.Set("general.type", GgufValue::Str("adapter"));
  w.Set("adapter.lora.alpha", GgufValue::F32(8.0f));
  w.Set("llama.block_count", GgufValue::U32(2));
  w.Set("tokenizer.ggml.tokens", GgufValue::StrArray({"<s>", "a", "Ġb", "cd"}));
  w.Set("tokenizer.ggml.token_type", GgufValue::I32Array({3, 1, 1, 1}));
  w.Set("flag", GgufValue::Bool(true));
  w.Set("big", GgufValue::I64(-5));
  EXPECT_TRUE(w.AddTensor("a.f32", random({3, 4}), GgmlType::kF32).ok());
  EXPECT_TRUE(w.AddTensor("b.f16", random({5}), GgmlType::kF16).ok());
  EXPECT_TRUE(w.AddTensor("c.q8_0", random({2, 32}), GgmlType::kQ8_0).ok());
  EXPECT_TRUE(w.AddTensor("d.q4_0", random({1, 64}), GgmlType::kQ4_0).ok());
  return w.Serialize();
}

// Offsets of the 8-byte length/count/offset fields in `file` (found by
// walking the valid file once), so mutations can target them.
std::vector<size_t> U64FieldOffsets(const std::string& file) {
  std::vector<size_t> out = {8, 16};
  size_t pos = 24;
  auto u32 = [&](size_t p) {
    uint32_t v;
    std::memcpy(&v, file.data() + p, 4);
    return v;
  };
  auto u64 = [&](size_t p) {
    uint64_t v;
    std::memcpy(&v, file.data() + p, 8);
    return v;
  };
  uint64_t n_tensors = u64(8), n_kv = u64(16);
  auto skip_value = [&](uint32_t type) {
    static const size_t kSizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    if (type == 8) {
      out.push_back(pos);
      pos += 8 + u64(pos);
    } else {
      pos += kSizes[type];
    }
  };
  for (uint64_t i = 0; i < n_kv; ++i) {
    out.push_back(pos);
    pos += 8 + u64(pos);
    const uint32_t type = u32(pos);
    pos += 4;
    if (type == 9) {
      const uint32_t et = u32(pos);
      pos += 4;
      out.push_back(pos);
      const uint64_t count = u64(pos);
      pos += 8;
      for (uint64_t j = 0; j < count; ++j) skip_value(et);
    } else {
      skip_value(type);
    }
  }
  for (uint64_t i = 0; i < n_tensors; ++i) {
    out.push_back(pos);
    pos += 8 + u64(pos);
    const uint32_t n_dims = u32(pos);
    pos += 4;
    for (uint32_t d = 0; d < n_dims; ++d) {
      out.push_back(pos);
      pos += 8;
    }
    pos += 4;
    out.push_back(pos);  // offset
    pos += 8;
  }
  return out;
}

std::string Mutate(const std::string& in, const std::vector<size_t>& fields, std::mt19937* rng) {
  std::string s = in;
  const int edits = 1 + static_cast<int>((*rng)() % 3);
  for (int e = 0; e < edits && !s.empty(); ++e) {
    const size_t pos = (*rng)() % s.size();
    switch ((*rng)() % 8) {
      case 0:
        s[pos] = static_cast<char>(s[pos] ^ (1 << ((*rng)() % 8)));
        break;
      case 1:
        s[pos] = static_cast<char>((*rng)() & 0xff);
        break;
      case 2:
        s.resize(pos);
        break;
      case 3:
        s.insert(pos, 1 + (*rng)() % 8, static_cast<char>((*rng)() & 0xff));
        break;
      case 4:
        s.erase(pos, 1 + (*rng)() % 8);
        break;
      case 5:
      case 6: {  // a length / count / dim / offset field gets a nearby or wild value
        const size_t f = fields[(*rng)() % fields.size()];
        if (f + 8 > s.size()) break;
        uint64_t v;
        std::memcpy(&v, s.data() + f, 8);
        switch ((*rng)() % 4) {
          case 0:
            v += 1 + (*rng)() % 64;
            break;
          case 1:
            v -= 1 + (*rng)() % 64;
            break;
          case 2:
            v = (static_cast<uint64_t>((*rng)()) << 32) | (*rng)();
            break;
          default:
            v ^= 1ull << ((*rng)() % 64);
            break;
        }
        std::memcpy(s.data() + f, &v, 8);
        break;
      }
      case 7: {  // a type field (u32 after a key or a tensor's dims) nearby a field
        const size_t f = fields[(*rng)() % fields.size()];
        if (f + 12 > s.size()) break;
        const uint32_t t = (*rng)() % 16;
        std::memcpy(s.data() + f + 8 + ((*rng)() % 4), &t, 4);
        break;
      }
    }
  }
  return s;
}

void CheckConsistent(const GgufFile& f, const std::string& bytes) {
  GgufWriter w;
  for (const auto& [k, v] : f.metadata()) w.Set(k, v);
  for (const GgufTensorInfo& t : f.tensors()) {
    ASSERT_GE(t.ne.size(), 1u);
    ASSERT_LE(t.ne.size(), 4u);
    auto host = f.ToHost(t);
    if (host.ok()) {
      ASSERT_EQ(static_cast<int64_t>(host->data.size()), t.numel());
    } else {
      // Only a non-finite block scale makes a structurally valid tensor undecodable.
      ASSERT_EQ(host.status().code(), absl::StatusCode::kInvalidArgument);
      ASSERT_NE(host.status().message().find("finite scale"), std::string::npos) << host.status();
      ASSERT_NE(host.status().message().find(t.name), std::string::npos) << host.status();
    }
    ASSERT_TRUE(w.AddRawTensor(t.name, t.ne, t.type,
                               std::string(reinterpret_cast<const char*>(t.data), t.nbytes))
                    .ok());
  }
  auto again = GgufFile::FromBytes(w.Serialize(), "again");
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_EQ((*again)->metadata().size(), f.metadata().size());
  for (size_t i = 0; i < f.metadata().size(); ++i) {
    ASSERT_EQ((*again)->metadata()[i].first, f.metadata()[i].first);
    ASSERT_TRUE((*again)->metadata()[i].second == f.metadata()[i].second);
  }
  ASSERT_EQ((*again)->tensors().size(), f.tensors().size());
  for (size_t i = 0; i < f.tensors().size(); ++i) {
    const GgufTensorInfo& a = f.tensors()[i];
    const GgufTensorInfo& b = (*again)->tensors()[i];
    ASSERT_EQ(a.name, b.name);
    ASSERT_EQ(a.ne, b.ne);
    ASSERT_EQ(a.nbytes, b.nbytes);
    ASSERT_EQ(std::memcmp(a.data, b.data, a.nbytes), 0);
  }
}

TEST(GgufFuzz, MutatedFilesNeverCrash) {
  const std::string file = ValidFile();
  ASSERT_TRUE(GgufFile::FromBytes(file, "valid").ok());
  const std::vector<size_t> fields = U64FieldOffsets(file);
  std::mt19937 rng(11);
  int accepted = 0;
  const int kIterations = 20000;
  for (int i = 0; i < kIterations; ++i) {
    const std::string bad = Mutate(file, fields, &rng);
    auto f = GgufFile::FromBytes(bad, "fuzz");
    if (f.ok()) {
      ++accepted;
      CheckConsistent(**f, bad);
      if (::testing::Test::HasFatalFailure()) {
        FAIL() << "iteration " << i;
      }
    } else {
      EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << i << f.status();
      EXPECT_FALSE(f.status().message().empty());
    }
  }
  // Edits of tensor data or string bytes are accepted; edits of structure mostly not.
  EXPECT_GT(accepted, 0);
  EXPECT_LT(accepted, kIterations);
}

TEST(GgufFuzz, RandomBytesWithAGgufHeaderNeverCrash) {
  std::mt19937 rng(12);
  for (int i = 0; i < 5000; ++i) {
    std::string junk(rng() % 512, '\0');
    for (char& c : junk) c = static_cast<char>(rng() & 0xff);
    if (junk.size() >= 24) {
      std::memcpy(junk.data(), "GGUF", 4);
      const uint32_t version = 3;
      std::memcpy(junk.data() + 4, &version, 4);
      const uint64_t n_tensors = rng() % 4, n_kv = rng() % 4;
      std::memcpy(junk.data() + 8, &n_tensors, 8);
      std::memcpy(junk.data() + 16, &n_kv, 8);
    }
    auto f = GgufFile::FromBytes(junk, "junk");
    if (f.ok()) CheckConsistent(**f, junk);
  }
}

}  // namespace
}  // namespace fedlora::common
