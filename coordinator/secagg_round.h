#pragma once
// The coordinator's side of one secure-aggregation round (docs/privacy.md): the
// common::secagg::Server of common/secagg/protocol.h bound to agent ids, the
// round's fixed-point codec and tensor layout, and the phase bookkeeping the
// RoundManager drives.
//
//   cohort (agents that reported SecAggReady, sorted) -> party ids 1..n
//   SetupFor(agent)              SecAggSetup for each member (send all of them)
//   Handle(agent, bytes)         AdvertiseKeys / ShareKeys / UnmaskResponse
//   HandleMaskedInput(agent, b)  the SubmitUpdate payload (folded into the sum)
//   PhaseComplete() or deadline -> ClosePhase(): messages for the next phase
//   after the unmask phase: Finalize() -> the MEAN adapter of the contributors
//
// Every message is checked to come from the agent whose party id it names
// (the TLS identity), for the current phase and this round; a refused message
// changes nothing (the sender is then treated as dropped when the phase closes).
// ClosePhase fails (and the round must abort) when too few agents remain for
// the threshold t or for `min_contributors`.
//
// What the coordinator learns: shapes, the agents' metrics, the masked inputs
// (uniformly random words to it) and the unmasked SUM. Nothing here is stored:
// a coordinator restarted mid-protocol aborts the round (RoundManager).
// Not thread-safe: the RoundManager calls it from its manager thread, except
// Finalize, which it runs alone on a worker while no other call is made.

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/secagg/fixed_point.h"
#include "common/secagg/protocol.h"
#include "common/tensor/tensor.h"
#include "coordinator/state_store.h"
#include "fedlora/v1/fedlora.pb.h"

namespace fedlora::coordinator {

struct SecAggRoundOptions {
  uint32_t neighbours = 0;     // k; 0 = common::secagg::DefaultNeighbours
  uint32_t threshold = 0;      // t; 0 = common::secagg::DefaultThreshold
  double clip_range = 1.0;     // fixed-point R
  uint32_t min_contributors = 1;  // fewest masked inputs that may be released
  int unmask_threads = 1;
};

// Number of scalars in a layout, InvalidArgument for a negative dimension or
// more than 2^32 words (the protocol's limit).
absl::StatusOr<uint64_t> LayoutSize(const ShapeMap& layout);
ShapeMap LayoutFromProto(const google::protobuf::RepeatedPtrField<v1::TensorShape>& shapes);
void LayoutToProto(const ShapeMap& layout,
                   google::protobuf::RepeatedPtrField<v1::TensorShape>* out);

class SecAggRound {
 public:
  enum class Step { kAdvertise, kShare, kMasked, kUnmask, kFinal };

  // `cohort`: agent ids, unique (sorted here). InvalidArgument for a cohort of
  // fewer than 2, an empty layout, or a bad k / t / R.
  static absl::StatusOr<std::unique_ptr<SecAggRound>> Create(uint64_t round_id,
                                                             std::vector<std::string> cohort,
                                                             ShapeMap layout,
                                                             const SecAggRoundOptions& options);

  // The setup message of `agent` (a cohort member); noise_shares is
  // max(t, min_contributors): the fewest survivors that release a sum.
  v1::CoordinatorMessage SetupFor(const std::string& agent) const;

  // A Session message of the current phase from `agent`.
  absl::Status Handle(const std::string& agent, const std::string& bytes);
  // Whether `agent` may upload its masked input now (precheck of SubmitUpdate).
  absl::Status CheckMaskedInputFrom(const std::string& agent) const;
  // Expected size of a MaskedInput payload.
  uint64_t masked_input_bytes() const;
  absl::Status HandleMaskedInput(const std::string& agent, const std::string& bytes);

  // `agent` left (its session ended): it is no longer waited for in this phase
  // (the protocol then treats it as dropped). No-op for an agent that answered.
  void Drop(const std::string& agent);
  // Every agent still expected in this phase has answered.
  bool PhaseComplete() const;
  // Closes the current phase. Returns the messages (agent -> message) that open
  // the next one; after kUnmask returns none and the step becomes kFinal.
  // FailedPrecondition when the round cannot continue (then abort it).
  absl::StatusOr<std::vector<std::pair<std::string, v1::CoordinatorMessage>>> ClosePhase();

  struct Result {
    common::TensorMap mean;                 // sum / contributors, by the layout
    std::vector<std::string> contributors;  // agents in the sum, sorted
  };
  // Step kFinal only: removes the masks, decodes the sum and divides it.
  absl::StatusOr<Result> Finalize();

  Step step() const { return step_; }
  uint64_t round_id() const { return round_id_; }
  const std::vector<std::string>& cohort() const { return cohort_; }
  // Agents whose masked input arrived (U3 once the masked phase closed).
  std::vector<std::string> masked_senders() const;
  int threshold() const { return server_.plan().threshold(); }
  uint32_t noise_shares() const;
  const common::secagg::FixedPointCodec& codec() const { return codec_; }

 private:
  SecAggRound(uint64_t round_id, std::vector<std::string> cohort, ShapeMap layout,
              uint64_t vector_length, std::string seed, SecAggRoundOptions options,
              common::secagg::Server server, common::secagg::FixedPointCodec codec);
  absl::StatusOr<uint32_t> PartyOf(const std::string& agent) const;
  const std::string& AgentOf(uint32_t party) const { return cohort_[party - 1]; }
  // Members of the set that the current phase expects an answer from.
  std::set<std::string> Expected() const;

  uint64_t round_id_;
  std::vector<std::string> cohort_;  // party id i + 1 = cohort_[i]
  ShapeMap layout_;
  uint64_t vector_length_;
  std::string seed_;
  SecAggRoundOptions options_;
  common::secagg::Server server_;
  common::secagg::FixedPointCodec codec_;
  Step step_ = Step::kAdvertise;
  std::set<std::string> answered_;     // answered in the current phase
  std::set<std::string> masked_;       // masked input received
  std::set<std::string> expected_;     // expected to answer in the current phase
};

}  // namespace fedlora::coordinator
