#include "coordinator/robust_aggregator.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace fedlora::coordinator {
namespace {

// Median of `v` (reordered). v non-empty.
double MedianInPlace(std::vector<double>& v) {
  const size_t n = v.size();
  const size_t mid = n / 2;
  std::nth_element(v.begin(), v.begin() + mid, v.end());
  const double upper = v[mid];
  if (n % 2 == 1) return upper;
  const double lower = *std::max_element(v.begin(), v.begin() + mid);
  return 0.5 * (lower + upper);
}

}  // namespace

absl::Status ValidateRobustOptions(const RobustOptions& options) {
  if (!(options.trim_fraction >= 0 && options.trim_fraction < 0.5)) {
    return absl::InvalidArgumentError(
        absl::StrCat("trim_fraction must be in [0, 0.5), found ", options.trim_fraction));
  }
  if (options.norm_bound != NormBound::kNone &&
      (!(options.norm_bound_value > 0) || !std::isfinite(options.norm_bound_value))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "norm_bound_value must be finite and > 0, found ", options.norm_bound_value));
  }
  return absl::OkStatus();
}

absl::StatusOr<RobustAggregator> RobustAggregator::Create(const RobustOptions& options) {
  absl::Status s = ValidateRobustOptions(options);
  if (!s.ok()) return s;
  return RobustAggregator(options);
}

absl::Status RobustAggregator::Add(const common::TensorMap& update, double weight) {
  if (!(weight > 0) || !std::isfinite(weight)) {
    return absl::InvalidArgumentError(
        absl::StrCat("aggregation weight must be finite and > 0, found ", weight));
  }
  if (update.empty()) return absl::InvalidArgumentError("update holds no tensors");
  for (const auto& [name, t] : update) {
    if (static_cast<size_t>(t.numel()) != t.data.size()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': shape [",
                                                     absl::StrJoin(t.shape, ","), "] needs ",
                                                     t.numel(), " values, found ", t.data.size()));
    }
    for (size_t i = 0; i < t.data.size(); ++i) {
      if (!std::isfinite(t.data[i])) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': value [", i,
                                                       "] is ", t.data[i], ", not finite"));
      }
    }
  }
  if (!updates_.empty()) {
    // Check everything before storing, so a bad update changes nothing.
    if (update.size() != layout_.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "expected ", layout_.size(), " tensors like the first update, found ", update.size()));
    }
    for (const Slot& slot : layout_) {
      auto it = update.find(slot.name);
      if (it == update.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor '", slot.name, "' of the first update is missing"));
      }
      if (it->second.shape != slot.shape) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor '", slot.name, "': expected shape [", absl::StrJoin(slot.shape, ","),
            "], found [", absl::StrJoin(it->second.shape, ","), "]"));
      }
    }
  } else {
    layout_.clear();
    total_ = 0;
    for (const auto& [name, t] : update) {  // TensorMap is ordered by name
      layout_.push_back(Slot{name, t.shape, total_, t.data.size()});
      total_ += t.data.size();
    }
  }
  std::vector<float> flat(total_);
  double sum_sq = 0;
  for (const Slot& slot : layout_) {
    const std::vector<float>& data = update.at(slot.name).data;
    std::copy(data.begin(), data.end(), flat.begin() + slot.offset);
    for (float v : data) sum_sq += static_cast<double>(v) * static_cast<double>(v);
  }
  updates_.push_back(std::move(flat));
  norms_.push_back(std::sqrt(sum_sq));
  weights_.push_back(weight);
  return absl::OkStatus();
}

absl::StatusOr<common::TensorMap> RobustAggregator::Finish() const {
  auto result = FinishWithStats();
  if (!result.ok()) return result.status();
  return std::move(result->aggregate);
}

absl::StatusOr<RobustResult> RobustAggregator::FinishWithStats() const {
  const size_t n = updates_.size();
  if (n == 0) return absl::FailedPreconditionError("robust aggregation of zero updates");
  RobustResult result;
  RobustStats& stats = result.stats;
  stats.count = n;
  {
    std::vector<double> norms = norms_;
    stats.median_norm = MedianInPlace(norms);
  }
  switch (options_.norm_bound) {
    case NormBound::kNone:
      stats.bound = std::numeric_limits<double>::infinity();
      break;
    case NormBound::kAbsolute:
      stats.bound = options_.norm_bound_value;
      break;
    case NormBound::kMedianMultiple:
      stats.bound = options_.norm_bound_value * stats.median_norm;
      break;
  }
  std::vector<double> scale(n, 1.0);
  for (size_t i = 0; i < n; ++i) {
    if (norms_[i] > stats.bound) {
      scale[i] = stats.bound / norms_[i];
      ++stats.clipped;
    }
  }

  std::vector<double> out(total_);
  if (options_.rule == RobustRule::kMean) {
    double total_weight = 0;
    for (double w : weights_) total_weight += w;
    for (size_t i = 0; i < n; ++i) {
      const double f = weights_[i] * scale[i];
      const float* x = updates_[i].data();
      for (size_t j = 0; j < total_; ++j) out[j] += f * static_cast<double>(x[j]);
    }
    for (double& v : out) v /= total_weight;
  } else {
    const size_t k = options_.rule == RobustRule::kTrimmedMean
                         ? static_cast<size_t>(std::floor(options_.trim_fraction *
                                                          static_cast<double>(n)))
                         : 0;
    stats.trimmed_each_side = k;
    std::vector<double> column(n);
    for (size_t j = 0; j < total_; ++j) {
      for (size_t i = 0; i < n; ++i) column[i] = scale[i] * static_cast<double>(updates_[i][j]);
      if (options_.rule == RobustRule::kMedian) {
        out[j] = MedianInPlace(column);
      } else {
        // beta < 0.5 keeps n - 2k >= 1 values.
        std::sort(column.begin(), column.end());
        double sum = 0;
        for (size_t i = k; i < n - k; ++i) sum += column[i];
        out[j] = sum / static_cast<double>(n - 2 * k);
      }
    }
  }

  for (const Slot& slot : layout_) {
    common::HostTensor t;
    t.shape = slot.shape;
    t.data.resize(slot.size);
    for (size_t j = 0; j < slot.size; ++j) t.data[j] = static_cast<float>(out[slot.offset + j]);
    result.aggregate.emplace(slot.name, std::move(t));
  }
  return result;
}

}  // namespace fedlora::coordinator
