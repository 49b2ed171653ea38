#include "common/privacy/dp.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

namespace fedlora::common {
namespace {

using ::testing::HasSubstr;

TensorMap RandomUpdate(uint64_t seed, float scale, int64_t rows = 8, int64_t cols = 33) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  TensorMap m;
  for (const char* name : {"layers.0.lora_A", "layers.0.lora_B", "layers.1.lora_A"}) {
    HostTensor t;
    t.shape = {rows, cols};
    t.data.resize(rows * cols);
    for (float& v : t.data) v = dist(rng);
    m.emplace(name, std::move(t));
  }
  return m;
}

double NaiveNorm(const TensorMap& m) {
  double s = 0;
  for (const auto& [name, t] : m) {
    for (float v : t.data) s += double(v) * double(v);
  }
  return std::sqrt(s);
}

TEST(DpTest, ClipScalesDownToExactlyTheBound) {
  TensorMap update = RandomUpdate(1, 3.0f);
  const TensorMap original = update;
  const double norm = NaiveNorm(update);
  ASSERT_GT(norm, 10);
  auto report = ClipUpdateL2(update, 1.5);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->clipped);
  EXPECT_NEAR(report->pre_clip_norm, norm, 1e-9 * norm);
  EXPECT_LE(NaiveNorm(update), 1.5);
  EXPECT_GE(NaiveNorm(update), 1.5 * (1 - 1e-6));
  EXPECT_DOUBLE_EQ(report->post_clip_norm, NaiveNorm(update));
  // Direction is kept: every value is scaled by the same factor C / norm.
  for (const auto& [name, t] : original) {
    for (size_t i = 0; i < t.data.size(); ++i) {
      EXPECT_NEAR(update.at(name).data[i], t.data[i] * 1.5 / norm, 1e-6) << name << i;
    }
  }
}

TEST(DpTest, ClipNeverOvershootsAcrossManyInputs) {
  // fp32 rounding must not leave the norm above C (the sensitivity bound).
  for (uint64_t seed = 0; seed < 200; ++seed) {
    TensorMap update = RandomUpdate(seed, 1.0f + seed * 0.37f, 3, 17);
    const double c = 0.1 + 0.013 * seed;
    auto report = ClipUpdateL2(update, c);
    ASSERT_TRUE(report.ok());
    ASSERT_LE(NaiveNorm(update), c) << seed;
  }
}

TEST(DpTest, ClipIsANoOpWithinTheBound) {
  TensorMap update = RandomUpdate(2, 0.01f);
  const TensorMap original = update;
  const double norm = NaiveNorm(update);
  auto report = ClipUpdateL2(update, norm * 1.01);
  ASSERT_TRUE(report.ok());
  EXPECT_FALSE(report->clipped);
  EXPECT_DOUBLE_EQ(report->pre_clip_norm, report->post_clip_norm);
  for (const auto& [name, t] : original) EXPECT_EQ(update.at(name).data, t.data) << name;
  // Exactly at the bound: also untouched.
  report = ClipUpdateL2(update, NaiveNorm(update));
  ASSERT_TRUE(report.ok());
  EXPECT_FALSE(report->clipped);
  for (const auto& [name, t] : original) EXPECT_EQ(update.at(name).data, t.data) << name;
}

TEST(DpTest, RejectsNonFiniteValuesAndBadParametersWithoutTouchingTheUpdate) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    TensorMap update = RandomUpdate(3, 5.0f);
    update.at("layers.0.lora_B").data[7] = bad;
    const TensorMap original = update;
    auto report = ClipUpdateL2(update, 1.0);
    ASSERT_FALSE(report.ok());
    EXPECT_EQ(report.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(report.status().message(), HasSubstr("layers.0.lora_B"));
    EXPECT_THAT(report.status().message(), HasSubstr("[7]"));
    auto noise = GaussianNoise::FromSeed(1);
    ASSERT_TRUE(noise.ok());
    EXPECT_FALSE(PrivatizeUpdate(update, {1.0, 1.0, 3}, *noise).ok());
    for (const auto& [name, t] : original) {
      for (size_t i = 0; i < t.data.size(); ++i) {
        if (std::isnan(t.data[i])) {
          EXPECT_TRUE(std::isnan(update.at(name).data[i]));
        } else {
          EXPECT_EQ(update.at(name).data[i], t.data[i]);
        }
      }
    }
  }
  TensorMap update = RandomUpdate(4, 5.0f);
  const TensorMap original = update;
  auto noise = GaussianNoise::FromSeed(1);
  ASSERT_TRUE(noise.ok());
  EXPECT_THAT(ClipUpdateL2(update, 0).status().message(), HasSubstr("clip_norm"));
  EXPECT_THAT(ClipUpdateL2(update, -1).status().message(), HasSubstr("clip_norm"));
  EXPECT_THAT(PrivatizeUpdate(update, {0.0, 1.0, 1}, *noise).status().message(),
              HasSubstr("clip_norm"));
  EXPECT_THAT(PrivatizeUpdate(update, {1.0, -0.5, 1}, *noise).status().message(),
              HasSubstr("noise_multiplier"));
  EXPECT_THAT(
      PrivatizeUpdate(update, {1.0, std::numeric_limits<double>::infinity(), 1}, *noise)
          .status()
          .message(),
      HasSubstr("noise_multiplier"));
  EXPECT_THAT(PrivatizeUpdate(update, {1.0, 1.0, 0}, *noise).status().message(),
              HasSubstr("noise_shares"));
  for (const auto& [name, t] : original) EXPECT_EQ(update.at(name).data, t.data) << name;
  // Data that disagrees with the shape.
  update.at("layers.1.lora_A").data.pop_back();
  EXPECT_THAT(UpdateL2Norm(update).status().message(), HasSubstr("layers.1.lora_A"));
}

// Sample moments of `n` zero-valued coordinates after adding noise.
struct Moments {
  double mean, stddev, frac_beyond_2sd;
};
Moments NoiseMoments(const TensorMap& m, double expected_sd) {
  double sum = 0, sum2 = 0;
  size_t n = 0, beyond = 0;
  for (const auto& [name, t] : m) {
    for (float v : t.data) {
      sum += v;
      sum2 += double(v) * v;
      beyond += std::fabs(v) > 2 * expected_sd;
      ++n;
    }
  }
  const double mean = sum / n;
  return {mean, std::sqrt(sum2 / n - mean * mean), double(beyond) / n};
}

TensorMap Zeros(int64_t n) {
  TensorMap m;
  HostTensor t;
  t.shape = {n};
  t.data.assign(n, 0.0f);
  m.emplace("w", std::move(t));
  return m;
}

TEST(DpTest, NoiseShareHasTheRightStandardDeviation) {
  // 200k samples: the sample sd's standard error is sd / sqrt(2n) ~ 0.16%, so
  // a 1.5% band is ~9 standard errors; mean within 6 standard errors; the
  // two-sided 2-sd tail of a normal is 4.55% (binomial se ~0.05%).
  const int64_t n = 200000;
  const ClientDpOptions options{0.7, 1.3, 4};
  const double expected = 1.3 * 0.7 / 2.0;
  EXPECT_DOUBLE_EQ(NoiseShareStddev(options), expected);
  auto noise = GaussianNoise::FromSeed(42);
  ASSERT_TRUE(noise.ok());
  TensorMap update = Zeros(n);
  auto report = PrivatizeUpdate(update, options, *noise);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_FALSE(report->clipped);
  EXPECT_EQ(report->pre_clip_norm, 0.0);
  const Moments m = NoiseMoments(update, expected);
  EXPECT_NEAR(m.stddev, expected, 0.015 * expected);
  EXPECT_NEAR(m.mean, 0.0, 6 * expected / std::sqrt(double(n)));
  EXPECT_NEAR(m.frac_beyond_2sd, 0.0455, 0.004);
}

TEST(DpTest, SharesOfThresholdAgentsSumToTheFullNoise) {
  // m = t = 5 agents each add a share; their sum carries sigma * C.
  const int64_t n = 100000;
  const ClientDpOptions options{2.0, 0.9, 5};
  TensorMap sum = Zeros(n);
  for (uint64_t agent = 0; agent < 5; ++agent) {
    auto noise = GaussianNoise::FromSeed(1000 + agent);
    ASSERT_TRUE(noise.ok());
    TensorMap share = Zeros(n);
    ASSERT_TRUE(PrivatizeUpdate(share, options, *noise).ok());
    for (int64_t i = 0; i < n; ++i) sum.at("w").data[i] += share.at("w").data[i];
  }
  const double full = 0.9 * 2.0;
  const Moments m = NoiseMoments(sum, full);
  EXPECT_NEAR(m.stddev, full, 0.02 * full);
}

TEST(DpTest, SeededNoiseIsDeterministicAndCsprngNoiseIsNot) {
  auto a = GaussianNoise::FromSeed(7);
  auto b = GaussianNoise::FromSeed(7);
  auto c = GaussianNoise::FromSeed(8);
  auto r1 = GaussianNoise::FromCsprng();
  auto r2 = GaussianNoise::FromCsprng();
  ASSERT_TRUE(a.ok() && b.ok() && c.ok() && r1.ok() && r2.ok());
  int same_ab = 0, same_ac = 0, same_r = 0;
  // More than one keystream refill, to cover the refill path.
  for (int i = 0; i < 10000; ++i) {
    const double x = *a->Next();
    same_ab += x == *b->Next();
    same_ac += x == *c->Next();
    same_r += *r1->Next() == *r2->Next();
  }
  EXPECT_EQ(same_ab, 10000);
  EXPECT_EQ(same_ac, 0);
  EXPECT_EQ(same_r, 0);
}

TEST(DpTest, ClipThenNoiseOnALargeUpdate) {
  TensorMap update = RandomUpdate(9, 10.0f, 64, 64);
  auto noise = GaussianNoise::FromSeed(3);
  ASSERT_TRUE(noise.ok());
  const ClientDpOptions options{1.0, 0.0, 1};  // sigma 0: clip only
  auto report = PrivatizeUpdate(update, options, *noise);
  ASSERT_TRUE(report.ok());
  EXPECT_TRUE(report->clipped);
  EXPECT_LE(NaiveNorm(update), 1.0);
}

}  // namespace
}  // namespace fedlora::common
