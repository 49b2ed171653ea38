#pragma once
// FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous
// Aggregation"): the aggregation step of the coordinator's asynchronous mode
// (docs/aggregation.md, "FedBuff"; coordinator/round_manager.h runs the buffer).
//
// A buffer holds K updates; update i was trained from base version b_i, which is
// tau_i versions behind the version x the buffer is applied to (its staleness).
// With Delta_i = u_i - adapter(b_i) and w_i = num_examples_i:
//
//   x' = x + server_lr * sum_i w_i s(tau_i) Delta_i / sum_i w_i s(tau_i)
//
//   s(tau) = 1                      constant
//   s(tau) = 1 / (1 + tau)^a        polynomial (a = exponent, 0.5 in the paper)
//
// Fresh start: when there is no current version (x unknown to the coordinator:
// the agents' LoRA A is initialised from a shared seed inside the agents), every
// update must be fresh too and the result is the weighted mean of the updates,
// sum_i w_i s(tau_i) u_i / sum_i w_i s(tau_i) (= x + 1 * mean Delta: server_lr
// does not apply).
//
// Usage (streaming: memory O(adapter size) plus the caller's base adapters):
//
//   FedBuffAggregator agg(options, &current);   // or nullptr when fresh
//   for (each update) RETURN_IF_ERROR(agg.Add(u, &base_of_u, w, tau, agent));
//   ASSIGN_OR_RETURN(TensorMap next, agg.Finish());
//
// Every update (and its base) must have exactly the names and shapes of the
// current adapter (or, fresh, of the first update): InvalidArgument naming the
// agent and the tensor otherwise, and the aggregator is left unchanged. Not
// thread-safe; the free functions are safe for concurrent use.

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/tensor/tensor.h"

namespace fedlora::coordinator {

enum class StalenessWeight { kConstant, kPolynomial };

// "constant", "polynomial".
const char* StalenessWeightName(StalenessWeight weight);
// InvalidArgument listing the known names.
absl::StatusOr<StalenessWeight> ParseStalenessWeight(std::string_view name);

// s(tau) as above; `exponent` is used by kPolynomial only.
double StalenessFactor(StalenessWeight weight, double exponent, uint64_t staleness);

struct FedBuffOptions {
  double server_lr = 1.0;
  StalenessWeight weight = StalenessWeight::kPolynomial;
  double exponent = 0.5;
};

class FedBuffAggregator {
 public:
  // `current` (the version the buffer is applied to) must outlive the aggregator;
  // nullptr = no version yet (fresh start, above).
  FedBuffAggregator(const FedBuffOptions& options, const common::TensorMap* current);

  // `update`: the agent's adapter; `base`: the adapter of the version it trained
  // from (nullptr = fresh, only allowed when `current` is nullptr); `weight` > 0 and
  // finite (num_examples); `staleness`: tau.
  absl::Status Add(const common::TensorMap& update, const common::TensorMap* base, double weight,
                   uint64_t staleness, const std::string& agent);
  // The next adapter. FailedPrecondition when nothing was added.
  absl::StatusOr<common::TensorMap> Finish() const;

  size_t count() const { return count_; }
  // sum_i w_i s(tau_i), the denominator.
  double total_weight() const { return total_weight_; }

 private:
  struct Accumulator {
    std::vector<int64_t> shape;
    std::vector<double> sum;
  };
  const FedBuffOptions options_;
  const common::TensorMap* const current_;
  std::map<std::string, Accumulator> sums_;
  size_t count_ = 0;
  double total_weight_ = 0;
};

}  // namespace fedlora::coordinator
