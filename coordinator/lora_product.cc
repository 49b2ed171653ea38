#include "coordinator/lora_product.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status/status.h"

namespace fedlora::coordinator {
namespace {

std::string ShapeStr(const std::vector<int64_t>& shape) {
  return "[" + absl::StrJoin(shape, ",") + "]";
}

// Adds weight * B A to sum ([out, in]).
void AddProduct(const common::HostTensor& a, const common::HostTensor& b, double weight,
                Matrix* sum) {
  const int64_t r = a.shape[0], in = a.shape[1], out = b.shape[0];
  for (int64_t o = 0; o < out; ++o) {
    double* row = &sum->data[static_cast<size_t>(o * in)];
    for (int64_t k = 0; k < r; ++k) {
      const double bk = weight * static_cast<double>(b.data[static_cast<size_t>(o * r + k)]);
      if (bk == 0) continue;
      const float* arow = &a.data[static_cast<size_t>(k * in)];
      for (int64_t i = 0; i < in; ++i) row[i] += bk * static_cast<double>(arow[i]);
    }
  }
}

}  // namespace

SymmetricEigen JacobiEigen(const Matrix& g) {
  const int64_t n = g.rows;
  Matrix a = g;
  Matrix v(n, n);
  for (int64_t i = 0; i < n; ++i) v.at(i, i) = 1.0;
  double total = 0;
  for (double x : a.data) total += x * x;
  // Cyclic sweeps of rotations A <- P^T A P zeroing a_pq (Numerical Recipes' jacobi),
  // until the off-diagonal mass is negligible next to the whole matrix.
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0;
    for (int64_t p = 0; p < n; ++p) {
      for (int64_t q = p + 1; q < n; ++q) off += 2 * a.at(p, q) * a.at(p, q);
    }
    if (off <= 1e-30 * total || off == 0) break;
    for (int64_t p = 0; p < n; ++p) {
      for (int64_t q = p + 1; q < n; ++q) {
        const double apq = a.at(p, q);
        if (apq == 0) continue;
        const double theta = (a.at(q, q) - a.at(p, p)) / (2 * apq);
        double t = 1.0 / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        if (theta < 0) t = -t;
        const double c = 1.0 / std::sqrt(t * t + 1.0);
        const double s = t * c;
        for (int64_t k = 0; k < n; ++k) {  // columns p, q: A P
          const double akp = a.at(k, p), akq = a.at(k, q);
          a.at(k, p) = c * akp - s * akq;
          a.at(k, q) = s * akp + c * akq;
        }
        for (int64_t k = 0; k < n; ++k) {  // rows p, q: P^T (A P)
          const double apk = a.at(p, k), aqk = a.at(q, k);
          a.at(p, k) = c * apk - s * aqk;
          a.at(q, k) = s * apk + c * aqk;
        }
        a.at(p, q) = 0;
        a.at(q, p) = 0;
        for (int64_t k = 0; k < n; ++k) {  // V P
          const double vkp = v.at(k, p), vkq = v.at(k, q);
          v.at(k, p) = c * vkp - s * vkq;
          v.at(k, q) = s * vkp + c * vkq;
        }
      }
    }
  }
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return a.at(x, x) > a.at(y, y); });
  SymmetricEigen out;
  out.vectors = Matrix(n, n);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t src = order[static_cast<size_t>(j)];
    out.values.push_back(a.at(src, src));
    for (int64_t k = 0; k < n; ++k) out.vectors.at(k, j) = v.at(k, src);
  }
  return out;
}

TruncatedSvdResult TruncatedSvd(const Matrix& m, int64_t rank) {
  const int64_t rows = m.rows, cols = m.cols;
  Matrix gram(cols, cols);
  for (int64_t r = 0; r < rows; ++r) {
    const double* row = &m.data[static_cast<size_t>(r * cols)];
    for (int64_t i = 0; i < cols; ++i) {
      if (row[i] == 0) continue;
      double* g = &gram.data[static_cast<size_t>(i * cols)];
      for (int64_t j = i; j < cols; ++j) g[j] += row[i] * row[j];
    }
  }
  for (int64_t i = 0; i < cols; ++i) {
    for (int64_t j = 0; j < i; ++j) gram.at(i, j) = gram.at(j, i);
  }
  SymmetricEigen eig = JacobiEigen(gram);
  TruncatedSvdResult out;
  const int64_t n = std::min(rows, cols);
  for (int64_t j = 0; j < n; ++j) {
    out.sigma.push_back(std::sqrt(std::max(0.0, eig.values[static_cast<size_t>(j)])));
  }
  const int64_t k = std::min(rank, cols);
  out.v = Matrix(cols, k);
  out.mv = Matrix(rows, k);
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t i = 0; i < cols; ++i) out.v.at(i, j) = eig.vectors.at(i, j);
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < k; ++j) {
      double acc = 0;
      for (int64_t i = 0; i < cols; ++i) acc += m.at(r, i) * out.v.at(i, j);
      out.mv.at(r, j) = acc;
    }
  }
  // ||M v_j|| is a more accurate sigma_j than the square root of a Gram eigenvalue.
  for (int64_t j = 0; j < std::min(k, n); ++j) {
    double norm2 = 0;
    for (int64_t r = 0; r < rows; ++r) norm2 += out.mv.at(r, j) * out.mv.at(r, j);
    out.sigma[static_cast<size_t>(j)] = std::sqrt(norm2);
  }
  return out;
}

absl::StatusOr<std::map<std::string, LoraPair>> PairLoraFactors(const common::TensorMap& adapter) {
  std::map<std::string, LoraPair> pairs;
  for (const auto& [name, t] : adapter) {
    const bool is_a = absl::EndsWith(name, kLoraASuffix);
    const bool is_b = absl::EndsWith(name, kLoraBSuffix);
    if (!is_a && !is_b) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", name, "': expected a LoRA factor ending in ", kLoraASuffix, " or ",
          kLoraBSuffix));
    }
    if (t.shape.size() != 2 || static_cast<size_t>(t.numel()) != t.data.size()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", name,
                                                     "': expected a 2-D matrix, found shape ",
                                                     ShapeStr(t.shape), " with ", t.data.size(),
                                                     " values"));
    }
    const std::string prefix =
        name.substr(0, name.size() - std::string_view(is_a ? kLoraASuffix : kLoraBSuffix).size());
    (is_a ? pairs[prefix].a : pairs[prefix].b) = &t;
  }
  for (const auto& [prefix, p] : pairs) {
    if (p.a == nullptr || p.b == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("module '", prefix, "' has ",
                                                     p.a == nullptr ? "lora_B but no lora_A"
                                                                    : "lora_A but no lora_B"));
    }
    if (p.a->shape[0] != p.b->shape[1]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "module '", prefix, "': lora_A is ", ShapeStr(p.a->shape), " and lora_B is ",
          ShapeStr(p.b->shape), "; expected A [r, in] and B [out, r] with the same r"));
    }
  }
  return pairs;
}

absl::StatusOr<std::map<std::string, Matrix>> AdapterProducts(const common::TensorMap& adapter,
                                                              double scale) {
  ASSIGN_OR_RETURN(auto pairs, PairLoraFactors(adapter));
  std::map<std::string, Matrix> out;
  for (const auto& [prefix, p] : pairs) {
    Matrix m(p.b->shape[0], p.a->shape[1]);
    AddProduct(*p.a, *p.b, scale, &m);
    out.emplace(prefix, std::move(m));
  }
  return out;
}

absl::Status ProductAggregator::Add(const common::TensorMap& update, double weight) {
  if (!(weight > 0) || !std::isfinite(weight)) {
    return absl::InvalidArgumentError(
        absl::StrCat("product aggregation weight must be finite and > 0, found ", weight));
  }
  if (update.empty()) return absl::InvalidArgumentError("update holds no tensors");
  ASSIGN_OR_RETURN(auto pairs, PairLoraFactors(update));
  // Check everything before touching the sums, so a bad update changes nothing.
  for (const auto& [prefix, p] : pairs) {
    if (p.a->shape[0] != static_cast<int64_t>(rank_)) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", prefix, kLoraASuffix,
                                                     "': expected rank ", rank_, ", found shape ",
                                                     ShapeStr(p.a->shape)));
    }
    if (count_ > 0) {
      auto it = modules_.find(prefix);
      if (it == modules_.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat("module '", prefix, "' is not in the first update"));
      }
      if (it->second.sum.rows != p.b->shape[0] || it->second.sum.cols != p.a->shape[1]) {
        return absl::InvalidArgumentError(absl::StrCat(
            "module '", prefix, "': expected B A of shape [", it->second.sum.rows, ",",
            it->second.sum.cols, "], found B ", ShapeStr(p.b->shape), " A ",
            ShapeStr(p.a->shape)));
      }
    }
  }
  if (count_ > 0 && pairs.size() != modules_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("expected ", modules_.size(),
                                                   " LoRA modules like the first update, found ",
                                                   pairs.size()));
  }
  for (const auto& [prefix, p] : pairs) {
    Module& m = modules_[prefix];
    if (count_ == 0) m.sum = Matrix(p.b->shape[0], p.a->shape[1]);
    AddProduct(*p.a, *p.b, weight * scale_, &m.sum);
  }
  ++count_;
  total_weight_ += weight;
  return absl::OkStatus();
}

absl::StatusOr<ProductResult> ProductAggregator::Finish() const {
  if (count_ == 0) return absl::FailedPreconditionError("product aggregation of zero updates");
  ProductResult out;
  double total = 0, discarded = 0;
  for (const auto& [prefix, module] : modules_) {
    Matrix mean = module.sum;
    for (double& x : mean.data) x /= total_weight_;
    ModuleEnergy energy;
    for (double x : mean.data) energy.total += x * x;
    TruncatedSvdResult svd = TruncatedSvd(mean, rank_);
    for (size_t j = rank_; j < svd.sigma.size(); ++j) {
      energy.discarded += svd.sigma[j] * svd.sigma[j];
    }
    energy.discarded = std::min(energy.discarded, energy.total);
    total += energy.total;
    discarded += energy.discarded;
    out.energy[prefix] = energy;

    const int64_t out_dim = mean.rows, in_dim = mean.cols, r = rank_;
    common::HostTensor a, b;
    a.shape = {r, in_dim};
    a.data.assign(static_cast<size_t>(r * in_dim), 0.0f);
    b.shape = {out_dim, r};
    b.data.assign(static_cast<size_t>(out_dim * r), 0.0f);
    for (int64_t j = 0; j < svd.v.cols; ++j) {
      const double sigma = svd.sigma[static_cast<size_t>(j)];
      const double c = std::max(std::sqrt(sigma / scale_), kMinARowNorm);
      for (int64_t i = 0; i < in_dim; ++i) {
        a.data[static_cast<size_t>(j * in_dim + i)] = static_cast<float>(c * svd.v.at(i, j));
      }
      for (int64_t o = 0; o < out_dim; ++o) {
        b.data[static_cast<size_t>(o * r + j)] =
            static_cast<float>(svd.mv.at(o, j) / (scale_ * c));
      }
    }
    out.adapter.emplace(prefix + kLoraASuffix, std::move(a));
    out.adapter.emplace(prefix + kLoraBSuffix, std::move(b));
  }
  out.discarded_energy_fraction = total > 0 ? discarded / total : 0.0;
  return out;
}

}  // namespace fedlora::coordinator
