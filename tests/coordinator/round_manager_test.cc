// RoundManager with a FakeClock and fake agent links: no gRPC, no sleeping for
// deadlines (the periodic timer is set far out; tests call Tick()).
#include "coordinator/round_manager.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <future>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_format.h"
#include "common/quant/quant.h"
#include "coordinator/aggregator.h"
#include "coordinator/lora_product.h"
#include "coordinator/strategy.h"
#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

namespace v1 = ::fedlora::v1;
using testing::FakeLink;
using ::testing::HasSubstr;
using testing::kBaseHash;
using testing::MakeHeader;
using testing::MakeLoraUpdate;
using testing::SealUpdate;
using testing::TempDir;
using testing::WaitFor;
using Kind = v1::CoordinatorMessage::KindCase;

class RoundManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_.min_participants = 2;
    config_.max_participants = 10;
    config_.round_deadline_s = 100;
    config_.eval_grace_s = 30;
    config_.tick_ms = 1000000;  // ticks only when the test calls Tick()
    config_.lora_rank = 4;
  }
  void TearDown() override { StopManager(); }

  void StartManager() {
    if (!store_) {
      auto store = StateStore::Open(dir_.path());
      ASSERT_TRUE(store.ok()) << store.status();
      store_ = std::move(*store);
    }
    manager_ = std::make_unique<RoundManager>(config_, store_.get(), &clock_, kBaseHash, &out_);
    manager_->SetFinishedCallback([this]() { finished_ = true; });
    ASSERT_TRUE(manager_->Start().ok());
  }

  void StopManager() {
    if (!manager_) return;
    manager_->Stop();
    manager_->Join();
    manager_.reset();
  }

  std::shared_ptr<FakeLink> Connect(const std::string& cn, const std::string& agent_id = "",
                                    const std::string& hash = kBaseHash) {
    auto link = std::make_shared<FakeLink>(cn);
    v1::Hello hello;
    hello.set_agent_id(agent_id.empty() ? cn : agent_id);
    hello.set_base_model_hash(hash);
    hello.set_num_train_examples(10);
    manager_->OnHello(link, hello);
    manager_->Sync();
    return link;
  }

  absl::Status Submit(const std::string& agent, uint64_t round, uint64_t examples,
                      const common::TensorMap& update, const std::string& base_version = "",
                      double train_loss = 2.0, double eval_before = 3.0) {
    IncomingUpdate in;
    in.peer_cn = agent;
    in.payload = SealUpdate(update, manager_->seal_public_key(), round, agent, base_version);
    in.header =
        MakeHeader(round, agent, base_version, examples, in.payload, train_loss, eval_before);
    std::promise<absl::Status> done;
    auto future = done.get_future();
    manager_->CheckUpdateHeader(agent, in.header, [&](absl::Status s) {
      if (!s.ok()) {
        done.set_value(s);
        return;
      }
      manager_->SubmitUpdate(std::move(in), [&](absl::Status s2) { done.set_value(s2); });
    });
    return future.get();
  }

  void Eval(const std::shared_ptr<FakeLink>& link, const std::string& version, double loss) {
    v1::EvalReport report;
    report.set_version_id(version);
    report.set_eval_loss(loss);
    manager_->OnEvalReport(link, report);
    manager_->Sync();
  }

  TempDir dir_;
  CoordinatorConfig config_;
  FakeClock clock_;
  std::ostringstream out_;
  std::unique_ptr<StateStore> store_;
  std::unique_ptr<RoundManager> manager_;
  std::atomic<bool> finished_{false};
};

TEST_F(RoundManagerTest, OpensRoundWhenMinParticipantsOnline) {
  StartManager();
  auto a = Connect("a");
  EXPECT_EQ(a->Count(Kind::kWelcome), 1u);
  EXPECT_EQ(a->Count(Kind::kRoundTask), 0u);  // one agent < min_participants
  auto b = Connect("b");
  ASSERT_EQ(a->Count(Kind::kRoundTask), 1u);
  ASSERT_EQ(b->Count(Kind::kRoundTask), 1u);
  const v1::RoundTask task = b->Last(Kind::kRoundTask).round_task();
  EXPECT_EQ(task.round_id(), 1u);
  EXPECT_EQ(task.deadline_unix_ms(), clock_.NowUnixMs() + 100 * 1000);
  EXPECT_EQ(task.lora().rank(), 4u);
  EXPECT_EQ(task.lora().target_modules_size(), 2);
  EXPECT_EQ(task.seal_public_key(), manager_->seal_public_key());
  EXPECT_EQ(a->messages().front().kind_case(), Kind::kWelcome);  // Welcome first
  auto round = store_->GetRound(1);
  ASSERT_TRUE(round.ok() && round->has_value());
  EXPECT_EQ((*round)->phase, RoundPhase::kTrain);
  EXPECT_EQ((*round)->participants, (std::vector<std::string>{"a", "b"}));
}

TEST_F(RoundManagerTest, HelloChecksAndSupersededSession) {
  StartManager();
  auto liar = Connect("a", "b");
  ASSERT_TRUE(liar->closed().has_value());
  EXPECT_EQ(liar->closed()->code(), absl::StatusCode::kPermissionDenied);
  auto wrong = Connect("a", "", std::string(64, 'f'));
  ASSERT_TRUE(wrong->closed().has_value());
  EXPECT_EQ(wrong->closed()->code(), absl::StatusCode::kFailedPrecondition);
  auto first = Connect("a");
  auto second = Connect("a");
  ASSERT_TRUE(first->closed().has_value());
  EXPECT_EQ(first->closed()->code(), absl::StatusCode::kAborted);
  EXPECT_FALSE(second->closed().has_value());
}

TEST_F(RoundManagerTest, DeadlineWithTooFewUpdatesAbortsAndOpensNextRound) {
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  ASSERT_TRUE(Submit("a", 1, 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());
  EXPECT_EQ(*store_->CountUpdates(1), 1u);
  clock_.Advance(99 * 1000);
  manager_->Tick();
  EXPECT_EQ((*store_->GetRound(1))->phase, RoundPhase::kTrain);  // not yet
  clock_.Advance(1000);
  manager_->Tick();
  auto r1 = *store_->GetRound(1);
  EXPECT_EQ(r1->phase, RoundPhase::kAborted);
  EXPECT_THAT(r1->abort_reason, HasSubstr("min_participants is 2"));
  EXPECT_EQ(*store_->CountUpdates(1), 0u);
  // The next round opened for the agents still online.
  EXPECT_EQ(a->Last(Kind::kRoundTask).round_task().round_id(), 2u);
  EXPECT_EQ(b->Last(Kind::kRoundTask).round_task().round_id(), 2u);
  // A late update for round 1 is refused.
  EXPECT_EQ(Submit("b", 1, 10, MakeLoraUpdate(4, 1, 8, 8, 2)).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(RoundManagerTest, DeadlineWithEnoughUpdatesAggregatesStragglersDropped) {
  config_.min_participants = 1;
  config_.select_wait_ms = 5000;  // wait for the second agent before selecting
  StartManager();
  auto a = Connect("a");
  EXPECT_EQ(a->Count(Kind::kRoundTask), 0u);
  auto b = Connect("b");
  EXPECT_EQ(b->Count(Kind::kRoundTask), 0u);
  clock_.Advance(5000);
  manager_->Tick();
  ASSERT_EQ(a->Count(Kind::kRoundTask), 1u);
  ASSERT_EQ(b->Last(Kind::kRoundTask).round_task().round_id(), 1u);
  const common::TensorMap u = MakeLoraUpdate(4, 1, 8, 8, 1);
  ASSERT_TRUE(Submit("a", 1, 10, u).ok());
  EXPECT_EQ(a->Count(Kind::kVersionNotice), 0u);  // b is still expected
  clock_.Advance(100 * 1000);
  manager_->Tick();
  ASSERT_TRUE(WaitFor([&]() { return b->Count(Kind::kVersionNotice) == 1; }));
  const v1::VersionNotice notice = b->Last(Kind::kVersionNotice).version_notice();
  EXPECT_EQ(notice.version_id(), "v000001");
  std::promise<absl::StatusOr<BlobRef>> got;
  manager_->GetVersionBlob("v000001", [&](absl::StatusOr<BlobRef> r) { got.set_value(r); });
  auto blob = got.get_future().get();
  ASSERT_TRUE(blob.ok());
  EXPECT_EQ(blob->sha256, notice.sha256());
  auto version = *store_->GetVersion("v000001");
  EXPECT_EQ(version->contributors, (std::vector<std::string>{"a"}));
}

TEST_F(RoundManagerTest, RoundsLimitPrintsLinesAndSummaryThenFinishes) {
  config_.rounds = 2;
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  std::string version;
  for (uint64_t round = 1; round <= 2; ++round) {
    ASSERT_TRUE(WaitFor([&]() {
      return a->Count(Kind::kRoundTask) == round && b->Count(Kind::kRoundTask) == round;
    }));
    ASSERT_TRUE(Submit("a", round, 10, MakeLoraUpdate(4, 1, 8, 8, round), version, 2.0,
                       round == 1 ? 3.0 : 2.5)
                    .ok());
    ASSERT_TRUE(Submit("b", round, 30, MakeLoraUpdate(4, 1, 8, 8, 10 + round), version, 1.0,
                       round == 1 ? 4.0 : 2.7)
                    .ok());
    ASSERT_TRUE(WaitFor([&]() { return a->Count(Kind::kVersionNotice) == round; }));
    version = a->Last(Kind::kVersionNotice).version_notice().version_id();
    EXPECT_EQ(version, VersionId(round));
    Eval(a, version, round == 1 ? 2.5 : 2.0);
    EXPECT_FALSE(finished_);
    Eval(b, version, round == 1 ? 2.7 : 2.2);
  }
  ASSERT_TRUE(WaitFor([&]() { return finished_.load(); }));
  manager_->Sync();
  manager_->Tick();
  EXPECT_EQ(a->Count(Kind::kRoundTask), 2u);  // no third round
  std::istringstream lines(out_.str());
  std::string l1, l2, summary;
  std::getline(lines, l1);
  std::getline(lines, l2);
  std::getline(lines, summary);
  EXPECT_THAT(l1, HasSubstr("round 1: participants=2 train_loss=1.5000 eval_loss 3.5000 -> "
                            "2.6000 bytes_up/agent="));
  EXPECT_THAT(l2, HasSubstr("round 2: participants=2 train_loss=1.5000 eval_loss 2.6000 -> "
                            "2.1000"));
  EXPECT_THAT(l2, HasSubstr("version=v000002"));
  auto j = nlohmann::json::parse(summary);
  EXPECT_EQ(j["rounds"], 2);
  ASSERT_EQ(j["eval_loss"].size(), 3u);
  EXPECT_NEAR(j["eval_loss"][0].get<double>(), 3.5, 1e-9);
  EXPECT_NEAR(j["eval_loss"][1].get<double>(), 2.6, 1e-9);
  EXPECT_NEAR(j["eval_loss"][2].get<double>(), 2.1, 1e-9);
  EXPECT_EQ(j["versions"], nlohmann::json({"v000001", "v000002"}));
  EXPECT_EQ(j["participants"], nlohmann::json({2, 2}));
  EXPECT_GT(j["bytes_up"].get<uint64_t>(), 0u);
  EXPECT_EQ(j["bytes_down"], 0);
  EXPECT_NEAR(j["train_loss"][1].get<double>(), 1.5, 1e-9);
}

TEST_F(RoundManagerTest, EvalGraceCompletesRoundWithMissingReports) {
  config_.rounds = 1;
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  ASSERT_TRUE(Submit("a", 1, 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());
  ASSERT_TRUE(Submit("b", 1, 10, MakeLoraUpdate(4, 1, 8, 8, 2)).ok());
  ASSERT_TRUE(WaitFor([&]() { return a->Count(Kind::kVersionNotice) == 1; }));
  Eval(a, "v000001", 1.25);
  Eval(a, "v000777", 9.0);  // unknown version: ignored
  clock_.Advance(29 * 1000);
  manager_->Tick();
  EXPECT_FALSE(finished_);
  clock_.Advance(1000);
  manager_->Tick();
  EXPECT_TRUE(finished_);
  EXPECT_THAT(out_.str(), HasSubstr("-> 1.2500"));
  EXPECT_THAT(out_.str(), HasSubstr("\"eval_loss\":[3.0,1.25]"));
}

TEST_F(RoundManagerTest, ResumesTrainRoundAfterRestart) {
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  const std::string seal = manager_->seal_public_key();
  ASSERT_TRUE(Submit("a", 1, 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());
  StopManager();
  EXPECT_EQ(a->closed()->code(), absl::StatusCode::kUnavailable);  // Stop closes sessions

  StartManager();
  EXPECT_EQ(manager_->seal_public_key(), seal);
  auto b2 = Connect("b");
  EXPECT_EQ(b2->Last(Kind::kRoundTask).round_task().round_id(), 1u);  // task re-sent
  auto a2 = Connect("a");
  EXPECT_EQ(a2->Count(Kind::kRoundTask), 0u);  // a already submitted
  EXPECT_EQ(Submit("a", 1, 10, MakeLoraUpdate(4, 1, 8, 8, 1)).code(),
            absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(Submit("b", 1, 10, MakeLoraUpdate(4, 1, 8, 8, 2)).ok());
  ASSERT_TRUE(WaitFor([&]() { return a2->Count(Kind::kVersionNotice) == 1; }));
  EXPECT_EQ((*store_->GetRound(1))->phase, RoundPhase::kDone);
}

TEST_F(RoundManagerTest, ResumesAggregateRoundAfterRestart) {
  StartManager();
  Connect("a");
  Connect("b");
  ASSERT_TRUE(Submit("a", 1, 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());
  StopManager();
  // Simulate a crash between TRAIN -> AGGREGATE and the publish, with b's update stored.
  {
    RoundRecord r = **store_->GetRound(1);
    auto key = store_->LoadOrCreateSealKey();
    ASSERT_TRUE(key.ok());
    UpdateRecord u;
    u.round_id = 1;
    u.agent_id = "b";
    u.sealed = SealUpdate(MakeLoraUpdate(4, 1, 8, 8, 2), key->public_key, 1, "b", "");
    u.summary.num_examples = 10;
    r.updates["b"] = u.summary;
    r.phase = RoundPhase::kAggregate;
    ASSERT_TRUE(store_->AcceptUpdate(u, r).ok());
  }
  StartManager();
  ASSERT_TRUE(WaitFor([&]() {
    auto r = store_->GetRound(1);
    return r.ok() && r->has_value() && (*r)->phase == RoundPhase::kDone;
  }));
  EXPECT_EQ((*store_->GetVersion("v000001"))->contributors, (std::vector<std::string>{"a", "b"}));
}

TEST_F(RoundManagerTest, StopAnswersUnavailable) {
  StartManager();
  manager_->Stop();
  auto late = Connect("a");
  ASSERT_TRUE(late->closed().has_value());
  EXPECT_EQ(late->closed()->code(), absl::StatusCode::kUnavailable);
  std::promise<absl::Status> done;
  manager_->CheckUpdateHeader("a", v1::UpdateHeader(), [&](absl::Status s) { done.set_value(s); });
  EXPECT_EQ(done.get_future().get().code(), absl::StatusCode::kUnavailable);
}

// ------------------------------------------------------------------ Strategies

// Runs one round with updates from a (10 examples) and b (30) and waits for its version.
#define RUN_ROUND(round, base, ua, ub, la, lb)                                          \
  do {                                                                                  \
    ASSERT_TRUE(WaitFor([&]() {                                                         \
      return la->Count(Kind::kRoundTask) >= 1 &&                                        \
             la->Last(Kind::kRoundTask).round_task().round_id() == (round);             \
    }));                                                                                \
    ASSERT_TRUE(Submit("a", (round), 10, (ua), (base)).ok());                           \
    ASSERT_TRUE(Submit("b", (round), 30, (ub), (base)).ok());                           \
    ASSERT_TRUE(WaitFor([&]() {                                                         \
      return lb->Count(Kind::kVersionNotice) >= 1 &&                                    \
             lb->Last(Kind::kVersionNotice).version_notice().version_id() ==            \
                 VersionId(round);                                                      \
    }));                                                                                \
  } while (0)

common::TensorMap DecodedVersion(StateStore* store, const std::string& id,
                                 common::Metadata* metadata = nullptr) {
  auto v = store->GetVersion(id);
  EXPECT_TRUE(v.ok() && v->has_value());
  auto blob = store->GetBlob((*v)->sha256);
  EXPECT_TRUE(blob.ok());
  auto tensors = common::DecodeAdapterBlob(*blob, metadata);
  EXPECT_TRUE(tensors.ok());
  return *tensors;
}

common::TensorMap Mean(const common::TensorMap& x, double wx, const common::TensorMap& y,
                       double wy) {
  FedAvgAggregator agg;
  EXPECT_TRUE(agg.Add(x, wx).ok());
  EXPECT_TRUE(agg.Add(y, wy).ok());
  return *agg.Finish();
}

TEST_F(RoundManagerTest, DefaultStrategyIsFedAvgEverywhere) {
  config_.rounds = 1;
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  const v1::RoundTask task = a->Last(Kind::kRoundTask).round_task();
  EXPECT_EQ(task.aggregation(), "fedavg");
  EXPECT_EQ(task.prox_mu(), 0.0f);
  EXPECT_FALSE(task.freeze_lora_a());
  const common::TensorMap ua = MakeLoraUpdate(4, 1, 8, 8, 1), ub = MakeLoraUpdate(4, 1, 8, 8, 2);
  RUN_ROUND(1u, "", ua, ub, a, b);
  auto version = **store_->GetVersion("v000001");
  EXPECT_EQ(version.strategy, "fedavg");
  EXPECT_FALSE(version.discarded_energy.has_value());
  EXPECT_TRUE(version.server_state_sha256.empty());
  common::Metadata md;
  const common::TensorMap got = DecodedVersion(store_.get(), "v000001", &md);
  EXPECT_EQ(md.at("fedlora.aggregation"), "fedavg");
  EXPECT_EQ(md.count("fedlora.discarded_energy"), 0u);
  // The published blob is the q8_0 encoding of the plain weighted mean.
  const common::TensorMap want =
      *common::DecodeAdapterBlob(common::EncodeAdapterBlob(Mean(ua, 10, ub, 30), common::Quant::kQ8_0));
  for (const auto& [name, t] : want) EXPECT_EQ(got.at(name).data, t.data) << name;
  Eval(a, "v000001", 2.0);
  Eval(b, "v000001", 2.0);
  EXPECT_THAT(out_.str(), HasSubstr(" version=v000001 strategy=fedavg\n"));
}

TEST_F(RoundManagerTest, FedProxSendsMuAndAnOpenRoundKeepsItsStrategyAcrossRestart) {
  config_.aggregation.strategy = Strategy::kFedProx;
  config_.aggregation.prox_mu = 0.25;
  StartManager();
  auto a = Connect("a");
  Connect("b");
  v1::RoundTask task = a->Last(Kind::kRoundTask).round_task();
  EXPECT_EQ(task.aggregation(), "fedprox");
  EXPECT_EQ(task.prox_mu(), 0.25f);
  EXPECT_FALSE(task.freeze_lora_a());
  EXPECT_EQ((*store_->GetRound(1))->prox_mu, 0.25);
  StopManager();
  store_.reset();
  config_.aggregation.strategy = Strategy::kFfaLora;
  StartManager();
  auto a2 = Connect("a");
  task = a2->Last(Kind::kRoundTask).round_task();  // the open round's task, as first sent
  EXPECT_EQ(task.aggregation(), "fedprox");
  EXPECT_EQ(task.prox_mu(), 0.25f);
}

TEST_F(RoundManagerTest, FedAdamMomentsPersistWithTheVersionAcrossRestarts) {
  config_.aggregation.strategy = Strategy::kFedAdam;
  config_.aggregation.server_lr = 0.05;
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  // Round 1 (fresh LoRA): the mean is published; the moments start empty.
  const common::TensorMap u1 = MakeLoraUpdate(4, 1, 8, 8, 1), u2 = MakeLoraUpdate(4, 1, 8, 8, 2);
  RUN_ROUND(1u, "", u1, u2, a, b);
  auto v1rec = **store_->GetVersion("v000001");
  EXPECT_EQ(v1rec.strategy, "fedadam");
  ASSERT_FALSE(v1rec.server_state_sha256.empty());
  ServerOptimizerState state =
      *DecodeServerState(*store_->GetBlob(v1rec.server_state_sha256), "v1 state");
  EXPECT_EQ(state.steps, 0u);

  StrategyParams params = config_.aggregation;
  common::TensorMap x = DecodedVersion(store_.get(), "v000001");
  for (uint64_t round = 2; round <= 3; ++round) {
    // Restart on a reopened store each time: the moments must come back from it.
    StopManager();
    store_.reset();
    StartManager();
    a = Connect("a");
    b = Connect("b");
    const std::string base = VersionId(round - 1);
    const common::TensorMap ua = MakeLoraUpdate(4, 1, 8, 8, 10 * round, 0.3f);
    const common::TensorMap ub = MakeLoraUpdate(4, 1, 8, 8, 10 * round + 1, 0.3f);
    RUN_ROUND(round, base, ua, ub, a, b);
    // Reference: one server Adam step from the decoded parent with the stored moments.
    const common::TensorMap want = *AdaptiveServerStep(params, x, Mean(ua, 10, ub, 30), &state);
    EXPECT_EQ(state.steps, round - 1);
    auto rec = **store_->GetVersion(VersionId(round));
    EXPECT_EQ(rec.strategy, "fedadam");
    EXPECT_EQ(rec.parent_version, base);
    ServerOptimizerState stored =
        *DecodeServerState(*store_->GetBlob(rec.server_state_sha256), "state");
    EXPECT_EQ(stored.steps, round - 1);
    for (const auto& [name, t] : state.m) EXPECT_EQ(stored.m.at(name).data, t.data) << name;
    for (const auto& [name, t] : state.v) EXPECT_EQ(stored.v.at(name).data, t.data) << name;
    const common::TensorMap got = DecodedVersion(store_.get(), VersionId(round));
    const common::TensorMap want_q =
        *common::DecodeAdapterBlob(common::EncodeAdapterBlob(want, common::Quant::kQ8_0));
    for (const auto& [name, t] : want_q) EXPECT_EQ(got.at(name).data, t.data) << name;
    x = got;
  }
  EXPECT_EQ(state.steps, 2u);
}

TEST_F(RoundManagerTest, FfaLoraPublishesTheFrozenAAndAbortsOnAMovedA) {
  config_.aggregation.strategy = Strategy::kFfaLora;
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  EXPECT_TRUE(a->Last(Kind::kRoundTask).round_task().freeze_lora_a());
  EXPECT_EQ(a->Last(Kind::kRoundTask).round_task().aggregation(), "ffa-lora");
  const common::TensorMap init = MakeLoraUpdate(4, 1, 8, 8, 1);
  auto with_a = [](common::TensorMap u, const common::TensorMap& from) {
    for (auto& [name, t] : u) {
      if (name.find(".lora_A.") != std::string::npos) t = from.at(name);
    }
    return u;
  };
  RUN_ROUND(1u, "", with_a(MakeLoraUpdate(4, 1, 8, 8, 2), init),
            with_a(MakeLoraUpdate(4, 1, 8, 8, 3), init), a, b);
  const common::TensorMap v1 = DecodedVersion(store_.get(), "v000001");
  // Round 2: b trained A although it is frozen: the round aborts naming b and A.
  ASSERT_TRUE(WaitFor([&]() { return a->Count(Kind::kRoundTask) == 2; }));
  common::TensorMap moved = with_a(MakeLoraUpdate(4, 1, 8, 8, 5), v1);
  moved.begin()->second.data[0] += 0.01f;  // the first tensor is layer 0 q_proj lora_A
  ASSERT_TRUE(Submit("a", 2, 10, with_a(MakeLoraUpdate(4, 1, 8, 8, 4), v1), "v000001").ok());
  ASSERT_TRUE(Submit("b", 2, 30, moved, "v000001").ok());
  ASSERT_TRUE(WaitFor([&]() {
    auto r = store_->GetRound(2);
    return r.ok() && r->has_value() && (*r)->phase == RoundPhase::kAborted;
  }));
  EXPECT_THAT((*store_->GetRound(2))->abort_reason,
              HasSubstr("FFA-LoRA: agent 'b' changed the frozen tensor "
                        "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'"));
  EXPECT_EQ(*store_->CurrentVersion(), "v000001");
}

TEST_F(RoundManagerTest, LoraProductReportsDiscardedEnergyInVersionAndRoundLine) {
  config_.aggregation.strategy = Strategy::kLoraProduct;
  config_.lora_alpha = 8;
  config_.rounds = 1;
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  const common::TensorMap ua = MakeLoraUpdate(4, 1, 8, 8, 1), ub = MakeLoraUpdate(4, 1, 8, 8, 2);
  RUN_ROUND(1u, "", ua, ub, a, b);
  ProductAggregator plain(8.0 / 4, 4);
  ASSERT_TRUE(plain.Add(ua, 10).ok());
  ASSERT_TRUE(plain.Add(ub, 30).ok());
  const ProductResult want = *plain.Finish();
  ASSERT_GT(want.discarded_energy_fraction, 0);  // two rank-4 products: rank 8 > 4
  auto rec = **store_->GetVersion("v000001");
  EXPECT_EQ(rec.strategy, "lora-product");
  ASSERT_TRUE(rec.discarded_energy.has_value());
  EXPECT_DOUBLE_EQ(*rec.discarded_energy, want.discarded_energy_fraction);
  EXPECT_DOUBLE_EQ(*(*store_->GetRound(1))->discarded_energy, want.discarded_energy_fraction);
  common::Metadata md;
  DecodedVersion(store_.get(), "v000001", &md);
  EXPECT_EQ(md.at("fedlora.aggregation"), "lora-product");
  Eval(a, "v000001", 2.0);
  Eval(b, "v000001", 2.0);
  EXPECT_THAT(out_.str(), HasSubstr(absl::StrFormat(" strategy=lora-product discarded_energy=%.6g\n",
                                                    want.discarded_energy_fraction)));
}

// Revocation (coordinator/identity.h drives it): the session is cut, the stored
// update discarded, later and in-flight uploads refused, and the round does not
// aggregate on fewer updates than min_participants because of it.
TEST_F(RoundManagerTest, RevokedAgentIsCutItsUpdateDiscardedAndTheRoundWaitsForTheDeadline) {
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  ASSERT_TRUE(Submit("a", 1, 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());
  std::promise<std::pair<bool, bool>> done;
  manager_->OnAgentRevoked("a", [&](bool closed, bool discarded) {
    done.set_value({closed, discarded});
  });
  const auto [closed, discarded] = done.get_future().get();
  EXPECT_TRUE(closed);
  EXPECT_TRUE(discarded);
  ASSERT_TRUE(a->closed().has_value());
  EXPECT_EQ(a->closed()->code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(a->closed()->message(), HasSubstr("certificate revoked"));
  EXPECT_EQ(*store_->CountUpdates(1), 0u);
  EXPECT_EQ((*store_->GetRound(1))->updates.count("a"), 0u);
  // An upload or a Hello that started before the revocation is refused.
  absl::Status late = Submit("a", 1, 10, MakeLoraUpdate(4, 1, 8, 8, 3));
  EXPECT_EQ(late.code(), absl::StatusCode::kUnauthenticated) << late;
  auto again = Connect("a");
  ASSERT_TRUE(again->closed().has_value());
  EXPECT_EQ(again->closed()->code(), absl::StatusCode::kUnauthenticated);
  // b alone reports: 1 update < min_participants 2, so no aggregation of b alone...
  ASSERT_TRUE(Submit("b", 1, 10, MakeLoraUpdate(4, 1, 8, 8, 2)).ok());
  manager_->Tick();
  EXPECT_EQ((*store_->GetRound(1))->phase, RoundPhase::kTrain);
  // ...and at the deadline the round aborts as with a dropped agent.
  clock_.Advance(100 * 1000);
  manager_->Tick();
  auto r1 = *store_->GetRound(1);
  EXPECT_EQ(r1->phase, RoundPhase::kAborted);
  EXPECT_EQ(*store_->CountUpdates(1), 0u);
  // Revoking an agent that is offline and not in a round changes nothing else.
  std::promise<std::pair<bool, bool>> done2;
  manager_->OnAgentRevoked("zz", [&](bool c, bool d) { done2.set_value({c, d}); });
  EXPECT_EQ(done2.get_future().get(), std::make_pair(false, false));
}

}  // namespace
}  // namespace fedlora::coordinator
