#include "common/secagg/messages.h"

#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/status/status.h"

namespace fedlora::common::secagg {
namespace {

constexpr char kMagic[4] = {'F', 'S', 'A', '1'};
constexpr size_t kHeaderBytes = 4 + 1 + 8 + 4;

class Writer {
 public:
  Writer(MessageType type, uint64_t round_id, uint32_t party) {
    out_.append(kMagic, 4);
    out_.push_back(static_cast<char>(type));
    U64(round_id);
    U32(party);
  }
  void U8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void U32(uint32_t v) {
    for (int i = 0; i < 4; ++i) out_.push_back(static_cast<char>(v >> (8 * i)));
  }
  void U64(uint64_t v) {
    for (int i = 0; i < 8; ++i) out_.push_back(static_cast<char>(v >> (8 * i)));
  }
  void Bytes(std::string_view b) { out_.append(b.data(), b.size()); }
  void Words(const std::vector<uint32_t>& w) {
    size_t at = out_.size();
    out_.resize(at + w.size() * 4);
    static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "little-endian host assumed");
    if (!w.empty()) std::memcpy(out_.data() + at, w.data(), w.size() * 4);
  }
  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
};

// Bounds-checked reader; every error names the message, the party and the field.
class Reader {
 public:
  Reader(std::string_view data, const char* what) : data_(data), what_(what) {}

  absl::Status Header(MessageType want, uint64_t* round_id, uint32_t* party) {
    if (data_.size() < kHeaderBytes) {
      return absl::InvalidArgumentError(absl::StrCat(what_, ": truncated header: ", data_.size(),
                                                     " bytes, need ", kHeaderBytes));
    }
    if (std::memcmp(data_.data(), kMagic, 4) != 0) {
      return absl::InvalidArgumentError(absl::StrCat(what_, ": bad magic (expected \"FSA1\")"));
    }
    uint8_t type = static_cast<uint8_t>(data_[4]);
    if (type != static_cast<uint8_t>(want)) {
      return absl::InvalidArgumentError(absl::StrCat(what_, ": message type ", type,
                                                     ", expected ", static_cast<int>(want)));
    }
    pos_ = 5;
    uint64_t r = 0;
    uint32_t p = 0;
    RETURN_IF_ERROR(U64("round_id", &r));
    RETURN_IF_ERROR(U32("party", &p));
    *round_id = r;
    *party = p;
    what_ = absl::StrCat(what_, " (party ", p, ")");
    return absl::OkStatus();
  }
  absl::Status Need(size_t n, absl::string_view field) {
    if (data_.size() - pos_ < n) {
      return absl::InvalidArgumentError(absl::StrCat(what_, ": truncated at ", field, ": need ", n,
                                                     " bytes, ", data_.size() - pos_, " left"));
    }
    return absl::OkStatus();
  }
  absl::Status U8(absl::string_view field, uint8_t* v) {
    RETURN_IF_ERROR(Need(1, field));
    *v = static_cast<uint8_t>(data_[pos_++]);
    return absl::OkStatus();
  }
  absl::Status U32(absl::string_view field, uint32_t* v) {
    RETURN_IF_ERROR(Need(4, field));
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>(static_cast<uint8_t>(data_[pos_ + i])) << (8 * i);
    pos_ += 4;
    *v = r;
    return absl::OkStatus();
  }
  absl::Status U64(absl::string_view field, uint64_t* v) {
    RETURN_IF_ERROR(Need(8, field));
    uint64_t r = 0;
    for (int i = 0; i < 8; ++i) r |= static_cast<uint64_t>(static_cast<uint8_t>(data_[pos_ + i])) << (8 * i);
    pos_ += 8;
    *v = r;
    return absl::OkStatus();
  }
  absl::Status Bytes(absl::string_view field, size_t n, std::string* out) {
    RETURN_IF_ERROR(Need(n, field));
    out->assign(data_.data() + pos_, n);
    pos_ += n;
    return absl::OkStatus();
  }
  // Reads a count and checks count * item_bytes fits in what is left.
  absl::Status Count(absl::string_view field, size_t item_bytes, uint32_t* count) {
    RETURN_IF_ERROR(U32(field, count));
    if (static_cast<uint64_t>(*count) * item_bytes > data_.size() - pos_) {
      return absl::InvalidArgumentError(
          absl::StrCat(what_, ": ", field, " = ", *count, " entries of ", item_bytes,
                       " bytes do not fit in the ", data_.size() - pos_, " bytes left"));
    }
    return absl::OkStatus();
  }
  absl::Status Words(absl::string_view field, uint64_t n, std::vector<uint32_t>* out) {
    if (n > (data_.size() - pos_) / 4) {
      return absl::InvalidArgumentError(absl::StrCat(what_, ": truncated ", field, ": length ", n,
                                                     " words, ", data_.size() - pos_,
                                                     " bytes left"));
    }
    out->resize(n);
    if (n > 0) std::memcpy(out->data(), data_.data() + pos_, n * 4);
    pos_ += n * 4;
    return absl::OkStatus();
  }
  absl::Status End() {
    if (pos_ != data_.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(what_, ": ", data_.size() - pos_, " trailing bytes after the last field"));
    }
    return absl::OkStatus();
  }
  absl::Status Error(absl::string_view msg) const {
    return absl::InvalidArgumentError(absl::StrCat(what_, ": ", msg));
  }

 private:
  std::string_view data_;
  std::string what_;
  size_t pos_ = 0;
};

absl::Status ReadIdList(Reader& r, absl::string_view field, std::vector<uint32_t>* ids) {
  uint32_t n = 0;
  RETURN_IF_ERROR(r.Count(field, 4, &n));
  std::set<uint32_t> seen;
  for (uint32_t i = 0; i < n; ++i) {
    uint32_t id = 0;
    RETURN_IF_ERROR(r.U32(field, &id));
    if (!seen.insert(id).second) {
      return r.Error(absl::StrCat(field, "[", i, "]: duplicate id ", id));
    }
    ids->push_back(id);
  }
  return absl::OkStatus();
}

absl::Status ReadShares(Reader& r, absl::string_view field, std::vector<RevealedShare>* out) {
  uint32_t n = 0;
  RETURN_IF_ERROR(r.Count(field, 4 + 1 + 32, &n));
  std::set<uint32_t> seen;
  for (uint32_t i = 0; i < n; ++i) {
    RevealedShare s;
    RETURN_IF_ERROR(r.U32(field, &s.owner));
    RETURN_IF_ERROR(r.U8(field, &s.x));
    RETURN_IF_ERROR(r.Bytes(field, 32, &s.y));
    if (!seen.insert(s.owner).second) {
      return r.Error(absl::StrCat(field, "[", i, "]: duplicate share of owner ", s.owner));
    }
    if (s.x == 0) return r.Error(absl::StrCat(field, "[", i, "]: share x = 0"));
    out->push_back(std::move(s));
  }
  return absl::OkStatus();
}

void WriteShares(Writer& w, const std::vector<RevealedShare>& shares) {
  w.U32(static_cast<uint32_t>(shares.size()));
  for (const RevealedShare& s : shares) {
    w.U32(s.owner);
    w.U8(s.x);
    w.Bytes(s.y);
  }
}

}  // namespace

absl::StatusOr<MessageHeader> MessageHeader::Parse(std::string_view bytes) {
  if (bytes.size() < kHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("secagg message: truncated header: ", bytes.size(), " bytes"));
  }
  if (std::memcmp(bytes.data(), kMagic, 4) != 0) {
    return absl::InvalidArgumentError("secagg message: bad magic (expected \"FSA1\")");
  }
  uint8_t type = static_cast<uint8_t>(bytes[4]);
  if (type < 1 || type > 7) {
    return absl::InvalidArgumentError(absl::StrCat("secagg message: unknown type ", type));
  }
  MessageHeader h;
  h.type = static_cast<MessageType>(type);
  for (int i = 0; i < 8; ++i) h.round_id |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[5 + i])) << (8 * i);
  for (int i = 0; i < 4; ++i) h.party |= static_cast<uint32_t>(static_cast<uint8_t>(bytes[13 + i])) << (8 * i);
  return h;
}

std::string AdvertiseKeys::Serialize() const {
  Writer w(MessageType::kAdvertiseKeys, round_id, sender);
  w.Bytes(c_pk);
  w.Bytes(s_pk);
  return w.Take();
}

absl::StatusOr<AdvertiseKeys> AdvertiseKeys::Parse(std::string_view bytes) {
  Reader r(bytes, "AdvertiseKeys");
  AdvertiseKeys m;
  RETURN_IF_ERROR(r.Header(MessageType::kAdvertiseKeys, &m.round_id, &m.sender));
  RETURN_IF_ERROR(r.Bytes("c_pk", kKeyBytes, &m.c_pk));
  RETURN_IF_ERROR(r.Bytes("s_pk", kKeyBytes, &m.s_pk));
  RETURN_IF_ERROR(r.End());
  return m;
}

std::string KeyDirectory::Serialize() const {
  Writer w(MessageType::kKeyDirectory, round_id, receiver);
  w.U32(static_cast<uint32_t>(entries.size()));
  for (const Entry& e : entries) {
    w.U32(e.id);
    w.Bytes(e.c_pk);
    w.Bytes(e.s_pk);
  }
  return w.Take();
}

absl::StatusOr<KeyDirectory> KeyDirectory::Parse(std::string_view bytes) {
  Reader r(bytes, "KeyDirectory");
  KeyDirectory m;
  RETURN_IF_ERROR(r.Header(MessageType::kKeyDirectory, &m.round_id, &m.receiver));
  uint32_t n = 0;
  RETURN_IF_ERROR(r.Count("entries", 4 + 2 * kKeyBytes, &n));
  std::set<uint32_t> seen;
  for (uint32_t i = 0; i < n; ++i) {
    Entry e;
    RETURN_IF_ERROR(r.U32("entries.id", &e.id));
    RETURN_IF_ERROR(r.Bytes("entries.c_pk", kKeyBytes, &e.c_pk));
    RETURN_IF_ERROR(r.Bytes("entries.s_pk", kKeyBytes, &e.s_pk));
    if (!seen.insert(e.id).second) {
      return r.Error(absl::StrCat("entries[", i, "]: duplicate id ", e.id));
    }
    m.entries.push_back(std::move(e));
  }
  RETURN_IF_ERROR(r.End());
  return m;
}

std::string ShareKeys::Serialize() const {
  Writer w(MessageType::kShareKeys, round_id, sender);
  w.U32(static_cast<uint32_t>(entries.size()));
  for (const Entry& e : entries) {
    w.U32(e.receiver);
    w.Bytes(e.sealed);
  }
  return w.Take();
}

absl::StatusOr<ShareKeys> ShareKeys::Parse(std::string_view bytes) {
  Reader r(bytes, "ShareKeys");
  ShareKeys m;
  RETURN_IF_ERROR(r.Header(MessageType::kShareKeys, &m.round_id, &m.sender));
  uint32_t n = 0;
  RETURN_IF_ERROR(r.Count("entries", 4 + kSealedShareBytes, &n));
  std::set<uint32_t> seen;
  for (uint32_t i = 0; i < n; ++i) {
    Entry e;
    RETURN_IF_ERROR(r.U32("entries.receiver", &e.receiver));
    RETURN_IF_ERROR(r.Bytes("entries.sealed", kSealedShareBytes, &e.sealed));
    if (!seen.insert(e.receiver).second) {
      return r.Error(absl::StrCat("entries[", i, "]: duplicate share for receiver ", e.receiver));
    }
    m.entries.push_back(std::move(e));
  }
  RETURN_IF_ERROR(r.End());
  return m;
}

std::string ShareDelivery::Serialize() const {
  Writer w(MessageType::kShareDelivery, round_id, receiver);
  w.U32(static_cast<uint32_t>(entries.size()));
  for (const Entry& e : entries) {
    w.U32(e.sender);
    w.Bytes(e.sealed);
  }
  return w.Take();
}

absl::StatusOr<ShareDelivery> ShareDelivery::Parse(std::string_view bytes) {
  Reader r(bytes, "ShareDelivery");
  ShareDelivery m;
  RETURN_IF_ERROR(r.Header(MessageType::kShareDelivery, &m.round_id, &m.receiver));
  uint32_t n = 0;
  RETURN_IF_ERROR(r.Count("entries", 4 + kSealedShareBytes, &n));
  std::set<uint32_t> seen;
  for (uint32_t i = 0; i < n; ++i) {
    Entry e;
    RETURN_IF_ERROR(r.U32("entries.sender", &e.sender));
    RETURN_IF_ERROR(r.Bytes("entries.sealed", kSealedShareBytes, &e.sealed));
    if (!seen.insert(e.sender).second) {
      return r.Error(absl::StrCat("entries[", i, "]: duplicate share from sender ", e.sender));
    }
    m.entries.push_back(std::move(e));
  }
  RETURN_IF_ERROR(r.End());
  return m;
}

std::string MaskedInput::Serialize() const {
  Writer w(MessageType::kMaskedInput, round_id, sender);
  w.U64(masked.size());
  w.Words(masked);
  return w.Take();
}

absl::StatusOr<MaskedInput> MaskedInput::Parse(std::string_view bytes) {
  Reader r(bytes, "MaskedInput");
  MaskedInput m;
  RETURN_IF_ERROR(r.Header(MessageType::kMaskedInput, &m.round_id, &m.sender));
  uint64_t n = 0;
  RETURN_IF_ERROR(r.U64("length", &n));
  RETURN_IF_ERROR(r.Words("masked", n, &m.masked));
  RETURN_IF_ERROR(r.End());
  return m;
}

std::string UnmaskRequest::Serialize() const {
  Writer w(MessageType::kUnmaskRequest, round_id, receiver);
  w.U32(static_cast<uint32_t>(survivors.size()));
  for (uint32_t id : survivors) w.U32(id);
  w.U32(static_cast<uint32_t>(dropped.size()));
  for (uint32_t id : dropped) w.U32(id);
  return w.Take();
}

absl::StatusOr<UnmaskRequest> UnmaskRequest::Parse(std::string_view bytes) {
  Reader r(bytes, "UnmaskRequest");
  UnmaskRequest m;
  RETURN_IF_ERROR(r.Header(MessageType::kUnmaskRequest, &m.round_id, &m.receiver));
  RETURN_IF_ERROR(ReadIdList(r, "survivors", &m.survivors));
  RETURN_IF_ERROR(ReadIdList(r, "dropped", &m.dropped));
  RETURN_IF_ERROR(r.End());
  std::set<uint32_t> surv(m.survivors.begin(), m.survivors.end());
  for (uint32_t id : m.dropped) {
    if (surv.count(id) != 0) {
      return r.Error(absl::StrCat("client ", id, " is listed both as survivor and as dropped"));
    }
  }
  return m;
}

std::string UnmaskResponse::Serialize() const {
  Writer w(MessageType::kUnmaskResponse, round_id, sender);
  WriteShares(w, self_mask_shares);
  WriteShares(w, key_shares);
  return w.Take();
}

absl::StatusOr<UnmaskResponse> UnmaskResponse::Parse(std::string_view bytes) {
  Reader r(bytes, "UnmaskResponse");
  UnmaskResponse m;
  RETURN_IF_ERROR(r.Header(MessageType::kUnmaskResponse, &m.round_id, &m.sender));
  RETURN_IF_ERROR(ReadShares(r, "self_mask_shares", &m.self_mask_shares));
  RETURN_IF_ERROR(ReadShares(r, "key_shares", &m.key_shares));
  RETURN_IF_ERROR(r.End());
  std::set<uint32_t> owners;
  for (const RevealedShare& s : m.self_mask_shares) owners.insert(s.owner);
  for (const RevealedShare& s : m.key_shares) {
    if (owners.count(s.owner) != 0) {
      return r.Error(absl::StrCat("reveals both the self-mask share and the key share of client ",
                                  s.owner));
    }
  }
  return m;
}

std::string SharePlaintext::Serialize() const {
  std::string out;
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(owner >> (8 * i)));
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(holder >> (8 * i)));
  out.push_back(static_cast<char>(x));
  out += b_share;
  out += sk_share;
  return out;
}

absl::StatusOr<SharePlaintext> SharePlaintext::Parse(std::string_view bytes) {
  if (bytes.size() != kSharePlaintextBytes) {
    return absl::InvalidArgumentError(absl::StrCat("share plaintext: expected ",
                                                   kSharePlaintextBytes, " bytes, found ",
                                                   bytes.size()));
  }
  SharePlaintext p;
  for (int i = 0; i < 4; ++i) p.owner |= static_cast<uint32_t>(static_cast<uint8_t>(bytes[i])) << (8 * i);
  for (int i = 0; i < 4; ++i) p.holder |= static_cast<uint32_t>(static_cast<uint8_t>(bytes[4 + i])) << (8 * i);
  p.x = static_cast<uint8_t>(bytes[8]);
  p.b_share.assign(bytes.data() + 9, 32);
  p.sk_share.assign(bytes.data() + 41, 32);
  return p;
}

}  // namespace fedlora::common::secagg
