#pragma once
// Small helpers shared by the benchmark programs (bench_secagg, bench_coordinator,
// bench_train): wall-clock seconds between two steady_clock points, a fast, seedable
// generator for synthetic update values (SplitMix64; not for cryptography), and the
// CPU's model name for the JSON lines (figures only compare on the same chip).

#include <chrono>
#include <cstdint>
#include <fstream>
#include <string>

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

// The first "model name" of /proc/cpuinfo ("AMD EPYC 9R14 ..."), or "unknown".
inline std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("model name", 0) != 0) continue;
    const size_t colon = line.find(':');
    if (colon == std::string::npos) break;
    const size_t start = line.find_first_not_of(" \t", colon + 1);
    if (start != std::string::npos) return line.substr(start);
    break;
  }
  return "unknown";
}

}  // namespace fedlora::sim::bench
