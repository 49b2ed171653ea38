#pragma once
// Symmetric building blocks of the secure-aggregation protocol (internal to
// common/secagg): HKDF-SHA256 and AES-256-GCM with a caller-supplied key.
//
// Sealed format: nonce (12, random) | ciphertext | tag (16).
// AesGcmOpen fails with InvalidArgument ("authentication failed") on a wrong
// key, wrong AAD, wrong length or any modified byte, and reveals nothing.
// All functions are safe for concurrent use.

#include <cstddef>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace fedlora::common::secagg {

inline constexpr size_t kGcmNonceBytes = 12;
inline constexpr size_t kGcmTagBytes = 16;
inline constexpr size_t kGcmOverhead = kGcmNonceBytes + kGcmTagBytes;

absl::StatusOr<std::string> HkdfSha256(std::string_view ikm, std::string_view salt,
                                       std::string_view info, size_t length);

absl::StatusOr<std::string> AesGcmSeal(std::string_view key, std::string_view plaintext,
                                       std::string_view aad);
absl::StatusOr<std::string> AesGcmOpen(std::string_view key, std::string_view sealed,
                                       std::string_view aad);

}  // namespace fedlora::common::secagg
