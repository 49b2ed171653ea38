#include "coordinator/aggregator.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace fedlora::coordinator {

absl::Status FedAvgAggregator::Add(const common::TensorMap& update, double weight) {
  if (!(weight > 0) || !std::isfinite(weight)) {
    return absl::InvalidArgumentError(
        absl::StrCat("FedAvg weight must be finite and > 0, found ", weight));
  }
  if (update.empty()) return absl::InvalidArgumentError("update holds no tensors");
  for (const auto& [name, t] : update) {
    if (static_cast<size_t>(t.numel()) != t.data.size()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': shape [",
                                                     absl::StrJoin(t.shape, ","), "] needs ",
                                                     t.numel(), " values, found ", t.data.size()));
    }
  }
  if (count_ == 0) {
    for (const auto& [name, t] : update) {
      Accumulator& acc = sums_[name];
      acc.shape = t.shape;
      acc.sum.assign(t.data.size(), 0.0);
    }
  } else {
    // Check everything before touching the sums, so a bad update changes nothing.
    if (update.size() != sums_.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "expected ", sums_.size(), " tensors like the first update, found ", update.size()));
    }
    for (const auto& [name, t] : update) {
      auto it = sums_.find(name);
      if (it == sums_.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor '", name, "' is not in the first update"));
      }
      if (it->second.shape != t.shape) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor '", name, "': expected shape [", absl::StrJoin(it->second.shape, ","),
            "], found [", absl::StrJoin(t.shape, ","), "]"));
      }
    }
  }
  for (const auto& [name, t] : update) {
    std::vector<double>& sum = sums_[name].sum;
    const float* x = t.data.data();
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += weight * static_cast<double>(x[i]);
  }
  ++count_;
  total_weight_ += weight;
  return absl::OkStatus();
}

absl::StatusOr<common::TensorMap> FedAvgAggregator::Finish() const {
  if (count_ == 0) return absl::FailedPreconditionError("FedAvg of zero updates");
  common::TensorMap out;
  for (const auto& [name, acc] : sums_) {
    common::HostTensor t;
    t.shape = acc.shape;
    t.data.resize(acc.sum.size());
    for (size_t i = 0; i < acc.sum.size(); ++i) {
      t.data[i] = static_cast<float>(acc.sum[i] / total_weight_);
    }
    out.emplace(name, std::move(t));
  }
  return out;
}

}  // namespace fedlora::coordinator
