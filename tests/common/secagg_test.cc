// End-to-end tests of common/secagg/protocol.h: the unmasked sum equals the
// plaintext sum of the encodings with dropouts in each phase, full SecAgg and
// SecAgg+ neighbourhoods; clean aborts below threshold.

#include "common/secagg/protocol.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "common/secagg/fixed_point.h"
#include "tests/common/secagg_test_util.h"

namespace fedlora::common::secagg {
namespace {

using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using testing::Drops;
using testing::MakeConfig;
using testing::MakeRound;
using testing::PlainSum;
using testing::RunRound;
using testing::SpreadDrops;
using testing::StatusIs;

enum class Phase { kBeforeAdvertise, kAfterAdvertise, kAfterShare, kAfterMasked, kDuringUnmask };

std::set<uint32_t>& Slot(Drops& d, Phase p) {
  switch (p) {
    case Phase::kBeforeAdvertise: return d.before_advertise;
    case Phase::kAfterAdvertise: return d.after_advertise;
    case Phase::kAfterShare: return d.after_share;
    case Phase::kAfterMasked: return d.after_masked;
    case Phase::kDuringUnmask: return d.during_unmask;
  }
  return d.before_advertise;
}

// Clients whose input must be in the sum: all but those gone before sending y.
std::vector<uint32_t> ExpectedContributors(const std::vector<uint32_t>& ids, const Drops& d) {
  std::vector<uint32_t> out;
  for (uint32_t id : ids) {
    if (d.before_advertise.count(id) || d.after_advertise.count(id) || d.after_share.count(id)) {
      continue;
    }
    out.push_back(id);
  }
  return out;
}

struct GraphCase {
  const char* name;
  int n, k, t, max_loss;  // max_loss: dropouts a closed neighbourhood tolerates (m - t)
};

class SecAggDropoutTest
    : public ::testing::TestWithParam<std::tuple<GraphCase, Phase, int /*drops*/>> {};

TEST_P(SecAggDropoutTest, UnmaskedSumEqualsPlaintextSum) {
  const auto& [gc, phase, count] = GetParam();
  SecAggConfig cfg = MakeConfig(gc.n, gc.k, gc.t, 37, /*seed=*/gc.n * 10 + count);
  auto round = MakeRound(cfg);
  ASSERT_TRUE(round.ok()) << round.status();
  Drops d;
  Slot(d, phase) = SpreadDrops(round->server.plan().graph(), count, gc.max_loss, {}, count);
  ASSERT_EQ(static_cast<int>(Slot(d, phase).size()), count);
  auto result = RunRound(*round, d);
  ASSERT_TRUE(result.ok()) << result.status();
  std::vector<uint32_t> want_ids = ExpectedContributors(round->ids, d);
  EXPECT_THAT(result->contributors, ElementsAreArray(want_ids));
  EXPECT_THAT(result->sum, ElementsAreArray(PlainSum(*round, want_ids)));
}

// full: n=8, every client a neighbour of all, t=5 tolerates 3 losses.
// sparse: n=16, k=4 (closed neighbourhoods of 5), t=3 tolerates 2 per neighbourhood.
const GraphCase kFull{"full", 8, 7, 5, 3};
const GraphCase kSparse{"sparse", 16, 4, 3, 2};

std::string DropoutCaseName(
    const ::testing::TestParamInfo<std::tuple<GraphCase, Phase, int>>& info) {
  static const char* kPhase[] = {"BeforeAdvertise", "AfterAdvertise", "AfterShare",
                                 "AfterMasked", "DuringUnmask"};
  return std::string(std::get<0>(info.param).name) + "_" +
         kPhase[static_cast<int>(std::get<1>(info.param))] + "_" +
         std::to_string(std::get<2>(info.param)) + "drops";
}

INSTANTIATE_TEST_SUITE_P(
    AllPhases, SecAggDropoutTest,
    ::testing::Combine(::testing::Values(kFull, kSparse),
                       ::testing::Values(Phase::kBeforeAdvertise, Phase::kAfterAdvertise,
                                         Phase::kAfterShare, Phase::kAfterMasked,
                                         Phase::kDuringUnmask),
                       ::testing::Values(0, 1, 3)),
    DropoutCaseName);

TEST(SecAggTest, DropoutsInEveryPhaseAtOnceSparse) {
  SecAggConfig cfg = MakeConfig(40, 6, 4, 101, 3);  // m = 7, t = 4: 3 losses per neighbourhood
  auto round = MakeRound(cfg);
  ASSERT_TRUE(round.ok()) << round.status();
  const NeighbourGraph& g = round->server.plan().graph();
  Drops d;
  std::set<uint32_t> all;
  int start = 0;
  for (auto* slot : {&d.before_advertise, &d.after_advertise, &d.after_share, &d.after_masked,
                     &d.during_unmask}) {
    *slot = SpreadDrops(g, 2, 3, all, start += 7);
    ASSERT_EQ(slot->size(), 2u);
    all.insert(slot->begin(), slot->end());
  }
  auto result = RunRound(*round, d);
  ASSERT_TRUE(result.ok()) << result.status();
  std::vector<uint32_t> want_ids = ExpectedContributors(round->ids, d);
  EXPECT_EQ(result->contributors.size(), 40u - 6u);
  EXPECT_THAT(result->sum, ElementsAreArray(PlainSum(*round, want_ids)));
}

TEST(SecAggTest, DefaultsAndFloatRoundTrip) {
  // Fixed-point inputs through the whole protocol, decoded back to floats.
  const int n = 12;
  auto codec = FixedPointCodec::Create({/*clip=*/2.0, /*scale=*/0, /*max_agents=*/n});
  ASSERT_TRUE(codec.ok()) << codec.status();
  SecAggConfig cfg = MakeConfig(n, 0, 0, 64, 9);
  auto round = MakeRound(cfg);
  ASSERT_TRUE(round.ok()) << round.status();
  EXPECT_EQ(round->server.plan().config().neighbours, DefaultNeighbours(n));
  EXPECT_EQ(round->server.plan().threshold(),
            DefaultThreshold(round->server.plan().neighbourhood_size()));
  std::vector<std::vector<float>> floats(n, std::vector<float>(64));
  std::vector<double> want(64, 0.0);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < 64; ++j) {
      floats[i][j] = 0.01f * static_cast<float>((i * 31 + j * 17) % 200 - 100);
      if (i != 5) want[j] += floats[i][j];
    }
    auto enc = codec->Encode(floats[i]);
    ASSERT_TRUE(enc.ok());
    round->inputs[i] = *enc;
  }
  Drops d;
  d.after_share = {round->ids[5]};
  auto result = RunRound(*round, d);
  ASSERT_TRUE(result.ok()) << result.status();
  auto decoded = codec->DecodeSum(result->sum, static_cast<int>(result->contributors.size()));
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  for (int j = 0; j < 64; ++j) EXPECT_NEAR((*decoded)[j], want[j], 1e-5) << j;
}

TEST(SecAggTest, AbortsBelowThresholdInEachPhase) {
  // n = 6 full, t = 4: three dropouts leave 3 < t.
  for (Phase p : {Phase::kBeforeAdvertise, Phase::kAfterAdvertise, Phase::kAfterShare,
                  Phase::kAfterMasked, Phase::kDuringUnmask}) {
    SecAggConfig cfg = MakeConfig(6, 5, 4, 16, 11);
    auto round = MakeRound(cfg);
    ASSERT_TRUE(round.ok()) << round.status();
    Drops d;
    Slot(d, p) = {round->ids[0], round->ids[2], round->ids[4]};
    auto result = RunRound(*round, d);
    EXPECT_THAT(result.status(), StatusIs(absl::StatusCode::kFailedPrecondition, "threshold 4"))
        << static_cast<int>(p);
    EXPECT_EQ(round->server.phase(), Server::Phase::kAborted);
    EXPECT_THAT(round->server.Finalize().status(),
                StatusIs(absl::StatusCode::kFailedPrecondition, "Aborted"));
  }
}

TEST(SecAggTest, AbortsWhenOneNeighbourhoodFallsBelowThreshold) {
  // n = 16, k = 4, t = 3: dropping 3 members of one closed neighbourhood aborts
  // even though 13 of 16 clients are left.
  SecAggConfig cfg = MakeConfig(16, 4, 3, 16, 12);
  auto round = MakeRound(cfg);
  ASSERT_TRUE(round.ok()) << round.status();
  const NeighbourGraph& g = round->server.plan().graph();
  const std::vector<int>& closed = g.Closed(0);
  Drops d;
  for (int i = 0; i < 3; ++i) d.after_share.insert(g.id(closed[i == 0 ? 1 : i + 1]));
  auto result = RunRound(*round, d);
  EXPECT_THAT(result.status(),
              StatusIs(absl::StatusCode::kFailedPrecondition, "of its 5-client neighbourhood"));
}

TEST(SecAggTest, ConfigValidation) {
  SecAggConfig cfg = MakeConfig(8, 7, 4, 16);  // m = 8: t must be > 4
  EXPECT_THAT(RoundPlan::Create(cfg).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "threshold 4 must be in (8/2, 8]"));
  cfg.threshold = 9;
  EXPECT_THAT(RoundPlan::Create(cfg).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "threshold 9"));
  cfg = MakeConfig(8, 7, 5, 16);
  cfg.round_seed = "short";
  EXPECT_THAT(RoundPlan::Create(cfg).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "round_seed"));
  cfg = MakeConfig(8, 7, 5, 0);
  EXPECT_THAT(RoundPlan::Create(cfg).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "vector_length"));
  cfg = MakeConfig(8, 7, 5, 16);
  cfg.cohort.push_back(cfg.cohort[3]);
  EXPECT_THAT(RoundPlan::Create(cfg).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "duplicate client id"));
  cfg = MakeConfig(300, 299, 200, 4);
  EXPECT_THAT(RoundPlan::Create(cfg).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "exceeds 255"));
  cfg = MakeConfig(8, 7, 5, 16);
  EXPECT_THAT(Client::Create(cfg, 12345).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "not in the round's cohort"));
}

TEST(SecAggTest, GraphIsDeterministicRegularAndSymmetric) {
  SecAggConfig cfg = MakeConfig(50, 5, 4, 4, 21);  // k = 5 rounds up to 6
  auto a = RoundPlan::Create(cfg);
  ASSERT_TRUE(a.ok()) << a.status();
  std::vector<uint32_t> shuffled = cfg.cohort;
  std::reverse(shuffled.begin(), shuffled.end());
  cfg.cohort = shuffled;
  auto b = RoundPlan::Create(cfg);
  ASSERT_TRUE(b.ok());
  const NeighbourGraph& g = a->graph();
  EXPECT_EQ(g.degree(), 6);
  for (int u = 0; u < g.size(); ++u) {
    EXPECT_EQ(g.Neighbours(u), b->graph().Neighbours(u));
    EXPECT_EQ(g.Neighbours(u).size(), 6u);
    for (int v : g.Neighbours(u)) EXPECT_TRUE(g.Adjacent(v, u));
    EXPECT_EQ(g.ShareX(u, u), 1 + (std::find(g.Closed(u).begin(), g.Closed(u).end(), u) -
                                   g.Closed(u).begin()));
  }
  // Another round seed gives another graph.
  SecAggConfig other = MakeConfig(50, 5, 4, 4, 22);
  auto c = RoundPlan::Create(other);
  ASSERT_TRUE(c.ok());
  int same = 0;
  for (int u = 0; u < g.size(); ++u) same += g.Neighbours(u) == c->graph().Neighbours(u);
  EXPECT_LT(same, 10);
}

}  // namespace
}  // namespace fedlora::common::secagg
