#include "edge-agent/engine.h"

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "common/crypto/crypto.h"
#include "edge-agent/lora.h"
#include "edge-agent/model.h"
#include "edge-agent/peft.h"
#include "edge-agent/trainer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace fedlora::edge {
namespace {

using ::testing::HasSubstr;

std::string FixtureDir(const std::string& model) {
  return std::string(FEDLORA_FIXTURES) + "/hf/" + model;
}

std::unique_ptr<LocalTrainer> Load(const std::string& model) {
  EngineOptions opts;
  opts.threads = 1;
  auto t = LoadTrainer(FixtureDir(model), opts);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(t).value() : nullptr;
}

std::vector<Example> TinyData() {
  return {
      {"### Instruction:\nWhat is the patient's blood pressure?\n\n### Response:\n", "140/90"},
      {"### Instruction:\nWhich drug is prescribed?\n\n### Response:\n", "metformin 500mg BID"},
      {"### Instruction:\nHow old is the patient?\n\n### Response:\n", "54 years"},
      {"### Instruction:\nWhat is the sex of the patient?\n\n### Response:\n", "male"},
  };
}

LoraConfig SmallLora(uint64_t seed = 7) {
  LoraConfig c;
  c.rank = 4;
  c.alpha = 8;
  c.init_seed = seed;
  return c;
}

TrainOptions FastTrain() {
  TrainOptions o;
  o.steps = 30;
  o.learning_rate = 2e-2f;
  o.batch_size = 4;
  o.max_seq_len = 64;
  o.warmup_steps = 2;
  o.seed = 3;
  return o;
}

class EngineTest : public ::testing::TestWithParam<std::string> {};

TEST_P(EngineTest, TrainingLowersEvalLoss) {
  auto t = Load(GetParam());
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->InitAdapter(SmallLora()).ok());
  auto before = t->Evaluate(TinyData(), 64);
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_GT(before->tokens, 0u);
  EXPECT_GT(before->loss, 1.0);
  auto r = t->Train(TinyData(), FastTrain());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GT(r->tokens, 0u);
  EXPECT_GT(r->seconds, 0.0);
  EXPECT_TRUE(std::isfinite(r->mean_loss));
  EXPECT_LT(r->last_loss, r->mean_loss);
  auto after = t->Evaluate(TinyData(), 64);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->tokens, before->tokens);
  // The fixtures are tiny random models with a frozen, weak lm_head: the loss
  // cannot approach 0, but 30 steps reliably take off more than half a nat.
  EXPECT_LT(after->loss, before->loss - 0.5) << "before " << before->loss;
  // Training touched B (no longer zero).
  auto adapter = t->GetAdapter();
  ASSERT_TRUE(adapter.ok());
  double norm = 0;
  for (const auto& [name, tensor] : *adapter) {
    if (name.find("lora_B") == std::string::npos) continue;
    for (float v : tensor.data) norm += v * v;
  }
  EXPECT_GT(norm, 0.0);
}

TEST_P(EngineTest, AdapterRoundTripGivesIdenticalLoss) {
  auto t1 = Load(GetParam());
  auto t2 = Load(GetParam());
  ASSERT_TRUE(t1 && t2);
  ASSERT_TRUE(t1->InitAdapter(SmallLora()).ok());
  TrainOptions o = FastTrain();
  o.steps = 5;
  ASSERT_TRUE(t1->Train(TinyData(), o).ok());
  auto adapter = t1->GetAdapter();
  ASSERT_TRUE(adapter.ok());
  ASSERT_TRUE(t2->SetAdapter(SmallLora(), *adapter).ok());
  auto e1 = t1->Evaluate(TinyData(), 64);
  auto e2 = t2->Evaluate(TinyData(), 64);
  ASSERT_TRUE(e1.ok() && e2.ok());
  EXPECT_EQ(e1->loss, e2->loss);
  EXPECT_EQ(e1->tokens, e2->tokens);
  auto back = t2->GetAdapter();
  ASSERT_TRUE(back.ok());
  ASSERT_EQ(back->size(), adapter->size());
  for (const auto& [name, tensor] : *adapter) EXPECT_EQ(back->at(name).data, tensor.data) << name;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, EngineTest, ::testing::Values("llama", "qwen2"));

TEST(EngineDeterminismTest, SameSeedSameAdapter) {
  auto t1 = Load("llama");
  auto t2 = Load("llama");
  ASSERT_TRUE(t1 && t2);
  LoraConfig cfg = SmallLora(11);
  cfg.dropout = 0.1f;
  ASSERT_TRUE(t1->InitAdapter(cfg).ok());
  ASSERT_TRUE(t2->InitAdapter(cfg).ok());
  auto a1 = t1->GetAdapter(), a2 = t2->GetAdapter();
  ASSERT_TRUE(a1.ok() && a2.ok());
  for (const auto& [name, tensor] : *a1) EXPECT_EQ(a2->at(name).data, tensor.data) << name;
  TrainOptions o = FastTrain();
  o.steps = 4;
  o.batch_size = 2;
  auto r1 = t1->Train(TinyData(), o);
  auto r2 = t2->Train(TinyData(), o);
  ASSERT_TRUE(r1.ok() && r2.ok());
  EXPECT_EQ(r1->mean_loss, r2->mean_loss);
  a1 = t1->GetAdapter();
  a2 = t2->GetAdapter();
  for (const auto& [name, tensor] : *a1) EXPECT_EQ(a2->at(name).data, tensor.data) << name;
  // A different training seed changes the result.
  ASSERT_TRUE(t2->InitAdapter(cfg).ok());
  o.seed = 99;
  ASSERT_TRUE(t2->Train(TinyData(), o).ok());
  a2 = t2->GetAdapter();
  bool differs = false;
  for (const auto& [name, tensor] : *a1) differs |= a2->at(name).data != tensor.data;
  EXPECT_TRUE(differs);
}

TEST(EngineErrorsTest, PreconditionsAndBadOptions) {
  auto t = Load("llama");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->Train(TinyData(), FastTrain()).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(t->GetAdapter().status().code(), absl::StatusCode::kFailedPrecondition);
  // Evaluating the base model needs no adapter.
  EXPECT_TRUE(t->Evaluate(TinyData(), 64).ok());
  ASSERT_TRUE(t->InitAdapter(SmallLora()).ok());
  TrainOptions o = FastTrain();
  o.steps = 0;
  EXPECT_THAT(std::string(t->Train(TinyData(), o).status().message()), HasSubstr("steps"));
  o = FastTrain();
  o.learning_rate = NAN;
  EXPECT_THAT(std::string(t->Train(TinyData(), o).status().message()), HasSubstr("learning_rate"));
  o = FastTrain();
  o.batch_size = -1;
  EXPECT_THAT(std::string(t->Train(TinyData(), o).status().message()), HasSubstr("batch_size"));
  EXPECT_EQ(t->Train({}, FastTrain()).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(t->Evaluate({}, 64).status().code(), absl::StatusCode::kInvalidArgument);
  // Prompts longer than max_seq_len leave no response tokens.
  o = FastTrain();
  o.max_seq_len = 4;
  EXPECT_THAT(std::string(t->Train(TinyData(), o).status().message()),
              HasSubstr("no example has response tokens"));
  EXPECT_THAT(std::string(t->Evaluate(TinyData(), 4).status().message()),
              HasSubstr("no response tokens"));
  // A diverging run is reported and leaves the adapter as it was.
  auto before = t->GetAdapter();
  o = FastTrain();
  o.learning_rate = 1e30f;
  o.max_grad_norm = 0;
  o.steps = 5;
  auto r = t->Train(TinyData(), o);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("non-finite"));
  auto after = t->GetAdapter();
  ASSERT_TRUE(after.ok());
  for (const auto& [name, tensor] : *before) EXPECT_EQ(after->at(name).data, tensor.data);
  // Bad adapter config.
  LoraConfig bad = SmallLora();
  bad.target_modules = {"nonexistent_proj"};
  EXPECT_THAT(std::string(t->InitAdapter(bad).message()), HasSubstr("nonexistent_proj"));
}

TEST(EngineLoadTest, Int8BaseTrains) {
  EngineOptions opts;
  opts.threads = 1;
  opts.base_dtype = "int8";
  auto t = LoadTrainer(FixtureDir("llama"), opts);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE((*t)->InitAdapter(SmallLora()).ok());
  auto before = (*t)->Evaluate(TinyData(), 64);
  ASSERT_TRUE(before.ok());
  ASSERT_TRUE((*t)->Train(TinyData(), FastTrain()).ok());
  auto after = (*t)->Evaluate(TinyData(), 64);
  ASSERT_TRUE(after.ok());
  EXPECT_LT(after->loss, before->loss - 0.5);
}

TEST(EngineLoadTest, Int4BaseTrains) {
  EngineOptions opts;
  opts.threads = 1;
  opts.base_dtype = "int4";
  auto t = LoadTrainer(FixtureDir("qwen2"), opts);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE((*t)->InitAdapter(SmallLora()).ok());
  auto before = (*t)->Evaluate(TinyData(), 64);
  ASSERT_TRUE(before.ok());
  ASSERT_TRUE((*t)->Train(TinyData(), FastTrain()).ok());
  auto after = (*t)->Evaluate(TinyData(), 64);
  ASSERT_TRUE(after.ok());
  EXPECT_LT(after->loss, before->loss - 0.5);
}

TEST(EngineLoadTest, HashAndErrors) {
  auto t = Load("qwen2");
  ASSERT_NE(t, nullptr);
  auto hash = common::HashModelDirectory(FixtureDir("qwen2"));
  ASSERT_TRUE(hash.ok());
  EXPECT_EQ(t->BaseModelHash(), *hash);
  EXPECT_EQ(t->BaseModelHash().size(), 64u);
  EXPECT_FALSE(LoadTrainer("/nonexistent/model").ok());
  EngineOptions opts;
  opts.threads = -2;
  EXPECT_EQ(LoadTrainer(FixtureDir("llama"), opts).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(EngineTokenizeTest, LabelsMaskPromptAndSpecialTokens) {
  auto tok = Tokenizer::FromFile(FixtureDir("llama") + "/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto config = LoadModelConfig(FixtureDir("llama"));
  ASSERT_TRUE(config.ok());
  auto special = ResolveSpecialTokens(FixtureDir("llama"), *config, **tok);
  ASSERT_TRUE(special.ok()) << special.status();
  EXPECT_EQ(special->bos, 1);
  EXPECT_EQ(special->eos, 2);
  Example ex{"Question: BP?\n", "140/90"};
  const std::vector<int32_t> p = (*tok)->Encode(ex.prompt), r = (*tok)->Encode(ex.response);
  TokenizedExample te = TokenizeExample(**tok, *special, ex, 256);
  ASSERT_EQ(te.ids.size(), 1 + p.size() + r.size() + 1);
  EXPECT_EQ(te.ids.front(), 1);
  EXPECT_EQ(te.ids.back(), 2);
  for (size_t i = 0; i < 1 + p.size(); ++i) EXPECT_EQ(te.labels[i], kIgnoreLabel);
  for (size_t i = 1 + p.size(); i < te.ids.size(); ++i) EXPECT_EQ(te.labels[i], te.ids[i]);
  EXPECT_EQ(te.response_tokens(), static_cast<int64_t>(r.size() + 1));
  TokenizedExample cut = TokenizeExample(**tok, *special, ex, 3);
  EXPECT_EQ(cut.ids.size(), 3u);

  auto qconfig = LoadModelConfig(FixtureDir("qwen2"));
  ASSERT_TRUE(qconfig.ok());
  auto qspecial = ResolveSpecialTokens(FixtureDir("qwen2"), *qconfig, **tok);
  ASSERT_TRUE(qspecial.ok());
  EXPECT_FALSE(qspecial->bos.has_value());
  EXPECT_FALSE(qspecial->eos.has_value());
  TokenizedExample qt = TokenizeExample(**tok, *qspecial, ex, 256);
  EXPECT_EQ(qt.ids.size(), p.size() + r.size());
}

TEST(EngineTokenizeTest, TokenizerConfigDecidesBos) {
  char tmpl[] = "/tmp/fedlora_engine_test_XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  auto tok = Tokenizer::FromFile(FixtureDir("llama") + "/tokenizer.json");
  ASSERT_TRUE(tok.ok());
  auto config = LoadModelConfig(FixtureDir("llama"));
  ASSERT_TRUE(config.ok());
  ASSERT_TRUE(common::WriteFileAtomic(dir + "/tokenizer_config.json",
                                      R"({"add_bos_token": false, "eos_token": "<|pad|>"})")
                  .ok());
  auto s = ResolveSpecialTokens(dir, *config, **tok);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_FALSE(s->bos.has_value());
  ASSERT_TRUE(common::WriteFileAtomic(
                  dir + "/tokenizer_config.json",
                  R"({"add_bos_token": true, "bos_token": {"content": "<|begin_of_text|>"}})")
                  .ok());
  s = ResolveSpecialTokens(dir, *config, **tok);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->bos, 0);
  ASSERT_TRUE(common::WriteFileAtomic(dir + "/tokenizer_config.json",
                                      R"({"add_bos_token": true, "bos_token": "<nope>"})")
                  .ok());
  s = ResolveSpecialTokens(dir, *config, **tok);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("<nope>"));
  std::system(("rm -rf '" + dir + "'").c_str());
}

TEST(EngineReferenceTest, EvaluateMatchesNaiveLoop) {
  // Evaluate (batched, padded, shifted) against a per-example, per-token loop.
  auto t = Load("llama");
  ASSERT_NE(t, nullptr);
  std::vector<Example> data = TinyData();
  data.push_back({"Short?\n", "A much longer response that pads the others in its batch."});
  auto eval = t->Evaluate(data, 48);
  ASSERT_TRUE(eval.ok()) << eval.status();

  auto model = Model::Load(FixtureDir("llama"));
  ASSERT_TRUE(model.ok());
  auto tok = Tokenizer::FromFile(FixtureDir("llama") + "/tokenizer.json");
  ASSERT_TRUE(tok.ok());
  auto special = ResolveSpecialTokens(FixtureDir("llama"), (*model)->config(), **tok);
  ASSERT_TRUE(special.ok());
  torch::NoGradGuard no_grad;
  double total = 0;
  uint64_t count = 0;
  for (const Example& ex : data) {
    TokenizedExample te = TokenizeExample(**tok, *special, ex, 48);
    torch::Tensor logits = (*model)->Forward(torch::tensor(te.ids, torch::kLong).unsqueeze(0))[0];
    for (size_t i = 1; i < te.ids.size(); ++i) {
      if (te.labels[i] == kIgnoreLabel) continue;
      torch::Tensor row = logits[static_cast<int64_t>(i - 1)].to(torch::kDouble);
      const double lse = row.exp().sum().log().item<double>();
      total += lse - row[te.labels[i]].item<double>();
      ++count;
    }
  }
  EXPECT_EQ(eval->tokens, count);
  EXPECT_NEAR(eval->loss, total / count, 1e-5);
}

TEST(EngineReferenceTest, LoraGradientMatchesFiniteDifference) {
  auto model = Model::Load(FixtureDir("llama"));
  ASSERT_TRUE(model.ok());
  auto adapter = LoadPeftAdapter(FixtureDir("llama") + "/adapter");
  ASSERT_TRUE(adapter.ok());
  ASSERT_TRUE(SetLora(**model, adapter->config, adapter->tensors).ok());
  torch::Tensor ids =
      torch::tensor(std::vector<int64_t>{5, 17, 99, 250, 3, 42, 7, 300}, torch::kLong).unsqueeze(0);
  auto loss_fn = [&]() {
    torch::Tensor logits = (*model)->Forward(ids)[0];
    return torch::nn::functional::cross_entropy(logits.slice(0, 0, 7), ids[0].slice(0, 1));
  };
  std::vector<torch::Tensor> params = LoraParameters(**model);
  ASSERT_FALSE(params.empty());
  torch::Tensor loss = loss_fn();
  loss.backward();
  // Check a few entries of A and B of several modules.
  double largest = 0;
  for (size_t p : {size_t{0}, size_t{1}, size_t{9}, params.size() - 1}) {
    torch::Tensor param = params[p];
    ASSERT_TRUE(param.grad().defined());
    for (int64_t flat : {int64_t{0}, param.numel() / 2}) {
      const double analytic = param.grad().reshape({-1})[flat].item<double>();
      const float eps = 1e-2f;
      double plus, minus;
      {
        torch::NoGradGuard no_grad;
        param.reshape({-1})[flat] += eps;
        plus = loss_fn().item<double>();
        param.reshape({-1})[flat] -= 2 * eps;
        minus = loss_fn().item<double>();
        param.reshape({-1})[flat] += eps;
      }
      const double numeric = (plus - minus) / (2 * eps);
      EXPECT_NEAR(analytic, numeric, 3e-4 + 0.02 * std::abs(numeric)) << "param " << p;
      largest = std::max(largest, std::abs(analytic));
    }
  }
  EXPECT_GT(largest, 5e-3);  // the comparison is not between two near-zero numbers
}

TEST(EngineErrorsTest, TokenIdsBeyondModelVocabulary) {
  // A model whose embedding is smaller than its tokenizer's vocabulary.
  char tmpl[] = "/tmp/fedlora_engine_vocab_XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  auto cfg_text = common::ReadFileToString(FixtureDir("llama") + "/config.json");
  ASSERT_TRUE(cfg_text.ok());
  nlohmann::json cfg = nlohmann::json::parse(*cfg_text);
  cfg["vocab_size"] = 100;
  ASSERT_TRUE(common::WriteFileAtomic(dir + "/config.json", cfg.dump()).ok());
  auto tj = common::ReadFileToString(FixtureDir("llama") + "/tokenizer.json");
  ASSERT_TRUE(tj.ok());
  ASSERT_TRUE(common::WriteFileAtomic(dir + "/tokenizer.json", *tj).ok());
  auto file = common::SafetensorsFile::Open(FixtureDir("llama") + "/model.safetensors");
  ASSERT_TRUE(file.ok());
  auto map = (*file)->ToTensorMap();
  ASSERT_TRUE(map.ok());
  for (const char* name : {"model.embed_tokens.weight", "lm_head.weight"}) {
    common::HostTensor& t = (*map)[name];
    t.shape[0] = 100;
    t.data.resize(100 * 64);
  }
  ASSERT_TRUE(common::WriteSafetensors(dir + "/model.safetensors", *map).ok());
  auto t = LoadTrainer(dir);
  ASSERT_TRUE(t.ok()) << t.status();
  auto r = (*t)->Evaluate(TinyData(), 64);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("vocab_size 100"));
  std::system(("rm -rf '" + dir + "'").c_str());
}

TEST(EngineScheduleTest, WarmupThenCosine) {
  TrainOptions o;
  o.learning_rate = 1.0f;
  o.steps = 10;
  o.warmup_steps = 3;
  EXPECT_DOUBLE_EQ(LearningRateAt(o, 0), 0.25);
  EXPECT_DOUBLE_EQ(LearningRateAt(o, 2), 0.75);
  EXPECT_DOUBLE_EQ(LearningRateAt(o, 3), 1.0);
  EXPECT_NEAR(LearningRateAt(o, 3 + 7 / 2.0), 0.5, 0.2);
  for (int s = 4; s < 10; ++s) EXPECT_LT(LearningRateAt(o, s), LearningRateAt(o, s - 1));
  EXPECT_GT(LearningRateAt(o, 9), 0.0);
  o.warmup_steps = 0;
  EXPECT_DOUBLE_EQ(LearningRateAt(o, 0), 1.0);
}

}  // namespace
}  // namespace fedlora::edge
