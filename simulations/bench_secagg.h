#pragma once
// `fedlora-sim bench secagg`: the whole secure-aggregation protocol
// (common/secagg) in one process, N agents and one coordinator, to measure
// what masking costs.
//
// RunSecAggBench(options):
//  * cohort ids 1..agents, a random round seed, neighbours / threshold as given
//    (0 = the library defaults, DefaultNeighbours / DefaultThreshold);
//  * every agent's update is `params` floats in [-0.05, 0.05] from a seeded
//    generator, clipped to [-1, 1] and fixed-point encoded with the largest
//    safe scale for `agents`; agents' inputs are produced one at a time so
//    memory stays O(params), never O(agents x params);
//  * floor(dropout * agents) agents, picked by the seed, drop after ShareKeys
//    (they shared their keys but never send a masked input): the costliest
//    case for the coordinator, which must rebuild their mask keys and cancel
//    their pairwise masks;
//  * every message goes through Serialize/bytes/Parse as it would on the wire.
// Reports mean per-agent masking time (Client::MaskedInput), the coordinator's
// collect time (folding masked inputs into the running sum) and unmask time
// (Server::Finalize), bytes each completing agent sent in all four rounds vs
// the plaintext fp32 update (4 * params bytes), and whether the unmasked sum
// equals the plaintext sum of the encodings exactly.
// Bad options are InvalidArgument naming the field.

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace fedlora::sim {

struct SecAggBenchOptions {
  int agents = 100;
  int64_t params = 1000000;
  double dropout = 0.1;
  int neighbours = 0;  // 0 = DefaultNeighbours(agents)
  int threshold = 0;   // 0 = DefaultThreshold
  int threads = 1;     // coordinator unmask threads
  uint64_t seed = 1;
};

struct SecAggBenchResult {
  SecAggBenchOptions options;
  int neighbours = 0;  // effective degree of the graph
  int threshold = 0;
  int dropped = 0;
  double agent_mask_s_mean = 0;      // Client::MaskedInput (PRG expansion + adding)
  double agent_total_s_mean = 0;     // all four client steps, including Shamir and X25519
  double coordinator_collect_s = 0;  // Server::HandleMaskedInput over all agents
  double coordinator_unmask_s = 0;   // Server::Finalize
  double bytes_sent_per_agent = 0;   // mean over agents that completed the round
  double bytes_received_per_agent = 0;
  int64_t plaintext_bytes = 0;       // 4 * params
  bool correct = false;
};

absl::StatusOr<SecAggBenchResult> RunSecAggBench(const SecAggBenchOptions& options);

// One JSON line (no trailing newline): {"bench":"secagg","agents":..,"params":..,
// "dropout":..,"dropped":..,"neighbours":..,"threshold":..,"threads":..,
// "agent_mask_s_mean":..,"agent_total_s_mean":..,"coordinator_collect_s":..,
// "coordinator_unmask_s":..,"bytes_sent_per_agent":..,"bytes_received_per_agent":..,
// "plaintext_fp32_bytes":..,"bytes_ratio":..,"correct":..}
std::string SecAggBenchJson(const SecAggBenchResult& result);

}  // namespace fedlora::sim
