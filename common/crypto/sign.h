#pragma once
// Ed25519 signatures (OpenSSL 3 EVP) and the signed statement that binds a
// published adapter version.
//
// Keys live in PEM files: the private key as unencrypted PKCS#8 ("BEGIN
// PRIVATE KEY", mode 0600), the public key as SubjectPublicKeyInfo ("BEGIN
// PUBLIC KEY", mode 0644). A key's id is the first 8 bytes of SHA-256 of its
// raw 32-byte public key, as 16 hex characters; it names the key in messages
// and in statements, it is not a secret.
//
// Adapter statement (version 1): the canonical message is exactly these lines,
// each ending in '\n', in this order, with no other whitespace:
//   fedlora-adapter-statement-v1
//   version_id=<id>
//   round_id=<decimal>
//   parent_version=<id or empty>
//   blob_sha256=<64 lowercase hex>
//   base_model_hash=<64 lowercase hex>
//   quant=<name>
//   key_id=<16 lowercase hex>
// The encoded statement (what is stored and sent as `signature`) is the
// canonical message followed by "signature=<128 lowercase hex>\n" (the Ed25519
// signature of the canonical message). Values may not contain '\n'; version ids
// and quant names are [A-Za-z0-9._-]. ParseAndVerify rejects anything that does
// not re-encode byte for byte, so one statement has exactly one encoding.
//
// All functions are safe for concurrent use; SigningKey and VerifyKey are
// immutable after construction.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

typedef struct evp_pkey_st EVP_PKEY;

namespace fedlora::common {

// Key id of a raw 32-byte Ed25519 public key (16 hex chars).
std::string Ed25519KeyId(std::string_view raw_public_key);

class SigningKey {
 public:
  // Parses a PEM Ed25519 private key; InvalidArgument naming `source` otherwise.
  static absl::StatusOr<SigningKey> FromPem(std::string_view pem, std::string_view source);
  static absl::StatusOr<SigningKey> LoadFile(const std::string& path);
  static absl::StatusOr<SigningKey> Generate();

  // 64-byte Ed25519 signature of `message`.
  absl::StatusOr<std::string> Sign(std::string_view message) const;
  const std::string& raw_public_key() const { return public_key_; }  // 32 bytes
  const std::string& key_id() const { return key_id_; }
  absl::StatusOr<std::string> PrivatePem() const;
  absl::StatusOr<std::string> PublicPem() const;

 private:
  SigningKey() = default;
  std::shared_ptr<EVP_PKEY> key_;
  std::string public_key_;
  std::string key_id_;
};

class VerifyKey {
 public:
  // Parses a PEM Ed25519 public key; InvalidArgument naming `source` otherwise.
  static absl::StatusOr<VerifyKey> FromPem(std::string_view pem, std::string_view source);
  static absl::StatusOr<VerifyKey> LoadFile(const std::string& path);
  static absl::StatusOr<VerifyKey> FromRaw(std::string_view raw_public_key);

  // OK when `signature` is a valid Ed25519 signature of `message` under this
  // key; otherwise InvalidArgument ("signature verification failed").
  absl::Status Verify(std::string_view message, std::string_view signature) const;
  const std::string& raw_public_key() const { return public_key_; }
  const std::string& key_id() const { return key_id_; }

 private:
  VerifyKey() = default;
  std::shared_ptr<EVP_PKEY> key_;
  std::string public_key_;
  std::string key_id_;
};

// Generates a key pair and writes `private_path` (0600) and `public_path`
// (0644). Refuses (AlreadyExists) when either file exists.
absl::Status WriteNewSigningKeyPair(const std::string& private_path,
                                    const std::string& public_path);

struct AdapterStatement {
  std::string version_id;
  uint64_t round_id = 0;
  std::string parent_version;
  std::string blob_sha256;
  std::string base_model_hash;
  std::string quant;
  std::string key_id;  // filled in by SignAdapterStatement / ParseAndVerify
};

// The canonical message (see above). InvalidArgument naming the field when a
// value is malformed.
absl::StatusOr<std::string> CanonicalAdapterMessage(const AdapterStatement& statement);

// Signs `statement` (key_id set from `key`) and returns the encoded statement.
absl::StatusOr<std::string> SignAdapterStatement(const SigningKey& key,
                                                 AdapterStatement statement);

// Parses an encoded statement and verifies its signature under `key`.
// InvalidArgument when malformed, FailedPrecondition when it names another
// key id ("signed by key X, expected Y"), InvalidArgument ("signature
// verification failed") on a bad signature.
absl::StatusOr<AdapterStatement> ParseAndVerifyAdapterStatement(const VerifyKey& key,
                                                                std::string_view encoded);

}  // namespace fedlora::common
