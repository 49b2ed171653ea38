// simd_math.h: the polynomial exp and sigmoid against libm over their ranges,
// their clamping, and that a loop over them gives the same values as single
// calls (the kernels call them from vectorised loops).
#include "edge-agent/simd_math.h"

#include <cmath>
#include <limits>
#include <vector>

#include "gtest/gtest.h"

namespace fedlora::edge {
namespace {

double RelErr(double got, double want) { return std::abs(got - want) / std::abs(want); }

TEST(SimdMathTest, ExpNonPositiveIsWithinTwoUlpOfLibmDownToTheClamp) {
  const ExpBounds b = OpaqueExpBounds();
  double worst = 0;
  for (float x = 0.0f; x >= -87.0f; x -= 0.0137f) {
    worst = std::max(worst, RelErr(ExpNonPositive(x, b), std::exp(static_cast<double>(x))));
  }
  EXPECT_LT(worst, 2.5e-7);
  EXPECT_EQ(ExpNonPositive(0.0f, b), 1.0f);
  // Below the clamp: exp(-87), finite and tiny, never a NaN or a denormal.
  for (float x : {-87.5f, -1e4f, -std::numeric_limits<float>::infinity()}) {
    const float y = ExpNonPositive(x, b);
    EXPECT_TRUE(std::isnormal(y)) << x;
    EXPECT_LT(RelErr(y, std::exp(-87.0)), 2.5e-7) << x;
  }
}

TEST(SimdMathTest, ExpClampedCoversBothSigns) {
  const ExpBounds b = OpaqueExpBounds();
  double worst = 0;
  for (float x = -87.0f; x <= 88.0f; x += 0.0113f) {
    worst = std::max(worst, RelErr(ExpClamped(x, b), std::exp(static_cast<double>(x))));
  }
  EXPECT_LT(worst, 2.5e-7);
  EXPECT_TRUE(std::isfinite(ExpClamped(1e4f, b)));
  EXPECT_TRUE(std::isfinite(ExpClamped(std::numeric_limits<float>::infinity(), b)));
  EXPECT_LT(RelErr(ExpClamped(100.0f, b), std::exp(88.0)), 2.5e-7);
}

TEST(SimdMathTest, SigmoidMatchesTheExactValueAndSaturates) {
  const ExpBounds b = OpaqueExpBounds();
  double worst = 0;
  for (float x = -80.0f; x <= 80.0f; x += 0.0071f) {
    const double want = 1.0 / (1.0 + std::exp(-static_cast<double>(x)));
    worst = std::max(worst, RelErr(Sigmoid(x, b), want));
  }
  EXPECT_LT(worst, 5e-7);
  EXPECT_EQ(Sigmoid(1e4f, b), 1.0f);
  EXPECT_GE(Sigmoid(-1e4f, b), 0.0f);
  EXPECT_LT(Sigmoid(-1e4f, b), 1e-37f);
  EXPECT_EQ(Sigmoid(0.0f, b), 0.5f);
}

// The same values whether a call stands alone or sits in a (vectorised) loop.
TEST(SimdMathTest, LoopsGiveTheValuesOfSingleCalls) {
  const ExpBounds b = OpaqueExpBounds();
  std::vector<float> x(1003), y(x.size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = -90.0f + 0.09f * static_cast<float>(i);
#pragma omp simd
  for (size_t i = 0; i < x.size(); ++i) y[i] = Sigmoid(x[i], b);
  for (size_t i = 0; i < x.size(); i += 97) {
    EXPECT_NEAR(y[i], Sigmoid(x[i], b), 1e-7f * std::max(1e-30f, y[i])) << x[i];
  }
}

}  // namespace
}  // namespace fedlora::edge
