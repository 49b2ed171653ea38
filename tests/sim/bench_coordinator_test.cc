// `fedlora-sim bench coordinator`: a small run of the real binaries (fedlora-sim
// starting fedlora-coordinator) completes its rounds with nothing lost, and bad
// options name the field. Not timed: the figures are only checked for sense.

#include "simulations/bench_coordinator.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "tests/testing/test_util.h"

namespace fedlora::sim {
namespace {

using ::testing::HasSubstr;

using SimRun = ::fedlora::testutil::CommandResult;

SimRun RunSim(const std::string& args) {
  return ::fedlora::testutil::RunBinary("fedlora-sim", args, /*with_stderr=*/false);
}

std::vector<nlohmann::json> JsonLines(const std::string& text) {
  std::vector<nlohmann::json> lines;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_discarded()) lines.push_back(j);
  }
  return lines;
}

TEST(CoordinatorBenchTest, FiveAgentsTwoRoundsNothingLost) {
  SimRun r = RunSim(
      "bench coordinator --agents 5 --params 10000 --rounds 2 --max-concurrent-uploads 2 "
      "--client-uploads 5 --timeout-s 300");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::vector<nlohmann::json> lines = JsonLines(r.output);
  ASSERT_EQ(lines.size(), 3u) << r.output;  // two rounds, one summary
  for (int k = 0; k < 2; ++k) {
    const nlohmann::json& round = lines[k];
    EXPECT_EQ(round["bench"], "coordinator");
    EXPECT_EQ(round["round"], k + 1);
    EXPECT_EQ(round["agents"], 5);
    EXPECT_EQ(round["params"], 10000);
    EXPECT_EQ(round["updates_accepted"], 5);
    EXPECT_GT(round["update_bytes"].get<double>(), 5 * 4 * 10000.0) << "sealed fp32 updates";
    EXPECT_GT(round["round_wall_s"].get<double>(), 0);
  }
  const nlohmann::json& s = lines[2];
  EXPECT_EQ(s["summary"], true) << s.dump();
  EXPECT_EQ(s["secure_aggregation"], "off");
  EXPECT_EQ(s["rounds_completed"], 2);
  EXPECT_EQ(s["updates_expected"], 10);
  EXPECT_EQ(s["updates_accepted"], 10);
  EXPECT_EQ(s["updates_lost"], 0);
  EXPECT_EQ(s["updates_rejected"], 0);
  EXPECT_EQ(s["coordinator_exit_code"], 0) << "the coordinator finished its --rounds and exited";
  EXPECT_EQ(s["error"], "");
  EXPECT_GT(s["coordinator_peak_rss_bytes"].get<double>(), 0);
  EXPECT_GE(s["coordinator_peak_rss_bytes"].get<double>(),
            s["coordinator_start_rss_bytes"].get<double>());
  EXPECT_GE(s["uploads_in_flight_peak"].get<double>(), 1);
  EXPECT_LE(s["uploads_in_flight_peak"].get<double>(), 2) << "the upload bound held";
}

TEST(CoordinatorBenchTest, BadOptionsNameTheField) {
  CoordinatorBenchOptions o;
  o.secure_aggregation = "on";
  EXPECT_THAT(std::string(RunCoordinatorBench(o).status().message()),
              HasSubstr("secure_aggregation"));
  o = CoordinatorBenchOptions();
  o.params = 3;
  EXPECT_THAT(std::string(RunCoordinatorBench(o).status().message()), HasSubstr("params"));
  o = CoordinatorBenchOptions();
  o.agents = 0;
  EXPECT_THAT(std::string(RunCoordinatorBench(o).status().message()), HasSubstr("agents"));
  o = CoordinatorBenchOptions();
  o.coordinator_bin = "/nonexistent/fedlora-coordinator";
  o.agents = 1;
  o.params = 100;
  auto missing = RunCoordinatorBench(o);
  EXPECT_FALSE(missing.ok());
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("/nonexistent/fedlora-coordinator"));
}

}  // namespace
}  // namespace fedlora::sim
