#include "common/privacy/dp.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "common/crypto/crypto.h"
#include "common/secagg/prg.h"
#include "common/status/status.h"

namespace fedlora::common {
namespace {

constexpr size_t kRefillWords = 4096;

absl::Status CheckTensor(const std::string& name, const HostTensor& t) {
  if (static_cast<size_t>(t.numel()) != t.data.size()) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': shape [",
                                                   absl::StrJoin(t.shape, ","), "] needs ",
                                                   t.numel(), " values, found ", t.data.size()));
  }
  return absl::OkStatus();
}

double SumSquares(const TensorMap& update) {
  double sum = 0;
  for (const auto& [name, t] : update) {
    for (float v : t.data) sum += static_cast<double>(v) * static_cast<double>(v);
  }
  return sum;
}

void Scale(TensorMap& update, double factor) {
  for (auto& [name, t] : update) {
    for (float& v : t.data) v = static_cast<float>(static_cast<double>(v) * factor);
  }
}

}  // namespace

GaussianNoise::GaussianNoise(std::string key)
    : key_(std::move(key)), expander_(std::make_unique<secagg::MaskExpander>()) {}
GaussianNoise::GaussianNoise(GaussianNoise&&) noexcept = default;
GaussianNoise& GaussianNoise::operator=(GaussianNoise&&) noexcept = default;
GaussianNoise::~GaussianNoise() = default;

absl::StatusOr<GaussianNoise> GaussianNoise::FromCsprng() {
  return GaussianNoise(RandomBytes(secagg::kSeedBytes));
}

absl::StatusOr<GaussianNoise> GaussianNoise::FromSeed(uint64_t seed) {
  std::string material = "fedlora dp noise seed v1";
  for (int i = 0; i < 8; ++i) material.push_back(static_cast<char>(seed >> (8 * i)));
  return GaussianNoise(Sha256(material));
}

absl::Status GaussianNoise::Refill() {
  words_.assign(kRefillWords, 0);
  RETURN_IF_ERROR(
      expander_->Apply(key_, next_word_, secagg::MaskSign::kAdd, absl::MakeSpan(words_)));
  next_word_ += kRefillWords;
  pos_ = 0;
  return absl::OkStatus();
}

absl::StatusOr<double> GaussianNoise::Uniform01Open() {
  if (pos_ + 2 > words_.size()) RETURN_IF_ERROR(Refill());
  const uint64_t bits = (static_cast<uint64_t>(words_[pos_]) << 32) | words_[pos_ + 1];
  pos_ += 2;
  // 53 random bits -> (k + 1) / 2^53 in (0, 1].
  return static_cast<double>((bits >> 11) + 1) * 0x1.0p-53;
}

absl::StatusOr<double> GaussianNoise::Next() {
  if (has_spare_) {
    has_spare_ = false;
    return spare_;
  }
  ASSIGN_OR_RETURN(double u1, Uniform01Open());
  ASSIGN_OR_RETURN(double u2, Uniform01Open());
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double theta = 2.0 * M_PI * u2;
  spare_ = r * std::sin(theta);
  has_spare_ = true;
  return r * std::cos(theta);
}

absl::Status GaussianNoise::AddTo(TensorMap& tensors, double stddev) {
  if (!(stddev >= 0) || !std::isfinite(stddev)) {
    return absl::InvalidArgumentError(
        absl::StrCat("noise stddev must be finite and >= 0, found ", stddev));
  }
  for (auto& [name, t] : tensors) {
    for (float& v : t.data) {
      ASSIGN_OR_RETURN(double z, Next());
      v = static_cast<float>(static_cast<double>(v) + stddev * z);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<double> UpdateL2Norm(const TensorMap& update) {
  for (const auto& [name, t] : update) {
    RETURN_IF_ERROR(CheckTensor(name, t));
    for (size_t i = 0; i < t.data.size(); ++i) {
      if (!std::isfinite(t.data[i])) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': value [", i,
                                                       "] is ", t.data[i], ", not finite"));
      }
    }
  }
  return std::sqrt(SumSquares(update));
}

absl::StatusOr<ClipReport> ClipUpdateL2(TensorMap& update, double clip_norm) {
  if (!(clip_norm > 0) || !std::isfinite(clip_norm)) {
    return absl::InvalidArgumentError(
        absl::StrCat("clip_norm must be finite and > 0, found ", clip_norm));
  }
  ASSIGN_OR_RETURN(double norm, UpdateL2Norm(update));
  ClipReport report;
  report.pre_clip_norm = norm;
  report.post_clip_norm = norm;
  if (norm <= clip_norm) return report;
  report.clipped = true;
  Scale(update, clip_norm / norm);
  // fp32 rounding can leave the norm a few ulps above C; the sensitivity
  // bound must hold exactly, so shrink by a hair until it does.
  double now = std::sqrt(SumSquares(update));
  for (int i = 0; i < 8 && now > clip_norm; ++i) {
    Scale(update, clip_norm / now * (1.0 - 0x1.0p-22));
    now = std::sqrt(SumSquares(update));
  }
  report.post_clip_norm = now;
  return report;
}

absl::Status ValidateClientDpOptions(const ClientDpOptions& options) {
  if (!(options.clip_norm > 0) || !std::isfinite(options.clip_norm)) {
    return absl::InvalidArgumentError(
        absl::StrCat("dp clip_norm must be finite and > 0, found ", options.clip_norm));
  }
  if (!(options.noise_multiplier >= 0) || !std::isfinite(options.noise_multiplier)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dp noise_multiplier must be finite and >= 0, found ", options.noise_multiplier));
  }
  if (options.noise_shares == 0) {
    return absl::InvalidArgumentError("dp noise_shares must be >= 1, found 0");
  }
  return absl::OkStatus();
}

double NoiseShareStddev(const ClientDpOptions& options) {
  return options.noise_multiplier * options.clip_norm /
         std::sqrt(static_cast<double>(options.noise_shares));
}

absl::StatusOr<ClipReport> PrivatizeUpdate(TensorMap& update, const ClientDpOptions& options,
                                           GaussianNoise& noise) {
  RETURN_IF_ERROR(ValidateClientDpOptions(options));
  ASSIGN_OR_RETURN(ClipReport report, ClipUpdateL2(update, options.clip_norm));
  const double stddev = NoiseShareStddev(options);
  if (stddev > 0) RETURN_IF_ERROR(noise.AddTo(update, stddev));
  return report;
}

}  // namespace fedlora::common
