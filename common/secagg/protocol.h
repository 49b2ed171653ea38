#pragma once
// Dropout-tolerant secure aggregation: SecAgg (Bonawitz et al., CCS 2017)
// with SecAgg+ sparse neighbourhoods (Bell et al., CCS 2020), semi-honest
// model. The server learns the mod-2^32 sum of the surviving clients'
// encoded vectors and nothing else about any single one of them.
//
// Keys (per client, fresh each round, X25519):
//   c_sk/c_pk  channel key: X25519(c_sk_u, c_pk_v) -> HKDF-SHA256 -> AES-256-GCM
//              key that encrypts u's Shamir shares for v (via the server);
//   s_sk/s_pk  mask key:    X25519(s_sk_u, s_pk_v) -> HKDF-SHA256 -> seed s_uv.
// Each client also draws a self-mask seed b_u (32 random bytes). HKDF salt =
// u64le(round_id) || round_seed; info = "fedlora secagg channel v1" or
// "fedlora secagg mask v1" || u32le(min(u,v)) || u32le(max(u,v)). Share AAD =
// "fedlora secagg share v1" || u64le(round_id) || u32le(sender) || u32le(receiver).
//
// Masking (mod 2^32, ids compared as integers), for neighbours v of u in U2:
//   y_u = x_u + PRG(b_u) + sum_{v < u} PRG(s_uv) - sum_{v > u} PRG(s_uv)
//
// Rounds and sets (U1 ⊇ U2 ⊇ U3 ⊇ U4; N(u) = u's neighbours, N[u] = N(u)+u):
//   0 AdvertiseKeys   client -> server: c_pk, s_pk.           Senders form U1.
//     KeyDirectory    server -> client: keys of N(u) ∩ U1.
//   1 ShareKeys       client -> server: for each v in N(u) ∩ U1 the sealed
//                     t-of-|N[u]| shares of b_u and s_sk_u (u keeps its own).
//                                                              Senders form U2.
//     ShareDelivery   server -> client: the sealed shares addressed to v from N(v) ∩ U2.
//   2 MaskedInput     client -> server: y_u (P words).         Senders form U3.
//     UnmaskRequest   server -> client: survivors N(v) ∩ U3, dropped N(v) ∩ (U2 \ U3).
//   3 UnmaskResponse  client -> server: shares of b_w for w in survivors + itself,
//                     shares of s_sk_w for w in dropped; never both for one w.
//                                                              Senders form U4.
//   Server: sum_{u in U3} y_u - sum_{u in U3} PRG(b_u), corrected by the masks
//   between each dropped w in U2 \ U3 and its surviving neighbours (recomputed
//   from the reconstructed s_sk_w) = sum_{u in U3} x_u.
//
// Threshold t: Shamir threshold within each closed neighbourhood N[u]
// (|N[u]| = k + 1, or n with full SecAgg). Must satisfy |N[u]|/2 < t <= |N[u]|,
// so that a server which lies about who dropped can never gather t shares of
// both b_u and s_sk_u. The round continues while, after each phase, the
// phase's set holds >= t clients and every member u still has >= t of N[u] in
// it; otherwise the Server (and any Client that sees too few neighbours)
// returns FailedPrecondition, moves to the aborted state and outputs nothing.
//
// The Server never holds an individual unmasked input: masked inputs are
// folded into one running sum as they arrive; only the sum is unmasked.
//
// How a round driver (coordinator / agent, or the in-process benchmark) uses
// it; every message is opaque bytes and can ride any stream:
//
//   SecAggConfig cfg{round_id, round_seed, cohort_ids, k, t, P};   // same on all
//   // agent u                                  // coordinator
//   Client c = Client::Create(cfg, u);          Server s = Server::Create(cfg);
//   send(c.AdvertiseKeys())          ---->      s.HandleAdvertiseKeys(bytes)  (each)
//                                               [deadline] s.CloseAdvertiseKeys()
//   c.ShareKeys(dir)                 <----      s.KeyDirectoryFor(u)     for u in s.Survivors()
//   send(...)                        ---->      s.HandleShareKeys(bytes)
//                                               [deadline] s.CloseShareKeys()
//   c.MaskedInput(delivery, encoded) <----      s.ShareDeliveryFor(u)
//   send(...)                        ---->      s.HandleMaskedInput(bytes)
//                                               [deadline] s.CloseMaskedInput()
//   c.Unmask(request)                <----      s.UnmaskRequestFor(u)
//   send(...)                        ---->      s.HandleUnmaskResponse(bytes)
//                                               [deadline] s.Finalize() -> sum, contributors
//   The coordinator decodes the sum with FixedPointCodec::DecodeSum(sum,
//   contributors.size()). Any non-OK Close*/Finalize means the round aborted.
//   Handle* errors reject only that message (the sender is then treated as
//   dropped); they never change the Server's state.
//
// Not covered (semi-honest model): no signatures on AdvertiseKeys (the
// transport's mutual TLS authenticates senders), no consistency check round
// (Bonawitz's round 4 against an actively malicious server), round_seed is
// trusted to be honestly random.
//
// Thread safety: Client and Server are not safe for concurrent use; the
// driver serialises calls on one object. Distinct objects are independent.

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "common/crypto/crypto.h"
#include "common/secagg/graph.h"
#include "common/secagg/messages.h"
#include "common/secagg/shamir.h"

namespace fedlora::common::secagg {

// Default neighbourhood size for n clients: SecAgg+'s O(log n),
// 2 * ceil(1.5 * log2 n) (20 for n = 100, 30 for n = 1000), capped at n - 1
// (full SecAgg for n <= 11).
int DefaultNeighbours(int n);
// Default threshold for a closed neighbourhood of m clients: m / 2 + 1.
int DefaultThreshold(int m);

struct SecAggConfig {
  uint64_t round_id = 0;
  std::string round_seed;         // 32 bytes, identical for all parties
  std::vector<uint32_t> cohort;   // selected client ids, unique, >= 2
  int neighbours = 0;             // k; 0 = DefaultNeighbours(n); >= n - 1 = full SecAgg
  int threshold = 0;              // t; 0 = DefaultThreshold(|N[u]|)
  uint64_t vector_length = 0;     // P, words per input (> 0)
  int threads = 1;                // server unmask threads (>= 1)
};

// The validated config and its neighbourhood graph.
class RoundPlan {
 public:
  // InvalidArgument naming the field for a bad round_seed, cohort, k, t or P.
  static absl::StatusOr<RoundPlan> Create(const SecAggConfig& config);
  const SecAggConfig& config() const { return config_; }
  const NeighbourGraph& graph() const { return graph_; }
  int threshold() const { return threshold_; }
  // |N[u]| (the same for every u).
  int neighbourhood_size() const { return graph_.degree() + 1; }

 private:
  RoundPlan(SecAggConfig config, NeighbourGraph graph, int threshold)
      : config_(std::move(config)), graph_(std::move(graph)), threshold_(threshold) {}
  SecAggConfig config_;
  NeighbourGraph graph_;
  int threshold_;
};

class Client {
 public:
  // InvalidArgument for a bad config or an id outside the cohort.
  static absl::StatusOr<Client> Create(const SecAggConfig& config, uint32_t id);

  // Round 0: fresh key pairs and b_u; returns AdvertiseKeys bytes.
  absl::StatusOr<std::string> AdvertiseKeys();
  // Round 1: `key_directory` = KeyDirectory bytes for this client. Returns
  // ShareKeys bytes. FailedPrecondition when fewer than t-1 neighbours advertised.
  absl::StatusOr<std::string> ShareKeys(std::string_view key_directory);
  // Round 2: `share_delivery` = ShareDelivery bytes; `encoded` = this client's
  // fixed-point encoded input (P words). Returns MaskedInput bytes.
  absl::StatusOr<std::string> MaskedInput(std::string_view share_delivery,
                                          absl::Span<const uint32_t> encoded);
  // Round 3: `unmask_request` = UnmaskRequest bytes. Returns UnmaskResponse
  // bytes. Refuses (InvalidArgument) a request that does not split exactly the
  // neighbours whose shares it holds into survivors and dropped.
  absl::StatusOr<std::string> Unmask(std::string_view unmask_request);

  uint32_t id() const { return id_; }

 private:
  enum class Phase { kNew, kAdvertised, kSharedKeys, kMasked, kDone, kFailed };
  struct PeerKeys {
    std::string c_pk, s_pk;
  };
  Client(RoundPlan plan, uint32_t id, int index)
      : plan_(std::move(plan)), id_(id), index_(index) {}
  absl::Status CheckPhase(Phase want, absl::string_view step) const;

  RoundPlan plan_;
  uint32_t id_;
  int index_;
  Phase phase_ = Phase::kNew;
  X25519KeyPair c_keys_, s_keys_;
  std::string b_;
  std::map<uint32_t, PeerKeys> peers_;          // N(u) ∩ U1 from the directory
  SharePlaintext own_share_;                   // this client's share of its own secrets
  std::map<uint32_t, SharePlaintext> held_;    // shares held for N(u) ∩ U2
};

struct SecAggResult {
  std::vector<uint32_t> sum;           // sum of the contributors' encodings mod 2^32
  std::vector<uint32_t> contributors;  // U3, sorted ids
};

class Server {
 public:
  enum class Phase { kAdvertiseKeys, kShareKeys, kMaskedInput, kUnmask, kDone, kAborted };

  static absl::StatusOr<Server> Create(const SecAggConfig& config);

  // Each Handle* validates one client message completely before storing
  // anything: wrong phase (FailedPrecondition), wrong round id, unknown sender,
  // sender that dropped earlier, duplicate message (AlreadyExists), wrong
  // receivers / owners / x / length (InvalidArgument). Errors name the sender.
  absl::Status HandleAdvertiseKeys(std::string_view bytes);
  absl::Status CloseAdvertiseKeys();
  absl::StatusOr<std::string> KeyDirectoryFor(uint32_t id) const;

  absl::Status HandleShareKeys(std::string_view bytes);
  absl::Status CloseShareKeys();
  absl::StatusOr<std::string> ShareDeliveryFor(uint32_t id) const;

  absl::Status HandleMaskedInput(std::string_view bytes);
  absl::Status CloseMaskedInput();
  absl::StatusOr<std::string> UnmaskRequestFor(uint32_t id) const;

  absl::Status HandleUnmaskResponse(std::string_view bytes);
  // Reconstructs the needed seeds, removes every mask and returns the sum.
  // FailedPrecondition (and aborted) when fewer than t shares are available for
  // a needed secret; DataLoss when a reconstructed key does not match the key
  // its owner advertised (corrupt shares).
  absl::StatusOr<SecAggResult> Finalize();

  Phase phase() const { return phase_; }
  // Ids that completed the current (or, once closed, the last closed) phase.
  std::vector<uint32_t> Survivors() const;
  const RoundPlan& plan() const { return plan_; }

 private:
  explicit Server(RoundPlan plan);
  absl::Status Abort(absl::Status why);
  absl::Status CheckSet(const std::vector<char>& members, absl::string_view phase_name);
  absl::StatusOr<int> SenderIndex(absl::string_view msg, uint64_t round_id, uint32_t sender,
                                  Phase want, const std::vector<char>* must_be_in,
                                  const std::vector<char>& already) const;
  absl::StatusOr<int> ReceiverIndex(uint32_t id, const std::vector<char>& set,
                                    absl::string_view what) const;

  RoundPlan plan_;
  Phase phase_ = Phase::kAdvertiseKeys;
  int n_;
  std::vector<char> u1_, u2_, u3_, u4_;
  std::vector<std::string> c_pk_, s_pk_;
  // inbox_[receiver] = (sender index, sealed share) pairs.
  std::vector<std::vector<std::pair<int, std::string>>> inbox_;
  std::vector<uint32_t> masked_sum_;
  std::vector<std::vector<ShamirShare>> b_shares_, sk_shares_;
};

}  // namespace fedlora::common::secagg
