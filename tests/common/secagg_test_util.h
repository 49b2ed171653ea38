#pragma once
// Test helpers for common/secagg: an in-process round driver with scripted
// dropouts in each phase (and StatusIs from tests/testing/test_util.h).

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "common/secagg/protocol.h"
#include "common/status/status.h"
#include "tests/testing/test_util.h"

namespace fedlora::common::secagg::testing {

using ::fedlora::testutil::StatusIs;

// Who drops where. "before_advertise": never sends anything. "after_advertise":
// advertises, never shares keys. "after_share": shares keys, never sends its
// masked input. "after_masked": sends its masked input, never receives the
// unmask request. "during_unmask": computes its unmask response, which is lost.
struct Drops {
  std::set<uint32_t> before_advertise, after_advertise, after_share, after_masked, during_unmask;
};

struct Round {
  SecAggConfig config;
  std::vector<uint32_t> ids;
  std::vector<Client> clients;
  std::vector<std::vector<uint32_t>> inputs;  // encoded inputs, one per client
  Server server;
};

inline SecAggConfig MakeConfig(int n, int k, int t, uint64_t p, uint64_t seed = 1) {
  SecAggConfig c;
  c.round_id = 40 + seed;
  std::mt19937_64 rng(seed);
  c.round_seed.resize(32);
  for (char& ch : c.round_seed) ch = static_cast<char>(rng());
  // Non-contiguous, unsorted ids catch index / id mix-ups.
  for (int i = 0; i < n; ++i) c.cohort.push_back(static_cast<uint32_t>(1000 + 7 * (n - i)));
  c.neighbours = k;
  c.threshold = t;
  c.vector_length = p;
  return c;
}

inline absl::StatusOr<Round> MakeRound(const SecAggConfig& config, uint64_t input_seed = 7) {
  ASSIGN_OR_RETURN(Server server, Server::Create(config));
  std::vector<Client> clients;
  std::vector<std::vector<uint32_t>> inputs;
  std::mt19937 rng(static_cast<uint32_t>(input_seed));
  for (uint32_t id : server.plan().graph().ids()) {
    ASSIGN_OR_RETURN(Client c, Client::Create(config, id));
    clients.push_back(std::move(c));
    std::vector<uint32_t> x(config.vector_length);
    for (auto& w : x) w = rng();
    inputs.push_back(std::move(x));
  }
  return Round{config, server.plan().graph().ids(), std::move(clients), std::move(inputs),
               std::move(server)};
}

// Plain mod-2^32 sum of the inputs of `contributors`.
inline std::vector<uint32_t> PlainSum(const Round& r, const std::vector<uint32_t>& contributors) {
  std::vector<uint32_t> sum(r.config.vector_length, 0);
  for (uint32_t id : contributors) {
    for (size_t i = 0; i < r.ids.size(); ++i) {
      if (r.ids[i] != id) continue;
      for (size_t j = 0; j < sum.size(); ++j) sum[j] += r.inputs[i][j];
    }
  }
  return sum;
}

// Runs all four rounds with the scripted dropouts. Client-side failures of
// clients that are meant to survive are returned as errors.
inline absl::StatusOr<SecAggResult> RunRound(Round& r, const Drops& d) {
  std::set<uint32_t> gone;
  for (auto& c : r.clients) {
    if (d.before_advertise.count(c.id())) continue;
    ASSIGN_OR_RETURN(std::string m, c.AdvertiseKeys());
    RETURN_IF_ERROR(r.server.HandleAdvertiseKeys(m));
  }
  RETURN_IF_ERROR(r.server.CloseAdvertiseKeys());
  for (auto* s : {&d.before_advertise, &d.after_advertise}) gone.insert(s->begin(), s->end());
  for (auto& c : r.clients) {
    if (gone.count(c.id())) continue;
    ASSIGN_OR_RETURN(std::string dir, r.server.KeyDirectoryFor(c.id()));
    ASSIGN_OR_RETURN(std::string m, c.ShareKeys(dir));
    RETURN_IF_ERROR(r.server.HandleShareKeys(m));
  }
  RETURN_IF_ERROR(r.server.CloseShareKeys());
  gone.insert(d.after_share.begin(), d.after_share.end());
  for (size_t i = 0; i < r.clients.size(); ++i) {
    Client& c = r.clients[i];
    if (gone.count(c.id())) continue;
    ASSIGN_OR_RETURN(std::string del, r.server.ShareDeliveryFor(c.id()));
    ASSIGN_OR_RETURN(std::string m, c.MaskedInput(del, r.inputs[i]));
    RETURN_IF_ERROR(r.server.HandleMaskedInput(m));
  }
  RETURN_IF_ERROR(r.server.CloseMaskedInput());
  gone.insert(d.after_masked.begin(), d.after_masked.end());
  for (auto& c : r.clients) {
    if (gone.count(c.id())) continue;
    ASSIGN_OR_RETURN(std::string req, r.server.UnmaskRequestFor(c.id()));
    ASSIGN_OR_RETURN(std::string m, c.Unmask(req));
    if (d.during_unmask.count(c.id())) continue;
    RETURN_IF_ERROR(r.server.HandleUnmaskResponse(m));
  }
  return r.server.Finalize();
}

// Picks `count` ids (starting from index `start`, stepping) such that no closed
// neighbourhood loses more than `max_per_neighbourhood` members, also counting
// `already` dropped ids. Returns fewer when impossible.
inline std::set<uint32_t> SpreadDrops(const NeighbourGraph& g, int count, int max_per_neighbourhood,
                                      const std::set<uint32_t>& already = {}, int start = 0) {
  std::set<uint32_t> out;
  std::vector<int> lost(g.size(), 0);
  auto drop_index = [&](int v) {
    for (int u = 0; u < g.size(); ++u) {
      if (g.ShareX(u, v) != 0) ++lost[u];
    }
  };
  for (uint32_t id : already) drop_index(g.IndexOf(id));
  for (int step = 0; step < g.size() && static_cast<int>(out.size()) < count; ++step) {
    int v = (start + step * 3) % g.size();
    uint32_t id = g.id(v);
    if (out.count(id) || already.count(id)) continue;
    bool ok = true;
    for (int u = 0; u < g.size(); ++u) {
      if (g.ShareX(u, v) != 0 && lost[u] + 1 > max_per_neighbourhood) ok = false;
    }
    if (!ok) continue;
    drop_index(v);
    out.insert(id);
  }
  return out;
}

}  // namespace fedlora::common::secagg::testing
