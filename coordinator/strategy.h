#pragma once
// Aggregation strategies (docs/aggregation.md): how a round's client adapters
// become the next published adapter.
//
//   fedavg       weighted mean of the client adapters (weights = num_examples),
//                A and B averaged separately (FedAvgAggregator). The default.
//   fedprox      aggregation as fedavg; agents add (mu/2) ||w - w_round||^2 to
//                their loss (RoundTask.prox_mu).
//   fedadam      server Adam on the pseudo-gradient (Reddi et al. 2021, Alg. 2):
//   fedyogi      with Delta = mean(client adapters) - x (x = the current version):
//                  m = b1 m + (1 - b1) Delta
//                  v = b2 v + (1 - b2) Delta^2                    (adam)
//                  v = v - (1 - b2) Delta^2 sign(v - Delta^2)     (yogi)
//                  x' = x + server_lr * m / (sqrt(v) + tau)
//                m starts at 0, v at tau^2. (Delta = -g with g = x - mean the
//                pseudo-gradient; the step is x - lr * m_g / (sqrt(v) + tau).)
//                A round with no current version (fresh LoRA: the coordinator
//                does not know the agents' seeded init) is aggregated as fedavg
//                and leaves m = 0, v = tau^2.
//   ffa-lora     A frozen fleet-wide (RoundTask.freeze_lora_a); every update's A
//                must be bit-identical to the reference A (the current version's,
//                or the first update's in a fresh round), else the update is
//                refused; B averaged. Then mean(B_i A) = mean(B_i) A exactly.
//   lora-product the exact mean of the products s B_i A_i, re-factored to rank r
//                by truncated SVD (ProductAggregator, coordinator/lora_product.h).
//
// Usage (one round, streaming: memory O(adapter size), or O(dense module size)
// for lora-product, never O(updates)):
//
//   ASSIGN_OR_RETURN(auto agg, RoundAggregator::Create(input));
//   for (each update) RETURN_IF_ERROR(agg->Add(update, num_examples, agent_id));
//   ASSIGN_OR_RETURN(AggregationResult result, agg->Finish());
//
// A failed Add leaves the aggregator unchanged (so the caller may skip the
// update). Not thread-safe; pure functions are safe for concurrent use.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/tensor/tensor.h"

namespace fedlora::coordinator {

enum class Strategy { kFedAvg, kFedProx, kFedAdam, kFedYogi, kFfaLora, kLoraProduct };

// "fedavg", "fedprox", "fedadam", "fedyogi", "ffa-lora", "lora-product".
const char* StrategyName(Strategy strategy);
// InvalidArgument listing the known names.
absl::StatusOr<Strategy> ParseStrategy(std::string_view name);
bool IsAdaptive(Strategy strategy);  // fedadam, fedyogi

// Defaults: beta1 = 0.9 and beta2 = 0.99 as fixed in Reddi et al. 2021 (Sec. 5);
// tau = 1e-3 and server_lr = 1e-2 from the middle of the grids they tune over.
struct StrategyParams {
  Strategy strategy = Strategy::kFedAvg;
  double prox_mu = 0.01;  // fedprox
  double server_lr = 1e-2;
  double beta1 = 0.9;
  double beta2 = 0.99;
  double tau = 1e-3;
};
// InvalidArgument naming the field: prox_mu >= 0, server_lr > 0, beta1 and beta2
// in [0, 1), tau > 0, all finite.
absl::Status ValidateStrategyParams(const StrategyParams& params);

// The server optimizer's moments, persisted with the version they produced.
struct ServerOptimizerState {
  uint64_t steps = 0;       // adaptive rounds applied
  common::TensorMap m;      // same names and shapes as the adapter
  common::TensorMap v;
};
// Safetensors (F32, exact) with tensors "m/<name>" and "v/<name>" and metadata
// "fedlora.server_state" = "v1", "fedlora.strategy", "fedlora.steps".
std::string EncodeServerState(const ServerOptimizerState& state, Strategy strategy);
// InvalidArgument naming `where` for anything that is not such a blob.
absl::StatusOr<ServerOptimizerState> DecodeServerState(std::string bytes, const std::string& where);

// One adaptive server step (fedadam or fedyogi) in place on `state`, returning x'.
// `state` empty (steps == 0 and no tensors) starts from m = 0, v = tau^2. Every
// tensor of `mean` must be in `global` (and in a non-empty state) with the same
// shape: InvalidArgument naming it otherwise, and `state` is left unchanged.
absl::StatusOr<common::TensorMap> AdaptiveServerStep(const StrategyParams& params,
                                                     const common::TensorMap& global,
                                                     const common::TensorMap& mean,
                                                     ServerOptimizerState* state);

// What a round's aggregation knows besides the updates.
struct AggregationInput {
  StrategyParams params;
  uint32_t lora_rank = 0;
  double lora_alpha = 0;
  // The current version's adapter (decoded blob) the agents started from; null in
  // a fresh-LoRA round.
  const common::TensorMap* global = nullptr;
  // The current version's server optimizer state (adaptive strategies); null = none.
  const ServerOptimizerState* state = nullptr;
};

struct AggregationResult {
  common::TensorMap adapter;
  std::optional<double> discarded_energy;           // lora-product
  std::optional<ServerOptimizerState> server_state;  // fedadam / fedyogi
};

class RoundAggregator {
 public:
  virtual ~RoundAggregator() = default;
  static absl::StatusOr<std::unique_ptr<RoundAggregator>> Create(const AggregationInput& input);

  // `agent` names the update in errors.
  virtual absl::Status Add(const common::TensorMap& update, double weight,
                           const std::string& agent) = 0;
  virtual absl::StatusOr<AggregationResult> Finish() = 0;
};

// FFA-LoRA's check: every "<module>.lora_A.weight" of `update` is bit-identical to
// the same tensor of `reference`. FailedPrecondition naming the agent, the tensor,
// the first differing index and the largest difference otherwise.
absl::Status CheckFrozenA(const common::TensorMap& update, const common::TensorMap& reference,
                          const std::string& agent);

}  // namespace fedlora::coordinator
