#pragma once
// Shamir secret sharing of byte strings over GF(2^8), byte by byte.
//
// Contract:
//  * ShamirSplit(secret, t, xs) draws, for every byte position independently,
//    a random polynomial of degree t-1 over GF(2^8) (AES field, x^8+x^4+x^3+x+1)
//    whose constant term is that secret byte, and returns one share per x in
//    `xs`: share.y[j] = poly_j(x). Coefficients come from RAND_bytes.
//  * Any t shares with distinct x reconstruct the secret exactly; t-1 or fewer
//    shares are statistically independent of it (information-theoretic).
//  * x values are 1..255 (x = 0 would be the secret itself), distinct; at most
//    255 shares. 1 <= t <= xs.size(). Violations are InvalidArgument.
//  * ShamirReconstruct rejects fewer than t shares, duplicate x, x = 0 and
//    shares of different lengths (InvalidArgument naming the share index); it
//    interpolates at 0 from the first t shares.
// Pure functions; safe for concurrent use.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::common::secagg {

struct ShamirShare {
  uint8_t x = 0;
  std::string y;  // same length as the secret
};

absl::StatusOr<std::vector<ShamirShare>> ShamirSplit(std::string_view secret, int threshold,
                                                     const std::vector<uint8_t>& xs);

absl::StatusOr<std::string> ShamirReconstruct(const std::vector<ShamirShare>& shares,
                                              int threshold);

}  // namespace fedlora::common::secagg
