#include "common/secagg/channel_crypto.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"
#include "common/crypto/openssl_util.h"

namespace fedlora::common::secagg {
namespace {

unsigned char* U8(std::string& s) { return reinterpret_cast<unsigned char*>(s.data()); }
const unsigned char* U8(std::string_view s) {
  return reinterpret_cast<const unsigned char*>(s.data());
}

absl::Status CheckKey(std::string_view key) {
  if (key.size() != 32) {
    return absl::InvalidArgumentError(
        absl::StrCat("AES-256-GCM key: expected 32 bytes, found ", key.size()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> HkdfSha256(std::string_view ikm, std::string_view salt,
                                       std::string_view info, size_t length) {
  EvpKdfPtr kdf(EVP_KDF_fetch(nullptr, OSSL_KDF_NAME_HKDF, nullptr));
  if (!kdf) return OpenSslError("fetching HKDF");
  EvpKdfCtxPtr ctx(EVP_KDF_CTX_new(kdf.get()));
  if (!ctx) return OpenSslError("HKDF context");
  std::string ikm_copy(ikm), salt_copy(salt), info_copy(info);
  char digest[] = "SHA256";
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, ikm_copy.data(), ikm_copy.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, salt_copy.data(), salt_copy.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, info_copy.data(), info_copy.size()),
      OSSL_PARAM_construct_end(),
  };
  std::string out(length, '\0');
  int ok = EVP_KDF_derive(ctx.get(), U8(out), out.size(), params);
  OPENSSL_cleanse(ikm_copy.data(), ikm_copy.size());
  if (ok != 1) return OpenSslError("HKDF-SHA256 derive");
  return out;
}

absl::StatusOr<std::string> AesGcmSeal(std::string_view key, std::string_view plaintext,
                                       std::string_view aad) {
  if (absl::Status s = CheckKey(key); !s.ok()) return s;
  std::string out(kGcmNonceBytes + plaintext.size() + kGcmTagBytes, '\0');
  std::string nonce = RandomBytes(kGcmNonceBytes);
  std::copy(nonce.begin(), nonce.end(), out.begin());
  EvpCipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  int len = 0;
  if (!ctx || EVP_EncryptInit_ex2(ctx.get(), EVP_aes_256_gcm(), U8(key), U8(nonce), nullptr) != 1 ||
      EVP_EncryptUpdate(ctx.get(), nullptr, &len, U8(aad), static_cast<int>(aad.size())) != 1 ||
      EVP_EncryptUpdate(ctx.get(), U8(out) + kGcmNonceBytes, &len, U8(plaintext),
                        static_cast<int>(plaintext.size())) != 1 ||
      EVP_EncryptFinal_ex(ctx.get(), U8(out) + kGcmNonceBytes + len, &len) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, kGcmTagBytes,
                          U8(out) + kGcmNonceBytes + plaintext.size()) != 1) {
    return OpenSslError("AES-256-GCM seal");
  }
  return out;
}

absl::StatusOr<std::string> AesGcmOpen(std::string_view key, std::string_view sealed,
                                       std::string_view aad) {
  if (absl::Status s = CheckKey(key); !s.ok()) return s;
  auto failed = [] { return absl::InvalidArgumentError("AES-256-GCM: authentication failed"); };
  if (sealed.size() < kGcmOverhead) return failed();
  const size_t n = sealed.size() - kGcmOverhead;
  std::string plain(n, '\0');
  std::string tag(sealed.substr(kGcmNonceBytes + n));
  EvpCipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  int len = 0;
  if (!ctx ||
      EVP_DecryptInit_ex2(ctx.get(), EVP_aes_256_gcm(), U8(key), U8(sealed), nullptr) != 1 ||
      EVP_DecryptUpdate(ctx.get(), nullptr, &len, U8(aad), static_cast<int>(aad.size())) != 1 ||
      EVP_DecryptUpdate(ctx.get(), U8(plain), &len, U8(sealed) + kGcmNonceBytes,
                        static_cast<int>(n)) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, kGcmTagBytes, tag.data()) != 1) {
    return OpenSslError("AES-256-GCM open");
  }
  if (EVP_DecryptFinal_ex(ctx.get(), U8(plain) + len, &len) != 1) {
    ClearOpenSslErrors();
    OPENSSL_cleanse(plain.data(), plain.size());
    return failed();
  }
  return plain;
}

}  // namespace fedlora::common::secagg
