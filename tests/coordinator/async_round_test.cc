// The RoundManager in async (FedBuff) mode, with a FakeClock and fake agent links
// (round_manager.h, "Async mode"). Tests call Tick(); the timer is set far out.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <future>
#include <sstream>

#include "common/quant/quant.h"
#include "coordinator/fedbuff.h"
#include "coordinator/round_manager.h"
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

class AsyncRoundTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_.mode = "async";
    config_.async_buffer_size = 2;
    config_.async_concurrency = 10;
    config_.async_max_staleness = 5;
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
    ASSERT_TRUE(manager_->Start().ok());
    manager_->Sync();
  }

  void StopManager() {
    if (!manager_) return;
    manager_->Stop();
    manager_->Join();
    manager_.reset();
  }

  std::shared_ptr<FakeLink> Connect(const std::string& cn) {
    auto link = std::make_shared<FakeLink>(cn);
    v1::Hello hello;
    hello.set_agent_id(cn);
    hello.set_base_model_hash(kBaseHash);
    hello.set_num_train_examples(10);
    manager_->OnHello(link, hello);
    manager_->Sync();
    return link;
  }

  // Submits `update` for `task` (id and base version as the agent received them).
  absl::Status Submit(const std::string& agent, const v1::RoundTask& task, uint64_t examples,
                      const common::TensorMap& update) {
    return SubmitRaw(agent, task.round_id(), task.base_version(), examples, update);
  }
  absl::Status SubmitRaw(const std::string& agent, uint64_t task_id, const std::string& base,
                         uint64_t examples, const common::TensorMap& update) {
    IncomingUpdate in;
    in.peer_cn = agent;
    in.payload = SealUpdate(update, manager_->seal_public_key(), task_id, agent, base);
    in.header = MakeHeader(task_id, agent, base, examples, in.payload);
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

  static v1::RoundTask LastTask(const std::shared_ptr<FakeLink>& link) {
    return link->Last(Kind::kRoundTask).round_task();
  }

  // Waits for the version to be current (published and the next buffer open).
  bool WaitForVersion(const std::string& version_id) {
    return WaitFor([&]() {
      auto current = store_->CurrentVersion();
      if (!current.ok() || *current != version_id) return false;
      manager_->Sync();
      return true;
    });
  }

  common::TensorMap VersionTensors(const std::string& version_id) {
    auto v = store_->GetVersion(version_id);
    EXPECT_TRUE(v.ok() && v->has_value()) << version_id;
    auto blob = store_->GetBlob((*v)->sha256);
    EXPECT_TRUE(blob.ok());
    auto tensors = common::DecodeAdapterBlob(*blob);
    EXPECT_TRUE(tensors.ok());
    return *tensors;
  }

  TempDir dir_;
  CoordinatorConfig config_;
  FakeClock clock_;
  std::ostringstream out_;
  std::unique_ptr<StateStore> store_;
  std::unique_ptr<RoundManager> manager_;
};

// Several versions in a row from three agents, the third built from a buffer with
// one stale update; its adapter equals a plain reference computation of
// current + server_lr * sum w s(tau) (u - base) / sum w s(tau) on the stored versions.
TEST_F(AsyncRoundTest, PublishesSeveralVersionsAndTheStaleWeightedAggregateMatchesAReference) {
  config_.async_server_lr = 0.8;
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  auto c = Connect("c");
  // No version yet: no more tasks out than the first buffer needs (K = 2).
  ASSERT_EQ(a->Count(Kind::kRoundTask), 1u);
  ASSERT_EQ(b->Count(Kind::kRoundTask), 1u);
  EXPECT_EQ(c->Count(Kind::kRoundTask), 0u);
  const v1::RoundTask ta1 = LastTask(a), tb1 = LastTask(b);
  EXPECT_NE(ta1.round_id(), tb1.round_id());  // one task id each
  EXPECT_EQ(ta1.base_version(), "");
  EXPECT_FALSE(ta1.secagg().enabled());  // auto = off in async mode
  EXPECT_EQ(ta1.deadline_unix_ms(), clock_.NowUnixMs() + 100 * 1000);
  ASSERT_TRUE(Submit("a", ta1, 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());
  ASSERT_TRUE(Submit("b", tb1, 30, MakeLoraUpdate(4, 1, 8, 8, 2)).ok());
  ASSERT_TRUE(WaitForVersion("v000001"));

  // Buffer 2: every agent is idle and gets a task from v000001.
  ASSERT_TRUE(WaitFor([&]() { return c->Count(Kind::kRoundTask) == 1; }));
  const v1::RoundTask ta2 = LastTask(a), tb2 = LastTask(b), tc2 = LastTask(c);
  EXPECT_EQ(tc2.base_version(), "v000001");
  EXPECT_EQ(a->Count(Kind::kVersionNotice), 1u);
  ASSERT_TRUE(Submit("a", ta2, 20, MakeLoraUpdate(4, 1, 8, 8, 3)).ok());
  ASSERT_TRUE(Submit("b", tb2, 40, MakeLoraUpdate(4, 1, 8, 8, 4)).ok());
  ASSERT_TRUE(WaitForVersion("v000002"));

  // a was idle again while buffer 2 filled: it got a second task from v000001. After
  // v000002 only b is idle: its task starts from v000002.
  EXPECT_EQ(a->Count(Kind::kRoundTask), 3u);
  EXPECT_EQ(LastTask(a).base_version(), "v000001");
  ASSERT_TRUE(WaitFor([&]() { return b->Count(Kind::kRoundTask) == 3; }));
  const v1::RoundTask tb3 = LastTask(b);
  EXPECT_EQ(tb3.base_version(), "v000002");
  EXPECT_EQ(c->Count(Kind::kRoundTask), 1u);  // still training its task
  // Buffer 3: c's update is one version stale, b's is fresh.
  const common::TensorMap uc = MakeLoraUpdate(4, 1, 8, 8, 5);
  const common::TensorMap ub = MakeLoraUpdate(4, 1, 8, 8, 6);
  ASSERT_TRUE(Submit("c", tc2, 50, uc).ok());
  ASSERT_TRUE(Submit("b", tb3, 10, ub).ok());
  ASSERT_TRUE(WaitForVersion("v000003"));

  auto r3 = *store_->GetRound(3);
  ASSERT_TRUE(r3.has_value());
  EXPECT_EQ(r3->mode, "async");
  EXPECT_EQ(r3->phase, RoundPhase::kDone);
  EXPECT_EQ(r3->base_version, "v000002");
  ASSERT_EQ(r3->updates.size(), 2u);
  EXPECT_EQ(r3->updates.at(TaskKey(tc2.round_id())).staleness, 1u);
  EXPECT_EQ(r3->updates.at(TaskKey(tb3.round_id())).staleness, 0u);
  EXPECT_THAT(r3->participants, ::testing::UnorderedElementsAre("b", "c"));
  EXPECT_EQ(*store_->CountUpdates(3), 0u);  // the published buffer's updates are gone
  auto v3 = **store_->GetVersion("v000003");
  EXPECT_EQ(v3.strategy, "fedbuff");
  EXPECT_EQ(v3.parent_version, "v000002");
  EXPECT_EQ(v3.num_examples, 60u);
  EXPECT_EQ(v3.contributors, (std::vector<std::string>{"b", "c"}));
  ASSERT_TRUE(v3.quant_max_abs_error.has_value());

  // The reference, from the versions as stored (what the agents trained from).
  const common::TensorMap x1 = VersionTensors("v000001");
  const common::TensorMap x2 = VersionTensors("v000002");
  const common::TensorMap got = VersionTensors("v000003");
  const double wc = 50 / std::sqrt(2.0), wb = 10;  // w * (1 + tau)^-0.5
  double max_err = 0, max_err_unweighted = 0;
  for (const auto& [name, x] : x2) {
    for (size_t k = 0; k < x.data.size(); ++k) {
      const double dc = double(uc.at(name).data[k]) - double(x1.at(name).data[k]);
      const double db = double(ub.at(name).data[k]) - double(x.data[k]);
      const double want = double(x.data[k]) + 0.8 * (wc * dc + wb * db) / (wc + wb);
      const double ignoring_staleness = double(x.data[k]) + 0.8 * (50 * dc + 10 * db) / 60;
      max_err = std::max(max_err, std::abs(double(got.at(name).data[k]) - want));
      max_err_unweighted =
          std::max(max_err_unweighted, std::abs(double(got.at(name).data[k]) - ignoring_staleness));
    }
  }
  EXPECT_LE(max_err, *v3.quant_max_abs_error + 1e-6);
  // The staleness weights matter by far more than the quantization error.
  EXPECT_GT(max_err_unweighted, 3 * *v3.quant_max_abs_error + 1e-3);

  // The round lines say which buffers they were.
  manager_->Sync();
  clock_.Advance(31 * 1000);
  manager_->Tick();
  EXPECT_THAT(out_.str(), HasSubstr("round 3: participants=2"));
  EXPECT_THAT(out_.str(), HasSubstr("strategy=fedbuff mode=async updates=2 max_staleness=1"));
}

TEST_F(AsyncRoundTest, StaleBeyondMaxIsRefusedWithAClearStatusAndNothingStored) {
  config_.async_buffer_size = 1;
  config_.async_max_staleness = 1;
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  ASSERT_EQ(a->Count(Kind::kRoundTask) + b->Count(Kind::kRoundTask), 1u);  // K = 1, fresh
  auto first = a->Count(Kind::kRoundTask) == 1 ? a : b;
  const std::string first_id = first == a ? "a" : "b";
  ASSERT_TRUE(Submit(first_id, LastTask(first), 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());
  ASSERT_TRUE(WaitForVersion("v000001"));
  // Round 2: both get a task from v000001; a publishes twice more, b falls behind.
  auto has_task_from = [](const std::shared_ptr<FakeLink>& link, const std::string& version) {
    return link->Count(Kind::kRoundTask) > 0 && LastTask(link).base_version() == version;
  };
  ASSERT_TRUE(WaitFor([&]() { return has_task_from(b, "v000001"); }));
  ASSERT_TRUE(WaitFor([&]() { return has_task_from(a, "v000001"); }));
  const v1::RoundTask tb = LastTask(b);
  ASSERT_TRUE(Submit("a", LastTask(a), 10, MakeLoraUpdate(4, 1, 8, 8, 2)).ok());
  ASSERT_TRUE(WaitForVersion("v000002"));
  ASSERT_TRUE(WaitFor([&]() { return has_task_from(a, "v000002"); }));
  ASSERT_TRUE(Submit("a", LastTask(a), 10, MakeLoraUpdate(4, 1, 8, 8, 3)).ok());
  ASSERT_TRUE(WaitForVersion("v000003"));
  const size_t b_tasks = b->Count(Kind::kRoundTask);

  absl::Status s = Submit("b", tb, 10, MakeLoraUpdate(4, 1, 8, 8, 4));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("is stale: its base version 'v000001' is 2 versions behind the current "
                        "version 'v000003'; async_max_staleness is 1"));
  manager_->Sync();
  auto open = *store_->GetRound(4);
  ASSERT_TRUE(open.has_value());
  EXPECT_EQ(open->phase, RoundPhase::kTrain);
  EXPECT_TRUE(open->updates.empty());
  EXPECT_EQ(*store_->CountUpdates(4), 0u);
  EXPECT_EQ(*store_->CurrentVersion(), "v000003");
  // The refusal ended b's task: it gets a new one from the current version.
  EXPECT_EQ(b->Count(Kind::kRoundTask), b_tasks + 1);
  EXPECT_EQ(LastTask(b).base_version(), "v000003");
  // A one-version-old update is still taken.
  ASSERT_TRUE(Submit("a", LastTask(a), 10, MakeLoraUpdate(4, 1, 8, 8, 5)).ok());
  ASSERT_TRUE(WaitForVersion("v000004"));
  ASSERT_TRUE(Submit("b", LastTask(b), 10, MakeLoraUpdate(4, 1, 8, 8, 6)).ok());
  ASSERT_TRUE(WaitForVersion("v000005"));
  EXPECT_EQ((*store_->GetRound(5))->updates.begin()->second.staleness, 1u);
}

TEST_F(AsyncRoundTest, DuplicatesAndForeignTasksAreRefused) {
  config_.async_buffer_size = 3;
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  const v1::RoundTask ta = LastTask(a), tb = LastTask(b);
  EXPECT_EQ(manager_->metrics().Value("fedlora_async_tasks_in_flight"), 2);
  EXPECT_EQ(manager_->metrics().Value("fedlora_async_buffered_updates"), 0);
  ASSERT_TRUE(Submit("a", ta, 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());
  manager_->Sync();
  EXPECT_EQ(manager_->metrics().Value("fedlora_async_buffered_updates"), 1);
  EXPECT_EQ(manager_->metrics().Value("fedlora_async_tasks_in_flight"), 2);  // a got a new task
  absl::Status dup = Submit("a", ta, 10, MakeLoraUpdate(4, 1, 8, 8, 1));
  EXPECT_EQ(dup.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(dup.message()), HasSubstr("already submitted an update for task"));
  EXPECT_EQ(Submit("a", tb, 10, MakeLoraUpdate(4, 1, 8, 8, 2)).code(),
            absl::StatusCode::kPermissionDenied);  // b's task
  absl::Status unknown = SubmitRaw("a", 999, "", 10, MakeLoraUpdate(4, 1, 8, 8, 2));
  EXPECT_EQ(unknown.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(unknown.message()), HasSubstr("task 999 is unknown"));
  EXPECT_EQ(SubmitRaw("b", tb.round_id(), "v000009", 10, MakeLoraUpdate(4, 1, 8, 8, 2)).code(),
            absl::StatusCode::kFailedPrecondition);  // not the task's base version
  manager_->Sync();
  auto r1 = **store_->GetRound(1);
  EXPECT_EQ(r1.updates.size(), 1u);
  EXPECT_EQ(*store_->CountUpdates(1), 1u);
}

// Kill (Stop without publishing) with two of three updates buffered, restart on the
// same store: the buffer is kept, a resubmission is not counted twice, the task of
// the agent still training is re-sent, and the third update publishes all three.
TEST_F(AsyncRoundTest, RestartKeepsTheBufferAndCountsEachUpdateOnce) {
  config_.async_buffer_size = 3;
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  auto c = Connect("c");
  const v1::RoundTask ta = LastTask(a), tb = LastTask(b), tc = LastTask(c);
  ASSERT_TRUE(Submit("a", ta, 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());
  ASSERT_TRUE(Submit("b", tb, 20, MakeLoraUpdate(4, 1, 8, 8, 2)).ok());
  StopManager();

  StartManager();
  auto r1 = **store_->GetRound(1);
  EXPECT_EQ(r1.phase, RoundPhase::kTrain);
  EXPECT_EQ(r1.updates.size(), 2u);
  EXPECT_EQ(*store_->CountUpdates(1), 2u);
  auto c2 = Connect("c");
  ASSERT_EQ(c2->Count(Kind::kRoundTask), 1u);
  EXPECT_EQ(LastTask(c2).round_id(), tc.round_id());  // the same task, again
  auto a2 = Connect("a");
  EXPECT_EQ(a2->Count(Kind::kRoundTask), 0u);  // the first buffer needs one more: c's
  EXPECT_EQ(Submit("a", ta, 10, MakeLoraUpdate(4, 1, 8, 8, 1)).code(),
            absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(Submit("c", tc, 30, MakeLoraUpdate(4, 1, 8, 8, 3)).ok());
  ASSERT_TRUE(WaitForVersion("v000001"));
  auto v1 = **store_->GetVersion("v000001");
  EXPECT_EQ(v1.contributors, (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(v1.num_examples, 60u);
  EXPECT_EQ((*store_->GetRound(1))->updates.size(), 3u);
}

// A coordinator killed after the buffer went TRAIN -> AGGREGATE (synced) and before
// the publish: the restart aggregates the stored buffer again and publishes it once.
TEST_F(AsyncRoundTest, RestartDuringAggregateRedoesTheFlushOnce) {
  config_.async_buffer_size = 2;
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  const v1::RoundTask ta = LastTask(a), tb = LastTask(b);
  const common::TensorMap ua = MakeLoraUpdate(4, 1, 8, 8, 1), ub = MakeLoraUpdate(4, 1, 8, 8, 2);
  ASSERT_TRUE(Submit("a", ta, 10, ua).ok());
  const std::string seal = manager_->seal_public_key();
  StopManager();
  {  // What the killed coordinator had written: b's update, then the AGGREGATE phase.
    RoundRecord r = **store_->GetRound(1);
    UpdateRecord u;
    u.round_id = 1;
    u.agent_id = "b";
    u.task_id = tb.round_id();
    u.sealed = SealUpdate(ub, seal, tb.round_id(), "b", "");
    u.summary.num_examples = 30;
    u.summary.agent_id = "b";
    u.summary.task_id = tb.round_id();
    r.updates[TaskKey(tb.round_id())] = u.summary;
    r.participants.push_back("b");
    ASSERT_TRUE(store_->AcceptUpdate(u, r).ok());
    r.phase = RoundPhase::kAggregate;
    ASSERT_TRUE(store_->PutRound(r).ok());
  }
  StartManager();
  ASSERT_TRUE(WaitForVersion("v000001"));
  auto v1 = **store_->GetVersion("v000001");
  EXPECT_EQ(v1.contributors, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(v1.num_examples, 40u);
  const common::TensorMap got = VersionTensors("v000001");
  const common::TensorMap want = testing::NaiveWeightedMean({ua, ub}, {10, 30});
  for (const auto& [name, t] : want) {
    for (size_t k = 0; k < t.data.size(); ++k) {
      EXPECT_NEAR(got.at(name).data[k], t.data[k], *v1.quant_max_abs_error + 1e-6);
    }
  }
  EXPECT_FALSE(store_->GetVersion("v000002").value_or(std::nullopt).has_value());
  auto r2 = *store_->GetRound(2);  // the next buffer is open
  ASSERT_TRUE(r2.has_value());
  EXPECT_EQ(r2->phase, RoundPhase::kTrain);
  EXPECT_EQ(r2->base_version, "v000001");
}

TEST_F(AsyncRoundTest, ConcurrencyLimitsTasksAndADeadlineFreesTheSlot) {
  config_.async_buffer_size = 1;
  config_.async_concurrency = 1;
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  ASSERT_EQ(a->Count(Kind::kRoundTask) + b->Count(Kind::kRoundTask), 1u);
  auto first = a->Count(Kind::kRoundTask) == 1 ? a : b;
  auto second = first == a ? b : a;
  clock_.Advance(100 * 1000);  // the task's deadline
  manager_->Tick();
  EXPECT_EQ(second->Count(Kind::kRoundTask), 1u);  // the freed slot went to the idle agent
  EXPECT_EQ(first->Count(Kind::kRoundTask), 1u);
  // A late update of the expired task is still accepted (staleness 0) and publishes.
  const std::string first_id = first == a ? "a" : "b";
  ASSERT_TRUE(Submit(first_id, LastTask(first), 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());
  ASSERT_TRUE(WaitForVersion("v000001"));
}

// A revoked agent's buffered updates leave the buffer (store and round record), its
// later uploads are refused, and the buffer fills from the others.
TEST_F(AsyncRoundTest, RevokedAgentsBufferedUpdatesAreDiscarded) {
  config_.async_buffer_size = 3;
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  auto c = Connect("c");
  const v1::RoundTask ta = LastTask(a), tb = LastTask(b), tc = LastTask(c);
  ASSERT_TRUE(Submit("a", ta, 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());
  ASSERT_TRUE(Submit("b", tb, 10, MakeLoraUpdate(4, 1, 8, 8, 2)).ok());
  std::promise<std::pair<bool, bool>> done;
  manager_->OnAgentRevoked("a", [&](bool closed, bool discarded) {
    done.set_value({closed, discarded});
  });
  EXPECT_EQ(done.get_future().get(), std::make_pair(true, true));
  auto r1 = **store_->GetRound(1);
  EXPECT_EQ(r1.updates.size(), 1u);
  EXPECT_EQ(r1.updates.count(TaskKey(ta.round_id())), 0u);
  EXPECT_EQ(r1.participants, (std::vector<std::string>{"b"}));
  EXPECT_EQ(*store_->CountUpdates(1), 1u);
  EXPECT_EQ(SubmitRaw("a", ta.round_id() + 100, "", 10, MakeLoraUpdate(4, 1, 8, 8, 3)).code(),
            absl::StatusCode::kUnauthenticated);
  // The buffer needs two more: c's, and a new task for b (a's slot is gone with it).
  ASSERT_TRUE(Submit("c", tc, 10, MakeLoraUpdate(4, 1, 8, 8, 4)).ok());
  ASSERT_TRUE(WaitFor([&]() { return b->Count(Kind::kRoundTask) == 2; }));
  ASSERT_TRUE(Submit("b", LastTask(b), 10, MakeLoraUpdate(4, 1, 8, 8, 5)).ok());
  ASSERT_TRUE(WaitForVersion("v000001"));
  EXPECT_EQ((**store_->GetVersion("v000001")).contributors, (std::vector<std::string>{"b", "c"}));
}

// Two updates race for a one-update buffer: whichever comes second either waits
// while the first is aggregated or arrives after the publish; both ways it lands in
// the next buffer, one version stale, and both are published once.
TEST_F(AsyncRoundTest, UpdateArrivingDuringAggregationGoesIntoTheNextBuffer) {
  config_.async_buffer_size = 1;
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  ASSERT_TRUE(Submit("a", LastTask(a), 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());  // fresh: 1 task
  ASSERT_TRUE(WaitForVersion("v000001"));
  ASSERT_TRUE(WaitFor(
      [&]() { return a->Count(Kind::kRoundTask) == 2 && b->Count(Kind::kRoundTask) == 1; }));
  const v1::RoundTask ta = LastTask(a), tb = LastTask(b);
  ASSERT_EQ(ta.base_version(), "v000001");
  ASSERT_EQ(tb.base_version(), "v000001");
  auto fa = std::async(std::launch::async,
                       [&]() { return Submit("a", ta, 10, MakeLoraUpdate(4, 1, 8, 8, 2)); });
  auto fb = std::async(std::launch::async,
                       [&]() { return Submit("b", tb, 10, MakeLoraUpdate(4, 1, 8, 8, 3)); });
  ASSERT_TRUE(fa.get().ok());
  ASSERT_TRUE(fb.get().ok());
  ASSERT_TRUE(WaitForVersion("v000003"));
  auto r2 = **store_->GetRound(2), r3 = **store_->GetRound(3);
  ASSERT_EQ(r2.updates.size(), 1u);
  ASSERT_EQ(r3.updates.size(), 1u);
  EXPECT_EQ(r2.updates.begin()->second.staleness, 0u);
  EXPECT_EQ(r3.updates.begin()->second.staleness, 1u);  // its base v000001, applied to v000002
  EXPECT_EQ(r3.base_version, "v000002");
  EXPECT_NE(r2.updates.begin()->second.agent_id, r3.updates.begin()->second.agent_id);
}

// Admin.Status and ListVersions read async buffers as rounds and their versions.
TEST_F(AsyncRoundTest, StatusAndVersionsListTheBuffers) {
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  ASSERT_TRUE(Submit("a", LastTask(a), 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());
  ASSERT_TRUE(Submit("b", LastTask(b), 10, MakeLoraUpdate(4, 1, 8, 8, 2)).ok());
  ASSERT_TRUE(WaitForVersion("v000001"));
  std::promise<v1::StatusResponse> status;
  manager_->GetStatus([&](v1::StatusResponse r) { status.set_value(std::move(r)); });
  const v1::StatusResponse st = status.get_future().get();
  EXPECT_EQ(st.current_version(), "v000001");
  EXPECT_EQ(st.current_round(), 2u);  // the next buffer
  EXPECT_EQ(st.current_phase(), "TRAIN");
  ASSERT_EQ(st.rounds_size(), 2);
  EXPECT_EQ(st.rounds(0).version_id(), "v000001");
  EXPECT_EQ(st.rounds(0).aggregation(), "fedbuff");
  EXPECT_EQ(st.rounds(0).updates_received(), 2u);
  EXPECT_EQ(st.rounds(0).participants(), 2u);
  EXPECT_FALSE(st.rounds(0).secure_aggregation());
  std::promise<absl::StatusOr<v1::ListVersionsResponse>> versions;
  manager_->ListVersions(
      [&](absl::StatusOr<v1::ListVersionsResponse> r) { versions.set_value(std::move(r)); });
  auto list = versions.get_future().get();
  ASSERT_TRUE(list.ok()) << list.status();
  ASSERT_EQ(list->versions_size(), 1);
  EXPECT_EQ(list->versions(0).version_id(), "v000001");
}

// Restarting in the other mode aborts the open round (and drops its buffer).
TEST_F(AsyncRoundTest, RestartInSyncModeAbortsTheOpenBuffer) {
  config_.async_buffer_size = 3;
  StartManager();
  auto a = Connect("a");
  ASSERT_TRUE(Submit("a", LastTask(a), 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());
  StopManager();
  config_.mode = "sync";
  StartManager();
  auto r1 = **store_->GetRound(1);
  EXPECT_EQ(r1.phase, RoundPhase::kAborted);
  EXPECT_THAT(r1.abort_reason, HasSubstr("restarted in mode sync"));
  EXPECT_EQ(*store_->CountUpdates(1), 0u);
}

// An update trained from the fresh adapter cannot be merged once a version exists
// (the coordinator does not know the seeded initialisation): refused, nothing stored.
TEST_F(AsyncRoundTest, FreshAdapterUpdateAfterTheFirstVersionIsRefused) {
  config_.async_buffer_size = 1;
  config_.async_concurrency = 2;
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  ASSERT_EQ(a->Count(Kind::kRoundTask), 1u);  // fresh: one task for a one-update buffer
  ASSERT_EQ(b->Count(Kind::kRoundTask), 0u);
  clock_.Advance(100 * 1000);  // a's task expires; b gets the fresh task instead
  manager_->Tick();
  ASSERT_EQ(b->Count(Kind::kRoundTask), 1u);
  const v1::RoundTask tb = LastTask(b);
  ASSERT_TRUE(Submit("a", LastTask(a), 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());  // late, taken
  ASSERT_TRUE(WaitForVersion("v000001"));
  absl::Status s = Submit("b", tb, 10, MakeLoraUpdate(4, 1, 8, 8, 2));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("trained from the fresh adapter"));
  manager_->Sync();
  EXPECT_TRUE((**store_->GetRound(2)).updates.empty());
  EXPECT_EQ(*store_->CountUpdates(2), 0u);
  EXPECT_EQ(LastTask(b).base_version(), "v000001");  // b's next task starts from the version
}

// With `rounds` set, the update that loses the race for the last buffer is refused
// (whether it waited for a next buffer or came after the publish): no extra version.
TEST_F(AsyncRoundTest, RoundsLimitRefusesTheUpdatesAfterTheLastVersion) {
  config_.async_buffer_size = 1;
  config_.rounds = 2;
  StartManager();
  auto a = Connect("a");
  auto b = Connect("b");
  ASSERT_TRUE(Submit("a", LastTask(a), 10, MakeLoraUpdate(4, 1, 8, 8, 1)).ok());
  ASSERT_TRUE(WaitForVersion("v000001"));
  ASSERT_TRUE(WaitFor(
      [&]() { return a->Count(Kind::kRoundTask) == 2 && b->Count(Kind::kRoundTask) == 1; }));
  const v1::RoundTask ta = LastTask(a), tb = LastTask(b);
  auto fa = std::async(std::launch::async,
                       [&]() { return Submit("a", ta, 10, MakeLoraUpdate(4, 1, 8, 8, 2)); });
  auto fb = std::async(std::launch::async,
                       [&]() { return Submit("b", tb, 10, MakeLoraUpdate(4, 1, 8, 8, 3)); });
  const absl::Status sa = fa.get(), sb = fb.get();
  EXPECT_NE(sa.ok(), sb.ok()) << sa << " / " << sb;
  const absl::Status& refused = sa.ok() ? sb : sa;
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(refused.message()), HasSubstr("published its 2 rounds"));
  ASSERT_TRUE(WaitForVersion("v000002"));
  EXPECT_FALSE(store_->GetRound(3).value_or(std::nullopt).has_value());
  EXPECT_FALSE(store_->GetVersion("v000003").value_or(std::nullopt).has_value());
}

}  // namespace
}  // namespace fedlora::coordinator
