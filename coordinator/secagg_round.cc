#include "coordinator/secagg_round.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"
#include "common/secagg/messages.h"
#include "common/status/status.h"

namespace fedlora::coordinator {

namespace sa = common::secagg;

absl::StatusOr<uint64_t> LayoutSize(const ShapeMap& layout) {
  uint64_t total = 0;
  for (const auto& [name, dims] : layout) {
    uint64_t n = 1;
    for (int64_t d : dims) {
      if (d < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("layout tensor '", name, "' has a negative dimension ", d));
      }
      if (d != 0 && n > std::numeric_limits<uint32_t>::max() / static_cast<uint64_t>(d)) {
        return absl::InvalidArgumentError(
            absl::StrCat("layout tensor '", name, "' has more than 2^32 elements"));
      }
      n *= static_cast<uint64_t>(d);
    }
    total += n;
    if (total > std::numeric_limits<uint32_t>::max()) {
      return absl::InvalidArgumentError("the layout has more than 2^32 elements in all");
    }
  }
  return total;
}

ShapeMap LayoutFromProto(const google::protobuf::RepeatedPtrField<v1::TensorShape>& shapes) {
  ShapeMap out;
  for (const v1::TensorShape& s : shapes) {
    out[s.name()] = std::vector<int64_t>(s.dims().begin(), s.dims().end());
  }
  return out;
}

void LayoutToProto(const ShapeMap& layout,
                   google::protobuf::RepeatedPtrField<v1::TensorShape>* out) {
  for (const auto& [name, dims] : layout) {
    v1::TensorShape* s = out->Add();
    s->set_name(name);
    for (int64_t d : dims) s->add_dims(d);
  }
}

absl::StatusOr<std::unique_ptr<SecAggRound>> SecAggRound::Create(
    uint64_t round_id, std::vector<std::string> cohort, ShapeMap layout,
    const SecAggRoundOptions& options) {
  std::sort(cohort.begin(), cohort.end());
  if (std::adjacent_find(cohort.begin(), cohort.end()) != cohort.end()) {
    return absl::InvalidArgumentError("secure-aggregation cohort has a duplicate agent");
  }
  if (cohort.size() < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("secure aggregation needs at least 2 agents, found ", cohort.size()));
  }
  if (layout.empty()) return absl::InvalidArgumentError("secure aggregation: empty layout");
  ASSIGN_OR_RETURN(uint64_t p, LayoutSize(layout));
  if (p == 0) return absl::InvalidArgumentError("secure aggregation: the layout has no elements");
  sa::SecAggConfig config;
  config.round_id = round_id;
  config.round_seed = common::RandomBytes(32);
  for (size_t i = 0; i < cohort.size(); ++i) config.cohort.push_back(static_cast<uint32_t>(i + 1));
  config.neighbours = static_cast<int>(options.neighbours);
  config.threshold = static_cast<int>(options.threshold);
  config.vector_length = p;
  config.threads = std::max(1, options.unmask_threads);
  ASSIGN_OR_RETURN(sa::Server server, sa::Server::Create(config));
  sa::FixedPointConfig fp;
  fp.clip = options.clip_range;
  fp.max_agents = static_cast<int>(cohort.size());
  ASSIGN_OR_RETURN(sa::FixedPointCodec codec, sa::FixedPointCodec::Create(fp));
  std::string seed = config.round_seed;
  auto round = std::unique_ptr<SecAggRound>(
      new SecAggRound(round_id, std::move(cohort), std::move(layout), p, std::move(seed), options,
                      std::move(server), std::move(codec)));
  round->expected_ = std::set<std::string>(round->cohort_.begin(), round->cohort_.end());
  return round;
}

SecAggRound::SecAggRound(uint64_t round_id, std::vector<std::string> cohort, ShapeMap layout,
                         uint64_t vector_length, std::string seed, SecAggRoundOptions options,
                         sa::Server server, sa::FixedPointCodec codec)
    : round_id_(round_id),
      cohort_(std::move(cohort)),
      layout_(std::move(layout)),
      vector_length_(vector_length),
      seed_(std::move(seed)),
      options_(options),
      server_(std::move(server)),
      codec_(std::move(codec)) {}

uint32_t SecAggRound::noise_shares() const {
  return std::max<uint32_t>(static_cast<uint32_t>(threshold()), options_.min_contributors);
}

v1::CoordinatorMessage SecAggRound::SetupFor(const std::string& agent) const {
  v1::CoordinatorMessage msg;
  v1::SecAggSetup* s = msg.mutable_secagg_setup();
  s->set_round_id(round_id_);
  auto it = std::lower_bound(cohort_.begin(), cohort_.end(), agent);
  s->set_party_id(it != cohort_.end() && *it == agent
                      ? static_cast<uint32_t>(it - cohort_.begin() + 1)
                      : 0);
  for (size_t i = 0; i < cohort_.size(); ++i) s->add_cohort(static_cast<uint32_t>(i + 1));
  s->set_round_seed(seed_);
  s->set_neighbours(static_cast<uint32_t>(server_.plan().config().neighbours));
  s->set_threshold(static_cast<uint32_t>(threshold()));
  s->set_vector_length(vector_length_);
  s->set_clip_range(codec_.clip());
  s->set_scale(codec_.scale());
  s->set_max_agents(static_cast<uint32_t>(codec_.max_agents()));
  LayoutToProto(layout_, s->mutable_layout());
  s->set_noise_shares(noise_shares());
  return msg;
}

absl::StatusOr<uint32_t> SecAggRound::PartyOf(const std::string& agent) const {
  auto it = std::lower_bound(cohort_.begin(), cohort_.end(), agent);
  if (it == cohort_.end() || *it != agent) {
    return absl::PermissionDeniedError(absl::StrCat(
        "agent '", agent, "' is not in the secure-aggregation cohort of round ", round_id_));
  }
  return static_cast<uint32_t>(it - cohort_.begin() + 1);
}

absl::Status SecAggRound::Handle(const std::string& agent, const std::string& bytes) {
  ASSIGN_OR_RETURN(uint32_t party, PartyOf(agent));
  ASSIGN_OR_RETURN(sa::MessageHeader header, sa::MessageHeader::Parse(bytes));
  const std::string who = absl::StrCat("secure-aggregation message from agent '", agent, "'");
  if (header.round_id != round_id_) {
    return absl::FailedPreconditionError(
        absl::StrCat(who, " is for round ", header.round_id, ", the open round is ", round_id_));
  }
  if (header.party != party) {
    return absl::PermissionDeniedError(absl::StrCat(who, " names party ", header.party,
                                                    "; the agent's party id is ", party));
  }
  sa::MessageType want;
  switch (step_) {
    case Step::kAdvertise: want = sa::MessageType::kAdvertiseKeys; break;
    case Step::kShare: want = sa::MessageType::kShareKeys; break;
    case Step::kUnmask: want = sa::MessageType::kUnmaskResponse; break;
    default:
      return absl::FailedPreconditionError(
          absl::StrCat(who, " arrived while the round expects masked inputs or is finishing"));
  }
  if (header.type != want) {
    return absl::FailedPreconditionError(absl::StrCat(who, " has message type ",
                                                      static_cast<int>(header.type),
                                                      ", the phase expects type ",
                                                      static_cast<int>(want)));
  }
  if (!expected_.count(agent)) {
    return absl::FailedPreconditionError(
        absl::StrCat(who, ": the agent dropped out of an earlier phase of round ", round_id_));
  }
  if (answered_.count(agent)) {
    return absl::AlreadyExistsError(absl::StrCat(who, ": already answered this phase"));
  }
  switch (step_) {
    case Step::kAdvertise: RETURN_IF_ERROR(server_.HandleAdvertiseKeys(bytes)); break;
    case Step::kShare: RETURN_IF_ERROR(server_.HandleShareKeys(bytes)); break;
    default: RETURN_IF_ERROR(server_.HandleUnmaskResponse(bytes)); break;
  }
  answered_.insert(agent);
  return absl::OkStatus();
}

uint64_t SecAggRound::masked_input_bytes() const {
  sa::MaskedInput empty;
  empty.round_id = round_id_;
  return empty.Serialize().size() + 4 * vector_length_;
}

absl::Status SecAggRound::CheckMaskedInputFrom(const std::string& agent) const {
  RETURN_IF_ERROR(PartyOf(agent).status());
  if (step_ != Step::kMasked) {
    return absl::FailedPreconditionError(absl::StrCat(
        "round ", round_id_, " does not accept masked inputs now (secure-aggregation step ",
        static_cast<int>(step_), ")"));
  }
  if (!expected_.count(agent)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "agent '", agent, "' dropped out of the key exchange of round ", round_id_));
  }
  if (masked_.count(agent)) {
    return absl::AlreadyExistsError(
        absl::StrCat("agent '", agent, "' already sent its masked input for round ", round_id_));
  }
  return absl::OkStatus();
}

absl::Status SecAggRound::HandleMaskedInput(const std::string& agent, const std::string& bytes) {
  RETURN_IF_ERROR(CheckMaskedInputFrom(agent));
  ASSIGN_OR_RETURN(uint32_t party, PartyOf(agent));
  ASSIGN_OR_RETURN(sa::MessageHeader header, sa::MessageHeader::Parse(bytes));
  if (header.type != sa::MessageType::kMaskedInput || header.party != party ||
      header.round_id != round_id_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "masked input of agent '", agent, "': expected a MaskedInput of party ", party,
        " for round ", round_id_, ", found type ", static_cast<int>(header.type), " party ",
        header.party, " round ", header.round_id));
  }
  RETURN_IF_ERROR(server_.HandleMaskedInput(bytes));
  masked_.insert(agent);
  answered_.insert(agent);
  return absl::OkStatus();
}

void SecAggRound::Drop(const std::string& agent) {
  if (!answered_.count(agent)) expected_.erase(agent);
}

bool SecAggRound::PhaseComplete() const {
  if (step_ == Step::kFinal) return true;
  for (const std::string& a : expected_) {
    if (!answered_.count(a)) return false;
  }
  return true;
}

std::vector<std::string> SecAggRound::masked_senders() const {
  return std::vector<std::string>(masked_.begin(), masked_.end());
}

absl::StatusOr<std::vector<std::pair<std::string, v1::CoordinatorMessage>>>
SecAggRound::ClosePhase() {
  std::vector<std::pair<std::string, v1::CoordinatorMessage>> out;
  auto wrap = [&](uint32_t id, absl::StatusOr<std::string> bytes) -> absl::Status {
    RETURN_IF_ERROR(bytes.status());
    v1::CoordinatorMessage msg;
    msg.mutable_secagg()->set_round_id(round_id_);
    msg.mutable_secagg()->set_data(std::move(*bytes));
    out.emplace_back(AgentOf(id), std::move(msg));
    return absl::OkStatus();
  };
  switch (step_) {
    case Step::kAdvertise:
      RETURN_IF_ERROR(server_.CloseAdvertiseKeys());
      for (uint32_t id : server_.Survivors()) RETURN_IF_ERROR(wrap(id, server_.KeyDirectoryFor(id)));
      step_ = Step::kShare;
      break;
    case Step::kShare:
      RETURN_IF_ERROR(server_.CloseShareKeys());
      for (uint32_t id : server_.Survivors()) RETURN_IF_ERROR(wrap(id, server_.ShareDeliveryFor(id)));
      step_ = Step::kMasked;
      break;
    case Step::kMasked: {
      if (masked_.size() < options_.min_contributors) {
        return absl::FailedPreconditionError(
            absl::StrCat(masked_.size(), " masked inputs arrived; the round needs at least ",
                         options_.min_contributors));
      }
      RETURN_IF_ERROR(server_.CloseMaskedInput());
      for (uint32_t id : server_.Survivors()) RETURN_IF_ERROR(wrap(id, server_.UnmaskRequestFor(id)));
      step_ = Step::kUnmask;
      break;
    }
    case Step::kUnmask:
      step_ = Step::kFinal;
      break;
    case Step::kFinal:
      return absl::FailedPreconditionError("the secure-aggregation protocol already finished");
  }
  answered_.clear();
  expected_.clear();
  for (const auto& [agent, msg] : out) expected_.insert(agent);
  return out;
}

absl::StatusOr<SecAggRound::Result> SecAggRound::Finalize() {
  if (step_ != Step::kFinal) {
    return absl::FailedPreconditionError("Finalize before the unmask phase closed");
  }
  ASSIGN_OR_RETURN(sa::SecAggResult result, server_.Finalize());
  const int n = static_cast<int>(result.contributors.size());
  ASSIGN_OR_RETURN(std::vector<float> sum, codec_.DecodeSum(result.sum, n));
  Result out;
  for (uint32_t id : result.contributors) out.contributors.push_back(AgentOf(id));
  std::sort(out.contributors.begin(), out.contributors.end());
  size_t offset = 0;
  const float inv = 1.0f / static_cast<float>(n);
  for (const auto& [name, dims] : layout_) {
    size_t count = 1;
    for (int64_t d : dims) count *= static_cast<size_t>(d);
    std::vector<float> values(sum.begin() + offset, sum.begin() + offset + count);
    for (float& v : values) v *= inv;
    offset += count;
    out.mean[name] = common::HostTensor{dims, std::move(values)};
  }
  return out;
}

}  // namespace fedlora::coordinator
