#include "common/secagg/shamir.h"

#include <array>

#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"

namespace fedlora::common::secagg {
namespace {

// log/exp tables of GF(2^8) with generator 3 and the AES polynomial 0x11b.
struct GfTables {
  std::array<uint8_t, 512> exp{};
  std::array<int, 256> log{};
  GfTables() {
    unsigned x = 1;
    for (int i = 0; i < 255; ++i) {
      exp[i] = static_cast<uint8_t>(x);
      log[x] = i;
      // x *= 3  (x*2 ^ x), reduced by 0x11b.
      unsigned x2 = x << 1;
      if (x2 & 0x100) x2 ^= 0x11b;
      x = x2 ^ x;
    }
    for (int i = 255; i < 512; ++i) exp[i] = exp[i - 255];
    log[0] = 0;  // never used: callers test for zero
  }
};

const GfTables& Gf() {
  static const GfTables tables;
  return tables;
}

inline uint8_t GfMul(uint8_t a, uint8_t b) {
  if (a == 0 || b == 0) return 0;
  const GfTables& g = Gf();
  return g.exp[g.log[a] + g.log[b]];
}

inline uint8_t GfDiv(uint8_t a, uint8_t b) {  // b != 0
  if (a == 0) return 0;
  const GfTables& g = Gf();
  return g.exp[g.log[a] + 255 - g.log[b]];
}

absl::Status CheckXs(const std::vector<uint8_t>& xs, absl::string_view what) {
  std::array<bool, 256> seen{};
  for (size_t i = 0; i < xs.size(); ++i) {
    if (xs[i] == 0) {
      return absl::InvalidArgumentError(absl::StrCat(what, "[", i, "]: x must be in 1..255, found 0"));
    }
    if (seen[xs[i]]) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, "[", i, "]: duplicate x = ", static_cast<int>(xs[i])));
    }
    seen[xs[i]] = true;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<ShamirShare>> ShamirSplit(std::string_view secret, int threshold,
                                                     const std::vector<uint8_t>& xs) {
  if (xs.empty() || xs.size() > 255) {
    return absl::InvalidArgumentError(
        absl::StrCat("Shamir split: need 1..255 shares, asked for ", xs.size()));
  }
  if (threshold < 1 || static_cast<size_t>(threshold) > xs.size()) {
    return absl::InvalidArgumentError(absl::StrCat("Shamir split: threshold must be in [1, ",
                                                   xs.size(), "], found ", threshold));
  }
  if (absl::Status s = CheckXs(xs, "Shamir split: share"); !s.ok()) return s;
  // coeffs[j * (t-1) + i] is the coefficient of x^(i+1) for byte j.
  const size_t degree = static_cast<size_t>(threshold - 1);
  std::string coeffs = RandomBytes(secret.size() * degree);
  std::vector<ShamirShare> shares(xs.size());
  for (size_t s = 0; s < xs.size(); ++s) {
    shares[s].x = xs[s];
    shares[s].y.resize(secret.size());
    for (size_t j = 0; j < secret.size(); ++j) {
      // Horner: ((c_d x + c_{d-1}) x + ...) x + secret_j.
      uint8_t acc = 0;
      for (size_t i = degree; i-- > 0;) {
        acc = GfMul(acc, xs[s]) ^ static_cast<uint8_t>(coeffs[j * degree + i]);
      }
      acc = GfMul(acc, xs[s]) ^ static_cast<uint8_t>(secret[j]);
      shares[s].y[j] = static_cast<char>(acc);
    }
  }
  std::fill(coeffs.begin(), coeffs.end(), '\0');
  return shares;
}

absl::StatusOr<std::string> ShamirReconstruct(const std::vector<ShamirShare>& shares,
                                              int threshold) {
  if (threshold < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("Shamir reconstruct: threshold must be >= 1, found ", threshold));
  }
  if (shares.size() < static_cast<size_t>(threshold)) {
    return absl::InvalidArgumentError(absl::StrCat("Shamir reconstruct: need ", threshold,
                                                   " shares, found ", shares.size()));
  }
  std::vector<uint8_t> xs;
  for (const ShamirShare& s : shares) xs.push_back(s.x);
  if (absl::Status st = CheckXs(xs, "Shamir reconstruct: share"); !st.ok()) return st;
  const size_t len = shares[0].y.size();
  for (size_t i = 1; i < shares.size(); ++i) {
    if (shares[i].y.size() != len) {
      return absl::InvalidArgumentError(absl::StrCat("Shamir reconstruct: share[", i, "] has ",
                                                     shares[i].y.size(), " bytes, share[0] has ",
                                                     len));
    }
  }
  // Lagrange basis at 0: L_i = prod_{j != i} x_j / (x_j - x_i); minus is XOR.
  const size_t t = static_cast<size_t>(threshold);
  std::vector<uint8_t> basis(t);
  for (size_t i = 0; i < t; ++i) {
    uint8_t num = 1, den = 1;
    for (size_t j = 0; j < t; ++j) {
      if (j == i) continue;
      num = GfMul(num, xs[j]);
      den = GfMul(den, xs[j] ^ xs[i]);
    }
    basis[i] = GfDiv(num, den);
  }
  std::string secret(len, '\0');
  for (size_t b = 0; b < len; ++b) {
    uint8_t acc = 0;
    for (size_t i = 0; i < t; ++i) acc ^= GfMul(static_cast<uint8_t>(shares[i].y[b]), basis[i]);
    secret[b] = static_cast<char>(acc);
  }
  return secret;
}

}  // namespace fedlora::common::secagg
