#pragma once
// The federation's differential-privacy budget across rounds: a thin layer
// over common::RdpAccountant (common/privacy/rdp_accountant.h) that the round
// manager consults before a round and charges once the round's noisy
// aggregate is about to be revealed.
//
//   ASSIGN_OR_RETURN(DpBudget budget, DpBudget::Create({3.0, 1e-5}, stored_json));
//   RETURN_IF_ERROR(budget.CheckRound(q, sigma, 1));     // at SELECT: refuse early
//   ...
//   ASSIGN_OR_RETURN(double eps, budget.Commit(q, sigma, 1));  // before UNMASK
//   persist budget.StateJson() with the phase transition (one synced batch)
//
// One round of client-level DP is one step of the sampled Gaussian mechanism:
// q = selected agents / eligible population (SamplingRate), sigma = the noise
// multiplier the agents use (common/privacy/dp.h). Epsilon is reported at
// the configured delta with the accountant's conversion (improved by default).
//
// Commit always records the round, even past the budget: the privacy was
// spent once the aggregate is released, and under-reporting would be worse;
// CheckRound is the gate. Invalid parameters are InvalidArgument and change
// nothing. Not thread-safe.

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/privacy/rdp_accountant.h"

namespace fedlora::coordinator {

struct DpBudgetOptions {
  double epsilon_budget = 0;  // > 0, finite
  double delta = 1e-5;        // in (0, 1); typically < 1 / population
};

// selected / population, InvalidArgument unless 0 < selected <= population.
absl::StatusOr<double> SamplingRate(uint64_t selected, uint64_t population);

class DpBudget {
 public:
  // `state_json` is a previous StateJson(); empty starts a fresh accountant
  // (default orders, improved conversion).
  static absl::StatusOr<DpBudget> Create(const DpBudgetOptions& options,
                                         std::string_view state_json);

  // OK, or FailedPrecondition "round would raise epsilon to X > budget Y"
  // when running the round would exceed the budget.
  absl::Status CheckRound(double sampling_rate, double noise_multiplier, uint64_t steps) const;
  // Records the round; returns the new cumulative epsilon.
  absl::StatusOr<double> Commit(double sampling_rate, double noise_multiplier, uint64_t steps);

  double epsilon_spent() const { return epsilon_; }
  double epsilon_budget() const { return options_.epsilon_budget; }
  double delta() const { return options_.delta; }
  uint64_t rounds() const { return accountant_.rounds(); }
  std::string StateJson() const { return accountant_.ToJson(); }

 private:
  DpBudget(const DpBudgetOptions& options, common::RdpAccountant accountant, double epsilon)
      : options_(options), accountant_(std::move(accountant)), epsilon_(epsilon) {}

  DpBudgetOptions options_;
  common::RdpAccountant accountant_;
  double epsilon_ = 0;
};

}  // namespace fedlora::coordinator
