#pragma once
// Wall clock behind an interface, so that deadlines are testable without sleeping.
// Both implementations are safe for concurrent use.

#include <atomic>
#include <chrono>
#include <cstdint>

namespace fedlora::coordinator {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual uint64_t NowUnixMs() const = 0;
};

class SystemClock final : public Clock {
 public:
  uint64_t NowUnixMs() const override {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                     std::chrono::system_clock::now().time_since_epoch())
                                     .count());
  }
  static const SystemClock* Get() {
    static const SystemClock* clock = new SystemClock();
    return clock;
  }
};

// Time moves only when the test says so.
class FakeClock final : public Clock {
 public:
  explicit FakeClock(uint64_t start_unix_ms = 1700000000000ull) : now_(start_unix_ms) {}
  uint64_t NowUnixMs() const override { return now_.load(); }
  void Advance(uint64_t ms) { now_ += ms; }
  void Set(uint64_t unix_ms) { now_ = unix_ms; }

 private:
  std::atomic<uint64_t> now_;
};

}  // namespace fedlora::coordinator
