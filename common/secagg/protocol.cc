#include "common/secagg/protocol.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/secagg/channel_crypto.h"
#include "common/secagg/prg.h"
#include "common/status/status.h"

namespace fedlora::common::secagg {
namespace {

constexpr char kChannelInfo[] = "fedlora secagg channel v1";
constexpr char kMaskInfo[] = "fedlora secagg mask v1";
constexpr char kShareAad[] = "fedlora secagg share v1";

void PutU32(std::string& s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s.push_back(static_cast<char>(v >> (8 * i)));
}
void PutU64(std::string& s, uint64_t v) {
  for (int i = 0; i < 8; ++i) s.push_back(static_cast<char>(v >> (8 * i)));
}

std::string RoundSalt(const SecAggConfig& c) {
  std::string s;
  PutU64(s, c.round_id);
  s += c.round_seed;
  return s;
}

// HKDF(X25519(sk, peer_pk)) bound to the round and the unordered pair {a, b}.
absl::StatusOr<std::string> PairKey(const SecAggConfig& c, const char* info_label,
                                    std::string_view sk, std::string_view peer_pk, uint32_t a,
                                    uint32_t b) {
  ASSIGN_OR_RETURN(std::string shared, X25519SharedSecret(sk, peer_pk));
  std::string info(info_label);
  PutU32(info, std::min(a, b));
  PutU32(info, std::max(a, b));
  auto key = HkdfSha256(shared, RoundSalt(c), info, 32);
  std::fill(shared.begin(), shared.end(), '\0');
  return key;
}

std::string ShareAad(uint64_t round_id, uint32_t sender, uint32_t receiver) {
  std::string aad(kShareAad);
  PutU64(aad, round_id);
  PutU32(aad, sender);
  PutU32(aad, receiver);
  return aad;
}

absl::Status RoundMismatch(absl::string_view msg, uint32_t party, uint64_t got, uint64_t want) {
  return absl::InvalidArgumentError(absl::StrCat(msg, " (party ", party, "): round_id ", got,
                                                 ", expected ", want));
}

const char* PhaseName(Server::Phase p) {
  switch (p) {
    case Server::Phase::kAdvertiseKeys: return "AdvertiseKeys";
    case Server::Phase::kShareKeys: return "ShareKeys";
    case Server::Phase::kMaskedInput: return "MaskedInput";
    case Server::Phase::kUnmask: return "Unmask";
    case Server::Phase::kDone: return "Done";
    case Server::Phase::kAborted: return "Aborted";
  }
  return "?";
}

}  // namespace

int DefaultNeighbours(int n) {
  if (n <= 1) return 1;
  int half = static_cast<int>(std::ceil(1.5 * std::log2(static_cast<double>(n))));
  return std::min(n - 1, 2 * std::max(1, half));
}

int DefaultThreshold(int m) { return m / 2 + 1; }

// ---------------------------------------------------------------- RoundPlan

absl::StatusOr<RoundPlan> RoundPlan::Create(const SecAggConfig& config) {
  SecAggConfig c = config;
  if (c.round_seed.size() != kSeedBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("secagg config: round_seed must be 32 bytes, found ", c.round_seed.size()));
  }
  if (c.vector_length == 0) {
    return absl::InvalidArgumentError("secagg config: vector_length must be > 0");
  }
  if (c.threads < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("secagg config: threads must be >= 1, found ", c.threads));
  }
  if (c.neighbours < 0 || c.threshold < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("secagg config: neighbours and threshold must be >= 0 (0 = default), found ",
                     c.neighbours, " and ", c.threshold));
  }
  const int n = static_cast<int>(c.cohort.size());
  if (c.neighbours == 0) c.neighbours = DefaultNeighbours(n);
  ASSIGN_OR_RETURN(NeighbourGraph graph, NeighbourGraph::Build(c.cohort, c.neighbours, c.round_seed));
  const int m = graph.degree() + 1;
  if (c.threshold == 0) c.threshold = DefaultThreshold(m);
  if (2 * c.threshold <= m || c.threshold > m) {
    return absl::InvalidArgumentError(absl::StrCat(
        "secagg config: threshold ", c.threshold, " must be in (", m, "/2, ", m,
        "] for neighbourhoods of ", m, " clients (k = ", graph.degree(), ")"));
  }
  c.cohort = graph.ids();
  int t = c.threshold;
  return RoundPlan(std::move(c), std::move(graph), t);
}

// ------------------------------------------------------------------- Client

absl::StatusOr<Client> Client::Create(const SecAggConfig& config, uint32_t id) {
  ASSIGN_OR_RETURN(RoundPlan plan, RoundPlan::Create(config));
  int index = plan.graph().IndexOf(id);
  if (index < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("secagg client: id ", id, " is not in the round's cohort"));
  }
  return Client(std::move(plan), id, index);
}

absl::Status Client::CheckPhase(Phase want, absl::string_view step) const {
  if (phase_ == Phase::kFailed) {
    return absl::FailedPreconditionError(
        absl::StrCat("secagg client ", id_, ": ", step, " after the round failed"));
  }
  if (phase_ != want) {
    return absl::FailedPreconditionError(
        absl::StrCat("secagg client ", id_, ": ", step, " called out of order"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Client::AdvertiseKeys() {
  RETURN_IF_ERROR(CheckPhase(Phase::kNew, "AdvertiseKeys"));
  ASSIGN_OR_RETURN(c_keys_, GenerateX25519KeyPair());
  ASSIGN_OR_RETURN(s_keys_, GenerateX25519KeyPair());
  b_ = RandomBytes(kSeedBytes);
  phase_ = Phase::kAdvertised;
  struct AdvertiseKeys msg;
  msg.round_id = plan_.config().round_id;
  msg.sender = id_;
  msg.c_pk = c_keys_.public_key;
  msg.s_pk = s_keys_.public_key;
  return msg.Serialize();
}

absl::StatusOr<std::string> Client::ShareKeys(std::string_view key_directory) {
  RETURN_IF_ERROR(CheckPhase(Phase::kAdvertised, "ShareKeys"));
  ASSIGN_OR_RETURN(KeyDirectory dir, KeyDirectory::Parse(key_directory));
  const SecAggConfig& cfg = plan_.config();
  const NeighbourGraph& g = plan_.graph();
  if (dir.round_id != cfg.round_id) {
    return RoundMismatch("KeyDirectory", dir.receiver, dir.round_id, cfg.round_id);
  }
  if (dir.receiver != id_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KeyDirectory: addressed to client ", dir.receiver, ", this is client ", id_));
  }
  std::map<uint32_t, PeerKeys> peers;
  for (const KeyDirectory::Entry& e : dir.entries) {
    int v = g.IndexOf(e.id);
    if (v < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("KeyDirectory for client ", id_, ": unknown client id ", e.id));
    }
    if (!g.Adjacent(index_, v)) {
      return absl::InvalidArgumentError(absl::StrCat("KeyDirectory for client ", id_, ": client ",
                                                     e.id, " is not a neighbour"));
    }
    peers[e.id] = PeerKeys{e.c_pk, e.s_pk};
  }
  const int t = plan_.threshold();
  if (static_cast<int>(peers.size()) + 1 < t) {
    phase_ = Phase::kFailed;
    return absl::FailedPreconditionError(
        absl::StrCat("secagg client ", id_, ": only ", peers.size() + 1,
                     " of its neighbourhood advertised keys, threshold ", t));
  }
  // Holders: itself and every neighbour that advertised, each at its fixed x.
  std::vector<uint32_t> holders{id_};
  std::vector<uint8_t> xs{g.ShareX(index_, index_)};
  for (const auto& [pid, keys] : peers) {
    holders.push_back(pid);
    xs.push_back(g.ShareX(index_, g.IndexOf(pid)));
  }
  ASSIGN_OR_RETURN(std::vector<ShamirShare> b_shares, ShamirSplit(b_, t, xs));
  ASSIGN_OR_RETURN(std::vector<ShamirShare> sk_shares, ShamirSplit(s_keys_.private_key, t, xs));
  struct ShareKeys msg;
  msg.round_id = cfg.round_id;
  msg.sender = id_;
  SharePlaintext own;
  for (size_t i = 0; i < holders.size(); ++i) {
    SharePlaintext p;
    p.owner = id_;
    p.holder = holders[i];
    p.x = xs[i];
    p.b_share = b_shares[i].y;
    p.sk_share = sk_shares[i].y;
    if (i == 0) {
      own = std::move(p);
      continue;
    }
    const PeerKeys& pk = peers[holders[i]];
    ASSIGN_OR_RETURN(std::string key, PairKey(cfg, kChannelInfo, c_keys_.private_key, pk.c_pk,
                                              id_, holders[i]));
    ASSIGN_OR_RETURN(std::string sealed,
                     AesGcmSeal(key, p.Serialize(), ShareAad(cfg.round_id, id_, holders[i])));
    msg.entries.push_back({holders[i], std::move(sealed)});
  }
  peers_ = std::move(peers);
  own_share_ = std::move(own);
  phase_ = Phase::kSharedKeys;
  return msg.Serialize();
}

absl::StatusOr<std::string> Client::MaskedInput(std::string_view share_delivery,
                                                absl::Span<const uint32_t> encoded) {
  RETURN_IF_ERROR(CheckPhase(Phase::kSharedKeys, "MaskedInput"));
  const SecAggConfig& cfg = plan_.config();
  const NeighbourGraph& g = plan_.graph();
  if (encoded.size() != cfg.vector_length) {
    return absl::InvalidArgumentError(absl::StrCat("secagg client ", id_, ": input has ",
                                                   encoded.size(), " words, the round expects ",
                                                   cfg.vector_length));
  }
  ASSIGN_OR_RETURN(ShareDelivery delivery, ShareDelivery::Parse(share_delivery));
  if (delivery.round_id != cfg.round_id) {
    return RoundMismatch("ShareDelivery", delivery.receiver, delivery.round_id, cfg.round_id);
  }
  if (delivery.receiver != id_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ShareDelivery: addressed to client ", delivery.receiver, ", this is client ", id_));
  }
  std::map<uint32_t, SharePlaintext> held;
  for (const ShareDelivery::Entry& e : delivery.entries) {
    auto peer = peers_.find(e.sender);
    if (peer == peers_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("ShareDelivery for client ", id_, ": share from client ", e.sender,
                       g.IndexOf(e.sender) < 0 ? ", an unknown sender id"
                                               : ", which is not a neighbour in the key directory"));
    }
    ASSIGN_OR_RETURN(std::string key, PairKey(cfg, kChannelInfo, c_keys_.private_key,
                                              peer->second.c_pk, id_, e.sender));
    auto plain = AesGcmOpen(key, e.sealed, ShareAad(cfg.round_id, e.sender, id_));
    if (!plain.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("ShareDelivery for client ", id_,
                                                     ": share from client ", e.sender, ": ",
                                                     plain.status().message()));
    }
    ASSIGN_OR_RETURN(SharePlaintext p, SharePlaintext::Parse(*plain));
    uint8_t want_x = g.ShareX(g.IndexOf(e.sender), index_);
    if (p.owner != e.sender || p.holder != id_ || p.x != want_x) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ShareDelivery for client ", id_, ": share from client ", e.sender, " claims owner ",
          p.owner, ", holder ", p.holder, ", x ", static_cast<int>(p.x), "; expected ", e.sender,
          ", ", id_, ", ", static_cast<int>(want_x)));
    }
    held[e.sender] = std::move(p);
  }
  const int t = plan_.threshold();
  if (static_cast<int>(held.size()) + 1 < t) {
    phase_ = Phase::kFailed;
    return absl::FailedPreconditionError(
        absl::StrCat("secagg client ", id_, ": only ", held.size() + 1,
                     " of its neighbourhood shared keys, threshold ", t));
  }
  std::vector<MaskTerm> terms;
  terms.push_back({b_, MaskSign::kAdd});
  for (const auto& [vid, share] : held) {
    ASSIGN_OR_RETURN(std::string seed, PairKey(cfg, kMaskInfo, s_keys_.private_key,
                                               peers_[vid].s_pk, id_, vid));
    terms.push_back({std::move(seed), vid < id_ ? MaskSign::kAdd : MaskSign::kSubtract});
  }
  struct MaskedInput msg;
  msg.round_id = cfg.round_id;
  msg.sender = id_;
  msg.masked.assign(encoded.begin(), encoded.end());
  RETURN_IF_ERROR(ApplyMasks(terms, absl::MakeSpan(msg.masked), 1));
  held_ = std::move(held);
  phase_ = Phase::kMasked;
  return msg.Serialize();
}

absl::StatusOr<std::string> Client::Unmask(std::string_view unmask_request) {
  RETURN_IF_ERROR(CheckPhase(Phase::kMasked, "Unmask"));
  const SecAggConfig& cfg = plan_.config();
  ASSIGN_OR_RETURN(UnmaskRequest req, UnmaskRequest::Parse(unmask_request));
  if (req.round_id != cfg.round_id) {
    return RoundMismatch("UnmaskRequest", req.receiver, req.round_id, cfg.round_id);
  }
  if (req.receiver != id_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "UnmaskRequest: addressed to client ", req.receiver, ", this is client ", id_));
  }
  std::set<uint32_t> listed;
  for (const auto* list : {&req.survivors, &req.dropped}) {
    for (uint32_t v : *list) {
      if (held_.count(v) == 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "UnmaskRequest for client ", id_, ": client ", v,
            " is not a neighbour whose shares this client holds"));
      }
      listed.insert(v);
    }
  }
  if (listed.size() != held_.size()) {
    for (const auto& [v, s] : held_) {
      if (listed.count(v) == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("UnmaskRequest for client ", id_, ": neighbour ", v,
                         " is listed neither as survivor nor as dropped"));
      }
    }
  }
  const int t = plan_.threshold();
  if (static_cast<int>(req.survivors.size()) + 1 < t) {
    phase_ = Phase::kFailed;
    return absl::FailedPreconditionError(
        absl::StrCat("secagg client ", id_, ": only ", req.survivors.size() + 1,
                     " of its neighbourhood sent masked input, threshold ", t));
  }
  UnmaskResponse resp;
  resp.round_id = cfg.round_id;
  resp.sender = id_;
  resp.self_mask_shares.push_back({id_, own_share_.x, own_share_.b_share});
  for (uint32_t v : req.survivors) {
    const SharePlaintext& s = held_[v];
    resp.self_mask_shares.push_back({v, s.x, s.b_share});
  }
  for (uint32_t v : req.dropped) {
    const SharePlaintext& s = held_[v];
    resp.key_shares.push_back({v, s.x, s.sk_share});
  }
  phase_ = Phase::kDone;
  return resp.Serialize();
}

// ------------------------------------------------------------------- Server

Server::Server(RoundPlan plan) : plan_(std::move(plan)) {
  n_ = plan_.graph().size();
  u1_.assign(n_, 0);
  u2_.assign(n_, 0);
  u3_.assign(n_, 0);
  u4_.assign(n_, 0);
  c_pk_.assign(n_, {});
  s_pk_.assign(n_, {});
  inbox_.assign(n_, {});
  b_shares_.assign(n_, {});
  sk_shares_.assign(n_, {});
}

absl::StatusOr<Server> Server::Create(const SecAggConfig& config) {
  ASSIGN_OR_RETURN(RoundPlan plan, RoundPlan::Create(config));
  return Server(std::move(plan));
}

std::vector<uint32_t> Server::Survivors() const {
  const std::vector<char>* set = nullptr;
  switch (phase_) {
    case Phase::kAdvertiseKeys:
    case Phase::kShareKeys: set = &u1_; break;
    case Phase::kMaskedInput: set = &u2_; break;
    case Phase::kUnmask:
    case Phase::kDone: set = &u3_; break;
    case Phase::kAborted: return {};
  }
  std::vector<uint32_t> out;
  for (int i = 0; i < n_; ++i) {
    if ((*set)[i]) out.push_back(plan_.graph().id(i));
  }
  return out;
}

absl::Status Server::Abort(absl::Status why) {
  phase_ = Phase::kAborted;
  inbox_.clear();
  masked_sum_.clear();
  masked_sum_.shrink_to_fit();
  b_shares_.clear();
  sk_shares_.clear();
  return why;
}

absl::Status Server::CheckSet(const std::vector<char>& members, absl::string_view phase_name) {
  const int t = plan_.threshold();
  const NeighbourGraph& g = plan_.graph();
  int count = 0;
  for (char c : members) count += c ? 1 : 0;
  if (count < t) {
    return Abort(absl::FailedPreconditionError(
        absl::StrCat("secure aggregation aborted after ", phase_name, ": ", count,
                     " clients left, threshold ", t)));
  }
  for (int u = 0; u < n_; ++u) {
    if (!members[u]) continue;
    int alive = 0;
    for (int v : g.Closed(u)) alive += members[v] ? 1 : 0;
    if (alive < t) {
      return Abort(absl::FailedPreconditionError(absl::StrCat(
          "secure aggregation aborted after ", phase_name, ": client ", g.id(u), " has only ",
          alive, " of its ", g.Closed(u).size(), "-client neighbourhood left, threshold ", t)));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<int> Server::SenderIndex(absl::string_view msg, uint64_t round_id, uint32_t sender,
                                        Phase want, const std::vector<char>* must_be_in,
                                        const std::vector<char>& already) const {
  if (phase_ != want) {
    return absl::FailedPreconditionError(absl::StrCat(msg, " from client ", sender,
                                                      " arrived in phase ", PhaseName(phase_)));
  }
  if (round_id != plan_.config().round_id) {
    return RoundMismatch(msg, sender, round_id, plan_.config().round_id);
  }
  int u = plan_.graph().IndexOf(sender);
  if (u < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(msg, ": unknown sender id ", sender, " (not in the round's cohort)"));
  }
  if (must_be_in != nullptr && !(*must_be_in)[u]) {
    return absl::FailedPreconditionError(absl::StrCat(
        msg, " from client ", sender, ", which dropped out in an earlier phase"));
  }
  if (already[u]) {
    return absl::AlreadyExistsError(absl::StrCat(msg, ": duplicate message from client ", sender));
  }
  return u;
}

absl::StatusOr<int> Server::ReceiverIndex(uint32_t id, const std::vector<char>& set,
                                          absl::string_view what) const {
  int v = plan_.graph().IndexOf(id);
  if (v < 0) {
    return absl::NotFoundError(absl::StrCat(what, ": unknown client id ", id));
  }
  if (!set[v]) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, ": client ", id, " is not among the survivors of the last phase"));
  }
  return v;
}

absl::Status Server::HandleAdvertiseKeys(std::string_view bytes) {
  ASSIGN_OR_RETURN(struct AdvertiseKeys m, AdvertiseKeys::Parse(bytes));
  ASSIGN_OR_RETURN(int u, SenderIndex("AdvertiseKeys", m.round_id, m.sender,
                                      Phase::kAdvertiseKeys, nullptr, u1_));
  if (m.c_pk == m.s_pk) {
    return absl::InvalidArgumentError(
        absl::StrCat("AdvertiseKeys from client ", m.sender, ": c_pk and s_pk are equal"));
  }
  c_pk_[u] = std::move(m.c_pk);
  s_pk_[u] = std::move(m.s_pk);
  u1_[u] = 1;
  return absl::OkStatus();
}

absl::Status Server::CloseAdvertiseKeys() {
  if (phase_ != Phase::kAdvertiseKeys) {
    return absl::FailedPreconditionError(
        absl::StrCat("CloseAdvertiseKeys in phase ", PhaseName(phase_)));
  }
  RETURN_IF_ERROR(CheckSet(u1_, "AdvertiseKeys"));
  phase_ = Phase::kShareKeys;
  return absl::OkStatus();
}

absl::StatusOr<std::string> Server::KeyDirectoryFor(uint32_t id) const {
  if (phase_ != Phase::kShareKeys) {
    return absl::FailedPreconditionError(
        absl::StrCat("KeyDirectoryFor in phase ", PhaseName(phase_)));
  }
  ASSIGN_OR_RETURN(int v, ReceiverIndex(id, u1_, "KeyDirectoryFor"));
  KeyDirectory dir;
  dir.round_id = plan_.config().round_id;
  dir.receiver = id;
  for (int w : plan_.graph().Neighbours(v)) {
    if (u1_[w]) dir.entries.push_back({plan_.graph().id(w), c_pk_[w], s_pk_[w]});
  }
  return dir.Serialize();
}

absl::Status Server::HandleShareKeys(std::string_view bytes) {
  ASSIGN_OR_RETURN(struct ShareKeys m, ShareKeys::Parse(bytes));
  ASSIGN_OR_RETURN(int u, SenderIndex("ShareKeys", m.round_id, m.sender, Phase::kShareKeys,
                                      &u1_, u2_));
  const NeighbourGraph& g = plan_.graph();
  std::vector<int> receivers;
  for (const struct ShareKeys::Entry& e : m.entries) {
    int v = g.IndexOf(e.receiver);
    if (v < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ShareKeys from client ", m.sender, ": share addressed to unknown client id ", e.receiver));
    }
    if (v == u || !g.Adjacent(u, v) || !u1_[v]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ShareKeys from client ", m.sender, ": share addressed to client ", e.receiver,
          ", which is not a neighbour in its key directory"));
    }
    receivers.push_back(v);
  }
  for (int v : g.Neighbours(u)) {
    if (u1_[v] && std::find(receivers.begin(), receivers.end(), v) == receivers.end()) {
      return absl::InvalidArgumentError(absl::StrCat("ShareKeys from client ", m.sender,
                                                     ": no share for neighbour ", g.id(v)));
    }
  }
  for (size_t i = 0; i < receivers.size(); ++i) {
    inbox_[receivers[i]].emplace_back(u, std::move(m.entries[i].sealed));
  }
  u2_[u] = 1;
  return absl::OkStatus();
}

absl::Status Server::CloseShareKeys() {
  if (phase_ != Phase::kShareKeys) {
    return absl::FailedPreconditionError(
        absl::StrCat("CloseShareKeys in phase ", PhaseName(phase_)));
  }
  RETURN_IF_ERROR(CheckSet(u2_, "ShareKeys"));
  masked_sum_.assign(plan_.config().vector_length, 0);
  phase_ = Phase::kMaskedInput;
  return absl::OkStatus();
}

absl::StatusOr<std::string> Server::ShareDeliveryFor(uint32_t id) const {
  if (phase_ != Phase::kMaskedInput) {
    return absl::FailedPreconditionError(
        absl::StrCat("ShareDeliveryFor in phase ", PhaseName(phase_)));
  }
  ASSIGN_OR_RETURN(int v, ReceiverIndex(id, u2_, "ShareDeliveryFor"));
  ShareDelivery d;
  d.round_id = plan_.config().round_id;
  d.receiver = id;
  for (const auto& [sender, sealed] : inbox_[v]) {
    d.entries.push_back({plan_.graph().id(sender), sealed});
  }
  return d.Serialize();
}

absl::Status Server::HandleMaskedInput(std::string_view bytes) {
  ASSIGN_OR_RETURN(struct MaskedInput m, MaskedInput::Parse(bytes));
  ASSIGN_OR_RETURN(int u, SenderIndex("MaskedInput", m.round_id, m.sender, Phase::kMaskedInput,
                                      &u2_, u3_));
  if (m.masked.size() != masked_sum_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("MaskedInput from client ", m.sender, ": ",
                                                   m.masked.size(), " words, expected ",
                                                   masked_sum_.size()));
  }
  // Folded into the running sum at once: no individual masked vector is kept.
  uint32_t* sum = masked_sum_.data();
  const uint32_t* y = m.masked.data();
  for (size_t i = 0; i < masked_sum_.size(); ++i) sum[i] += y[i];
  u3_[u] = 1;
  return absl::OkStatus();
}

absl::Status Server::CloseMaskedInput() {
  if (phase_ != Phase::kMaskedInput) {
    return absl::FailedPreconditionError(
        absl::StrCat("CloseMaskedInput in phase ", PhaseName(phase_)));
  }
  RETURN_IF_ERROR(CheckSet(u3_, "MaskedInput"));
  inbox_.clear();
  phase_ = Phase::kUnmask;
  return absl::OkStatus();
}

absl::StatusOr<std::string> Server::UnmaskRequestFor(uint32_t id) const {
  if (phase_ != Phase::kUnmask) {
    return absl::FailedPreconditionError(
        absl::StrCat("UnmaskRequestFor in phase ", PhaseName(phase_)));
  }
  ASSIGN_OR_RETURN(int v, ReceiverIndex(id, u3_, "UnmaskRequestFor"));
  UnmaskRequest r;
  r.round_id = plan_.config().round_id;
  r.receiver = id;
  for (int w : plan_.graph().Neighbours(v)) {
    if (u3_[w]) {
      r.survivors.push_back(plan_.graph().id(w));
    } else if (u2_[w]) {
      r.dropped.push_back(plan_.graph().id(w));
    }
  }
  return r.Serialize();
}

absl::Status Server::HandleUnmaskResponse(std::string_view bytes) {
  ASSIGN_OR_RETURN(UnmaskResponse m, UnmaskResponse::Parse(bytes));
  ASSIGN_OR_RETURN(int u, SenderIndex("UnmaskResponse", m.round_id, m.sender, Phase::kUnmask,
                                      &u3_, u4_));
  const NeighbourGraph& g = plan_.graph();
  // Expected owners: b shares for N[u] ∩ U3, key shares for N(u) ∩ (U2 \ U3).
  std::set<int> want_b, want_sk;
  for (int w : g.Closed(u)) {
    if (u3_[w]) {
      want_b.insert(w);
    } else if (u2_[w] && w != u) {
      want_sk.insert(w);
    }
  }
  auto check = [&](const std::vector<RevealedShare>& shares, const std::set<int>& want,
                   absl::string_view field) -> absl::Status {
    for (const RevealedShare& s : shares) {
      int w = g.IndexOf(s.owner);
      if (w < 0) {
        return absl::InvalidArgumentError(absl::StrCat("UnmaskResponse from client ", m.sender,
                                                       ": ", field, ": unknown owner id ",
                                                       s.owner));
      }
      if (want.count(w) == 0) {
        return absl::InvalidArgumentError(absl::StrCat("UnmaskResponse from client ", m.sender,
                                                       ": ", field, ": share of client ",
                                                       s.owner, " was not requested"));
      }
      if (s.x != g.ShareX(w, u)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "UnmaskResponse from client ", m.sender, ": ", field, ": share of client ", s.owner,
            " has x = ", static_cast<int>(s.x), ", expected ", static_cast<int>(g.ShareX(w, u))));
      }
    }
    return absl::OkStatus();
  };
  auto check_count = [&](const std::vector<RevealedShare>& shares, const std::set<int>& want,
                         absl::string_view field) -> absl::Status {
    // Owners are unique (Parse) and all requested (check), so equal sizes mean equal sets.
    if (shares.size() != want.size()) {
      return absl::InvalidArgumentError(absl::StrCat("UnmaskResponse from client ", m.sender,
                                                     ": ", field, ": ", shares.size(),
                                                     " shares, expected ", want.size()));
    }
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(check(m.self_mask_shares, want_b, "self_mask_shares"));
  RETURN_IF_ERROR(check(m.key_shares, want_sk, "key_shares"));
  RETURN_IF_ERROR(check_count(m.self_mask_shares, want_b, "self_mask_shares"));
  RETURN_IF_ERROR(check_count(m.key_shares, want_sk, "key_shares"));
  for (RevealedShare& s : m.self_mask_shares) {
    b_shares_[g.IndexOf(s.owner)].push_back({s.x, std::move(s.y)});
  }
  for (RevealedShare& s : m.key_shares) {
    sk_shares_[g.IndexOf(s.owner)].push_back({s.x, std::move(s.y)});
  }
  u4_[u] = 1;
  return absl::OkStatus();
}

absl::StatusOr<SecAggResult> Server::Finalize() {
  if (phase_ != Phase::kUnmask) {
    return absl::FailedPreconditionError(absl::StrCat("Finalize in phase ", PhaseName(phase_)));
  }
  const NeighbourGraph& g = plan_.graph();
  const SecAggConfig& cfg = plan_.config();
  const int t = plan_.threshold();
  int responders = 0;
  for (char c : u4_) responders += c ? 1 : 0;
  if (responders < t) {
    return Abort(absl::FailedPreconditionError(absl::StrCat(
        "secure aggregation aborted in Unmask: ", responders, " clients responded, threshold ", t)));
  }
  std::vector<MaskTerm> terms;
  for (int u = 0; u < n_; ++u) {
    if (u3_[u]) {
      if (static_cast<int>(b_shares_[u].size()) < t) {
        return Abort(absl::FailedPreconditionError(absl::StrCat(
            "secure aggregation aborted in Unmask: ", b_shares_[u].size(),
            " shares of the self mask of client ", g.id(u), ", threshold ", t)));
      }
      ASSIGN_OR_RETURN(std::string b, ShamirReconstruct(b_shares_[u], t));
      terms.push_back({std::move(b), MaskSign::kSubtract});
      continue;
    }
    if (!u2_[u]) continue;  // dropped before sharing keys: nobody masked with it
    std::vector<int> live;
    for (int v : g.Neighbours(u)) {
      if (u3_[v]) live.push_back(v);
    }
    if (live.empty()) continue;
    if (static_cast<int>(sk_shares_[u].size()) < t) {
      return Abort(absl::FailedPreconditionError(absl::StrCat(
          "secure aggregation aborted in Unmask: ", sk_shares_[u].size(),
          " shares of the mask key of dropped client ", g.id(u), ", threshold ", t)));
    }
    ASSIGN_OR_RETURN(std::string sk, ShamirReconstruct(sk_shares_[u], t));
    ASSIGN_OR_RETURN(X25519KeyPair pair, X25519FromPrivate(sk));
    if (pair.public_key != s_pk_[u]) {
      return Abort(absl::DataLossError(absl::StrCat(
          "secure aggregation: the reconstructed mask key of dropped client ", g.id(u),
          " does not match its advertised s_pk (corrupt shares)")));
    }
    for (int v : live) {
      ASSIGN_OR_RETURN(std::string seed,
                       PairKey(cfg, kMaskInfo, sk, s_pk_[v], g.id(u), g.id(v)));
      // v added +PRG(s_uv) when u < v and subtracted it when u > v.
      terms.push_back({std::move(seed), u < v ? MaskSign::kSubtract : MaskSign::kAdd});
    }
    std::fill(sk.begin(), sk.end(), '\0');
  }
  RETURN_IF_ERROR(ApplyMasks(terms, absl::MakeSpan(masked_sum_), cfg.threads));
  SecAggResult result;
  result.sum = std::move(masked_sum_);
  masked_sum_.clear();
  for (int u = 0; u < n_; ++u) {
    if (u3_[u]) result.contributors.push_back(g.id(u));
  }
  b_shares_.clear();
  sk_shares_.clear();
  phase_ = Phase::kDone;
  return result;
}

}  // namespace fedlora::common::secagg
