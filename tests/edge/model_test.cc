#include "edge-agent/model.h"

#include <ATen/autocast_mode.h>

#include <cmath>
#include <fstream>
#include <set>
#include <string>

#include "common/crypto/crypto.h"
#include "edge-agent/gemm.h"
#include "edge-agent/lora.h"
#include "edge-agent/model_config.h"
#include "edge-agent/peft.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/hf_variants.h"

namespace fedlora::edge {
namespace {

using ::testing::HasSubstr;

std::string FixtureDir(const std::string& model) {
  return std::string(FEDLORA_FIXTURES) + "/hf/" + model;
}

nlohmann::json Reference(const std::string& model) {
  std::ifstream in(FixtureDir(model) + "/reference.json");
  EXPECT_TRUE(in.good()) << "missing reference.json for " << model;
  return nlohmann::json::parse(in);
}

std::unique_ptr<Model> LoadOrDie(const std::string& dir, const ModelLoadOptions& opts = {}) {
  auto m = Model::Load(dir, opts);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(m).value() : nullptr;
}

torch::Tensor Ids(const nlohmann::json& ref) {
  std::vector<int64_t> ids = ref.at("input_ids").get<std::vector<int64_t>>();
  return torch::tensor(ids, torch::kLong).unsqueeze(0);
}

// Max |logits - reference[key]| over all positions.
double MaxDiff(const torch::Tensor& logits, const nlohmann::json& ref, const std::string& key) {
  const auto& rows = ref.at(key);
  EXPECT_EQ(logits.size(0), 1);
  EXPECT_EQ(logits.size(1), static_cast<int64_t>(rows.size()));
  double worst = 0;
  for (size_t t = 0; t < rows.size(); ++t) {
    std::vector<float> want = rows[t].get<std::vector<float>>();
    EXPECT_EQ(logits.size(2), static_cast<int64_t>(want.size()));
    torch::Tensor got = logits[0][static_cast<int64_t>(t)];
    torch::Tensor diff = (got - torch::tensor(want)).abs().max();
    worst = std::max(worst, diff.item<double>());
  }
  return worst;
}

class ParityTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ParityTest, LogitsMatchReference) {
  const nlohmann::json ref = Reference(GetParam());
  auto model = LoadOrDie(FixtureDir(GetParam()));
  ASSERT_NE(model, nullptr);
  torch::NoGradGuard no_grad;
  torch::Tensor logits = model->Forward(Ids(ref));
  EXPECT_LT(MaxDiff(logits, ref, "logits"), 1e-4);
}

TEST_P(ParityTest, ParamNamesMatchReference) {
  const nlohmann::json ref = Reference(GetParam());
  auto model = LoadOrDie(FixtureDir(GetParam()));
  ASSERT_NE(model, nullptr);
  std::set<std::string> ours;
  for (const auto& [name, t] : model->NamedParameters()) ours.insert(name);
  std::set<std::string> theirs;
  for (const auto& n : ref.at("param_names")) theirs.insert(n.get<std::string>());
  EXPECT_EQ(ours, theirs);
}

TEST_P(ParityTest, GreedyGenerationMatchesReference) {
  const nlohmann::json ref = Reference(GetParam());
  auto model = LoadOrDie(FixtureDir(GetParam()));
  ASSERT_NE(model, nullptr);
  std::vector<int64_t> prompt = ref.at("input_ids").get<std::vector<int64_t>>();
  std::vector<int64_t> want = ref.at("greedy_next_12").get<std::vector<int64_t>>();
  std::vector<int64_t> got =
      model->GenerateGreedy(prompt, static_cast<int>(want.size()), model->config().eos_token_ids);
  EXPECT_EQ(got, want);
}

TEST_P(ParityTest, KvCacheMatchesFullForward) {
  const nlohmann::json ref = Reference(GetParam());
  auto model = LoadOrDie(FixtureDir(GetParam()));
  ASSERT_NE(model, nullptr);
  torch::NoGradGuard no_grad;
  torch::Tensor ids = Ids(ref);
  torch::Tensor full = model->Forward(ids);
  KvCache cache;
  const int64_t split = 10;
  torch::Tensor a = model->Forward(ids.slice(1, 0, split), &cache);
  torch::Tensor b = model->Forward(ids.slice(1, split), &cache);
  EXPECT_EQ(cache.length, ids.size(1));
  EXPECT_LT((torch::cat({a, b}, 1) - full).abs().max().item<double>(), 1e-4);
}

TEST_P(ParityTest, AdapterLogitsMatchPeft) {
  const nlohmann::json ref = Reference(GetParam());
  auto model = LoadOrDie(FixtureDir(GetParam()));
  ASSERT_NE(model, nullptr);
  auto adapter = LoadPeftAdapter(FixtureDir(GetParam()) + "/adapter");
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_EQ(adapter->config.rank, 4);
  EXPECT_FLOAT_EQ(adapter->config.alpha, 8.0f);
  ASSERT_TRUE(SetLora(*model, adapter->config, adapter->tensors).ok());
  torch::NoGradGuard no_grad;
  torch::Tensor ids = Ids(ref);
  EXPECT_LT(MaxDiff(model->Forward(ids), ref, "logits_with_adapter"), 1e-4);
  // The adapter really changes the output.
  EXPECT_GT(MaxDiff(model->Forward(ids), ref, "logits"), 1e-3);
  // Exported tensors equal what was loaded.
  common::TensorMap exported = ExportLora(*model);
  ASSERT_EQ(exported.size(), adapter->tensors.size());
  for (const auto& [name, t] : adapter->tensors) EXPECT_EQ(exported.at(name).data, t.data) << name;
  MergeLora(*model);
  EXPECT_TRUE(ExportLora(*model).empty());
  EXPECT_LT(MaxDiff(model->Forward(ids), ref, "logits_merged"), 1e-4);
  // Merging does not touch the file on disk: a fresh load gives the base logits again.
  auto fresh = LoadOrDie(FixtureDir(GetParam()));
  EXPECT_LT(MaxDiff(fresh->Forward(ids), ref, "logits"), 1e-4);
}

TEST_P(ParityTest, Bf16BaseStaysClose) {
  const nlohmann::json ref = Reference(GetParam());
  ModelLoadOptions opts;
  opts.base_dtype = "bf16";
  auto model = LoadOrDie(FixtureDir(GetParam()), opts);
  ASSERT_NE(model, nullptr);
  torch::NoGradGuard no_grad;
  const double diff = MaxDiff(model->Forward(Ids(ref)), ref, "logits");
  EXPECT_LT(diff, 0.1);
  EXPECT_GT(diff, 0.0);  // really rounded
}

// With autocast_bf16_weights the projections (and an untied lm_head) are
// stored in bf16 and the embeddings and norms stay fp32; under bf16 autocast
// the loss and the adapter's gradients are then bit-identical to those of the
// fp32 base, whose weights autocast rounds at every product.
TEST_P(ParityTest, AutocastBf16WeightsChangeNoProduct) {
  const nlohmann::json ref = Reference(GetParam());
  ModelLoadOptions opts;
  opts.autocast_bf16_weights = true;
  auto rounded = LoadOrDie(FixtureDir(GetParam()), opts);
  auto full = LoadOrDie(FixtureDir(GetParam()));
  ASSERT_TRUE(rounded && full);
  const auto params = rounded->NamedParameters();
  EXPECT_EQ(params.at("model.layers.0.mlp.up_proj.weight").scalar_type(), torch::kBFloat16);
  EXPECT_EQ(params.at("model.layers.0.self_attn.q_proj.weight").scalar_type(), torch::kBFloat16);
  EXPECT_EQ(params.at("model.embed_tokens.weight").scalar_type(), torch::kFloat);
  EXPECT_EQ(params.at("model.norm.weight").scalar_type(), torch::kFloat);
  const bool tied = rounded->config().tie_word_embeddings;
  if (!tied) {
    EXPECT_EQ(params.at("lm_head.weight").scalar_type(), torch::kBFloat16);
  }
  auto adapter = LoadPeftAdapter(FixtureDir(GetParam()) + "/adapter");
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  const torch::Tensor ids = Ids(ref);
  auto loss_and_grads = [&](Model& m) {
    EXPECT_TRUE(SetLora(m, adapter->config, adapter->tensors).ok());
    std::vector<torch::Tensor> lora = LoraParameters(m);
    for (auto& t : lora) t.requires_grad_(true);
    at::autocast::set_cpu_enabled(true);
    at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
    torch::Tensor hidden = m.ForwardHidden(ids.slice(1, 0, -1));
    torch::Tensor loss =
        m.HeadLossSum(hidden.reshape({-1, hidden.size(-1)}), ids.slice(1, 1).reshape({-1}));
    at::autocast::set_cpu_enabled(false);
    at::autocast::clear_cache();
    loss.backward();
    std::vector<torch::Tensor> out = {loss.detach()};
    for (const auto& t : lora) out.push_back(t.grad().clone());
    return out;
  };
  const auto a = loss_and_grads(*rounded);
  const auto b = loss_and_grads(*full);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_GT(a.size(), 1u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i], b[i])) << i;
  EXPECT_GT(a[1].abs().max().item<double>(), 0.0);
  // Outside autocast the model reads the rounded weights: close to, not equal to, fp32.
  torch::NoGradGuard no_grad;
  const double diff = MaxDiff(rounded->Forward(ids), ref, "logits_with_adapter");
  EXPECT_LT(diff, 0.1);
  EXPECT_GT(diff, 0.0);
  // Only with a fp32 base.
  opts.base_dtype = "int8";
  auto refused = Model::Load(FixtureDir(GetParam()), opts);
  EXPECT_FALSE(refused.ok());
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("autocast_bf16_weights"));
}

TEST_P(ParityTest, Int8BaseStaysCloseAndMerges) {
  const nlohmann::json ref = Reference(GetParam());
  ModelLoadOptions opts;
  opts.base_dtype = "int8";
  auto model = LoadOrDie(FixtureDir(GetParam()), opts);
  ASSERT_NE(model, nullptr);
  torch::NoGradGuard no_grad;
  const double diff = MaxDiff(model->Forward(Ids(ref)), ref, "logits");
  EXPECT_LT(diff, 0.1);
  EXPECT_GT(diff, 0.0);
  EXPECT_EQ(model->NamedParameters().at("model.layers.0.mlp.up_proj.weight").scalar_type(),
            torch::kChar);
  auto adapter = LoadPeftAdapter(FixtureDir(GetParam()) + "/adapter");
  ASSERT_TRUE(adapter.ok());
  ASSERT_TRUE(SetLora(*model, adapter->config, adapter->tensors).ok());
  torch::Tensor with_adapter = model->Forward(Ids(ref));
  EXPECT_LT(MaxDiff(with_adapter, ref, "logits_with_adapter"), 0.1);
  MergeLora(*model);
  EXPECT_LT((model->Forward(Ids(ref)) - with_adapter).abs().max().item<double>(), 1e-4);
}

TEST_P(ParityTest, Int4BaseIsWithinHalfAStepAndStaysClose) {
  const nlohmann::json ref = Reference(GetParam());
  ModelLoadOptions opts;
  opts.base_dtype = "int4";
  auto q = LoadOrDie(FixtureDir(GetParam()), opts);
  auto f = LoadOrDie(FixtureDir(GetParam()));
  ASSERT_TRUE(q && f);
  torch::NoGradGuard no_grad;
  // 1. Each group's scale is max|w| / 7 of the fp32 weights, and every
  //    dequantized weight is within half a step (scale / 2) of its fp32 value.
  const auto ql = q->AllLinears(), fl = f->AllLinears();
  ASSERT_EQ(ql.size(), fl.size());
  const int64_t g = LoraLinear::kInt4Group;
  int checked = 0;
  for (size_t i = 0; i < ql.size(); ++i) {
    if (!fl[i]->weight.defined()) continue;
    ++checked;
    ASSERT_TRUE(ql[i]->is_int4()) << i;
    const torch::Tensor w = fl[i]->weight;
    const int64_t out = w.size(0), in = w.size(1), groups = (in + g - 1) / g;
    ASSERT_EQ(ql[i]->in_features(), in);
    ASSERT_EQ(ql[i]->out_features(), out);
    EXPECT_EQ(ql[i]->weight.size(1), groups * g / 2);
    torch::Tensor padded =
        torch::cat({w, torch::zeros({out, groups * g - in})}, 1).reshape({out, groups, g});
    torch::Tensor want_scale = padded.abs().amax(-1) / 7.0;
    EXPECT_TRUE(torch::allclose(ql[i]->weight_scale, want_scale, 1e-6, 1e-12)) << i;
    torch::Tensor step = want_scale.repeat_interleave(g, 1).slice(1, 0, in);
    torch::Tensor err = (ql[i]->DenseWeight() - w).abs();
    EXPECT_TRUE((err <= step * 0.5 * (1 + 1e-5) + 1e-9).all().item<bool>()) << i;
    EXPECT_GT(err.max().item<double>(), 0.0) << i;  // really quantized
  }
  EXPECT_GT(checked, 0);
  // 2. The on-the-fly path computes exactly the model whose weights are the
  //    dequantized ones: merging a zero adapter materializes them in fp32.
  torch::Tensor ids = Ids(ref);
  torch::Tensor on_the_fly = q->Forward(ids);
  LoraConfig zero;
  zero.rank = 2;
  ASSERT_TRUE(InitLora(*q, zero).ok());  // B = 0: merging adds nothing
  MergeLora(*q);
  EXPECT_EQ(q->NamedParameters().at("model.layers.0.mlp.up_proj.weight").scalar_type(),
            torch::kFloat);
  EXPECT_LT((q->Forward(ids) - on_the_fly).abs().max().item<double>(), 1e-4);
  // 3. Against the fp32 reference. A 4-bit code has 15 levels per group, so a
  //    weight moves by up to max|w| / 14 (int8: max|w| / 254, ~18x finer); the
  //    observed logit error scales the same way. We bound it at 18x the int8
  //    ParityTest tolerance (0.1), i.e. relative to the logits' spread, and
  //    require the greedy next token to survive at most positions.
  const double spread = f->Forward(ids).abs().max().item<double>();
  const double diff = MaxDiff(on_the_fly, ref, "logits");
  EXPECT_GT(diff, 0.0);
  EXPECT_LT(diff, 0.3 * spread) << "spread " << spread;
  torch::Tensor agree = (on_the_fly.argmax(-1) == f->Forward(ids).argmax(-1)).to(torch::kFloat);
  EXPECT_GT(agree.mean().item<double>(), 0.5);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ParityTest, ::testing::Values("llama", "qwen2"));

TEST(ModelTest, BatchWithRightPaddingMatchesSingle) {
  auto model = LoadOrDie(FixtureDir("llama"));
  ASSERT_NE(model, nullptr);
  torch::NoGradGuard no_grad;
  torch::Tensor a = torch::tensor(std::vector<int64_t>{5, 6, 7, 8, 9}, torch::kLong).unsqueeze(0);
  torch::Tensor b =
      torch::tensor(std::vector<int64_t>{10, 11, 12, 0, 0}, torch::kLong).unsqueeze(0);
  torch::Tensor batch = model->Forward(torch::cat({a, b}, 0));
  torch::Tensor b_alone = model->Forward(b.slice(1, 0, 3));
  EXPECT_LT((batch[1].slice(0, 0, 3) - b_alone[0]).abs().max().item<double>(), 1e-5);
  EXPECT_LT((batch[0] - model->Forward(a)[0]).abs().max().item<double>(), 1e-5);
}

// Two examples packed into one row (plus padding) give each the hidden states
// it has alone; without the block-diagonal mask and restarted positions the
// second one would differ.
void ExpectPackedMatchesSeparate(const Model& model) {
  torch::NoGradGuard no_grad;
  const std::vector<int64_t> a = {5, 6, 7, 8, 9, 10, 11}, b = {20, 21, 22, 23, 24, 25};
  std::vector<int64_t> ids = a, pos, seg;
  ids.insert(ids.end(), b.begin(), b.end());
  ids.push_back(0);  // padding
  for (size_t t = 0; t < a.size(); ++t) pos.push_back(static_cast<int64_t>(t)), seg.push_back(0);
  for (size_t t = 0; t < b.size(); ++t) pos.push_back(static_cast<int64_t>(t)), seg.push_back(1);
  pos.push_back(0);
  seg.push_back(-1);
  auto row = [](const std::vector<int64_t>& v) {
    return torch::tensor(v, torch::kLong).unsqueeze(0);
  };
  torch::Tensor packed = model.ForwardHiddenPacked(row(ids), row(pos), row(seg));
  const int64_t na = static_cast<int64_t>(a.size()), nb = static_cast<int64_t>(b.size());
  torch::Tensor ha = model.ForwardHidden(row(a));
  torch::Tensor hb = model.ForwardHidden(row(b));
  EXPECT_LT((packed.slice(1, 0, na) - ha).abs().max().item<double>(), 1e-5);
  EXPECT_LT((packed.slice(1, na, na + nb) - hb).abs().max().item<double>(), 1e-5);
  // Plain causal attention over the concatenation lets b see a.
  torch::Tensor plain = model.ForwardHidden(row(ids));
  EXPECT_GT((plain.slice(1, na, na + nb) - hb).abs().max().item<double>(), 1e-3);
  // Shapes are checked.
  EXPECT_THROW(model.ForwardHiddenPacked(row(ids), row(pos).slice(1, 1), row(seg)), c10::Error);
}

// Packed rows run the fused attention with per-query starts; the masked plain
// path gives the same hidden states and gradients.
TEST(ModelTest, PackedFusedAttentionMatchesTheMaskedPath) {
  auto model = LoadOrDie(FixtureDir("llama"));
  ASSERT_NE(model, nullptr);
  torch::Tensor ids = torch::tensor({{5, 6, 7, 8, 9, 20, 21, 22, 23, 0, 0}}, torch::kLong);
  torch::Tensor pos = torch::tensor({{0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1}}, torch::kLong);
  torch::Tensor seg = torch::tensor({{0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1}}, torch::kLong);
  auto run = [&](bool fused) {
    model->set_fused_attention(fused);
    torch::Tensor x = model->ForwardHiddenPacked(ids, pos, seg);
    return x;
  };
  torch::Tensor fused, plain;
  {
    torch::NoGradGuard no_grad;
    fused = run(true);
    plain = run(false);
  }
  model->set_fused_attention(true);
  EXPECT_LT((fused - plain).abs().max().item<double>(), 1e-5);
}

TEST(ModelTest, PackedRowMatchesSeparateExamples) {
  auto model = LoadOrDie(FixtureDir("llama"));
  ASSERT_NE(model, nullptr);
  ExpectPackedMatchesSeparate(*model);
  auto qwen = LoadOrDie(FixtureDir("qwen2"));
  ASSERT_NE(qwen, nullptr);
  ExpectPackedMatchesSeparate(*qwen);
}

// A compact weight taller than one dequantization block (vocab-sized heads)
// gives the same product and input gradient as the whole-matrix conversion.
TEST(FrozenMatmulTest, BlockwiseDequantizationMatchesWholeMatrix) {
  torch::manual_seed(3);
  const int64_t rows = 10000, in = 48;  // 2 full blocks of 4096 and a partial one
  torch::Tensor w = torch::randn({rows, in}) * 0.05;
  LoraLinear int4;
  QuantizeInt4(w, &int4);
  torch::Tensor int8_scale = w.abs().amax(1).clamp_min(1e-30) / 127.0;
  torch::Tensor int8 = (w / int8_scale.unsqueeze(1)).round().clamp(-127, 127).to(torch::kChar);
  struct Case {
    torch::Tensor weight, scale;
    int64_t int4_in;
  };
  for (const Case& c : {Case{w.to(torch::kBFloat16), torch::Tensor(), 0}, Case{int8, int8_scale, 0},
                        Case{int4.weight, int4.weight_scale, int4.int4_in}}) {
    torch::Tensor dense = DequantizeWeight(c.weight, c.scale, c.int4_in);
    ASSERT_EQ(dense.size(0), rows);
    torch::Tensor x = torch::randn({2, 5, in}).requires_grad_(true);
    torch::Tensor y = FrozenMatmul(x, c.weight, c.scale, c.int4_in);
    torch::Tensor want = torch::matmul(x.detach(), dense.t());
    EXPECT_LT((y.detach() - want).abs().max().item<double>(), 1e-4) << c.weight.scalar_type();
    torch::Tensor g = torch::randn_like(want);
    y.backward(g);
    EXPECT_LT((x.grad() - torch::matmul(g, dense)).abs().max().item<double>(), 1e-4)
        << c.weight.scalar_type();
  }
}

TEST(ModelTest, OutOfRangeIdThrows) {
  auto model = LoadOrDie(FixtureDir("llama"));
  ASSERT_NE(model, nullptr);
  torch::NoGradGuard no_grad;
  torch::Tensor ids = torch::tensor(std::vector<int64_t>{1, 600}, torch::kLong).unsqueeze(0);
  EXPECT_THROW(model->Forward(ids), c10::Error);
}

// ---- checkpoint errors -------------------------------------------------------

class ScratchDir {
 public:
  ScratchDir() {
    char tmpl[] = "/tmp/fedlora_model_test_XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~ScratchDir() { std::system(("rm -rf '" + path_ + "'").c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void CopyFile(const std::string& from, const std::string& to) {
  auto data = common::ReadFileToString(from);
  ASSERT_TRUE(data.ok()) << data.status();
  ASSERT_TRUE(common::WriteFileAtomic(to, *data).ok());
}

TEST(ModelLoadTest, MisShapedTensorNamesBothShapes) {
  ScratchDir dir;
  CopyFile(FixtureDir("llama") + "/config.json", dir.path() + "/config.json");
  auto file = common::SafetensorsFile::Open(FixtureDir("llama") + "/model.safetensors");
  ASSERT_TRUE(file.ok());
  auto map = (*file)->ToTensorMap();
  ASSERT_TRUE(map.ok());
  common::HostTensor& k = (*map)["model.layers.1.self_attn.k_proj.weight"];
  k.shape = {64, 32};
  ASSERT_TRUE(common::WriteSafetensors(dir.path() + "/model.safetensors", *map).ok());
  auto model = Model::Load(dir.path());
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string msg(model.status().message());
  EXPECT_THAT(msg, HasSubstr("model.layers.1.self_attn.k_proj.weight"));
  EXPECT_THAT(msg, HasSubstr("[32,64]"));
  EXPECT_THAT(msg, HasSubstr("[64,32]"));
}

TEST(ModelLoadTest, MissingTensorIsNamed) {
  ScratchDir dir;
  CopyFile(FixtureDir("llama") + "/config.json", dir.path() + "/config.json");
  auto file = common::SafetensorsFile::Open(FixtureDir("llama") + "/model.safetensors");
  ASSERT_TRUE(file.ok());
  auto map = (*file)->ToTensorMap();
  ASSERT_TRUE(map.ok());
  map->erase("lm_head.weight");
  ASSERT_TRUE(common::WriteSafetensors(dir.path() + "/model.safetensors", *map).ok());
  auto model = Model::Load(dir.path());
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("lm_head.weight"));
}

TEST(ModelLoadTest, ShardedCheckpointAndHalfWeights) {
  // Split the llama fixture into two shards (one stored as bf16, one as f32).
  ScratchDir dir;
  CopyFile(FixtureDir("llama") + "/config.json", dir.path() + "/config.json");
  auto file = common::SafetensorsFile::Open(FixtureDir("llama") + "/model.safetensors");
  ASSERT_TRUE(file.ok());
  auto map = (*file)->ToTensorMap();
  ASSERT_TRUE(map.ok());
  common::TensorMap first, second;
  nlohmann::json index;
  for (auto& [name, t] : *map) {
    const bool in_first = name.find("layers.1.") == std::string::npos;
    (in_first ? first : second)[name] = t;
    index["weight_map"][name] =
        in_first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  ASSERT_TRUE(
      common::WriteSafetensors(dir.path() + "/model-00001-of-00002.safetensors", first).ok());
  ASSERT_TRUE(common::WriteSafetensors(dir.path() + "/model-00002-of-00002.safetensors", second, {},
                                       common::DType::kBF16)
                  .ok());
  ASSERT_TRUE(
      common::WriteFileAtomic(dir.path() + "/model.safetensors.index.json", index.dump()).ok());
  auto model = LoadOrDie(dir.path());
  ASSERT_NE(model, nullptr);
  EXPECT_EQ(model->checkpoint_dtypes().at("BF16"), 9);
  const nlohmann::json ref = Reference("llama");
  torch::NoGradGuard no_grad;
  const double diff = MaxDiff(model->Forward(Ids(ref)), ref, "logits");
  EXPECT_LT(diff, 0.1);
  EXPECT_GT(diff, 1e-6);

  // A shard name escaping the folder is rejected.
  index["weight_map"]["lm_head.weight"] = "../evil.safetensors";
  ASSERT_TRUE(
      common::WriteFileAtomic(dir.path() + "/model.safetensors.index.json", index.dump()).ok());
  auto bad = Model::Load(dir.path());
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("lm_head.weight"));
}

TEST(ModelLoadTest, MissingWeightsFile) {
  ScratchDir dir;
  CopyFile(FixtureDir("llama") + "/config.json", dir.path() + "/config.json");
  auto model = Model::Load(dir.path());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("model.safetensors"));
}

TEST(ModelLoadTest, UnknownBaseDType) {
  ModelLoadOptions opts;
  opts.base_dtype = "int3";
  auto model = Model::Load(FixtureDir("llama"), opts);
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("int3"));
}

// ---- config ---------------------------------------------------------------

TEST(ModelConfigTest, ParsesFixtures) {
  auto llama = LoadModelConfig(FixtureDir("llama"));
  ASSERT_TRUE(llama.ok()) << llama.status();
  EXPECT_EQ(llama->architecture, Architecture::kLlama);
  EXPECT_EQ(llama->hidden_size, 64);
  EXPECT_EQ(llama->num_key_value_heads, 2);
  EXPECT_EQ(llama->head_dim, 16);
  EXPECT_DOUBLE_EQ(llama->rope_theta, 10000.0);
  EXPECT_FALSE(llama->tie_word_embeddings);
  EXPECT_EQ(llama->bos_token_id, 1);
  EXPECT_EQ(llama->eos_token_ids, std::vector<int64_t>{2});
  auto qwen = LoadModelConfig(FixtureDir("qwen2"));
  ASSERT_TRUE(qwen.ok()) << qwen.status();
  EXPECT_EQ(qwen->architecture, Architecture::kQwen2);
  EXPECT_TRUE(qwen->attention_bias);
  EXPECT_TRUE(qwen->tie_word_embeddings);
  EXPECT_DOUBLE_EQ(qwen->rope_theta, 1e6);
  EXPECT_FALSE(qwen->bos_token_id.has_value());
  EXPECT_TRUE(qwen->eos_token_ids.empty());
}

nlohmann::json BaseConfig() {
  return nlohmann::json::parse(R"({"architectures":["LlamaForCausalLM"],"hidden_size":64,
    "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100})");
}

TEST(ModelConfigTest, DefaultsAndVariants) {
  nlohmann::json j = BaseConfig();
  j["rope_theta"] = 500000.0;
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  j["eos_token_id"] = {128001, 128008};
  auto c = ParseModelConfig(j.dump(), "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_EQ(c->num_key_value_heads, 4);
  EXPECT_EQ(c->rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(c->rope_theta, 500000.0);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int64_t>{128001, 128008}));
  nlohmann::json phi = BaseConfig();
  phi["architectures"] = {"Phi3ForCausalLM"};
  phi["sliding_window"] = 2047;
  auto p = ParseModelConfig(phi.dump(), "config.json");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->architecture, Architecture::kPhi3);
  EXPECT_EQ(p->sliding_window, 2047);
}

TEST(ModelConfigTest, Errors) {
  auto expect_error = [](const nlohmann::json& j, const std::string& a, const std::string& b) {
    auto c = ParseModelConfig(j.dump(), "cfg.json");
    ASSERT_FALSE(c.ok()) << j.dump();
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(c.status().message()), HasSubstr("cfg.json"));
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(a));
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(b));
  };
  nlohmann::json j = BaseConfig();
  j["architectures"] = {"GPT2LMHeadModel"};
  expect_error(j, "GPT2LMHeadModel", "unsupported");
  j = BaseConfig();
  j.erase("hidden_size");
  expect_error(j, "hidden_size", "missing");
  j = BaseConfig();
  j["num_attention_heads"] = "four";
  expect_error(j, "num_attention_heads", "positive integer");
  j = BaseConfig();
  j["num_key_value_heads"] = 3;
  expect_error(j, "num_key_value_heads", "divisor");
  j = BaseConfig();
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  expect_error(j, "rope_scaling", "yarn");
  j = BaseConfig();
  j["hidden_act"] = "gelu";
  expect_error(j, "hidden_act", "gelu");
  j = BaseConfig();
  j["num_hidden_layers"] = 1000000000;
  expect_error(j, "num_hidden_layers", "at most");
  j = BaseConfig();
  j["partial_rotary_factor"] = 0.75;
  expect_error(j, "partial_rotary_factor", "0.75");
  j = BaseConfig();
  j["head_dim"] = 7;
  expect_error(j, "head_dim", "even");
  auto c = ParseModelConfig("{not json", "cfg.json");
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("not valid JSON"));
}

TEST(RopeTest, Llama3ScalingChangesOnlyLowFrequencies) {
  // Load the llama fixture twice with different rope configs and compare logits:
  // llama3 scaling with factor 1 is the identity.
  ScratchDir dir;
  auto cfg_text = common::ReadFileToString(FixtureDir("llama") + "/config.json");
  ASSERT_TRUE(cfg_text.ok());
  nlohmann::json cfg = nlohmann::json::parse(*cfg_text);
  cfg["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", 1.0},
                         {"low_freq_factor", 1.0},
                         {"high_freq_factor", 4.0},
                         {"original_max_position_embeddings", 64}};
  ASSERT_TRUE(common::WriteFileAtomic(dir.path() + "/config.json", cfg.dump()).ok());
  ASSERT_EQ(symlink((FixtureDir("llama") + "/model.safetensors").c_str(),
                    (dir.path() + "/model.safetensors").c_str()),
            0);
  const nlohmann::json ref = Reference("llama");
  torch::NoGradGuard no_grad;
  auto same = LoadOrDie(dir.path());
  ASSERT_NE(same, nullptr);
  EXPECT_LT(MaxDiff(same->Forward(Ids(ref)), ref, "logits"), 1e-4);
  cfg["rope_scaling"]["factor"] = 8.0;
  ASSERT_TRUE(common::WriteFileAtomic(dir.path() + "/config.json", cfg.dump()).ok());
  auto scaled = LoadOrDie(dir.path());
  ASSERT_NE(scaled, nullptr);
  EXPECT_GT(MaxDiff(scaled->Forward(Ids(ref)), ref, "logits"), 1e-4);
}

// ---- LoRA -------------------------------------------------------------------

TEST(LoraTest, InitIsDeterministicAndPeftShaped) {
  auto m1 = LoadOrDie(FixtureDir("llama"));
  auto m2 = LoadOrDie(FixtureDir("llama"));
  ASSERT_TRUE(m1 && m2);
  LoraConfig cfg;
  cfg.rank = 4;
  cfg.init_seed = 42;
  ASSERT_TRUE(InitLora(*m1, cfg).ok());
  ASSERT_TRUE(InitLora(*m2, cfg).ok());
  common::TensorMap a = ExportLora(*m1), b = ExportLora(*m2);
  ASSERT_EQ(a.size(), 2u * 7 * 2);
  for (const auto& [name, t] : a) EXPECT_EQ(t.data, b.at(name).data) << name;
  const auto& qa = a.at("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  EXPECT_EQ(qa.shape, (std::vector<int64_t>{4, 64}));
  const auto& db = a.at("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight");
  EXPECT_EQ(db.shape, (std::vector<int64_t>{64, 4}));
  for (float v : db.data) EXPECT_EQ(v, 0.0f);
  // A ~ U(-1/sqrt(in), 1/sqrt(in)) and not degenerate.
  float lo = 1, hi = -1;
  for (float v : qa.data) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  EXPECT_GE(lo, -0.125f);
  EXPECT_LE(hi, 0.125f);
  EXPECT_LT(lo, -0.08f);
  EXPECT_GT(hi, 0.08f);
  // A different seed gives a different A; B = 0 keeps the base logits.
  cfg.init_seed = 43;
  ASSERT_TRUE(InitLora(*m2, cfg).ok());
  EXPECT_NE(
      ExportLora(*m2).at("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").data,
      qa.data);
  const nlohmann::json ref = Reference("llama");
  torch::NoGradGuard no_grad;
  EXPECT_LT(MaxDiff(m2->Forward(Ids(ref)), ref, "logits"), 1e-4);
}

TEST(LoraTest, TargetSubsetAndErrors) {
  auto m = LoadOrDie(FixtureDir("llama"));
  ASSERT_NE(m, nullptr);
  LoraConfig cfg;
  cfg.rank = 2;
  cfg.target_modules = {"q_proj", "v_proj"};
  ASSERT_TRUE(InitLora(*m, cfg).ok());
  common::TensorMap t = ExportLora(*m);
  EXPECT_EQ(t.size(), 2u * 2 * 2);
  EXPECT_TRUE(t.count("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"));
  EXPECT_EQ(LoraParameters(*m).size(), 8u);
  for (const auto& p : LoraParameters(*m)) EXPECT_TRUE(p.requires_grad());

  // SetLora: missing, extra, mis-shaped, non-finite.
  common::TensorMap missing = t;
  missing.erase("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  absl::Status s = SetLora(*m, cfg, missing);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("layers.0.self_attn.q_proj.lora_A.weight"));
  common::TensorMap extra = t;
  extra["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] =
      common::HostTensor{{2, 64}, std::vector<float>(128)};
  s = SetLora(*m, cfg, extra);
  EXPECT_THAT(std::string(s.message()), HasSubstr("unexpected tensor"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("k_proj.lora_A"));
  common::TensorMap shaped = t;
  shaped["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape = {2, 32};
  s = SetLora(*m, cfg, shaped);
  EXPECT_THAT(std::string(s.message()), HasSubstr("[32,2]"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("[2,32]"));
  common::TensorMap nan = t;
  nan["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].data[3] = NAN;
  s = SetLora(*m, cfg, nan);
  EXPECT_THAT(std::string(s.message()), HasSubstr("finite"));
  // The adapter is unchanged after failed SetLora calls.
  common::TensorMap after = ExportLora(*m);
  for (const auto& [name, v] : t) EXPECT_EQ(after.at(name).data, v.data);

  LoraConfig bad = cfg;
  bad.target_modules = {"qkv_proj"};
  s = InitLora(*m, bad);
  EXPECT_THAT(std::string(s.message()), HasSubstr("qkv_proj"));
  bad = cfg;
  bad.rank = 0;
  EXPECT_FALSE(InitLora(*m, bad).ok());
  bad = cfg;
  bad.dropout = 1.0f;
  EXPECT_FALSE(InitLora(*m, bad).ok());
  bad = cfg;
  bad.alpha = -1;
  EXPECT_FALSE(InitLora(*m, bad).ok());
}

TEST(LoraTest, ScaleAndRsLora) {
  LoraConfig cfg;
  cfg.rank = 16;
  cfg.alpha = 32;
  EXPECT_DOUBLE_EQ(LoraScale(cfg), 2.0);
  cfg.use_rslora = true;
  EXPECT_DOUBLE_EQ(LoraScale(cfg), 8.0);
}

TEST(LoraTest, DropoutOnlyWhenTraining) {
  auto m = LoadOrDie(FixtureDir("llama"));
  ASSERT_NE(m, nullptr);
  auto adapter = LoadPeftAdapter(FixtureDir("llama") + "/adapter");
  ASSERT_TRUE(adapter.ok());
  adapter->config.dropout = 0.5f;
  ASSERT_TRUE(SetLora(*m, adapter->config, adapter->tensors).ok());
  const nlohmann::json ref = Reference("llama");
  torch::NoGradGuard no_grad;
  EXPECT_LT(MaxDiff(m->Forward(Ids(ref)), ref, "logits_with_adapter"), 1e-4);
  torch::Generator gen = at::detail::createCPUGenerator(1);
  EXPECT_GT(MaxDiff(m->Forward(Ids(ref), nullptr, &gen), ref, "logits_with_adapter"), 1e-3);
}

TEST(PeftTest, WriteThenLoadRoundTrips) {
  auto adapter = LoadPeftAdapter(FixtureDir("qwen2") + "/adapter");
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  ScratchDir dir;
  const std::string out = dir.path() + "/exported";
  ASSERT_TRUE(WritePeftAdapter(out, adapter->config, adapter->tensors, "tiny-qwen2").ok());
  auto again = LoadPeftAdapter(out);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->config.rank, adapter->config.rank);
  EXPECT_EQ(again->config.alpha, adapter->config.alpha);
  EXPECT_EQ(again->config.target_modules, adapter->config.target_modules);
  ASSERT_EQ(again->tensors.size(), adapter->tensors.size());
  for (const auto& [name, t] : adapter->tensors) EXPECT_EQ(again->tensors.at(name).data, t.data);
}

TEST(PeftTest, RejectsUnsupportedConfigs) {
  ScratchDir dir;
  CopyFile(FixtureDir("llama") + "/adapter/adapter_model.safetensors",
           dir.path() + "/adapter_model.safetensors");
  auto cfg_text = common::ReadFileToString(FixtureDir("llama") + "/adapter/adapter_config.json");
  ASSERT_TRUE(cfg_text.ok());
  auto try_with = [&](const std::string& key, const nlohmann::json& value) {
    nlohmann::json cfg = nlohmann::json::parse(*cfg_text);
    cfg[key] = value;
    EXPECT_TRUE(common::WriteFileAtomic(dir.path() + "/adapter_config.json", cfg.dump()).ok());
    return LoadPeftAdapter(dir.path()).status();
  };
  EXPECT_THAT(std::string(try_with("use_dora", true).message()), HasSubstr("DoRA"));
  EXPECT_THAT(std::string(try_with("r", 0).message()), HasSubstr("'r'"));
  EXPECT_THAT(std::string(try_with("rank_pattern", {{"q_proj", 8}}).message()),
              HasSubstr("rank_pattern"));
  EXPECT_THAT(std::string(try_with("peft_type", "IA3").message()), HasSubstr("IA3"));
  EXPECT_THAT(std::string(try_with("lora_alpha", "x").message()), HasSubstr("lora_alpha"));
  EXPECT_TRUE(try_with("lora_dropout", 0.1).ok());
  // Wrong rank in the config vs the tensors: SetLora names the tensor.
  auto model = LoadOrDie(FixtureDir("llama"));
  ASSERT_NE(model, nullptr);
  ASSERT_TRUE(try_with("r", 8).ok());
  auto adapter = LoadPeftAdapter(dir.path());
  ASSERT_TRUE(adapter.ok());
  absl::Status s = SetLora(*model, adapter->config, adapter->tensors);
  EXPECT_THAT(std::string(s.message()), HasSubstr("[8,"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("[4,"));
}

}  // namespace
}  // namespace fedlora::edge

namespace fedlora::edge {
namespace {

// Rewrites the llama fixture as another architecture with the same math.
void WriteVariant(const std::string& dir, const std::string& arch, bool fuse,
                  int64_t sliding_window) {
  const std::string model_type = arch == "Phi3ForCausalLM"      ? "phi3"
                                 : arch == "MistralForCausalLM" ? "mistral"
                                                                : "llama";
  testutil::WriteArchitectureVariant(FixtureDir("llama"), dir, arch, model_type, fuse,
                                     sliding_window);
}

TEST(ArchitectureTest, Phi3FusedProjectionsMatchLlama) {
  ScratchDir dir;
  WriteVariant(dir.path(), "Phi3ForCausalLM", /*fuse=*/true, 0);
  auto model = LoadOrDie(dir.path());
  ASSERT_NE(model, nullptr);
  EXPECT_EQ(model->config().architecture, Architecture::kPhi3);
  const nlohmann::json ref = Reference("llama");
  {
    torch::NoGradGuard no_grad;
    EXPECT_LT(MaxDiff(model->Forward(Ids(ref)), ref, "logits"), 1e-4);
  }
  // LoRA on Phi-3 targets the fused modules; unfused names select them.
  LoraConfig cfg;
  cfg.rank = 2;
  cfg.target_modules = {"q_proj", "up_proj"};
  ASSERT_TRUE(InitLora(*model, cfg).ok());
  common::TensorMap t = ExportLora(*model);
  ASSERT_EQ(t.size(), 2u * 2 * 2);
  EXPECT_EQ(t.at("base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight").shape,
            (std::vector<int64_t>{128, 2}));
  EXPECT_EQ(t.at("base_model.model.model.layers.1.mlp.gate_up_proj.lora_A.weight").shape,
            (std::vector<int64_t>{2, 64}));
  // The llama adapter's q/k/v pieces, stacked into qkv_proj B (A shared is not
  // expressible), are not accepted under unfused names.
  auto adapter = LoadPeftAdapter(FixtureDir("llama") + "/adapter");
  ASSERT_TRUE(adapter.ok());
  EXPECT_FALSE(SetLora(*model, adapter->config, adapter->tensors).ok());
}

TEST(ArchitectureTest, MistralMatchesLlamaAndSlidingWindowMasks) {
  ScratchDir dir;
  WriteVariant(dir.path(), "MistralForCausalLM", false, 0);
  const nlohmann::json ref = Reference("llama");
  torch::NoGradGuard no_grad;
  auto model = LoadOrDie(dir.path());
  ASSERT_NE(model, nullptr);
  EXPECT_LT(MaxDiff(model->Forward(Ids(ref)), ref, "logits"), 1e-4);

  ScratchDir sw_dir;
  WriteVariant(sw_dir.path(), "MistralForCausalLM", false, 4);
  auto sw = LoadOrDie(sw_dir.path());
  ASSERT_NE(sw, nullptr);
  EXPECT_EQ(sw->config().sliding_window, 4);
  torch::Tensor ids = Ids(ref);
  torch::Tensor full = sw->Forward(ids);
  // The first 4 positions see the same keys as without a window; later ones do not.
  torch::Tensor plain = model->Forward(ids);
  EXPECT_LT((full.slice(1, 0, 4) - plain.slice(1, 0, 4)).abs().max().item<double>(), 1e-5);
  EXPECT_GT((full.slice(1, 4) - plain.slice(1, 4)).abs().max().item<double>(), 1e-4);
  // Token-by-token decoding with the cache applies the same window.
  KvCache cache;
  std::vector<torch::Tensor> steps;
  for (int64_t t = 0; t < ids.size(1); ++t)
    steps.push_back(sw->Forward(ids.slice(1, t, t + 1), &cache));
  EXPECT_LT((torch::cat(steps, 1) - full).abs().max().item<double>(), 1e-4);
  // Packed rows apply the window within each example too.
  ExpectPackedMatchesSeparate(*sw);
}

}  // namespace
}  // namespace fedlora::edge

namespace fedlora::edge {
namespace {

// The LoRA branch runs as one node on oneDNN (fp32, autocast off); with the
// torch backend it runs on autograd's matmuls. Same values and gradients for
// x, A and B, and a frozen A (FFA-LoRA) gets none.
TEST(LoraBranchTest, OneDnnNodeMatchesTheTorchPath) {
  torch::manual_seed(21);
  LoraLinear l;
  l.weight = torch::randn({48, 40}) * 0.1;
  l.lora_a = (torch::randn({4, 40}) * 0.2).requires_grad_(true);
  l.lora_b = (torch::randn({48, 4}) * 0.2).requires_grad_(true);
  l.scale = 2.0;
  const torch::Tensor x0 = torch::randn({3, 7, 40});
  const torch::Tensor up = torch::randn({3, 7, 48});
  auto run = [&](GemmBackend backend) {
    GemmBackendScope scope(backend);
    torch::Tensor x = x0.clone().requires_grad_(true);
    l.lora_a.mutable_grad() = torch::Tensor();
    l.lora_b.mutable_grad() = torch::Tensor();
    torch::Tensor y = l.forward(x);
    y.backward(up);
    return std::vector<torch::Tensor>{y.detach(), x.grad(), l.lora_a.grad().clone(),
                                      l.lora_b.grad().clone()};
  };
  const int64_t before = OnednnGemmCount();
  const auto fast = run(GemmBackend::kOnednn);
  // base forward + input gradient (2), LoRA forward (2) and backward (4).
  EXPECT_EQ(OnednnGemmCount() - before, 8);
  const auto ref = run(GemmBackend::kTorch);
  const char* names[] = {"y", "grad x", "grad A", "grad B"};
  for (size_t i = 0; i < ref.size(); ++i) {
    const double scale = ref[i].abs().max().item<double>();
    EXPECT_LT((fast[i] - ref[i]).abs().max().item<double>(), 1e-5 * scale + 1e-6) << names[i];
  }
  // A frozen: only B (and x) get gradients.
  l.lora_a = l.lora_a.detach();
  torch::Tensor x = x0.clone().requires_grad_(true);
  l.lora_b.mutable_grad() = torch::Tensor();
  l.forward(x).backward(up);
  EXPECT_FALSE(l.lora_a.grad().defined());
  EXPECT_LT((l.lora_b.grad() - ref[3]).abs().max().item<double>(),
            1e-5 * ref[3].abs().max().item<double>());
  EXPECT_LT((x.grad() - ref[1]).abs().max().item<double>(), 1e-5 * ref[1].abs().max().item<double>());
}

// Training a projection with an adapter runs it as one node whose GEMMs add
// the adapter's share into the frozen product and into its input gradient. The
// values are the formula's: frozen product (bf16-rounded operands under
// autocast, the dequantized weight when int8) + bias + scale (x A^T) B^T in
// fp32, and its gradients.
TEST(LoraBranchTest, OneNodeProjectionMatchesTheFormula) {
  torch::manual_seed(23);
  auto rounded = [](const torch::Tensor& t) { return t.to(torch::kBFloat16).to(torch::kFloat); };
  for (const std::string mode : {"fp32", "int8", "autocast"}) {
    LoraLinear l;
    const torch::Tensor w = torch::randn({32, 40}) * 0.1;
    l.weight = w;
    if (mode == "int8") {
      l.weight_scale = w.abs().amax(1) / 127.0;
      l.weight = (w / l.weight_scale.unsqueeze(1)).round().clamp(-127, 127).to(torch::kChar);
    }
    l.bias = torch::randn({32});
    l.lora_a = (torch::randn({4, 40}) * 0.2).requires_grad_(true);
    l.lora_b = (torch::randn({32, 4}) * 0.2).requires_grad_(true);
    l.scale = 1.5;
    const torch::Tensor x0 = torch::randn({2, 5, 40}), up = torch::randn({2, 5, 32});
    torch::Tensor x = x0.clone().requires_grad_(true);
    const bool autocast = mode == "autocast";
    if (autocast) {
      at::autocast::set_cpu_enabled(true);
      at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
    }
    const int64_t before = OnednnGemmCount();
    torch::Tensor y = l.forward(x);
    if (autocast) {
      at::autocast::set_cpu_enabled(false);
      at::autocast::clear_cache();
    }
    ASSERT_EQ(y.scalar_type(), torch::kFloat) << mode;
    y.backward(up);
    EXPECT_EQ(OnednnGemmCount() - before, 8) << mode;  // 2 frozen + 2 forward + 4 backward

    const torch::Tensor dense = l.DenseWeight();
    const torch::Tensor wf = autocast ? rounded(dense) : dense;
    const torch::Tensor xf = autocast ? rounded(x0) : x0;
    const torch::Tensor a = l.lora_a.detach(), b = l.lora_b.detach();
    const torch::Tensor hs = torch::matmul(x0, a.t()) * l.scale;
    const torch::Tensor y_ref = torch::matmul(xf, wf.t()) + l.bias + torch::matmul(hs, b.t());
    const torch::Tensor gh = torch::matmul(up, b) * l.scale;
    const torch::Tensor gx_ref =
        torch::matmul(autocast ? rounded(up) : up, wf) + torch::matmul(gh, a);
    const torch::Tensor ga_ref = torch::matmul(gh.reshape({-1, 4}).t(), x0.reshape({-1, 40}));
    const torch::Tensor gb_ref = torch::matmul(up.reshape({-1, 32}).t(), hs.reshape({-1, 4}));
    auto close = [&](const torch::Tensor& got, const torch::Tensor& want, const char* what) {
      EXPECT_LT((got - want).abs().max().item<double>(), 1e-5 * want.abs().max().item<double>() + 1e-5)
          << mode << " " << what;
    };
    close(y.detach(), y_ref, "y");
    close(x.grad(), gx_ref, "grad x");
    close(l.lora_a.grad(), ga_ref, "grad A");
    close(l.lora_b.grad(), gb_ref, "grad B");
  }
}

// Projections reading one input (q, k, v) train as one node with the
// adapters' A stacked: the same outputs and gradients as each projection's own
// node, in fewer GEMMs (per projection 8; here 1 + 3 + 3 forward and 3 + 3 + 3 +
// 1 + 1 backward for three). Also when an output is unused (its adapter gets
// no gradient) or A is frozen.
TEST(LoraBranchTest, SharedInputNodeMatchesSeparateProjections) {
  torch::manual_seed(24);
  std::vector<LoraLinear> ls(3);
  const int64_t outs[] = {40, 16, 16};
  for (int i = 0; i < 3; ++i) {
    ls[i].weight = torch::randn({outs[i], 40}) * 0.1;
    ls[i].lora_a = (torch::randn({4, 40}) * 0.2).requires_grad_(true);
    ls[i].lora_b = (torch::randn({outs[i], 4}) * 0.2).requires_grad_(true);
    ls[i].scale = 2.0;
  }
  ls[1].bias = torch::randn({16});
  const torch::Tensor x0 = torch::randn({2, 6, 40});
  for (const bool use_all : {true, false}) {
    for (const bool frozen_a : {false, true}) {
      for (auto& l : ls) {
        l.lora_a = l.lora_a.detach().requires_grad_(!frozen_a);
        l.lora_b = l.lora_b.detach().requires_grad_(true);
      }
      auto run = [&](bool shared) {
        torch::Tensor x = x0.clone().requires_grad_(true);
        std::vector<torch::Tensor> ys;
        if (shared) {
          ys = ForwardSharedInput({&ls[0], &ls[1], &ls[2]}, x);
        } else {
          for (const auto& l : ls) ys.push_back(l.forward(x));
        }
        torch::manual_seed(25);
        torch::Tensor loss = (ys[0] * torch::randn(ys[0].sizes())).sum() +
                             (ys[2] * torch::randn(ys[2].sizes())).sum();
        if (use_all) loss = loss + (ys[1] * torch::randn(ys[1].sizes())).sum();
        loss.backward();
        std::vector<torch::Tensor> out = {ys[0].detach(), ys[1].detach(), ys[2].detach(), x.grad()};
        for (auto& l : ls) {
          out.push_back(l.lora_a.grad().defined() ? l.lora_a.grad().clone() : torch::Tensor());
          out.push_back(l.lora_b.grad().defined() ? l.lora_b.grad().clone() : torch::Tensor());
          l.lora_a.mutable_grad() = torch::Tensor();
          l.lora_b.mutable_grad() = torch::Tensor();
        }
        return out;
      };
      const int64_t c0 = OnednnGemmCount();
      const auto shared = run(true);
      const int64_t c1 = OnednnGemmCount();
      const auto separate = run(false);
      const int64_t c2 = OnednnGemmCount();
      EXPECT_LT(c1 - c0, c2 - c1) << "fewer GEMMs";
      if (use_all && !frozen_a) {
        EXPECT_EQ(c1 - c0, 18);
        EXPECT_EQ(c2 - c1, 24);
      }
      ASSERT_EQ(shared.size(), separate.size());
      for (size_t i = 0; i < shared.size(); ++i) {
        ASSERT_EQ(shared[i].defined(), separate[i].defined()) << i;
        if (!shared[i].defined()) continue;
        const double scale = separate[i].abs().max().item<double>();
        EXPECT_LT((shared[i] - separate[i]).abs().max().item<double>(), 1e-5 * scale + 1e-6)
            << "output " << i << " use_all " << use_all << " frozen_a " << frozen_a;
      }
      // The unused output's adapter gets no gradient, as with its own node.
      if (!use_all) {
        EXPECT_FALSE(shared[6].defined());
        EXPECT_FALSE(shared[7].defined());
      }
    }
  }
}

// Under CPU autocast (bf16, oneDNN backend) a frozen fp32 projection is the
// product of the bf16-rounded operands, kept in fp32 (autocast's own matmul
// would round it to bf16), and its bf16 weight copy is not kept for backward:
// the input gradient is the product of the rounded upstream gradient and
// weight. Autocast's matmul agrees to bf16 rounding.
TEST(AutocastFrozenMatmulTest, ProductsOfRoundedOperandsInFp32) {
  torch::manual_seed(22);
  const torch::Tensor w = torch::randn({24, 40}) * 0.1;  // frozen fp32
  const torch::Tensor x0 = torch::randn({3, 5, 40});
  const torch::Tensor up = torch::randn({3, 5, 24});
  auto rounded = [](const torch::Tensor& t) { return t.to(torch::kBFloat16).to(torch::kFloat); };
  auto run = [&](bool ours) {
    torch::Tensor x = x0.clone().requires_grad_(true);
    at::autocast::set_cpu_enabled(true);
    at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
    torch::Tensor y = ours ? FrozenMatmul(x, w, torch::Tensor(), 0) : torch::matmul(x, w.t());
    at::autocast::set_cpu_enabled(false);
    at::autocast::clear_cache();
    y.backward(up.to(y.scalar_type()));
    return std::make_pair(y.detach(), x.grad());
  };
  const auto [y1, g1] = run(true);
  EXPECT_EQ(y1.scalar_type(), torch::kFloat);
  EXPECT_EQ(g1.scalar_type(), torch::kFloat);
  const torch::Tensor y_ref = torch::matmul(rounded(x0), rounded(w).t());
  const torch::Tensor g_ref = torch::matmul(rounded(up), rounded(w));
  EXPECT_LT((y1 - y_ref).abs().max().item<double>(), 1e-5);
  EXPECT_LT((g1 - g_ref).abs().max().item<double>(), 1e-5);
  const auto [y2, g2] = run(false);
  EXPECT_EQ(y2.scalar_type(), torch::kBFloat16);
  EXPECT_LT((y1 - y2.to(torch::kFloat)).abs().max().item<double>(),
            1e-2 * y_ref.abs().max().item<double>());
  EXPECT_LT((g1 - g2).abs().max().item<double>(), 1e-2 * g_ref.abs().max().item<double>());
}

}  // namespace
}  // namespace fedlora::edge
