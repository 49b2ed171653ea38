// Building blocks of common/secagg: fixed-point codec, PRG, Shamir sharing,
// the symmetric channel crypto.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <cmath>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/crypto/crypto.h"
#include "common/secagg/channel_crypto.h"
#include "common/secagg/fixed_point.h"
#include "common/secagg/prg.h"
#include "common/secagg/shamir.h"
#include "tests/common/secagg_test_util.h"

namespace fedlora::common::secagg {
namespace {

using testing::StatusIs;
constexpr auto kInvalid = absl::StatusCode::kInvalidArgument;

// ------------------------------------------------------------- fixed point

TEST(SecAggFixedPointTest, SumOfEncodingsDecodesToSumOfClippedValues) {
  const int n = 50;
  auto codec = FixedPointCodec::Create({/*clip=*/1.5, /*scale=*/0, n});
  ASSERT_TRUE(codec.ok()) << codec.status();
  EXPECT_LE(codec->max_encoded() * n, std::numeric_limits<int32_t>::max());
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);  // some values get clipped
  const size_t p = 257;
  std::vector<uint32_t> sum(p, 0);
  std::vector<double> want(p, 0.0);
  for (int a = 0; a < n; ++a) {
    std::vector<float> x(p);
    for (auto& v : x) v = dist(rng);
    x[0] = 1.5f;   // the extremes are representable
    x[1] = -1.5f;
    x[2] = 7.0f;   // clipped to 1.5
    auto enc = codec->Encode(x);
    ASSERT_TRUE(enc.ok());
    for (size_t i = 0; i < p; ++i) {
      sum[i] += (*enc)[i];
      want[i] += std::clamp(static_cast<double>(x[i]), -1.5, 1.5);
    }
  }
  auto dec = codec->DecodeSum(sum, n);
  ASSERT_TRUE(dec.ok()) << dec.status();
  const double tol = n * 0.5 / codec->scale() + 1e-6 * n;  // rounding per element, float output
  for (size_t i = 0; i < p; ++i) EXPECT_NEAR((*dec)[i], want[i], tol) << i;
  EXPECT_NEAR((*dec)[0], 1.5 * n, 1e-4);
  EXPECT_NEAR((*dec)[2], 1.5 * n, 1e-4);
  EXPECT_NEAR((*dec)[1], -1.5 * n, 1e-4);
}

TEST(SecAggFixedPointTest, RefusesConfigsThatCouldOverflow) {
  // 1000 agents * round(1.0 * 3e6) = 3e9 > 2^31 - 1.
  EXPECT_THAT(FixedPointCodec::Create({1.0, 3e6, 1000}).status(),
              StatusIs(kInvalid, "exceeds 2^31 - 1; a sum could overflow"));
  // Exactly at the edge is accepted, one unit more refused.
  const int n = 7;
  const double edge = std::floor(2147483647.0 / n);
  EXPECT_TRUE(FixedPointCodec::Create({1.0, edge, n}).ok());
  EXPECT_FALSE(FixedPointCodec::Create({1.0, edge + 1, n}).ok());
  EXPECT_THAT(FixedPointCodec::Create({0.0, 10, 3}).status(), StatusIs(kInvalid, "clip"));
  EXPECT_THAT(FixedPointCodec::Create({1.0, -1, 3}).status(), StatusIs(kInvalid, "scale"));
  EXPECT_THAT(FixedPointCodec::Create({1.0, 10, 0}).status(), StatusIs(kInvalid, "max_agents"));
  EXPECT_THAT(FixedPointCodec::Create({1e-9, 10, 3}).status(), StatusIs(kInvalid, "rounds to 0"));
  EXPECT_THAT(FixedPointCodec::Create({std::nan(""), 10, 3}).status(), StatusIs(kInvalid, "clip"));
}

TEST(SecAggFixedPointTest, RejectsNonFiniteInputsWithIndexAndBadSums) {
  auto codec = FixedPointCodec::Create({1.0, 1000, 4});
  ASSERT_TRUE(codec.ok());
  std::vector<float> x = {0.5f, -0.25f, std::numeric_limits<float>::quiet_NaN()};
  EXPECT_THAT(codec->Encode(x).status(), StatusIs(kInvalid, "input[2] is NaN"));
  x[2] = -std::numeric_limits<float>::infinity();
  EXPECT_THAT(codec->Encode(x).status(), StatusIs(kInvalid, "input[2] is infinite"));
  x[2] = 0.125f;
  auto enc = codec->Encode(x);
  ASSERT_TRUE(enc.ok());
  EXPECT_EQ((*enc)[1], static_cast<uint32_t>(-250));
  // A word no sum of 2 encodings can produce (masks not removed) is DataLoss.
  std::vector<uint32_t> garbage = {0x7fff0000u};
  EXPECT_THAT(codec->DecodeSum(garbage, 2).status(),
              StatusIs(absl::StatusCode::kDataLoss, "sum[0]"));
  EXPECT_THAT(codec->DecodeSum(*enc, 5).status(), StatusIs(kInvalid, "num_summed"));
}

// -------------------------------------------------------------------- PRG

std::string Seed(int v) { return std::string(32, static_cast<char>(v)); }

TEST(SecAggPrgTest, DeterministicAndSeedDependent) {
  auto a = PrgExpand(Seed(1), 1000);
  auto b = PrgExpand(Seed(1), 1000);
  auto c = PrgExpand(Seed(2), 1000);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(*a, *b);
  int equal = 0;
  for (size_t i = 0; i < a->size(); ++i) equal += (*a)[i] == (*c)[i];
  EXPECT_LT(equal, 3);
  // Roughly balanced bits (a broken stream of zeros or a counter would fail).
  int ones = 0;
  for (uint32_t w : *a) ones += __builtin_popcount(w);
  EXPECT_NEAR(ones, 16000, 600);
  EXPECT_THAT(PrgExpand("short", 4).status(), StatusIs(kInvalid, "expected 32 bytes"));
}

TEST(SecAggPrgTest, MatchesAes256CtrKeystream) {
  // Word 0..3 = AES-256(key = seed, block 0), as little-endian words.
  std::string seed = Seed(9);
  auto words = PrgExpand(seed, 8);
  ASSERT_TRUE(words.ok());
  std::string zeros(32, '\0');
  // Independent computation with a plain EVP call.
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  unsigned char iv[16] = {0};
  unsigned char out[32];
  int len = 0;
  ASSERT_EQ(EVP_EncryptInit_ex(ctx, EVP_aes_256_ctr(), nullptr,
                               reinterpret_cast<const unsigned char*>(seed.data()), iv),
            1);
  ASSERT_EQ(EVP_EncryptUpdate(ctx, out, &len, reinterpret_cast<const unsigned char*>(zeros.data()),
                              32),
            1);
  EVP_CIPHER_CTX_free(ctx);
  for (int i = 0; i < 8; ++i) {
    uint32_t w = out[4 * i] | (out[4 * i + 1] << 8) | (out[4 * i + 2] << 16) |
                 (static_cast<uint32_t>(out[4 * i + 3]) << 24);
    EXPECT_EQ((*words)[i], w) << i;
  }
}

TEST(SecAggPrgTest, RangesThreadsAndSignsAgree) {
  const size_t n = 100000;  // spans several 16 Ki-word blocks, not a multiple of 4
  auto full = PrgExpand(Seed(4), n + 3);
  ASSERT_TRUE(full.ok());
  // An unaligned sub-range equals the slice of the full stream.
  std::vector<uint32_t> part(n, 0);
  MaskExpander ex;
  ASSERT_TRUE(ex.Apply(Seed(4), 3, MaskSign::kAdd, absl::MakeSpan(part)).ok());
  for (size_t i = 0; i < n; i += 997) ASSERT_EQ(part[i], (*full)[i + 3]) << i;
  EXPECT_EQ(part.back(), (*full)[n + 2]);
  // +a +b -a with 1 and 3 threads leaves exactly +b.
  std::vector<MaskTerm> terms = {{Seed(4), MaskSign::kAdd}, {Seed(5), MaskSign::kAdd},
                                 {Seed(4), MaskSign::kSubtract}};
  auto b = PrgExpand(Seed(5), n);
  for (int threads : {1, 3}) {
    std::vector<uint32_t> v(n, 0);
    ASSERT_TRUE(ApplyMasks(terms, absl::MakeSpan(v), threads).ok());
    EXPECT_EQ(v, *b) << threads;
  }
  std::vector<uint32_t> untouched(4, 7);
  EXPECT_THAT(ApplyMasks({{"bad", MaskSign::kAdd}}, absl::MakeSpan(untouched)),
              StatusIs(kInvalid, "mask term 0"));
  EXPECT_EQ(untouched, std::vector<uint32_t>(4, 7));
}

// ----------------------------------------------------------------- Shamir

TEST(SecAggShamirTest, EveryThresholdSubsetReconstructs) {
  std::string secret = RandomBytes(32);
  const int t = 3;
  std::vector<uint8_t> xs = {1, 2, 5, 9, 200, 255};
  auto shares = ShamirSplit(secret, t, xs);
  ASSERT_TRUE(shares.ok()) << shares.status();
  int subsets = 0;
  for (int mask = 0; mask < (1 << xs.size()); ++mask) {
    if (__builtin_popcount(mask) < t) continue;
    std::vector<ShamirShare> pick;
    for (size_t i = 0; i < xs.size(); ++i) {
      if (mask & (1 << i)) pick.push_back((*shares)[i]);
    }
    auto got = ShamirReconstruct(pick, t);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, secret) << mask;
    ++subsets;
  }
  EXPECT_EQ(subsets, 42);  // C(6,3)+C(6,4)+C(6,5)+C(6,6)
}

TEST(SecAggShamirTest, FewerThanThresholdSharesRevealNothing) {
  const int t = 4;
  std::vector<uint8_t> xs = {1, 2, 3, 4, 5};
  std::string secret = RandomBytes(32);
  auto shares = ShamirSplit(secret, t, xs);
  ASSERT_TRUE(shares.ok());
  std::vector<ShamirShare> three(shares->begin(), shares->begin() + 3);
  EXPECT_THAT(ShamirReconstruct(three, t).status(), StatusIs(kInvalid, "need 4 shares, found 3"));
  // Interpolating t-1 shares as if the threshold were t-1 gives a wrong value.
  auto wrong = ShamirReconstruct(three, t - 1);
  ASSERT_TRUE(wrong.ok());
  EXPECT_NE(*wrong, secret);
  // Statistically: with t = 2, one share's byte is uniform whatever the secret.
  for (char fill : {'\0', '\xff'}) {
    std::set<uint8_t> seen;
    std::vector<int> counts(256, 0);
    for (int rep = 0; rep < 4000; ++rep) {
      auto s = ShamirSplit(std::string(1, fill), 2, {7, 8});
      ASSERT_TRUE(s.ok());
      uint8_t y = static_cast<uint8_t>((*s)[0].y[0]);
      seen.insert(y);
      ++counts[y];
    }
    EXPECT_GT(seen.size(), 240u);
    EXPECT_LT(*std::max_element(counts.begin(), counts.end()), 45);  // mean 15.6
  }
}

TEST(SecAggShamirTest, RejectsBadShares) {
  auto shares = ShamirSplit(RandomBytes(32), 2, {1, 2, 3});
  ASSERT_TRUE(shares.ok());
  auto dup = *shares;
  dup[1].x = dup[0].x;
  EXPECT_THAT(ShamirReconstruct(dup, 2).status(), StatusIs(kInvalid, "duplicate x = 1"));
  auto zero = *shares;
  zero[0].x = 0;
  EXPECT_THAT(ShamirReconstruct(zero, 2).status(), StatusIs(kInvalid, "x must be in 1..255"));
  auto len = *shares;
  len[2].y.pop_back();
  EXPECT_THAT(ShamirReconstruct(len, 2).status(), StatusIs(kInvalid, "share[2] has 31 bytes"));
  EXPECT_THAT(ShamirSplit("s", 4, {1, 2, 3}).status(), StatusIs(kInvalid, "threshold"));
  EXPECT_THAT(ShamirSplit("s", 2, {1, 1}).status(), StatusIs(kInvalid, "duplicate x"));
  EXPECT_THAT(ShamirSplit("s", 1, {0}).status(), StatusIs(kInvalid, "x must be in 1..255"));
}

// ---------------------------------------------------------- channel crypto

TEST(SecAggChannelTest, GcmBindsKeyAndAad) {
  std::string key = RandomBytes(32);
  auto sealed = AesGcmSeal(key, "share bytes", "aad");
  ASSERT_TRUE(sealed.ok());
  EXPECT_EQ(sealed->size(), 11 + kGcmOverhead);
  EXPECT_EQ(*AesGcmOpen(key, *sealed, "aad"), "share bytes");
  EXPECT_THAT(AesGcmOpen(key, *sealed, "other").status(), StatusIs(kInvalid, "authentication"));
  EXPECT_THAT(AesGcmOpen(RandomBytes(32), *sealed, "aad").status(),
              StatusIs(kInvalid, "authentication"));
  EXPECT_THAT(AesGcmOpen(key, sealed->substr(0, 10), "aad").status(),
              StatusIs(kInvalid, "authentication"));
  auto a = HkdfSha256("ikm", "salt", "info", 32);
  auto b = HkdfSha256("ikm", "salt", "inf0", 32);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(*a, *b);
  EXPECT_EQ(*a, *HkdfSha256("ikm", "salt", "info", 32));
}

}  // namespace
}  // namespace fedlora::common::secagg
