// bench gemm: runs both backends on a preset's products and reports them.
#include "simulations/bench_gemm.h"

#include <set>
#include <string>

#include "edge-agent/gemm.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace fedlora::sim {
namespace {

TEST(BenchGemmTest, ReportsEveryProductOfThePresetWithBothBackends) {
  GemmBenchOptions o;
  o.preset = "tiny";
  o.seq = 16;
  o.batch = 2;
  o.repeats = 2;
  const int64_t before = edge::OnednnGemmCount();
  auto r = RunGemmBench(o);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 10u);  // 5 shapes x (nt, nn)
  EXPECT_GT(edge::OnednnGemmCount(), before);
  EXPECT_EQ(edge::gemm_backend(), edge::GemmBackend::kOnednn);  // restored
  std::set<std::string> seen;
  for (const auto& x : *r) {
    EXPECT_EQ(x.m, 32);
    EXPECT_GT(x.onednn_gflops, 0);
    EXPECT_GT(x.torch_gflops, 0);
    EXPECT_LT(x.max_abs_diff, 1e-3);  // the two backends agree
    EXPECT_GT(x.onednn_bf16_gflops, 0);
    EXPECT_GT(x.torch_autocast_gflops, 0);
    seen.insert(x.what + "/" + x.op);
    auto j = nlohmann::json::parse(GemmBenchJson(o, x));
    EXPECT_EQ(j["bench"], "gemm");
    EXPECT_EQ(j["preset"], "tiny");
    EXPECT_TRUE(j.contains("onednn_bf16_gflops"));
    EXPECT_TRUE(j.contains("torch_autocast_gflops"));
  }
  EXPECT_EQ(seen.size(), 10u);
  // The head's forward is [32, 256] x [256, 4096]; its input gradient the reverse.
  const auto& head_nt = (*r)[8];
  EXPECT_EQ(head_nt.what, "lm_head");
  EXPECT_EQ(head_nt.k, 256);
  EXPECT_EQ(head_nt.n, 4096);
  EXPECT_EQ((*r)[9].k, 4096);
  EXPECT_EQ((*r)[9].n, 256);
}

TEST(BenchGemmTest, BadOptionsNameTheFlag) {
  GemmBenchOptions o;
  o.repeats = 0;
  auto r = RunGemmBench(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("--repeats"), std::string::npos) << r.status();
  o = GemmBenchOptions();
  o.preset = "huge";
  r = RunGemmBench(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("--preset"), std::string::npos) << r.status();
}

}  // namespace
}  // namespace fedlora::sim
