#include "simulations/model_maker.h"

#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <string>

#include "common/crypto/crypto.h"
#include "common/tensor/tensor.h"
#include "edge-agent/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "simulations/data_maker.h"

namespace fedlora::sim {
namespace {

std::string TempDir() {
  char tmpl[] = "/tmp/fedlora_model_maker_test_XXXXXX";
  const char* dir = mkdtemp(tmpl);
  return dir == nullptr ? std::string() : std::string(dir);
}

TinyModelOptions SmallOptions() {
  TinyModelOptions o;
  o.hidden_size = 48;
  o.intermediate_size = 96;
  o.num_layers = 2;
  o.num_heads = 4;
  o.num_kv_heads = 2;
  o.head_dim = 12;
  o.vocab_size = 320;
  o.max_position_embeddings = 128;
  o.corpus_examples = 40;
  o.seed = 5;
  return o;
}

class ModelMakerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = TempDir();
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_F(ModelMakerTest, DefaultModelHasHuggingFaceLlamaLayout) {
  auto info = MakeTinyModel(dir_);  // the documented defaults
  ASSERT_TRUE(info.ok()) << info.status();

  auto config_text = common::ReadFileToString(dir_ + "/config.json");
  ASSERT_TRUE(config_text.ok());
  auto config = nlohmann::json::parse(*config_text);
  EXPECT_EQ(config["architectures"][0], "LlamaForCausalLM");
  EXPECT_EQ(config["model_type"], "llama");
  EXPECT_EQ(config["hidden_size"], 128);
  EXPECT_EQ(config["intermediate_size"], 344);
  EXPECT_EQ(config["num_hidden_layers"], 4);
  EXPECT_EQ(config["num_attention_heads"], 4);
  EXPECT_EQ(config["num_key_value_heads"], 2);
  EXPECT_EQ(config["head_dim"], 32);
  EXPECT_EQ(config["max_position_embeddings"], 512);
  EXPECT_DOUBLE_EQ(config["rope_theta"].get<double>(), 10000.0);
  EXPECT_DOUBLE_EQ(config["rms_norm_eps"].get<double>(), 1e-5);
  EXPECT_EQ(config["tie_word_embeddings"], false);
  EXPECT_EQ(config["torch_dtype"], "float32");
  EXPECT_EQ(config["vocab_size"], info->vocab_size);
  EXPECT_EQ(config["bos_token_id"], info->bos_token_id);
  EXPECT_EQ(config["eos_token_id"], info->eos_token_id);
  EXPECT_GT(info->vocab_size, 256);
  EXPECT_LE(info->vocab_size, 512);

  // The tokenizer loads in the engine and agrees with config.json.
  auto tok = edge::Tokenizer::FromFile(dir_ + "/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), info->vocab_size);
  EXPECT_EQ((*tok)->TokenToId(kBosToken), info->bos_token_id);
  EXPECT_EQ((*tok)->TokenToId(kEosToken), info->eos_token_id);
  EXPECT_EQ((*tok)->TokenToId(kPadToken), info->pad_token_id);
  auto site = GenerateSite(1, 1, 0, 123);
  ASSERT_TRUE(site.ok());
  const std::string text = site->train[0].input + "\n" + site->train[0].output;
  std::vector<int32_t> ids = (*tok)->Encode(text);
  EXPECT_EQ((*tok)->Decode(ids), text);
  EXPECT_LT(ids.size(), text.size() / 2) << "BPE merges learned from the corpus compress notes";
  for (int32_t id : ids) EXPECT_LT(id, info->vocab_size);

  auto tok_config = nlohmann::json::parse(*common::ReadFileToString(dir_ + "/tokenizer_config.json"));
  EXPECT_EQ(tok_config["bos_token"], kBosToken);
  EXPECT_EQ(tok_config["eos_token"], kEosToken);
  auto gen = nlohmann::json::parse(*common::ReadFileToString(dir_ + "/generation_config.json"));
  EXPECT_EQ(gen["eos_token_id"], info->eos_token_id);

  auto file = common::SafetensorsFile::Open(dir_ + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  const int64_t v = info->vocab_size;
  struct Want {
    std::string name;
    std::vector<int64_t> shape;
  };
  std::vector<Want> want = {{"model.embed_tokens.weight", {v, 128}},
                            {"model.norm.weight", {128}},
                            {"lm_head.weight", {v, 128}}};
  for (int l = 0; l < 4; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    want.push_back({p + "self_attn.q_proj.weight", {128, 128}});
    want.push_back({p + "self_attn.k_proj.weight", {64, 128}});
    want.push_back({p + "self_attn.v_proj.weight", {64, 128}});
    want.push_back({p + "self_attn.o_proj.weight", {128, 128}});
    want.push_back({p + "mlp.gate_proj.weight", {344, 128}});
    want.push_back({p + "mlp.up_proj.weight", {344, 128}});
    want.push_back({p + "mlp.down_proj.weight", {128, 344}});
    want.push_back({p + "input_layernorm.weight", {128}});
    want.push_back({p + "post_attention_layernorm.weight", {128}});
  }
  EXPECT_EQ((*file)->tensors().size(), want.size());
  int64_t params = 0;
  for (const Want& w : want) {
    const common::TensorView* t = (*file)->Find(w.name);
    ASSERT_NE(t, nullptr) << w.name;
    EXPECT_EQ(t->dtype, common::DType::kF32) << w.name;
    EXPECT_EQ(t->shape, w.shape) << w.name;
    params += t->numel();
  }
  EXPECT_EQ(params, info->num_parameters);

  // Norms are ones; weights look like N(0, 0.02).
  auto norm = (*file)->Find("model.layers.2.input_layernorm.weight")->ToHost();
  ASSERT_TRUE(norm.ok());
  for (float x : norm->data) EXPECT_EQ(x, 1.0f);
  auto gate = (*file)->Find("model.layers.1.mlp.gate_proj.weight")->ToHost();
  ASSERT_TRUE(gate.ok());
  double sum = 0, sq = 0;
  for (float x : gate->data) {
    sum += x;
    sq += static_cast<double>(x) * x;
  }
  const double n = static_cast<double>(gate->data.size());
  const double mean = sum / n;
  const double sd = std::sqrt(sq / n - mean * mean);
  EXPECT_NEAR(mean, 0.0, 0.002);
  EXPECT_NEAR(sd, 0.02, 0.001);

  EXPECT_TRUE(common::HashModelDirectory(dir_).ok());
}

TEST_F(ModelMakerTest, SameOptionsSameFilesOtherSeedOtherWeights) {
  const std::string a = dir_ + "/a", b = dir_ + "/b", c = dir_ + "/c";
  TinyModelOptions o = SmallOptions();
  ASSERT_TRUE(MakeTinyModel(a, o).ok());
  ASSERT_TRUE(MakeTinyModel(b, o).ok());
  o.seed = 6;
  ASSERT_TRUE(MakeTinyModel(c, o).ok());
  auto ha = common::HashModelDirectory(a);
  auto hb = common::HashModelDirectory(b);
  auto hc = common::HashModelDirectory(c);
  ASSERT_TRUE(ha.ok() && hb.ok() && hc.ok());
  EXPECT_EQ(*ha, *hb);
  EXPECT_NE(*ha, *hc);
  EXPECT_EQ(*common::ReadFileToString(a + "/tokenizer.json"),
            *common::ReadFileToString(b + "/tokenizer.json"));
}

TEST_F(ModelMakerTest, SizesFollowTheOptions) {
  TinyModelOptions o = SmallOptions();
  auto info = MakeTinyModel(dir_, o);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_LE(info->vocab_size, 320);
  auto file = common::SafetensorsFile::Open(dir_ + "/model.safetensors");
  ASSERT_TRUE(file.ok());
  EXPECT_EQ((*file)->tensors().size(), 3u + 9u * 2);
  EXPECT_EQ((*file)->Find("model.layers.1.self_attn.k_proj.weight")->shape,
            (std::vector<int64_t>{24, 48}));
  EXPECT_EQ((*file)->Find("model.layers.1.self_attn.o_proj.weight")->shape,
            (std::vector<int64_t>{48, 48}));
  EXPECT_EQ((*file)->Find("lm_head.weight")->shape,
            (std::vector<int64_t>{info->vocab_size, 48}));
  EXPECT_EQ((*file)->Find("model.layers.2.self_attn.q_proj.weight"), nullptr);
}

TEST_F(ModelMakerTest, RejectsInconsistentSizes) {
  TinyModelOptions o = SmallOptions();
  o.num_heads = 3;
  auto info = MakeTinyModel(dir_, o);
  ASSERT_FALSE(info.ok());
  EXPECT_EQ(info.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(info.status().message(), ::testing::HasSubstr("num_kv_heads"));
  o = SmallOptions();
  o.hidden_size = 0;
  EXPECT_EQ(MakeTinyModel(dir_, o).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/config.json"));
}

}  // namespace
}  // namespace fedlora::sim
