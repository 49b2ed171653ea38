#pragma once
// Encryption at rest: AES-256-GCM under a 32-byte key read from a key file.
//
// Key file: 32 random bytes, either raw (exactly 32 bytes) or as 64 hex
// characters (optionally followed by one '\n'). WriteNewAtRestKeyFile writes
// the hex form with mode 0600 and refuses to overwrite an existing file.
//
// Key id: the first 8 bytes of SHA-256("fedlora at-rest key id v1" || key) as
// 16 hex characters. It names the key in records and error messages; it does
// not reveal the key.
//
// Record format (version 1), all fields concatenated:
//   "FLAR1" (5) | key id (8 raw bytes) | nonce (12, random) | ciphertext | tag (16)
// AAD = the 5-byte magic, the 8-byte key id and the caller's AAD (the store
// uses "<column family>/<record key>", so a record moved to another key fails).
// Decrypt: a record under another key id -> FailedPrecondition naming both ids;
// a modified record, wrong AAD or truncated record -> DataLoss
// ("authentication failed"). Nothing is returned on failure.
//
// AtRestCipher is immutable and safe for concurrent use.

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace fedlora::common {

inline constexpr size_t kAtRestKeyBytes = 32;
inline constexpr size_t kAtRestOverhead = 5 + 8 + 12 + 16;

class AtRestCipher {
 public:
  // `key` must be 32 bytes (InvalidArgument otherwise).
  static absl::StatusOr<AtRestCipher> FromKey(std::string_view key);
  // Reads a key file (raw or hex, see above); errors name the file.
  static absl::StatusOr<AtRestCipher> LoadFile(const std::string& path);

  const std::string& key_id() const { return key_id_; }  // 16 hex chars

  absl::StatusOr<std::string> Encrypt(std::string_view plaintext, std::string_view aad) const;
  // `where` names the record in error messages.
  absl::StatusOr<std::string> Decrypt(std::string_view record, std::string_view aad,
                                      std::string_view where) const;

  // True when `value` starts with the record magic "FLAR1".
  static bool IsEncrypted(std::string_view value);
  // The key id (16 hex) an encrypted record names; "" when it is not one.
  static std::string RecordKeyId(std::string_view value);

 private:
  AtRestCipher() = default;
  std::shared_ptr<const std::string> key_;  // 32 bytes, cleansed on release
  std::string key_id_;
  std::string key_id_raw_;
};

// Writes 32 fresh random bytes as 64 hex characters + '\n' to `path`, mode
// 0600. AlreadyExists when `path` exists.
absl::Status WriteNewAtRestKeyFile(const std::string& path);

}  // namespace fedlora::common
