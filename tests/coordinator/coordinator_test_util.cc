#include "tests/coordinator/coordinator_test_util.h"

#include <stdlib.h>

#include <filesystem>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <gtest/gtest.h>

#include <grpcpp/grpcpp.h>

#include "common/crypto/crypto.h"
#include "common/net/tls.h"
#include "coordinator/admin/admin_cli.h"
#include "common/quant/quant.h"

namespace fedlora::coordinator::testing {

TempDir::TempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "fedlora-coord-XXXXXX").string();
  if (mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

common::TensorMap MakeLoraUpdate(uint32_t rank, int layers, int64_t in, int64_t out, uint64_t seed,
                                 float scale, const std::vector<std::string>& modules) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  common::TensorMap map;
  for (int l = 0; l < layers; ++l) {
    for (const std::string& m : modules) {
      const std::string prefix =
          "base_model.model.model.layers." + std::to_string(l) + ".self_attn." + m;
      common::HostTensor a;
      a.shape.push_back(rank);
      a.shape.push_back(in);
      a.data.resize(rank * in);
      for (float& v : a.data) v = dist(rng);
      common::HostTensor b;
      b.shape.push_back(out);
      b.shape.push_back(rank);
      b.data.resize(out * rank);
      for (float& v : b.data) v = dist(rng);
      map[prefix + ".lora_A.weight"] = std::move(a);
      map[prefix + ".lora_B.weight"] = std::move(b);
    }
  }
  return map;
}

std::string SealUpdate(const common::TensorMap& update, const std::string& public_key,
                       uint64_t round_id, const std::string& agent_id,
                       const std::string& base_version, const std::string& base_hash) {
  auto sealed = common::SealToPublicKey(public_key, common::SerializeSafetensors(update),
                                        UpdateAad(round_id, agent_id, base_hash, base_version));
  if (!sealed.ok()) throw std::runtime_error(sealed.status().ToString());
  return *sealed;
}

common::TensorMap NaiveWeightedMean(const std::vector<common::TensorMap>& updates,
                                    const std::vector<double>& weights) {
  common::TensorMap out;
  double total = 0;
  for (double w : weights) total += w;
  for (const auto& [name, t] : updates.front()) {
    common::HostTensor mean;
    mean.shape = t.shape;
    mean.data.assign(t.data.size(), 0.f);
    for (size_t i = 0; i < t.data.size(); ++i) {
      double sum = 0;
      for (size_t k = 0; k < updates.size(); ++k) sum += weights[k] * updates[k].at(name).data[i];
      mean.data[i] = static_cast<float>(sum / total);
    }
    out[name] = std::move(mean);
  }
  return out;
}

bool WaitFor(const std::function<bool()>& condition, std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return condition();
}

void FakeLink::Send(const fedlora::v1::CoordinatorMessage& message) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!closed_) messages_.push_back(message);
}

void FakeLink::Close(const absl::Status& status) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!closed_) closed_ = status;
}

std::vector<fedlora::v1::CoordinatorMessage> FakeLink::messages() const {
  std::lock_guard<std::mutex> lock(mu_);
  return messages_;
}

std::optional<absl::Status> FakeLink::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

size_t FakeLink::Count(fedlora::v1::CoordinatorMessage::KindCase kind) const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (const auto& m : messages_) n += m.kind_case() == kind;
  return n;
}

fedlora::v1::CoordinatorMessage FakeLink::Last(
    fedlora::v1::CoordinatorMessage::KindCase kind) const {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = messages_.rbegin(); it != messages_.rend(); ++it) {
    if (it->kind_case() == kind) return *it;
  }
  throw std::runtime_error("FakeLink::Last: no message of that kind");
}

fedlora::v1::UpdateHeader MakeHeader(uint64_t round_id, const std::string& agent_id,
                                     const std::string& base_version, uint64_t num_examples,
                                     const std::string& payload, double train_loss,
                                     double eval_loss_before, const std::string& base_hash) {
  fedlora::v1::UpdateHeader h;
  h.set_round_id(round_id);
  h.set_agent_id(agent_id);
  h.set_base_model_hash(base_hash);
  h.set_base_version(base_version);
  h.set_num_examples(num_examples);
  h.set_total_size(payload.size());
  h.set_payload_sha256(common::Sha256Hex(payload));
  h.mutable_metrics()->set_train_loss(train_loss);
  h.mutable_metrics()->set_eval_loss_before(eval_loss_before);
  h.mutable_metrics()->set_train_tokens(1000);
  h.mutable_metrics()->set_train_seconds(1.5);
  return h;
}

std::vector<VersionRecord> SeedVersionChain(StateStore* store, int n) {
  std::vector<VersionRecord> out;
  std::string parent;
  for (int i = 1; i <= n; ++i) {
    const uint64_t round_id = static_cast<uint64_t>(i);
    common::TensorMap adapter = MakeLoraUpdate(4, 1, 8, 8, round_id);
    const std::string blob = common::EncodeAdapterBlob(
        adapter, common::Quant::kQ8_0, {{"fedlora.version", VersionId(round_id)}});
    RoundRecord round;
    round.round_id = round_id;
    round.phase = RoundPhase::kDone;
    round.participants = {"a"};
    round.base_version = parent;
    round.lora_rank = 4;
    round.lora_alpha = 8;
    round.lora_target_modules = {"q_proj", "v_proj"};
    round.version_id = VersionId(round_id);
    round.eval_complete = true;
    VersionRecord v;
    v.version_id = VersionId(round_id);
    v.round_id = round_id;
    v.parent_version = parent;
    v.sha256 = common::Sha256Hex(blob);
    v.size_bytes = blob.size();
    v.quant = "q8_0";
    v.quant_rel_l2_error = 0.01 * i;
    v.quant_max_abs_error = 0.001 * i;
    v.num_examples = 10;
    v.contributors = {"a"};
    for (const auto& [name, t] : adapter) v.shapes[name] = t.shape;
    v.base_model_hash = kBaseHash;
    EXPECT_TRUE(store->Publish(round, v, blob).ok());
    out.push_back(v);
    parent = v.version_id;
  }
  return out;
}

CliResult RunCli(std::vector<std::string> args) {
  args.insert(args.begin(), "fedlora-admin");
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  std::ostringstream out, err;
  int code = RunAdminCli(static_cast<int>(argv.size()), argv.data(), out, err);
  return {code, out.str(), err.str()};
}

std::chrono::system_clock::time_point In(int seconds) {
  return std::chrono::system_clock::now() + std::chrono::seconds(seconds);
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, const std::string& ca,
                                           const std::string& cert, const std::string& key) {
  auto creds = common::MakeChannelCredentials({ca, cert, key});
  EXPECT_TRUE(creds.ok()) << creds.status();
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // one connection per fake agent
  return grpc::CreateCustomChannel(target, *creds, args);
}

}  // namespace fedlora::coordinator::testing
