// The lean libtorch (CMakeLists.txt, scripts/lean-libtorch.sh): programs and
// tests that link libtorch load empty stand-ins for the OpenCV, FFmpeg, LevelDB,
// LMDB and ZeroMQ libraries Debian's libtorch_cpu names but never calls, and
// libtorch works on them. FEDLORA_LEAN_SONAMES lists the stand-ins the build
// wrote ("" when FEDLORA_LEAN_LIBTORCH is OFF or the script kept every library).

#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

#ifndef FEDLORA_LEAN_SONAMES
#define FEDLORA_LEAN_SONAMES ""
#endif

namespace fedlora::edge {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::vector<std::string> LeanSonames() {
  std::vector<std::string> out;
  std::stringstream in(FEDLORA_LEAN_SONAMES);
  std::string s;
  while (std::getline(in, s, ',')) {
    if (!s.empty()) out.push_back(s);
  }
  return out;
}

// Paths of the files this process has mapped.
std::set<std::string> MappedFiles() {
  std::set<std::string> out;
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    const auto slash = line.find('/');
    if (slash != std::string::npos) out.insert(line.substr(slash));
  }
  return out;
}

std::string Basename(const std::string& p) { return p.substr(p.rfind('/') + 1); }

constexpr const char* kLeanDir = "/lib/fedlora-lean/";

TEST(LeanLibtorchTest, StandInsAreWhatIsMapped) {
  const auto sonames = LeanSonames();
  const auto mapped = MappedFiles();
  if (sonames.empty()) {
    // Built without the lean libtorch: nothing comes from a stand-in directory.
    for (const auto& p : mapped) EXPECT_THAT(p, Not(HasSubstr(kLeanDir)));
    return;
  }
  for (const auto& so : sonames) {
    int found = 0;
    for (const auto& p : mapped) {
      if (Basename(p) != so) continue;
      ++found;
      EXPECT_THAT(p, HasSubstr(kLeanDir)) << so << " loaded from the system";
    }
    EXPECT_EQ(found, 1) << so << " mapped " << found << " times";
  }
  // Nor is anything that only the real OpenCV/FFmpeg would have pulled in.
  for (const auto& p : mapped) {
    const std::string name = Basename(p);
    for (const char* heavy : {"libQt5", "libgdal", "libgdcm", "libpoppler", "libx264"}) {
      EXPECT_EQ(name.rfind(heavy, 0), std::string::npos) << p << " is loaded";
    }
  }
}

TEST(LeanLibtorchTest, TorchRunsOnTheStandIns) {
  torch::manual_seed(3);
  const auto a = torch::randn({64, 32}, torch::requires_grad());
  const auto b = torch::randn({32, 16});
  const auto loss = torch::matmul(a, b).square().sum();
  loss.backward();
  // d/da sum((ab)^2) = 2 (ab) b^T
  const auto want = 2 * torch::matmul(torch::matmul(a, b), b.t());
  EXPECT_TRUE(torch::allclose(a.grad(), want.detach(), 1e-4, 1e-4));
  // bf16 goes through oneDNN, which is linked the ordinary way.
  const auto h = torch::matmul(a.detach().to(torch::kBFloat16), b.to(torch::kBFloat16));
  EXPECT_TRUE(torch::allclose(h.to(torch::kFloat), torch::matmul(a.detach(), b), 0.1, 0.5));
}

TEST(LeanLibtorchTest, ProgramsResolveTheStandIns) {
  const auto sonames = LeanSonames();
  for (const char* prog : {"fedlora-agent", "fedlora-sim"}) {
    const std::string bin = std::string(FEDLORA_BIN_DIR) + "/" + prog;
    // What the dynamic linker would load, without running the program (as ldd).
    FILE* p = ::popen(("LD_TRACE_LOADED_OBJECTS=1 " + bin + " 2>&1").c_str(), "r");
    ASSERT_NE(p, nullptr);
    std::string out;
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
    ASSERT_EQ(::pclose(p), 0) << prog << ":\n" << out;
    EXPECT_THAT(out, HasSubstr("libtorch_cpu")) << prog;
    EXPECT_THAT(out, Not(HasSubstr("not found"))) << prog;
    for (const auto& so : sonames) {
      EXPECT_THAT(out, HasSubstr(so + " => " + FEDLORA_BIN_DIR + "/.." + kLeanDir + so))
          << prog << ":\n" << out;
    }
    if (!sonames.empty()) {
      EXPECT_THAT(out, Not(HasSubstr("libQt5"))) << prog;
    }
  }
}

}  // namespace
}  // namespace fedlora::edge
