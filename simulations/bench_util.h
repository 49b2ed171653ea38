#pragma once
// Small helpers shared by the benchmark programs (bench_secagg, bench_coordinator):
// wall-clock seconds between two steady_clock points, and a fast, seedable generator
// for synthetic update values (SplitMix64; not for cryptography).

#include <chrono>
#include <cstdint>

namespace fedlora::sim::bench {

using Clock = std::chrono::steady_clock;

inline double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// The next SplitMix64 output; advances `s`.
inline uint64_t SplitMix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Uniform in [0, 1) from the top 53 bits of the next output.
inline double UniformUnit(uint64_t& s) { return static_cast<double>(SplitMix(s) >> 11) * 0x1.0p-53; }

}  // namespace fedlora::sim::bench
