#include "simulations/bench_secagg.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/secagg/fixed_point.h"
#include "common/secagg/protocol.h"
#include "common/status/status.h"
#include "simulations/bench_util.h"

namespace fedlora::sim {
namespace {

namespace sa = fedlora::common::secagg;
using bench::Clock;
using bench::Seconds;
using bench::SplitMix;
using bench::UniformUnit;


void MakeUpdate(uint64_t seed, std::vector<float>& out) {
  uint64_t s = seed;
  for (float& v : out) {
    v = static_cast<float>(UniformUnit(s) * 0.1 - 0.05);
  }
}

}  // namespace

absl::StatusOr<SecAggBenchResult> RunSecAggBench(const SecAggBenchOptions& o) {
  if (o.agents < 3) {
    return absl::InvalidArgumentError(absl::StrCat("agents must be >= 3, found ", o.agents));
  }
  if (o.params < 1) {
    return absl::InvalidArgumentError(absl::StrCat("params must be >= 1, found ", o.params));
  }
  if (!(o.dropout >= 0 && o.dropout < 1)) {
    return absl::InvalidArgumentError(absl::StrCat("dropout must be in [0, 1), found ", o.dropout));
  }
  SecAggBenchResult r;
  r.options = o;
  const size_t p = static_cast<size_t>(o.params);

  sa::SecAggConfig cfg;
  cfg.round_id = o.seed;
  uint64_t s = o.seed * 7919 + 17;
  cfg.round_seed.resize(32);
  for (char& c : cfg.round_seed) c = static_cast<char>(SplitMix(s));
  for (int i = 1; i <= o.agents; ++i) cfg.cohort.push_back(static_cast<uint32_t>(i));
  cfg.neighbours = o.neighbours;
  cfg.threshold = o.threshold;
  cfg.vector_length = p;
  cfg.threads = o.threads;
  ASSIGN_OR_RETURN(sa::Server server, sa::Server::Create(cfg));
  r.neighbours = server.plan().graph().degree();
  r.threshold = server.plan().threshold();
  ASSIGN_OR_RETURN(sa::FixedPointCodec codec, sa::FixedPointCodec::Create({1.0, 0, o.agents}));

  std::vector<sa::Client> clients;
  for (uint32_t id : cfg.cohort) {
    ASSIGN_OR_RETURN(sa::Client c, sa::Client::Create(cfg, id));
    clients.push_back(std::move(c));
  }
  const int n = o.agents;
  r.dropped = static_cast<int>(std::floor(o.dropout * n));
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(o.seed);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<char> drops(n, 0);
  for (int i = 0; i < r.dropped; ++i) drops[order[i]] = 1;

  std::vector<double> sent(n, 0), received(n, 0), agent_s(n, 0), mask_s(n, 0);
  // Round 0.
  for (int i = 0; i < n; ++i) {
    auto t0 = Clock::now();
    ASSIGN_OR_RETURN(std::string m, clients[i].AdvertiseKeys());
    agent_s[i] += Seconds(t0, Clock::now());
    sent[i] += m.size();
    RETURN_IF_ERROR(server.HandleAdvertiseKeys(m));
  }
  RETURN_IF_ERROR(server.CloseAdvertiseKeys());
  // Round 1.
  for (int i = 0; i < n; ++i) {
    ASSIGN_OR_RETURN(std::string dir, server.KeyDirectoryFor(cfg.cohort[i]));
    received[i] += dir.size();
    auto t0 = Clock::now();
    ASSIGN_OR_RETURN(std::string m, clients[i].ShareKeys(dir));
    agent_s[i] += Seconds(t0, Clock::now());
    sent[i] += m.size();
    RETURN_IF_ERROR(server.HandleShareKeys(m));
  }
  RETURN_IF_ERROR(server.CloseShareKeys());
  // Round 2: survivors encode, mask and send; the plaintext sum is kept beside.
  std::vector<uint32_t> plain_sum(p, 0);
  std::vector<float> update(p);
  std::vector<uint32_t> encoded(p);
  for (int i = 0; i < n; ++i) {
    if (drops[i]) continue;
    ASSIGN_OR_RETURN(std::string del, server.ShareDeliveryFor(cfg.cohort[i]));
    received[i] += del.size();
    MakeUpdate(o.seed * 1000003 + static_cast<uint64_t>(i), update);
    auto t0 = Clock::now();
    RETURN_IF_ERROR(codec.EncodeInto(update, absl::MakeSpan(encoded)));
    auto t1 = Clock::now();
    ASSIGN_OR_RETURN(std::string m, clients[i].MaskedInput(del, encoded));
    auto t2 = Clock::now();
    agent_s[i] += Seconds(t0, t2);
    mask_s[i] = Seconds(t1, t2);
    sent[i] += m.size();
    for (size_t j = 0; j < p; ++j) plain_sum[j] += encoded[j];
    auto c0 = Clock::now();
    RETURN_IF_ERROR(server.HandleMaskedInput(m));
    r.coordinator_collect_s += Seconds(c0, Clock::now());
  }
  RETURN_IF_ERROR(server.CloseMaskedInput());
  // Round 3.
  for (int i = 0; i < n; ++i) {
    if (drops[i]) continue;
    ASSIGN_OR_RETURN(std::string req, server.UnmaskRequestFor(cfg.cohort[i]));
    received[i] += req.size();
    auto t0 = Clock::now();
    ASSIGN_OR_RETURN(std::string m, clients[i].Unmask(req));
    agent_s[i] += Seconds(t0, Clock::now());
    sent[i] += m.size();
    RETURN_IF_ERROR(server.HandleUnmaskResponse(m));
  }
  auto u0 = Clock::now();
  ASSIGN_OR_RETURN(sa::SecAggResult result, server.Finalize());
  r.coordinator_unmask_s = Seconds(u0, Clock::now());

  int done = 0;
  for (int i = 0; i < n; ++i) {
    if (drops[i]) continue;
    ++done;
    r.agent_mask_s_mean += mask_s[i];
    r.agent_total_s_mean += agent_s[i];
    r.bytes_sent_per_agent += sent[i];
    r.bytes_received_per_agent += received[i];
  }
  r.agent_mask_s_mean /= done;
  r.agent_total_s_mean /= done;
  r.bytes_sent_per_agent /= done;
  r.bytes_received_per_agent /= done;
  r.plaintext_bytes = 4 * o.params;
  r.correct = result.sum == plain_sum && static_cast<int>(result.contributors.size()) == done &&
              codec.DecodeSum(result.sum, done).ok();
  return r;
}

std::string SecAggBenchJson(const SecAggBenchResult& r) {
  return absl::StrFormat(
      "{\"bench\":\"secagg\",\"agents\":%d,\"params\":%d,\"dropout\":%g,\"dropped\":%d,"
      "\"neighbours\":%d,\"threshold\":%d,\"threads\":%d,\"agent_mask_s_mean\":%.4f,"
      "\"agent_total_s_mean\":%.4f,\"coordinator_collect_s\":%.4f,\"coordinator_unmask_s\":%.4f,"
      "\"bytes_sent_per_agent\":%.0f,\"bytes_received_per_agent\":%.0f,"
      "\"plaintext_fp32_bytes\":%d,\"bytes_ratio\":%.5f,\"correct\":%s}",
      r.options.agents, r.options.params, r.options.dropout, r.dropped, r.neighbours, r.threshold,
      r.options.threads, r.agent_mask_s_mean, r.agent_total_s_mean, r.coordinator_collect_s,
      r.coordinator_unmask_s, r.bytes_sent_per_agent, r.bytes_received_per_agent,
      r.plaintext_bytes, r.bytes_sent_per_agent / static_cast<double>(r.plaintext_bytes),
      r.correct ? "true" : "false");
}

}  // namespace fedlora::sim
