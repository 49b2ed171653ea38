#pragma once
// Cryptographic primitives on OpenSSL 3: hashing, randomness, and sealing an
// update to a recipient's X25519 public key.
//
// Seal format (version 1), all fields concatenated:
//   "FLS1" (4) | ephemeral X25519 public key (32) | nonce (12) | ciphertext | tag (16)
// key = HKDF-SHA256(ikm = X25519(eph, recipient), salt = eph_pub || recipient_pub,
//                   info = "fedlora seal v1"), cipher AES-256-GCM, AAD = caller's.
// Opening with the wrong key, wrong AAD or any modified byte fails with
// InvalidArgument ("authentication failed") and reveals nothing.
// All functions are safe for concurrent use.

#include <cstddef>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace fedlora::common {

std::string Sha256(std::string_view data);     // 32 raw bytes
std::string Sha256Hex(std::string_view data);  // 64 lowercase hex chars
std::string HexEncode(std::string_view bytes);
absl::StatusOr<std::string> HexDecode(std::string_view hex);

// Cryptographically secure random bytes (RAND_bytes).
std::string RandomBytes(size_t n);

struct X25519KeyPair {
  std::string private_key;  // 32 bytes
  std::string public_key;   // 32 bytes
};
absl::StatusOr<X25519KeyPair> GenerateX25519KeyPair();
// Recomputes the public key of a 32-byte private key.
absl::StatusOr<X25519KeyPair> X25519FromPrivate(std::string_view private_key);
// Raw 32-byte X25519(private_key, peer_public_key) (RFC 7748). InvalidArgument
// on wrong sizes or when the result is all zero (low-order peer point). Use it
// only through a KDF (HKDF-SHA256), never directly as a key.
absl::StatusOr<std::string> X25519SharedSecret(std::string_view private_key,
                                               std::string_view peer_public_key);

absl::StatusOr<std::string> SealToPublicKey(std::string_view recipient_public_key,
                                            std::string_view plaintext, std::string_view aad);
absl::StatusOr<std::string> OpenSealed(const X25519KeyPair& recipient, std::string_view sealed,
                                       std::string_view aad);

// Hex SHA-256 identifying a base model directory: SHA-256 over
// "config.json" bytes followed by every *.safetensors file's bytes in
// lexicographic name order (each prefixed with its name and size). Agents and
// the coordinator compute it the same way (docs/formats.md). Exact framing, per
// file: name bytes | 0x00 | size as 8-byte little-endian | file bytes. Only
// regular files (or symlinks to them) directly in `dir` count. NotFound when
// config.json is missing; InvalidArgument when there is no *.safetensors file.
absl::StatusOr<std::string> HashModelDirectory(const std::string& dir);

// Reads a whole file; NotFound / PermissionDenied with the path on failure.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);
// Writes atomically (temp file + fsync + rename). `mode` applies to the new file.
absl::Status WriteFileAtomic(const std::string& path, std::string_view data, int mode = 0644);

}  // namespace fedlora::common
