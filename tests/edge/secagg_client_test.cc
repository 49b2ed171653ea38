// SecAggClientRound (edge-agent/secagg_client.h) against the protocol library's
// Server: what the agents encode is their adapter (or, with DP, base + clipped
// update), the unmasked sum decodes to its mean, and bad setups are refused.

#include "edge-agent/secagg_client.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "common/secagg/fixed_point.h"
#include "common/secagg/messages.h"
#include "common/secagg/protocol.h"

namespace fedlora::edge {
namespace {

namespace sa = common::secagg;
using ::testing::HasSubstr;

common::TensorMap Adapter(float base, float step) {
  common::TensorMap m;
  m["x.lora_A.weight"] = common::HostTensor{{2, 3}, {}};
  m["x.lora_B.weight"] = common::HostTensor{{3, 2}, {}};
  float v = base;
  for (auto& [name, t] : m) {
    for (int i = 0; i < 6; ++i) t.data.push_back(v += step);
  }
  return m;
}

v1::RoundTask Task(double dp_clip = 0) {
  v1::RoundTask task;
  task.set_round_id(4);
  task.mutable_secagg()->set_enabled(true);
  task.mutable_secagg()->set_dp_clip_norm(dp_clip);
  task.mutable_secagg()->set_dp_noise_multiplier(0);  // clipping only: deterministic
  return task;
}

// The setup a coordinator would send to party `id` of `n`.
v1::SecAggSetup MakeSetup(uint32_t id, int n, const std::string& seed) {
  v1::SecAggSetup s;
  s.set_round_id(4);
  s.set_party_id(id);
  for (int i = 1; i <= n; ++i) s.add_cohort(i);
  s.set_round_seed(seed);
  s.set_vector_length(12);
  s.set_clip_range(1.0);
  auto codec = sa::FixedPointCodec::Create({1.0, 0.0, n});
  s.set_scale(codec->scale());
  s.set_max_agents(n);
  for (const char* name : {"x.lora_A.weight", "x.lora_B.weight"}) {
    v1::TensorShape* t = s.add_layout();
    t->set_name(name);
    t->add_dims(std::string(name) == "x.lora_A.weight" ? 2 : 3);
    t->add_dims(std::string(name) == "x.lora_A.weight" ? 3 : 2);
  }
  s.set_noise_shares(n);
  return s;
}

// Runs n agents through the protocol against a Server; returns the decoded mean.
std::vector<float> RunRound(std::vector<std::unique_ptr<SecAggClientRound>>& agents) {
  const int n = static_cast<int>(agents.size());
  const std::string seed(32, 's');
  sa::SecAggConfig config;
  config.round_id = 4;
  config.round_seed = seed;
  for (int i = 1; i <= n; ++i) config.cohort.push_back(i);
  config.vector_length = 12;
  auto server = sa::Server::Create(config);
  EXPECT_TRUE(server.ok());
  for (int i = 0; i < n; ++i) {
    auto adv = agents[i]->OnSetup(MakeSetup(i + 1, n, seed));
    EXPECT_TRUE(adv.ok()) << adv.status();
    EXPECT_TRUE(server->HandleAdvertiseKeys(adv->secagg().data()).ok());
  }
  EXPECT_TRUE(server->CloseAdvertiseKeys().ok());
  auto deliver = [&](uint32_t id, std::string bytes) {
    v1::SecAggMessage m;
    m.set_round_id(4);
    m.set_data(std::move(bytes));
    auto out = agents[id - 1]->OnMessage(m);
    EXPECT_TRUE(out.ok()) << out.status();
    return *out;
  };
  for (int i = 1; i <= n; ++i) {
    auto out = deliver(i, *server->KeyDirectoryFor(i));
    EXPECT_TRUE(server->HandleShareKeys(out.message->secagg().data()).ok());
  }
  EXPECT_TRUE(server->CloseShareKeys().ok());
  for (int i = 1; i <= n; ++i) {
    auto out = deliver(i, *server->ShareDeliveryFor(i));
    EXPECT_FALSE(out.message.has_value());
    EXPECT_TRUE(server->HandleMaskedInput(out.masked_input).ok());
  }
  EXPECT_TRUE(server->CloseMaskedInput().ok());
  for (int i = 1; i <= n; ++i) {
    auto out = deliver(i, *server->UnmaskRequestFor(i));
    EXPECT_TRUE(server->HandleUnmaskResponse(out.message->secagg().data()).ok());
  }
  auto result = server->Finalize();
  EXPECT_TRUE(result.ok()) << result.status();
  auto codec = sa::FixedPointCodec::Create({1.0, 0.0, n});
  auto sum = codec->DecodeSum(result->sum, n);
  std::vector<float> mean = *sum;
  for (float& v : mean) v /= static_cast<float>(n);
  return mean;
}

TEST(SecAggClientTest, SumOfAdaptersDecodesToTheirMean) {
  std::vector<std::unique_ptr<SecAggClientRound>> agents;
  std::vector<common::TensorMap> afters;
  for (int i = 0; i < 3; ++i) {
    afters.push_back(Adapter(0.01f * i, 0.02f * (i + 1)));
    auto a = SecAggClientRound::Create(Task(), Adapter(0, 0.01f), afters.back(), 10, {});
    ASSERT_TRUE(a.ok()) << a.status();
    EXPECT_EQ((*a)->Ready().secagg_ready().layout_size(), 2);
    agents.push_back(std::move(*a));
  }
  std::vector<float> mean = RunRound(agents);
  ASSERT_EQ(mean.size(), 12u);
  size_t k = 0;
  for (const auto& [name, t] : afters[0]) {
    for (size_t i = 0; i < t.data.size(); ++i, ++k) {
      const float want = (afters[0].at(name).data[i] + afters[1].at(name).data[i] +
                          afters[2].at(name).data[i]) / 3.0f;
      EXPECT_NEAR(mean[k], want, 1e-6) << name << i;
    }
  }
}

TEST(SecAggClientTest, DpClipsTheUpdateNotTheAdapter) {
  // Every agent moves far from the shared base; C = 0.1 bounds each move.
  const common::TensorMap base = Adapter(0.1f, 0.01f);
  std::vector<std::unique_ptr<SecAggClientRound>> agents;
  for (int i = 0; i < 3; ++i) {
    common::TensorMap after = base;
    for (auto& [name, t] : after) {
      for (float& v : t.data) v += 0.5f;  // update norm sqrt(12) * 0.5 = 1.73
    }
    auto a = SecAggClientRound::Create(Task(/*dp_clip=*/0.1), base, after, 10, {}, /*seed=*/9);
    ASSERT_TRUE(a.ok());
    agents.push_back(std::move(*a));
  }
  std::vector<float> mean = RunRound(agents);
  double norm = 0;
  size_t k = 0;
  for (const auto& [name, t] : base) {
    for (float b : t.data) {
      const double d = mean[k++] - b;
      EXPECT_GT(d, 0);  // the direction is kept
      norm += d * d;
    }
  }
  EXPECT_NEAR(std::sqrt(norm), 0.1, 1e-4);  // the mean of three clipped identical updates
  EXPECT_NEAR(agents[0]->pre_clip_norm(), std::sqrt(12.0) * 0.5, 1e-4);
}

TEST(SecAggClientTest, RefusesBadSetupsAndMessages) {
  auto a = SecAggClientRound::Create(Task(), Adapter(0, 0.01f), Adapter(0, 0.02f), 10, {});
  ASSERT_TRUE(a.ok());
  v1::SecAggMessage early;
  early.set_round_id(4);
  EXPECT_EQ((*a)->OnMessage(early).status().code(), absl::StatusCode::kFailedPrecondition);
  const std::string seed(32, 's');
  v1::SecAggSetup other_round = MakeSetup(1, 3, seed);
  other_round.set_round_id(5);
  EXPECT_THAT((*a)->OnSetup(other_round).status().message(), HasSubstr("round 5"));
  v1::SecAggSetup bad_shape = MakeSetup(1, 3, seed);
  bad_shape.mutable_layout(1)->set_dims(0, 4);
  EXPECT_THAT((*a)->OnSetup(bad_shape).status().message(), HasSubstr("x.lora_B.weight"));
  v1::SecAggSetup bad_length = MakeSetup(1, 3, seed);
  bad_length.set_vector_length(13);
  EXPECT_THAT((*a)->OnSetup(bad_length).status().message(), HasSubstr("vector_length"));
  ASSERT_TRUE((*a)->OnSetup(MakeSetup(1, 3, seed)).ok());
  EXPECT_EQ((*a)->OnSetup(MakeSetup(1, 3, seed)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  v1::SecAggMessage junk;
  junk.set_round_id(4);
  junk.set_data("not a secagg message");
  EXPECT_FALSE((*a)->OnMessage(junk).ok());
  // Adapters that disagree in shape are refused up front.
  common::TensorMap wrong = Adapter(0, 0.02f);
  wrong["x.lora_B.weight"].shape = {2, 3};
  EXPECT_FALSE(SecAggClientRound::Create(Task(), Adapter(0, 0.01f), wrong, 10, {}).ok());
  v1::RoundTask off = Task();
  off.mutable_secagg()->set_enabled(false);
  EXPECT_FALSE(SecAggClientRound::Create(off, Adapter(0, 0.01f), Adapter(0, 0.02f), 10, {}).ok());
}

}  // namespace
}  // namespace fedlora::edge
