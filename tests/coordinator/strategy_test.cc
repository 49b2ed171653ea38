// Every aggregation strategy against a plain reference on random numbers, and the
// docs/aggregation.md example: mean(B) mean(A) != mean(B A) on concrete matrices,
// closed by FFA-LoRA and by product aggregation.
#include "coordinator/strategy.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "coordinator/aggregator.h"
#include "coordinator/lora_product.h"
#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;
using testing::MakeLoraUpdate;
using testing::NaiveWeightedMean;

constexpr char kQ[] = "base_model.model.model.layers.0.self_attn.q_proj";

absl::StatusOr<AggregationResult> Aggregate(const AggregationInput& input,
                                      const std::vector<common::TensorMap>& updates,
                                      const std::vector<double>& weights) {
  auto agg = RoundAggregator::Create(input);
  if (!agg.ok()) return agg.status();
  for (size_t i = 0; i < updates.size(); ++i) {
    absl::Status s = (*agg)->Add(updates[i], weights[i], "agent-" + std::to_string(i));
    if (!s.ok()) return s;
  }
  return (*agg)->Finish();
}

// Plain reference of Reddi et al. Algorithm 2 (one server step), in doubles.
struct RefState {
  std::map<std::string, std::vector<double>> m, v;
};
common::TensorMap RefAdaptiveStep(bool yogi, const StrategyParams& p, const common::TensorMap& x,
                                  const common::TensorMap& mean, RefState* st) {
  common::TensorMap out;
  for (const auto& [name, t] : mean) {
    auto& m = st->m[name];
    auto& v = st->v[name];
    if (m.empty()) {
      m.assign(t.data.size(), 0.0);
      v.assign(t.data.size(), p.tau * p.tau);
    }
    common::HostTensor y = t;
    for (size_t i = 0; i < t.data.size(); ++i) {
      const double delta = double(t.data[i]) - double(x.at(name).data[i]);
      m[i] = p.beta1 * m[i] + (1 - p.beta1) * delta;
      if (yogi) {
        const double sign = v[i] > delta * delta ? 1 : (v[i] < delta * delta ? -1 : 0);
        v[i] = v[i] - (1 - p.beta2) * delta * delta * sign;
      } else {
        v[i] = p.beta2 * v[i] + (1 - p.beta2) * delta * delta;
      }
      y.data[i] = static_cast<float>(x.at(name).data[i] + p.server_lr * m[i] / (std::sqrt(v[i]) + p.tau));
    }
    out[name] = y;
  }
  return out;
}

void ExpectNear(const common::TensorMap& got, const common::TensorMap& want, double tol) {
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [name, t] : want) {
    ASSERT_TRUE(got.count(name)) << name;
    ASSERT_EQ(got.at(name).shape, t.shape) << name;
    for (size_t i = 0; i < t.data.size(); ++i) {
      ASSERT_NEAR(got.at(name).data[i], t.data[i], tol) << name << "[" << i << "]";
    }
  }
}

TEST(StrategyTest, NamesRoundTripAndUnknownNamesAreListed) {
  for (Strategy s : {Strategy::kFedAvg, Strategy::kFedProx, Strategy::kFedAdam,
                     Strategy::kFedYogi, Strategy::kFfaLora, Strategy::kLoraProduct}) {
    auto back = ParseStrategy(StrategyName(s));
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(*back, s);
  }
  auto bad = ParseStrategy("fedsgd");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()),
              HasSubstr("'fedsgd'; expected one of fedavg, fedprox, fedadam, fedyogi, ffa-lora, "
                        "lora-product"));
}

TEST(StrategyTest, ParamsAreValidated) {
  EXPECT_TRUE(ValidateStrategyParams(StrategyParams{}).ok());
  StrategyParams p;
  p.beta2 = 1.0;
  EXPECT_THAT(std::string(ValidateStrategyParams(p).message()), HasSubstr("aggregation.beta2"));
  p = {};
  p.tau = 0;
  EXPECT_THAT(std::string(ValidateStrategyParams(p).message()), HasSubstr("aggregation.tau"));
  p = {};
  p.prox_mu = -1;
  EXPECT_THAT(std::string(ValidateStrategyParams(p).message()), HasSubstr("aggregation.prox_mu"));
  p = {};
  p.server_lr = std::nan("");
  EXPECT_FALSE(ValidateStrategyParams(p).ok());
  AggregationInput in;
  in.params = p;
  EXPECT_FALSE(RoundAggregator::Create(in).ok());
}

TEST(StrategyTest, FedAvgAndFedProxAreTheStreamingWeightedMeanBitForBit) {
  std::vector<common::TensorMap> updates;
  for (uint64_t seed = 1; seed <= 3; ++seed) updates.push_back(MakeLoraUpdate(4, 2, 8, 6, seed));
  const std::vector<double> weights = {10, 25, 3};
  FedAvgAggregator plain;
  for (size_t i = 0; i < updates.size(); ++i) ASSERT_TRUE(plain.Add(updates[i], weights[i]).ok());
  const common::TensorMap want = *plain.Finish();
  ExpectNear(want, NaiveWeightedMean(updates, weights), 1e-6);
  for (Strategy s : {Strategy::kFedAvg, Strategy::kFedProx}) {
    AggregationInput in;
    in.params.strategy = s;
    auto got = Aggregate(in, updates, weights);
    ASSERT_TRUE(got.ok()) << got.status();
    for (const auto& [name, t] : want) EXPECT_EQ(got->adapter.at(name).data, t.data) << name;
    EXPECT_FALSE(got->discarded_energy.has_value());
    EXPECT_FALSE(got->server_state.has_value());
  }
}

class AdaptiveTest : public ::testing::TestWithParam<Strategy> {};

TEST_P(AdaptiveTest, ThreeServerStepsMatchThePlainReference) {
  const bool yogi = GetParam() == Strategy::kFedYogi;
  StrategyParams p;
  p.strategy = GetParam();
  p.server_lr = 0.05;
  common::TensorMap global = MakeLoraUpdate(4, 1, 8, 6, 99);
  ServerOptimizerState state;  // fresh
  RefState ref;
  common::TensorMap ref_global = global;
  for (int round = 0; round < 3; ++round) {
    std::vector<common::TensorMap> updates;
    std::vector<double> weights = {5.0 + round, 12, 1};
    for (uint64_t seed = 1; seed <= 3; ++seed) {
      updates.push_back(MakeLoraUpdate(4, 1, 8, 6, 10 * round + seed, 0.3f));
    }
    AggregationInput in;
    in.params = p;
    in.global = &global;
    in.state = round == 0 ? nullptr : &state;
    auto got = Aggregate(in, updates, weights);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_TRUE(got->server_state.has_value());
    EXPECT_EQ(got->server_state->steps, static_cast<uint64_t>(round + 1));
    ref_global = RefAdaptiveStep(yogi, p, ref_global, NaiveWeightedMean(updates, weights), &ref);
    ExpectNear(got->adapter, ref_global, 1e-5);
    for (const auto& [name, m] : ref.m) {
      for (size_t i = 0; i < m.size(); ++i) {
        ASSERT_NEAR(got->server_state->m.at(name).data[i], m[i], 1e-6);
        ASSERT_NEAR(got->server_state->v.at(name).data[i], ref.v.at(name)[i],
                    1e-6 * std::max(1.0, ref.v.at(name)[i]));
      }
    }
    // The moments survive a round trip through their stored form exactly.
    auto back = DecodeServerState(EncodeServerState(*got->server_state, p.strategy), "state");
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->steps, got->server_state->steps);
    for (const auto& [name, t] : got->server_state->v) EXPECT_EQ(back->v.at(name).data, t.data);
    for (const auto& [name, t] : got->server_state->m) EXPECT_EQ(back->m.at(name).data, t.data);
    state = *back;
    global = got->adapter;
  }
}

TEST_P(AdaptiveTest, FreshRoundPublishesTheMeanAndRefusesMismatchedShapes) {
  StrategyParams p;
  p.strategy = GetParam();
  std::vector<common::TensorMap> updates = {MakeLoraUpdate(4, 1, 8, 6, 1),
                                            MakeLoraUpdate(4, 1, 8, 6, 2)};
  AggregationInput in;
  in.params = p;
  auto got = Aggregate(in, updates, {1, 3});
  ASSERT_TRUE(got.ok());
  ExpectNear(got->adapter, NaiveWeightedMean(updates, {1, 3}), 1e-6);
  ASSERT_TRUE(got->server_state.has_value());
  EXPECT_EQ(got->server_state->steps, 0u);
  EXPECT_TRUE(got->server_state->m.empty());

  const common::TensorMap global = MakeLoraUpdate(4, 1, 9, 6, 3);
  in.global = &global;
  auto agg = *RoundAggregator::Create(in);
  EXPECT_THAT(std::string(agg->Add(updates[0], 1, "x").message()),
              HasSubstr("agent 'x': tensor"));
}

INSTANTIATE_TEST_SUITE_P(Strategies, AdaptiveTest,
                         ::testing::Values(Strategy::kFedAdam, Strategy::kFedYogi));

TEST(StrategyTest, ServerStateDecodeRefusesOtherBlobs) {
  EXPECT_FALSE(DecodeServerState("garbage", "s").ok());
  EXPECT_THAT(std::string(DecodeServerState(common::SerializeSafetensors(MakeLoraUpdate(2, 1, 3, 3, 1)),
                                            "blob x")
                              .status()
                              .message()),
              HasSubstr("blob x: expected metadata fedlora.server_state"));
  common::TensorMap bad = {{"w", common::HostTensor{{1}, {1.f}}}};
  EXPECT_THAT(std::string(DecodeServerState(common::SerializeSafetensors(
                                                bad, {{"fedlora.server_state", "v1"},
                                                      {"fedlora.steps", "1"}}),
                                            "s")
                              .status()
                              .message()),
              HasSubstr("neither m/<name> nor v/<name>"));
}

// Client updates that share the version's A and differ in B (what FFA-LoRA agents send).
std::vector<common::TensorMap> FfaUpdates(const common::TensorMap& global, int n) {
  std::vector<common::TensorMap> out;
  for (int i = 0; i < n; ++i) {
    common::TensorMap u = MakeLoraUpdate(4, 2, 8, 6, 50 + i);
    for (auto& [name, t] : u) {
      if (name.find(".lora_A.") != std::string::npos) t = global.at(name);
    }
    out.push_back(std::move(u));
  }
  return out;
}

TEST(FfaLoraTest, AveragesBKeepsAAndEqualsTheMeanOfProducts) {
  const common::TensorMap global = MakeLoraUpdate(4, 2, 8, 6, 7);
  const std::vector<common::TensorMap> updates = FfaUpdates(global, 3);
  const std::vector<double> weights = {3, 9, 4};
  AggregationInput in;
  in.params.strategy = Strategy::kFfaLora;
  in.lora_rank = 4;
  in.lora_alpha = 8;
  in.global = &global;
  auto got = Aggregate(in, updates, weights);
  ASSERT_TRUE(got.ok()) << got.status();
  const common::TensorMap mean = NaiveWeightedMean(updates, weights);
  for (const auto& [name, t] : global) {
    if (name.find(".lora_A.") != std::string::npos) {
      EXPECT_EQ(got->adapter.at(name).data, t.data) << name;  // bit for bit
    } else {
      for (size_t i = 0; i < t.data.size(); ++i) {
        ASSERT_NEAR(got->adapter.at(name).data[i], mean.at(name).data[i], 1e-6);
      }
    }
  }
  // mean_i(s B_i A) == s mean(B) A: the product of the aggregate is the mean update.
  auto products = AdapterProducts(got->adapter, 2.0);
  ASSERT_TRUE(products.ok());
  for (const auto& [prefix, p] : *products) {
    Matrix want(p.rows, p.cols);
    for (size_t i = 0; i < updates.size(); ++i) {
      const Matrix pi = (*AdapterProducts(updates[i], 2.0)).at(prefix);
      for (size_t k = 0; k < want.data.size(); ++k) want.data[k] += weights[i] * pi.data[k] / 16.0;
    }
    for (size_t k = 0; k < want.data.size(); ++k) ASSERT_NEAR(p.data[k], want.data[k], 1e-5);
  }
}

TEST(FfaLoraTest, RefusesAnUpdateWhoseAMoved) {
  const common::TensorMap global = MakeLoraUpdate(4, 2, 8, 6, 7);
  std::vector<common::TensorMap> updates = FfaUpdates(global, 2);
  updates[1].at(std::string(kQ) + ".lora_A.weight").data[5] += 1e-3f;
  AggregationInput in;
  in.params.strategy = Strategy::kFfaLora;
  in.global = &global;
  auto agg = *RoundAggregator::Create(in);
  ASSERT_TRUE(agg->Add(updates[0], 2, "hospital-a").ok());
  absl::Status s = agg->Add(updates[1], 2, "hospital-b");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("FFA-LoRA: agent 'hospital-b' changed the frozen tensor '" +
                        std::string(kQ) + ".lora_A.weight' (first difference at flat index 5"));
  auto result = agg->Finish();  // the refused update left nothing behind
  ASSERT_TRUE(result.ok());
  for (const auto& [name, t] : updates[0]) EXPECT_EQ(result->adapter.at(name).data, t.data);
}

TEST(FfaLoraTest, FreshRoundTakesTheFirstUpdatesAAsTheFleetsA) {
  const common::TensorMap init = MakeLoraUpdate(4, 2, 8, 6, 1);
  std::vector<common::TensorMap> updates = FfaUpdates(init, 2);
  AggregationInput in;
  in.params.strategy = Strategy::kFfaLora;
  auto agg = *RoundAggregator::Create(in);
  ASSERT_TRUE(agg->Add(updates[0], 1, "a").ok());
  ASSERT_TRUE(agg->Add(updates[1], 1, "b").ok());
  EXPECT_EQ(agg->Add(MakeLoraUpdate(4, 2, 8, 6, 2), 1, "c").code(),
            absl::StatusCode::kFailedPrecondition);
  auto result = agg->Finish();
  ASSERT_TRUE(result.ok());
  for (const auto& [name, t] : init) {
    if (name.find(".lora_A.") != std::string::npos) {
      EXPECT_EQ(result->adapter.at(name).data, t.data) << name;
    }
  }
}

TEST(LoraProductStrategyTest, ReportsDiscardedEnergyOfTheProductAggregator) {
  std::vector<common::TensorMap> updates;
  for (uint64_t seed = 1; seed <= 3; ++seed) updates.push_back(MakeLoraUpdate(2, 1, 6, 5, seed));
  AggregationInput in;
  in.params.strategy = Strategy::kLoraProduct;
  in.lora_rank = 2;
  in.lora_alpha = 4;
  auto got = Aggregate(in, updates, {1, 2, 3});
  ASSERT_TRUE(got.ok()) << got.status();
  ProductAggregator plain(2.0, 2);
  for (size_t i = 0; i < 3; ++i) ASSERT_TRUE(plain.Add(updates[i], double(i + 1)).ok());
  auto want = plain.Finish();
  ASSERT_TRUE(got->discarded_energy.has_value());
  EXPECT_EQ(*got->discarded_energy, want->discarded_energy_fraction);
  EXPECT_GT(*got->discarded_energy, 0);
  for (const auto& [name, t] : want->adapter) EXPECT_EQ(got->adapter.at(name).data, t.data);
  in.lora_rank = 0;
  EXPECT_FALSE(RoundAggregator::Create(in).ok());
}

// docs/aggregation.md, "Why not average A and B": two clients, r = 2, alpha = 2 (s = 1).
TEST(AggregationGapTest, SeparateAveragingIsNotTheMeanUpdateOnConcreteMatrices) {
  auto adapter = [](std::vector<float> a, std::vector<float> b) {
    return common::TensorMap{{std::string(kQ) + ".lora_A.weight", common::HostTensor{{2, 2}, a}},
                             {std::string(kQ) + ".lora_B.weight", common::HostTensor{{2, 2}, b}}};
  };
  // B1 A1 = [[1,2],[1,3]], B2 A2 = [[1,2],[1,0]]: mean(B A) = [[1,2],[1,1.5]].
  const common::TensorMap c1 = adapter({1, 2, 0, 1}, {1, 0, 1, 1});
  const common::TensorMap c2 = adapter({0, 1, 1, 0}, {2, 1, 0, 1});
  const std::vector<double> w = {1, 1};
  auto mean_of_products = [&](const std::vector<common::TensorMap>& cs) {
    Matrix m(2, 2);
    for (const auto& c : cs) {
      const Matrix p = AdapterProducts(c, 1.0)->at(kQ);
      for (size_t k = 0; k < 4; ++k) m.data[k] += p.data[k] / cs.size();
    }
    return m;
  };
  const Matrix truth = mean_of_products({c1, c2});
  EXPECT_EQ(truth.data, (std::vector<double>{1, 2, 1, 1.5}));

  // FedAvg: mean(B) = [[1.5,.5],[.5,1]], mean(A) = [[.5,1.5],[.5,.5]];
  // mean(B) mean(A) = [[1,2.5],[.75,1.25]]: off by [[0,.5],[-.25,-.25]].
  AggregationInput in;
  in.lora_rank = 2;
  in.lora_alpha = 2;
  auto avg = Aggregate(in, {c1, c2}, w);
  ASSERT_TRUE(avg.ok());
  const Matrix separate = AdapterProducts(avg->adapter, 1.0)->at(kQ);
  EXPECT_EQ(separate.data, (std::vector<double>{1, 2.5, 0.75, 1.25}));
  double gap = 0;
  for (size_t k = 0; k < 4; ++k) gap += std::pow(separate.data[k] - truth.data[k], 2);
  EXPECT_DOUBLE_EQ(gap, 0.375);  // ||mean(B)mean(A) - mean(BA)||_F^2 != 0

  // Product aggregation: rank(mean(BA)) <= r, so it is exact.
  in.params.strategy = Strategy::kLoraProduct;
  auto product = Aggregate(in, {c1, c2}, w);
  ASSERT_TRUE(product.ok());
  const Matrix p = AdapterProducts(product->adapter, 1.0)->at(kQ);
  for (size_t k = 0; k < 4; ++k) EXPECT_NEAR(p.data[k], truth.data[k], 1e-6);
  EXPECT_NEAR(*product->discarded_energy, 0, 1e-12);

  // FFA-LoRA: both clients keep A1 frozen; mean(B) A1 == mean(B A1) exactly.
  const common::TensorMap f1 = adapter({1, 2, 0, 1}, {1, 0, 1, 1});
  const common::TensorMap f2 = adapter({1, 2, 0, 1}, {2, 1, 0, 1});
  in.params.strategy = Strategy::kFfaLora;
  auto ffa = Aggregate(in, {f1, f2}, w);
  ASSERT_TRUE(ffa.ok());
  EXPECT_EQ(AdapterProducts(ffa->adapter, 1.0)->at(kQ).data, mean_of_products({f1, f2}).data);
}

}  // namespace
}  // namespace fedlora::coordinator
