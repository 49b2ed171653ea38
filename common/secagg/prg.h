#pragma once
// Pseudorandom expansion of 32-byte seeds into uint32 mask vectors, and the
// mask arithmetic of secure aggregation.
//
// Contract:
//  * PRG(seed) is the AES-256-CTR keystream under key = seed, with a 128-bit
//    big-endian block counter starting at 0 (IV = 0^16), read as consecutive
//    little-endian uint32 words. Word i depends only on (seed, i), so any range
//    can be expanded on its own (`start_word`) and results are identical across
//    machines, thread counts and chunk sizes.
//  * Seeds must be exactly 32 bytes (InvalidArgument otherwise). A seed must
//    never be reused for two different masks.
//  * Uses OpenSSL EVP (AES-NI where the CPU has it). A MaskExpander is not
//    safe for concurrent use (one per thread); the free functions are.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace fedlora::common::secagg {

inline constexpr size_t kSeedBytes = 32;

enum class MaskSign { kAdd, kSubtract };

// One mask: out += PRG(seed) or out -= PRG(seed), modulo 2^32.
struct MaskTerm {
  std::string seed;  // 32 bytes
  MaskSign sign = MaskSign::kAdd;
};

class MaskExpander {
 public:
  MaskExpander();
  ~MaskExpander();
  MaskExpander(const MaskExpander&) = delete;
  MaskExpander& operator=(const MaskExpander&) = delete;

  // out[i] (+|-)= PRG(seed)[start_word + i] for every i, modulo 2^32.
  absl::Status Apply(std::string_view seed, uint64_t start_word, MaskSign sign,
                     absl::Span<uint32_t> out);

 private:
  struct Impl;
  Impl* impl_;
};

// PRG(seed)[0 .. n).
absl::StatusOr<std::vector<uint32_t>> PrgExpand(std::string_view seed, size_t n);

// Applies every term to `out` (out = out +/- PRG(seed_j) for all j). Works in
// cache-sized blocks and splits the vector over `threads` threads (>= 1).
// Fails (InvalidArgument) before touching `out` when a seed has the wrong size.
absl::Status ApplyMasks(const std::vector<MaskTerm>& terms, absl::Span<uint32_t> out,
                        int threads = 1);

}  // namespace fedlora::common::secagg
