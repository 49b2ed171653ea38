// fedlora-sim's command line, run as a separate process (FEDLORA_BIN_DIR).

#include <stdlib.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>

#include "common/crypto/crypto.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/test_util.h"

namespace fedlora::sim {
namespace {

using Result = ::fedlora::testutil::CommandResult;

Result RunSim(const std::string& args) {
  return ::fedlora::testutil::RunBinary("fedlora-sim", args);
}

class SimCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/fedlora_sim_cli_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_F(SimCliTest, MakeDataWritesEverySite) {
  Result r = RunSim("make-data --out " + dir_ + "/d --sites 2 --examples 12 --heldout 3 --seed 4");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (int site = 0; site < 2; ++site) {
    auto text = common::ReadFileToString(dir_ + "/d/site-" + std::to_string(site) + "/train.jsonl");
    ASSERT_TRUE(text.ok());
    EXPECT_EQ(std::count(text->begin(), text->end(), '\n'), 12);
    auto held = common::ReadFileToString(dir_ + "/d/site-" + std::to_string(site) + "/heldout.jsonl");
    ASSERT_TRUE(held.ok());
    EXPECT_EQ(std::count(held->begin(), held->end(), '\n'), 3);
  }
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/d/site-2"));
}

TEST_F(SimCliTest, BenchTrainRunsOnTcmalloc) {
  // The program links tcmalloc (CMakeLists.txt: fedlora_use_tcmalloc); the
  // bench reports the malloc that actually served it.
  Result r = RunSim("bench train --preset tiny --seq 16 --batch 1 --threads 1 --steps 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const size_t at = r.output.find("{\"bench\"");
  ASSERT_NE(at, std::string::npos) << r.output;
  const nlohmann::json j = nlohmann::json::parse(r.output.substr(at, r.output.find('\n', at) - at));
  EXPECT_EQ(j.at("malloc"), "tcmalloc");
  EXPECT_GT(j.at("startup_rss_mb").get<double>(), 0);
}

TEST_F(SimCliTest, MakeModelHonoursSizeFlags) {
  Result r = RunSim("make-model --out " + dir_ + "/m --hidden 32 --intermediate 64 --layers 1 "
                    "--heads 2 --kv-heads 1 --head-dim 16 --vocab 300 --corpus-examples 20");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto text = common::ReadFileToString(dir_ + "/m/config.json");
  ASSERT_TRUE(text.ok());
  auto config = nlohmann::json::parse(*text);
  EXPECT_EQ(config["hidden_size"], 32);
  EXPECT_EQ(config["num_hidden_layers"], 1);
  EXPECT_EQ(config["num_key_value_heads"], 1);
  EXPECT_TRUE(std::filesystem::exists(dir_ + "/m/model.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(dir_ + "/m/tokenizer.json"));
}

TEST_F(SimCliTest, BadFlagsFailWithAMessage) {
  Result missing = RunSim("make-data --sites 2");
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_THAT(missing.output, ::testing::HasSubstr("--out"));
  Result heads = RunSim("make-model --out " + dir_ + "/bad --heads 3 --kv-heads 2");
  EXPECT_EQ(heads.exit_code, 1) << heads.output;
  EXPECT_THAT(heads.output, ::testing::HasSubstr("num_kv_heads"));
  Result help = RunSim("--help");
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_THAT(help.output, ::testing::HasSubstr("make-model"));
  EXPECT_THAT(help.output, ::testing::HasSubstr("make-data"));
}

}  // namespace
}  // namespace fedlora::sim
