#include "common/privacy/rdp_accountant.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status/status.h"
#include "nlohmann/json.hpp"

namespace fedlora::common {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
// Orders above this are refused: the series below cost O(order) terms and no
// useful bound needs them.
constexpr double kMaxOrder = 1e5;

// log(exp(a) + exp(b)).
double LogAdd(double a, double b) {
  if (a == kNegInf) return b;
  if (b == kNegInf) return a;
  const double hi = std::max(a, b);
  const double lo = std::min(a, b);
  return hi + std::log1p(std::exp(lo - hi));
}

// A real number kept as sign * exp(log_abs), so sums of terms spanning
// hundreds of orders of magnitude (and of both signs) stay exact enough.
struct SignedLog {
  double log_abs = kNegInf;
  int sign = 1;

  void Add(double log_term, int term_sign) {
    if (log_term == kNegInf) return;
    if (log_abs == kNegInf) {
      log_abs = log_term;
      sign = term_sign;
      return;
    }
    if (term_sign == sign) {
      log_abs = LogAdd(log_abs, log_term);
      return;
    }
    // Opposite signs: the larger magnitude wins.
    if (log_term == log_abs) {
      log_abs = kNegInf;
      sign = 1;
    } else if (log_term > log_abs) {
      log_abs = log_term + std::log1p(-std::exp(log_abs - log_term));
      sign = term_sign;
    } else {
      log_abs = log_abs + std::log1p(-std::exp(log_term - log_abs));
    }
  }
};

// log(erfc(x)), accurate where erfc(x) underflows double (x > ~26).
double LogErfc(double x) {
  if (x < 25) return std::log(std::erfc(x));
  // Asymptotic expansion erfc(x) = exp(-x^2) / (x sqrt(pi)) * S(x),
  // S = 1 - 1/(2x^2) + 3/(2x^2)^2 - 15/(2x^2)^3 + 105/(2x^2)^4 - ...;
  // at x >= 25 the first omitted term is below 1e-15.
  const double u = 1.0 / (2.0 * x * x);
  const double s = 1.0 - u * (1.0 - 3.0 * u * (1.0 - 5.0 * u * (1.0 - 7.0 * u)));
  return -x * x - std::log(x) - 0.5 * std::log(M_PI) + std::log(s);
}

// log A_alpha for integer alpha (Mironov et al. 2019, Sec. 3.3):
// A = sum_{i=0}^{alpha} C(alpha,i) q^i (1-q)^(alpha-i) exp((i^2 - i) / (2 sigma^2)).
double LogAInteger(double q, double sigma, int64_t alpha) {
  const double log_q = std::log(q);
  const double log_1mq = std::log1p(-q);
  const double inv_2s2 = 1.0 / (2.0 * sigma * sigma);
  double log_a = kNegInf;
  double log_binom = 0;  // log C(alpha, 0)
  for (int64_t i = 0; i <= alpha; ++i) {
    const double di = static_cast<double>(i);
    const double term = log_binom + di * log_q + static_cast<double>(alpha - i) * log_1mq +
                        (di * di - di) * inv_2s2;
    log_a = LogAdd(log_a, term);
    // C(alpha, i+1) = C(alpha, i) * (alpha - i) / (i + 1).
    if (i < alpha) log_binom += std::log(static_cast<double>(alpha - i)) - std::log(di + 1);
  }
  return log_a;
}

// log A_alpha for fractional alpha (Mironov et al. 2019, Sec. 3.3): the
// integral of mu0 (mu/mu0)^alpha is split at z0, where mu0 and mu1 cross
// weighted by (1-q) and q, and each side is expanded as a binomial series
// whose terms carry Gaussian tail probabilities (erfc factors).
double LogAFractional(double q, double sigma, double alpha) {
  const double log_q = std::log(q);
  const double log_1mq = std::log1p(-q);
  const double inv_2s2 = 1.0 / (2.0 * sigma * sigma);
  const double z0 = sigma * sigma * (std::log(1.0 / q - 1.0)) + 0.5;
  const double sqrt2_sigma = std::sqrt(2.0) * sigma;
  const double log_half = std::log(0.5);
  SignedLog a0;
  SignedLog a1;
  double log_abs_binom = 0;  // log |C(alpha, 0)|
  int binom_sign = 1;
  for (int64_t i = 0;; ++i) {
    const double di = static_cast<double>(i);
    const double j = alpha - di;
    const double log_t0 = log_abs_binom + di * log_q + j * log_1mq;
    const double log_t1 = log_abs_binom + j * log_q + di * log_1mq;
    const double log_e0 = log_half + LogErfc((di - z0) / sqrt2_sigma);
    const double log_e1 = log_half + LogErfc((z0 - j) / sqrt2_sigma);
    const double log_s0 = log_t0 + (di * di - di) * inv_2s2 + log_e0;
    const double log_s1 = log_t1 + (j * j - j) * inv_2s2 + log_e1;
    a0.Add(log_s0, binom_sign);
    a1.Add(log_s1, binom_sign);
    // Past alpha the binomial coefficients alternate in sign and the terms
    // shrink (like i^-(alpha+2)), so the truncation error is below the last
    // term; stop once that is negligible next to A >= 1 (e^-33 ~ 5e-15).
    if (di > alpha + 1 && std::max(log_s0, log_s1) < -33) break;
    if (i > 10 * static_cast<int64_t>(kMaxOrder)) break;  // cannot happen for valid input
    const double factor = alpha - di;  // C(alpha, i+1) = C(alpha, i) * (alpha - i) / (i + 1)
    if (factor < 0) binom_sign = -binom_sign;
    log_abs_binom += std::log(std::fabs(factor)) - std::log(di + 1);
  }
  SignedLog total = a0;
  total.Add(a1.log_abs, a1.sign);
  return total.log_abs;  // A > 0 mathematically
}

absl::Status ValidateMechanism(double q, double sigma) {
  if (!(q >= 0 && q <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling_rate must be in [0, 1], found ", q));
  }
  if (!(sigma >= 0) || !std::isfinite(sigma)) {
    return absl::InvalidArgumentError(
        absl::StrCat("noise_multiplier must be finite and >= 0, found ", sigma));
  }
  return absl::OkStatus();
}

absl::Status ValidateOrder(double order) {
  if (!(order > 1) || !(order <= kMaxOrder)) {
    return absl::InvalidArgumentError(
        absl::StrCat("RDP order must be in (1, ", kMaxOrder, "], found ", order));
  }
  return absl::OkStatus();
}

absl::Status ValidateDelta(double delta) {
  if (!(delta > 0 && delta < 1)) {
    return absl::InvalidArgumentError(absl::StrCat("delta must be in (0, 1), found ", delta));
  }
  return absl::OkStatus();
}

absl::Status ValidateOrders(const std::vector<double>& orders) {
  if (orders.empty()) return absl::InvalidArgumentError("RDP orders: need at least one");
  std::set<double> seen;
  for (size_t i = 0; i < orders.size(); ++i) {
    absl::Status s = ValidateOrder(orders[i]);
    if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat("orders[", i, "]: ", s.message()));
    if (!seen.insert(orders[i]).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("orders[", i, "]: duplicate order ", orders[i]));
    }
  }
  return absl::OkStatus();
}

double SampledGaussianRdpUnchecked(double q, double sigma, double order) {
  if (q == 0) return 0;
  if (sigma == 0) return kInf;
  if (q == 1) return order / (2 * sigma * sigma);
  double log_a;
  if (order == std::floor(order)) {
    log_a = LogAInteger(q, sigma, static_cast<int64_t>(order));
  } else {
    log_a = LogAFractional(q, sigma, order);
  }
  // A >= 1 exactly; rounding may leave log A a hair below 0.
  return std::max(0.0, log_a / (order - 1));
}

const char* ConversionName(EpsilonConversion c) {
  return c == EpsilonConversion::kClassic ? "classic" : "improved";
}

}  // namespace

absl::StatusOr<double> SampledGaussianRdp(double sampling_rate, double noise_multiplier,
                                          double order) {
  RETURN_IF_ERROR(ValidateMechanism(sampling_rate, noise_multiplier));
  RETURN_IF_ERROR(ValidateOrder(order));
  return SampledGaussianRdpUnchecked(sampling_rate, noise_multiplier, order);
}

absl::StatusOr<EpsilonResult> EpsilonFromRdp(const std::vector<double>& orders,
                                             const std::vector<double>& rdp, double delta,
                                             EpsilonConversion conversion) {
  RETURN_IF_ERROR(ValidateDelta(delta));
  if (orders.size() != rdp.size()) {
    return absl::InvalidArgumentError(absl::StrCat("got ", orders.size(), " orders but ",
                                                   rdp.size(), " RDP values"));
  }
  if (orders.empty()) return absl::InvalidArgumentError("RDP orders: need at least one");
  for (size_t i = 0; i < orders.size(); ++i) {
    absl::Status s = ValidateOrder(orders[i]);
    if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat("orders[", i, "]: ", s.message()));
    if (!(rdp[i] >= 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("rdp[", i, "] must be >= 0, found ", rdp[i]));
    }
  }
  EpsilonResult best{kInf, 0};
  const double log_delta = std::log(delta);
  for (size_t i = 0; i < orders.size(); ++i) {
    const double a = orders[i];
    const double r = rdp[i];
    if (!std::isfinite(r)) continue;
    double eps;
    if (conversion == EpsilonConversion::kClassic) {
      eps = r - log_delta / (a - 1);
    } else if (delta * delta + std::expm1(-r) >= 0) {
      // TV <= sqrt(1 - exp(-KL)) (Bretagnolle-Huber) and KL <= D_alpha, so
      // the pair is already (0, delta)-DP.
      eps = 0;
    } else {
      eps = r + std::log1p(-1 / a) - (log_delta + std::log(a)) / (a - 1);
    }
    eps = std::max(0.0, eps);
    if (eps < best.epsilon) best = EpsilonResult{eps, a};
  }
  return best;
}

std::vector<double> RdpAccountant::DefaultOrders() {
  std::vector<double> orders;
  for (int x = 1; x < 100; ++x) orders.push_back(1 + x / 10.0);
  for (int a = 12; a < 64; ++a) orders.push_back(a);
  return orders;
}

RdpAccountant::RdpAccountant() : RdpAccountant(DefaultOrders(), EpsilonConversion::kImproved) {}

RdpAccountant::RdpAccountant(std::vector<double> orders, EpsilonConversion conversion)
    : orders_(std::move(orders)), rdp_(orders_.size(), 0.0), conversion_(conversion) {}

absl::StatusOr<RdpAccountant> RdpAccountant::Create(std::vector<double> orders,
                                                    EpsilonConversion conversion) {
  RETURN_IF_ERROR(ValidateOrders(orders));
  return RdpAccountant(std::move(orders), conversion);
}

absl::StatusOr<std::vector<double>> RdpAccountant::RoundRdp(
    const SampledGaussianRound& round) const {
  RETURN_IF_ERROR(ValidateMechanism(round.sampling_rate, round.noise_multiplier));
  std::vector<double> out(orders_.size());
  for (size_t i = 0; i < orders_.size(); ++i) {
    const double one =
        SampledGaussianRdpUnchecked(round.sampling_rate, round.noise_multiplier, orders_[i]);
    out[i] = round.steps == 0 ? 0.0 : one * static_cast<double>(round.steps);
  }
  return out;
}

absl::Status RdpAccountant::AddRound(const SampledGaussianRound& round) {
  ASSIGN_OR_RETURN(std::vector<double> add, RoundRdp(round));
  std::vector<double> next = rdp_;
  bool any_finite = false;
  for (size_t i = 0; i < next.size(); ++i) {
    next[i] += add[i];
    any_finite = any_finite || std::isfinite(next[i]);
  }
  if (!any_finite) {
    return absl::InvalidArgumentError(absl::StrCat(
        "round with sampling_rate ", round.sampling_rate, " and noise_multiplier ",
        round.noise_multiplier, " has infinite RDP at every order (no privacy); not recorded"));
  }
  rdp_ = std::move(next);
  ++rounds_;
  steps_ += round.steps;
  return absl::OkStatus();
}

absl::StatusOr<EpsilonResult> RdpAccountant::EpsilonFor(double delta) const {
  return EpsilonFromRdp(orders_, rdp_, delta, conversion_);
}

absl::StatusOr<EpsilonResult> RdpAccountant::EpsilonAfter(const SampledGaussianRound& next,
                                                          double delta) const {
  RETURN_IF_ERROR(ValidateDelta(delta));
  ASSIGN_OR_RETURN(std::vector<double> add, RoundRdp(next));
  for (size_t i = 0; i < add.size(); ++i) add[i] += rdp_[i];
  return EpsilonFromRdp(orders_, add, delta, conversion_);
}

absl::StatusOr<bool> RdpAccountant::WouldExceed(double budget_epsilon, double delta,
                                                const SampledGaussianRound& next) const {
  if (!(budget_epsilon > 0) || std::isnan(budget_epsilon)) {
    return absl::InvalidArgumentError(
        absl::StrCat("budget epsilon must be > 0, found ", budget_epsilon));
  }
  ASSIGN_OR_RETURN(EpsilonResult after, EpsilonAfter(next, delta));
  return after.epsilon > budget_epsilon;
}

std::string RdpAccountant::ToJson() const {
  nlohmann::json j;
  j["version"] = 1;
  j["conversion"] = ConversionName(conversion_);
  j["orders"] = orders_;
  // JSON has no infinity; an order whose RDP overflowed is written as "inf".
  nlohmann::json rdp = nlohmann::json::array();
  for (double r : rdp_) {
    if (std::isinf(r)) {
      rdp.push_back("inf");
    } else {
      rdp.push_back(r);
    }
  }
  j["rdp"] = std::move(rdp);
  j["rounds"] = rounds_;
  j["steps"] = steps_;
  return j.dump();
}

absl::StatusOr<RdpAccountant> RdpAccountant::FromJson(std::string_view json) {
  nlohmann::json j = nlohmann::json::parse(json.begin(), json.end(), nullptr,
                                           /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("RDP accountant state: not a JSON object");
  }
  auto field = [&](const char* name) -> absl::StatusOr<const nlohmann::json*> {
    auto it = j.find(name);
    if (it == j.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("RDP accountant state: missing field '", name, "'"));
    }
    return &*it;
  };
  ASSIGN_OR_RETURN(const nlohmann::json* version, field("version"));
  if (!version->is_number_integer() || version->get<int64_t>() != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("RDP accountant state: 'version' must be 1, found ", version->dump()));
  }
  ASSIGN_OR_RETURN(const nlohmann::json* conv, field("conversion"));
  EpsilonConversion conversion;
  if (conv->is_string() && conv->get<std::string>() == "classic") {
    conversion = EpsilonConversion::kClassic;
  } else if (conv->is_string() && conv->get<std::string>() == "improved") {
    conversion = EpsilonConversion::kImproved;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "RDP accountant state: 'conversion' must be \"classic\" or \"improved\", found ",
        conv->dump()));
  }
  auto numbers = [&](const char* name, bool allow_inf) -> absl::StatusOr<std::vector<double>> {
    ASSIGN_OR_RETURN(const nlohmann::json* arr, field(name));
    if (!arr->is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat("RDP accountant state: '", name, "' must be an array"));
    }
    std::vector<double> out;
    for (size_t i = 0; i < arr->size(); ++i) {
      const nlohmann::json& v = (*arr)[i];
      if (allow_inf && v.is_string() && v.get<std::string>() == "inf") {
        out.push_back(kInf);
        continue;
      }
      if (!v.is_number()) {
        return absl::InvalidArgumentError(absl::StrCat("RDP accountant state: '", name, "[",
                                                       i, "]' must be a number, found ",
                                                       v.dump()));
      }
      out.push_back(v.get<double>());
    }
    return out;
  };
  ASSIGN_OR_RETURN(std::vector<double> orders, numbers("orders", false));
  ASSIGN_OR_RETURN(std::vector<double> rdp, numbers("rdp", true));
  absl::Status s = ValidateOrders(orders);
  if (!s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("RDP accountant state: ", s.message()));
  }
  if (rdp.size() != orders.size()) {
    return absl::InvalidArgumentError(absl::StrCat("RDP accountant state: ", orders.size(),
                                                   " orders but ", rdp.size(), " rdp values"));
  }
  for (size_t i = 0; i < rdp.size(); ++i) {
    if (!(rdp[i] >= 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "RDP accountant state: 'rdp[", i, "]' must be >= 0, found ", rdp[i]));
    }
  }
  uint64_t counts[2];
  const char* names[2] = {"rounds", "steps"};
  for (int k = 0; k < 2; ++k) {
    ASSIGN_OR_RETURN(const nlohmann::json* v, field(names[k]));
    if (!v->is_number_unsigned() && !(v->is_number_integer() && v->get<int64_t>() >= 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "RDP accountant state: '", names[k], "' must be an integer >= 0, found ", v->dump()));
    }
    counts[k] = v->get<uint64_t>();
  }
  RdpAccountant acc(std::move(orders), conversion);
  acc.rdp_ = std::move(rdp);
  acc.rounds_ = counts[0];
  acc.steps_ = counts[1];
  return acc;
}

}  // namespace fedlora::common
