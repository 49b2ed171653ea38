#include "edge-agent/model_cli.h"

#include <sstream>
#include <string>

#include "common/crypto/crypto.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace fedlora::edge {
namespace {

using ::testing::HasSubstr;

std::string FixtureDir(const std::string& model) {
  return std::string(FEDLORA_FIXTURES) + "/hf/" + model;
}

struct CliResult {
  int code;
  std::string out, err;
};

CliResult Cli(const std::vector<std::string>& args) {
  std::ostringstream out, err;
  const int code = RunModelCli(args, out, err);
  return {code, out.str(), err.str()};
}

nlohmann::json Reference(const std::string& model) {
  auto text = common::ReadFileToString(FixtureDir(model) + "/reference.json");
  EXPECT_TRUE(text.ok());
  return nlohmann::json::parse(*text);
}

std::string IdsFlag(const nlohmann::json& ids) {
  std::string s;
  for (const auto& id : ids) s += (s.empty() ? "" : ",") + std::to_string(id.get<int64_t>());
  return s;
}

TEST(ModelCliTest, Inspect) {
  CliResult r = Cli({"inspect", FixtureDir("qwen2")});
  ASSERT_EQ(r.code, 0) << r.err;
  nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["architecture"], "Qwen2ForCausalLM");
  EXPECT_EQ(j["layers"], 2);
  EXPECT_EQ(j["hidden"], 64);
  EXPECT_EQ(j["kv_heads"], 2);
  EXPECT_TRUE(j["tie_word_embeddings"].get<bool>());
  // embed 600*64 + per layer (q 64*64+64, k,v 32*64+32, o 64*64, mlp 3*64*176, 2 norms) + norm.
  const int64_t per_layer = (4096 + 64) + 2 * (2048 + 32) + 4096 + 3 * 64 * 176 + 128;
  EXPECT_EQ(j["params"].get<int64_t>(), 600 * 64 + 2 * per_layer + 64);
  EXPECT_EQ(j["dtypes"]["F32"].get<int64_t>(), j["params"].get<int64_t>());
  EXPECT_EQ(j["memory_estimate_bytes"]["weights_fp32"].get<int64_t>(),
            4 * j["params"].get<int64_t>());
  auto hash = common::HashModelDirectory(FixtureDir("qwen2"));
  ASSERT_TRUE(hash.ok());
  EXPECT_EQ(j["base_model_hash"], *hash);
}

TEST(ModelCliTest, LogitsMatchReferenceWithAndWithoutAdapter) {
  const nlohmann::json ref = Reference("llama");
  const std::string ids = IdsFlag(ref["input_ids"]);
  auto check = [&](const std::vector<std::string>& args, const std::string& key) {
    CliResult r = Cli(args);
    ASSERT_EQ(r.code, 0) << r.err;
    nlohmann::json j = nlohmann::json::parse(r.out);
    ASSERT_EQ(j["logits"].size(), ref[key].size());
    double worst = 0;
    for (size_t t = 0; t < ref[key].size(); ++t) {
      for (size_t v = 0; v < ref[key][t].size(); ++v) {
        worst = std::max(worst,
                         std::abs(j["logits"][t][v].get<double>() - ref[key][t][v].get<double>()));
      }
    }
    EXPECT_LT(worst, 1e-4) << key;
  };
  check({"logits", FixtureDir("llama"), "--ids", ids}, "logits");
  check({"logits", FixtureDir("llama"), "--ids=" + ids, "--adapter",
         FixtureDir("llama") + "/adapter"},
        "logits_with_adapter");
  check({"logits", FixtureDir("llama"), "--ids", ids, "--adapter", FixtureDir("llama") + "/adapter",
         "--merge"},
        "logits_merged");
}

TEST(ModelCliTest, GenerateMatchesReference) {
  const nlohmann::json ref = Reference("qwen2");
  CliResult r = Cli({"generate", FixtureDir("qwen2"), "--ids", IdsFlag(ref["input_ids"]),
                     "--max-new", "12", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["ids"], ref["greedy_next_12"]);
  EXPECT_TRUE(j["text"].is_string());
  // Plain-text mode prints the decoded text.
  CliResult text = Cli({"generate", FixtureDir("qwen2"), "--prompt", ref["text"].get<std::string>(),
                        "--max-new", "3"});
  ASSERT_EQ(text.code, 0) << text.err;
  EXPECT_FALSE(text.out.empty());
}

TEST(ModelCliTest, TokenizeMatchesReferenceIds) {
  const nlohmann::json ref = Reference("llama");
  CliResult r = Cli({"tokenize", FixtureDir("llama"), "--text", ref["text"].get<std::string>()});
  ASSERT_EQ(r.code, 0) << r.err;
  nlohmann::json j = nlohmann::json::parse(r.out);
  // reference input_ids are the first 24 tokens of the text.
  ASSERT_GE(j["ids"].size(), ref["input_ids"].size());
  for (size_t i = 0; i < ref["input_ids"].size(); ++i) EXPECT_EQ(j["ids"][i], ref["input_ids"][i]);
}

TEST(ModelCliTest, UsageAndRuntimeErrors) {
  EXPECT_EQ(Cli({}).code, 2);
  EXPECT_EQ(Cli({"--help"}).code, 0);
  CliResult r = Cli({"explode", FixtureDir("llama")});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("explode"));
  r = Cli({"logits", FixtureDir("llama")});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("--ids"));
  r = Cli({"logits", FixtureDir("llama"), "--ids", "1,x"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("'x'"));
  r = Cli({"logits", FixtureDir("llama"), "--ids", "1,600"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("600"));
  r = Cli({"generate", FixtureDir("llama"), "--ids", "1"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("--max-new"));
  r = Cli({"logits", FixtureDir("llama"), "--ids", "1", "--bogus"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("--bogus"));
  r = Cli({"logits", FixtureDir("llama"), "--ids", "1", "--merge"});
  EXPECT_EQ(r.code, 2);
  r = Cli({"inspect", "/nonexistent"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("/nonexistent"));
  r = Cli({"logits", FixtureDir("llama"), "--ids", "1", "--adapter", "/nonexistent"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("/nonexistent/adapter_config.json"));
}

}  // namespace
}  // namespace fedlora::edge
