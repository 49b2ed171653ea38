// Product aggregation and its linear algebra against plain references: dense
// triple loops for the mean of products, a matrix with a known spectrum for the SVD.
#include "coordinator/lora_product.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;
using testing::MakeLoraUpdate;

constexpr char kQ[] = "base_model.model.model.layers.0.self_attn.q_proj";

// Plain reference: sum_i w_i * s * B_i A_i / sum_i w_i for one module.
Matrix NaiveMeanOfProducts(const std::vector<common::TensorMap>& updates,
                           const std::vector<double>& weights, double s, const std::string& prefix) {
  const common::HostTensor& a0 = updates[0].at(prefix + kLoraASuffix);
  const common::HostTensor& b0 = updates[0].at(prefix + kLoraBSuffix);
  const int64_t r = a0.shape[0], in = a0.shape[1], out = b0.shape[0];
  Matrix m(out, in);
  double total = 0;
  for (size_t u = 0; u < updates.size(); ++u) {
    const common::HostTensor& a = updates[u].at(prefix + kLoraASuffix);
    const common::HostTensor& b = updates[u].at(prefix + kLoraBSuffix);
    for (int64_t o = 0; o < out; ++o) {
      for (int64_t i = 0; i < in; ++i) {
        double acc = 0;
        for (int64_t k = 0; k < r; ++k) acc += double(b.data[o * r + k]) * a.data[k * in + i];
        m.at(o, i) += weights[u] * s * acc;
      }
    }
    total += weights[u];
  }
  for (double& x : m.data) x /= total;
  return m;
}

// s * B A of the aggregated adapter for one module.
Matrix ProductOf(const common::TensorMap& adapter, double s, const std::string& prefix) {
  return NaiveMeanOfProducts({adapter}, {1.0}, s, prefix);
}

double FrobeniusSq(const Matrix& m) {
  double sum = 0;
  for (double x : m.data) sum += x * x;
  return sum;
}

double DiffSq(const Matrix& x, const Matrix& y) {
  double sum = 0;
  for (size_t i = 0; i < x.data.size(); ++i) sum += (x.data[i] - y.data[i]) * (x.data[i] - y.data[i]);
  return sum;
}

// n orthonormal columns of length `len` (Gram-Schmidt of random vectors).
Matrix RandomOrthonormal(int64_t len, int64_t n, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  Matrix q(len, n);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < len; ++i) q.at(i, j) = normal(rng);
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t p = 0; p < j; ++p) {
        double dot = 0;
        for (int64_t i = 0; i < len; ++i) dot += q.at(i, j) * q.at(i, p);
        for (int64_t i = 0; i < len; ++i) q.at(i, j) -= dot * q.at(i, p);
      }
    }
    double norm = 0;
    for (int64_t i = 0; i < len; ++i) norm += q.at(i, j) * q.at(i, j);
    for (int64_t i = 0; i < len; ++i) q.at(i, j) /= std::sqrt(norm);
  }
  return q;
}

TEST(JacobiEigenTest, DecomposesRandomSymmetricMatrix) {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> u(-1, 1);
  const int64_t n = 9;
  Matrix g(n, n);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = i; j < n; ++j) g.at(i, j) = g.at(j, i) = u(rng);
  }
  SymmetricEigen e = JacobiEigen(g);
  ASSERT_EQ(e.values.size(), static_cast<size_t>(n));
  for (int64_t j = 1; j < n; ++j) EXPECT_GE(e.values[j - 1], e.values[j]);
  double trace = 0, sum = 0;
  for (int64_t i = 0; i < n; ++i) trace += g.at(i, i);
  for (double v : e.values) sum += v;
  EXPECT_NEAR(trace, sum, 1e-12);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < n; ++i) {
      double gv = 0;
      for (int64_t k = 0; k < n; ++k) gv += g.at(i, k) * e.vectors.at(k, j);
      EXPECT_NEAR(gv, e.values[j] * e.vectors.at(i, j), 1e-12);  // G v = lambda v
    }
    for (int64_t p = 0; p < n; ++p) {
      double dot = 0;
      for (int64_t i = 0; i < n; ++i) dot += e.vectors.at(i, j) * e.vectors.at(i, p);
      EXPECT_NEAR(dot, j == p ? 1.0 : 0.0, 1e-12);
    }
  }
}

TEST(TruncatedSvdTest, RecoversAKnownSpectrumAndTailEnergy) {
  std::mt19937_64 rng(11);
  const int64_t rows = 12, cols = 9, n = 9;
  const std::vector<double> sigma = {9, 7, 5.5, 3, 2, 1, 0.5, 0.25, 0};
  Matrix u = RandomOrthonormal(rows, n, rng), v = RandomOrthonormal(cols, n, rng);
  Matrix m(rows, cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t k = 0; k < n; ++k) m.at(r, c) += u.at(r, k) * sigma[k] * v.at(c, k);
    }
  }
  const int64_t rank = 3;
  TruncatedSvdResult svd = TruncatedSvd(m, rank);
  ASSERT_EQ(svd.sigma.size(), static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) EXPECT_NEAR(svd.sigma[k], sigma[k], 1e-7) << k;
  // Rank-3 reconstruction M v v^T: its error is exactly the tail energy.
  Matrix approx(rows, cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t k = 0; k < rank; ++k) approx.at(r, c) += svd.mv.at(r, k) * svd.v.at(c, k);
    }
  }
  double tail = 0;
  for (int64_t k = rank; k < n; ++k) tail += sigma[k] * sigma[k];
  EXPECT_NEAR(DiffSq(m, approx), tail, 1e-9);
}

TEST(ProductAggregatorTest, MatchesPlainMeanOfProductsUpToReportedTailEnergy) {
  const uint32_t rank = 4;
  const double alpha = 8, s = alpha / rank;
  std::vector<common::TensorMap> updates;
  std::vector<double> weights = {10, 30, 7};
  for (uint64_t seed = 1; seed <= 3; ++seed) {
    updates.push_back(MakeLoraUpdate(rank, 2, 12, 10, seed));
  }
  ProductAggregator agg(s, rank);
  for (size_t i = 0; i < updates.size(); ++i) ASSERT_TRUE(agg.Add(updates[i], weights[i]).ok());
  auto result = agg.Finish();
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->adapter.size(), updates[0].size());
  double total = 0, discarded = 0;
  for (const auto& [name, t] : updates[0]) {
    EXPECT_EQ(result->adapter.at(name).shape, t.shape) << name;
  }
  for (const auto& [prefix, energy] : result->energy) {
    const Matrix ref = NaiveMeanOfProducts(updates, weights, s, prefix);
    const Matrix got = ProductOf(result->adapter, s, prefix);
    // Three rank-4 products summed have rank 10 > 4: something must be dropped,
    // and what is dropped is exactly the reported tail energy.
    EXPECT_NEAR(energy.total, FrobeniusSq(ref), 1e-9 * FrobeniusSq(ref));
    EXPECT_GT(energy.discarded, 0);
    EXPECT_NEAR(DiffSq(ref, got), energy.discarded, 1e-6 * energy.total) << prefix;
    // Eckart-Young: no worse than another rank-r candidate, s * mean(B) mean(A).
    double naive = 0;
    {
      common::TensorMap separate;
      for (const std::string suffix : {kLoraASuffix, kLoraBSuffix}) {
        common::HostTensor t = updates[0].at(prefix + suffix);
        for (size_t j = 0; j < t.data.size(); ++j) {
          double acc = 0;
          for (size_t i = 0; i < updates.size(); ++i) {
            acc += weights[i] * updates[i].at(prefix + suffix).data[j];
          }
          t.data[j] = static_cast<float>(acc / 47.0);
        }
        separate[prefix + suffix] = t;
      }
      naive = DiffSq(ref, ProductOf(separate, s, prefix));
    }
    EXPECT_LT(energy.discarded, naive);
    total += energy.total;
    discarded += energy.discarded;
  }
  EXPECT_EQ(result->energy.size(), 4u);  // 2 layers x q_proj, v_proj
  EXPECT_NEAR(result->discarded_energy_fraction, discarded / total, 1e-12);
  EXPECT_GT(result->discarded_energy_fraction, 0);
  EXPECT_LT(result->discarded_energy_fraction, 1);
}

TEST(ProductAggregatorTest, ExactWhenTheMeanHasRankAtMostR) {
  // One update: the mean of products is s B A itself (rank <= r): nothing dropped.
  const uint32_t rank = 3;
  const common::TensorMap u = MakeLoraUpdate(rank, 1, 9, 7, 5);
  ProductAggregator agg(2.0, rank);
  ASSERT_TRUE(agg.Add(u, 4).ok());
  auto result = agg.Finish();
  ASSERT_TRUE(result.ok());
  EXPECT_NEAR(result->discarded_energy_fraction, 0, 1e-12);
  for (const auto& [prefix, energy] : result->energy) {
    const Matrix ref = ProductOf(u, 2.0, prefix);
    EXPECT_LT(DiffSq(ref, ProductOf(result->adapter, 2.0, prefix)), 1e-10 * energy.total);
    // Balanced or floored split: every A row has norm >= the init's 1/sqrt(3).
    const common::HostTensor& a = result->adapter.at(prefix + kLoraASuffix);
    for (int64_t k = 0; k < a.shape[0]; ++k) {
      double norm = 0;
      for (int64_t i = 0; i < a.shape[1]; ++i) norm += double(a.data[k * a.shape[1] + i]) * a.data[k * a.shape[1] + i];
      EXPECT_GE(std::sqrt(norm), kMinARowNorm * (1 - 1e-6));
    }
  }
}

TEST(ProductAggregatorTest, ZeroBKeepsTrainableARowsAndReportsNoLoss) {
  common::TensorMap u = MakeLoraUpdate(2, 1, 6, 5, 3, 0.5f, {"q_proj"});
  for (float& x : u.at(std::string(kQ) + kLoraBSuffix).data) x = 0;  // B = 0 (fresh init)
  ProductAggregator agg(8.0, 2);
  ASSERT_TRUE(agg.Add(u, 1).ok());
  auto result = agg.Finish();
  ASSERT_TRUE(result.ok());
  EXPECT_EQ(result->discarded_energy_fraction, 0);
  for (float x : result->adapter.at(std::string(kQ) + kLoraBSuffix).data) EXPECT_EQ(x, 0);
  const common::HostTensor& a = result->adapter.at(std::string(kQ) + kLoraASuffix);
  for (int64_t k = 0; k < 2; ++k) {
    double norm = 0;
    for (int64_t i = 0; i < 6; ++i) norm += double(a.data[k * 6 + i]) * a.data[k * 6 + i];
    EXPECT_NEAR(std::sqrt(norm), kMinARowNorm, 1e-6);  // not a dead (zero) row
  }
}

TEST(ProductAggregatorTest, BadUpdatesAreRefusedAndChangeNothing) {
  const uint32_t rank = 2;
  const common::TensorMap good = MakeLoraUpdate(rank, 1, 6, 5, 1);
  ProductAggregator agg(1.0, rank);
  ASSERT_TRUE(agg.Add(good, 2).ok());

  common::TensorMap unpaired = good;
  unpaired.erase(std::string(kQ) + kLoraBSuffix);
  EXPECT_THAT(std::string(agg.Add(unpaired, 1).message()), HasSubstr("lora_A but no lora_B"));
  EXPECT_THAT(std::string(agg.Add(MakeLoraUpdate(3, 1, 6, 5, 2), 1).message()),
              HasSubstr("expected rank 2"));
  EXPECT_THAT(std::string(agg.Add(MakeLoraUpdate(rank, 1, 7, 5, 2), 1).message()),
              HasSubstr("expected B A of shape [5,6]"));
  EXPECT_THAT(std::string(agg.Add(MakeLoraUpdate(rank, 2, 6, 5, 2), 1).message()),
              HasSubstr("not in the first update"));
  common::TensorMap stray = good;
  stray["bias"] = common::HostTensor{{1}, {0.f}};
  EXPECT_THAT(std::string(agg.Add(stray, 1).message()), HasSubstr("tensor 'bias'"));
  EXPECT_EQ(agg.Add(good, 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(agg.Add(good, std::nan("")).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(agg.count(), 1u);
  EXPECT_EQ(agg.total_weight(), 2);

  ProductAggregator clean(1.0, rank);
  ASSERT_TRUE(clean.Add(good, 2).ok());
  auto x = agg.Finish(), y = clean.Finish();
  ASSERT_TRUE(x.ok() && y.ok());
  for (const auto& [name, t] : y->adapter) EXPECT_EQ(x->adapter.at(name).data, t.data) << name;
  EXPECT_EQ(ProductAggregator(1.0, 2).Finish().status().code(),
            absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace fedlora::coordinator
