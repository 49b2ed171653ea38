#pragma once
// The SecAgg+ neighbourhood graph of one round.
//
// Choice (documented in docs/privacy.md): a Harary-style ring. The cohort's
// ids are sorted, then shuffled by a Fisher-Yates permutation driven by
// PRG(SHA-256("fedlora secagg graph v1" || round_seed)); each client is joined
// to the h = ceil(k/2) clients on either side of it on that ring. The result is
// 2h-regular (an odd k is rounded up to even), connected, and every party that
// knows (cohort, k, round_seed) computes the same graph. When 2h >= n - 1 the
// graph is complete: that is full SecAgg (Bonawitz et al. 2017).
//
// Clients are addressed by index (0..n-1, position in the sorted id list).
// The closed neighbourhood N[u] = {u} and its neighbours, sorted by index, is
// who holds u's Shamir shares; holder v gets x = 1 + position of v in N[u],
// so |N[u]| <= 255 (GF(2^8) Shamir); Build rejects larger neighbourhoods.
// Immutable after Build; safe for concurrent use.

#include <cstdint>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::common::secagg {

class NeighbourGraph {
 public:
  // InvalidArgument for: fewer than 2 ids, duplicate ids, k < 1, a round seed
  // that is not 32 bytes, or a closed neighbourhood larger than 255.
  static absl::StatusOr<NeighbourGraph> Build(std::vector<uint32_t> ids, int k,
                                              std::string_view round_seed);

  int size() const { return static_cast<int>(ids_.size()); }
  // Sorted, unique.
  const std::vector<uint32_t>& ids() const { return ids_; }
  uint32_t id(int index) const { return ids_[index]; }
  // -1 when the id is not in the cohort.
  int IndexOf(uint32_t id) const;
  // Neighbours of `index`, without itself, sorted.
  const std::vector<int>& Neighbours(int index) const { return open_[index]; }
  // Itself and its neighbours, sorted.
  const std::vector<int>& Closed(int index) const { return closed_[index]; }
  bool Adjacent(int a, int b) const;
  // Shamir x of `holder`'s share of `owner`'s secrets; 0 when holder is not in N[owner].
  uint8_t ShareX(int owner, int holder) const;
  // Neighbours per client (2h, or n-1 when complete).
  int degree() const { return degree_; }
  bool complete() const { return degree_ == size() - 1; }

 private:
  std::vector<uint32_t> ids_;
  std::unordered_map<uint32_t, int> index_;
  std::vector<std::vector<int>> open_;
  std::vector<std::vector<int>> closed_;
  int degree_ = 0;
};

}  // namespace fedlora::common::secagg
