#include "coordinator/robust_aggregator.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "coordinator/aggregator.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;

// Two LoRA-shaped tensors with values around `center` (+- spread).
common::TensorMap RandomUpdate(std::mt19937_64& rng, float center, float spread) {
  std::uniform_real_distribution<float> dist(center - spread, center + spread);
  common::TensorMap m;
  for (auto [name, shape] : {std::pair<const char*, std::vector<int64_t>>{"l0.lora_A", {4, 9}},
                             {"l0.lora_B", {7, 4}}}) {
    common::HostTensor t;
    t.shape = shape;
    t.data.resize(shape[0] * shape[1]);
    for (float& v : t.data) v = dist(rng);
    m.emplace(name, std::move(t));
  }
  return m;
}

double Norm(const common::TensorMap& m) {
  double s = 0;
  for (const auto& [name, t] : m) {
    for (float v : t.data) s += double(v) * v;
  }
  return std::sqrt(s);
}

double Distance(const common::TensorMap& a, const common::TensorMap& b) {
  double s = 0;
  for (const auto& [name, t] : a) {
    const auto& u = b.at(name).data;
    for (size_t i = 0; i < t.data.size(); ++i) s += (double(t.data[i]) - u[i]) * (t.data[i] - u[i]);
  }
  return std::sqrt(s);
}

// Plain reference: clip each update to `bound`, then per coordinate apply
// `rule` to the sorted column (or the weighted mean).
common::TensorMap Reference(const std::vector<common::TensorMap>& updates,
                            const std::vector<double>& weights, double bound, RobustRule rule,
                            double beta) {
  common::TensorMap out;
  const size_t n = updates.size();
  std::vector<double> scale(n);
  for (size_t i = 0; i < n; ++i) {
    const double norm = Norm(updates[i]);
    scale[i] = norm > bound ? bound / norm : 1.0;
  }
  for (const auto& [name, first] : updates[0]) {
    common::HostTensor t;
    t.shape = first.shape;
    for (size_t j = 0; j < first.data.size(); ++j) {
      std::vector<double> col;
      for (size_t i = 0; i < n; ++i) col.push_back(updates[i].at(name).data[j] * scale[i]);
      double v = 0;
      if (rule == RobustRule::kMean) {
        double wsum = 0;
        for (size_t i = 0; i < n; ++i) {
          v += weights[i] * col[i];
          wsum += weights[i];
        }
        v /= wsum;
      } else {
        std::sort(col.begin(), col.end());
        if (rule == RobustRule::kMedian) {
          v = n % 2 ? col[n / 2] : (col[n / 2 - 1] + col[n / 2]) / 2;
        } else {
          const size_t k = static_cast<size_t>(beta * n);
          for (size_t i = k; i < n - k; ++i) v += col[i];
          v /= double(n - 2 * k);
        }
      }
      t.data.push_back(static_cast<float>(v));
    }
    out.emplace(name, std::move(t));
  }
  return out;
}

void ExpectNear(const common::TensorMap& got, const common::TensorMap& want, double tol) {
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [name, t] : want) {
    ASSERT_EQ(got.at(name).shape, t.shape) << name;
    for (size_t i = 0; i < t.data.size(); ++i) {
      ASSERT_NEAR(got.at(name).data[i], t.data[i], tol) << name << "[" << i << "]";
    }
  }
}

common::TensorMap Aggregate(const RobustOptions& options,
                            const std::vector<common::TensorMap>& updates,
                            const std::vector<double>& weights, RobustStats* stats = nullptr) {
  auto agg = RobustAggregator::Create(options);
  EXPECT_TRUE(agg.ok()) << agg.status();
  for (size_t i = 0; i < updates.size(); ++i) {
    absl::Status s = agg->Add(updates[i], weights[i]);
    EXPECT_TRUE(s.ok()) << s;
  }
  auto result = agg->FinishWithStats();
  EXPECT_TRUE(result.ok()) << result.status();
  if (stats != nullptr) *stats = result->stats;
  return result->aggregate;
}

TEST(RobustAggregatorTest, MatchesPlainReferenceOnRandomData) {
  std::mt19937_64 rng(11);
  for (size_t n : {1, 2, 5, 8, 13}) {
    std::vector<common::TensorMap> updates;
    std::vector<double> weights;
    for (size_t i = 0; i < n; ++i) {
      // Mixed scales so that some updates get clipped.
      updates.push_back(RandomUpdate(rng, 0.1f * i, 0.5f + i));
      weights.push_back(1 + i * 3);
    }
    std::vector<double> norms;
    for (const auto& u : updates) norms.push_back(Norm(u));
    std::sort(norms.begin(), norms.end());
    const double median = n % 2 ? norms[n / 2] : (norms[n / 2 - 1] + norms[n / 2]) / 2;
    const double inf = std::numeric_limits<double>::infinity();
    struct Config {
      RobustOptions options;
      double bound;
    };
    for (const Config& c : {
             Config{{RobustRule::kMedian, 0.1, NormBound::kNone, 1}, inf},
             Config{{RobustRule::kMedian, 0.1, NormBound::kMedianMultiple, 1.2}, 1.2 * median},
             Config{{RobustRule::kTrimmedMean, 0.0, NormBound::kNone, 1}, inf},
             Config{{RobustRule::kTrimmedMean, 0.2, NormBound::kNone, 1}, inf},
             Config{{RobustRule::kTrimmedMean, 0.34, NormBound::kAbsolute, 5.0}, 5.0},
             Config{{RobustRule::kMean, 0.1, NormBound::kAbsolute, 5.0}, 5.0},
             Config{{RobustRule::kMean, 0.1, NormBound::kMedianMultiple, 0.9}, 0.9 * median},
         }) {
      SCOPED_TRACE(::testing::Message() << "n=" << n << " rule=" << int(c.options.rule)
                                        << " beta=" << c.options.trim_fraction
                                        << " bound=" << int(c.options.norm_bound));
      RobustStats stats;
      common::TensorMap got = Aggregate(c.options, updates, weights, &stats);
      ExpectNear(got, Reference(updates, weights, c.bound, c.options.rule,
                                c.options.trim_fraction),
                 1e-5);
      EXPECT_EQ(stats.count, n);
      EXPECT_NEAR(stats.median_norm, median, 1e-9 * median);
      size_t clipped = 0;
      for (double norm : norms) clipped += norm > c.bound;
      EXPECT_EQ(stats.clipped, clipped);
      if (c.options.rule == RobustRule::kTrimmedMean) {
        EXPECT_EQ(stats.trimmed_each_side, size_t(c.options.trim_fraction * n));
      }
    }
  }
}

TEST(RobustAggregatorTest, UnboundedMeanEqualsFedAvg) {
  std::mt19937_64 rng(5);
  std::vector<common::TensorMap> updates;
  std::vector<double> weights = {3, 10, 1, 7};
  FedAvgAggregator fedavg;
  for (double w : weights) {
    updates.push_back(RandomUpdate(rng, 0.0f, 2.0f));
    ASSERT_TRUE(fedavg.Add(updates.back(), w).ok());
  }
  common::TensorMap got =
      Aggregate({RobustRule::kMean, 0.1, NormBound::kNone, 1}, updates, weights);
  ExpectNear(got, *fedavg.Finish(), 1e-6);
}

TEST(RobustAggregatorTest, PoisoningMinorityMovesFedAvgButNotRobustRules) {
  // 5 honest agents send updates near a common direction h; 2 of 7 send a
  // large update pointing the other way (a model-replacement style attack),
  // and claim many examples.
  std::mt19937_64 rng(2024);
  std::vector<common::TensorMap> honest;
  for (int i = 0; i < 5; ++i) honest.push_back(RandomUpdate(rng, 0.2f, 0.05f));
  common::TensorMap honest_mean = Reference(honest, std::vector<double>(5, 1.0),
                                            std::numeric_limits<double>::infinity(),
                                            RobustRule::kMean, 0);
  const double h = Norm(honest_mean);
  ASSERT_GT(h, 1.0);
  std::vector<common::TensorMap> all = honest;
  std::vector<double> weights(5, 100.0);
  for (int i = 0; i < 2; ++i) {
    common::TensorMap evil = honest_mean;
    for (auto& [name, t] : evil) {
      for (float& v : t.data) v *= -40.0f;
    }
    all.push_back(evil);
    weights.push_back(100.0);
  }

  FedAvgAggregator fedavg;
  for (size_t i = 0; i < all.size(); ++i) ASSERT_TRUE(fedavg.Add(all[i], weights[i]).ok());
  const double fedavg_err = Distance(*fedavg.Finish(), honest_mean);
  // (2/7) * 41 h: the attack drags FedAvg far past zero.
  EXPECT_GT(fedavg_err, 10 * h);

  const double trimmed_err = Distance(
      Aggregate({RobustRule::kTrimmedMean, 2.0 / 7 + 1e-9, NormBound::kNone, 1}, all, weights),
      honest_mean);
  const double median_err =
      Distance(Aggregate({RobustRule::kMedian, 0, NormBound::kNone, 1}, all, weights),
               honest_mean);
  RobustStats stats;
  const double bounded_err = Distance(
      Aggregate({RobustRule::kMean, 0, NormBound::kMedianMultiple, 1.5}, all, weights, &stats),
      honest_mean);
  // Trimmed mean and median land inside the honest spread (+-0.05 per value).
  EXPECT_LT(trimmed_err, 0.1 * h);
  EXPECT_LT(median_err, 0.1 * h);
  // Norm bounding: only the two attackers are clipped, to B = 1.5 * median
  // norm (~1.5 h); the mean then moves by at most (2/7) * (B + h).
  EXPECT_EQ(stats.clipped, 2u);
  EXPECT_LE(bounded_err, 2.0 / 7 * (stats.bound + h) + 1e-6);
  EXPECT_LT(bounded_err, fedavg_err / 10);
  // Combined: bounding then median is as good as the median.
  EXPECT_LT(Distance(Aggregate({RobustRule::kMedian, 0, NormBound::kMedianMultiple, 1.5}, all,
                               weights),
                     honest_mean),
            0.1 * h);
}

TEST(RobustAggregatorTest, RejectsMismatchesAndNonFiniteValuesWithoutChangingState) {
  std::mt19937_64 rng(3);
  const common::TensorMap a = RandomUpdate(rng, 0, 1);
  const common::TensorMap b = RandomUpdate(rng, 0, 1);
  auto agg = RobustAggregator::Create({RobustRule::kTrimmedMean, 0.25, NormBound::kNone, 1});
  ASSERT_TRUE(agg.ok());
  ASSERT_TRUE(agg->Add(a, 1).ok());
  ASSERT_TRUE(agg->Add(b, 1).ok());
  const common::TensorMap before = *agg->Finish();

  struct Bad {
    common::TensorMap update;
    double weight;
    std::string message;
  };
  std::vector<Bad> bad;
  {
    common::TensorMap u = a;
    u.at("l0.lora_A").shape = {9, 4};
    bad.push_back({u, 1, "expected shape [4,9], found [9,4]"});
  }
  {
    common::TensorMap u = a;
    u.erase("l0.lora_B");
    bad.push_back({u, 1, "expected 2 tensors"});
  }
  {
    common::TensorMap u = a;
    auto node = u.extract("l0.lora_B");
    node.key() = "l0.lora_C";
    u.insert(std::move(node));
    bad.push_back({u, 1, "'l0.lora_B' of the first update is missing"});
  }
  {
    common::TensorMap u = a;
    u.at("l0.lora_B").data[3] = std::numeric_limits<float>::quiet_NaN();
    bad.push_back({u, 1, "tensor 'l0.lora_B': value [3]"});
  }
  {
    common::TensorMap u = a;
    u.at("l0.lora_A").data[0] = -std::numeric_limits<float>::infinity();
    bad.push_back({u, 1, "not finite"});
  }
  {
    common::TensorMap u = a;
    u.at("l0.lora_A").data.pop_back();
    bad.push_back({u, 1, "needs 36 values, found 35"});
  }
  bad.push_back({a, 0, "weight"});
  bad.push_back({a, std::numeric_limits<double>::quiet_NaN(), "weight"});
  bad.push_back({common::TensorMap{}, 1, "no tensors"});
  for (const Bad& x : bad) {
    absl::Status s = agg->Add(x.update, x.weight);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << x.message;
    EXPECT_THAT(s.message(), HasSubstr(x.message));
  }
  EXPECT_EQ(agg->count(), 2u);
  ExpectNear(*agg->Finish(), before, 0);

  // The first update is validated too.
  auto fresh = RobustAggregator::Create({});
  ASSERT_TRUE(fresh.ok());
  EXPECT_FALSE(fresh->Add(bad[3].update, 1).ok());
  EXPECT_EQ(fresh->count(), 0u);
  EXPECT_EQ(fresh->Finish().status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(RobustAggregatorTest, RejectsBadOptions) {
  EXPECT_THAT(RobustAggregator::Create({RobustRule::kTrimmedMean, 0.5, NormBound::kNone, 1})
                  .status()
                  .message(),
              HasSubstr("trim_fraction"));
  EXPECT_THAT(RobustAggregator::Create({RobustRule::kTrimmedMean, -0.1, NormBound::kNone, 1})
                  .status()
                  .message(),
              HasSubstr("trim_fraction"));
  EXPECT_THAT(RobustAggregator::Create({RobustRule::kMean, 0.1, NormBound::kAbsolute, 0})
                  .status()
                  .message(),
              HasSubstr("norm_bound_value"));
  EXPECT_THAT(RobustAggregator::Create(
                  {RobustRule::kMean, 0.1, NormBound::kMedianMultiple,
                   std::numeric_limits<double>::infinity()})
                  .status()
                  .message(),
              HasSubstr("norm_bound_value"));
  EXPECT_TRUE(RobustAggregator::Create({RobustRule::kMean, 0.1, NormBound::kNone, 0}).ok());
}

}  // namespace
}  // namespace fedlora::coordinator
