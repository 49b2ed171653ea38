#include "simulations/bench_train.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>

#include "edge-agent/gemm.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace fedlora::sim {
namespace {

TrainBenchOptions SmallRun() {
  TrainBenchOptions o;
  o.preset = "tiny";
  o.seq = 32;
  o.batch = 1;
  o.threads = 1;
  o.steps = 2;
  return o;
}

TEST(BenchTrainTest, TinyRunPrintsPositiveFiniteFigures) {
  auto result = RunTrainBench(SmallRun());
  ASSERT_TRUE(result.ok()) << result.status();
  const nlohmann::json j = nlohmann::json::parse(TrainBenchJson(*result));
  EXPECT_EQ(j.at("bench"), "train");
  EXPECT_EQ(j.at("preset"), "tiny");
  EXPECT_EQ(j.at("seq"), 32);
  EXPECT_EQ(j.at("batch"), 1);
  EXPECT_EQ(j.at("threads"), 1);
  EXPECT_EQ(j.at("steps"), 2);
  EXPECT_EQ(j.at("base_dtype"), "auto");
  for (const char* key : {"tokens_per_s", "peak_rss_mb", "step_ms_mean", "step_ms_min", "last_loss"}) {
    ASSERT_TRUE(j.contains(key)) << key;
    const double v = j.at(key).get<double>();
    EXPECT_TRUE(std::isfinite(v)) << key;
    EXPECT_GT(v, 0) << key;
  }
  // The floor before main(), the load and the steps are nested peaks.
  const double startup = j.at("startup_rss_mb").get<double>();
  EXPECT_GT(startup, 0);
  EXPECT_LE(startup, j.at("load_peak_rss_mb").get<double>());
  EXPECT_LE(j.at("load_peak_rss_mb").get<double>(), j.at("peak_rss_mb").get<double>());
  EXPECT_THAT(j.at("malloc").get<std::string>(), ::testing::AnyOf("glibc", "tcmalloc"));
  EXPECT_LE(j.at("step_ms_min").get<double>(), j.at("step_ms_mean").get<double>());
  EXPECT_EQ(j.at("attention_threads"), 1);  // threads = 1
  EXPECT_FALSE(j.at("cpu").get<std::string>().empty());
  // tiny preset, LoRA r=8 on 7 projections of 4 layers:
  // per layer r*(in+out) summed over q(256,256) k(256,128) v(256,128) o(256,256)
  // gate(256,688) up(256,688) down(688,256).
  const int64_t per_layer = 8 * ((256 + 256) + (256 + 128) * 2 + (256 + 256) + (256 + 688) * 3);
  EXPECT_EQ(j.at("trainable_params").get<int64_t>(), 4 * per_layer);
  // Random-label cross-entropy starts near ln(vocab).
  EXPECT_NEAR(j.at("last_loss").get<double>(), std::log(4096.0), 1.0);
}

TEST(BenchTrainTest, Int8BaseRuns) {
  TrainBenchOptions o = SmallRun();
  o.base_dtype = "int8";
  o.steps = 1;
  auto result = RunTrainBench(o);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_GT(result->tokens_per_s, 0);
  EXPECT_EQ(result->options.base_dtype, "int8");
}

TEST(BenchTrainTest, Int4BaseWithGradCheckpointRuns) {
  TrainBenchOptions o = SmallRun();
  o.base_dtype = "int4";
  o.grad_checkpoint = true;
  o.steps = 1;
  auto result = RunTrainBench(o);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_NEAR(result->last_loss, std::log(4096.0), 1.0);
  const nlohmann::json j = nlohmann::json::parse(TrainBenchJson(*result));
  EXPECT_EQ(j.at("base_dtype"), "int4");
  EXPECT_EQ(j.at("grad_checkpoint"), true);
}

TEST(BenchTrainTest, Bf16AutocastRuns) {
  TrainBenchOptions o = SmallRun();
  o.bf16 = true;
  o.steps = 1;
  auto result = RunTrainBench(o);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(std::isfinite(result->last_loss));
  EXPECT_NEAR(result->last_loss, std::log(4096.0), 1.0);
  EXPECT_NE(TrainBenchJson(*result).find("\"bf16\":true"), std::string::npos);
}

// Under --bf16 the default base ("auto": projections stored in bf16) and an
// explicit fp32 base (cast at every product) compute the same products.
TEST(BenchTrainTest, AutoAndFp32BasesTrainTheSameUnderBf16) {
  TrainBenchOptions o = SmallRun();
  o.bf16 = true;
  auto automatic = RunTrainBench(o);
  o.base_dtype = "fp32";
  auto fp32 = RunTrainBench(o);
  ASSERT_TRUE(automatic.ok()) << automatic.status();
  ASSERT_TRUE(fp32.ok()) << fp32.status();
  EXPECT_EQ(automatic->last_loss, fp32->last_loss);
  EXPECT_EQ(automatic->options.base_dtype, "auto");
}

TEST(BenchTrainTest, FusedAndPlainAttentionTrainTheSame) {
  TrainBenchOptions o = SmallRun();
  auto fused = RunTrainBench(o);
  o.attention = "plain";
  auto plain = RunTrainBench(o);
  ASSERT_TRUE(fused.ok()) << fused.status();
  ASSERT_TRUE(plain.ok()) << plain.status();
  // Same seeds, same data: the two attention paths give the same loss after the steps.
  EXPECT_NEAR(fused->last_loss, plain->last_loss, 1e-4);
  EXPECT_NE(TrainBenchJson(*plain).find("\"attention\":\"plain\""), std::string::npos);
  EXPECT_EQ(plain->attention_threads, 0);
  EXPECT_EQ(fused->attention_threads, 1);
}

TEST(BenchTrainTest, BadOptionsAreRejectedWithTheField) {
  TrainBenchOptions o = SmallRun();
  o.preset = "huge";
  auto r = RunTrainBench(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("--preset"), std::string::npos) << r.status();
  o = SmallRun();
  o.seq = 0;
  r = RunTrainBench(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("--seq"), std::string::npos) << r.status();
  o = SmallRun();
  o.base_dtype = "fp8";
  r = RunTrainBench(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("--base-dtype"), std::string::npos) << r.status();
  o = SmallRun();
  o.attention = "flash";
  r = RunTrainBench(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("--attention"), std::string::npos) << r.status();
  o = SmallRun();
  o.gemm = "mkl";
  r = RunTrainBench(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("--gemm"), std::string::npos) << r.status();
}

TEST(BenchTrainTest, ProfileWritesAChromeTraceOfTheEngineNodes) {
  TrainBenchOptions o = SmallRun();
  o.profile = (std::filesystem::path(::testing::TempDir()) / "bench_train_profile.json").string();
  std::filesystem::remove(o.profile);
  auto r = RunTrainBench(o);
  ASSERT_TRUE(r.ok()) << r.status();
  std::ifstream in(o.profile);
  ASSERT_TRUE(in.good()) << o.profile;
  const nlohmann::json trace = nlohmann::json::parse(in);
  ASSERT_TRUE(trace.is_array());
  bool attention = false, projection = false;
  for (const auto& e : trace) {
    const std::string name = e.value("name", "");
    attention |= name.find("FusedAttentionFn") != std::string::npos;
    projection |= name.find("AdaptedProjectionsFn") != std::string::npos;
  }
  EXPECT_TRUE(attention && projection) << "the backward nodes of the engine are in the trace";
  std::filesystem::remove(o.profile);

  o.profile = "/nonexistent-dir/trace.json";
  r = RunTrainBench(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("--profile"), std::string::npos) << r.status();
}

TEST(BenchTrainTest, OneDnnAndTorchGemmsTrainTheSame) {
  TrainBenchOptions o = SmallRun();
  const int64_t before = edge::OnednnGemmCount();
  auto onednn = RunTrainBench(o);
  const int64_t onednn_calls = edge::OnednnGemmCount() - before;
  o.gemm = "torch";
  auto torch_gemm = RunTrainBench(o);
  ASSERT_TRUE(onednn.ok()) << onednn.status();
  ASSERT_TRUE(torch_gemm.ok()) << torch_gemm.status();
  EXPECT_GT(onednn_calls, 0);
  EXPECT_EQ(edge::OnednnGemmCount() - before, onednn_calls);  // none under --gemm torch
  EXPECT_NEAR(onednn->last_loss, torch_gemm->last_loss, 1e-4);
  EXPECT_NE(TrainBenchJson(*torch_gemm).find("\"gemm\":\"torch\""), std::string::npos);
  EXPECT_EQ(edge::gemm_backend(), edge::GemmBackend::kOnednn);  // restored after the run
}

}  // namespace
}  // namespace fedlora::sim
