// Malformed-message rejection of common/secagg: Parse() structure checks and
// the Client / Server checks that need the round (ids, neighbours, receivers).
// Every rejection leaves the receiving party's state unchanged, which each
// test proves by completing the round afterwards with the exact sum.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/secagg/messages.h"
#include "common/secagg/protocol.h"
#include "tests/common/secagg_test_util.h"

namespace fedlora::common::secagg {
namespace {

using ::testing::ElementsAreArray;
using testing::MakeConfig;
using testing::MakeRound;
using testing::PlainSum;
using testing::Round;
using testing::StatusIs;
constexpr auto kInvalid = absl::StatusCode::kInvalidArgument;

// A round driven step by step; each stage keeps the messages it produced.
class Staged {
 public:
  explicit Staged(int n = 6, int k = 5, int t = 4) {
    auto r = MakeRound(MakeConfig(n, k, t, 9, 5));
    EXPECT_TRUE(r.ok()) << r.status();
    r_ = std::make_unique<Round>(std::move(*r));
  }
  Round& r() { return *r_; }
  Server& server() { return r_->server; }
  uint32_t id(int i) const { return r_->ids[i]; }

  void Advertise() {
    for (auto& c : r_->clients) {
      auto m = c.AdvertiseKeys();
      ASSERT_TRUE(m.ok()) << m.status();
      adverts.push_back(*m);
    }
  }
  void DeliverAdverts() {
    for (auto& m : adverts) ASSERT_TRUE(server().HandleAdvertiseKeys(m).ok());
    ASSERT_TRUE(server().CloseAdvertiseKeys().ok());
    for (auto& c : r_->clients) dirs.push_back(*server().KeyDirectoryFor(c.id()));
  }
  void Share() {
    for (size_t i = 0; i < r_->clients.size(); ++i) {
      auto m = r_->clients[i].ShareKeys(dirs[i]);
      ASSERT_TRUE(m.ok()) << m.status();
      share_keys.push_back(*m);
    }
  }
  void DeliverShares() {
    for (auto& m : share_keys) ASSERT_TRUE(server().HandleShareKeys(m).ok());
    ASSERT_TRUE(server().CloseShareKeys().ok());
    for (auto& c : r_->clients) deliveries.push_back(*server().ShareDeliveryFor(c.id()));
  }
  void Mask() {
    for (size_t i = 0; i < r_->clients.size(); ++i) {
      auto m = r_->clients[i].MaskedInput(deliveries[i], r_->inputs[i]);
      ASSERT_TRUE(m.ok()) << m.status();
      masked.push_back(*m);
    }
  }
  void DeliverMasked() {
    for (auto& m : masked) ASSERT_TRUE(server().HandleMaskedInput(m).ok());
    ASSERT_TRUE(server().CloseMaskedInput().ok());
    for (auto& c : r_->clients) requests.push_back(*server().UnmaskRequestFor(c.id()));
  }
  void Unmask() {
    for (size_t i = 0; i < r_->clients.size(); ++i) {
      auto m = r_->clients[i].Unmask(requests[i]);
      ASSERT_TRUE(m.ok()) << m.status();
      responses.push_back(*m);
    }
  }
  void DeliverResponsesAndCheck() {
    for (auto& m : responses) ASSERT_TRUE(server().HandleUnmaskResponse(m).ok());
    auto result = server().Finalize();
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_THAT(result->sum, ElementsAreArray(PlainSum(*r_, r_->ids)));
  }
  void Finish() {
    // Runs whatever stages are left, from the first one not yet done.
    if (adverts.empty()) Advertise();
    if (dirs.empty()) DeliverAdverts();
    if (share_keys.empty()) Share();
    if (deliveries.empty()) DeliverShares();
    if (masked.empty()) Mask();
    if (requests.empty()) DeliverMasked();
    if (responses.empty()) Unmask();
    DeliverResponsesAndCheck();
  }

  std::vector<std::string> adverts, dirs, share_keys, deliveries, masked, requests, responses;

 private:
  std::unique_ptr<Round> r_;
};

TEST(SecAggMessagesTest, RoundTripAllTypes) {
  Staged s;
  s.Advertise();
  s.DeliverAdverts();
  s.Share();
  s.DeliverShares();
  s.Mask();
  s.DeliverMasked();
  s.Unmask();
  EXPECT_EQ(AdvertiseKeys::Parse(s.adverts[0])->Serialize(), s.adverts[0]);
  EXPECT_EQ(KeyDirectory::Parse(s.dirs[1])->Serialize(), s.dirs[1]);
  EXPECT_EQ(ShareKeys::Parse(s.share_keys[2])->Serialize(), s.share_keys[2]);
  EXPECT_EQ(ShareDelivery::Parse(s.deliveries[3])->Serialize(), s.deliveries[3]);
  EXPECT_EQ(MaskedInput::Parse(s.masked[4])->Serialize(), s.masked[4]);
  EXPECT_EQ(UnmaskRequest::Parse(s.requests[5])->Serialize(), s.requests[5]);
  EXPECT_EQ(UnmaskResponse::Parse(s.responses[0])->Serialize(), s.responses[0]);
  auto h = MessageHeader::Parse(s.masked[4]);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->type, MessageType::kMaskedInput);
  EXPECT_EQ(h->party, s.id(4));
  s.DeliverResponsesAndCheck();
}

TEST(SecAggMessagesTest, TruncatedTrailingAndWrongTypeRejectedEverywhere) {
  Staged s;
  s.Advertise();
  s.DeliverAdverts();
  s.Share();
  s.DeliverShares();
  s.Mask();
  s.DeliverMasked();
  s.Unmask();
  struct Case {
    const std::string* bytes;
    std::function<absl::Status(std::string_view)> parse;
  };
  std::vector<Case> cases = {
      {&s.adverts[0], [](std::string_view b) { return AdvertiseKeys::Parse(b).status(); }},
      {&s.dirs[0], [](std::string_view b) { return KeyDirectory::Parse(b).status(); }},
      {&s.share_keys[0], [](std::string_view b) { return ShareKeys::Parse(b).status(); }},
      {&s.deliveries[0], [](std::string_view b) { return ShareDelivery::Parse(b).status(); }},
      {&s.masked[0], [](std::string_view b) { return MaskedInput::Parse(b).status(); }},
      {&s.requests[0], [](std::string_view b) { return UnmaskRequest::Parse(b).status(); }},
      {&s.responses[0], [](std::string_view b) { return UnmaskResponse::Parse(b).status(); }},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string& good = *cases[i].bytes;
    ASSERT_TRUE(cases[i].parse(good).ok()) << i;
    // Every strict prefix is rejected, never crashes.
    for (size_t len = 0; len < good.size(); len += (len < 64 ? 1 : 13)) {
      EXPECT_EQ(cases[i].parse(good.substr(0, len)).code(), kInvalid) << i << " len " << len;
    }
    EXPECT_THAT(cases[i].parse(good + "x"), StatusIs(kInvalid, "trailing bytes"));
    std::string bad_magic = good;
    bad_magic[0] = 'X';
    EXPECT_THAT(cases[i].parse(bad_magic), StatusIs(kInvalid, "bad magic"));
    std::string other = good;
    other[4] = static_cast<char>(i == 0 ? 2 : 1);
    EXPECT_THAT(cases[i].parse(other), StatusIs(kInvalid, "message type"));
  }
  // A huge count in a short message is refused before allocating.
  std::string huge = s.share_keys[0].substr(0, 17) + std::string("\xff\xff\xff\x7f", 4);
  EXPECT_THAT(ShareKeys::Parse(huge).status(), StatusIs(kInvalid, "do not fit"));
  std::string huge_len = s.masked[0].substr(0, 17) + std::string(8, '\x7f');
  EXPECT_THAT(MaskedInput::Parse(huge_len).status(), StatusIs(kInvalid, "truncated masked"));
}

TEST(SecAggMessagesTest, ServerRejectsBadAdvertiseKeys) {
  Staged s;
  s.Advertise();
  Server& srv = s.server();
  auto m = *AdvertiseKeys::Parse(s.adverts[1]);
  m.sender = 4242;
  EXPECT_THAT(srv.HandleAdvertiseKeys(m.Serialize()), StatusIs(kInvalid, "unknown sender id 4242"));
  m = *AdvertiseKeys::Parse(s.adverts[1]);
  m.round_id += 1;
  EXPECT_THAT(srv.HandleAdvertiseKeys(m.Serialize()), StatusIs(kInvalid, "round_id"));
  m = *AdvertiseKeys::Parse(s.adverts[1]);
  m.s_pk = m.c_pk;
  EXPECT_THAT(srv.HandleAdvertiseKeys(m.Serialize()), StatusIs(kInvalid, "c_pk and s_pk are equal"));
  ASSERT_TRUE(srv.HandleAdvertiseKeys(s.adverts[1]).ok());
  EXPECT_THAT(srv.HandleAdvertiseKeys(s.adverts[1]),
              StatusIs(absl::StatusCode::kAlreadyExists, "duplicate message from client"));
  // Wrong phase: a ShareKeys-typed message is refused by type; a MaskedInput now by phase.
  EXPECT_THAT(srv.HandleMaskedInput(MaskedInput{s.r().config.round_id, s.id(1), {1, 2}}.Serialize()),
              StatusIs(absl::StatusCode::kFailedPrecondition, "arrived in phase AdvertiseKeys"));
  // The rejected messages changed nothing: deliver the rest and finish exactly.
  for (size_t i = 0; i < s.adverts.size(); ++i) {
    if (i != 1) {
      ASSERT_TRUE(srv.HandleAdvertiseKeys(s.adverts[i]).ok());
    }
  }
  ASSERT_TRUE(srv.CloseAdvertiseKeys().ok());
  for (auto& c : s.r().clients) s.dirs.push_back(*srv.KeyDirectoryFor(c.id()));
  s.Finish();
}

TEST(SecAggMessagesTest, ServerRejectsBadShareKeys) {
  // Sparse graph so that "not a neighbour" is possible: n = 12, k = 4.
  Staged s(12, 4, 3);
  s.Advertise();
  s.DeliverAdverts();
  s.Share();
  Server& srv = s.server();
  const NeighbourGraph& g = srv.plan().graph();
  int sender_index = g.IndexOf(s.id(0));
  auto good = *ShareKeys::Parse(s.share_keys[0]);

  auto dup = good;
  dup.entries.push_back(dup.entries[0]);
  EXPECT_THAT(srv.HandleShareKeys(dup.Serialize()), StatusIs(kInvalid, "duplicate share for receiver"));

  auto unknown = good;
  unknown.entries[0].receiver = 999999;
  EXPECT_THAT(srv.HandleShareKeys(unknown.Serialize()),
              StatusIs(kInvalid, "addressed to unknown client id 999999"));

  uint32_t stranger = 0;
  for (int v = 0; v < g.size(); ++v) {
    if (v != sender_index && !g.Adjacent(sender_index, v)) stranger = g.id(v);
  }
  auto misaddressed = good;
  misaddressed.entries[0].receiver = stranger;
  EXPECT_THAT(srv.HandleShareKeys(misaddressed.Serialize()),
              StatusIs(kInvalid, "which is not a neighbour in its key directory"));

  auto missing = good;
  missing.entries.pop_back();
  EXPECT_THAT(srv.HandleShareKeys(missing.Serialize()), StatusIs(kInvalid, "no share for neighbour"));

  auto short_ct = good;
  short_ct.entries[0].sealed.pop_back();
  EXPECT_THAT(srv.HandleShareKeys(short_ct.Serialize()), StatusIs(kInvalid, "ShareKeys (party"));

  auto foreign = *ShareKeys::Parse(s.share_keys[1]);
  foreign.sender = 31337;
  EXPECT_THAT(srv.HandleShareKeys(foreign.Serialize()), StatusIs(kInvalid, "unknown sender id 31337"));
  s.Finish();
}

TEST(SecAggMessagesTest, ClientRejectsBadKeyDirectoryAndShareDelivery) {
  Staged s;
  s.Advertise();
  s.DeliverAdverts();
  Client& c0 = s.r().clients[0];
  // A directory addressed to another client.
  EXPECT_THAT(c0.ShareKeys(s.dirs[1]).status(), StatusIs(kInvalid, "addressed to client"));
  auto dir = *KeyDirectory::Parse(s.dirs[0]);
  dir.entries[0].id = 77777;
  EXPECT_THAT(c0.ShareKeys(dir.Serialize()).status(), StatusIs(kInvalid, "unknown client id 77777"));
  s.Share();
  s.DeliverShares();
  // ShareDelivery: wrong receiver, duplicate share, unknown sender, tampered ciphertext.
  EXPECT_THAT(c0.MaskedInput(s.deliveries[2], s.r().inputs[0]).status(),
              StatusIs(kInvalid, "addressed to client"));
  auto del = *ShareDelivery::Parse(s.deliveries[0]);
  auto dup = del;
  dup.entries.push_back(dup.entries[0]);
  EXPECT_THAT(c0.MaskedInput(dup.Serialize(), s.r().inputs[0]).status(),
              StatusIs(kInvalid, "duplicate share from sender"));
  auto unknown = del;
  unknown.entries[0].sender = 5555;
  EXPECT_THAT(c0.MaskedInput(unknown.Serialize(), s.r().inputs[0]).status(),
              StatusIs(kInvalid, "an unknown sender id"));
  auto tampered = del;
  tampered.entries[1].sealed[20] ^= 1;
  EXPECT_THAT(c0.MaskedInput(tampered.Serialize(), s.r().inputs[0]).status(),
              StatusIs(kInvalid, "authentication failed"));
  // A share relabelled as coming from another sender fails the AAD binding.
  auto swapped = del;
  std::swap(swapped.entries[0].sealed, swapped.entries[1].sealed);
  EXPECT_THAT(c0.MaskedInput(swapped.Serialize(), s.r().inputs[0]).status(),
              StatusIs(kInvalid, "authentication failed"));
  std::vector<uint32_t> wrong_len(3, 0);
  EXPECT_THAT(c0.MaskedInput(s.deliveries[0], wrong_len).status(),
              StatusIs(kInvalid, "the round expects 9"));
  s.Finish();
}

TEST(SecAggMessagesTest, ServerRejectsBadMaskedInput) {
  Staged s;
  s.Advertise();
  s.DeliverAdverts();
  s.Share();
  // Client 5 does not share keys: it is dropped before masking.
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(s.server().HandleShareKeys(s.share_keys[i]).ok());
  ASSERT_TRUE(s.server().CloseShareKeys().ok());
  auto m = MaskedInput{s.r().config.round_id, s.id(0), std::vector<uint32_t>(8, 1)};
  EXPECT_THAT(s.server().HandleMaskedInput(m.Serialize()), StatusIs(kInvalid, "8 words, expected 9"));
  m = MaskedInput{s.r().config.round_id, s.id(5), std::vector<uint32_t>(9, 1)};
  EXPECT_THAT(s.server().HandleMaskedInput(m.Serialize()),
              StatusIs(absl::StatusCode::kFailedPrecondition, "dropped out in an earlier phase"));
  std::string truncated = m.Serialize();
  truncated.resize(truncated.size() - 2);
  EXPECT_THAT(s.server().HandleMaskedInput(truncated), StatusIs(kInvalid, "truncated masked"));
  // Finish with the five survivors: rejected inputs were not added to the sum.
  std::vector<uint32_t> sum(9, 0);
  for (int i = 0; i < 5; ++i) {
    auto del = *s.server().ShareDeliveryFor(s.id(i));
    auto y = s.r().clients[i].MaskedInput(del, s.r().inputs[i]);
    ASSERT_TRUE(y.ok()) << y.status();
    ASSERT_TRUE(s.server().HandleMaskedInput(*y).ok());
  }
  ASSERT_TRUE(s.server().CloseMaskedInput().ok());
  for (int i = 0; i < 5; ++i) {
    auto req = *s.server().UnmaskRequestFor(s.id(i));
    auto resp = s.r().clients[i].Unmask(req);
    ASSERT_TRUE(resp.ok()) << resp.status();
    ASSERT_TRUE(s.server().HandleUnmaskResponse(*resp).ok());
  }
  auto result = s.server().Finalize();
  ASSERT_TRUE(result.ok()) << result.status();
  std::vector<uint32_t> five(s.r().ids.begin(), s.r().ids.begin() + 5);
  EXPECT_THAT(result->sum, ElementsAreArray(PlainSum(s.r(), five)));
}

TEST(SecAggMessagesTest, ClientRejectsBadUnmaskRequest) {
  Staged s;
  s.Advertise();
  s.DeliverAdverts();
  s.Share();
  s.DeliverShares();
  s.Mask();
  s.DeliverMasked();
  Client& c0 = s.r().clients[0];
  auto req = *UnmaskRequest::Parse(s.requests[0]);
  EXPECT_THAT(c0.Unmask(s.requests[1]).status(), StatusIs(kInvalid, "addressed to client"));
  auto both = req;
  both.dropped.push_back(both.survivors[0]);
  EXPECT_THAT(c0.Unmask(both.Serialize()).status(),
              StatusIs(kInvalid, "both as survivor and as dropped"));
  auto omitted = req;
  omitted.survivors.pop_back();
  EXPECT_THAT(c0.Unmask(omitted.Serialize()).status(),
              StatusIs(kInvalid, "listed neither as survivor nor as dropped"));
  auto stranger = req;
  stranger.dropped.push_back(123456);
  EXPECT_THAT(c0.Unmask(stranger.Serialize()).status(),
              StatusIs(kInvalid, "client 123456 is not a neighbour whose shares"));
  auto self = req;
  self.survivors.push_back(s.id(0));
  EXPECT_THAT(c0.Unmask(self.Serialize()).status(), StatusIs(kInvalid, "is not a neighbour"));
  s.Finish();
}

TEST(SecAggMessagesTest, ServerRejectsBadUnmaskResponse) {
  Staged s;
  s.Advertise();
  s.DeliverAdverts();
  s.Share();
  s.DeliverShares();
  s.Mask();
  s.DeliverMasked();
  s.Unmask();
  Server& srv = s.server();
  auto good = *UnmaskResponse::Parse(s.responses[0]);
  auto dup = good;
  dup.self_mask_shares.push_back(dup.self_mask_shares[0]);
  EXPECT_THAT(srv.HandleUnmaskResponse(dup.Serialize()),
              StatusIs(kInvalid, "duplicate share of owner"));
  auto wrong_x = good;
  wrong_x.self_mask_shares[1].x ^= 0x40;
  EXPECT_THAT(srv.HandleUnmaskResponse(wrong_x.Serialize()), StatusIs(kInvalid, "has x ="));
  auto both = good;
  both.key_shares.push_back(both.self_mask_shares[1]);
  EXPECT_THAT(srv.HandleUnmaskResponse(both.Serialize()),
              StatusIs(kInvalid, "reveals both the self-mask share and the key share"));
  auto unrequested = good;
  unrequested.key_shares.push_back(unrequested.self_mask_shares[1]);
  unrequested.self_mask_shares.erase(unrequested.self_mask_shares.begin() + 1);
  EXPECT_THAT(srv.HandleUnmaskResponse(unrequested.Serialize()),
              StatusIs(kInvalid, "was not requested"));
  auto unknown = good;
  unknown.self_mask_shares[1].owner = 8888;
  EXPECT_THAT(srv.HandleUnmaskResponse(unknown.Serialize()), StatusIs(kInvalid, "unknown owner id 8888"));
  auto short_list = good;
  short_list.self_mask_shares.pop_back();
  EXPECT_THAT(srv.HandleUnmaskResponse(short_list.Serialize()), StatusIs(kInvalid, "shares, expected"));
  auto stranger = good;
  stranger.sender = 4040;
  EXPECT_THAT(srv.HandleUnmaskResponse(stranger.Serialize()), StatusIs(kInvalid, "unknown sender id 4040"));
  s.DeliverResponsesAndCheck();
}

TEST(SecAggMessagesTest, CorruptSharesAreDetectedWhenReconstructingAKey) {
  // Client 5 drops after sharing keys; one survivor lies about its key share:
  // the reconstructed s_sk no longer matches the advertised s_pk.
  Staged s(6, 5, 4);
  s.Advertise();
  s.DeliverAdverts();
  s.Share();
  s.DeliverShares();
  Server& srv = s.server();
  for (int i = 0; i < 5; ++i) {
    auto y = s.r().clients[i].MaskedInput(s.deliveries[i], s.r().inputs[i]);
    ASSERT_TRUE(y.ok());
    ASSERT_TRUE(srv.HandleMaskedInput(*y).ok());
  }
  ASSERT_TRUE(srv.CloseMaskedInput().ok());
  for (int i = 0; i < 5; ++i) {
    auto resp = s.r().clients[i].Unmask(*srv.UnmaskRequestFor(s.id(i)));
    ASSERT_TRUE(resp.ok());
    auto m = *UnmaskResponse::Parse(*resp);
    ASSERT_EQ(m.key_shares.size(), 1u);
    // Every holder corrupts byte 5 (bytes 0 and 31 hold X25519 clamping bits):
    // any t of them reconstruct a different key.
    m.key_shares[0].y[5] ^= 1;
    ASSERT_TRUE(srv.HandleUnmaskResponse(m.Serialize()).ok());
  }
  EXPECT_THAT(srv.Finalize().status(),
              StatusIs(absl::StatusCode::kDataLoss, "does not match its advertised s_pk"));
}

}  // namespace
}  // namespace fedlora::common::secagg
