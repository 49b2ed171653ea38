#include "coordinator/upload_limiter.h"

#include <algorithm>

namespace fedlora::coordinator {
namespace {

constexpr char kMetricInFlight[] = "fedlora_uploads_in_flight";
constexpr char kHelpInFlight[] =
    "SubmitUpdate uploads holding a slot (payload being read, verified or stored)";
constexpr char kMetricPeak[] = "fedlora_uploads_in_flight_peak";
constexpr char kHelpPeak[] = "Highest fedlora_uploads_in_flight since the coordinator started";
constexpr char kMetricWaitingPeak[] = "fedlora_uploads_waiting_peak";
constexpr char kHelpWaitingPeak[] = "Highest fedlora_uploads_waiting since the coordinator started";
constexpr char kMetricWaiting[] = "fedlora_uploads_waiting";
constexpr char kHelpWaiting[] =
    "SubmitUpdate uploads waiting for a slot (max_concurrent_uploads); their bytes stay in the "
    "client";

}  // namespace

UploadLimiter::UploadLimiter(size_t max_in_flight, MetricsRegistry* metrics)
    : max_in_flight_(std::max<size_t>(1, max_in_flight)), metrics_(metrics) {
  std::lock_guard<std::mutex> lock(mu_);
  PublishLocked();
}

uint64_t UploadLimiter::Acquire(std::function<void()> granted) {
  uint64_t ticket;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ticket = next_ticket_++;
    if (in_flight_ >= max_in_flight_) {
      waiters_.emplace_back(ticket, std::move(granted));
      peak_waiting_ = std::max(peak_waiting_, waiters_.size());
      PublishLocked();
      return ticket;
    }
    ++in_flight_;
    peak_in_flight_ = std::max(peak_in_flight_, in_flight_);
    PublishLocked();
  }
  granted();
  return ticket;
}

bool UploadLimiter::Cancel(uint64_t ticket) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = waiters_.begin(); it != waiters_.end(); ++it) {
    if (it->first == ticket) {
      waiters_.erase(it);
      PublishLocked();
      return true;
    }
  }
  return false;
}

void UploadLimiter::Release() {
  std::function<void()> next;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (in_flight_ > 0) --in_flight_;
    if (!waiters_.empty() && in_flight_ < max_in_flight_) {
      next = std::move(waiters_.front().second);
      waiters_.pop_front();
      ++in_flight_;
      peak_in_flight_ = std::max(peak_in_flight_, in_flight_);
    }
    PublishLocked();
  }
  if (next) next();
}

size_t UploadLimiter::in_flight() const {
  std::lock_guard<std::mutex> lock(mu_);
  return in_flight_;
}

size_t UploadLimiter::waiting() const {
  std::lock_guard<std::mutex> lock(mu_);
  return waiters_.size();
}

size_t UploadLimiter::peak_in_flight() const {
  std::lock_guard<std::mutex> lock(mu_);
  return peak_in_flight_;
}

size_t UploadLimiter::peak_waiting() const {
  std::lock_guard<std::mutex> lock(mu_);
  return peak_waiting_;
}

void UploadLimiter::PublishLocked() {
  if (metrics_ == nullptr) return;
  metrics_->SetGauge(kMetricInFlight, kHelpInFlight, static_cast<double>(in_flight_));
  metrics_->SetGauge(kMetricPeak, kHelpPeak, static_cast<double>(peak_in_flight_));
  metrics_->SetGauge(kMetricWaiting, kHelpWaiting, static_cast<double>(waiters_.size()));
  metrics_->SetGauge(kMetricWaitingPeak, kHelpWaitingPeak, static_cast<double>(peak_waiting_));
}

}  // namespace fedlora::coordinator
