#pragma once
// `fedlora-sim bench coordinator`: the real coordinator binary under N light agents
// over loopback gRPC with mutual TLS 1.3 (docs/benchmarks.md).
//
// RunCoordinatorBench(options):
//  * makes a temp PKI (CA, server certificate, one agent certificate per agent,
//    CN bench-agent-NNNNN) and starts `fedlora-coordinator` as a child process
//    (sealed FedAvg: --secure-aggregation off, min = max participants = agents,
//    --rounds R, the given --max-concurrent-uploads and --worker-threads, a
//    fixed base-model hash: the coordinator never loads the model), so that its
//    peak RSS is its own (VmHWM of /proc/PID/status, read once the last round is
//    published, before it shuts down);
//  * runs `agents` light agents in this process on gRPC's callback API (no
//    thread per agent): each has its own channel and certificate, opens a
//    Session (Hello, heartbeats on one Boost.Asio timer for all agents), and on
//    each RoundTask makes a random update of the adapter's exact shapes
//    (`params` values: PEFT LoRA factors of rank `rank` on q_proj / v_proj,
//    1024 wide, the last module narrower so the total is exact), serializes it
//    (safetensors), seals it to the round's key with the protocol AAD
//    (edge::UpdateAad, common::SealToPublicKey) and uploads it in 1 MiB
//    checksummed chunks like fedlora-agent; at most `client_uploads` updates are
//    prepared or uploading at once (bench memory), retried like the agent on
//    UNAVAILABLE / DEADLINE_EXCEEDED. On each VersionNotice it sends an
//    EvalReport (for the last round only after the final /metrics scrape, so
//    the coordinator is still up to be scraped). No training, no adapter fetch;
//  * after each round (every agent got its VersionNotice) scrapes the
//    coordinator's /metrics: per-round collect (train phase) and aggregate phase
//    seconds, accepted updates; at the end the upload-bound peaks.
// An update is lost when the coordinator did not accept it: updates_lost =
// agents x rounds - fedlora_updates_accepted_total. The bench stops early (and
// reports what it measured) when a session drops, an upload fails for good, or
// timeout_s passes. Bad options are InvalidArgument naming the field.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::sim {

struct CoordinatorBenchOptions {
  int agents = 100;
  int64_t params = 1000000;   // per update; exact when a multiple of `rank`
  int rounds = 3;
  int rank = 8;
  std::string secure_aggregation = "off";  // only "off": SecAgg has `bench secagg`
  int max_concurrent_uploads = 8;          // passed to the coordinator
  int worker_threads = 2;                  // passed to the coordinator
  int client_uploads = 64;                 // light agents' updates prepared/uploading at once
  int prepare_threads = 2;                 // threads making and sealing updates
  int timeout_s = 1800;                    // whole benchmark
  std::string coordinator_bin;             // "" = fedlora-coordinator beside this program
  std::string work_dir;                    // "" = a fresh temp dir, removed afterwards
  uint64_t seed = 1;
};

struct CoordinatorBenchRound {
  uint64_t round_id = 0;
  double wall_s = 0;       // first RoundTask received -> last VersionNotice received
  double collect_s = 0;    // coordinator train phase (open -> last update stored)
  double aggregate_s = 0;  // coordinator aggregate phase (start -> published)
  uint64_t update_bytes = 0;  // sealed bytes of the updates accepted in the round
  int updates_accepted = 0;   // as the light agents saw it
};

struct CoordinatorBenchResult {
  CoordinatorBenchOptions options;
  int64_t params_actual = 0;
  int tensors = 0;
  uint64_t update_bytes_each = 0;  // sealed payload of one update
  std::vector<CoordinatorBenchRound> rounds;
  int rounds_completed = 0;
  uint64_t updates_expected = 0;
  uint64_t updates_accepted = 0;   // fedlora_updates_accepted_total
  uint64_t updates_rejected = 0;   // fedlora_updates_rejected_total (all codes)
  uint64_t updates_lost = 0;
  double setup_s = 0;              // PKI + coordinator start
  double connect_s = 0;            // all sessions welcomed
  uint64_t coordinator_start_rss_bytes = 0;  // VmRSS before any agent connected
  uint64_t coordinator_peak_rss_bytes = 0;   // its VmHWM after the last round
  uint64_t bench_peak_rss_bytes = 0;         // this process (light agents)
  double uploads_in_flight_peak = 0;
  double uploads_waiting_peak = 0;
  int coordinator_exit_code = -1;
  std::string error;               // why the bench stopped early ("" = it did not)
};

absl::StatusOr<CoordinatorBenchResult> RunCoordinatorBench(const CoordinatorBenchOptions& options);

// One JSON line per round: {"bench":"coordinator","round":..,"agents":..,"params":..,
// "round_wall_s":..,"collect_s":..,"aggregate_s":..,"update_bytes":..,
// "aggregation_bytes_per_s":..,"updates_accepted":..}
std::string CoordinatorBenchRoundJson(const CoordinatorBenchResult& result,
                                      const CoordinatorBenchRound& round);
// The summary line: {"bench":"coordinator","summary":true,"agents":..,"params":..,
// "rank":..,"tensors":..,"secure_aggregation":"off","rounds":..,"rounds_completed":..,
// "max_concurrent_uploads":..,"worker_threads":..,"client_uploads":..,
// "update_bytes_each":..,"round_wall_s_mean":..,"aggregation_bytes_per_s":..,
// "coordinator_peak_rss_bytes":..,"coordinator_start_rss_bytes":..,
// "bench_peak_rss_bytes":..,"uploads_in_flight_peak":..,"uploads_waiting_peak":..,
// "updates_expected":..,"updates_accepted":..,"updates_rejected":..,"updates_lost":..,
// "setup_s":..,"connect_s":..,"coordinator_exit_code":..,"error":".."}
// aggregation_bytes_per_s = update bytes of the completed rounds / their aggregate
// phase seconds (null when no time was measured).
std::string CoordinatorBenchSummaryJson(const CoordinatorBenchResult& result);

}  // namespace fedlora::sim
