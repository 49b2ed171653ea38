// Fuzz-style robustness tests (no libFuzzer needed): thousands of seeded
// random mutations of valid adapter blobs and sealed messages. Decoding must
// never crash, and whatever it accepts must be self-consistent; a mutated
// sealed message must never open.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "common/crypto/crypto.h"
#include "common/quant/quant.h"
#include "common/tensor/tensor.h"

namespace fedlora::common {
namespace {

TensorMap SmallAdapter() {
  std::mt19937 rng(99);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  TensorMap m;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    HostTensor t;
    t.shape = std::move(shape);
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    t.data.resize(static_cast<size_t>(n));
    for (float& v : t.data) v = normal(rng);
    m[name] = std::move(t);
  };
  add("layers.0.q_proj.lora_A.weight", {4, 40});
  add("layers.0.q_proj.lora_B.weight", {40, 4});
  add("layers.0.v_proj.lora_A.weight", {4, 33});
  return m;
}

// Applies 1-4 random edits: bit flips, byte overwrites, digit changes inside
// the JSON header (offsets, shapes, lengths), truncation, insertion, deletion.
std::string Mutate(const std::string& in, std::mt19937* rng) {
  std::string s = in;
  std::uniform_int_distribution<int> op_dist(0, 6);
  int edits = 1 + static_cast<int>((*rng)() % 4);
  for (int e = 0; e < edits && !s.empty(); ++e) {
    std::uniform_int_distribution<size_t> pos_dist(0, s.size() - 1);
    size_t pos = pos_dist(*rng);
    switch (op_dist(*rng)) {
      case 0:
        s[pos] = static_cast<char>(s[pos] ^ (1 << ((*rng)() % 8)));
        break;
      case 1:
        s[pos] = static_cast<char>((*rng)() & 0xff);
        break;
      case 2: {  // a digit somewhere in the first bytes (the header) becomes another digit
        size_t limit = std::min<size_t>(s.size(), 1024);
        for (int tries = 0; tries < 64; ++tries) {
          size_t p = (*rng)() % limit;
          if (s[p] >= '0' && s[p] <= '9') {
            s[p] = static_cast<char>('0' + (*rng)() % 10);
            break;
          }
        }
        break;
      }
      case 3:
        s.resize(pos);
        break;
      case 4:
        s.insert(pos, 1, static_cast<char>((*rng)() & 0xff));
        break;
      case 5:
        s.erase(pos, 1 + (*rng)() % 8);
        break;
      case 6: {  // the 8-byte header length
        size_t b = (*rng)() % std::min<size_t>(8, s.size());
        s[b] = static_cast<char>((*rng)() & 0xff);
        break;
      }
    }
  }
  return s;
}

void CheckConsistent(const TensorMap& m) {
  for (const auto& [name, t] : m) {
    uint64_t n = 1;
    for (int64_t d : t.shape) {
      ASSERT_GE(d, 0) << name;
      n *= static_cast<uint64_t>(d);
    }
    ASSERT_EQ(n, t.data.size()) << name;
    for (float v : t.data) ASSERT_TRUE(std::isfinite(v)) << name;
  }
}

void FuzzDecode(Quant quant, uint32_t seed, int iterations) {
  const std::string blob = EncodeAdapterBlob(SmallAdapter(), quant, {{"parent", "v000001"}});
  ASSERT_TRUE(DecodeAdapterBlob(blob).ok());
  std::mt19937 rng(seed);
  int accepted = 0;
  for (int i = 0; i < iterations; ++i) {
    std::string bad = Mutate(blob, &rng);
    Metadata meta;
    auto out = DecodeAdapterBlob(bad, &meta);
    if (out.ok()) {
      ++accepted;
      CheckConsistent(*out);
    } else {
      EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument)
          << "iteration " << i << ": " << out.status();
      EXPECT_FALSE(out.status().message().empty());
    }
  }
  // Edits to tensor values may still decode (and exercise the value paths);
  // edits to the header must not.
  EXPECT_GT(accepted, 0);
  EXPECT_LT(accepted, iterations);
}

TEST(QuantFuzz, MutatedQ8BlobsNeverCrash) { FuzzDecode(Quant::kQ8_0, 1, 20000); }

TEST(QuantFuzz, MutatedF32BlobsNeverCrash) { FuzzDecode(Quant::kNone, 2, 20000); }

TEST(QuantFuzz, RandomBytesNeverCrash) {
  std::mt19937 rng(3);
  for (int i = 0; i < 2000; ++i) {
    std::string junk(rng() % 256, '\0');
    for (char& c : junk) c = static_cast<char>(rng() & 0xff);
    if (junk.size() >= 8 && i % 2 == 0) {  // plausible header length
      uint64_t len = rng() % (junk.size() - 7);
      for (int b = 0; b < 8; ++b) junk[b] = static_cast<char>(len >> (8 * b));
    }
    EXPECT_FALSE(DecodeAdapterBlob(junk).ok());
  }
}

TEST(QuantFuzz, DequantizeRandomBlocksStaysFiniteOrFails) {
  std::mt19937 rng(4);
  std::vector<float> out(100);
  for (int i = 0; i < 2000; ++i) {
    std::string bytes(4 * kQ8BlockBytes, '\0');
    for (char& c : bytes) c = static_cast<char>(rng() & 0xff);
    absl::Status s = DequantizeQ8_0(bytes, 100, out.data());
    if (s.ok()) {
      for (float v : out) ASSERT_TRUE(std::isfinite(v));
    } else {
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    }
  }
}

TEST(SealFuzz, MutatedSealedMessagesNeverOpen) {
  auto me = GenerateX25519KeyPair();
  ASSERT_TRUE(me.ok());
  const std::string aad = "fedlora-update-v1|7|agent-1|hash|v000003";
  const std::string plain = EncodeAdapterBlob(SmallAdapter(), Quant::kNone);
  auto sealed = SealToPublicKey(me->public_key, plain, aad);
  ASSERT_TRUE(sealed.ok());
  std::mt19937 rng(5);
  for (int i = 0; i < 3000; ++i) {
    std::string bad = Mutate(*sealed, &rng);
    if (bad == *sealed) continue;  // an edit that happened to restore the byte
    auto opened = OpenSealed(*me, bad, aad);
    ASSERT_FALSE(opened.ok()) << "iteration " << i;
    EXPECT_EQ(opened.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(opened.status().message().find("authentication failed"), std::string::npos)
        << opened.status();
  }
  auto good = OpenSealed(*me, *sealed, aad);
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(*good, plain);
}

}  // namespace
}  // namespace fedlora::common
