#include "coordinator/fedbuff.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;
using testing::MakeLoraUpdate;

TEST(FedBuffTest, StalenessFactor) {
  EXPECT_DOUBLE_EQ(StalenessFactor(StalenessWeight::kConstant, 0.5, 7), 1.0);
  EXPECT_DOUBLE_EQ(StalenessFactor(StalenessWeight::kPolynomial, 0.5, 0), 1.0);
  EXPECT_DOUBLE_EQ(StalenessFactor(StalenessWeight::kPolynomial, 0.5, 3), 0.5);  // 1/sqrt(4)
  EXPECT_DOUBLE_EQ(StalenessFactor(StalenessWeight::kPolynomial, 1.0, 4), 0.2);
  EXPECT_DOUBLE_EQ(StalenessFactor(StalenessWeight::kPolynomial, 0.0, 9), 1.0);
  EXPECT_EQ(*ParseStalenessWeight("polynomial"), StalenessWeight::kPolynomial);
  EXPECT_EQ(*ParseStalenessWeight("constant"), StalenessWeight::kConstant);
  auto bad = ParseStalenessWeight("exp");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("'exp'"));
}

// x' = x + lr * sum w_i s(tau_i) (u_i - b_i) / sum w_i s(tau_i), computed with plain
// loops in double from the inputs (the reference).
TEST(FedBuffTest, MatchesAPlainReferenceWithMixedStaleness) {
  const common::TensorMap current = MakeLoraUpdate(4, 2, 8, 6, 100);
  const common::TensorMap base1 = MakeLoraUpdate(4, 2, 8, 6, 101);  // one version behind
  const common::TensorMap base3 = MakeLoraUpdate(4, 2, 8, 6, 103);  // three behind
  struct In {
    common::TensorMap u;
    const common::TensorMap* base;
    double w;
    uint64_t tau;
  };
  const std::vector<In> ins = {{MakeLoraUpdate(4, 2, 8, 6, 1), &current, 30, 0},
                               {MakeLoraUpdate(4, 2, 8, 6, 2), &base1, 10, 1},
                               {MakeLoraUpdate(4, 2, 8, 6, 3), &base3, 50, 3},
                               {MakeLoraUpdate(4, 2, 8, 6, 4), &base1, 20, 1}};
  for (double a : {0.5, 1.0}) {
    FedBuffOptions options;
    options.server_lr = 0.7;
    options.exponent = a;
    FedBuffAggregator agg(options, &current);
    for (size_t i = 0; i < ins.size(); ++i) {
      ASSERT_TRUE(
          agg.Add(ins[i].u, ins[i].base, ins[i].w, ins[i].tau, "a" + std::to_string(i)).ok());
    }
    auto got = agg.Finish();
    ASSERT_TRUE(got.ok()) << got.status();
    // The weights: w * (1 + tau)^-a.
    double total = 0;
    std::vector<double> ws;
    for (const In& in : ins) {
      ws.push_back(in.w / std::pow(1.0 + in.tau, a));
      total += ws.back();
    }
    EXPECT_NEAR(agg.total_weight(), total, 1e-9);
    EXPECT_NEAR(agg.total_weight(),
                30 + 10 / std::pow(2.0, a) + 50 / std::pow(4.0, a) + 20 / std::pow(2.0, a), 1e-9);
    ASSERT_EQ(got->size(), current.size());
    double max_err = 0, max_move = 0;
    for (const auto& [name, x] : current) {
      const common::HostTensor& y = got->at(name);
      ASSERT_EQ(y.shape, x.shape) << name;
      for (size_t k = 0; k < x.data.size(); ++k) {
        double num = 0;
        for (size_t i = 0; i < ins.size(); ++i) {
          num +=
              ws[i] * (double(ins[i].u.at(name).data[k]) - double(ins[i].base->at(name).data[k]));
        }
        const double want = double(x.data[k]) + 0.7 * num / total;
        max_err = std::max(max_err, std::abs(double(y.data[k]) - want));
        max_move = std::max(max_move, std::abs(want - double(x.data[k])));
      }
    }
    EXPECT_LT(max_err, 1e-6) << "a=" << a;
    EXPECT_GT(max_move, 0.05);  // the step is not trivially zero
  }
}

TEST(FedBuffTest, ConstantWeightIgnoresStalenessAndDiffersFromPolynomial) {
  const common::TensorMap current = MakeLoraUpdate(4, 1, 8, 8, 10);
  const common::TensorMap old_base = MakeLoraUpdate(4, 1, 8, 8, 11);
  const common::TensorMap fresh_u = MakeLoraUpdate(4, 1, 8, 8, 12);
  const common::TensorMap stale_u = MakeLoraUpdate(4, 1, 8, 8, 13);
  auto run = [&](StalenessWeight weight) {
    FedBuffOptions options;
    options.weight = weight;
    FedBuffAggregator agg(options, &current);
    EXPECT_TRUE(agg.Add(fresh_u, &current, 10, 0, "a").ok());
    EXPECT_TRUE(agg.Add(stale_u, &old_base, 10, 8, "b").ok());
    EXPECT_DOUBLE_EQ(agg.total_weight(),
                     weight == StalenessWeight::kConstant ? 20.0 : 10 + 10.0 / 3);
    return *agg.Finish();
  };
  const common::TensorMap constant = run(StalenessWeight::kConstant);
  const common::TensorMap poly = run(StalenessWeight::kPolynomial);
  const std::string name = constant.begin()->first;
  const auto& x = current.at(name).data;
  for (size_t k = 0; k < 4; ++k) {
    const double d_fresh = double(fresh_u.at(name).data[k]) - x[k];
    const double d_stale = double(stale_u.at(name).data[k]) - old_base.at(name).data[k];
    EXPECT_NEAR(constant.at(name).data[k], x[k] + (d_fresh + d_stale) / 2, 1e-6);
    EXPECT_NEAR(poly.at(name).data[k], x[k] + (d_fresh * 1.0 + d_stale / 3) / (1 + 1.0 / 3), 1e-6);
  }
}

TEST(FedBuffTest, FreshStartIsTheWeightedMeanOfTheUpdates) {
  FedBuffOptions options;
  options.server_lr = 0.1;  // does not apply without a current version
  FedBuffAggregator agg(options, nullptr);
  const common::TensorMap u1 = MakeLoraUpdate(4, 1, 8, 8, 1);
  const common::TensorMap u2 = MakeLoraUpdate(4, 1, 8, 8, 2);
  ASSERT_TRUE(agg.Add(u1, nullptr, 30, 0, "a").ok());
  ASSERT_TRUE(agg.Add(u2, nullptr, 10, 0, "b").ok());
  auto got = agg.Finish();
  ASSERT_TRUE(got.ok());
  const common::TensorMap want = testing::NaiveWeightedMean({u1, u2}, {30, 10});
  for (const auto& [name, t] : want) {
    for (size_t k = 0; k < t.data.size(); ++k) {
      EXPECT_NEAR(got->at(name).data[k], t.data[k], 1e-6) << name;
    }
  }
}

TEST(FedBuffTest, BadInputsAreRefusedAndChangeNothing) {
  const common::TensorMap current = MakeLoraUpdate(4, 1, 8, 8, 1);
  FedBuffAggregator agg(FedBuffOptions{}, &current);
  EXPECT_FALSE(agg.Finish().ok());  // empty buffer
  // A fresh-based update has no delta to a known version.
  absl::Status s = agg.Add(MakeLoraUpdate(4, 1, 8, 8, 2), nullptr, 1, 0, "a");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("agent 'a'"));
  // Other shapes (rank 2), in the update or in its base.
  s = agg.Add(MakeLoraUpdate(2, 1, 8, 8, 2), &current, 1, 0, "b");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("agent 'b'"));
  const common::TensorMap small_base = MakeLoraUpdate(2, 1, 8, 8, 3);
  s = agg.Add(MakeLoraUpdate(4, 1, 8, 8, 2), &small_base, 1, 0, "c");
  EXPECT_THAT(std::string(s.message()), HasSubstr("base version"));
  EXPECT_FALSE(agg.Add(MakeLoraUpdate(4, 1, 8, 8, 2), &current, 0, 0, "d").ok());  // weight 0
  EXPECT_EQ(agg.count(), 0u);
  EXPECT_EQ(agg.total_weight(), 0.0);
  // The aggregator still works after the refusals.
  ASSERT_TRUE(agg.Add(current, &current, 5, 2, "e").ok());
  auto got = agg.Finish();
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->at(current.begin()->first).data, current.begin()->second.data);  // zero delta
}

}  // namespace
}  // namespace fedlora::coordinator
