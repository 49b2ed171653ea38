// Fuzz-style robustness tests for the safetensors reader (no libFuzzer
// needed): seeded random mutations of a valid file aimed at what a parser
// trusts — the 8-byte header length, the digits of shapes and data_offsets,
// dtype names, JSON structure — plus truncations and random bytes. Parsing
// must never crash (ASan builds make any out-of-range read fatal); a rejection
// must be InvalidArgument naming the source; whatever is accepted must be
// self-consistent: every tensor's byte size is numel x dtype size, its bytes
// are readable, float tensors convert, and re-serializing gives the same values.

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "common/tensor/tensor.h"

namespace fedlora::common {
namespace {

std::string ValidFile() {
  TensorMap m;
  m["model.layers.0.self_attn.q_proj.weight"] = HostTensor{{2, 3}, {1.f, -2.f, 3.5f, 0.f, 1e-3f, -7.25f}};
  m["model.norm.weight"] = HostTensor{{4}, {0.5f, 0.25f, -0.125f, 9.f}};
  m["scalar"] = HostTensor{{}, {42.f}};
  m["empty"] = HostTensor{{0, 4}, {}};
  return SerializeSafetensors(m, {{"format", "pt"}, {"round", "7"}}, DType::kF32);
}

uint64_t HeaderLength(const std::string& file) {
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(file[i])) << (8 * i);
  return n;
}

std::string Mutate(const std::string& good, std::mt19937* rng) {
  std::string s = good;
  const uint64_t header_end = 8 + HeaderLength(good);
  const int edits = 1 + static_cast<int>((*rng)() % 3);
  for (int e = 0; e < edits && !s.empty(); ++e) {
    const size_t header_size = std::min<size_t>(header_end, s.size());
    switch ((*rng)() % 8) {
      case 0:  // flip a bit anywhere
        s[(*rng)() % s.size()] ^= static_cast<char>(1u << ((*rng)() % 8));
        break;
      case 1: {  // the header length: small delta, or any value
        if (s.size() < 8) break;
        uint64_t n = HeaderLength(s);
        n = (*rng)() % 2 == 0 ? n + static_cast<int64_t>((*rng)() % 17) - 8
                              : (static_cast<uint64_t>((*rng)()) << 32) | (*rng)();
        for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
        break;
      }
      case 2: {  // a digit in the JSON header (shapes, data_offsets)
        std::vector<size_t> digits;
        for (size_t i = 8; i < header_size; ++i) {
          if (s[i] >= '0' && s[i] <= '9') digits.push_back(i);
        }
        if (digits.empty()) break;
        const size_t at = digits[(*rng)() % digits.size()];
        const char* kRepl[] = {"0", "9", "18446744073709551615", "-1", "4294967296", "1e3", ""};
        s.replace(at, 1, kRepl[(*rng)() % 7]);
        break;
      }
      case 3: {  // a dtype name
        const size_t at = s.find("\"F32\"", 8);
        if (at == std::string::npos || at > header_size) break;
        const char* kTypes[] = {"\"F16\"", "\"BF16\"", "\"F64\"", "\"I64\"", "\"BOOL\"",
                                "\"U8\"",  "\"Q4\"",   "\"f32\"", "3",       "null"};
        s.replace(at, 5, kTypes[(*rng)() % 10]);
        break;
      }
      case 4: {  // a structural JSON character removed or duplicated
        std::vector<size_t> punct;
        for (size_t i = 8; i < header_size; ++i) {
          if (std::strchr("{}[],:\"", s[i]) != nullptr) punct.push_back(i);
        }
        if (punct.empty()) break;
        const size_t at = punct[(*rng)() % punct.size()];
        if ((*rng)() % 2 == 0) {
          s.erase(at, 1);
        } else {
          s.insert(at, 1, s[at]);
        }
        break;
      }
      case 5:  // truncate
        s.resize((*rng)() % s.size());
        break;
      case 6:  // append junk
        for (int i = 0, n = 1 + static_cast<int>((*rng)() % 16); i < n; ++i) {
          s.push_back(static_cast<char>((*rng)() & 0xff));
        }
        break;
      case 7: {  // overwrite a run of bytes in the data section
        if (s.size() <= header_size) break;
        const size_t at = header_size + (*rng)() % (s.size() - header_size);
        for (size_t i = at; i < s.size() && i < at + 8; ++i) s[i] = static_cast<char>((*rng)());
        break;
      }
    }
  }
  return s;
}

void CheckConsistent(const SafetensorsFile& f) {
  TensorMap floats;
  for (const TensorView& v : f.tensors()) {
    ASSERT_GE(v.numel(), 0) << v.name;
    ASSERT_EQ(v.nbytes, static_cast<size_t>(v.numel()) * DTypeSize(v.dtype)) << v.name;
    // Touch every byte (an out-of-range view would fault under ASan).
    uint64_t sum = 0;
    for (size_t i = 0; i < v.nbytes; ++i) sum += v.data[i];
    (void)sum;
    auto host = v.ToHost();
    if (v.dtype == DType::kF32 || v.dtype == DType::kF16 || v.dtype == DType::kBF16 ||
        v.dtype == DType::kF64) {
      ASSERT_TRUE(host.ok()) << v.name << ": " << host.status();
      ASSERT_EQ(static_cast<int64_t>(host->data.size()), v.numel());
      floats[v.name] = std::move(*host);
    } else {
      ASSERT_FALSE(host.ok()) << v.name;
      ASSERT_EQ(host.status().code(), absl::StatusCode::kInvalidArgument);
    }
  }
  // What was accepted re-serializes to a file with the same values.
  auto again = SafetensorsFile::FromBytes(SerializeSafetensors(floats, f.metadata()), "again");
  ASSERT_TRUE(again.ok()) << again.status();
  auto back = (*again)->ToTensorMap();
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->size(), floats.size());
  for (const auto& [name, t] : floats) {
    const HostTensor& b = back->at(name);
    ASSERT_EQ(b.shape, t.shape) << name;
    ASSERT_EQ(b.data.size(), t.data.size()) << name;
    for (size_t i = 0; i < t.data.size(); ++i) {
      // NaN payloads need not survive; everything else does, bit for bit.
      if (std::isnan(t.data[i])) {
        ASSERT_TRUE(std::isnan(b.data[i])) << name;
      } else {
        ASSERT_EQ(b.data[i], t.data[i]) << name << "[" << i << "]";
      }
    }
  }
  ASSERT_EQ((*again)->metadata(), f.metadata());
}

void Fuzz(const std::string& good, uint32_t seed, int iterations, int* accepted) {
  ASSERT_TRUE(SafetensorsFile::FromBytes(good, "valid").ok());
  std::mt19937 rng(seed);
  for (int i = 0; i < iterations; ++i) {
    const std::string bad = Mutate(good, &rng);
    auto f = SafetensorsFile::FromBytes(bad, "fuzz.safetensors");
    if (f.ok()) {
      ++*accepted;
      CheckConsistent(**f);
      if (::testing::Test::HasFatalFailure()) FAIL() << "seed " << seed << " iteration " << i;
    } else {
      ASSERT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << i << f.status();
      ASSERT_NE(f.status().message().find("fuzz.safetensors"), std::string::npos) << f.status();
    }
  }
}

TEST(SafetensorsFuzz, MutatedF32FilesNeverCrash) {
  int accepted = 0;
  const int kIterations = 15000;
  ASSERT_NO_FATAL_FAILURE(Fuzz(ValidFile(), 21, kIterations, &accepted));
  // Data edits are accepted; most structural edits are not.
  EXPECT_GT(accepted, 0);
  EXPECT_LT(accepted, kIterations);
}

TEST(SafetensorsFuzz, MutatedHalfPrecisionFilesNeverCrash) {
  auto valid = SafetensorsFile::FromBytes(ValidFile(), "valid");
  ASSERT_TRUE(valid.ok());
  auto m = (*valid)->ToTensorMap();
  ASSERT_TRUE(m.ok());
  int accepted = 0;
  for (DType d : {DType::kBF16, DType::kF16}) {
    ASSERT_NO_FATAL_FAILURE(Fuzz(SerializeSafetensors(*m, {}, d), 22, 4000, &accepted));
  }
  EXPECT_GT(accepted, 0);
}

TEST(SafetensorsFuzz, RandomBytesWithAPlausibleHeaderLengthNeverCrash) {
  std::mt19937 rng(23);
  for (int i = 0; i < 5000; ++i) {
    std::string junk(rng() % 256, '\0');
    for (char& c : junk) c = static_cast<char>(rng() & 0xff);
    if (junk.size() >= 8) {
      const uint64_t n = rng() % (junk.size() - 7);
      for (int k = 0; k < 8; ++k) junk[k] = static_cast<char>((n >> (8 * k)) & 0xff);
      if (junk.size() > 8 && rng() % 2 == 0) junk[8] = '{';
    }
    auto f = SafetensorsFile::FromBytes(junk, "junk");
    if (f.ok()) {
      CheckConsistent(**f);
      if (::testing::Test::HasFatalFailure()) FAIL() << "iteration " << i;
    }
  }
}

// The memory-mapped path (Open) applies the same checks as FromBytes, and
// files that cannot be mapped as safetensors are clean errors naming the path.
TEST(SafetensorsFuzz, OpenedMutatedFilesNeverCrash) {
  char tmpl[] = "/tmp/safetensors_fuzz_XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  const std::string path = dir + "/m.safetensors";
  const std::string good = ValidFile();
  std::mt19937 rng(24);
  for (int i = 0; i < 200; ++i) {
    const std::string bad = i == 0 ? std::string() : Mutate(good, &rng);
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out << bad;
    }
    auto f = SafetensorsFile::Open(path);
    auto mem = SafetensorsFile::FromBytes(bad, path);
    ASSERT_EQ(f.ok(), mem.ok()) << i << ": " << f.status() << " vs " << mem.status();
    if (f.ok()) {
      CheckConsistent(**f);
      if (::testing::Test::HasFatalFailure()) FAIL() << "iteration " << i;
    } else {
      EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << f.status();
      EXPECT_NE(f.status().message().find(path), std::string::npos) << f.status();
    }
  }
  auto d = SafetensorsFile::Open(dir);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << d.status();
  EXPECT_NE(d.status().message().find("directory"), std::string::npos) << d.status();
  EXPECT_FALSE(SafetensorsFile::Open(dir + "/missing.safetensors").ok());
  unlink(path.c_str());
  rmdir(dir.c_str());
}

}  // namespace
}  // namespace fedlora::common
