#pragma once
// A coordinator-wide bound on SubmitUpdate uploads in flight (config
// max_concurrent_uploads; docs/operations.md, "Upload bound").
//
// An upload holds a slot from before its first chunk is read until its reactor is
// done, i.e. for as long as the coordinator may hold its payload (reading,
// verifying, opening, storing). An upload without a slot waits in FIFO order with
// no read issued, so gRPC's HTTP/2 flow control keeps its bytes in the client:
// coordinator memory for payloads is O(max_in_flight x payload), never
// O(agents x payload). No polling: a released slot is handed to the oldest waiter.
//
//   uint64_t ticket = limiter.Acquire([this] { StartRead(&chunk_); });
//   ... on cancellation while waiting: if (limiter.Cancel(ticket)) Finish(CANCELLED);
//   ... when done with the payload:    limiter.Release();
//
// Acquire runs `granted` at once (on the caller's thread) when a slot is free,
// else later on the thread that calls Release. `granted` runs without the
// limiter's lock held and must not block. Cancel(ticket) removes a waiter and
// returns true (its `granted` never runs and it holds no slot); false when the
// ticket was already granted (the holder must Release) or is unknown. Every
// granted ticket must be Released exactly once.
//
// Metrics (when `metrics` is set): gauges fedlora_uploads_in_flight,
// fedlora_uploads_waiting, and their high-water marks fedlora_uploads_in_flight_peak
// and fedlora_uploads_waiting_peak.
// Safe for concurrent use.

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <utility>

#include "coordinator/metrics.h"

namespace fedlora::coordinator {

class UploadLimiter {
 public:
  // `max_in_flight` >= 1 (0 is treated as 1). `metrics` may be null; it must
  // outlive the limiter.
  explicit UploadLimiter(size_t max_in_flight, MetricsRegistry* metrics = nullptr);
  UploadLimiter(const UploadLimiter&) = delete;
  UploadLimiter& operator=(const UploadLimiter&) = delete;

  uint64_t Acquire(std::function<void()> granted);
  bool Cancel(uint64_t ticket);
  void Release();

  size_t max_in_flight() const { return max_in_flight_; }
  size_t in_flight() const;
  size_t waiting() const;
  size_t peak_in_flight() const;  // highest in_flight() so far
  size_t peak_waiting() const;    // highest waiting() so far

 private:
  void PublishLocked();  // requires mu_

  const size_t max_in_flight_;
  MetricsRegistry* const metrics_;
  mutable std::mutex mu_;
  size_t in_flight_ = 0;
  size_t peak_in_flight_ = 0;
  size_t peak_waiting_ = 0;
  uint64_t next_ticket_ = 1;
  std::deque<std::pair<uint64_t, std::function<void()>>> waiters_;
};

}  // namespace fedlora::coordinator
