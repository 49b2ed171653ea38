#pragma once
// Fixed-point encoding of float update vectors for secure aggregation.
//
// Contract:
//  * Encode clips every element to [-clip, clip], multiplies by `scale`, rounds
//    to the nearest integer q (|q| <= M = llround(clip * scale)) and stores q
//    as a uint32 modulo 2^32 (two's complement). NaN or +/-Inf anywhere is
//    InvalidArgument naming the first bad index; nothing is returned then.
//  * Sums of encodings are taken modulo 2^32 (that is what masking preserves).
//    DecodeSum(sum, n) reads each word as a signed int32 and divides by scale.
//    It is exact (up to float rounding of the result) for the sum of any n
//    encodings with 1 <= n <= max_agents, because Create() refuses every
//    config where max_agents * M > 2^31 - 1, so no sum can wrap.
//  * DecodeSum rejects a word whose magnitude exceeds n * M (DataLoss: the
//    input is not a sum of n encodings, e.g. a mask was not removed).
//  * scale = 0 in the config picks the largest scale that is still safe:
//    floor((2^31 - 1) / max_agents) / clip.
// The codec is immutable after Create and safe for concurrent use.

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace fedlora::common::secagg {

struct FixedPointConfig {
  double clip = 1.0;    // R: inputs are clipped to [-R, R]
  double scale = 0.0;   // integer units per 1.0; 0 = largest safe scale
  int max_agents = 0;   // most encodings that will ever be summed (> 0)
};

class FixedPointCodec {
 public:
  // InvalidArgument naming the field when clip/scale are not finite positive
  // numbers, max_agents < 1, clip * scale rounds to 0 (no resolution), or
  // max_agents * llround(clip * scale) > 2^31 - 1 (the sum could overflow).
  static absl::StatusOr<FixedPointCodec> Create(const FixedPointConfig& config);

  absl::StatusOr<std::vector<uint32_t>> Encode(absl::Span<const float> values) const;
  // Encodes into `out` (out.size() must equal values.size()); on error `out`
  // may be partly written.
  absl::Status EncodeInto(absl::Span<const float> values, absl::Span<uint32_t> out) const;

  // `sum` is the mod-2^32 sum of `num_summed` encodings.
  absl::StatusOr<std::vector<float>> DecodeSum(absl::Span<const uint32_t> sum,
                                               int num_summed) const;

  double clip() const { return clip_; }
  double scale() const { return scale_; }
  int max_agents() const { return max_agents_; }
  // M: the largest |q| a single encoding may hold.
  int64_t max_encoded() const { return max_encoded_; }

 private:
  FixedPointCodec(double clip, double scale, int max_agents, int64_t max_encoded)
      : clip_(clip), scale_(scale), max_agents_(max_agents), max_encoded_(max_encoded) {}
  double clip_;
  double scale_;
  int max_agents_;
  int64_t max_encoded_;
};

}  // namespace fedlora::common::secagg
