// SecAggRound (coordinator/secagg_round.h) driven by real common::secagg::Client
// parties: the unmasked mean equals the plaintext mean of exactly the agents
// whose masked input arrived, with and without dropouts; messages naming the
// wrong party, of the wrong phase, or repeated are refused without effect.

#include "coordinator/secagg_round.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>

#include "common/secagg/messages.h"
#include "common/secagg/protocol.h"
#include "common/status/status.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;
namespace sa = common::secagg;

const ShapeMap kLayout = {{"a.lora_A.weight", {2, 5}}, {"a.lora_B.weight", {3, 2}}};

std::vector<float> RandomVector(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

// The agents' side, straight on the protocol library (as edge-agent does).
struct Party {
  std::string agent;
  std::optional<sa::Client> client;
  std::vector<float> input;
};

class SecAggRoundTest : public ::testing::Test {
 protected:
  void Make(int n, SecAggRoundOptions options = {}) {
    std::vector<std::string> cohort;
    for (int i = 0; i < n; ++i) cohort.push_back("site-" + std::to_string(i));
    auto round = SecAggRound::Create(7, cohort, kLayout, options);
    ASSERT_TRUE(round.ok()) << round.status();
    round_ = std::move(*round);
    for (int i = 0; i < n; ++i) {
      Party p;
      p.agent = cohort[i];
      p.input = RandomVector(16, 100 + i);
      const v1::SecAggSetup setup = round_->SetupFor(p.agent).secagg_setup();
      EXPECT_EQ(setup.party_id(), static_cast<uint32_t>(i + 1));
      EXPECT_EQ(setup.vector_length(), 16u);
      sa::SecAggConfig c;
      c.round_id = setup.round_id();
      c.round_seed = setup.round_seed();
      c.cohort.assign(setup.cohort().begin(), setup.cohort().end());
      c.neighbours = static_cast<int>(setup.neighbours());
      c.threshold = static_cast<int>(setup.threshold());
      c.vector_length = setup.vector_length();
      auto client = sa::Client::Create(c, setup.party_id());
      ASSERT_TRUE(client.ok()) << client.status();
      p.client.emplace(std::move(*client));
      parties_.push_back(std::move(p));
    }
  }

  // Delivers the messages of a closed phase to the parties in `alive`.
  std::map<std::string, std::string> Inbox(
      const std::vector<std::pair<std::string, v1::CoordinatorMessage>>& messages) {
    std::map<std::string, std::string> inbox;
    for (const auto& [agent, m] : messages) inbox[agent] = m.secagg().data();
    return inbox;
  }

  // Runs the whole protocol; agents in drop_at[phase] stop answering from that
  // phase on (0 advertise, 1 share, 2 masked input, 3 unmask).
  absl::StatusOr<SecAggRound::Result> Run(const std::map<int, std::set<std::string>>& drop_at) {
    std::set<std::string> gone;
    auto drop = [&](int phase) {
      auto it = drop_at.find(phase);
      if (it != drop_at.end()) gone.insert(it->second.begin(), it->second.end());
    };
    drop(0);
    for (Party& p : parties_) {
      if (gone.count(p.agent)) continue;
      auto adv = p.client->AdvertiseKeys();
      EXPECT_TRUE(adv.ok());
      EXPECT_TRUE(round_->Handle(p.agent, *adv).ok());
    }
    EXPECT_TRUE(round_->PhaseComplete() || !gone.empty());
    ASSIGN_OR_RETURN(auto dirs, round_->ClosePhase());
    auto inbox = Inbox(dirs);
    drop(1);
    for (Party& p : parties_) {
      if (gone.count(p.agent)) continue;
      ASSIGN_OR_RETURN(std::string shares, p.client->ShareKeys(inbox.at(p.agent)));
      RETURN_IF_ERROR(round_->Handle(p.agent, shares));
    }
    ASSIGN_OR_RETURN(auto deliveries, round_->ClosePhase());
    inbox = Inbox(deliveries);
    drop(2);
    auto codec = round_->codec();
    for (Party& p : parties_) {
      if (gone.count(p.agent)) continue;
      ASSIGN_OR_RETURN(auto encoded, codec.Encode(p.input));
      ASSIGN_OR_RETURN(std::string masked, p.client->MaskedInput(inbox.at(p.agent), encoded));
      EXPECT_EQ(masked.size(), round_->masked_input_bytes());
      RETURN_IF_ERROR(round_->HandleMaskedInput(p.agent, masked));
    }
    ASSIGN_OR_RETURN(auto requests, round_->ClosePhase());
    inbox = Inbox(requests);
    drop(3);
    for (Party& p : parties_) {
      if (gone.count(p.agent) || !inbox.count(p.agent)) continue;
      ASSIGN_OR_RETURN(std::string response, p.client->Unmask(inbox.at(p.agent)));
      RETURN_IF_ERROR(round_->Handle(p.agent, response));
    }
    ASSIGN_OR_RETURN(auto none, round_->ClosePhase());
    EXPECT_TRUE(none.empty());
    return round_->Finalize();
  }

  // Plain mean of the given agents' inputs, split by the layout.
  void ExpectMeanOf(const SecAggRound::Result& result, const std::set<std::string>& agents) {
    std::vector<double> mean(16, 0.0);
    for (const Party& p : parties_) {
      if (!agents.count(p.agent)) continue;
      for (size_t i = 0; i < 16; ++i) mean[i] += p.input[i];
    }
    for (double& m : mean) m /= static_cast<double>(agents.size());
    EXPECT_EQ(std::set<std::string>(result.contributors.begin(), result.contributors.end()),
              agents);
    // Fixed-point resolution plus fp32 rounding of the decoded values.
    const double tolerance = 1.0 / round_->codec().scale() + 1e-7;
    size_t offset = 0;
    for (const auto& [name, dims] : kLayout) {
      const common::HostTensor& t = result.mean.at(name);
      EXPECT_EQ(t.shape, dims);
      for (size_t i = 0; i < t.data.size(); ++i) {
        EXPECT_NEAR(t.data[i], mean[offset + i], tolerance) << name << "[" << i << "]";
      }
      offset += t.data.size();
    }
  }

  std::unique_ptr<SecAggRound> round_;
  std::vector<Party> parties_;
};

TEST_F(SecAggRoundTest, MeanEqualsPlaintextMeanWithoutDropouts) {
  Make(4);
  auto result = Run({});
  ASSERT_TRUE(result.ok()) << result.status();
  ExpectMeanOf(*result, {"site-0", "site-1", "site-2", "site-3"});
}

TEST_F(SecAggRoundTest, DropoutsInEachPhaseLeaveTheMeanOfTheRest) {
  for (int phase = 0; phase <= 3; ++phase) {
    SCOPED_TRACE(phase);
    parties_.clear();
    Make(5);
    auto result = Run({{phase, {"site-2"}}});
    ASSERT_TRUE(result.ok()) << result.status();
    // Dropping before the masked input removes the agent from the sum; dropping
    // at unmask time does not (its input is in and the others unmask it).
    if (phase <= 2) {
      ExpectMeanOf(*result, {"site-0", "site-1", "site-3", "site-4"});
    } else {
      ExpectMeanOf(*result, {"site-0", "site-1", "site-2", "site-3", "site-4"});
    }
  }
}

TEST_F(SecAggRoundTest, TooFewSurvivorsAbortWithNothingReleased) {
  SecAggRoundOptions options;
  options.min_contributors = 3;
  Make(4, options);
  auto result = Run({{2, {"site-0", "site-1"}}});
  EXPECT_EQ(result.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(result.status().message(), HasSubstr("needs at least 3"));
}

TEST_F(SecAggRoundTest, RefusesMessagesFromTheWrongPartyPhaseOrTwice) {
  Make(3);
  auto adv0 = parties_[0].client->AdvertiseKeys();
  ASSERT_TRUE(adv0.ok());
  // site-1 replaying site-0's message (party 1) is refused: the TLS identity decides.
  EXPECT_EQ(round_->Handle("site-1", *adv0).code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(round_->Handle("intruder", *adv0).code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(round_->Handle("site-0", "garbage").code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(round_->Handle("site-0", *adv0).ok());
  EXPECT_EQ(round_->Handle("site-0", *adv0).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_FALSE(round_->PhaseComplete());
  EXPECT_EQ(round_->CheckMaskedInputFrom("site-0").code(), absl::StatusCode::kFailedPrecondition);
  // A masked input now (wrong phase) changes nothing.
  sa::MaskedInput early;
  early.round_id = 7;
  early.sender = 1;
  early.masked.assign(16, 0);
  EXPECT_FALSE(round_->HandleMaskedInput("site-0", early.Serialize()).ok());
  // Another round's message.
  sa::AdvertiseKeys other;
  other.round_id = 8;
  other.sender = 2;
  other.c_pk.assign(32, 'x');
  other.s_pk.assign(32, 'y');
  EXPECT_EQ(round_->Handle("site-1", other.Serialize()).code(),
            absl::StatusCode::kFailedPrecondition);
  // A dropped agent is not waited for.
  for (int i = 1; i < 3; ++i) {
    auto adv = parties_[i].client->AdvertiseKeys();
    ASSERT_TRUE(adv.ok());
    ASSERT_TRUE(round_->Handle(parties_[i].agent, *adv).ok());
  }
  EXPECT_TRUE(round_->PhaseComplete());
  ASSERT_TRUE(round_->ClosePhase().ok());
  round_->Drop("site-2");
  EXPECT_FALSE(round_->PhaseComplete());  // site-0 and site-1 still owe their shares
}

TEST(SecAggLayoutTest, SizeAndProtoRoundTrip) {
  auto n = LayoutSize(kLayout);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 16u);
  google::protobuf::RepeatedPtrField<v1::TensorShape> proto;
  LayoutToProto(kLayout, &proto);
  EXPECT_EQ(LayoutFromProto(proto), kLayout);
  EXPECT_FALSE(LayoutSize({{"x", {-1, 2}}}).ok());
  EXPECT_FALSE(LayoutSize({{"x", {1 << 20, 1 << 20}}}).ok());
  EXPECT_FALSE(SecAggRound::Create(1, {"only"}, kLayout, {}).ok());
  EXPECT_FALSE(SecAggRound::Create(1, {"a", "a", "b"}, kLayout, {}).ok());
  EXPECT_FALSE(SecAggRound::Create(1, {"a", "b", "c"}, {}, {}).ok());
}

}  // namespace
}  // namespace fedlora::coordinator
