#pragma once
// Byzantine-robust aggregation, for rounds WITHOUT secure aggregation (the
// coordinator then sees each update and can compare them coordinate by
// coordinate; under secure aggregation only the sum exists and only per-agent
// clipping on the agents applies, common/privacy/dp.h).
//
//   ASSIGN_OR_RETURN(auto agg, RobustAggregator::Create(options));
//   for (each update) RETURN_IF_ERROR(agg.Add(update, num_examples));
//   ASSIGN_OR_RETURN(TensorMap result, agg.Finish());
//
// Same input conventions as FedAvgAggregator (coordinator/aggregator.h): every
// update must have exactly the names and shapes of the first, weights must be
// finite and > 0, and a rejected Add (InvalidArgument naming the tensor)
// leaves the aggregator unchanged. Additionally every value must be finite.
//
// Two stages, applied in Finish():
//  1. Norm bounding: each update (all tensors as one vector) is scaled down to
//     L2 norm <= B, where B is absolute or a multiple of the median update norm
//     (so B adapts to the round; a minority of huge updates cannot move the
//     median). kNone skips it.
//  2. A rule over the bounded updates:
//     kMean         weighted mean (weights as FedAvg). With f of N equally
//                   weighted updates adversarial and the honest ones within
//                   B, it lands within (f/N) * 2B of the honest mean.
//     kTrimmedMean  per coordinate, drop the floor(beta*N) smallest and largest
//                   values and average the rest (unweighted). Tolerates up to
//                   floor(beta*N) arbitrary updates per coordinate.
//     kMedian       per coordinate median (mean of the two middle values for
//                   even N; unweighted). Tolerates just under half.
//  Trimmed mean and median ignore the weights on purpose: weights are
//  self-reported num_examples, and a liar could otherwise dominate.
//
// Memory: the coordinate-wise rules and the median-relative bound need every
// update at once, so Add keeps a copy: O(N * P) fp32 values for N updates of P
// parameters (e.g. 100 agents x 4M LoRA parameters = 1.6 GB). FedAvg streams
// in O(P); use this only where its protection is needed.
// Not thread-safe (use from one thread at a time).

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/tensor/tensor.h"

namespace fedlora::coordinator {

enum class RobustRule { kMean, kTrimmedMean, kMedian };
enum class NormBound { kNone, kAbsolute, kMedianMultiple };

struct RobustOptions {
  RobustRule rule = RobustRule::kMedian;
  double trim_fraction = 0.1;  // beta for kTrimmedMean, in [0, 0.5)
  NormBound norm_bound = NormBound::kMedianMultiple;
  double norm_bound_value = 2.0;  // B (kAbsolute) or the multiple of the median norm; > 0
};

// InvalidArgument naming the field.
absl::Status ValidateRobustOptions(const RobustOptions& options);

struct RobustStats {
  size_t count = 0;              // updates aggregated
  double median_norm = 0;        // median of the pre-bound norms
  double bound = 0;              // B applied (+inf for kNone)
  size_t clipped = 0;            // updates scaled down by the bound
  size_t trimmed_each_side = 0;  // kTrimmedMean: values dropped per side per coordinate
};

struct RobustResult {
  common::TensorMap aggregate;
  RobustStats stats;
};

class RobustAggregator {
 public:
  static absl::StatusOr<RobustAggregator> Create(const RobustOptions& options);

  absl::Status Add(const common::TensorMap& update, double weight);
  // FailedPrecondition when nothing was added.
  absl::StatusOr<common::TensorMap> Finish() const;
  absl::StatusOr<RobustResult> FinishWithStats() const;

  size_t count() const { return updates_.size(); }

 private:
  explicit RobustAggregator(const RobustOptions& options) : options_(options) {}

  struct Slot {
    std::string name;
    std::vector<int64_t> shape;
    size_t offset = 0;  // into the flat vector
    size_t size = 0;
  };

  RobustOptions options_;
  std::vector<Slot> layout_;                // from the first update, by name
  size_t total_ = 0;                        // values per update
  std::vector<std::vector<float>> updates_;  // flat copies, layout_ order
  std::vector<double> norms_;
  std::vector<double> weights_;
};

}  // namespace fedlora::coordinator
