#include "common/crypto/at_rest.h"

#include <openssl/crypto.h>
#include <sys/stat.h>

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"
#include "common/crypto/openssl_util.h"
#include "common/status/status.h"

namespace fedlora::common {
namespace {

constexpr char kMagic[] = "FLAR1";
constexpr size_t kMagicLen = 5;
constexpr size_t kKeyIdLen = 8;
constexpr size_t kNonceLen = 12;
constexpr size_t kTagLen = 16;
constexpr char kKeyIdDomain[] = "fedlora at-rest key id v1";

// absl::string_view is not std::string_view in this abseil build.
inline absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

const unsigned char* U8(std::string_view s) {
  return reinterpret_cast<const unsigned char*>(s.data());
}
unsigned char* U8(std::string& s) { return reinterpret_cast<unsigned char*>(s.data()); }

void CleanseAndDelete(const std::string* s) {
  std::string* m = const_cast<std::string*>(s);
  OPENSSL_cleanse(m->data(), m->size());
  delete m;
}

absl::Status AuthFailed(std::string_view where) {
  return absl::DataLossError(
      absl::StrCat(Sv(where), ": encrypted record authentication failed (modified, truncated or "
                              "moved to another key)"));
}

}  // namespace

absl::StatusOr<AtRestCipher> AtRestCipher::FromKey(std::string_view key) {
  if (key.size() != kAtRestKeyBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("at-rest key: expected 32 bytes, found ", key.size()));
  }
  AtRestCipher c;
  c.key_ = std::shared_ptr<const std::string>(new std::string(key), CleanseAndDelete);
  c.key_id_raw_ = Sha256(absl::StrCat(kKeyIdDomain, Sv(key))).substr(0, kKeyIdLen);
  c.key_id_ = HexEncode(c.key_id_raw_);
  return c;
}

absl::StatusOr<AtRestCipher> AtRestCipher::LoadFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  std::string key;
  if (text.size() == kAtRestKeyBytes) {
    key = text;
  } else {
    std::string_view hex(text);
    if (!hex.empty() && hex.back() == '\n') hex.remove_suffix(1);
    if (hex.size() != 2 * kAtRestKeyBytes) {
      OPENSSL_cleanse(text.data(), text.size());
      return absl::InvalidArgumentError(absl::StrCat(
          "at-rest key file ", path,
          ": expected 32 raw bytes or 64 hex characters, found ", text.size(), " bytes"));
    }
    auto decoded = HexDecode(hex);
    if (!decoded.ok()) {
      OPENSSL_cleanse(text.data(), text.size());
      return absl::InvalidArgumentError(absl::StrCat("at-rest key file ", path, ": ",
                                                     decoded.status().message()));
    }
    key = std::move(*decoded);
  }
  OPENSSL_cleanse(text.data(), text.size());
  auto cipher = FromKey(key);
  OPENSSL_cleanse(key.data(), key.size());
  return cipher;
}

absl::StatusOr<std::string> AtRestCipher::Encrypt(std::string_view plaintext,
                                                  std::string_view aad) const {
  if (plaintext.size() > static_cast<size_t>(INT32_MAX) ||
      aad.size() > static_cast<size_t>(INT32_MAX)) {
    return absl::InvalidArgumentError("at-rest encrypt: plaintext or AAD larger than 2 GiB");
  }
  std::string nonce = RandomBytes(kNonceLen);
  std::string out;
  out.reserve(kAtRestOverhead + plaintext.size());
  out.append(kMagic, kMagicLen);
  out.append(key_id_raw_);
  out.append(nonce);
  const std::string header = out.substr(0, kMagicLen + kKeyIdLen);
  const size_t ct_offset = out.size();
  out.resize(ct_offset + plaintext.size() + kTagLen);

  EvpCipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  if (!ctx ||
      EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, U8(*key_), U8(nonce)) != 1) {
    return OpenSslError("at-rest encrypt: AES-256-GCM init");
  }
  int len = 0;
  if (EVP_EncryptUpdate(ctx.get(), nullptr, &len, U8(header), static_cast<int>(header.size())) !=
          1 ||
      (!aad.empty() &&
       EVP_EncryptUpdate(ctx.get(), nullptr, &len, U8(aad), static_cast<int>(aad.size())) != 1)) {
    return OpenSslError("at-rest encrypt: AAD");
  }
  unsigned char* ct = U8(out) + ct_offset;
  int written = 0;
  if (!plaintext.empty()) {
    if (EVP_EncryptUpdate(ctx.get(), ct, &len, U8(plaintext), static_cast<int>(plaintext.size())) !=
        1) {
      return OpenSslError("at-rest encrypt");
    }
    written = len;
  }
  if (EVP_EncryptFinal_ex(ctx.get(), ct + written, &len) != 1) {
    return OpenSslError("at-rest encrypt final");
  }
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, kTagLen, ct + plaintext.size()) != 1) {
    return OpenSslError("at-rest encrypt: GCM tag");
  }
  return out;
}

absl::StatusOr<std::string> AtRestCipher::Decrypt(std::string_view record, std::string_view aad,
                                                  std::string_view where) const {
  if (!IsEncrypted(record)) {
    return absl::DataLossError(absl::StrCat(
        Sv(where), ": expected a record encrypted at rest (magic FLAR1), found plaintext or "
                   "another format"));
  }
  if (record.size() < kAtRestOverhead) return AuthFailed(where);
  if (record.size() - kAtRestOverhead > static_cast<size_t>(INT32_MAX) ||
      aad.size() > static_cast<size_t>(INT32_MAX)) {
    return absl::InvalidArgumentError("at-rest decrypt: record or AAD larger than 2 GiB");
  }
  std::string_view key_id = record.substr(kMagicLen, kKeyIdLen);
  if (key_id != key_id_raw_) {
    return absl::FailedPreconditionError(
        absl::StrCat(Sv(where), ": encrypted with at-rest key id ", HexEncode(key_id),
                     ", but the key given has id ", key_id_));
  }
  std::string_view header = record.substr(0, kMagicLen + kKeyIdLen);
  std::string_view nonce = record.substr(kMagicLen + kKeyIdLen, kNonceLen);
  std::string_view ct = record.substr(kMagicLen + kKeyIdLen + kNonceLen,
                                      record.size() - kAtRestOverhead);
  std::string tag(record.substr(record.size() - kTagLen));

  EvpCipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  if (!ctx ||
      EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, U8(*key_), U8(nonce)) != 1) {
    return OpenSslError("at-rest decrypt: AES-256-GCM init");
  }
  int len = 0;
  if (EVP_DecryptUpdate(ctx.get(), nullptr, &len, U8(header), static_cast<int>(header.size())) !=
          1 ||
      (!aad.empty() &&
       EVP_DecryptUpdate(ctx.get(), nullptr, &len, U8(aad), static_cast<int>(aad.size())) != 1)) {
    return OpenSslError("at-rest decrypt: AAD");
  }
  std::string plain(ct.size(), '\0');
  int written = 0;
  if (!ct.empty()) {
    if (EVP_DecryptUpdate(ctx.get(), U8(plain), &len, U8(ct), static_cast<int>(ct.size())) != 1) {
      return OpenSslError("at-rest decrypt");
    }
    written = len;
  }
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, kTagLen, tag.data()) != 1) {
    return OpenSslError("at-rest decrypt: GCM tag");
  }
  if (EVP_DecryptFinal_ex(ctx.get(), U8(plain) + written, &len) != 1) {
    ClearOpenSslErrors();
    OPENSSL_cleanse(plain.data(), plain.size());
    return AuthFailed(where);
  }
  return plain;
}

bool AtRestCipher::IsEncrypted(std::string_view value) {
  return value.size() >= kMagicLen && value.substr(0, kMagicLen) == kMagic;
}

std::string AtRestCipher::RecordKeyId(std::string_view value) {
  if (!IsEncrypted(value) || value.size() < kMagicLen + kKeyIdLen) return "";
  return HexEncode(value.substr(kMagicLen, kKeyIdLen));
}

absl::Status WriteNewAtRestKeyFile(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) {
    return absl::AlreadyExistsError(path +
                                    " already exists; refusing to overwrite an at-rest key");
  }
  std::string key = RandomBytes(kAtRestKeyBytes);
  std::string hex = HexEncode(key) + "\n";
  OPENSSL_cleanse(key.data(), key.size());
  absl::Status s = WriteFileAtomic(path, hex, 0600);
  OPENSSL_cleanse(hex.data(), hex.size());
  return s;
}

}  // namespace fedlora::common
