#pragma once
// Client-level differential privacy on an adapter update (a TensorMap of fp32).
//
// The Gaussian mechanism on the SUM of updates: each agent clips its whole
// update (all tensors together, as one vector) to L2 norm C, so one agent
// changes the sum by at most C, and the sum must carry N(0, (sigma*C)^2) noise
// per coordinate. With secure aggregation nobody may add that noise centrally,
// so each agent adds a share N(0, (sigma*C)^2 / m): m shares sum to the full
// noise. Choose m = the smallest number of survivors for which the round
// still releases an aggregate (the round's survivor threshold: at least
// min_participants and the secure-aggregation threshold t; fewer must abort
// the round): any n >= m survivors then carry variance
// n/m * (sigma*C)^2 >= (sigma*C)^2, so dropouts never weaken the guarantee
// (they only add noise). Agents that collude with the server know their own
// shares and can subtract them; to tolerate k such agents use m - k. The accountant (rdp_accountant.h) then charges
// one round with q = expected sampled agents / population and this sigma.
//
// Noise comes from a cryptographic source: an AES-256-CTR keystream
// (common/secagg/prg.h) keyed from RAND_bytes; a seeded, deterministic
// stream exists for tests and simulations only (never for real agents).
// Normals are drawn with the Box-Muller transform from 53-bit uniforms. Like
// every floating-point Gaussian sampler this is not bit-exact DP (Mironov
// 2012 on floating-point attacks); the noise is added in double and rounded
// to fp32 once.
//
// Bad input (NaN/Inf values, shape/size mismatch inside a tensor, C <= 0,
// sigma < 0, m == 0) is InvalidArgument naming the tensor or field, and
// leaves the update unchanged (an Internal error from OpenSSL while adding
// noise may leave it partly noised: discard it). GaussianNoise is not thread-safe (one per
// thread); the free functions are.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/tensor/tensor.h"

namespace fedlora::common {

namespace secagg {
class MaskExpander;
}

// Standard normal samples from an AES-256-CTR keystream.
class GaussianNoise {
 public:
  // Keyed with 32 bytes from RAND_bytes: unpredictable, for real use.
  static absl::StatusOr<GaussianNoise> FromCsprng();
  // Keyed with SHA-256 of a label and `seed`: the same seed gives the same
  // sequence on every machine. Tests and simulations only.
  static absl::StatusOr<GaussianNoise> FromSeed(uint64_t seed);

  GaussianNoise(GaussianNoise&&) noexcept;
  GaussianNoise& operator=(GaussianNoise&&) noexcept;
  ~GaussianNoise();

  // One N(0, 1) sample.
  absl::StatusOr<double> Next();
  // Adds N(0, stddev^2) to every value of every tensor (stddev >= 0, finite).
  absl::Status AddTo(TensorMap& tensors, double stddev);

 private:
  explicit GaussianNoise(std::string key);
  absl::Status Refill();
  absl::StatusOr<double> Uniform01Open();  // in (0, 1]

  std::string key_;  // 32 bytes
  std::unique_ptr<secagg::MaskExpander> expander_;
  std::vector<uint32_t> words_;
  size_t pos_ = 0;
  uint64_t next_word_ = 0;  // keystream position of words_[words_.size()] at refill
  bool has_spare_ = false;
  double spare_ = 0;
};

// L2 norm of all values of all tensors together, in double. InvalidArgument
// naming the tensor for a NaN/Inf value or a data size that disagrees with
// the shape.
absl::StatusOr<double> UpdateL2Norm(const TensorMap& update);

struct ClipReport {
  double pre_clip_norm = 0;   // norm before clipping
  double post_clip_norm = 0;  // norm after (<= clip_norm)
  bool clipped = false;       // false: the update was already within C, untouched
};

// Scales `update` by min(1, C / norm) so that its norm is at most C (exactly:
// the fp32 result is re-checked and nudged down if rounding overshoots).
absl::StatusOr<ClipReport> ClipUpdateL2(TensorMap& update, double clip_norm);

struct ClientDpOptions {
  double clip_norm = 1.0;         // C > 0
  double noise_multiplier = 1.0;  // sigma >= 0 (0: clipping only, no privacy)
  uint32_t noise_shares = 1;      // m >= 1: agents whose noise shares sum (see above)
};

absl::Status ValidateClientDpOptions(const ClientDpOptions& options);

// Per-coordinate standard deviation of one agent's share: sigma * C / sqrt(m).
double NoiseShareStddev(const ClientDpOptions& options);

// Clips `update` to options.clip_norm, then adds this agent's noise share.
// Reports the pre-clip norm (for metrics; never sent in the clear when it
// could identify the agent's data).
absl::StatusOr<ClipReport> PrivatizeUpdate(TensorMap& update, const ClientDpOptions& options,
                                           GaussianNoise& noise);

}  // namespace fedlora::common
