#pragma once
// A small thread-safe registry of Prometheus metrics (counters, gauges and
// sum+count summaries, each with optional labels) rendered in the Prometheus text
// exposition format 0.0.4.
//
//   MetricsRegistry m;
//   m.AddCounter("fedlora_updates_rejected_total", "Refused updates", 1,
//                {{"reason", "INVALID_ARGUMENT"}});
//   m.SetGauge("fedlora_current_round", "Current round id", 7);
//   m.Observe("fedlora_aggregation_seconds", "Aggregation wall time", 0.25);
//   std::string page = m.Render();
//
// Render() lists families sorted by name, each as "# HELP", "# TYPE" then its series
// sorted by label set; a summary family renders NAME_sum and NAME_count. Label values
// escape '\\', '"' and newline; HELP text escapes '\\' and newline. Values print as
// integers when integral, else with 17 significant digits (+Inf, -Inf, NaN spelled
// out). The first call for a name fixes its type and help: a later call with another
// type is ignored (never throws). Metric and label names must match
// [a-zA-Z_:][a-zA-Z0-9_:]* / [a-zA-Z_][a-zA-Z0-9_]*; calls with invalid names are ignored.

#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace fedlora::coordinator {

class MetricsRegistry {
 public:
  using Labels = std::vector<std::pair<std::string, std::string>>;

  void AddCounter(const std::string& name, const std::string& help, double delta = 1,
                  const Labels& labels = {});
  void SetGauge(const std::string& name, const std::string& help, double value,
                const Labels& labels = {});
  void AddGauge(const std::string& name, const std::string& help, double delta,
                const Labels& labels = {});
  // Adds one observation to a summary (sum and count only, no quantiles).
  void Observe(const std::string& name, const std::string& help, double value,
               const Labels& labels = {});

  // For tests: the value of a counter/gauge series (a summary: its sum); 0 if absent.
  double Value(const std::string& name, const Labels& labels = {}) const;

  std::string Render() const;

 private:
  enum class Type { kCounter, kGauge, kSummary };
  struct Series {
    double value = 0;  // counter / gauge value, summary sum
    uint64_t count = 0;
  };
  struct Family {
    Type type;
    std::string help;
    std::map<std::string, Series> series;  // by rendered label set "{a=\"b\"}"
  };
  Series* GetSeries(const std::string& name, const std::string& help, Type type,
                    const Labels& labels);  // requires mu_

  mutable std::mutex mu_;
  std::map<std::string, Family> families_;
};

// Helpers exposed for tests.
std::string EscapeLabelValue(const std::string& value);
std::string FormatMetricValue(double value);

}  // namespace fedlora::coordinator
