#pragma once
// Thin RAII owners for OpenSSL 3 handles and the one place where OpenSSL's
// error queue is turned into an absl::Status.
//
//   EvpPkeyPtr key(EVP_PKEY_new_raw_private_key(...));
//   if (!key) return OpenSslError("loading X25519 private key");
//
// Each owner is a std::unique_ptr with a deleter calling the matching *_free.
// Internal to common/ (crypto and PKI); not a stable API for other areas.

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include <memory>
#include <string_view>

#include "absl/status/status.h"

namespace fedlora::common {

namespace openssl_internal {
template <typename T, void (*Free)(T*)>
struct Deleter {
  void operator()(T* p) const {
    if (p != nullptr) Free(p);
  }
};
// OPENSSL_free is a macro; wrap it so it can be a template argument.
inline void FreeOpensslString(char* p) { OPENSSL_free(p); }
}  // namespace openssl_internal

template <typename T, void (*Free)(T*)>
using OpenSslPtr = std::unique_ptr<T, openssl_internal::Deleter<T, Free>>;

using EvpPkeyPtr = OpenSslPtr<EVP_PKEY, EVP_PKEY_free>;
using EvpPkeyCtxPtr = OpenSslPtr<EVP_PKEY_CTX, EVP_PKEY_CTX_free>;
using EvpCipherCtxPtr = OpenSslPtr<EVP_CIPHER_CTX, EVP_CIPHER_CTX_free>;
using EvpMdCtxPtr = OpenSslPtr<EVP_MD_CTX, EVP_MD_CTX_free>;
using EvpKdfPtr = OpenSslPtr<EVP_KDF, EVP_KDF_free>;
using EvpKdfCtxPtr = OpenSslPtr<EVP_KDF_CTX, EVP_KDF_CTX_free>;
using BioPtr = OpenSslPtr<BIO, BIO_free_all>;
using BignumPtr = OpenSslPtr<BIGNUM, BN_free>;
using X509Ptr = OpenSslPtr<X509, X509_free>;
using X509NamePtr = OpenSslPtr<X509_NAME, X509_NAME_free>;
using X509ExtensionPtr = OpenSslPtr<X509_EXTENSION, X509_EXTENSION_free>;
using X509StorePtr = OpenSslPtr<X509_STORE, X509_STORE_free>;
using X509StoreCtxPtr = OpenSslPtr<X509_STORE_CTX, X509_STORE_CTX_free>;
using Asn1IntegerPtr = OpenSslPtr<ASN1_INTEGER, ASN1_INTEGER_free>;
using OpenSslStringPtr = OpenSslPtr<char, openssl_internal::FreeOpensslString>;

// Drains OpenSSL's thread-local error queue and returns
// Internal("<context>: <reason text of each queued error>"), or
// Internal("<context>: unknown OpenSSL error") when the queue is empty.
// Call it right after the failing OpenSSL call.
absl::Status OpenSslError(std::string_view context);

// Empties the thread's OpenSSL error queue (after an expected failure, such
// as a GCM tag mismatch, so stale entries do not leak into later messages).
void ClearOpenSslErrors();

}  // namespace fedlora::common
