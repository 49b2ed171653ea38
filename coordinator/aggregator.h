#pragma once
// Streaming FedAvg: the weighted mean of updates added one at a time.
//
//   FedAvgAggregator agg;
//   for (each update) RETURN_IF_ERROR(agg.Add(update, num_examples));
//   ASSIGN_OR_RETURN(TensorMap mean, agg.Finish());
//
// Memory is O(adapter size) whatever the number of updates: one fp64 accumulator
// per value (sum of weight * x), the caller frees each update after Add. Every
// update must have exactly the names and shapes of the first (InvalidArgument
// naming the tensor otherwise, and the aggregator is left unchanged); weights
// must be finite and > 0. Finish() divides by the total weight and fails when
// nothing was added. Not thread-safe (use from one thread at a time).

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/tensor/tensor.h"

namespace fedlora::coordinator {

class FedAvgAggregator {
 public:
  absl::Status Add(const common::TensorMap& update, double weight);
  absl::StatusOr<common::TensorMap> Finish() const;

  size_t count() const { return count_; }
  double total_weight() const { return total_weight_; }

 private:
  struct Accumulator {
    std::vector<int64_t> shape;
    std::vector<double> sum;
  };
  std::map<std::string, Accumulator> sums_;
  size_t count_ = 0;
  double total_weight_ = 0;
};

}  // namespace fedlora::coordinator
