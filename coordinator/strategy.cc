#include "coordinator/strategy.h"

#include <cmath>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status/status.h"
#include "coordinator/aggregator.h"
#include "coordinator/lora_product.h"

namespace fedlora::coordinator {
namespace {

constexpr Strategy kAll[] = {Strategy::kFedAvg,  Strategy::kFedProx, Strategy::kFedAdam,
                             Strategy::kFedYogi, Strategy::kFfaLora, Strategy::kLoraProduct};

std::string ShapeStr(const std::vector<int64_t>& shape) {
  return "[" + absl::StrJoin(shape, ",") + "]";
}

// fedavg, fedprox: the weighted mean.
class MeanAggregator final : public RoundAggregator {
 public:
  absl::Status Add(const common::TensorMap& update, double weight, const std::string& agent) final {
    absl::Status s = mean_.Add(update, weight);
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat("agent '", agent, "': ", s.message()));
    return s;
  }
  absl::StatusOr<AggregationResult> Finish() final {
    AggregationResult out;
    ASSIGN_OR_RETURN(out.adapter, mean_.Finish());
    return out;
  }

 private:
  FedAvgAggregator mean_;
};

// fedadam, fedyogi: the weighted mean, then one server optimizer step from the
// current version (or, without one, the mean itself).
class AdaptiveAggregator final : public RoundAggregator {
 public:
  explicit AdaptiveAggregator(const AggregationInput& input) : input_(input) {}
  absl::Status Add(const common::TensorMap& update, double weight, const std::string& agent) final {
    if (input_.global != nullptr) {
      // Every update must line up with the version the server step starts from.
      for (const auto& [name, t] : update) {
        auto it = input_.global->find(name);
        if (it == input_.global->end() || it->second.shape != t.shape) {
          return absl::InvalidArgumentError(absl::StrCat(
              "agent '", agent, "': tensor '", name, "' ", ShapeStr(t.shape),
              it == input_.global->end() ? " is not in the current version"
                                         : absl::StrCat(" differs from the current version's ",
                                                        ShapeStr(it->second.shape))));
        }
      }
      if (update.size() != input_.global->size()) {
        return absl::InvalidArgumentError(
            absl::StrCat("agent '", agent, "': ", update.size(), " tensors, the current version has ",
                         input_.global->size()));
      }
    }
    absl::Status s = mean_.Add(update, weight);
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat("agent '", agent, "': ", s.message()));
    return s;
  }
  absl::StatusOr<AggregationResult> Finish() final {
    AggregationResult out;
    ASSIGN_OR_RETURN(common::TensorMap mean, mean_.Finish());
    ServerOptimizerState state;
    if (input_.state != nullptr) state = *input_.state;
    if (input_.global == nullptr) {
      // Fresh LoRA: no x to take a step from; publish the mean, keep the moments.
      out.adapter = std::move(mean);
    } else {
      ASSIGN_OR_RETURN(out.adapter, AdaptiveServerStep(input_.params, *input_.global, mean, &state));
    }
    out.server_state = std::move(state);
    return out;
  }

 private:
  const AggregationInput input_;
  FedAvgAggregator mean_;
};

// ffa-lora: A frozen and copied from the reference, B averaged.
class FfaAggregator final : public RoundAggregator {
 public:
  explicit FfaAggregator(const AggregationInput& input) {
    if (input.global != nullptr) reference_ = *input.global;
  }
  absl::Status Add(const common::TensorMap& update, double weight, const std::string& agent) final {
    ASSIGN_OR_RETURN(auto pairs, PairLoraFactors(update));
    (void)pairs;
    if (!reference_.empty()) RETURN_IF_ERROR(CheckFrozenA(update, reference_, agent));
    common::TensorMap b_only;
    for (const auto& [name, t] : update) {
      if (absl::EndsWith(name, kLoraBSuffix)) b_only.emplace(name, t);
    }
    absl::Status s = mean_b_.Add(b_only, weight);
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat("agent '", agent, "': ", s.message()));
    if (reference_.empty()) {  // fresh round: the first update's A is the fleet's A
      for (const auto& [name, t] : update) {
        if (absl::EndsWith(name, kLoraASuffix)) reference_.emplace(name, t);
      }
    }
    return absl::OkStatus();
  }
  absl::StatusOr<AggregationResult> Finish() final {
    AggregationResult out;
    ASSIGN_OR_RETURN(out.adapter, mean_b_.Finish());
    for (const auto& [name, t] : reference_) {
      if (absl::EndsWith(name, kLoraASuffix)) out.adapter.emplace(name, t);
    }
    return out;
  }

 private:
  common::TensorMap reference_;  // holds at least every lora_A
  FedAvgAggregator mean_b_;
};

class ProductRoundAggregator final : public RoundAggregator {
 public:
  explicit ProductRoundAggregator(const AggregationInput& input)
      : product_(input.lora_alpha / input.lora_rank, input.lora_rank) {}
  absl::Status Add(const common::TensorMap& update, double weight, const std::string& agent) final {
    absl::Status s = product_.Add(update, weight);
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat("agent '", agent, "': ", s.message()));
    return s;
  }
  absl::StatusOr<AggregationResult> Finish() final {
    ASSIGN_OR_RETURN(ProductResult r, product_.Finish());
    AggregationResult out;
    out.adapter = std::move(r.adapter);
    out.discarded_energy = r.discarded_energy_fraction;
    return out;
  }

 private:
  ProductAggregator product_;
};

bool NonNegativeFinite(double x) { return x >= 0 && std::isfinite(x); }

}  // namespace

const char* StrategyName(Strategy strategy) {
  switch (strategy) {
    case Strategy::kFedAvg:
      return "fedavg";
    case Strategy::kFedProx:
      return "fedprox";
    case Strategy::kFedAdam:
      return "fedadam";
    case Strategy::kFedYogi:
      return "fedyogi";
    case Strategy::kFfaLora:
      return "ffa-lora";
    case Strategy::kLoraProduct:
      return "lora-product";
  }
  return "?";
}

absl::StatusOr<Strategy> ParseStrategy(std::string_view name) {
  std::vector<std::string> known;
  for (Strategy s : kAll) {
    if (name == StrategyName(s)) return s;
    known.push_back(StrategyName(s));
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown aggregation strategy '", std::string(name),
                                                 "'; expected one of ",
                                                 absl::StrJoin(known, ", ")));
}

bool IsAdaptive(Strategy strategy) {
  return strategy == Strategy::kFedAdam || strategy == Strategy::kFedYogi;
}

absl::Status ValidateStrategyParams(const StrategyParams& p) {
  auto bad = [](const char* field, const char* expected, double found) {
    return absl::InvalidArgumentError(
        absl::StrCat("aggregation.", field, ": expected ", expected, ", found ", found));
  };
  if (!NonNegativeFinite(p.prox_mu)) return bad("prox_mu", "a finite number >= 0", p.prox_mu);
  if (!(p.server_lr > 0) || !std::isfinite(p.server_lr)) {
    return bad("server_lr", "a finite number > 0", p.server_lr);
  }
  if (!(p.beta1 >= 0 && p.beta1 < 1)) return bad("beta1", "a number in [0, 1)", p.beta1);
  if (!(p.beta2 >= 0 && p.beta2 < 1)) return bad("beta2", "a number in [0, 1)", p.beta2);
  if (!(p.tau > 0) || !std::isfinite(p.tau)) return bad("tau", "a finite number > 0", p.tau);
  return absl::OkStatus();
}

std::string EncodeServerState(const ServerOptimizerState& state, Strategy strategy) {
  common::TensorMap all;
  for (const auto& [name, t] : state.m) all.emplace("m/" + name, t);
  for (const auto& [name, t] : state.v) all.emplace("v/" + name, t);
  common::Metadata metadata{{"fedlora.server_state", "v1"},
                            {"fedlora.strategy", StrategyName(strategy)},
                            {"fedlora.steps", std::to_string(state.steps)}};
  return common::SerializeSafetensors(all, metadata);
}

absl::StatusOr<ServerOptimizerState> DecodeServerState(std::string bytes, const std::string& where) {
  ASSIGN_OR_RETURN(auto file, common::SafetensorsFile::FromBytes(std::move(bytes), where));
  const common::Metadata& md = file->metadata();
  auto tag = md.find("fedlora.server_state");
  if (tag == md.end() || tag->second != "v1") {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": expected metadata fedlora.server_state = v1"));
  }
  ServerOptimizerState state;
  auto steps = md.find("fedlora.steps");
  if (steps == md.end() || !absl::SimpleAtoi(steps->second, &state.steps)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": metadata fedlora.steps is missing or not a number"));
  }
  ASSIGN_OR_RETURN(common::TensorMap all, file->ToTensorMap());
  for (auto& [name, t] : all) {
    if (absl::StartsWith(name, "m/")) {
      state.m.emplace(name.substr(2), std::move(t));
    } else if (absl::StartsWith(name, "v/")) {
      state.v.emplace(name.substr(2), std::move(t));
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": tensor '", name, "' is neither m/<name> nor v/<name>"));
    }
  }
  if (state.m.size() != state.v.size()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", state.m.size(), " m tensors but ",
                                                   state.v.size(), " v tensors"));
  }
  for (const auto& [name, t] : state.m) {
    auto it = state.v.find(name);
    if (it == state.v.end() || it->second.shape != t.shape) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": m/", name, " has no v/", name, " of the same shape"));
    }
  }
  return state;
}

absl::StatusOr<common::TensorMap> AdaptiveServerStep(const StrategyParams& p,
                                                     const common::TensorMap& global,
                                                     const common::TensorMap& mean,
                                                     ServerOptimizerState* state) {
  if (!IsAdaptive(p.strategy)) {
    return absl::InvalidArgumentError(absl::StrCat("strategy '", StrategyName(p.strategy),
                                                   "' has no server optimizer step"));
  }
  const bool fresh = state->m.empty() && state->v.empty();
  for (const auto& [name, t] : mean) {
    auto g = global.find(name);
    if (g == global.end() || g->second.shape != t.shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", name, "' ", ShapeStr(t.shape),
          g == global.end() ? " is not in the current version"
                            : absl::StrCat(" differs from the current version's ",
                                           ShapeStr(g->second.shape))));
    }
    if (!fresh) {
      auto m = state->m.find(name);
      auto v = state->v.find(name);
      if (m == state->m.end() || v == state->v.end() || m->second.shape != t.shape ||
          v->second.shape != t.shape) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor '", name, "': the server optimizer state has no moments of shape ",
            ShapeStr(t.shape)));
      }
    }
  }
  if (!fresh && state->m.size() != mean.size()) {
    return absl::InvalidArgumentError(absl::StrCat("the server optimizer state has ",
                                                   state->m.size(), " tensors, the update ",
                                                   mean.size()));
  }
  const bool yogi = p.strategy == Strategy::kFedYogi;
  ServerOptimizerState next;
  next.steps = state->steps + 1;
  common::TensorMap out;
  for (const auto& [name, t] : mean) {
    const common::HostTensor& x = global.at(name);
    const size_t n = t.data.size();
    common::HostTensor m, v, y;
    m.shape = v.shape = y.shape = t.shape;
    m.data.resize(n);
    v.data.resize(n);
    y.data.resize(n);
    for (size_t i = 0; i < n; ++i) {
      const double delta = static_cast<double>(t.data[i]) - static_cast<double>(x.data[i]);
      const double m0 = fresh ? 0.0 : static_cast<double>(state->m.at(name).data[i]);
      const double v0 = fresh ? p.tau * p.tau : static_cast<double>(state->v.at(name).data[i]);
      const double d2 = delta * delta;
      const double m1 = p.beta1 * m0 + (1 - p.beta1) * delta;
      double v1;
      if (yogi) {
        const double diff = v0 - d2;
        v1 = v0 - (1 - p.beta2) * d2 * static_cast<double>((diff > 0) - (diff < 0));
      } else {
        v1 = p.beta2 * v0 + (1 - p.beta2) * d2;
      }
      m.data[i] = static_cast<float>(m1);
      v.data[i] = static_cast<float>(v1);
      y.data[i] = static_cast<float>(static_cast<double>(x.data[i]) +
                                     p.server_lr * m1 / (std::sqrt(v1) + p.tau));
    }
    next.m.emplace(name, std::move(m));
    next.v.emplace(name, std::move(v));
    out.emplace(name, std::move(y));
  }
  *state = std::move(next);
  return out;
}

absl::Status CheckFrozenA(const common::TensorMap& update, const common::TensorMap& reference,
                          const std::string& agent) {
  for (const auto& [name, t] : update) {
    if (!absl::EndsWith(name, kLoraASuffix)) continue;
    auto it = reference.find(name);
    if (it == reference.end()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "FFA-LoRA: agent '", agent, "' sent '", name, "', which the reference adapter lacks"));
    }
    const common::HostTensor& ref = it->second;
    if (ref.shape != t.shape) {
      return absl::FailedPreconditionError(
          absl::StrCat("FFA-LoRA: agent '", agent, "': tensor '", name, "' has shape ",
                       ShapeStr(t.shape), ", the frozen A has ", ShapeStr(ref.shape)));
    }
    if (t.data.size() == ref.data.size() &&
        std::memcmp(t.data.data(), ref.data.data(), t.data.size() * sizeof(float)) == 0) {
      continue;
    }
    size_t first = t.data.size();
    double max_diff = 0;
    for (size_t i = 0; i < t.data.size() && i < ref.data.size(); ++i) {
      const double d = std::fabs(static_cast<double>(t.data[i]) - ref.data[i]);
      if (std::memcmp(&t.data[i], &ref.data[i], sizeof(float)) != 0 && first == t.data.size()) {
        first = i;
      }
      if (d > max_diff || std::isnan(d)) max_diff = d;
    }
    return absl::FailedPreconditionError(absl::StrCat(
        "FFA-LoRA: agent '", agent, "' changed the frozen tensor '", name,
        "' (first difference at flat index ", first, ", max |diff| ", max_diff,
        "); with ffa-lora every lora_A must equal the round's A bit for bit (is the agent "
        "honouring RoundTask.freeze_lora_a?)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<RoundAggregator>> RoundAggregator::Create(
    const AggregationInput& input) {
  RETURN_IF_ERROR(ValidateStrategyParams(input.params));
  switch (input.params.strategy) {
    case Strategy::kFedAvg:
    case Strategy::kFedProx:
      return std::unique_ptr<RoundAggregator>(new MeanAggregator());
    case Strategy::kFedAdam:
    case Strategy::kFedYogi:
      return std::unique_ptr<RoundAggregator>(new AdaptiveAggregator(input));
    case Strategy::kFfaLora:
      return std::unique_ptr<RoundAggregator>(new FfaAggregator(input));
    case Strategy::kLoraProduct:
      if (input.lora_rank < 1 || !(input.lora_alpha > 0)) {
        return absl::InvalidArgumentError(
            absl::StrCat("lora-product needs lora_rank >= 1 and lora_alpha > 0, found rank ",
                         input.lora_rank, " alpha ", input.lora_alpha));
      }
      return std::unique_ptr<RoundAggregator>(new ProductRoundAggregator(input));
  }
  return absl::InvalidArgumentError("unknown strategy");
}

}  // namespace fedlora::coordinator
