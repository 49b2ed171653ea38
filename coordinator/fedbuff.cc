#include "coordinator/fedbuff.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace fedlora::coordinator {
namespace {

std::string ShapeStr(const std::vector<int64_t>& shape) {
  return "[" + absl::StrJoin(shape, ",") + "]";
}

// Same names and shapes as `reference`, and the values the shape needs.
absl::Status CheckLike(const common::TensorMap& map, const std::string& what,
                       const std::map<std::string, std::vector<int64_t>>& reference,
                       const std::string& reference_name) {
  if (map.size() != reference.size()) {
    return absl::InvalidArgumentError(absl::StrCat(what, " has ", map.size(), " tensors, ",
                                                   reference_name, " has ", reference.size()));
  }
  for (const auto& [name, t] : map) {
    auto it = reference.find(name);
    if (it == reference.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": tensor '", name, "' is not in ", reference_name));
    }
    if (it->second != t.shape) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": tensor '", name, "' ",
                                                     ShapeStr(t.shape), " differs from ",
                                                     reference_name, "'s ", ShapeStr(it->second)));
    }
    if (static_cast<size_t>(t.numel()) != t.data.size()) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": tensor '", name, "' shape ",
                                                     ShapeStr(t.shape), " needs ", t.numel(),
                                                     " values, found ", t.data.size()));
    }
  }
  return absl::OkStatus();
}

std::map<std::string, std::vector<int64_t>> Shapes(const common::TensorMap& map) {
  std::map<std::string, std::vector<int64_t>> out;
  for (const auto& [name, t] : map) out[name] = t.shape;
  return out;
}

}  // namespace

const char* StalenessWeightName(StalenessWeight weight) {
  switch (weight) {
    case StalenessWeight::kConstant:
      return "constant";
    case StalenessWeight::kPolynomial:
      return "polynomial";
  }
  return "unknown";
}

absl::StatusOr<StalenessWeight> ParseStalenessWeight(std::string_view name) {
  for (StalenessWeight w : {StalenessWeight::kConstant, StalenessWeight::kPolynomial}) {
    if (name == StalenessWeightName(w)) return w;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("expected constant or polynomial, found '", std::string(name), "'"));
}

double StalenessFactor(StalenessWeight weight, double exponent, uint64_t staleness) {
  if (weight == StalenessWeight::kConstant) return 1.0;
  return 1.0 / std::pow(1.0 + static_cast<double>(staleness), exponent);
}

FedBuffAggregator::FedBuffAggregator(const FedBuffOptions& options,
                                     const common::TensorMap* current)
    : options_(options), current_(current) {}

absl::Status FedBuffAggregator::Add(const common::TensorMap& update, const common::TensorMap* base,
                                    double weight, uint64_t staleness, const std::string& agent) {
  const std::string what = absl::StrCat("update of agent '", agent, "'");
  if (!(weight > 0) || !std::isfinite(weight)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": weight must be finite and > 0, found ", weight));
  }
  if (update.empty()) return absl::InvalidArgumentError(absl::StrCat(what, " holds no tensors"));
  if (current_ == nullptr && base != nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": trained from a stored version, but the buffer has no current version"));
  }
  if (current_ != nullptr && base == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        what,
        ": trained from a fresh adapter, whose initialisation the coordinator does not "
        "know, so its delta to the current version cannot be formed"));
  }
  if (current_ != nullptr) {
    const auto reference = Shapes(*current_);
    if (absl::Status s = CheckLike(update, what, reference, "the current version"); !s.ok()) {
      return s;
    }
    if (absl::Status s =
            CheckLike(*base, what + ": its base version", reference, "the current version");
        !s.ok()) {
      return s;
    }
  } else if (count_ > 0) {
    std::map<std::string, std::vector<int64_t>> reference;
    for (const auto& [name, acc] : sums_) reference[name] = acc.shape;
    if (absl::Status s = CheckLike(update, what, reference, "the first update"); !s.ok()) return s;
  } else {
    if (absl::Status s = CheckLike(update, what, Shapes(update), "itself"); !s.ok()) return s;
  }
  const double ws = weight * StalenessFactor(options_.weight, options_.exponent, staleness);
  if (!(ws > 0) || !std::isfinite(ws)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": staleness-weighted weight is ", ws, "; expected finite and > 0"));
  }
  if (count_ == 0) {
    for (const auto& [name, t] : update) {
      Accumulator& acc = sums_[name];
      acc.shape = t.shape;
      acc.sum.assign(t.data.size(), 0.0);
    }
  }
  for (const auto& [name, t] : update) {
    std::vector<double>& sum = sums_[name].sum;
    const float* u = t.data.data();
    if (base == nullptr) {
      for (size_t i = 0; i < sum.size(); ++i) sum[i] += ws * static_cast<double>(u[i]);
    } else {
      const float* b = base->at(name).data.data();
      for (size_t i = 0; i < sum.size(); ++i) {
        sum[i] += ws * (static_cast<double>(u[i]) - static_cast<double>(b[i]));
      }
    }
  }
  ++count_;
  total_weight_ += ws;
  return absl::OkStatus();
}

absl::StatusOr<common::TensorMap> FedBuffAggregator::Finish() const {
  if (count_ == 0) return absl::FailedPreconditionError("FedBuff flush of an empty buffer");
  common::TensorMap out;
  for (const auto& [name, acc] : sums_) {
    common::HostTensor t;
    t.shape = acc.shape;
    t.data.resize(acc.sum.size());
    if (current_ == nullptr) {
      for (size_t i = 0; i < acc.sum.size(); ++i) {
        t.data[i] = static_cast<float>(acc.sum[i] / total_weight_);
      }
    } else {
      const float* x = current_->at(name).data.data();
      for (size_t i = 0; i < acc.sum.size(); ++i) {
        t.data[i] = static_cast<float>(static_cast<double>(x[i]) +
                                       options_.server_lr * acc.sum[i] / total_weight_);
      }
    }
    out.emplace(name, std::move(t));
  }
  return out;
}

}  // namespace fedlora::coordinator
