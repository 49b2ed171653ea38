#include "coordinator/aggregator.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;
using testing::MakeLoraUpdate;
using testing::NaiveWeightedMean;

TEST(FedAvgAggregatorTest, MatchesNaiveWeightedMean) {
  std::vector<common::TensorMap> updates;
  std::vector<double> weights = {10, 30, 1, 250};
  for (size_t i = 0; i < weights.size(); ++i) {
    updates.push_back(MakeLoraUpdate(4, 2, 24, 40, 100 + i));
  }
  FedAvgAggregator agg;
  for (size_t i = 0; i < updates.size(); ++i) ASSERT_TRUE(agg.Add(updates[i], weights[i]).ok());
  EXPECT_EQ(agg.count(), 4u);
  EXPECT_DOUBLE_EQ(agg.total_weight(), 291);
  auto mean = agg.Finish();
  ASSERT_TRUE(mean.ok()) << mean.status();
  common::TensorMap ref = NaiveWeightedMean(updates, weights);
  ASSERT_EQ(mean->size(), ref.size());
  for (const auto& [name, t] : ref) {
    const common::HostTensor& got = mean->at(name);
    ASSERT_EQ(got.shape, t.shape) << name;
    for (size_t i = 0; i < t.data.size(); ++i) {
      ASSERT_NEAR(got.data[i], t.data[i], 1e-6) << name << "[" << i << "]";
    }
  }
}

TEST(FedAvgAggregatorTest, WeightsMatter) {
  common::TensorMap a = MakeLoraUpdate(2, 1, 4, 4, 1);
  common::TensorMap b = a;
  for (auto& [name, t] : b) {
    for (float& v : t.data) v += 1.0f;
  }
  FedAvgAggregator agg;
  ASSERT_TRUE(agg.Add(a, 1).ok());
  ASSERT_TRUE(agg.Add(b, 3).ok());
  auto mean = agg.Finish();
  ASSERT_TRUE(mean.ok());
  for (const auto& [name, t] : a) {
    for (size_t i = 0; i < t.data.size(); ++i) {
      EXPECT_NEAR(mean->at(name).data[i], t.data[i] + 0.75f, 1e-6);
    }
  }
}

TEST(FedAvgAggregatorTest, RejectsMismatchAndLeavesSumsUnchanged) {
  common::TensorMap a = MakeLoraUpdate(2, 1, 4, 4, 1);
  FedAvgAggregator agg;
  ASSERT_TRUE(agg.Add(a, 2).ok());
  common::TensorMap wrong_shape = MakeLoraUpdate(2, 1, 5, 4, 2);
  EXPECT_THAT(std::string(agg.Add(wrong_shape, 1).message()), HasSubstr("expected shape"));
  common::TensorMap extra = a;
  extra["extra.lora_A.weight"] = a.begin()->second;
  EXPECT_FALSE(agg.Add(extra, 1).ok());
  common::TensorMap missing = a;
  missing.erase(missing.begin());
  EXPECT_FALSE(agg.Add(missing, 1).ok());
  EXPECT_FALSE(agg.Add(a, 0).ok());
  EXPECT_FALSE(agg.Add(a, std::nan("")).ok());
  EXPECT_EQ(agg.count(), 1u);
  auto mean = agg.Finish();
  ASSERT_TRUE(mean.ok());
  for (const auto& [name, t] : a) {
    for (size_t i = 0; i < t.data.size(); ++i) EXPECT_FLOAT_EQ(mean->at(name).data[i], t.data[i]);
  }
}

TEST(FedAvgAggregatorTest, EmptyFinishFails) {
  FedAvgAggregator agg;
  EXPECT_EQ(agg.Finish().status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_FALSE(agg.Add(common::TensorMap{}, 1).ok());
}

}  // namespace
}  // namespace fedlora::coordinator
