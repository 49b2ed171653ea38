#include "common/secagg/graph.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"
#include "common/secagg/prg.h"
#include "common/status/status.h"

namespace fedlora::common::secagg {

absl::StatusOr<NeighbourGraph> NeighbourGraph::Build(std::vector<uint32_t> ids, int k,
                                                     std::string_view round_seed) {
  if (ids.size() < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("secagg graph: cohort needs at least 2 clients, found ", ids.size()));
  }
  if (round_seed.size() != kSeedBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("secagg graph: round_seed must be 32 bytes, found ", round_seed.size()));
  }
  if (k < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("secagg graph: neighbours must be >= 1, found ", k));
  }
  std::sort(ids.begin(), ids.end());
  for (size_t i = 1; i < ids.size(); ++i) {
    if (ids[i] == ids[i - 1]) {
      return absl::InvalidArgumentError(
          absl::StrCat("secagg graph: duplicate client id ", ids[i], " in the cohort"));
    }
  }
  const int n = static_cast<int>(ids.size());
  const int h = (k + 1) / 2;
  const bool complete = 2 * h >= n - 1;
  const int degree = complete ? n - 1 : 2 * h;
  if (degree + 1 > 255) {
    return absl::InvalidArgumentError(absl::StrCat(
        "secagg graph: closed neighbourhood of ", degree + 1,
        " clients exceeds 255 (Shamir shares over GF(2^8)); use neighbours <= 254 (k = ", k,
        ", cohort ", n, ")"));
  }
  NeighbourGraph g;
  g.ids_ = std::move(ids);
  g.degree_ = degree;
  for (int i = 0; i < n; ++i) g.index_[g.ids_[i]] = i;
  g.open_.assign(n, {});
  if (complete) {
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) {
        if (j != i) g.open_[i].push_back(j);
      }
    }
  } else {
    std::string key = Sha256(absl::StrCat("fedlora secagg graph v1",
                                          absl::string_view(round_seed.data(), round_seed.size())));
    ASSIGN_OR_RETURN(std::vector<uint32_t> words, PrgExpand(key, 2 * static_cast<size_t>(n)));
    std::vector<int> ring(n);
    for (int i = 0; i < n; ++i) ring[i] = i;
    for (int i = n - 1; i > 0; --i) {
      uint64_t r = (static_cast<uint64_t>(words[2 * i]) << 32) | words[2 * i + 1];
      int j = static_cast<int>(r % static_cast<uint64_t>(i + 1));  // bias <= n / 2^64
      std::swap(ring[i], ring[j]);
    }
    for (int r = 0; r < n; ++r) {
      for (int d = 1; d <= h; ++d) {
        g.open_[ring[r]].push_back(ring[(r + d) % n]);
        g.open_[ring[r]].push_back(ring[(r - d + n) % n]);
      }
    }
    for (auto& nb : g.open_) std::sort(nb.begin(), nb.end());
  }
  g.closed_ = g.open_;
  for (int i = 0; i < n; ++i) {
    auto& c = g.closed_[i];
    c.insert(std::lower_bound(c.begin(), c.end(), i), i);
  }
  return g;
}

int NeighbourGraph::IndexOf(uint32_t id) const {
  auto it = index_.find(id);
  return it == index_.end() ? -1 : it->second;
}

bool NeighbourGraph::Adjacent(int a, int b) const {
  return std::binary_search(open_[a].begin(), open_[a].end(), b);
}

uint8_t NeighbourGraph::ShareX(int owner, int holder) const {
  const auto& c = closed_[owner];
  auto it = std::lower_bound(c.begin(), c.end(), holder);
  if (it == c.end() || *it != holder) return 0;
  return static_cast<uint8_t>(1 + (it - c.begin()));
}

}  // namespace fedlora::common::secagg
