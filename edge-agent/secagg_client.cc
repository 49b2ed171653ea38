#include "edge-agent/secagg_client.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/privacy/dp.h"
#include "common/secagg/messages.h"
#include "common/status/status.h"

namespace fedlora::edge {

namespace sa = common::secagg;

absl::StatusOr<std::unique_ptr<SecAggClientRound>> SecAggClientRound::Create(
    const v1::RoundTask& task, common::TensorMap before, common::TensorMap after,
    uint64_t num_examples, const v1::TrainMetrics& metrics,
    std::optional<uint64_t> seeded_noise) {
  if (!task.secagg().enabled()) {
    return absl::InvalidArgumentError("the round task does not enable secure aggregation");
  }
  if (after.empty()) return absl::InvalidArgumentError("secure aggregation: empty adapter");
  for (const auto& [name, t] : after) {
    auto it = before.find(name);
    if (it == before.end() || it->second.shape != t.shape ||
        it->second.data.size() != t.data.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "secure aggregation: tensor '", name,
          "' differs in name or shape between the adapter before and after training"));
    }
  }
  if (before.size() != after.size()) {
    return absl::InvalidArgumentError(
        "secure aggregation: the adapter before training has tensors the one after lacks");
  }
  auto r = std::unique_ptr<SecAggClientRound>(new SecAggClientRound());
  r->task_ = task;
  r->before_ = std::move(before);
  r->after_ = std::move(after);
  r->num_examples_ = num_examples;
  r->metrics_ = metrics;
  r->seeded_noise_ = seeded_noise;
  return r;
}

v1::AgentMessage SecAggClientRound::Ready() const {
  v1::AgentMessage msg;
  v1::SecAggReady* ready = msg.mutable_secagg_ready();
  ready->set_round_id(task_.round_id());
  for (const auto& [name, t] : after_) {
    v1::TensorShape* s = ready->add_layout();
    s->set_name(name);
    for (int64_t d : t.shape) s->add_dims(d);
  }
  ready->set_num_examples(num_examples_);
  *ready->mutable_metrics() = metrics_;
  return msg;
}

absl::StatusOr<std::vector<float>> SecAggClientRound::InputVector() {
  common::TensorMap input = after_;
  const double clip = task_.secagg().dp_clip_norm();
  if (clip > 0) {
    common::TensorMap delta = after_;
    for (auto& [name, t] : delta) {
      const std::vector<float>& b = before_.at(name).data;
      for (size_t i = 0; i < t.data.size(); ++i) t.data[i] -= b[i];
    }
    common::ClientDpOptions dp;
    dp.clip_norm = clip;
    dp.noise_multiplier = task_.secagg().dp_noise_multiplier();
    dp.noise_shares = std::max<uint32_t>(1, setup_.noise_shares());
    ASSIGN_OR_RETURN(common::GaussianNoise noise,
                     seeded_noise_.has_value() ? common::GaussianNoise::FromSeed(*seeded_noise_)
                                               : common::GaussianNoise::FromCsprng());
    ASSIGN_OR_RETURN(common::ClipReport report, common::PrivatizeUpdate(delta, dp, noise));
    pre_clip_norm_ = report.pre_clip_norm;
    for (auto& [name, t] : input) {
      const std::vector<float>& d = delta.at(name).data;
      const std::vector<float>& b = before_.at(name).data;
      for (size_t i = 0; i < t.data.size(); ++i) t.data[i] = b[i] + d[i];
    }
  }
  std::vector<float> flat;
  flat.reserve(setup_.vector_length());
  for (const auto& [name, t] : input) flat.insert(flat.end(), t.data.begin(), t.data.end());
  return flat;
}

absl::StatusOr<v1::AgentMessage> SecAggClientRound::OnSetup(const v1::SecAggSetup& setup) {
  if (client_.has_value()) {
    return absl::FailedPreconditionError(
        absl::StrCat("round ", setup.round_id(), ": a second SecAggSetup"));
  }
  if (setup.round_id() != task_.round_id()) {
    return absl::InvalidArgumentError(absl::StrCat("SecAggSetup is for round ", setup.round_id(),
                                                   ", this agent trained for round ",
                                                   task_.round_id()));
  }
  // The layout must be ours exactly: same names in the same order, same shapes.
  if (static_cast<size_t>(setup.layout_size()) != after_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("SecAggSetup.layout has ", setup.layout_size(),
                                                   " tensors, the adapter has ", after_.size()));
  }
  uint64_t total = 0;
  auto it = after_.begin();
  for (const v1::TensorShape& s : setup.layout()) {
    std::vector<int64_t> dims(s.dims().begin(), s.dims().end());
    if (s.name() != it->first || dims != it->second.shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          "SecAggSetup.layout tensor '", s.name(), "' differs from the adapter's '", it->first,
          "' (name or shape)"));
    }
    total += it->second.data.size();
    ++it;
  }
  if (total != setup.vector_length()) {
    return absl::InvalidArgumentError(absl::StrCat("SecAggSetup.vector_length ",
                                                   setup.vector_length(),
                                                   ", the layout holds ", total));
  }
  sa::FixedPointConfig fp;
  fp.clip = setup.clip_range();
  fp.scale = setup.scale();
  fp.max_agents = static_cast<int>(setup.max_agents());
  ASSIGN_OR_RETURN(sa::FixedPointCodec codec, sa::FixedPointCodec::Create(fp));
  sa::SecAggConfig config;
  config.round_id = setup.round_id();
  config.round_seed = setup.round_seed();
  config.cohort.assign(setup.cohort().begin(), setup.cohort().end());
  config.neighbours = static_cast<int>(setup.neighbours());
  config.threshold = static_cast<int>(setup.threshold());
  config.vector_length = setup.vector_length();
  ASSIGN_OR_RETURN(sa::Client client, sa::Client::Create(config, setup.party_id()));
  ASSIGN_OR_RETURN(std::string advertise, client.AdvertiseKeys());
  codec_.emplace(std::move(codec));
  client_.emplace(std::move(client));
  setup_ = setup;
  v1::AgentMessage msg;
  msg.mutable_secagg()->set_round_id(setup.round_id());
  msg.mutable_secagg()->set_data(std::move(advertise));
  return msg;
}

absl::StatusOr<SecAggClientRound::Output> SecAggClientRound::OnMessage(
    const v1::SecAggMessage& message) {
  if (!client_.has_value()) {
    return absl::FailedPreconditionError(
        absl::StrCat("round ", message.round_id(), ": a secure-aggregation message before setup"));
  }
  if (message.round_id() != task_.round_id()) {
    return absl::InvalidArgumentError(absl::StrCat("secure-aggregation message for round ",
                                                   message.round_id(), ", expected ",
                                                   task_.round_id()));
  }
  ASSIGN_OR_RETURN(sa::MessageHeader header, sa::MessageHeader::Parse(message.data()));
  Output out;
  auto wrap = [&](std::string bytes) {
    v1::AgentMessage msg;
    msg.mutable_secagg()->set_round_id(task_.round_id());
    msg.mutable_secagg()->set_data(std::move(bytes));
    out.message = std::move(msg);
  };
  switch (header.type) {
    case sa::MessageType::kKeyDirectory: {
      ASSIGN_OR_RETURN(std::string shares, client_->ShareKeys(message.data()));
      wrap(std::move(shares));
      break;
    }
    case sa::MessageType::kShareDelivery: {
      ASSIGN_OR_RETURN(std::vector<float> input, InputVector());
      ASSIGN_OR_RETURN(std::vector<uint32_t> encoded, codec_->Encode(input));
      ASSIGN_OR_RETURN(out.masked_input, client_->MaskedInput(message.data(), encoded));
      // Drop the plaintext adapters: nothing more is needed from them.
      before_.clear();
      after_.clear();
      break;
    }
    case sa::MessageType::kUnmaskRequest: {
      ASSIGN_OR_RETURN(std::string response, client_->Unmask(message.data()));
      wrap(std::move(response));
      break;
    }
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "unexpected secure-aggregation message type ", static_cast<int>(header.type),
          " from the coordinator"));
  }
  return out;
}

}  // namespace fedlora::edge
