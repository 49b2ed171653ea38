#pragma once
// Rényi-DP accountant for the sampled Gaussian mechanism.
//
// One step of the mechanism samples each participant independently with
// probability q (Poisson sampling), sums their contributions, each clipped to
// L2 norm C, and adds N(0, (sigma*C)^2) to the sum; sigma is the "noise
// multiplier". Its RDP at order alpha is computed as in Mironov, Talwar and
// Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism"
// (arXiv:1908.10530), Section 3.3: the exact binomial expansion for integer
// alpha and the two-sided erfc series for fractional alpha (the quantities
// TF-Privacy's and Opacus's compute_rdp return). q = 1 gives the closed-form
// Gaussian RDP alpha / (2 sigma^2); q = 0 gives 0; sigma = 0 (q > 0) gives +inf.
// RDP composes by addition, so `steps` steps cost steps * RDP(alpha).
//
// Conversion to (epsilon, delta), minimised over the tracked orders:
//   kClassic:  eps = rdp(alpha) + log(1/delta) / (alpha - 1)
//              (Mironov 2017, Prop. 3; what TF-Privacy's tutorials printed).
//   kImproved: eps = rdp(alpha) + log1p(-1/alpha) - log(delta * alpha) / (alpha - 1)
//              (Canonne, Kamath, Steinke 2020, Prop. 12; Balle et al. 2020),
//              0 when delta^2 + expm1(-rdp) >= 0. Never larger than kClassic
//              by more than rounding; today's TF-Privacy dp_accounting and
//              Opacus use it. It is the default.
//
// In fedlora (client-level DP) one federated round is one step: q is the
// expected number of sampled agents over the population, sigma the noise
// multiplier of common/privacy/dp.h, and rounds compose (docs/privacy.md).
//
// RdpAccountant holds the cumulative RDP per order. Its state round-trips
// through JSON (ToJson / FromJson) so the coordinator can persist it.
// Invalid input (q outside [0,1], negative or non-finite sigma, orders <= 1,
// delta outside (0,1), malformed JSON) is InvalidArgument naming the field,
// and leaves the accountant unchanged. Not thread-safe; const methods may be
// used concurrently.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace fedlora::common {

enum class EpsilonConversion { kClassic, kImproved };

// Parameters of one accounted round: `steps` compositions of the sampled
// Gaussian mechanism with sampling rate q and noise multiplier sigma.
struct SampledGaussianRound {
  double sampling_rate = 0;     // q in [0, 1]
  double noise_multiplier = 0;  // sigma >= 0
  uint64_t steps = 1;
};

struct EpsilonResult {
  double epsilon = 0;
  double order = 0;  // the RDP order that attains the minimum
};

// RDP of ONE step of the sampled Gaussian mechanism at `order` (> 1, finite).
// May be +inf (sigma == 0 with q > 0, or an order so large that the value
// overflows).
absl::StatusOr<double> SampledGaussianRdp(double sampling_rate, double noise_multiplier,
                                          double order);

// Converts RDP values at `orders` (same length, orders > 1) to the smallest
// epsilon at `delta` in (0, 1). Infinite RDP entries are skipped; when every
// entry is infinite the result's epsilon is +inf.
absl::StatusOr<EpsilonResult> EpsilonFromRdp(const std::vector<double>& orders,
                                             const std::vector<double>& rdp, double delta,
                                             EpsilonConversion conversion);

class RdpAccountant {
 public:
  // TF-Privacy / Opacus default orders: 1.1, 1.2, ..., 10.9 and 12, 13, ..., 63.
  static std::vector<double> DefaultOrders();

  // Default orders, kImproved conversion, nothing spent.
  RdpAccountant();
  // Custom orders (each finite, > 1, no duplicates).
  static absl::StatusOr<RdpAccountant> Create(std::vector<double> orders,
                                              EpsilonConversion conversion);

  // Composes a round. InvalidArgument for bad parameters and for a round with
  // infinite RDP at every order (sigma == 0 with q > 0: no privacy at all);
  // the state is then unchanged. Infinite RDP at some orders only is kept
  // (those orders drop out of the epsilon minimum).
  absl::Status AddRound(const SampledGaussianRound& round);

  // Epsilon spent so far at `delta` (0 before any round).
  absl::StatusOr<EpsilonResult> EpsilonFor(double delta) const;
  // Epsilon that would be spent after also running `next`.
  absl::StatusOr<EpsilonResult> EpsilonAfter(const SampledGaussianRound& next,
                                             double delta) const;
  // True when running `next` would raise epsilon (at `delta`) above
  // `budget_epsilon` (> 0). A round with infinite RDP always exceeds.
  absl::StatusOr<bool> WouldExceed(double budget_epsilon, double delta,
                                   const SampledGaussianRound& next) const;

  // {"version":1,"conversion":"improved"|"classic","orders":[..],"rdp":[..],
  //  "rounds":N,"steps":S}. Doubles are written with round-trip precision; an
  //  order whose RDP overflowed to +inf (absurdly small sigma) is "inf".
  std::string ToJson() const;
  static absl::StatusOr<RdpAccountant> FromJson(std::string_view json);

  const std::vector<double>& orders() const { return orders_; }
  const std::vector<double>& rdp() const { return rdp_; }
  EpsilonConversion conversion() const { return conversion_; }
  uint64_t rounds() const { return rounds_; }
  uint64_t total_steps() const { return steps_; }

 private:
  RdpAccountant(std::vector<double> orders, EpsilonConversion conversion);
  // RDP of `round` at every tracked order.
  absl::StatusOr<std::vector<double>> RoundRdp(const SampledGaussianRound& round) const;

  std::vector<double> orders_;
  std::vector<double> rdp_;  // cumulative, same length as orders_
  EpsilonConversion conversion_ = EpsilonConversion::kImproved;
  uint64_t rounds_ = 0;
  uint64_t steps_ = 0;
};

}  // namespace fedlora::common
