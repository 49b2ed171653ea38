#include "common/export/peft_export.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>

#include "common/tensor/tensor.h"
#include "tests/testing/test_util.h"

namespace fedlora::common {
namespace {

using ::fedlora::testutil::TempDir;
using ::fedlora::testutil::StatusIs;

using ::testing::HasSubstr;

const std::string kAdapterDir = std::string(FEDLORA_FIXTURES) + "/hf/llama/adapter";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

HostTensor Random(std::vector<int64_t> shape, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  HostTensor t;
  t.shape = std::move(shape);
  t.data.resize(static_cast<size_t>(t.numel()));
  for (float& v : t.data) v = normal(rng);
  return t;
}

TensorMap SmallAdapter(int r = 2) {
  TensorMap m;
  m["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = Random({r, 8}, 1);
  m["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = Random({8, r}, 2);
  m["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"] = Random({r, 12}, 3);
  m["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"] = Random({8, r}, 4);
  return m;
}

PeftLoraConfig SmallConfig() {
  PeftLoraConfig c;
  c.r = 2;
  c.lora_alpha = 4;
  c.use_rslora = true;
  c.lora_dropout = 0.05;
  c.target_modules = {"q_proj", "down_proj"};
  c.base_model_name_or_path = "org/tiny-llama";
  return c;
}

TEST(PeftExportTest, ReadsTheGoldenFixtureAdapter) {
  auto a = ReadPeftAdapter(kAdapterDir);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->config.r, 4);
  EXPECT_DOUBLE_EQ(a->config.lora_alpha, 8.0);
  EXPECT_FALSE(a->config.use_rslora);
  EXPECT_THAT(a->config.target_modules,
              ::testing::UnorderedElementsAre("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                              "up_proj", "down_proj"));
  EXPECT_DOUBLE_EQ(a->config.Scale(), 2.0);
  EXPECT_EQ(a->tensors.size(), 28u);  // 2 layers x 7 modules x {A, B}
  const HostTensor& down_a =
      a->tensors.at("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight");
  EXPECT_EQ(down_a.shape, (std::vector<int64_t>{4, 176}));
  auto pairs = CollectLoraPairs(a->tensors, a->config);
  ASSERT_TRUE(pairs.ok()) << pairs.status();
  ASSERT_EQ(pairs->size(), 14u);
  EXPECT_EQ((*pairs)[0].module_path, "model.layers.0.mlp.down_proj");
  EXPECT_EQ((*pairs)[0].layer, 0);
  EXPECT_EQ((*pairs)[0].module, "down_proj");
}

TEST(PeftExportTest, WriteThenReadRoundTrips) {
  TempDir tmp;
  const std::string dir = tmp.path() + "/nested/adapter";
  const TensorMap adapter = SmallAdapter();
  const PeftLoraConfig cfg = SmallConfig();
  ASSERT_TRUE(WritePeftAdapter(dir, adapter, cfg).ok());

  nlohmann::json j = nlohmann::json::parse(ReadFile(dir + "/adapter_config.json"));
  EXPECT_EQ(j["peft_type"], "LORA");
  EXPECT_EQ(j["task_type"], "CAUSAL_LM");
  EXPECT_EQ(j["r"], 2);
  EXPECT_EQ(j["lora_alpha"], 4.0);
  EXPECT_EQ(j["use_rslora"], true);
  EXPECT_EQ(j["base_model_name_or_path"], "org/tiny-llama");
  EXPECT_EQ(j["target_modules"], nlohmann::json({"q_proj", "down_proj"}));
  EXPECT_EQ(j["bias"], "none");

  auto st = SafetensorsFile::Open(dir + "/adapter_model.safetensors");
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_NE((*st)->Find("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"), nullptr);

  auto back = ReadPeftAdapter(dir);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->config.r, cfg.r);
  EXPECT_EQ(back->config.lora_alpha, cfg.lora_alpha);
  EXPECT_EQ(back->config.use_rslora, cfg.use_rslora);
  EXPECT_EQ(back->config.target_modules, cfg.target_modules);
  EXPECT_EQ(back->config.base_model_name_or_path, cfg.base_model_name_or_path);
  EXPECT_EQ(back->config.task_type, "CAUSAL_LM");
  EXPECT_NEAR(back->config.Scale(), 4.0 / std::sqrt(2.0), 1e-12);
  ASSERT_EQ(back->tensors.size(), adapter.size());
  for (const auto& [name, t] : adapter) {
    EXPECT_EQ(back->tensors.at(name).shape, t.shape) << name;
    EXPECT_EQ(back->tensors.at(name).data, t.data) << name;
  }
}

TEST(PeftExportTest, AcceptsAdapterNamedTensors) {
  TempDir tmp;
  TensorMap named;
  for (const auto& [name, t] : SmallAdapter()) {
    std::string n = name;
    n.replace(n.find(".weight"), 7, ".default.weight");
    named[n] = t;
  }
  ASSERT_TRUE(WriteSafetensors(tmp.path() + "/adapter_model.safetensors", named).ok());
  {
    std::ofstream f(tmp.path() + "/adapter_config.json");
    f << PeftConfigJson(SmallConfig());
  }
  auto a = ReadPeftAdapter(tmp.path());
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->tensors.count("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"), 1u);
}

TEST(PeftExportTest, RejectsInconsistentAdapters) {
  const PeftLoraConfig cfg = SmallConfig();
  TensorMap missing = SmallAdapter();
  missing.erase("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight");
  EXPECT_THAT(CollectLoraPairs(missing, cfg).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("model.layers.1.mlp.down_proj: lora_B is missing")));
  EXPECT_THAT(CollectLoraPairs(SmallAdapter(3), cfg).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("expected rank 2")));
  PeftLoraConfig only_q = cfg;
  only_q.target_modules = {"q_proj"};
  EXPECT_THAT(CollectLoraPairs(SmallAdapter(), only_q).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("'down_proj' is not in target_modules")));
  TensorMap badname = SmallAdapter();
  badname["model.layers.0.q_proj.lora_A.weight"] = Random({2, 8}, 9);
  EXPECT_THAT(CollectLoraPairs(badname, cfg).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("'model.layers.0.q_proj.lora_A.weight'")));
  TensorMap rank3 = SmallAdapter();
  rank3["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = Random({2, 2, 2}, 9);
  EXPECT_THAT(CollectLoraPairs(rank3, cfg).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("2-D")));
  TempDir tmp;
  EXPECT_FALSE(WritePeftAdapter(tmp.path() + "/x", missing, cfg).ok());
  EXPECT_THAT(WritePeftAdapter(tmp.path() + "/y", {}, cfg),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("at least one")));
}

TEST(PeftExportTest, RejectsUnsupportedConfigs) {
  TempDir tmp;
  ASSERT_TRUE(WritePeftAdapter(tmp.path(), SmallAdapter(), SmallConfig()).ok());
  const std::string path = tmp.path() + "/adapter_config.json";
  const nlohmann::json good = nlohmann::json::parse(ReadFile(path));
  struct Case {
    const char* field;
    nlohmann::json value;
    const char* message;
  };
  const Case cases[] = {
      {"peft_type", "IA3", "'peft_type'"},
      {"r", 0, "'r'"},
      {"r", "4", "'r'"},
      {"lora_alpha", "8", "'lora_alpha'"},
      {"use_dora", true, "DoRA"},
      {"bias", "all", "'bias'"},
      {"modules_to_save", nlohmann::json({"lm_head"}), "'modules_to_save'"},
      {"rank_pattern", nlohmann::json({{"q_proj", 8}}), "'rank_pattern'"},
      {"target_modules", 5, "'target_modules'"},
      {"use_rslora", "yes", "'use_rslora'"},
  };
  for (const Case& c : cases) {
    nlohmann::json j = good;
    j[c.field] = c.value;
    {
      std::ofstream f(path);
      f << j.dump();
    }
    EXPECT_THAT(ReadPeftAdapter(tmp.path()).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.message)))
        << c.field;
  }
  {
    std::ofstream f(path);
    f << "{not json";
  }
  EXPECT_THAT(ReadPeftAdapter(tmp.path()).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("adapter_config.json")));
  EXPECT_FALSE(ReadPeftAdapter(tmp.path() + "/missing").ok());
}

}  // namespace
}  // namespace fedlora::common
