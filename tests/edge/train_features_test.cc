// Training features of the libtorch engine (edge-agent/engine.h, trainer.h):
// FFA-LoRA (frozen A), FedProx's proximal term, gradient accumulation,
// progress reporting, gradient checkpointing, checkpoint/resume, sequence
// packing, bf16 autocast, replay, the forgetting probe and evaluation
// (perplexity, exact match / token F1 from greedy generation).
#include <ATen/autocast_mode.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "edge-agent/engine.h"
#include "edge-agent/gemm.h"
#include "edge-agent/lora.h"
#include "edge-agent/model.h"
#include "edge-agent/trainer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fedlora::edge {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string FixtureDir(const std::string& model) {
  return std::string(FEDLORA_FIXTURES) + "/hf/" + model;
}

std::unique_ptr<LocalTrainer> Load(const std::string& model = "llama") {
  EngineOptions opts;
  opts.threads = 1;
  auto t = LoadTrainer(FixtureDir(model), opts);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(t).value() : nullptr;
}

// Eight short examples of different lengths (so batches need padding).
std::vector<Example> Data() {
  return {
      {"### Instruction:\nWhat is the patient's blood pressure?\n\n### Response:\n", "140/90"},
      {"### Instruction:\nWhich drug is prescribed?\n\n### Response:\n", "metformin 500mg BID"},
      {"### Instruction:\nHow old is the patient?\n\n### Response:\n", "54 years"},
      {"### Instruction:\nWhat is the sex of the patient?\n\n### Response:\n", "male"},
      {"### Instruction:\nName the diagnosis.\n\n### Response:\n", "type 2 diabetes mellitus"},
      {"### Instruction:\nAllergies?\n\n### Response:\n", "penicillin"},
      {"### Instruction:\nHeart rate at admission?\n\n### Response:\n", "88 bpm, regular"},
      {"### Instruction:\nDischarge plan?\n\n### Response:\n", "follow up in two weeks"},
  };
}

// General text (replay data / forgetting probe): empty prompt, loss on all of it.
std::vector<Example> General() {
  return {{"", "The quick brown fox jumps over the lazy dog."},
          {"", "Water boils at one hundred degrees Celsius at sea level."},
          {"", "Paris is the capital of France."}};
}

LoraConfig SmallLora() {
  LoraConfig c;
  c.rank = 4;
  c.alpha = 8;
  c.init_seed = 5;
  return c;
}

TrainOptions Options() {
  TrainOptions o;
  o.steps = 6;
  o.learning_rate = 1e-2f;
  o.batch_size = 4;
  o.max_seq_len = 64;
  o.seed = 3;
  return o;
}

common::TensorMap Adapter(LocalTrainer& t) {
  auto a = t.GetAdapter();
  EXPECT_TRUE(a.ok()) << a.status();
  return a.ok() ? *a : common::TensorMap{};
}

bool IsA(const std::string& name) { return name.find("lora_A") != std::string::npos; }

// L2 distance between two adapters over the tensors `pick` selects.
double Distance(const common::TensorMap& x, const common::TensorMap& y,
                bool (*pick)(const std::string&) = nullptr) {
  double d = 0;
  for (const auto& [name, t] : x) {
    if (pick != nullptr && !pick(name)) continue;
    const auto& u = y.at(name).data;
    for (size_t i = 0; i < t.data.size(); ++i) d += (t.data[i] - u[i]) * (t.data[i] - u[i]);
  }
  return std::sqrt(d);
}

double MaxAbsDiff(const common::TensorMap& x, const common::TensorMap& y) {
  double d = 0;
  for (const auto& [name, t] : x) {
    const auto& u = y.at(name).data;
    for (size_t i = 0; i < t.data.size(); ++i) d = std::max<double>(d, std::abs(t.data[i] - u[i]));
  }
  return d;
}

TEST(FfaLoraTest, FrozenAStaysBitIdenticalAndBTrains) {
  auto t = Load();
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->InitAdapter(SmallLora()).ok());
  const common::TensorMap before = Adapter(*t);
  TrainOptions o = Options();
  o.freeze_lora_a = true;
  o.weight_decay = 0.1f;  // decoupled decay would move A if it were in the optimizer
  ASSERT_TRUE(t->Train(Data(), o).ok());
  const common::TensorMap after = Adapter(*t);
  ASSERT_EQ(after.size(), before.size());
  for (const auto& [name, tensor] : before) {
    if (IsA(name)) {
      EXPECT_EQ(after.at(name).data, tensor.data) << name;
    } else {
      EXPECT_NE(after.at(name).data, tensor.data) << name;
    }
  }
  // A is trainable again afterwards: an unfrozen run moves it.
  o.freeze_lora_a = false;
  ASSERT_TRUE(t->Train(Data(), o).ok());
  EXPECT_GT(Distance(Adapter(*t), after, IsA), 0.0);
}

TEST(FedProxTest, ProximalTermValueAndGradient) {
  torch::manual_seed(1);
  torch::Tensor w1 = torch::randn({3, 4}).requires_grad_(true);
  torch::Tensor w2 = torch::randn({5}).requires_grad_(true);
  torch::Tensor a1 = torch::randn({3, 4}), a2 = torch::randn({5});
  const double mu = 0.37;
  torch::Tensor term = ProximalTerm({w1, w2}, {a1, a2}, mu);
  const double want =
      mu / 2 * ((w1 - a1).pow(2).sum() + (w2 - a2).pow(2).sum()).item<double>();
  EXPECT_NEAR(term.item<double>(), want, 1e-5);
  term.backward();
  EXPECT_TRUE(torch::allclose(w1.grad(), mu * (w1.detach() - a1), 1e-5, 1e-6));
  EXPECT_TRUE(torch::allclose(w2.grad(), mu * (w2.detach() - a2), 1e-5, 1e-6));
  // At the anchor the term and its gradient vanish.
  torch::Tensor zero = ProximalTerm({a1.clone().requires_grad_(true)}, {a1}, mu);
  EXPECT_EQ(zero.item<double>(), 0.0);
}

TEST(FedProxTest, LargeMuKeepsTheAdapterNearItsStart) {
  auto t = Load();
  ASSERT_NE(t, nullptr);
  TrainOptions o = Options();
  o.steps = 12;
  o.max_grad_norm = 0;  // clipping would hide the term's pull
  ASSERT_TRUE(t->InitAdapter(SmallLora()).ok());
  const common::TensorMap start = Adapter(*t);
  auto plain = t->Train(Data(), o);
  ASSERT_TRUE(plain.ok()) << plain.status();
  const double moved_plain = Distance(Adapter(*t), start);

  ASSERT_TRUE(t->InitAdapter(SmallLora()).ok());
  o.prox_mu = 1e4f;
  auto prox = t->Train(Data(), o);
  ASSERT_TRUE(prox.ok()) << prox.status();
  const double moved_prox = Distance(Adapter(*t), start);
  EXPECT_GT(moved_prox, 0.0);
  EXPECT_LT(moved_prox, 0.5 * moved_plain) << "mu=0 moved " << moved_plain;

  // A tiny mu changes the result only a little, but does change it (the term's
  // gradient enters the update from the second step on).
  ASSERT_TRUE(t->InitAdapter(SmallLora()).ok());
  o.prox_mu = 1e-3f;
  ASSERT_TRUE(t->Train(Data(), o).ok());
  const double moved_small = Distance(Adapter(*t), start);
  EXPECT_NE(moved_small, moved_plain);
  EXPECT_NEAR(moved_small, moved_plain, 0.2 * moved_plain);

  o.prox_mu = -1;
  EXPECT_THAT(std::string(t->Train(Data(), o).status().message()), HasSubstr("prox_mu"));
}

TEST(GradAccumTest, MicroBatchesEqualOneLargeBatch) {
  // k micro-batches of b give the same updates as one batch of k*b (fp32, no
  // dropout): same examples per step, token-weighted loss, summed gradients.
  auto run = [](int batch, int accum) {
    auto t = Load();
    EXPECT_NE(t, nullptr);
    EXPECT_TRUE(t->InitAdapter(SmallLora()).ok());
    TrainOptions o = Options();
    o.steps = 4;
    o.learning_rate = 1e-3f;
    o.batch_size = batch;
    o.grad_accum_steps = accum;
    auto r = t->Train(Data(), o);
    EXPECT_TRUE(r.ok()) << r.status();
    return std::make_pair(r.ok() ? r->mean_loss : 0.0, Adapter(*t));
  };
  const auto [loss4, big] = run(4, 1);
  const auto [loss22, acc2] = run(2, 2);
  const auto [loss14, acc4] = run(1, 4);
  EXPECT_NEAR(loss22, loss4, 1e-5);
  EXPECT_NEAR(loss14, loss4, 1e-5);
  // 4 AdamW steps of lr 1e-3 move weights by up to ~4e-3; summation order
  // differences in fp32 stay orders of magnitude below that.
  EXPECT_LT(MaxAbsDiff(acc2, big), 2e-5);
  EXPECT_LT(MaxAbsDiff(acc4, big), 2e-5);
  // And it is not trivially equal to a plain batch of b (different data per step).
  const auto [loss2, small] = run(2, 1);
  EXPECT_GT(MaxAbsDiff(small, big), 1e-4);
}

TEST(GradAccumTest, BadValueIsNamed) {
  auto t = Load();
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->InitAdapter(SmallLora()).ok());
  TrainOptions o = Options();
  o.grad_accum_steps = 0;
  auto r = t->Train(Data(), o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("grad_accum_steps"));
}

TEST(ProgressTest, CallbackEveryNStepsAndLast) {
  auto t = Load();
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->InitAdapter(SmallLora()).ok());
  TrainOptions o = Options();
  o.steps = 7;
  o.progress_every = 3;
  std::vector<TrainProgress> seen;
  o.on_progress = [&](const TrainProgress& p) {
    seen.push_back(p);
    return true;
  };
  auto r = t->Train(Data(), o);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[0].step, 3);
  EXPECT_EQ(seen[1].step, 6);
  EXPECT_EQ(seen[2].step, 7);
  for (const auto& p : seen) {
    EXPECT_EQ(p.total_steps, 7);
    EXPECT_TRUE(std::isfinite(p.loss));
    EXPECT_GT(p.tokens_per_s, 0);
    EXPECT_GE(p.eta_seconds, 0);
  }
  EXPECT_LT(seen[0].tokens, seen[1].tokens);
  EXPECT_EQ(seen[2].tokens, r->tokens);
  EXPECT_EQ(seen[2].eta_seconds, 0);
  EXPECT_EQ(seen[2].loss, r->last_loss);
  EXPECT_NEAR(seen[2].mean_loss, r->mean_loss, 1e-12);
  EXPECT_THAT(FormatProgress(seen[0]), HasSubstr("train step 3/7 loss "));
  EXPECT_THAT(FormatProgress(seen[0]), HasSubstr(" eta "));
}

TEST(ProgressTest, ReturningFalseCancelsAndRestoresTheAdapter) {
  auto t = Load();
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->InitAdapter(SmallLora()).ok());
  const common::TensorMap before = Adapter(*t);
  TrainOptions o = Options();
  o.progress_every = 2;
  int calls = 0;
  o.on_progress = [&](const TrainProgress&) { return ++calls < 2; };
  auto r = t->Train(Data(), o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("after step 4 of 6"));
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(MaxAbsDiff(Adapter(*t), before), 0.0);
}

// Loss and LoRA gradients of one forward/backward with dropout active.
std::pair<double, std::vector<torch::Tensor>> LossAndGrads(Model& m, const torch::Tensor& ids,
                                                           bool checkpoint) {
  m.set_gradient_checkpointing(checkpoint);
  std::vector<torch::Tensor> params = LoraParameters(m);
  for (auto& p : params) p.mutable_grad() = torch::Tensor();
  torch::Generator gen = at::detail::createCPUGenerator(42);
  torch::Tensor logits = m.Forward(ids.slice(1, 0, -1), nullptr, &gen);
  torch::Tensor loss = torch::nn::functional::cross_entropy(
      logits.reshape({-1, logits.size(-1)}), ids.slice(1, 1).reshape({-1}));
  loss.backward();
  std::vector<torch::Tensor> grads;
  for (auto& p : params) grads.push_back(p.grad().clone());
  m.set_gradient_checkpointing(false);
  return {loss.item<double>(), grads};
}

// A fixture model with a base of `dtype` and LoRA with dropout 0.2 (the
// recomputation must replay the same dropout draws) and non-zero B (B = 0 would
// leave A without gradient).
std::unique_ptr<Model> CheckpointModel(const std::string& fixture, const std::string& dtype) {
  ModelLoadOptions opts;
  opts.base_dtype = dtype;
  auto m = Model::Load(FixtureDir(fixture), opts);
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return nullptr;
  LoraConfig cfg = SmallLora();
  cfg.dropout = 0.2f;
  EXPECT_TRUE(InitLora(**m, cfg).ok());
  torch::NoGradGuard no_grad;
  for (auto& p : LoraParameters(**m)) {
    if (p.size(1) == cfg.rank) p.normal_(0, 0.05);
  }
  return std::move(*m);
}

TEST(GradCheckpointTest, GradientsEqualTheStoredActivationOnes) {
  for (const std::string dtype : {"fp32", "int4"}) {
    SCOPED_TRACE(dtype);
    auto m = CheckpointModel("qwen2", dtype);
    ASSERT_NE(m, nullptr);
    torch::manual_seed(0);
    torch::Tensor ids = torch::randint(0, m->config().vocab_size, {2, 17}, torch::kLong);
    const auto [loss_plain, g_plain] = LossAndGrads(*m, ids, false);
    const auto [loss_ckpt, g_ckpt] = LossAndGrads(*m, ids, true);
    EXPECT_EQ(loss_ckpt, loss_plain);
    ASSERT_EQ(g_ckpt.size(), g_plain.size());
    double norm = 0;
    for (size_t i = 0; i < g_plain.size(); ++i) {
      EXPECT_TRUE(torch::allclose(g_ckpt[i], g_plain[i], 1e-5, 1e-7)) << i;
      norm += g_plain[i].norm().item<double>();
    }
    EXPECT_GT(norm, 0.0);
    EXPECT_FALSE(m->gradient_checkpointing());
  }
}

// The recompute replays the frozen projections' outputs kept by the forward
// (fewer GEMMs, same gradients) unless told to recompute everything.
TEST(GradCheckpointTest, KeptGemmOutputsAreReplayedWithTheSameGradients) {
  for (const std::string dtype : {"fp32", "int4"}) {
    SCOPED_TRACE(dtype);
    auto m = CheckpointModel("llama", dtype);
    ASSERT_NE(m, nullptr);
    torch::manual_seed(1);
    torch::Tensor ids = torch::randint(0, m->config().vocab_size, {2, 13}, torch::kLong);
    const auto [loss_plain, g_plain] = LossAndGrads(*m, ids, false);
    ASSERT_TRUE(m->checkpoint_keeps_gemm_outputs());  // the default
    int64_t before = OnednnGemmCount();
    const auto [loss_kept, g_kept] = LossAndGrads(*m, ids, true);
    const int64_t gemms_kept = OnednnGemmCount() - before;
    m->set_checkpoint_keeps_gemm_outputs(false);
    before = OnednnGemmCount();
    const auto [loss_full, g_full] = LossAndGrads(*m, ids, true);
    const int64_t gemms_full = OnednnGemmCount() - before;
    EXPECT_EQ(loss_kept, loss_plain);
    EXPECT_EQ(loss_full, loss_plain);
    // 7 projections per layer x 2 layers are not run again.
    EXPECT_EQ(gemms_full - gemms_kept, 7 * m->config().num_hidden_layers);
    for (size_t i = 0; i < g_plain.size(); ++i) {
      EXPECT_TRUE(torch::allclose(g_kept[i], g_plain[i], 1e-5, 1e-7)) << i;
      EXPECT_TRUE(torch::allclose(g_full[i], g_plain[i], 1e-5, 1e-7)) << i;
    }
  }
}

TEST(GradCheckpointTest, TrainingWithCheckpointingGivesTheSameAdapter) {
  auto run = [](bool checkpoint, bool freeze_a) {
    auto t = Load("qwen2");
    EXPECT_NE(t, nullptr);
    LoraConfig cfg = SmallLora();
    cfg.dropout = 0.1f;
    EXPECT_TRUE(t->InitAdapter(cfg).ok());
    TrainOptions o = Options();
    o.steps = 3;
    o.freeze_lora_a = freeze_a;  // A without requires_grad inside the wrapper
    o.gradient_checkpointing = checkpoint;
    auto r = t->Train(Data(), o);
    EXPECT_TRUE(r.ok()) << r.status();
    return Adapter(*t);
  };
  EXPECT_LT(MaxAbsDiff(run(true, false), run(false, false)), 1e-6);
  EXPECT_LT(MaxAbsDiff(run(true, true), run(false, true)), 1e-6);
}

bool FileExists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

// Options that exercise every piece of state a resume must restore: the
// shuffled order (8 examples, 2 per micro-batch), dropout draws, AdamW
// moments, the schedule position, accumulation and the proximal anchors.
TrainOptions ResumableOptions(const std::string& path) {
  TrainOptions o = Options();
  o.steps = 9;
  o.batch_size = 2;
  o.grad_accum_steps = 2;
  o.warmup_steps = 2;
  o.prox_mu = 0.5f;
  o.checkpoint_path = path;
  o.checkpoint_every = 2;
  return o;
}

LoraConfig DropoutLora() {
  LoraConfig c = SmallLora();
  c.dropout = 0.1f;
  return c;
}

TEST(CheckpointResumeTest, ResumedRunEqualsUninterruptedRun) {
  const std::string path =
      ::testing::TempDir() + "/resume_test_" + std::to_string(getpid()) + ".ckpt";
  std::remove(path.c_str());
  // Uninterrupted (no checkpoint file involved).
  auto t0 = Load();
  ASSERT_NE(t0, nullptr);
  ASSERT_TRUE(t0->InitAdapter(DropoutLora()).ok());
  TrainOptions plain = ResumableOptions("");
  auto full = t0->Train(Data(), plain);
  ASSERT_TRUE(full.ok()) << full.status();
  const common::TensorMap want = Adapter(*t0);

  // Interrupted after step 5: checkpoints were written at steps 2 and 4 (seen
  // on disk at step 3) and one more when stopped.
  auto t1 = Load();
  ASSERT_NE(t1, nullptr);
  ASSERT_TRUE(t1->InitAdapter(DropoutLora()).ok());
  TrainOptions o = ResumableOptions(path);
  o.progress_every = 1;
  bool seen_at_3 = false;
  o.on_progress = [&](const TrainProgress& p) {
    if (p.step == 1) {
      EXPECT_FALSE(FileExists(path));
    }
    if (p.step == 3) seen_at_3 = FileExists(path);
    return p.step < 5;
  };
  auto stopped = t1->Train(Data(), o);
  EXPECT_EQ(stopped.status().code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(seen_at_3);
  ASSERT_TRUE(FileExists(path));

  // A new process (fresh trainer, same starting adapter) continues at step 6.
  auto t2 = Load();
  ASSERT_NE(t2, nullptr);
  ASSERT_TRUE(t2->InitAdapter(DropoutLora()).ok());
  std::vector<int> steps;
  o.on_progress = [&](const TrainProgress& p) {
    steps.push_back(p.step);
    return true;
  };
  auto resumed = t2->Train(Data(), o);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ(steps, (std::vector<int>{6, 7, 8, 9}));
  const common::TensorMap got = Adapter(*t2);
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [name, t] : want) EXPECT_EQ(got.at(name).data, t.data) << name;
  EXPECT_EQ(resumed->mean_loss, full->mean_loss);
  EXPECT_EQ(resumed->last_loss, full->last_loss);
  EXPECT_EQ(resumed->tokens, full->tokens);
  EXPECT_FALSE(FileExists(path));  // removed on completion
}

TEST(CheckpointResumeTest, ForeignOrCorruptCheckpointIsIgnored) {
  const std::string path =
      ::testing::TempDir() + "/foreign_test_" + std::to_string(getpid()) + ".ckpt";
  std::remove(path.c_str());
  auto t = Load();
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->InitAdapter(DropoutLora()).ok());
  TrainOptions o = ResumableOptions(path);
  o.progress_every = 3;
  o.on_progress = [](const TrainProgress& p) { return p.step < 3; };
  ASSERT_EQ(t->Train(Data(), o).status().code(), absl::StatusCode::kCancelled);
  ASSERT_TRUE(FileExists(path));
  // Another run (different seed) must not pick it up: it equals a clean run.
  auto clean = [&](uint64_t seed, const std::string& ckpt) {
    auto u = Load();
    EXPECT_TRUE(u->InitAdapter(DropoutLora()).ok());
    TrainOptions c = ResumableOptions(ckpt);
    c.seed = seed;
    auto r = u->Train(Data(), c);
    EXPECT_TRUE(r.ok()) << r.status();
    return Adapter(*u);
  };
  const common::TensorMap other = clean(77, path);
  EXPECT_EQ(MaxAbsDiff(other, clean(77, "")), 0.0);
  // A truncated file is ignored too.
  {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    std::fputs("PK\x03\x04 not a checkpoint", f);
    std::fclose(f);
  }
  EXPECT_EQ(MaxAbsDiff(clean(3, path), clean(3, "")), 0.0);
  EXPECT_FALSE(FileExists(path));
}

TEST(PackingTest, PackedTrainingEqualsUnpacked) {
  // Same examples per step; packed rows of <= 64 tokens hold 2-3 examples.
  auto run = [](bool pack, bool checkpointing) {
    auto t = Load();
    EXPECT_NE(t, nullptr);
    EXPECT_TRUE(t->InitAdapter(SmallLora()).ok());
    TrainOptions o = Options();
    o.steps = 4;
    o.learning_rate = 1e-3f;
    o.batch_size = 8;
    o.max_seq_len = 64;
    o.pack_sequences = pack;
    o.gradient_checkpointing = checkpointing;
    auto r = t->Train(Data(), o);
    EXPECT_TRUE(r.ok()) << r.status();
    return std::make_pair(r.ok() ? *r : TrainResult{}, Adapter(*t));
  };
  const auto [plain, plain_adapter] = run(false, false);
  const auto [packed, packed_adapter] = run(true, false);
  EXPECT_NEAR(packed.mean_loss, plain.mean_loss, 1e-5);
  EXPECT_NEAR(packed.last_loss, plain.last_loss, 1e-5);
  EXPECT_EQ(packed.tokens, plain.tokens);
  EXPECT_LT(MaxAbsDiff(packed_adapter, plain_adapter), 2e-5);
  // The mask also travels through gradient checkpointing.
  const auto [ckpt, ckpt_adapter] = run(true, true);
  EXPECT_NEAR(ckpt.mean_loss, plain.mean_loss, 1e-5);
  EXPECT_LT(MaxAbsDiff(ckpt_adapter, plain_adapter), 2e-5);
}

TEST(PackingTest, ManyShortExamplesInOneRowGiveTheSameLoss) {
  // Many short examples and a long max_seq_len: packed, one row holds them
  // all; padded, each is a row of the longest length. Same loss either way.
  std::vector<Example> data;
  for (int i = 0; i < 16; ++i)
    data.push_back({"Q" + std::to_string(i) + ":", " a" + std::to_string(i)});
  data.push_back(
      {"### Instruction:\nA much longer prompt that sets the padded row length "
       "for every example in the batch\n\n### Response:\n",
       "ok"});
  auto t = Load();
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->InitAdapter(SmallLora()).ok());
  TrainOptions o = Options();
  o.steps = 1;
  o.batch_size = static_cast<int>(data.size());
  o.max_seq_len = 256;
  o.learning_rate = 1e-6f;
  auto a = t->Train(data, o);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(t->InitAdapter(SmallLora()).ok());
  o.pack_sequences = true;
  auto b = t->Train(data, o);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_NEAR(a->last_loss, b->last_loss, 1e-5);
}

TEST(Bf16AutocastTest, TrainsCloseToFp32AndLeavesAutocastOff) {
  auto run = [](bool bf16) {
    auto t = Load();
    EXPECT_NE(t, nullptr);
    EXPECT_TRUE(t->InitAdapter(SmallLora()).ok());
    auto before = t->Evaluate(Data(), 64);
    EXPECT_TRUE(before.ok());
    TrainOptions o = Options();
    o.steps = 8;
    o.bf16_autocast = bf16;
    auto r = t->Train(Data(), o);
    EXPECT_TRUE(r.ok()) << r.status();
    auto after = t->Evaluate(Data(), 64);
    EXPECT_TRUE(after.ok());
    return std::make_tuple(r.ok() ? *r : TrainResult{}, before.ok() ? before->loss : 0.0,
                           after.ok() ? after->loss : 0.0);
  };
  const auto [fp32, fp32_before, fp32_after] = run(false);
  const auto [bf16, bf16_before, bf16_after] = run(true);
  EXPECT_FALSE(at::autocast::is_cpu_enabled());
  // bf16 matmuls change the numbers (so autocast was really on) but only a little.
  EXPECT_NE(bf16.mean_loss, fp32.mean_loss);
  EXPECT_NEAR(bf16.mean_loss, fp32.mean_loss, 0.05 * fp32.mean_loss);
  // And it trains: the (fp32) held-out loss drops as with fp32.
  EXPECT_EQ(bf16_before, fp32_before);
  EXPECT_LT(bf16_after, bf16_before - 0.1);
  EXPECT_NEAR(bf16_after, fp32_after, 0.05 * fp32_after);
}

TEST(Bf16AutocastTest, EngineOptionTurnsItOn) {
  EngineOptions opts;
  opts.threads = 1;
  opts.bf16_autocast = true;
  auto t = LoadTrainer(FixtureDir("llama"), opts);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE((*t)->InitAdapter(SmallLora()).ok());
  auto u = Load();
  ASSERT_TRUE(u->InitAdapter(SmallLora()).ok());
  TrainOptions o = Options();
  auto a = (*t)->Train(Data(), o);
  auto b = u->Train(Data(), o);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(a->mean_loss, b->mean_loss);
  EXPECT_NEAR(a->mean_loss, b->mean_loss, 0.05 * b->mean_loss);
}

// The agent's --grad-checkpoint: the engine setting turns checkpointing on for
// every Train call (each decoder layer recomputed once per micro-batch in
// backward) and training reaches the same adapter.
TEST(GradCheckpointEngineTest, EngineOptionTurnsItOnWithTheSameResult) {
  EngineOptions opts;
  opts.threads = 1;
  opts.gradient_checkpointing = true;
  auto t = LoadTrainer(FixtureDir("llama"), opts);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE((*t)->InitAdapter(SmallLora()).ok());
  auto u = Load();
  ASSERT_TRUE(u->InitAdapter(SmallLora()).ok());
  const TrainOptions o = Options();

  const int64_t before = Model::CheckpointRecomputeCount();
  auto a = (*t)->Train(Data(), o);
  const int64_t during_a = Model::CheckpointRecomputeCount() - before;
  auto b = u->Train(Data(), o);
  const int64_t during_b = Model::CheckpointRecomputeCount() - before - during_a;
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(during_a, o.steps * 2);  // 6 steps x the fixture's 2 layers
  EXPECT_EQ(during_b, 0);
  EXPECT_NEAR(a->mean_loss, b->mean_loss, 1e-5 * b->mean_loss);
  const common::TensorMap wa = Adapter(**t), wb = Adapter(*u);
  ASSERT_EQ(wa.size(), wb.size());
  // Not bit for bit: without checkpointing the projections that share an input
  // train as one node (ForwardSharedInput), whose gradients sum in another
  // order, and AdamW's normalised step turns such differences in near-zero
  // gradient entries into a visible share of a step (each step moves an entry
  // by about the learning rate at most). So: every entry within 2% of one step,
  // and on average within 0.01%.
  const double lr = o.learning_rate;
  for (const auto& [name, ta] : wa) {
    const common::HostTensor& tb = wb.at(name);
    ASSERT_EQ(ta.data.size(), tb.data.size()) << name;
    double diff = 0, sum = 0;
    for (size_t i = 0; i < ta.data.size(); ++i) {
      const double d = std::abs(static_cast<double>(ta.data[i]) - tb.data[i]);
      diff = std::max(diff, d);
      sum += d;
    }
    EXPECT_LT(diff, 2e-2 * lr) << name;
    EXPECT_LT(sum / static_cast<double>(ta.data.size()), 1e-4 * lr) << name;
  }
}

TEST(ProgressTest, EngineOptionPrintsProgressToStderr) {
  // What `fedlora-agent run --progress-every N` sets: the agent's per-round
  // TrainOptions leave progress_every 0.
  EngineOptions opts;
  opts.threads = 1;
  opts.progress_every = 2;
  opts.forgetting_probe = General();
  auto t = LoadTrainer(FixtureDir("llama"), opts);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE((*t)->InitAdapter(SmallLora()).ok());
  ::testing::internal::CaptureStderr();
  auto r = (*t)->Train(Data(), Options());
  const std::string err = ::testing::internal::GetCapturedStderr();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(err, HasSubstr("train step 2/6 loss "));
  EXPECT_THAT(err, HasSubstr("train step 6/6 loss "));
  EXPECT_THAT(err, Not(HasSubstr("train step 1/6")));
  EXPECT_THAT(err, HasSubstr("forgetting probe: perplexity "));
  EXPECT_TRUE(r->has_probe);
}

TEST(EvalTest, PerplexityIsExpOfLoss) {
  auto t = Load();
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->InitAdapter(SmallLora()).ok());
  auto r = t->Evaluate(Data(), 64);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GT(r->loss, 0);
  EXPECT_DOUBLE_EQ(r->perplexity, std::exp(r->loss));
  EXPECT_EQ(r->generated_examples, 0u);  // no generation unless asked
}

// Two facts the adapter can memorise.
std::vector<Example> Memo() {
  return {{"### Instruction:\nAllergies?\n\n### Response:\n", "penicillin"},
          {"### Instruction:\nHow old is the patient?\n\n### Response:\n", "54 years"}};
}

TEST(GenerationEvalTest, MemorisedSetScoresExactMatch) {
  auto t = Load();
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->InitAdapter(SmallLora()).ok());
  EvalOptions e;
  e.max_seq_len = 64;
  e.generate_max_new_tokens = 12;
  auto before = t->EvaluateWith(Memo(), e);
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_EQ(before->generated_examples, 2u);
  EXPECT_EQ(before->exact_match, 0.0);  // a random model does not know the answers
  TrainOptions o = Options();
  o.steps = 80;
  o.learning_rate = 1e-2f;
  o.batch_size = 2;
  auto r = t->Train(Memo(), o);
  ASSERT_TRUE(r.ok()) << r.status();
  auto after = t->EvaluateWith(Memo(), e);
  ASSERT_TRUE(after.ok()) << after.status();
  // The fixture's frozen head (random, std 0.02) bounds the logits, so the
  // loss stays high even when every answer token is the arg-max.
  EXPECT_LT(after->loss, before->loss - 1.0);
  EXPECT_EQ(after->exact_match, 1.0);
  EXPECT_EQ(after->token_f1, 1.0);
  // Swapped references: the memorised answers are now wrong (F1 0, EM 0).
  std::vector<Example> swapped = Memo();
  std::swap(swapped[0].response, swapped[1].response);
  auto wrong = t->EvaluateWith(swapped, e);
  ASSERT_TRUE(wrong.ok()) << wrong.status();
  EXPECT_EQ(wrong->exact_match, 0.0);
  EXPECT_EQ(wrong->token_f1, 0.0);
  // A reference of "54" against the answer "54 years": half the answer (P 1/2, R 1).
  std::vector<Example> partial = {Memo()[1]};
  partial[0].response = "54";
  auto half = t->EvaluateWith(partial, e);
  ASSERT_TRUE(half.ok()) << half.status();
  EXPECT_EQ(half->exact_match, 0.0);
  EXPECT_NEAR(half->token_f1, 2.0 / 3.0, 1e-12);
  e.generate_max_new_tokens = -1;
  EXPECT_EQ(t->EvaluateWith(Memo(), e).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(GenerationEvalTest, EngineOptionAddsGenerationToEvaluate) {
  EngineOptions opts;
  opts.threads = 1;
  opts.eval_generate_max_new_tokens = 3;
  auto t = LoadTrainer(FixtureDir("llama"), opts);
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE((*t)->InitAdapter(SmallLora()).ok());
  auto r = (*t)->Evaluate(Memo(), 64);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->generated_examples, 2u);
  opts.eval_generate_max_new_tokens = -2;
  EXPECT_THAT(std::string(LoadTrainer(FixtureDir("llama"), opts).status().message()),
              HasSubstr("eval_generate_max_new_tokens"));
}

TEST(ForgettingProbeTest, ReportsPerplexityBeforeAndAfter) {
  auto t = Load();
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->InitAdapter(SmallLora()).ok());
  auto before = t->Evaluate(General(), 64);
  ASSERT_TRUE(before.ok());
  TrainOptions o = Options();
  o.steps = 20;
  o.forgetting_probe = General();
  auto r = t->Train(Data(), o);
  ASSERT_TRUE(r.ok()) << r.status();
  auto after = t->Evaluate(General(), 64);
  ASSERT_TRUE(after.ok());
  ASSERT_TRUE(r->has_probe);
  EXPECT_DOUBLE_EQ(r->probe_before.perplexity, before->perplexity);
  EXPECT_DOUBLE_EQ(r->probe_after.perplexity, after->perplexity);
  EXPECT_NE(r->probe_after.perplexity, r->probe_before.perplexity);
  EXPECT_EQ(r->probe_after.tokens, before->tokens);
  // No probe, no figures.
  o.forgetting_probe.clear();
  auto plain = t->Train(Data(), o);
  ASSERT_TRUE(plain.ok());
  EXPECT_FALSE(plain->has_probe);
  // A probe with nothing to score fails before training and changes nothing.
  const common::TensorMap start = Adapter(*t);
  std::string long_prompt;
  for (int i = 0; i < 100; ++i) long_prompt += "word ";
  o.forgetting_probe = {{long_prompt, "x"}};  // the response is cut off at max_seq_len
  auto bad = t->Train(Data(), o);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("forgetting_probe"));
  EXPECT_EQ(MaxAbsDiff(Adapter(*t), start), 0.0);
}

TEST(ReplayTest, MixedGeneralDataReducesForgetting) {
  auto run = [](float fraction) {
    auto t = Load();
    EXPECT_NE(t, nullptr);
    EXPECT_TRUE(t->InitAdapter(SmallLora()).ok());
    TrainOptions o = Options();
    o.steps = 30;
    o.replay_fraction = fraction;
    o.replay = General();
    o.forgetting_probe = General();
    auto r = t->Train(Data(), o);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : TrainResult{};
  };
  const TrainResult none = run(0);
  const TrainResult half = run(0.5f);
  EXPECT_EQ(none.replay_examples, 0u);
  EXPECT_EQ(half.replay_examples, 8u);       // 0.5 * 8 / (1 - 0.5)
  EXPECT_EQ(run(0.2f).replay_examples, 2u);  // round(0.2 * 8 / 0.8)
  EXPECT_EQ(half.probe_before.perplexity, none.probe_before.perplexity);
  // Training on the general text too keeps its perplexity lower.
  EXPECT_LT(half.probe_after.perplexity, none.probe_after.perplexity);
  EXPECT_LT(half.probe_after.perplexity, half.probe_before.perplexity);
}

TEST(ReplayTest, BadSettingsAreNamedAndChangeNothing) {
  auto t = Load();
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->InitAdapter(SmallLora()).ok());
  const common::TensorMap start = Adapter(*t);
  TrainOptions o = Options();
  o.replay = General();
  o.replay_fraction = 1.0f;
  auto r = t->Train(Data(), o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("replay_fraction"));
  o.replay_fraction = 0.3f;
  o.replay.clear();
  r = t->Train(Data(), o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("replay"));
  EXPECT_EQ(MaxAbsDiff(Adapter(*t), start), 0.0);
  EngineOptions opts;
  opts.replay_fraction = 0.5f;
  EXPECT_THAT(std::string(LoadTrainer(FixtureDir("llama"), opts).status().message()),
              HasSubstr("EngineOptions.replay"));
}

}  // namespace
}  // namespace fedlora::edge
