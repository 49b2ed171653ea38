// simulations/bench_secagg: the in-process protocol run is exact and its
// accounting adds up; bad options name the field.

#include "simulations/bench_secagg.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

namespace fedlora::sim {
namespace {

using ::testing::HasSubstr;

TEST(SecAggBenchTest, SmallRunIsCorrectAndCountsBytes) {
  SecAggBenchOptions o;
  o.agents = 12;
  o.params = 1000;
  o.dropout = 0.25;
  o.neighbours = 4;
  auto r = RunSecAggBench(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->correct);
  EXPECT_EQ(r->dropped, 3);
  EXPECT_EQ(r->neighbours, 4);
  EXPECT_EQ(r->threshold, 3);
  EXPECT_EQ(r->plaintext_bytes, 4000);
  // The masked input alone is 4 * params bytes plus its header; keys and shares add more.
  EXPECT_GT(r->bytes_sent_per_agent, 4000 + 4 * 101);
  EXPECT_LT(r->bytes_sent_per_agent, 4000 * 1.5);
  std::string json = SecAggBenchJson(*r);
  EXPECT_THAT(json, HasSubstr("\"bench\":\"secagg\""));
  EXPECT_THAT(json, HasSubstr("\"correct\":true"));
}

TEST(SecAggBenchTest, BadOptionsNameTheField) {
  SecAggBenchOptions o;
  o.agents = 2;
  EXPECT_THAT(std::string(RunSecAggBench(o).status().message()), HasSubstr("agents"));
  o = SecAggBenchOptions{};
  o.params = 10;
  o.agents = 5;
  o.dropout = 1.0;
  EXPECT_THAT(std::string(RunSecAggBench(o).status().message()), HasSubstr("dropout"));
  o.dropout = 0;
  o.threshold = 1;  // below a majority of the 5-agent neighbourhood
  EXPECT_THAT(std::string(RunSecAggBench(o).status().message()), HasSubstr("threshold"));
}

}  // namespace
}  // namespace fedlora::sim
