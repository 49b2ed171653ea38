#pragma once
// The agent's side of one secure-aggregation round (docs/privacy.md), torch-free:
// holds the adapter before and after local training until the coordinator's
// protocol messages arrive, then drives common::secagg::Client.
//
//   SecAggClientRound r = Create(task, before, after, ...)   // after training
//   send r.Ready()                                 (shapes, weight, metrics only)
//   OnSetup(SecAggSetup)      -> AdvertiseKeys message to send
//   OnMessage(KeyDirectory)   -> ShareKeys message to send
//   OnMessage(ShareDelivery)  -> masked input to upload with SubmitUpdate(masked)
//   OnMessage(UnmaskRequest)  -> UnmaskResponse message to send
//
// What is encoded: the adapter after training, or with DP (task.secagg.dp_clip_norm
// > 0) before + clip(after - before, C) + this agent's Gaussian noise share
// (common/privacy/dp.h, m = SecAggSetup.noise_shares), flattened in the layout's
// name order and encoded in fixed point with the setup's range and scale. The
// base adapter is public (every participant starts from it), so the sum's
// sensitivity to one agent is C. Nothing of the update leaves unmasked.
//
// Every input is checked (round id, party id, layout equal to ours, codec
// parameters reproducible); a bad message is an error and changes nothing.
// Not thread-safe: the agent's session thread drives it.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "common/secagg/fixed_point.h"
#include "common/secagg/protocol.h"
#include "common/tensor/tensor.h"
#include "fedlora/v1/fedlora.pb.h"

namespace fedlora::edge {

class SecAggClientRound {
 public:
  // `before`/`after`: the adapter at the start and end of local training (same
  // names and shapes). `seeded_noise`: a deterministic noise seed for tests and
  // simulations (nullopt = cryptographic noise, the only choice for real agents).
  static absl::StatusOr<std::unique_ptr<SecAggClientRound>> Create(
      const v1::RoundTask& task, common::TensorMap before, common::TensorMap after,
      uint64_t num_examples, const v1::TrainMetrics& metrics,
      std::optional<uint64_t> seeded_noise = std::nullopt);

  uint64_t round_id() const { return task_.round_id(); }
  const v1::RoundTask& task() const { return task_; }
  v1::AgentMessage Ready() const;

  absl::StatusOr<v1::AgentMessage> OnSetup(const v1::SecAggSetup& setup);

  struct Output {
    std::optional<v1::AgentMessage> message;  // to send on the Session
    std::string masked_input;                 // to upload (SubmitUpdate, masked)
  };
  absl::StatusOr<Output> OnMessage(const v1::SecAggMessage& message);

  // L2 norm of after - before, before clipping (DP rounds; 0 otherwise).
  double pre_clip_norm() const { return pre_clip_norm_; }

 private:
  SecAggClientRound() = default;
  absl::StatusOr<std::vector<float>> InputVector();

  v1::RoundTask task_;
  common::TensorMap before_, after_;
  uint64_t num_examples_ = 0;
  v1::TrainMetrics metrics_;
  std::optional<uint64_t> seeded_noise_;
  std::optional<common::secagg::Client> client_;
  std::optional<common::secagg::FixedPointCodec> codec_;
  v1::SecAggSetup setup_;
  double pre_clip_norm_ = 0;
};

}  // namespace fedlora::edge
