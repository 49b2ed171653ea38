#pragma once
// Wire messages of the secure-aggregation protocol (common/secagg/protocol.h),
// as plain structs with Serialize() / Parse(). Transport-agnostic: the bytes
// travel as an opaque `bytes` field on any stream.
//
// Framing, all integers little-endian:
//   header = "FSA1" (4) | type (1) | round_id (u64) | party (u32)
// `party` is the sender of a client->server message and the receiver of a
// server->client message. Bodies:
//   AdvertiseKeys    (1, c->s): c_pk (32) | s_pk (32)
//   KeyDirectory     (2, s->c): count u32 | count x (id u32 | c_pk 32 | s_pk 32)
//   ShareKeys        (3, c->s): count u32 | count x (receiver u32 | sealed 101)
//   ShareDelivery    (4, s->c): count u32 | count x (sender u32 | sealed 101)
//   MaskedInput      (5, c->s): length u64 | length x u32
//   UnmaskRequest    (6, s->c): ns u32 | ns x id u32 | nd u32 | nd x id u32
//   UnmaskResponse   (7, c->s): nb u32 | nb x (owner u32 | x u8 | y 32)
//                               | nk u32 | nk x (owner u32 | x u8 | y 32)
// `sealed` is AES-256-GCM: nonce 12 | ciphertext of SharePlaintext (73) | tag 16.
//
// Parse() checks structure only and fails with InvalidArgument naming the
// message, the field and the party: wrong magic or type, truncated data,
// trailing bytes, counts that do not fit the remaining bytes, duplicate ids /
// owners within a list, an id both survivor and dropped, a share with x = 0.
// Whether ids belong to the round, are neighbours, or are addressed to the
// right client is checked by Client / Server, which know the round.
// Parse never allocates more than the input size justifies.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::common::secagg {

inline constexpr size_t kKeyBytes = 32;
inline constexpr size_t kSharePlaintextBytes = 4 + 4 + 1 + 32 + 32;
inline constexpr size_t kSealedShareBytes = 12 + kSharePlaintextBytes + 16;

enum class MessageType : uint8_t {
  kAdvertiseKeys = 1,
  kKeyDirectory = 2,
  kShareKeys = 3,
  kShareDelivery = 4,
  kMaskedInput = 5,
  kUnmaskRequest = 6,
  kUnmaskResponse = 7,
};

// Reads only the header (to route a message). InvalidArgument when too short
// or the magic is wrong.
struct MessageHeader {
  MessageType type;
  uint64_t round_id = 0;
  uint32_t party = 0;
  static absl::StatusOr<MessageHeader> Parse(std::string_view bytes);
};

struct AdvertiseKeys {
  uint64_t round_id = 0;
  uint32_t sender = 0;
  std::string c_pk;  // X25519, encrypts the share channel
  std::string s_pk;  // X25519, agrees the pairwise mask seeds
  std::string Serialize() const;
  static absl::StatusOr<AdvertiseKeys> Parse(std::string_view bytes);
};

struct KeyDirectory {
  struct Entry {
    uint32_t id = 0;
    std::string c_pk;
    std::string s_pk;
  };
  uint64_t round_id = 0;
  uint32_t receiver = 0;
  std::vector<Entry> entries;  // the receiver's neighbours that advertised
  std::string Serialize() const;
  static absl::StatusOr<KeyDirectory> Parse(std::string_view bytes);
};

struct ShareKeys {
  struct Entry {
    uint32_t receiver = 0;
    std::string sealed;  // kSealedShareBytes
  };
  uint64_t round_id = 0;
  uint32_t sender = 0;
  std::vector<Entry> entries;
  std::string Serialize() const;
  static absl::StatusOr<ShareKeys> Parse(std::string_view bytes);
};

struct ShareDelivery {
  struct Entry {
    uint32_t sender = 0;
    std::string sealed;  // kSealedShareBytes
  };
  uint64_t round_id = 0;
  uint32_t receiver = 0;
  std::vector<Entry> entries;
  std::string Serialize() const;
  static absl::StatusOr<ShareDelivery> Parse(std::string_view bytes);
};

struct MaskedInput {
  uint64_t round_id = 0;
  uint32_t sender = 0;
  std::vector<uint32_t> masked;
  std::string Serialize() const;
  static absl::StatusOr<MaskedInput> Parse(std::string_view bytes);
};

struct UnmaskRequest {
  uint64_t round_id = 0;
  uint32_t receiver = 0;
  std::vector<uint32_t> survivors;  // receiver's neighbours that sent masked input
  std::vector<uint32_t> dropped;    // receiver's neighbours that shared keys but did not
  std::string Serialize() const;
  static absl::StatusOr<UnmaskRequest> Parse(std::string_view bytes);
};

struct RevealedShare {
  uint32_t owner = 0;
  uint8_t x = 0;
  std::string y;  // 32 bytes
};

struct UnmaskResponse {
  uint64_t round_id = 0;
  uint32_t sender = 0;
  std::vector<RevealedShare> self_mask_shares;  // shares of b_u, u surviving
  std::vector<RevealedShare> key_shares;        // shares of s_sk_u, u dropped
  std::string Serialize() const;
  static absl::StatusOr<UnmaskResponse> Parse(std::string_view bytes);
};

// What a sealed share carries (plaintext, before AES-256-GCM).
struct SharePlaintext {
  uint32_t owner = 0;
  uint32_t holder = 0;
  uint8_t x = 0;
  std::string b_share;   // 32 bytes: share of the self-mask seed b_owner
  std::string sk_share;  // 32 bytes: share of the mask agreement key s_sk_owner
  std::string Serialize() const;
  static absl::StatusOr<SharePlaintext> Parse(std::string_view bytes);
};

}  // namespace fedlora::common::secagg
