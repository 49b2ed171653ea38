#include "coordinator/metrics.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <thread>
#include <vector>

namespace fedlora::coordinator {
namespace {

TEST(MetricsTest, RendersSmallRegistryExactly) {
  MetricsRegistry m;
  m.AddCounter("b_total", "Things\\done\nper line", 2);
  m.AddCounter("b_total", "ignored help", 3);
  m.SetGauge("a_gauge", "A gauge", 1.5, {{"z", "1"}, {"a", "x\"y\\z\nw"}});
  m.SetGauge("a_gauge", "A gauge", -4);
  m.Observe("c_seconds", "Durations", 0.25, {{"phase", "train"}});
  m.Observe("c_seconds", "Durations", 0.5, {{"phase", "train"}});
  m.Observe("c_seconds", "Durations", 2, {{"phase", "eval"}});
  const std::string expected =
      "# HELP a_gauge A gauge\n"
      "# TYPE a_gauge gauge\n"
      "a_gauge -4\n"
      "a_gauge{a=\"x\\\"y\\\\z\\nw\",z=\"1\"} 1.5\n"
      "# HELP b_total Things\\\\done\\nper line\n"
      "# TYPE b_total counter\n"
      "b_total 5\n"
      "# HELP c_seconds Durations\n"
      "# TYPE c_seconds summary\n"
      "c_seconds_sum{phase=\"eval\"} 2\n"
      "c_seconds_count{phase=\"eval\"} 1\n"
      "c_seconds_sum{phase=\"train\"} 0.75\n"
      "c_seconds_count{phase=\"train\"} 2\n";
  EXPECT_EQ(m.Render(), expected);
  EXPECT_EQ(m.Value("b_total"), 5);
  EXPECT_EQ(m.Value("a_gauge", {{"z", "1"}, {"a", "x\"y\\z\nw"}}), 1.5);
  EXPECT_EQ(m.Value("c_seconds", {{"phase", "train"}}), 0.75);
  EXPECT_EQ(m.Value("missing"), 0);
}

TEST(MetricsTest, IgnoresBadNamesTypeClashesAndNegativeCounterDeltas) {
  MetricsRegistry m;
  m.AddCounter("x_total", "X", 1);
  m.SetGauge("x_total", "now a gauge", 7);  // type clash: ignored
  m.AddCounter("x_total", "X", -3);          // counters never go down
  m.AddCounter("9bad", "bad name", 1);
  m.AddCounter("bad-name", "bad name", 1);
  m.AddCounter("y_total", "bad label", 1, {{"bad-label", "v"}});
  EXPECT_EQ(m.Render(), "# HELP x_total X\n# TYPE x_total counter\nx_total 1\n");
  EXPECT_EQ(m.Render().find("now a gauge"), std::string::npos);
}

TEST(MetricsTest, FormatsValues) {
  EXPECT_EQ(FormatMetricValue(0), "0");
  EXPECT_EQ(FormatMetricValue(123456789), "123456789");
  EXPECT_EQ(FormatMetricValue(0.1), "0.10000000000000001");
  EXPECT_EQ(FormatMetricValue(std::numeric_limits<double>::infinity()), "+Inf");
  EXPECT_EQ(FormatMetricValue(-std::numeric_limits<double>::infinity()), "-Inf");
  EXPECT_EQ(FormatMetricValue(std::nan("")), "NaN");
  EXPECT_EQ(EscapeLabelValue("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
}

TEST(MetricsTest, ConcurrentIncrementsAreAllCounted) {
  MetricsRegistry m;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&m, t]() {
      for (int i = 0; i < 1000; ++i) {
        m.AddCounter("n_total", "N", 1, {{"t", std::to_string(t % 2)}});
        if (i % 100 == 0) (void)m.Render();
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(m.Value("n_total", {{"t", "0"}}) + m.Value("n_total", {{"t", "1"}}), 4000);
}

}  // namespace
}  // namespace fedlora::coordinator
