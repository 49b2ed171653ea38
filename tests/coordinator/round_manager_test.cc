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
#include "common/secagg/fixed_point.h"
#include "common/secagg/messages.h"
#include "common/secagg/protocol.h"
#include "coordinator/aggregator.h"
#include "coordinator/lora_product.h"
#include "coordinator/strategy.h"
#include "coordinator/update_validator.h"
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

// ------------------------------------------------------------------ Secure aggregation

namespace sa = common::secagg;

// An agent that speaks the secure-aggregation protocol over a FakeLink.
struct SecAggAgent {
  std::string id;
  std::shared_ptr<FakeLink> link;
  common::TensorMap adapter;
  std::optional<sa::Client> client;
  v1::SecAggSetup setup;
  size_t seen = 0;  // messages of `link` already handled
};

class SecureRoundTest : public RoundManagerTest {
 protected:
  void SetUp() override {
    RoundManagerTest::SetUp();
    config_.min_participants = 3;
    config_.secagg_phase_timeout_s = 30;
  }

  std::vector<SecAggAgent> ConnectAll(int n) {
    std::vector<SecAggAgent> agents;
    for (int i = 0; i < n; ++i) {
      SecAggAgent a;
      a.id = std::string(1, static_cast<char>('a' + i));
      a.adapter = MakeLoraUpdate(4, 1, 8, 8, 50 + i, 0.2f);
      agents.push_back(std::move(a));
    }
    for (SecAggAgent& a : agents) a.link = Connect(a.id);
    return agents;
  }

  void Ready(SecAggAgent& a, uint64_t round = 1) {
    v1::SecAggReady ready;
    ready.set_round_id(round);
    LayoutToProto(ShapesOf(a.adapter), ready.mutable_layout());
    ready.set_num_examples(10);
    ready.mutable_metrics()->set_train_loss(2.0);
    ready.mutable_metrics()->set_eval_loss_before(3.0);
    manager_->OnSecAggReady(a.link, ready);
    manager_->Sync();
  }

  void Send(SecAggAgent& a, const std::string& bytes) {
    v1::SecAggMessage m;
    m.set_round_id(1);
    m.set_data(bytes);
    manager_->OnSecAggMessage(a.link, m);
    manager_->Sync();
  }

  absl::Status SubmitMasked(SecAggAgent& a, const std::string& payload) {
    IncomingUpdate in;
    in.peer_cn = a.id;
    in.payload = payload;
    in.header = MakeHeader(1, a.id, "", 10, payload);
    in.header.set_masked(true);
    std::promise<absl::Status> done;
    auto future = done.get_future();
    manager_->CheckUpdateHeader(a.id, in.header, [&](absl::Status s) {
      if (!s.ok()) {
        done.set_value(s);
        return;
      }
      manager_->SubmitUpdate(std::move(in), [&](absl::Status s2) { done.set_value(s2); });
    });
    return future.get();
  }

  // Handles every new message each live agent got; returns how many it handled.
  int Step(std::vector<SecAggAgent>& agents, const std::set<std::string>& silent) {
    int handled = 0;
    for (SecAggAgent& a : agents) {
      std::vector<v1::CoordinatorMessage> msgs = a.link->messages();
      for (; a.seen < msgs.size(); ++a.seen) {
        const v1::CoordinatorMessage& m = msgs[a.seen];
        if (silent.count(a.id)) continue;
        if (m.has_secagg_setup()) {
          ++handled;
          a.setup = m.secagg_setup();
          sa::SecAggConfig c;
          c.round_id = a.setup.round_id();
          c.round_seed = a.setup.round_seed();
          c.cohort.assign(a.setup.cohort().begin(), a.setup.cohort().end());
          c.neighbours = static_cast<int>(a.setup.neighbours());
          c.threshold = static_cast<int>(a.setup.threshold());
          c.vector_length = a.setup.vector_length();
          auto client = sa::Client::Create(c, a.setup.party_id());
          EXPECT_TRUE(client.ok()) << client.status();
          a.client.emplace(std::move(*client));
          Send(a, *a.client->AdvertiseKeys());
        } else if (m.has_secagg()) {
          ++handled;
          auto header = sa::MessageHeader::Parse(m.secagg().data());
          EXPECT_TRUE(header.ok());
          if (header->type == sa::MessageType::kKeyDirectory) {
            Send(a, *a.client->ShareKeys(m.secagg().data()));
          } else if (header->type == sa::MessageType::kShareDelivery) {
            auto codec = sa::FixedPointCodec::Create(
                {a.setup.clip_range(), a.setup.scale(), static_cast<int>(a.setup.max_agents())});
            std::vector<float> flat;
            for (const auto& [name, t] : a.adapter) flat.insert(flat.end(), t.data.begin(), t.data.end());
            auto masked = a.client->MaskedInput(m.secagg().data(), *codec->Encode(flat));
            EXPECT_TRUE(masked.ok());
            EXPECT_TRUE(SubmitMasked(a, *masked).ok());
          } else if (header->type == sa::MessageType::kUnmaskRequest) {
            Send(a, *a.client->Unmask(m.secagg().data()));
          }
        }
      }
    }
    return handled;
  }

  void Drive(std::vector<SecAggAgent>& agents, const std::set<std::string>& silent = {}) {
    for (int i = 0; i < 20 && Step(agents, silent) > 0; ++i) {
    }
  }
};

TEST_F(SecureRoundTest, PublishesTheMeanOfTheMaskedInputsAndStoresNoUpdate) {
  StartManager();
  auto agents = ConnectAll(3);
  const v1::RoundTask task = agents[0].link->Last(Kind::kRoundTask).round_task();
  ASSERT_TRUE(task.secagg().enabled());
  // A sealed update is refused in a secure round.
  absl::Status sealed = Submit("a", 1, 10, agents[0].adapter);
  EXPECT_EQ(sealed.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(sealed.message(), HasSubstr("secure aggregation"));
  for (SecAggAgent& a : agents) Ready(a);
  Ready(agents[0]);  // a duplicate report is refused and counted
  EXPECT_EQ(manager_->rejections(), 1u);
  auto round = store_->GetRound(1);
  ASSERT_TRUE(round.ok() && round->has_value());
  EXPECT_EQ((*round)->phase, RoundPhase::kSecAgg);
  Drive(agents);
  ASSERT_TRUE(WaitFor([&]() {
    manager_->Sync();
    auto current = store_->CurrentVersion();
    return current.ok() && *current == "v000001";
  }));
  auto version = store_->GetVersion("v000001");
  ASSERT_TRUE(version.ok() && version->has_value());
  EXPECT_TRUE((*version)->secure_aggregation);
  EXPECT_FALSE((*version)->dp_epsilon.has_value());
  EXPECT_THAT((*version)->contributors, ::testing::ElementsAre("a", "b", "c"));
  EXPECT_EQ((*version)->num_examples, 30u);
  auto blob = store_->GetBlob((*version)->sha256);
  ASSERT_TRUE(blob.ok());
  auto published = common::DecodeAdapterBlob(*blob);
  ASSERT_TRUE(published.ok());
  common::TensorMap mean = testing::NaiveWeightedMean(
      {agents[0].adapter, agents[1].adapter, agents[2].adapter}, {1, 1, 1});
  for (const auto& [name, t] : mean) {
    for (size_t i = 0; i < t.data.size(); ++i) {
      EXPECT_NEAR(published->at(name).data[i], t.data[i], 0.2 / 127 + 1e-6) << name;  // q8_0
    }
  }
  auto pending = store_->CountUpdates(1);
  ASSERT_TRUE(pending.ok());
  EXPECT_EQ(*pending, 0u);
  for (SecAggAgent& a : agents) Eval(a.link, "v000001", 2.5);
  EXPECT_THAT(out_.str(), ::testing::HasSubstr(" secagg=on"));
}

TEST_F(SecureRoundTest, AgentLeavingDuringKeyExchangeIsDroppedAndTheRestPublish) {
  config_.min_participants = 2;
  config_.secure_aggregation = "on";
  StartManager();
  auto agents = ConnectAll(2);
  EXPECT_EQ(agents[0].link->Count(Kind::kRoundTask), 0u);  // "on" waits for 3 agents
  SecAggAgent c;
  c.id = "c";
  c.adapter = MakeLoraUpdate(4, 1, 8, 8, 52, 0.2f);
  c.link = Connect("c");
  agents.push_back(std::move(c));
  for (SecAggAgent& a : agents) Ready(a);
  Step(agents, {});  // setup -> AdvertiseKeys from all three
  manager_->OnDisconnect(agents[2].link);  // c leaves before sharing keys
  manager_->Sync();
  Drive(agents, {"c"});
  ASSERT_TRUE(WaitFor([&]() {
    manager_->Sync();
    auto current = store_->CurrentVersion();
    return current.ok() && *current == "v000001";
  }));
  auto version = store_->GetVersion("v000001");
  ASSERT_TRUE(version.ok() && version->has_value());
  EXPECT_THAT((*version)->contributors, ::testing::ElementsAre("a", "b"));
}

TEST_F(SecureRoundTest, TooFewMaskedInputsAbortAtTheDeadline) {
  StartManager();
  auto agents = ConnectAll(3);
  for (SecAggAgent& a : agents) Ready(a);
  Drive(agents, {"b", "c"});  // only a answers
  clock_.Advance(31000);
  manager_->Tick();
  auto round = store_->GetRound(1);
  ASSERT_TRUE(round.ok() && round->has_value());
  EXPECT_EQ((*round)->phase, RoundPhase::kAborted);
  EXPECT_THAT((*round)->abort_reason, HasSubstr("secure aggregation"));
  auto current = store_->CurrentVersion();
  ASSERT_TRUE(current.ok());
  EXPECT_EQ(*current, "");
}

TEST_F(SecureRoundTest, RestartDuringSecAggAbortsAndRetries) {
  StartManager();
  auto agents = ConnectAll(3);
  for (SecAggAgent& a : agents) Ready(a);
  StopManager();
  StartManager();  // the keys were in memory: the round cannot continue
  auto round = store_->GetRound(1);
  ASSERT_TRUE(round.ok() && round->has_value());
  EXPECT_EQ((*round)->phase, RoundPhase::kAborted);
  EXPECT_THAT((*round)->abort_reason, HasSubstr("restarted during secure aggregation"));
  for (SecAggAgent& a : agents) a.link = Connect(a.id);
  auto next = store_->GetRound(2);
  ASSERT_TRUE(next.ok() && next->has_value());
  EXPECT_EQ((*next)->phase, RoundPhase::kTrain);
}

TEST_F(SecureRoundTest, DpBudgetRefusesARoundAndEpsilonIsRecorded) {
  config_.dp_clip_norm = 1.0;
  config_.dp_noise_multiplier = 1.0;
  config_.dp_epsilon_budget = 0.5;  // one round with q = 1, sigma = 1 costs more
  StartManager();
  auto agents = ConnectAll(3);
  EXPECT_EQ(agents[0].link->Count(Kind::kRoundTask), 0u);
  auto none = store_->GetRound(1);
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  StopManager();

  config_.dp_epsilon_budget = 0;  // no limit: the round runs and reports epsilon
  StartManager();
  for (SecAggAgent& a : agents) {
    a.link = Connect(a.id);
    a.seen = a.link->messages().size();
  }
  const v1::RoundTask task = agents[0].link->Last(Kind::kRoundTask).round_task();
  EXPECT_DOUBLE_EQ(task.secagg().dp_clip_norm(), 1.0);
  for (SecAggAgent& a : agents) Ready(a);
  Drive(agents);
  ASSERT_TRUE(WaitFor([&]() {
    manager_->Sync();
    auto current = store_->CurrentVersion();
    return current.ok() && *current == "v000001";
  }));
  auto version = store_->GetVersion("v000001");
  ASSERT_TRUE(version.ok() && version->has_value());
  ASSERT_TRUE((*version)->dp_epsilon.has_value());
  EXPECT_GT(*(*version)->dp_epsilon, 0.5);
  auto round = store_->GetRound(1);
  ASSERT_TRUE(round.ok() && round->has_value());
  EXPECT_FALSE((*round)->dp_accountant_state.empty());
}

}  // namespace
}  // namespace fedlora::coordinator

namespace fedlora::coordinator {
namespace {

// Five agents, two of them poisoned (-40x the honest update). With robust_rule
// median the published version stays next to the honest mean; with the plain
// FedAvg of the same updates it lands far away. Robust rounds run without
// secure aggregation (they need each update).
class RobustRoundTest : public RoundManagerTest {
 protected:
  common::TensorMap RunPoisonedRound(const std::string& rule) {
    config_.robust_rule = rule;
    config_.min_participants = 5;
    StartManager();
    std::vector<std::shared_ptr<FakeLink>> links;
    for (char c : std::string("abcde")) links.push_back(Connect(std::string(1, c)));
    const v1::RoundTask task = links[0]->Last(Kind::kRoundTask).round_task();
    EXPECT_FALSE(task.secagg().enabled());
    honest_ = MakeLoraUpdate(4, 1, 8, 8, 7, 0.1f);
    for (size_t i = 0; i < links.size(); ++i) {
      common::TensorMap u = honest_;
      for (auto& [name, t] : u) {
        for (size_t k = 0; k < t.data.size(); ++k) {
          t.data[k] = i < 2 ? -40.0f * t.data[k] : t.data[k] * (1.0f + 0.01f * static_cast<float>(i));
        }
      }
      const std::string id(1, static_cast<char>('a' + i));
      EXPECT_TRUE(Submit(id, 1, 10, u).ok());
    }
    EXPECT_TRUE(WaitFor([&]() {
      manager_->Sync();
      auto current = store_->CurrentVersion();
      return current.ok() && *current == "v000001";
    }));
    common::Metadata md;
    common::TensorMap got = DecodedVersion(store_.get(), "v000001", &md);
    strategy_ = md.at("fedlora.aggregation");
    return got;
  }
  // L2 distance to the honest update, relative to its norm.
  double RelativeError(const common::TensorMap& got) const {
    double d = 0, n = 0;
    for (const auto& [name, t] : honest_) {
      for (size_t k = 0; k < t.data.size(); ++k) {
        d += std::pow(got.at(name).data[k] - t.data[k], 2);
        n += std::pow(t.data[k], 2);
      }
    }
    return std::sqrt(d / n);
  }
  common::TensorMap honest_;
  std::string strategy_;
};

TEST_F(RobustRoundTest, MedianHoldsWherePlainFedAvgFails) {
  const double robust = RelativeError(RunPoisonedRound("median"));
  EXPECT_EQ(strategy_, "fedavg+median");
  EXPECT_LT(robust, 0.1);
}

TEST_F(RobustRoundTest, PlainFedAvgIsPulledAwayByThePoison) {
  config_.secure_aggregation = "off";
  const double plain = RelativeError(RunPoisonedRound("none"));
  EXPECT_EQ(strategy_, "fedavg");
  EXPECT_GT(plain, 10.0);
}

// ------------------------------------------------------------------ Versions (ops)

absl::StatusOr<v1::VersionChangeResponse> Move(RoundManager* manager, VersionMove move,
                                               const std::string& target,
                                               const std::string& actor = "alice") {
  std::promise<absl::StatusOr<v1::VersionChangeResponse>> done;
  manager->MoveCurrentVersion(move, target, actor,
                              [&](absl::StatusOr<v1::VersionChangeResponse> r) {
                                done.set_value(std::move(r));
                              });
  auto result = done.get_future().get();
  manager->Sync();  // the next round opens after the answer
  return result;
}

TEST_F(RoundManagerTest, RollbackMovesThePointerAbortsTheOpenRoundAndTheNextRoundStartsFromIt) {
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  RUN_ROUND(1u, "", MakeLoraUpdate(4, 1, 8, 8, 1), MakeLoraUpdate(4, 1, 8, 8, 2), a, b);
  RUN_ROUND(2u, "v000001", MakeLoraUpdate(4, 1, 8, 8, 3), MakeLoraUpdate(4, 1, 8, 8, 4), a, b);
  ASSERT_TRUE(WaitFor([&]() { return a->Last(Kind::kRoundTask).round_task().round_id() == 3; }));
  EXPECT_EQ(a->Last(Kind::kRoundTask).round_task().base_version(), "v000002");
  const std::string v2_record = *store_->raw()->Get("versions", "v000002");
  const uint64_t head = store_->audit().head_seq();
  const size_t notices = a->Count(Kind::kVersionNotice);

  // Refused moves change nothing.
  EXPECT_EQ(Move(manager_.get(), VersionMove::kPromote, "v000009").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(Move(manager_.get(), VersionMove::kPromote, "v000002").status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_->audit().head_seq(), head);
  EXPECT_EQ((*store_->GetRound(3))->phase, RoundPhase::kTrain);
  EXPECT_EQ(a->Count(Kind::kVersionNotice), notices);

  auto moved = Move(manager_.get(), VersionMove::kRollback, "");
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_EQ(moved->previous_version(), "v000002");
  EXPECT_EQ(moved->current_version(), "v000001");
  EXPECT_EQ(moved->aborted_round(), 3u);
  EXPECT_EQ(*store_->CurrentVersion(), "v000001");
  EXPECT_EQ(*store_->raw()->Get("versions", "v000002"), v2_record);  // immutable
  auto r3 = **store_->GetRound(3);
  EXPECT_EQ(r3.phase, RoundPhase::kAborted);
  EXPECT_THAT(r3.abort_reason, HasSubstr("version.rollback by alice"));
  auto audit = ListAuditRecords(store_->raw_store(), head + 1, 0);
  ASSERT_TRUE(audit.ok());
  std::vector<std::string> actions;
  for (const AuditRecord& r : *audit) actions.push_back(r.action + "/" + r.actor);
  EXPECT_THAT(actions, ::testing::ElementsAre("round.aborted/coordinator",
                                              "version.rollback/alice",
                                              "round.started/coordinator"));
  // Online agents are told to apply v000001.
  for (const auto& link : {a, b}) {
    const v1::VersionNotice n = link->Last(Kind::kVersionNotice).version_notice();
    EXPECT_EQ(n.version_id(), "v000001");
    EXPECT_EQ(n.sha256(), (*store_->GetVersion("v000001"))->sha256);
  }
  // The next round starts from v000001 and publishes a child of it.
  const v1::RoundTask task = a->Last(Kind::kRoundTask).round_task();
  EXPECT_EQ(task.round_id(), 4u);
  EXPECT_EQ(task.base_version(), "v000001");
  EXPECT_EQ(Submit("a", 4, 10, MakeLoraUpdate(4, 1, 8, 8, 5), "v000002").code(),
            absl::StatusCode::kFailedPrecondition);  // the old base is refused
  RUN_ROUND(4u, "v000001", MakeLoraUpdate(4, 1, 8, 8, 5), MakeLoraUpdate(4, 1, 8, 8, 6), a, b);
  EXPECT_EQ((*store_->GetVersion("v000004"))->parent_version, "v000001");
  EXPECT_EQ(*store_->CurrentVersion(), "v000004");

  // Promote moves it to any stored version; it survives a restart.
  auto promoted = Move(manager_.get(), VersionMove::kPromote, "v000002", "bob");
  ASSERT_TRUE(promoted.ok()) << promoted.status();
  EXPECT_EQ(promoted->previous_version(), "v000004");
  StopManager();
  StartManager();
  auto c = Connect("c");
  EXPECT_EQ(c->Last(Kind::kWelcome).welcome().current_version(), "v000002");
  std::promise<v1::StatusResponse> status;
  manager_->GetStatus([&](v1::StatusResponse r) { status.set_value(std::move(r)); });
  const v1::StatusResponse st = status.get_future().get();
  EXPECT_EQ(st.current_version(), "v000002");
  EXPECT_EQ(st.current_version_info().version_id(), "v000002");
  EXPECT_TRUE(st.current_version_info().current());
}

TEST_F(RoundManagerTest, RollbackWithoutParentIsRefused) {
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  RUN_ROUND(1u, "", MakeLoraUpdate(4, 1, 8, 8, 1), MakeLoraUpdate(4, 1, 8, 8, 2), a, b);
  const uint64_t head = store_->audit().head_seq();
  auto moved = Move(manager_.get(), VersionMove::kRollback, "");
  EXPECT_EQ(moved.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(moved.status().message(), HasSubstr("has no parent"));
  EXPECT_EQ(store_->audit().head_seq(), head);
  EXPECT_EQ((*store_->GetRound(2))->phase, RoundPhase::kTrain);  // the open round goes on
}

TEST_F(RoundManagerTest, BackupDuringAnOpenRoundRestoresWithItsStoredUpdates) {
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  const std::string seal = manager_->seal_public_key();
  ASSERT_TRUE(Submit("a", 1, 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());
  const std::string backup = dir_.Sub("backup");
  std::promise<absl::StatusOr<v1::CreateBackupResponse>> made;
  manager_->CreateBackup(backup, "alice", [&](absl::StatusOr<v1::CreateBackupResponse> r) {
    made.set_value(std::move(r));
  });
  auto response = made.get_future().get();
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->dir(), backup);
  EXPECT_EQ(response->current_version(), "");
  EXPECT_GE(response->audit_records(), 1u);  // round.started
  // The live coordinator goes on and publishes v000001; the backup does not see it.
  ASSERT_TRUE(Submit("b", 1, 30, MakeLoraUpdate(4, 1, 8, 8, 2)).ok());
  ASSERT_TRUE(WaitFor([&]() { return a->Count(Kind::kVersionNotice) == 1; }));
  StopManager();
  store_.reset();

  // Restore: a coordinator on the backup resumes round 1 with a's stored update.
  auto restored = StateStore::Open(backup);
  ASSERT_TRUE(restored.ok()) << restored.status();
  store_ = std::move(*restored);
  EXPECT_EQ(*store_->CurrentVersion(), "");
  EXPECT_EQ(*store_->CountUpdates(1), 1u);
  StartManager();
  EXPECT_EQ(manager_->seal_public_key(), seal);  // the sealing key came along
  auto a2 = Connect("a");
  auto b2 = Connect("b");
  EXPECT_EQ(b2->Last(Kind::kRoundTask).round_task().round_id(), 1u);
  EXPECT_EQ(Submit("a", 1, 10, MakeLoraUpdate(4, 1, 8, 8, 1)).code(),
            absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(Submit("b", 1, 30, MakeLoraUpdate(4, 1, 8, 8, 2)).ok());
  ASSERT_TRUE(WaitFor([&]() { return b2->Count(Kind::kVersionNotice) == 1; }));
  EXPECT_EQ((*store_->GetVersion("v000001"))->contributors, (std::vector<std::string>{"a", "b"}));
  auto report = VerifyAuditChain(store_->raw_store());
  ASSERT_TRUE(report.ok());
  EXPECT_TRUE(report->ok) << report->error;
  // An existing directory is refused.
  std::promise<absl::StatusOr<v1::CreateBackupResponse>> again;
  manager_->CreateBackup(backup, "alice", [&](absl::StatusOr<v1::CreateBackupResponse> r) {
    again.set_value(std::move(r));
  });
  EXPECT_EQ(again.get_future().get().status().code(), absl::StatusCode::kAlreadyExists);
}

TEST_F(RoundManagerTest, PublishQ4ReportsTheReconstructionErrorOfTheAggregate) {
  config_.publish_quant = "q4_0";
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  const common::TensorMap ua = MakeLoraUpdate(4, 1, 8, 8, 1), ub = MakeLoraUpdate(4, 1, 8, 8, 2);
  RUN_ROUND(1u, "", ua, ub, a, b);
  const VersionRecord rec = **store_->GetVersion("v000001");
  EXPECT_EQ(rec.quant, "q4_0");
  ASSERT_TRUE(rec.quant_rel_l2_error.has_value());
  ASSERT_TRUE(rec.quant_max_abs_error.has_value());
  // Recompute: the decoded q4_0 blob (what agents apply) vs the fp32 FedAvg mean.
  common::Metadata md;
  const common::TensorMap decoded = DecodedVersion(store_.get(), "v000001", &md);
  EXPECT_EQ(md.at("fedlora.quant"), "q4_0");
  const common::TensorMap mean = Mean(ua, 10, ub, 30);
  double sum_sq = 0, ref_sq = 0, max_abs = 0;
  for (const auto& [name, t] : mean) {
    const common::HostTensor& d = decoded.at(name);
    ASSERT_EQ(d.shape, t.shape) << name;
    for (size_t i = 0; i < t.data.size(); ++i) {
      const double e = std::fabs(static_cast<double>(d.data[i]) - t.data[i]);
      max_abs = std::max(max_abs, e);
      sum_sq += e * e;
      ref_sq += static_cast<double>(t.data[i]) * t.data[i];
    }
  }
  const double rel = std::sqrt(sum_sq / ref_sq);
  EXPECT_GT(rel, 0.0);
  EXPECT_LT(rel, 0.25);
  EXPECT_NEAR(*rec.quant_rel_l2_error, rel, 1e-9);
  EXPECT_NEAR(*rec.quant_max_abs_error, max_abs, 1e-9);
  // The same figures in Admin.Status.
  std::promise<v1::StatusResponse> status;
  manager_->GetStatus([&](v1::StatusResponse r) { status.set_value(std::move(r)); });
  const v1::StatusResponse st = status.get_future().get();
  EXPECT_EQ(st.current_version_info().quant(), "q4_0");
  EXPECT_DOUBLE_EQ(st.current_version_info().quant_rel_l2_error(), *rec.quant_rel_l2_error);
  // The next round starts from the q4_0 version like from any other.
  RUN_ROUND(2u, "v000001", MakeLoraUpdate(4, 1, 8, 8, 3), MakeLoraUpdate(4, 1, 8, 8, 4), a, b);
}

TEST_F(RoundManagerTest, DefaultPublishIsQ8WithASmallerError) {
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  RUN_ROUND(1u, "", MakeLoraUpdate(4, 1, 8, 8, 1), MakeLoraUpdate(4, 1, 8, 8, 2), a, b);
  const VersionRecord rec = **store_->GetVersion("v000001");
  EXPECT_EQ(rec.quant, "q8_0");
  ASSERT_TRUE(rec.quant_rel_l2_error.has_value());
  EXPECT_GT(*rec.quant_rel_l2_error, 0.0);
  EXPECT_LT(*rec.quant_rel_l2_error, 0.02);  // 8-bit: well under 4-bit's error
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
