#pragma once
// Helpers shared by the coordinator tests: temp dirs, LoRA-shaped updates,
// sealing, a fake agent link and polling.

#include <chrono>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/tensor/tensor.h"
#include "coordinator/round_manager.h"
#include "fedlora/v1/fedlora.pb.h"

namespace grpc {
class Channel;
}

namespace fedlora::coordinator::testing {

// 64 hex chars used as the base model hash in tests.
inline const std::string kBaseHash(64, 'b');

// A fresh directory, removed (recursively) on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// PEFT-named LoRA factors for `layers` layers x `modules`, A [rank, in], B [out, rank],
// values pseudo-random from `seed` in [-scale, scale].
common::TensorMap MakeLoraUpdate(uint32_t rank, int layers, int64_t in, int64_t out, uint64_t seed,
                                 float scale = 0.5f,
                                 const std::vector<std::string>& modules = {"q_proj", "v_proj"});

// Serializes as safetensors and seals to `public_key` with the protocol AAD.
std::string SealUpdate(const common::TensorMap& update, const std::string& public_key,
                       uint64_t round_id, const std::string& agent_id,
                       const std::string& base_version, const std::string& base_hash = kBaseHash);

// Plain weighted mean (reference for the aggregator).
common::TensorMap NaiveWeightedMean(const std::vector<common::TensorMap>& updates,
                                    const std::vector<double>& weights);

// fedlora-admin run in process (coordinator/admin/admin_cli.h): exit code and output.
struct CliResult {
  int code;
  std::string out;
  std::string err;
};
// `args` without the program name.
CliResult RunCli(std::vector<std::string> args);

// A deadline `seconds` from now (gRPC client contexts).
std::chrono::system_clock::time_point In(int seconds);

// A mutual-TLS channel to `target` with its own connection (local subchannel pool),
// so that each fake agent is a separate peer.
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, const std::string& ca,
                                           const std::string& cert, const std::string& key);

// Polls `condition` every 5 ms until it holds or `timeout` passes.
bool WaitFor(const std::function<bool()>& condition,
             std::chrono::milliseconds timeout = std::chrono::milliseconds(15000));

// AgentLink that records what the manager sends.
class FakeLink final : public AgentLink {
 public:
  explicit FakeLink(std::string cn) : cn_(std::move(cn)) {}
  const std::string& peer_cn() const override { return cn_; }
  void Send(const fedlora::v1::CoordinatorMessage& message) override;
  void Close(const absl::Status& status) override;

  std::vector<fedlora::v1::CoordinatorMessage> messages() const;
  std::optional<absl::Status> closed() const;
  // Number of messages of a kind.
  size_t Count(fedlora::v1::CoordinatorMessage::KindCase kind) const;
  // The last message of a kind (must exist).
  fedlora::v1::CoordinatorMessage Last(fedlora::v1::CoordinatorMessage::KindCase kind) const;

 private:
  const std::string cn_;
  mutable std::mutex mu_;
  std::vector<fedlora::v1::CoordinatorMessage> messages_;
  std::optional<absl::Status> closed_;
};

// A header for an update of `payload` (sealed bytes).
fedlora::v1::UpdateHeader MakeHeader(uint64_t round_id, const std::string& agent_id,
                                     const std::string& base_version, uint64_t num_examples,
                                     const std::string& payload, double train_loss = 2.0,
                                     double eval_loss_before = 3.0,
                                     const std::string& base_hash = kBaseHash);

// Publishes versions v000001..v00000n (rounds 1..n) as a chain, each the parent of
// the next, with q8_0 blobs of MakeLoraUpdate(4, 1, 8, 8, round); v00000n ends current.
// Returns the versions as stored.
std::vector<VersionRecord> SeedVersionChain(StateStore* store, int n);

}  // namespace fedlora::coordinator::testing
