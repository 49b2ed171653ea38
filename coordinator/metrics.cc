#include "coordinator/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace fedlora::coordinator {
namespace {

bool ValidName(const std::string& name, bool allow_colon) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
                       (allow_colon && c == ':');
    const bool digit = c >= '0' && c <= '9';
    if (!(alpha || (i > 0 && digit))) return false;
  }
  return true;
}

std::string EscapeHelp(const std::string& help) {
  std::string out;
  for (char c : help) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

// "" for no labels, else {k="v",...} in the given order (callers sort).
std::string LabelKey(MetricsRegistry::Labels labels) {
  if (labels.empty()) return "";
  std::sort(labels.begin(), labels.end());
  std::string out = "{";
  for (size_t i = 0; i < labels.size(); ++i) {
    if (i > 0) out += ",";
    out += labels[i].first + "=\"" + EscapeLabelValue(labels[i].second) + "\"";
  }
  return out + "}";
}

}  // namespace

std::string EscapeLabelValue(const std::string& value) {
  std::string out;
  for (char c : value) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string FormatMetricValue(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  char buf[64];
  if (value == std::floor(value) && std::fabs(value) < 1e15) {
    std::snprintf(buf, sizeof(buf), "%.0f", value);
  } else {
    std::snprintf(buf, sizeof(buf), "%.17g", value);
  }
  return buf;
}

MetricsRegistry::Series* MetricsRegistry::GetSeries(const std::string& name,
                                                    const std::string& help, Type type,
                                                    const Labels& labels) {
  if (!ValidName(name, /*allow_colon=*/true)) return nullptr;
  for (const auto& [k, v] : labels) {
    if (!ValidName(k, /*allow_colon=*/false)) return nullptr;
  }
  auto it = families_.find(name);
  if (it == families_.end()) {
    it = families_.emplace(name, Family{type, help, {}}).first;
  } else if (it->second.type != type) {
    return nullptr;
  }
  return &it->second.series[LabelKey(labels)];
}

void MetricsRegistry::AddCounter(const std::string& name, const std::string& help, double delta,
                                 const Labels& labels) {
  if (!(delta >= 0)) return;  // counters only go up
  std::lock_guard<std::mutex> lock(mu_);
  if (Series* s = GetSeries(name, help, Type::kCounter, labels)) s->value += delta;
}

void MetricsRegistry::SetGauge(const std::string& name, const std::string& help, double value,
                               const Labels& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  if (Series* s = GetSeries(name, help, Type::kGauge, labels)) s->value = value;
}

void MetricsRegistry::AddGauge(const std::string& name, const std::string& help, double delta,
                               const Labels& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  if (Series* s = GetSeries(name, help, Type::kGauge, labels)) s->value += delta;
}

void MetricsRegistry::Observe(const std::string& name, const std::string& help, double value,
                              const Labels& labels) {
  std::lock_guard<std::mutex> lock(mu_);
  if (Series* s = GetSeries(name, help, Type::kSummary, labels)) {
    s->value += value;
    ++s->count;
  }
}

double MetricsRegistry::Value(const std::string& name, const Labels& labels) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = families_.find(name);
  if (it == families_.end()) return 0;
  auto s = it->second.series.find(LabelKey(labels));
  return s == it->second.series.end() ? 0 : s->second.value;
}

std::string MetricsRegistry::Render() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  for (const auto& [name, family] : families_) {
    const char* type = family.type == Type::kCounter ? "counter"
                       : family.type == Type::kGauge ? "gauge"
                                                     : "summary";
    out += "# HELP " + name + " " + EscapeHelp(family.help) + "\n";
    out += "# TYPE " + name + " " + type + "\n";
    for (const auto& [labels, s] : family.series) {
      if (family.type == Type::kSummary) {
        out += name + "_sum" + labels + " " + FormatMetricValue(s.value) + "\n";
        out += name + "_count" + labels + " " + std::to_string(s.count) + "\n";
      } else {
        out += name + labels + " " + FormatMetricValue(s.value) + "\n";
      }
    }
  }
  return out;
}

}  // namespace fedlora::coordinator
