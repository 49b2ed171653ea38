#include "coordinator/dp_budget.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status/status.h"

namespace fedlora::coordinator {

absl::StatusOr<double> SamplingRate(uint64_t selected, uint64_t population) {
  if (selected == 0 || selected > population) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DP sampling rate needs 0 < selected <= population, found ", selected, " of ",
        population));
  }
  return static_cast<double>(selected) / static_cast<double>(population);
}

absl::StatusOr<DpBudget> DpBudget::Create(const DpBudgetOptions& options,
                                          std::string_view state_json) {
  if (!(options.epsilon_budget > 0) || !std::isfinite(options.epsilon_budget)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dp epsilon_budget must be finite and > 0, found ", options.epsilon_budget));
  }
  if (!(options.delta > 0 && options.delta < 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("dp delta must be in (0, 1), found ", options.delta));
  }
  common::RdpAccountant accountant;
  if (!state_json.empty()) {
    ASSIGN_OR_RETURN(accountant, common::RdpAccountant::FromJson(state_json));
  }
  ASSIGN_OR_RETURN(common::EpsilonResult spent, accountant.EpsilonFor(options.delta));
  return DpBudget(options, std::move(accountant), spent.epsilon);
}

absl::Status DpBudget::CheckRound(double sampling_rate, double noise_multiplier,
                                  uint64_t steps) const {
  ASSIGN_OR_RETURN(common::EpsilonResult after,
                   accountant_.EpsilonAfter({sampling_rate, noise_multiplier, steps},
                                            options_.delta));
  if (after.epsilon > options_.epsilon_budget) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "round would raise epsilon to %.4g > budget %.4g (delta %g; spent so far %.4g over %d "
        "rounds; sampling rate %g, noise multiplier %g)",
        after.epsilon, options_.epsilon_budget, options_.delta, epsilon_,
        accountant_.rounds(), sampling_rate, noise_multiplier));
  }
  return absl::OkStatus();
}

absl::StatusOr<double> DpBudget::Commit(double sampling_rate, double noise_multiplier,
                                        uint64_t steps) {
  common::RdpAccountant next = accountant_;
  RETURN_IF_ERROR(next.AddRound({sampling_rate, noise_multiplier, steps}));
  ASSIGN_OR_RETURN(common::EpsilonResult spent, next.EpsilonFor(options_.delta));
  accountant_ = std::move(next);
  epsilon_ = spent.epsilon;
  return epsilon_;
}

}  // namespace fedlora::coordinator
