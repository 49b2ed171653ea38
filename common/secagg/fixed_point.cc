#include "common/secagg/fixed_point.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/status/status.h"

namespace fedlora::common::secagg {
namespace {
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
}  // namespace

absl::StatusOr<FixedPointCodec> FixedPointCodec::Create(const FixedPointConfig& config) {
  if (!std::isfinite(config.clip) || config.clip <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("fixed point: clip must be a finite number > 0, found ", config.clip));
  }
  if (config.max_agents < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("fixed point: max_agents must be >= 1, found ", config.max_agents));
  }
  double scale = config.scale;
  if (scale == 0) {
    scale = std::floor(static_cast<double>(kInt32Max) / config.max_agents) / config.clip;
  }
  if (!std::isfinite(scale) || scale <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("fixed point: scale must be a finite number > 0, found ", config.scale));
  }
  double m = std::round(config.clip * scale);
  if (m < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("fixed point: clip * scale = ", config.clip * scale,
                     " rounds to 0; every input would encode to 0"));
  }
  // n * M must stay below 2^31 so a sum of n values in [-M, M] never wraps.
  if (m * config.max_agents > static_cast<double>(kInt32Max)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "fixed point: max_agents * round(clip * scale) = ", config.max_agents, " * ",
        static_cast<int64_t>(m), " exceeds 2^31 - 1; a sum could overflow. Lower scale to <= ",
        std::floor(static_cast<double>(kInt32Max) / config.max_agents) / config.clip,
        " or clip or max_agents"));
  }
  return FixedPointCodec(config.clip, scale, config.max_agents, static_cast<int64_t>(m));
}

absl::Status FixedPointCodec::EncodeInto(absl::Span<const float> values,
                                         absl::Span<uint32_t> out) const {
  if (out.size() != values.size()) {
    return absl::InvalidArgumentError(absl::StrCat("fixed point: output holds ", out.size(),
                                                   " words, input has ", values.size()));
  }
  for (size_t i = 0; i < values.size(); ++i) {
    float v = values[i];
    if (!std::isfinite(v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("fixed point: input[", i, "] is ", std::isnan(v) ? "NaN" : "infinite"));
    }
    double c = std::clamp(static_cast<double>(v), -clip_, clip_);
    int64_t q = std::llround(c * scale_);
    q = std::clamp(q, -max_encoded_, max_encoded_);
    out[i] = static_cast<uint32_t>(static_cast<int32_t>(q));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint32_t>> FixedPointCodec::Encode(
    absl::Span<const float> values) const {
  std::vector<uint32_t> out(values.size());
  RETURN_IF_ERROR(EncodeInto(values, absl::MakeSpan(out)));
  return out;
}

absl::StatusOr<std::vector<float>> FixedPointCodec::DecodeSum(absl::Span<const uint32_t> sum,
                                                              int num_summed) const {
  if (num_summed < 1 || num_summed > max_agents_) {
    return absl::InvalidArgumentError(absl::StrCat("fixed point: num_summed must be in [1, ",
                                                   max_agents_, "], found ", num_summed));
  }
  const int64_t bound = max_encoded_ * num_summed;
  std::vector<float> out(sum.size());
  for (size_t i = 0; i < sum.size(); ++i) {
    int64_t s = static_cast<int32_t>(sum[i]);
    if (s > bound || s < -bound) {
      return absl::DataLossError(absl::StrCat(
          "fixed point: sum[", i, "] = ", s, " is outside [-", bound, ", ", bound,
          "]; it is not a sum of ", num_summed, " encodings (masks not removed?)"));
    }
    out[i] = static_cast<float>(static_cast<double>(s) / scale_);
  }
  return out;
}

}  // namespace fedlora::common::secagg
