#pragma once
// Exact product aggregation of LoRA adapters (docs/aggregation.md), and the small
// dense linear algebra it needs (the coordinator does not link libtorch).
//
// A LoRA module contributes dW = s * B A to its frozen weight, s = alpha / r,
// A: [r, in], B: [out, r]. Averaging A and B separately gives s * mean(B) mean(A),
// which is not the mean of the updates s * mean(B A). ProductAggregator averages
// the products exactly:
//
//   ProductAggregator agg(alpha / r, r);
//   for (each update) RETURN_IF_ERROR(agg.Add(update, num_examples));
//   ASSIGN_OR_RETURN(ProductResult res, agg.Finish());
//
// Add() pairs every "<module>.lora_A.weight" [r, in] with "<module>.lora_B.weight"
// [out, r] and adds weight * s * B A to a dense fp64 [out, in] sum per module, so
// memory is O(sum of the dense module sizes) whatever the number of updates.
// Finish() divides by the total weight, factors each mean M by a truncated SVD to
// rank r and returns B, A with s * B A = the best rank-r approximation of M
// (Eckart-Young). Singular values are split between the factors: A's row k is
// c_k v_k^T and B's column k is sigma_k u_k / (s c_k), with c_k = sqrt(sigma_k / s)
// (balanced) but never below kMinARowNorm, so directions with small or zero
// singular values keep an A row of the seeded init's size and stay trainable; the
// product is the same either way. The discarded energy is
// sum of the dropped sigma^2 / sum of all sigma^2 (= ||M - s B A||_F^2 / ||M||_F^2),
// per module and over all modules (0 when M = 0).
// Errors (InvalidArgument naming the tensor; the aggregator is left unchanged): an
// unpaired factor, a shape that is not [r, in] / [out, r], another tensor set than
// the first update's, a weight that is not finite and > 0. Not thread-safe.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/tensor/tensor.h"

namespace fedlora::coordinator {

// Row norm of a Kaiming-uniform LoRA A row (U(-1/sqrt(in), 1/sqrt(in)): 1/sqrt(3)).
inline constexpr double kMinARowNorm = 0.57735026918962576;

// A dense row-major matrix of doubles.
struct Matrix {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<double> data;

  Matrix() = default;
  Matrix(int64_t r, int64_t c) : rows(r), cols(c), data(static_cast<size_t>(r * c), 0.0) {}
  double& at(int64_t r, int64_t c) { return data[static_cast<size_t>(r * cols + c)]; }
  double at(int64_t r, int64_t c) const { return data[static_cast<size_t>(r * cols + c)]; }
};

// Eigen-decomposition of a symmetric matrix by cyclic Jacobi rotations:
// eigenvalues in descending order and the eigenvectors as the columns of
// `vectors` (orthonormal). `g` must be square and symmetric (only the values are
// used; asymmetry is a programmer error and gives meaningless results).
struct SymmetricEigen {
  std::vector<double> values;
  Matrix vectors;
};
SymmetricEigen JacobiEigen(const Matrix& g);

// Truncated SVD of m [rows, cols] to `rank` via the eigen-decomposition of the
// [cols, cols] Gram matrix m^T m: m ~= U diag(sigma) V^T. `sigma` holds all
// min(rows, cols) singular values (descending); `v` holds the first min(rank,
// cols) right singular vectors as columns (orthonormal even where sigma = 0) and
// `mv` = m v (= U diag(sigma), computed without dividing by sigma).
struct TruncatedSvdResult {
  std::vector<double> sigma;
  Matrix v;   // [cols, k]
  Matrix mv;  // [rows, k]
};
TruncatedSvdResult TruncatedSvd(const Matrix& m, int64_t rank);

struct ModuleEnergy {
  double total = 0;      // ||M||_F^2
  double discarded = 0;  // sum of the dropped sigma^2
};

struct ProductResult {
  common::TensorMap adapter;                      // B and A per module, fp32
  std::map<std::string, ModuleEnergy> energy;     // by module prefix
  double discarded_energy_fraction = 0;           // sum discarded / sum total (0 if M = 0)
};

class ProductAggregator {
 public:
  // scale = alpha / r (> 0), rank = r (>= 1).
  ProductAggregator(double scale, uint32_t rank) : scale_(scale), rank_(rank) {}

  absl::Status Add(const common::TensorMap& update, double weight);
  absl::StatusOr<ProductResult> Finish() const;

  size_t count() const { return count_; }
  double total_weight() const { return total_weight_; }

 private:
  struct Module {
    Matrix sum;  // [out, in], sum of weight * s * B A
  };
  const double scale_;
  const uint32_t rank_;
  std::map<std::string, Module> modules_;  // by module prefix
  size_t count_ = 0;
  double total_weight_ = 0;
};

// The A and B factor of one module ("<prefix>.lora_A.weight", "<prefix>.lora_B.weight").
struct LoraPair {
  const common::HostTensor* a = nullptr;  // [r, in]
  const common::HostTensor* b = nullptr;  // [out, r]
};
inline constexpr char kLoraASuffix[] = ".lora_A.weight";
inline constexpr char kLoraBSuffix[] = ".lora_B.weight";
// Pairs the factors by module prefix; InvalidArgument for a tensor that is not a
// LoRA factor, an A without B (or B without A), or shapes that do not chain
// (A [r, in], B [out, r], both 2-D, same r). Pointers point into `adapter`.
absl::StatusOr<std::map<std::string, LoraPair>> PairLoraFactors(const common::TensorMap& adapter);

// scale * B A for every module of one adapter, by module prefix.
absl::StatusOr<std::map<std::string, Matrix>> AdapterProducts(const common::TensorMap& adapter,
                                                              double scale);

}  // namespace fedlora::coordinator
