#include "coordinator/round_manager.h"

#include <algorithm>
#include <chrono>
#include <boost/asio/post.hpp>
#include <cmath>
#include <cstdio>
#include <deque>
#include <future>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/quant/quant.h"
#include "common/status/status.h"
#include "common/tensor/tensor.h"
#include "coordinator/logging.h"
#include "coordinator/strategy.h"
#include "coordinator/update_validator.h"

namespace fedlora::coordinator {
namespace {

namespace v1 = ::fedlora::v1;

// Metric names and help texts (docs/operations.md, "Metrics and health").
constexpr char kMetricAccepted[] = "fedlora_updates_accepted_total";
constexpr char kHelpAccepted[] = "Updates accepted and stored";
constexpr char kMetricRejected[] = "fedlora_updates_rejected_total";
constexpr char kHelpRejected[] = "Updates refused, by gRPC status code";
constexpr char kMetricPublished[] = "fedlora_rounds_published_total";
constexpr char kHelpPublished[] = "Rounds aggregated and published as a version";
constexpr char kMetricAborted[] = "fedlora_rounds_aborted_total";
constexpr char kHelpAborted[] = "Rounds aborted (deadline, aggregation or store failure)";
constexpr char kMetricBytesIn[] = "fedlora_update_bytes_received_total";
constexpr char kHelpBytesIn[] = "Sealed update payload bytes received by SubmitUpdate";
constexpr char kMetricBytesOut[] = "fedlora_adapter_bytes_sent_total";
constexpr char kHelpBytesOut[] = "Adapter blob bytes sent by FetchAdapter";
constexpr char kMetricAgents[] = "fedlora_agents_connected";
constexpr char kHelpAgents[] = "Agents with an open Session stream";
constexpr char kMetricRound[] = "fedlora_current_round";
constexpr char kHelpRound[] = "Id of the open round, else of the last round opened (0 = none)";
constexpr char kMetricAggregation[] = "fedlora_aggregation_seconds";
constexpr char kHelpAggregation[] = "Wall time of aggregation (any strategy) and encoding";
constexpr char kMetricPhase[] = "fedlora_round_phase_seconds";
constexpr char kHelpPhase[] =
    "Time rounds spent in a phase: train (open to aggregate), aggregate (to publish), "
    "eval (publish to evaluation complete)";

std::string Num(double v) {
  if (!std::isfinite(v)) return "nan";
  return absl::StrFormat("%.4f", v);
}

nlohmann::ordered_json JsonNum(double v) {
  return std::isfinite(v) ? nlohmann::ordered_json(v) : nlohmann::ordered_json(nullptr);
}

// " mode=async updates=N max_staleness=T" for the round line of a FedBuff buffer.
std::string AsyncRoundSuffix(const RoundRecord& r) {
  uint64_t max_staleness = 0;
  for (const auto& [key, u] : r.updates) max_staleness = std::max(max_staleness, u.staleness);
  return absl::StrCat(" mode=async updates=", r.updates.size(), " max_staleness=", max_staleness);
}

bool IsHex64(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

}  // namespace

std::string UpdateAad(uint64_t round_id, const std::string& agent_id,
                      const std::string& base_model_hash, const std::string& base_version) {
  return absl::StrCat("fedlora-update-v1|", round_id, "|", agent_id, "|", base_model_hash, "|",
                      base_version);
}

RoundManager::RoundManager(const CoordinatorConfig& config, StateStore* store, const Clock* clock,
                           std::string base_model_hash, std::ostream* out)
    : config_(config),
      store_(store),
      clock_(clock),
      base_model_hash_(std::move(base_model_hash)),
      out_(out),
      timer_(io_) {}

RoundManager::~RoundManager() {
  Stop();
  Join();
}

void RoundManager::Post(std::function<void()> fn) {
  boost::asio::post(io_, [fn = std::move(fn)]() {
    try {
      fn();
    } catch (const std::exception& e) {
      Log(LogLevel::kError, "unexpected exception in the round manager", {{"what", e.what()}});
    }
  });
}

absl::Status RoundManager::Start() {
  if (started_) return absl::FailedPreconditionError("RoundManager::Start called twice");
  ASSIGN_OR_RETURN(seal_key_, store_->LoadOrCreateSealKey());
  ASSIGN_OR_RETURN(current_version_, store_->CurrentVersion());
  if (!current_version_.empty()) {
    ASSIGN_OR_RETURN(auto version, store_->GetVersion(current_version_));
    if (!version.has_value()) {
      return absl::DataLossError(absl::StrCat("meta/current_version names '", current_version_,
                                              "' but versions has no such record"));
    }
    current_shapes_ = version->shapes;
  }
  ASSIGN_OR_RETURN(std::vector<RoundRecord> rounds, store_->ListRounds());
  for (RoundRecord& r : rounds) {
    last_round_id_ = std::max(last_round_id_, r.round_id);
    const uint64_t id = r.round_id;
    if (r.phase == RoundPhase::kTrain || r.phase == RoundPhase::kSecAgg ||
        r.phase == RoundPhase::kAggregate) {
      if (open_round_.has_value()) {
        // Only one round is ever open; an older open one cannot be resumed.
        RoundRecord& older = rounds_[*open_round_];
        older.phase = RoundPhase::kAborted;
        older.abort_reason = "superseded by a newer open round at restart";
        older.finished_unix_ms = clock_->NowUnixMs();
        RETURN_IF_ERROR(store_->Abort(older));
      }
      open_round_ = id;
    }
    rounds_[id] = std::move(r);
  }
  if (config_.dp_clip_norm > 0) {
    // The accountant as last charged (kept with the round that charged it, aborted or not).
    std::string state;
    for (const auto& [id, r] : rounds_) {
      if (!r.dp_accountant_state.empty()) state = r.dp_accountant_state;
    }
    DpBudgetOptions options;
    options.epsilon_budget = config_.dp_epsilon_budget > 0 ? config_.dp_epsilon_budget
                                                           : std::numeric_limits<double>::max();
    options.delta = config_.dp_delta;
    ASSIGN_OR_RETURN(DpBudget budget, DpBudget::Create(options, state));
    dp_budget_.emplace(std::move(budget));
  }
  if (open_round_.has_value() && rounds_[*open_round_].async() != config_.async_mode()) {
    RoundRecord& r = rounds_[*open_round_];
    r.phase = RoundPhase::kAborted;
    r.abort_reason = absl::StrCat("the coordinator restarted in mode ", config_.mode,
                                  "; the open round was ", r.mode);
    r.finished_unix_ms = clock_->NowUnixMs();
    RETURN_IF_ERROR(store_->Abort(r));
    Log(LogLevel::kWarn, "round aborted",
        {{"round", std::to_string(r.round_id)}, {"reason", r.abort_reason}});
    open_round_.reset();
  }
  RebuildAsyncTasks();
  if (open_round_.has_value() && rounds_[*open_round_].secure_aggregation &&
      rounds_[*open_round_].phase != RoundPhase::kTrain) {
    // The protocol's keys and the masked sum were in memory only.
    AbortOpenRound(
        "the coordinator restarted during secure aggregation (keys and masked sum were in "
        "memory only); the next round retries");
  }
  if (open_round_.has_value()) {
    const RoundRecord& r = rounds_[*open_round_];
    ASSIGN_OR_RETURN(size_t stored, store_->CountUpdates(r.round_id));
    Log(LogLevel::kInfo, "resuming open round",
        {{"round", std::to_string(r.round_id)},
         {"phase", RoundPhaseName(r.phase)},
         {"updates", std::to_string(stored)},
         {"participants", std::to_string(r.participants.size())}});
  }
  // Every family appears on /metrics from the start, at 0 (docs/operations.md).
  metrics_.AddCounter(kMetricAccepted, kHelpAccepted, 0);
  metrics_.AddCounter(kMetricPublished, kHelpPublished, 0);
  metrics_.AddCounter(kMetricAborted, kHelpAborted, 0);
  metrics_.AddCounter(kMetricBytesIn, kHelpBytesIn, 0);
  metrics_.AddCounter(kMetricBytesOut, kHelpBytesOut, 0);
  metrics_.SetGauge(kMetricAgents, kHelpAgents, 0);
  metrics_.SetGauge(kMetricRound, kHelpRound,
                    static_cast<double>(open_round_.value_or(last_round_id_)));
  if (config_.async_mode()) UpdateAsyncGauges();
  guard_.emplace(io_.get_executor());
  workers_ = std::make_unique<boost::asio::thread_pool>(config_.worker_threads);
  started_ = true;
  thread_ = std::thread([this]() { io_.run(); });
  Post([this]() {
    if (open_round_.has_value() && rounds_[*open_round_].phase == RoundPhase::kAggregate) {
      StartAggregate();
    } else if (open_round_.has_value() && rounds_[*open_round_].async() &&
               rounds_[*open_round_].updates.size() >= config_.async_buffer_size) {
      StartAggregate();  // the buffer filled just before the restart
    }
    if (config_.async_mode()) MaybeOpenRound();  // the buffer opens without waiting for agents
    MaybeFinish();
  });
  Post([this]() { ScheduleTick(); });
  return absl::OkStatus();
}

void RoundManager::Stop() {
  if (!started_ || stopping_.exchange(true)) return;
  Post([this]() {
    timer_.cancel();
    for (auto& [id, agent] : online_) {
      agent.link->Close(absl::UnavailableError("the coordinator is shutting down"));
    }
    for (uint64_t id : dirty_rounds_) {
      absl::Status s = store_->PutRound(rounds_[id]);
      if (!s.ok()) Log(LogLevel::kWarn, "cannot persist round figures", {{"error", s.ToString()}});
    }
    dirty_rounds_.clear();
    std::vector<PendingCommit> pending = std::move(async_pending_);
    async_pending_.clear();
    for (PendingCommit& p : pending) {
      p.done(absl::UnavailableError("the coordinator is shutting down"));
    }
    std::lock_guard<std::mutex> lock(rejection_mu_);
    for (const auto& [code, n] : rejections_by_code_) {
      Log(LogLevel::kInfo, "updates rejected", {{"code", code}, {"count", std::to_string(n)}});
    }
  });
}

void RoundManager::Join() {
  if (!started_ || joined_.exchange(true)) return;
  if (workers_) workers_->join();
  guard_.reset();
  if (thread_.joinable()) thread_.join();
}

void RoundManager::SetFinishedCallback(std::function<void()> callback) {
  finished_callback_ = std::move(callback);
}

void RoundManager::Sync() {
  std::promise<void> done;
  auto future = done.get_future();
  boost::asio::post(io_, [&done]() { done.set_value(); });
  future.wait();
}

void RoundManager::Tick() {
  Post([this]() { TickLocked(); });
  Sync();
}

void RoundManager::ScheduleTick() {
  if (stopping_) return;
  timer_.expires_after(std::chrono::milliseconds(config_.tick_ms));
  timer_.async_wait([this](const boost::system::error_code& ec) {
    if (ec || stopping_) return;
    try {
      TickLocked();
    } catch (const std::exception& e) {
      Log(LogLevel::kError, "unexpected exception in a round tick", {{"what", e.what()}});
    }
    ScheduleTick();
  });
}

void RoundManager::TickLocked() {
  if (stopping_) return;
  const uint64_t now = clock_->NowUnixMs();
  for (uint64_t id : dirty_rounds_) {
    absl::Status s = store_->PutRound(rounds_[id]);
    if (!s.ok()) Log(LogLevel::kWarn, "cannot persist round figures", {{"error", s.ToString()}});
  }
  dirty_rounds_.clear();
  if (open_round_.has_value() && rounds_[*open_round_].async()) {
    AsyncTick(now);
  } else if (open_round_.has_value()) {
    const RoundRecord& r = rounds_[*open_round_];
    if (r.phase == RoundPhase::kTrain) {
      if (r.updates.size() >= r.participants.size()) {
        EndTrainPhase();
      } else if (now >= r.deadline_unix_ms) {
        if (r.updates.size() >= config_.min_participants) {
          Log(LogLevel::kInfo, "round deadline passed; aggregating the updates received",
              {{"round", std::to_string(r.round_id)},
               {"updates", std::to_string(r.updates.size())},
               {"participants", std::to_string(r.participants.size())}});
          EndTrainPhase();
        } else {
          AbortOpenRound(absl::StrCat("deadline passed with ", r.updates.size(),
                                      " updates; min_participants is ", config_.min_participants));
        }
      }
    } else if (r.phase == RoundPhase::kSecAgg && secagg_ != nullptr &&
               secagg_->step() != SecAggRound::Step::kFinal && now >= secagg_deadline_ms_) {
      Log(LogLevel::kInfo, "secure-aggregation phase deadline passed; closing it",
          {{"round", std::to_string(r.round_id)}});
      AdvanceSecAgg();
    }
  }
  for (auto& [id, r] : rounds_) {
    if (r.phase == RoundPhase::kDone && !r.eval_complete &&
        now >= r.finished_unix_ms + config_.eval_grace_s * 1000) {
      CompleteEval(r);
    }
  }
  MaybeOpenRound();
}

void RoundManager::MaybeOpenRound() {
  if (stopping_ || open_round_.has_value() || finished_) return;
  if (config_.rounds > 0) {
    uint64_t published = 0;
    for (const auto& [id, r] : rounds_) published += r.phase == RoundPhase::kDone;
    if (published >= config_.rounds) {
      if (!async_pending_.empty()) RunPendingAsyncCommits();  // refused: no buffer will open
      return;
    }
  }
  if (config_.async_mode()) {
    OpenAsyncRound();
    return;
  }
  const uint64_t now = clock_->NowUnixMs();
  std::vector<std::string> online;
  for (const auto& [id, agent] : online_) online.push_back(id);
  if (online.size() < config_.min_participants) {
    select_wait_since_ms_ = 0;
    return;
  }
  if (config_.select_wait_ms > 0 && online.size() < config_.max_participants) {
    if (select_wait_since_ms_ == 0) select_wait_since_ms_ = now;
    if (now < select_wait_since_ms_ + config_.select_wait_ms) return;
  }
  if (config_.secure_aggregation == "on" && online.size() < 3) return;  // wait for 3
  select_wait_since_ms_ = 0;
  if (online.size() > config_.max_participants) {
    std::mt19937_64 rng(std::random_device{}());
    std::shuffle(online.begin(), online.end(), rng);
    online.resize(config_.max_participants);
    std::sort(online.begin(), online.end());
  }
  RoundRecord r;
  r.round_id = last_round_id_ + 1;
  r.phase = RoundPhase::kTrain;
  r.participants = online;
  r.base_version = current_version_;
  r.created_unix_ms = now;
  r.deadline_unix_ms = now + config_.round_deadline_s * 1000;
  r.local_steps = config_.local_steps;
  r.learning_rate = config_.learning_rate;
  r.batch_size = config_.batch_size;
  r.lora_rank = config_.lora_rank;
  r.lora_alpha = config_.lora_alpha;
  r.lora_target_modules = config_.lora_target_modules;
  r.lora_init_seed = config_.lora_init_seed;
  r.max_update_bytes = config_.max_update_bytes;
  r.strategy = StrategyName(config_.aggregation.strategy);
  r.prox_mu = config_.aggregation.strategy == Strategy::kFedProx ? config_.aggregation.prox_mu : 0;
  r.freeze_lora_a = config_.aggregation.strategy == Strategy::kFfaLora;
  r.shapes = current_version_.empty() ? ShapeMap{} : current_shapes_;
  r.secure_aggregation = config_.SecureAggregationFor(r.participants.size());
  if (r.secure_aggregation && config_.dp_clip_norm > 0) {
    r.dp_clip_norm = config_.dp_clip_norm;
    r.dp_noise_multiplier = config_.dp_noise_multiplier;
    if (absl::Status s = CheckDpBudget(r); !s.ok()) {
      if (dp_refusal_logged_ != s.ToString()) {
        dp_refusal_logged_ = s.ToString();
        Log(LogLevel::kWarn, "not starting a round: the differential-privacy budget",
            {{"round", std::to_string(r.round_id)}, {"error", s.ToString()}});
      }
      return;
    }
  }
  absl::Status s = store_->StartRound(r);  // audited
  if (!s.ok()) {
    Log(LogLevel::kError, "cannot open a round: the store write failed",
        {{"round", std::to_string(r.round_id)}, {"error", s.ToString()}});
    return;
  }
  last_round_id_ = r.round_id;
  open_round_ = r.round_id;
  rounds_[r.round_id] = r;
  NoteRoundOpened(r.round_id);
  Log(LogLevel::kInfo, "round opened",
      {{"round", std::to_string(r.round_id)},
       {"participants", std::to_string(r.participants.size())},
       {"base_version", r.base_version.empty() ? "(fresh)" : r.base_version}});
  for (const std::string& agent : r.participants) SendTask(r, agent);
}

void RoundManager::SendTask(const RoundRecord& r, const std::string& agent_id) {
  auto it = online_.find(agent_id);
  if (it == online_.end()) return;
  v1::CoordinatorMessage msg;
  v1::RoundTask* task = msg.mutable_round_task();
  task->set_round_id(r.round_id);
  task->set_base_version(r.base_version);
  task->mutable_lora()->set_rank(r.lora_rank);
  task->mutable_lora()->set_alpha(static_cast<float>(r.lora_alpha));
  for (const std::string& m : r.lora_target_modules) task->mutable_lora()->add_target_modules(m);
  task->mutable_lora()->set_init_seed(r.lora_init_seed);
  task->set_local_steps(r.local_steps);
  task->set_learning_rate(static_cast<float>(r.learning_rate));
  task->set_batch_size(r.batch_size);
  task->set_deadline_unix_ms(r.deadline_unix_ms);
  task->set_max_update_bytes(r.max_update_bytes);
  task->set_seal_public_key(seal_key_.public_key);
  task->set_aggregation(r.strategy);
  task->set_prox_mu(static_cast<float>(r.prox_mu));
  task->set_freeze_lora_a(r.freeze_lora_a);
  if (r.secure_aggregation) {
    task->mutable_secagg()->set_enabled(true);
    task->mutable_secagg()->set_dp_clip_norm(r.dp_clip_norm);
    task->mutable_secagg()->set_dp_noise_multiplier(r.dp_noise_multiplier);
  }
  it->second.link->Send(msg);
}

// ------------------------------------------------------------------ Session

void RoundManager::OnHello(std::shared_ptr<AgentLink> link, v1::Hello hello) {
  Post([this, link = std::move(link), hello = std::move(hello)]() {
    if (stopping_) {
      link->Close(absl::UnavailableError("the coordinator is shutting down"));
      return;
    }
    const std::string& cn = link->peer_cn();
    if (revoked_.count(cn) > 0) {  // a Session that began before the revocation
      link->Close(absl::UnauthenticatedError(absl::StrCat("certificate revoked: agent '", cn, "'")));
      return;
    }
    if (hello.agent_id() != cn) {
      link->Close(absl::PermissionDeniedError(
          absl::StrCat("Hello.agent_id '", hello.agent_id(),
                       "' differs from the client certificate CN '", cn, "'")));
      return;
    }
    if (hello.base_model_hash() != base_model_hash_) {
      link->Close(absl::FailedPreconditionError(absl::StrCat(
          "Hello.base_model_hash '", hello.base_model_hash(),
          "' differs from the coordinator's base model hash '", base_model_hash_, "'")));
      return;
    }
    const uint64_t now = clock_->NowUnixMs();
    AgentRecord record;
    auto existing = store_->GetAgent(cn);
    if (existing.ok() && existing->has_value()) record = **existing;
    record.agent_id = cn;
    record.base_model_hash = hello.base_model_hash();
    record.agent_version = hello.agent_version();
    record.current_version = hello.current_version();
    record.num_train_examples = hello.num_train_examples();
    if (record.first_seen_unix_ms == 0) record.first_seen_unix_ms = now;
    record.last_seen_unix_ms = now;
    if (absl::Status s = store_->PutAgent(record, /*sync=*/true); !s.ok()) {
      Log(LogLevel::kError, "cannot record an agent", {{"agent", cn}, {"error", s.ToString()}});
      link->Close(absl::UnavailableError("the coordinator cannot record the agent; retry later"));
      return;
    }
    auto it = online_.find(cn);
    if (it != online_.end() && it->second.link != link) {
      it->second.link->Close(absl::AbortedError("superseded by a newer session of this agent"));
    }
    online_[cn] = OnlineAgent{link, hello, now};
    metrics_.SetGauge(kMetricAgents, kHelpAgents, static_cast<double>(online_.size()));
    v1::CoordinatorMessage msg;
    v1::Welcome* welcome = msg.mutable_welcome();
    welcome->set_coordinator_id(config_.coordinator_id);
    welcome->set_seal_public_key(seal_key_.public_key);
    welcome->set_current_version(current_version_);
    welcome->set_heartbeat_interval_ms(config_.heartbeat_interval_ms);
    link->Send(msg);
    Log(LogLevel::kInfo, "agent online",
        {{"agent", cn},
         {"examples", std::to_string(hello.num_train_examples())},
         {"version", hello.current_version()}});
    if (config_.async_mode()) {
      auto busy = async_busy_.find(cn);
      if (busy != async_busy_.end()) SendAsyncTask(busy->second);  // its task, again
      MaybeOpenRound();
      DispatchAsyncTasks();
      return;
    }
    if (open_round_.has_value()) {
      const RoundRecord& r = rounds_[*open_round_];
      if (r.phase == RoundPhase::kTrain && r.IsParticipant(cn) && !r.updates.count(cn) &&
          now < r.deadline_unix_ms) {
        SendTask(r, cn);  // a participant that reconnected
      }
    }
    MaybeOpenRound();
  });
}

void RoundManager::OnHeartbeat(std::shared_ptr<AgentLink> link, v1::Heartbeat) {
  Post([this, link = std::move(link)]() {
    auto it = online_.find(link->peer_cn());
    if (it != online_.end() && it->second.link == link) {
      it->second.last_seen_unix_ms = clock_->NowUnixMs();
    }
  });
}

void RoundManager::OnEvalReport(std::shared_ptr<AgentLink> link, v1::EvalReport report) {
  Post([this, link = std::move(link), report = std::move(report)]() {
    const std::string& cn = link->peer_cn();
    auto it = online_.find(cn);
    if (it == online_.end() || it->second.link != link) return;
    it->second.last_seen_unix_ms = clock_->NowUnixMs();
    if (!report.version_id().empty()) it->second.hello.set_current_version(report.version_id());
    RoundRecord* round = FindRoundByVersion(report.version_id());
    if (round == nullptr || round->eval_complete || !round->IsParticipant(cn)) return;
    if (!std::isfinite(report.eval_loss())) {
      Log(LogLevel::kWarn, "ignoring a non-finite eval report",
          {{"agent", cn}, {"version", report.version_id()}});
      return;
    }
    round->eval_after[cn] = report.eval_loss();
    if (absl::Status s = store_->PutRound(*round); !s.ok()) {
      Log(LogLevel::kWarn, "cannot persist an eval report", {{"error", s.ToString()}});
    }
    if (round->eval_after.size() >= round->participants.size()) CompleteEval(*round);
  });
}

void RoundManager::OnDisconnect(std::shared_ptr<AgentLink> link) {
  Post([this, link = std::move(link)]() {
    const std::string& cn = link->peer_cn();
    auto it = online_.find(cn);
    if (it == online_.end() || it->second.link != link) return;
    const uint64_t last_seen = it->second.last_seen_unix_ms;
    online_.erase(it);
    metrics_.SetGauge(kMetricAgents, kHelpAgents, static_cast<double>(online_.size()));
    Log(LogLevel::kInfo, "agent offline", {{"agent", cn}});
    if (secagg_ != nullptr && secagg_->step() != SecAggRound::Step::kFinal) {
      // Messages sent while it is away are lost: it has dropped out of the protocol.
      secagg_->Drop(cn);
      if (secagg_->PhaseComplete()) AdvanceSecAgg();
    }
    auto record = store_->GetAgent(cn);
    if (record.ok() && record->has_value()) {
      AgentRecord a = **record;
      a.last_seen_unix_ms = std::max(a.last_seen_unix_ms, last_seen);
      (void)store_->PutAgent(a, /*sync=*/false);
    }
  });
}

// ------------------------------------------------------------------ Revocation

void RoundManager::OnAgentRevoked(std::string agent_id, std::function<void(bool, bool)> done) {
  Post([this, agent_id = std::move(agent_id), done = std::move(done)]() {
    bool session_closed = false;
    bool update_discarded = false;
    auto it = online_.find(agent_id);
    if (it != online_.end()) {
      it->second.link->Close(absl::PermissionDeniedError(
          absl::StrCat("certificate revoked: agent '", agent_id, "' was revoked by an admin")));
      online_.erase(it);
      metrics_.SetGauge(kMetricAgents, kHelpAgents, static_cast<double>(online_.size()));
      session_closed = true;
    }
    revoked_.insert(agent_id);
    // The agent stays a participant that will never report (as if it had dropped):
    // the round aggregates at the deadline only if min_participants others reported,
    // never on fewer updates than the selection promised.
    if (config_.async_mode()) {
      update_discarded = DropAsyncUpdatesOf(agent_id);
    } else if (open_round_.has_value() && rounds_[*open_round_].phase == RoundPhase::kTrain &&
               rounds_[*open_round_].updates.count(agent_id) > 0) {
      RoundRecord next = rounds_[*open_round_];
      next.updates.erase(agent_id);
      absl::Status s = store_->DiscardUpdate(next, agent_id);
      if (!s.ok()) {
        Log(LogLevel::kError, "cannot discard the update of a revoked agent",
            {{"agent", agent_id}, {"error", s.ToString()}});
      } else {
        rounds_[*open_round_] = std::move(next);
        update_discarded = true;
      }
    }
    if (secagg_ != nullptr && secagg_->step() != SecAggRound::Step::kFinal) {
      const std::vector<std::string> in_sum = secagg_->masked_senders();
      if (std::find(in_sum.begin(), in_sum.end(), agent_id) != in_sum.end()) {
        // Its masked input cannot be taken out of the running sum.
        AbortOpenRound(absl::StrCat("agent '", agent_id,
                                    "' was revoked after its masked input entered the sum"));
        update_discarded = true;
      } else {
        secagg_->Drop(agent_id);  // as if it had dropped out of the protocol
        if (secagg_->PhaseComplete()) AdvanceSecAgg();
      }
    }
    Log(LogLevel::kInfo, "agent revoked",
        {{"agent", agent_id},
         {"session_closed", session_closed ? "true" : "false"},
         {"update_discarded", update_discarded ? "true" : "false"}});
    done(session_closed, update_discarded);
  });
}

// ------------------------------------------------------------------ Updates

void RoundManager::CountRejection(const absl::Status& status) {
  rejections_.fetch_add(1);
  std::lock_guard<std::mutex> lock(rejection_mu_);
  ++rejections_by_code_[absl::StatusCodeToString(status.code())];
  metrics_.AddCounter(kMetricRejected, kHelpRejected, 1,
                      {{"reason", absl::StatusCodeToString(status.code())}});
  Log(LogLevel::kWarn, "update rejected", {{"status", status.ToString()}});
}

absl::Status RoundManager::PrecheckLocked(const std::string& peer_cn,
                                          const v1::UpdateHeader& header) const {
  if (revoked_.count(peer_cn) > 0) {  // an upload that began before the revocation
    return absl::UnauthenticatedError(
        absl::StrCat("certificate revoked: agent '", peer_cn, "' was revoked by an admin"));
  }
  if (header.agent_id() != peer_cn) {
    return absl::PermissionDeniedError(absl::StrCat("UpdateHeader.agent_id '", header.agent_id(),
                                                    "' differs from the client certificate CN '",
                                                    peer_cn, "'"));
  }
  if (config_.async_mode()) return PrecheckAsyncLocked(peer_cn, header);
  if (header.masked()) {
    if (!open_round_.has_value() || *open_round_ != header.round_id() || secagg_ == nullptr ||
        secagg_->round_id() != header.round_id()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "round ", header.round_id(), " is not collecting masked inputs (open round: ",
          open_round_.has_value() ? std::to_string(*open_round_) : std::string("none"), ")"));
    }
    RETURN_IF_ERROR(secagg_->CheckMaskedInputFrom(peer_cn));
    const RoundRecord& r = rounds_.at(*open_round_);
    if (header.base_model_hash() != base_model_hash_ || header.base_version() != r.base_version) {
      return absl::FailedPreconditionError(absl::StrCat(
          "masked input of agent '", peer_cn, "': base model hash / version '",
          header.base_version(), "' differ from the round's '", r.base_version, "'"));
    }
    if (header.total_size() != secagg_->masked_input_bytes()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "masked input of agent '", peer_cn, "': UpdateHeader.total_size ", header.total_size(),
          ", expected ", secagg_->masked_input_bytes(), " bytes for this round's layout"));
    }
    if (!IsHex64(header.payload_sha256())) {
      return absl::InvalidArgumentError(
          "UpdateHeader.payload_sha256: expected 64 lowercase hex characters");
    }
    return absl::OkStatus();
  }
  if (open_round_.has_value() && *open_round_ == header.round_id() &&
      rounds_.at(*open_round_).secure_aggregation) {
    return absl::FailedPreconditionError(absl::StrCat(
        "round ", header.round_id(),
        " uses secure aggregation: send SecAggReady after training and a masked input, not "
        "a sealed update"));
  }
  if (!open_round_.has_value() || *open_round_ != header.round_id() ||
      rounds_.at(*open_round_).phase != RoundPhase::kTrain) {
    return absl::FailedPreconditionError(
        absl::StrCat("round ", header.round_id(), " is not open for updates (open round: ",
                     open_round_.has_value() && rounds_.at(*open_round_).phase == RoundPhase::kTrain
                         ? std::to_string(*open_round_)
                         : std::string("none"),
                     ")"));
  }
  const RoundRecord& r = rounds_.at(*open_round_);
  if (clock_->NowUnixMs() >= r.deadline_unix_ms) {
    return absl::FailedPreconditionError(
        absl::StrCat("round ", r.round_id, " deadline (", r.deadline_unix_ms, ") has passed"));
  }
  if (!r.IsParticipant(peer_cn)) {
    return absl::PermissionDeniedError(
        absl::StrCat("agent '", peer_cn, "' is not a participant of round ", r.round_id));
  }
  if (r.updates.count(peer_cn)) {
    return absl::AlreadyExistsError(
        absl::StrCat("agent '", peer_cn, "' already submitted an update for round ", r.round_id));
  }
  if (header.base_model_hash() != base_model_hash_) {
    return absl::FailedPreconditionError(absl::StrCat("UpdateHeader.base_model_hash '",
                                                      header.base_model_hash(), "', expected '",
                                                      base_model_hash_, "'"));
  }
  if (header.base_version() != r.base_version) {
    return absl::FailedPreconditionError(absl::StrCat("UpdateHeader.base_version '",
                                                      header.base_version(), "', expected '",
                                                      r.base_version, "' for round ", r.round_id));
  }
  return CheckHeaderFields(header, r.max_update_bytes);
}

absl::Status RoundManager::CheckHeaderFields(const v1::UpdateHeader& header,
                                             uint64_t max_update_bytes) {
  if (header.total_size() > max_update_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("UpdateHeader.total_size ", header.total_size(), " exceeds max_update_bytes ",
                     max_update_bytes));
  }
  if (header.total_size() == 0) {
    return absl::InvalidArgumentError("UpdateHeader.total_size is 0; expected a sealed payload");
  }
  if (header.num_examples() == 0) {
    return absl::InvalidArgumentError(
        "UpdateHeader.num_examples is 0; expected the FedAvg weight > 0");
  }
  if (!IsHex64(header.payload_sha256())) {
    return absl::InvalidArgumentError(
        absl::StrCat("UpdateHeader.payload_sha256: expected 64 lowercase hex characters, found '",
                     header.payload_sha256().substr(0, 80), "'"));
  }
  const auto& m = header.metrics();
  if (!std::isfinite(m.train_loss()) || !std::isfinite(m.eval_loss_before()) ||
      !std::isfinite(m.train_seconds())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "UpdateHeader.metrics must be finite; found train_loss=", m.train_loss(),
        " eval_loss_before=", m.eval_loss_before(), " train_seconds=", m.train_seconds()));
  }
  return absl::OkStatus();
}

void RoundManager::CheckUpdateHeader(std::string peer_cn, v1::UpdateHeader header,
                                     StatusCallback done) {
  Post([this, peer_cn = std::move(peer_cn), header = std::move(header), done = std::move(done)]() {
    if (stopping_) {
      done(absl::UnavailableError("the coordinator is shutting down"));
      return;
    }
    absl::Status s = PrecheckLocked(peer_cn, header);
    if (!s.ok() && config_.async_mode()) OnAsyncRefusal(peer_cn, header.round_id(), s);
    done(s);
  });
}

void RoundManager::SubmitUpdate(IncomingUpdate update, StatusCallback done) {
  if (!workers_) {
    done(absl::UnavailableError("the round manager is not running"));
    return;
  }
  metrics_.AddCounter(kMetricBytesIn, kHelpBytesIn, static_cast<double>(update.payload.size()));
  auto shared = std::make_shared<IncomingUpdate>(std::move(update));
  boost::asio::post(*workers_, [this, shared, done = std::move(done)]() {
    auto verify = [&]() -> absl::StatusOr<common::TensorMap> {
      const v1::UpdateHeader& h = shared->header;
      const std::string where =
          absl::StrCat("update of agent '", h.agent_id(), "' for round ", h.round_id());
      if (shared->payload.size() != h.total_size()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": received ", shared->payload.size(),
                                                       " bytes, header total_size is ",
                                                       h.total_size()));
      }
      const std::string sha = common::Sha256Hex(shared->payload);
      if (sha != h.payload_sha256()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": payload SHA-256 is ", sha,
                                                       ", header payload_sha256 is ",
                                                       h.payload_sha256()));
      }
      if (h.masked()) return common::TensorMap{};  // folded on the manager thread
      const std::string aad =
          UpdateAad(h.round_id(), h.agent_id(), h.base_model_hash(), h.base_version());
      auto plain = common::OpenSealed(seal_key_, shared->payload, aad);
      if (!plain.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": the sealed payload does not open with the round's key and AAD: ",
                         plain.status().message()));
      }
      auto file = common::SafetensorsFile::FromBytes(std::move(*plain), where);
      if (!file.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": not a valid safetensors payload: ", file.status().message()));
      }
      auto map = (*file)->ToTensorMap();
      if (!map.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": ", map.status().message()));
      }
      if (absl::Status s = CheckFinite(*map); !s.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": ", s.message()));
      }
      return map;
    };
    absl::StatusOr<common::TensorMap> tensors;
    try {
      tensors = verify();
    } catch (const std::exception& e) {  // a parser that throws must not kill the pool
      tensors = absl::InvalidArgumentError(
          absl::StrCat("update payload could not be processed: ", e.what()));
    }
    if (!tensors.ok()) {
      if (config_.async_mode()) {
        Post([this, agent = shared->peer_cn, task = shared->header.round_id(),
              status = tensors.status()]() { OnAsyncRefusal(agent, task, status); });
      }
      done(tensors.status());
      return;
    }
    if (shared->header.masked()) {
      Post([this, shared, done]() { done(CommitMaskedInput(std::move(*shared))); });
      return;
    }
    auto tensor_ptr = std::make_shared<common::TensorMap>(std::move(*tensors));
    Post([this, shared, tensor_ptr, done]() {
      CommitUpdate(std::move(*shared), std::move(*tensor_ptr), done);
    });
  });
}

void RoundManager::CommitUpdate(IncomingUpdate update, common::TensorMap tensors,
                                StatusCallback done) {
  if (config_.async_mode()) {
    CommitAsyncUpdate(std::move(update), std::move(tensors), std::move(done));
    return;
  }
  if (stopping_) {
    done(absl::UnavailableError("the coordinator is shutting down"));
    return;
  }
  if (absl::Status s = PrecheckLocked(update.peer_cn, update.header); !s.ok()) {
    done(s);
    return;
  }
  RoundRecord& round = rounds_[*open_round_];
  const std::string& agent = update.peer_cn;
  const std::string where =
      absl::StrCat("update of agent '", agent, "' for round ", round.round_id);
  absl::Status valid = round.shapes.empty()
                           ? CheckLoraStructure(tensors, round.lora_rank, round.lora_target_modules)
                           : CheckShapes(tensors, round.shapes);
  if (!valid.ok()) {
    done(absl::InvalidArgumentError(absl::StrCat(where, ": ", valid.message())));
    return;
  }
  const v1::UpdateHeader& h = update.header;
  UpdateRecord record;
  record.round_id = round.round_id;
  record.agent_id = agent;
  record.base_version = h.base_version();
  record.summary.num_examples = h.num_examples();
  record.summary.train_loss = h.metrics().train_loss();
  record.summary.eval_loss_before = h.metrics().eval_loss_before();
  record.summary.train_tokens = h.metrics().train_tokens();
  record.summary.train_seconds = h.metrics().train_seconds();
  record.summary.bytes = update.payload.size();
  record.payload_sha256 = h.payload_sha256();
  record.received_unix_ms = clock_->NowUnixMs();
  record.sealed = std::move(update.payload);
  RoundRecord next = round;
  next.updates[agent] = record.summary;
  if (next.shapes.empty()) next.shapes = ShapesOf(tensors);
  if (absl::Status s = store_->AcceptUpdate(record, next); !s.ok()) {
    Log(LogLevel::kError, "cannot store an update", {{"agent", agent}, {"error", s.ToString()}});
    done(absl::UnavailableError(
        absl::StrCat("the coordinator could not store the update: ", s.message())));
    return;
  }
  round = std::move(next);
  NoteUpdateAccepted();
  Log(LogLevel::kInfo, "update accepted",
      {{"round", std::to_string(round.round_id)},
       {"agent", agent},
       {"bytes", std::to_string(record.summary.bytes)},
       {"updates", absl::StrCat(round.updates.size(), "/", round.participants.size())}});
  done(absl::OkStatus());
  if (round.updates.size() >= round.participants.size()) StartAggregate();
}

// ------------------------------------------------------------------ Secure aggregation

void RoundManager::OnSecAggReady(std::shared_ptr<AgentLink> link, v1::SecAggReady ready) {
  Post([this, link = std::move(link), ready = std::move(ready)]() {
    const std::string& cn = link->peer_cn();
    auto online = online_.find(cn);
    if (online == online_.end() || online->second.link != link || stopping_) return;
    online->second.last_seen_unix_ms = clock_->NowUnixMs();
    auto refuse = [&](absl::Status status) {
      CountRejection(absl::Status(status.code(), absl::StrCat("SecAggReady of agent '", cn,
                                                              "': ", status.message())));
    };
    if (!open_round_.has_value() || *open_round_ != ready.round_id()) {
      return refuse(absl::FailedPreconditionError(
          absl::StrCat("round ", ready.round_id(), " is not the open round")));
    }
    RoundRecord& round = rounds_[*open_round_];
    if (!round.secure_aggregation || round.phase != RoundPhase::kTrain) {
      return refuse(absl::FailedPreconditionError(absl::StrCat(
          "round ", round.round_id, " is not a secure-aggregation round in TRAIN")));
    }
    if (!round.IsParticipant(cn)) {
      return refuse(absl::PermissionDeniedError(
          absl::StrCat("not a participant of round ", round.round_id)));
    }
    if (round.updates.count(cn)) {
      return refuse(absl::AlreadyExistsError("already reported for this round"));
    }
    if (clock_->NowUnixMs() >= round.deadline_unix_ms) {
      return refuse(absl::FailedPreconditionError(
          absl::StrCat("round ", round.round_id, " deadline has passed")));
    }
    const v1::TrainMetrics& m = ready.metrics();
    if (ready.num_examples() == 0 || !std::isfinite(m.train_loss()) ||
        !std::isfinite(m.eval_loss_before()) || !std::isfinite(m.train_seconds())) {
      return refuse(absl::InvalidArgumentError(
          "num_examples must be > 0 and the metrics finite"));
    }
    ShapeMap layout = LayoutFromProto(ready.layout());
    if (!round.shapes.empty()) {
      if (layout != round.shapes) {
        return refuse(absl::InvalidArgumentError(
            "the adapter layout differs from the round's (names or shapes)"));
      }
    } else {
      absl::StatusOr<uint64_t> size = LayoutSize(layout);
      if (!size.ok()) return refuse(size.status());
      common::TensorMap probe;  // shapes only: the structure check reads no values
      for (const auto& [name, dims] : layout) probe[name].shape = dims;
      if (absl::Status s = CheckLoraStructure(probe, round.lora_rank, round.lora_target_modules);
          !s.ok()) {
        return refuse(s);
      }
    }
    RoundRecord next = round;
    UpdateSummary& summary = next.updates[cn];
    summary.num_examples = ready.num_examples();
    summary.train_loss = m.train_loss();
    summary.eval_loss_before = m.eval_loss_before();
    summary.train_tokens = m.train_tokens();
    summary.train_seconds = m.train_seconds();
    if (next.shapes.empty()) next.shapes = layout;
    if (absl::Status s = store_->PutRound(next); !s.ok()) {
      Log(LogLevel::kError, "cannot record a SecAggReady", {{"agent", cn}, {"error", s.ToString()}});
      return;
    }
    round = std::move(next);
    Log(LogLevel::kInfo, "agent trained (secure aggregation)",
        {{"round", std::to_string(round.round_id)},
         {"agent", cn},
         {"ready", absl::StrCat(round.updates.size(), "/", round.participants.size())}});
    if (round.updates.size() >= round.participants.size()) EndTrainPhase();
  });
}

void RoundManager::OnSecAggMessage(std::shared_ptr<AgentLink> link, v1::SecAggMessage message) {
  Post([this, link = std::move(link), message = std::move(message)]() {
    const std::string& cn = link->peer_cn();
    auto online = online_.find(cn);
    if (online == online_.end() || online->second.link != link || stopping_) return;
    online->second.last_seen_unix_ms = clock_->NowUnixMs();
    absl::Status s;
    if (secagg_ == nullptr || secagg_->round_id() != message.round_id()) {
      s = absl::FailedPreconditionError(
          absl::StrCat("no secure aggregation is running for round ", message.round_id()));
    } else {
      s = secagg_->Handle(cn, message.data());
    }
    if (!s.ok()) {
      CountRejection(absl::Status(
          s.code(), absl::StrCat("secure-aggregation message of agent '", cn, "': ", s.message())));
      return;
    }
    if (secagg_->PhaseComplete()) AdvanceSecAgg();
  });
}

absl::Status RoundManager::CheckDpBudget(const RoundRecord& round) const {
  if (!dp_budget_.has_value() || config_.dp_epsilon_budget <= 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(std::vector<AgentRecord> agents, store_->ListAgents());
  const uint64_t n = round.participants.size();
  ASSIGN_OR_RETURN(double q, SamplingRate(n, std::max<uint64_t>(n, agents.size())));
  return dp_budget_->CheckRound(q, round.dp_noise_multiplier, 1);
}

void RoundManager::EndTrainPhase() {
  if (!open_round_.has_value()) return;
  if (rounds_[*open_round_].secure_aggregation) {
    StartSecAgg();
  } else {
    StartAggregate();
  }
}

void RoundManager::StartSecAgg() {
  if (stopping_ || !open_round_.has_value()) return;
  RoundRecord& round = rounds_[*open_round_];
  if (round.phase != RoundPhase::kTrain) return;
  std::vector<std::string> cohort;
  for (const auto& [agent, summary] : round.updates) {
    if (online_.count(agent)) cohort.push_back(agent);
  }
  const size_t needed = std::max<size_t>(config_.min_participants, 2);
  if (cohort.size() < needed) {
    AbortOpenRound(absl::StrCat("secure aggregation: ", cohort.size(),
                                " trained agents are online; the round needs ", needed));
    return;
  }
  SecAggRoundOptions options;
  options.neighbours = config_.secagg_neighbours;
  options.threshold = config_.secagg_threshold;
  options.clip_range = config_.secagg_clip_range;
  options.min_contributors = std::max<uint32_t>(config_.min_participants, 1);
  options.unmask_threads = static_cast<int>(config_.worker_threads);
  auto created = SecAggRound::Create(round.round_id, cohort, round.shapes, options);
  if (!created.ok()) {
    AbortOpenRound(absl::StrCat("secure aggregation setup failed: ", created.status().message()));
    return;
  }
  if (!LeaveTrainPhase(round, RoundPhase::kSecAgg)) return;  // retried at the next tick
  const uint64_t now = clock_->NowUnixMs();
  secagg_ = std::shared_ptr<SecAggRound>(std::move(*created));
  secagg_deadline_ms_ = now + static_cast<uint64_t>(config_.secagg_phase_timeout_s) * 1000;
  Log(LogLevel::kInfo, "secure aggregation started",
      {{"round", std::to_string(round.round_id)},
       {"cohort", std::to_string(cohort.size())},
       {"threshold", std::to_string(secagg_->threshold())},
       {"bytes_per_masked_input", std::to_string(secagg_->masked_input_bytes())}});
  for (const std::string& agent : cohort) online_[agent].link->Send(secagg_->SetupFor(agent));
}

void RoundManager::AdvanceSecAgg() {
  if (stopping_ || secagg_ == nullptr || !open_round_.has_value()) return;
  RoundRecord& round = rounds_[*open_round_];
  const SecAggRound::Step before = secagg_->step();
  if (before == SecAggRound::Step::kFinal) return;
  if (before == SecAggRound::Step::kMasked) {
    RoundRecord next = round;
    next.secagg_contributors = secagg_->masked_senders();
    next.updates.clear();  // keep the metrics of the agents whose input is in the sum
    for (const std::string& a : next.secagg_contributors) next.updates[a] = round.updates[a];
    if (dp_budget_.has_value() && round.dp_clip_norm > 0 &&
        secagg_->masked_senders().size() >= std::max<size_t>(config_.min_participants, 1)) {
      // The noisy sum is about to be revealed: charge the budget first (synced).
      auto agents = store_->ListAgents();
      const uint64_t n = round.participants.size();
      absl::StatusOr<double> q =
          agents.ok() ? SamplingRate(n, std::max<uint64_t>(n, agents->size())) : agents.status();
      absl::StatusOr<double> eps =
          q.ok() ? dp_budget_->Commit(*q, round.dp_noise_multiplier, 1) : q.status();
      if (!eps.ok()) {
        AbortOpenRound(absl::StrCat("differential privacy accounting failed: ",
                                    eps.status().message()));
        return;
      }
      next.dp_epsilon = *eps;
      next.dp_accountant_state = dp_budget_->StateJson();
    }
    if (absl::Status s = store_->PutRound(next); !s.ok()) {
      AbortOpenRound(absl::StrCat("cannot record the masked inputs received: ", s.message()));
      return;
    }
    round = std::move(next);
  }
  auto messages = secagg_->ClosePhase();
  if (!messages.ok()) {
    AbortOpenRound(absl::StrCat("secure aggregation: ", messages.status().message()));
    return;
  }
  const uint64_t now = clock_->NowUnixMs();
  secagg_deadline_ms_ = now + static_cast<uint64_t>(config_.secagg_phase_timeout_s) * 1000;
  for (auto& [agent, message] : *messages) {
    auto it = online_.find(agent);
    if (it != online_.end()) {
      it->second.link->Send(message);
    } else {
      secagg_->Drop(agent);
    }
  }
  if (secagg_->step() != SecAggRound::Step::kFinal) {
    if (secagg_->PhaseComplete()) AdvanceSecAgg();
    return;
  }
  // Unmask on a worker; nothing else touches the protocol state meanwhile.
  RoundRecord next = round;
  next.phase = RoundPhase::kAggregate;
  if (absl::Status s = store_->PutRound(next); !s.ok()) {
    AbortOpenRound(absl::StrCat("cannot start aggregation: ", s.message()));
    return;
  }
  round = std::move(next);
  aggregate_started_unix_ms_ = now;
  Log(LogLevel::kInfo, "unmasking the sum",
      {{"round", std::to_string(round.round_id)},
       {"contributors", std::to_string(round.secagg_contributors.size())}});
  boost::asio::post(*workers_, [this, sa = secagg_, copy = round]() mutable {
    absl::StatusOr<SecAggRound::Result> result;
    try {
      result = sa->Finalize();
    } catch (const std::exception& e) {
      result = absl::InternalError(absl::StrCat("unmasking threw: ", e.what()));
    }
    if (!result.ok()) {
      Post([this, id = copy.round_id, status = result.status()]() {
        FinishAggregation(id, status);
      });
      return;
    }
    copy.secagg_contributors = result->contributors;
    auto mean = std::make_shared<common::TensorMap>(std::move(result->mean));
    RunAggregation(std::move(copy), std::move(mean));
  });
}

absl::Status RoundManager::CommitMaskedInput(IncomingUpdate update) {
  if (stopping_) return absl::UnavailableError("the coordinator is shutting down");
  RETURN_IF_ERROR(PrecheckLocked(update.peer_cn, update.header));
  const std::string& agent = update.peer_cn;
  RETURN_IF_ERROR(secagg_->HandleMaskedInput(agent, update.payload));
  RoundRecord& round = rounds_[*open_round_];
  round.updates[agent].bytes = update.payload.size();
  dirty_rounds_.insert(round.round_id);
  metrics_.AddCounter(kMetricAccepted, kHelpAccepted, 1);
  Log(LogLevel::kInfo, "masked input accepted",
      {{"round", std::to_string(round.round_id)},
       {"agent", agent},
       {"bytes", std::to_string(update.payload.size())},
       {"masked_inputs", absl::StrCat(secagg_->masked_senders().size(), "/",
                                      secagg_->cohort().size())}});
  if (secagg_->PhaseComplete()) AdvanceSecAgg();
  return absl::OkStatus();
}

// ------------------------------------------------------------------ Aggregate / publish

bool RoundManager::LeaveTrainPhase(RoundRecord& round, RoundPhase to) {
  RoundRecord next = round;
  next.phase = to;
  if (absl::Status s = store_->PutRound(next); !s.ok()) {
    Log(LogLevel::kError, "cannot end the TRAIN phase: the store write failed",
        {{"round", std::to_string(round.round_id)},
         {"to", RoundPhaseName(to)},
         {"error", s.ToString()}});
    return false;
  }
  round = std::move(next);
  const uint64_t now = clock_->NowUnixMs();
  metrics_.Observe(kMetricPhase, kHelpPhase,
                   static_cast<double>(now - std::min(now, round.created_unix_ms)) / 1000.0,
                   {{"phase", "train"}});
  return true;
}

void RoundManager::StartAggregate() {
  if (stopping_ || !open_round_.has_value()) return;
  RoundRecord& round = rounds_[*open_round_];
  if (round.phase == RoundPhase::kTrain) {
    if (!LeaveTrainPhase(round, RoundPhase::kAggregate)) return;  // retried at the next tick
  } else if (round.phase != RoundPhase::kAggregate) {
    return;
  }
  aggregate_started_unix_ms_ = clock_->NowUnixMs();
  Log(LogLevel::kInfo, "aggregating",
      {{"round", std::to_string(round.round_id)},
       {"updates", std::to_string(round.updates.size())}});
  boost::asio::post(*workers_, [this, copy = round]() { RunAggregation(copy); });
}

void RoundManager::RunAggregation(RoundRecord round,
                                  std::shared_ptr<common::TensorMap> secagg_mean) {
  auto aggregate = [&]() -> absl::StatusOr<Aggregated> {
    // The round's strategy was fixed when it opened; its server-side parameters
    // come from the current configuration.
    StrategyParams params = config_.aggregation;
    ASSIGN_OR_RETURN(params.strategy, ParseStrategy(round.strategy));
    AggregationInput input;
    input.params = params;
    input.lora_rank = round.lora_rank;
    input.lora_alpha = round.lora_alpha;
    common::TensorMap global;
    std::optional<ServerOptimizerState> state;
    const bool needs_global = IsAdaptive(params.strategy) || params.strategy == Strategy::kFfaLora;
    if (needs_global && !round.base_version.empty()) {
      ASSIGN_OR_RETURN(auto base, store_->GetVersion(round.base_version));
      if (!base.has_value()) {
        return absl::DataLossError(absl::StrCat("round ", round.round_id, " starts from version '",
                                                round.base_version, "', which is not stored"));
      }
      ASSIGN_OR_RETURN(std::string blob, store_->GetBlob(base->sha256));
      ASSIGN_OR_RETURN(global, common::DecodeAdapterBlob(blob));
      input.global = &global;
      if (IsAdaptive(params.strategy) && !base->server_state_sha256.empty()) {
        ASSIGN_OR_RETURN(std::string bytes, store_->GetBlob(base->server_state_sha256));
        ASSIGN_OR_RETURN(state, DecodeServerState(std::move(bytes),
                                                  absl::StrCat("server optimizer state of version '",
                                                               base->version_id, "'")));
        input.state = &*state;
      }
    }
    ASSIGN_OR_RETURN(std::unique_ptr<RoundAggregator> aggregator, RoundAggregator::Create(input));
    Aggregated out;
    out.strategy = StrategyName(params.strategy);
    if (round.secure_aggregation) {
      // Secure aggregation: only the (unweighted) mean of the contributors exists.
      if (secagg_mean == nullptr) {
        return absl::FailedPreconditionError(
            "the secure-aggregation mean of this round is gone (coordinator restarted)");
      }
      RETURN_IF_ERROR(aggregator->Add(*secagg_mean, 1.0, "secure-aggregation mean"));
      secagg_mean.reset();
      for (const std::string& a : round.secagg_contributors) {
        auto it = round.updates.find(a);
        if (it != round.updates.end()) out.num_examples += it->second.num_examples;
        out.contributors.push_back(a);
      }
    } else {
    // Robust rules (config robust_rule) replace the weighted mean of the updates; the
    // strategy's server step then applies to their result as it would to the mean.
    std::optional<RobustAggregator> robust;
    if (config_.robust_rule != "none") {
      ASSIGN_OR_RETURN(RobustOptions options, RobustOptionsFromConfig(config_));
      ASSIGN_OR_RETURN(RobustAggregator created, RobustAggregator::Create(options));
      robust.emplace(std::move(created));
    }
    // The stored updates are read, opened and parsed up to `depth` ahead on their
    // own threads while this thread adds them in agent order (the order of the
    // store's keys, as before): memory O(depth x adapter), never O(updates), and
    // the same sums as adding one at a time.
    struct Decoded {
      std::string agent;
      uint64_t num_examples = 0;
      common::TensorMap tensors;
    };
    auto decode = [this, round_id = round.round_id](const std::string& agent)
        -> absl::StatusOr<Decoded> {
      const std::string where =
          absl::StrCat("stored update of agent '", agent, "' for round ", round_id);
      ASSIGN_OR_RETURN(std::optional<UpdateRecord> u, store_->GetUpdate(round_id, agent));
      if (!u.has_value()) {
        return absl::DataLossError(absl::StrCat(where, ": the round lists it, the store has none"));
      }
      ASSIGN_OR_RETURN(
          std::string plain,
          common::OpenSealed(seal_key_, u->sealed,
                             UpdateAad(u->round_id, u->agent_id, base_model_hash_, u->base_version)));
      std::string().swap(u->sealed);
      ASSIGN_OR_RETURN(auto file, common::SafetensorsFile::FromBytes(std::move(plain), where));
      Decoded d;
      d.agent = agent;
      d.num_examples = u->summary.num_examples;
      ASSIGN_OR_RETURN(d.tensors, file->ToTensorMap());
      return d;
    };
    std::vector<std::string> agents;
    for (const auto& [agent, summary] : round.updates) agents.push_back(agent);
    const size_t depth = std::max<size_t>(1, config_.worker_threads);
    std::deque<std::future<absl::StatusOr<Decoded>>> ahead;
    size_t next = 0;
    auto launch = [&]() {
      while (ahead.size() < depth && next < agents.size()) {
        ahead.push_back(std::async(std::launch::async,
                                   [decode, agent = agents[next++]]() -> absl::StatusOr<Decoded> {
                                     try {
                                       return decode(agent);
                                     } catch (const std::exception& e) {
                                       return absl::InternalError(absl::StrCat(
                                           "decoding the update of '", agent, "' threw: ",
                                           e.what()));
                                     }
                                   }));
      }
    };
    launch();
    while (!ahead.empty()) {
      absl::StatusOr<Decoded> d = ahead.front().get();
      ahead.pop_front();
      if (!d.ok()) return d.status();  // the futures left wait for their threads
      launch();
      if (robust.has_value()) {
        RETURN_IF_ERROR(robust->Add(d->tensors, static_cast<double>(d->num_examples)));
      } else {
        RETURN_IF_ERROR(
            aggregator->Add(d->tensors, static_cast<double>(d->num_examples), d->agent));
      }
      out.num_examples += d->num_examples;
      out.contributors.push_back(d->agent);
    }
    if (robust.has_value()) {
      out.strategy = absl::StrCat(out.strategy, "+", config_.robust_rule);
      ASSIGN_OR_RETURN(RobustResult r, robust->FinishWithStats());
      Log(LogLevel::kInfo, "robust aggregation",
          {{"round", std::to_string(round.round_id)},
           {"rule", config_.robust_rule},
           {"updates", std::to_string(r.stats.count)},
           {"median_norm", absl::StrFormat("%.6g", r.stats.median_norm)},
           {"bound", absl::StrFormat("%.6g", r.stats.bound)},
           {"clipped", std::to_string(r.stats.clipped)}});
      RETURN_IF_ERROR(aggregator->Add(r.aggregate, 1.0, "robust aggregate"));
    }
    }
    ASSIGN_OR_RETURN(AggregationResult result, aggregator->Finish());
    common::TensorMap& mean = result.adapter;
    out.shapes = ShapesOf(mean);
    out.discarded_energy = result.discarded_energy;
    if (result.server_state.has_value()) {
      // Content-addressed beside the adapter blobs, before the version that names it
      // is published (an orphan after a crash here is harmless).
      ASSIGN_OR_RETURN(out.server_state_sha256,
                       store_->PutBlob(EncodeServerState(*result.server_state, params.strategy)));
    }
    RETURN_IF_ERROR(EncodeAggregate(round, mean, &out));
    return out;
  };
  absl::StatusOr<Aggregated> result;
  const auto started = std::chrono::steady_clock::now();
  try {
    result = round.async() ? AggregateAsync(round) : aggregate();
  } catch (const std::exception& e) {
    result = absl::InternalError(absl::StrCat("aggregation threw: ", e.what()));
  }
  metrics_.Observe(
      kMetricAggregation, kHelpAggregation,
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  Post([this, id = round.round_id, result = std::move(result)]() mutable {
    FinishAggregation(id, std::move(result));
  });
}

absl::Status RoundManager::EncodeAggregate(const RoundRecord& round,
                                           const common::TensorMap& adapter,
                                           Aggregated* out) const {
  out->shapes = ShapesOf(adapter);
  common::Metadata metadata{
      {"fedlora.version", VersionId(round.round_id)},
      {"fedlora.round", std::to_string(round.round_id)},
      {"fedlora.parent_version", round.base_version},
      {"fedlora.base_model_hash", base_model_hash_},
      {"fedlora.aggregation", out->strategy},
      {"fedlora.lora.rank", std::to_string(round.lora_rank)},
      {"fedlora.lora.alpha", absl::StrCat(round.lora_alpha)},
      {"fedlora.lora.target_modules", absl::StrJoin(round.lora_target_modules, ",")},
      {"fedlora.lora.init_seed", std::to_string(round.lora_init_seed)}};
  if (out->discarded_energy.has_value()) {
    metadata["fedlora.discarded_energy"] = absl::StrFormat("%.9g", *out->discarded_energy);
  }
  ASSIGN_OR_RETURN(common::Quant quant, common::ParseQuant(config_.publish_quant));
  out->quant = common::QuantName(quant);
  out->blob = common::EncodeAdapterBlob(adapter, quant, metadata, &out->quant_report);
  out->sha256 = common::Sha256Hex(out->blob);
  return absl::OkStatus();
}

void RoundManager::NoteUpdateAccepted() { metrics_.AddCounter(kMetricAccepted, kHelpAccepted, 1); }

void RoundManager::NoteRoundOpened(uint64_t round_id) {
  metrics_.SetGauge(kMetricRound, kHelpRound, static_cast<double>(round_id));
}

void RoundManager::FinishAggregation(uint64_t round_id, absl::StatusOr<Aggregated> result) {
  if (stopping_) return;  // the round stays AGGREGATE in the store; a restart redoes it
  if (!open_round_.has_value() || *open_round_ != round_id) return;
  if (!result.ok()) {
    Log(LogLevel::kError, "aggregation failed",
        {{"round", std::to_string(round_id)}, {"error", result.status().ToString()}});
    AbortOpenRound(absl::StrCat("aggregation failed: ", result.status().message()));
    return;
  }
  const uint64_t now = clock_->NowUnixMs();
  RoundRecord done = rounds_[round_id];
  VersionRecord version;
  version.version_id = VersionId(round_id);
  version.round_id = round_id;
  version.parent_version = done.base_version;
  version.sha256 = result->sha256;
  version.size_bytes = result->blob.size();
  version.quant = result->quant;
  version.quant_rel_l2_error = result->quant_report.relative_l2_error;
  version.quant_max_abs_error = result->quant_report.max_abs_error;
  version.created_unix_ms = now;
  version.num_examples = result->num_examples;
  version.contributors = result->contributors;
  version.shapes = result->shapes;
  version.strategy = result->strategy;
  version.discarded_energy = result->discarded_energy;
  version.server_state_sha256 = result->server_state_sha256;
  version.secure_aggregation = done.secure_aggregation;
  version.dp_epsilon = done.dp_epsilon;
  done.discarded_energy = result->discarded_energy;
  done.phase = RoundPhase::kDone;
  done.version_id = version.version_id;
  done.finished_unix_ms = now;
  version.base_model_hash = base_model_hash_;
  if (absl::Status s = store_->SignVersion(&version); !s.ok()) {
    AbortOpenRound(absl::StrCat("signing the version failed: ", s.message()));
    return;
  }
  if (absl::Status s = store_->Publish(done, version, result->blob); !s.ok()) {
    Log(LogLevel::kError, "publish failed",
        {{"round", std::to_string(round_id)}, {"error", s.ToString()}});
    AbortOpenRound(absl::StrCat("publish failed: ", s.message()));
    return;
  }
  rounds_[round_id] = done;
  open_round_.reset();
  metrics_.AddCounter(kMetricPublished, kHelpPublished, 1);
  metrics_.Observe(kMetricPhase, kHelpPhase,
                   static_cast<double>(now - std::min(now, aggregate_started_unix_ms_)) / 1000.0,
                   {{"phase", "aggregate"}});
  current_version_ = version.version_id;
  current_shapes_ = version.shapes;
  CacheBlob(version.version_id,
            BlobRef{version.version_id, version.sha256,
                    std::make_shared<const std::string>(std::move(result->blob)),
                    version.signature});
  Log(LogLevel::kInfo, "version published",
      {{"round", std::to_string(round_id)},
       {"version", version.version_id},
       {"sha256", version.sha256},
       {"bytes", std::to_string(version.size_bytes)},
       {"contributors", std::to_string(version.contributors.size())},
       {"strategy", version.strategy},
       {"quant", version.quant},
       {"quant_rel_l2_error", absl::StrFormat("%.6g", *version.quant_rel_l2_error)},
       {"quant_max_abs_error", absl::StrFormat("%.6g", *version.quant_max_abs_error)},
       {"discarded_energy",
        version.discarded_energy ? absl::StrFormat("%.6g", *version.discarded_energy) : "n/a"}});
  v1::CoordinatorMessage msg;
  v1::VersionNotice* notice = msg.mutable_version_notice();
  notice->set_version_id(version.version_id);
  notice->set_round_id(round_id);
  notice->set_sha256(version.sha256);
  notice->set_size_bytes(version.size_bytes);
  notice->set_signature(version.signature);
  for (auto& [id, agent] : online_) agent.link->Send(msg);
  MaybeOpenRound();
}

void RoundManager::AbortOpenRound(const std::string& reason) {
  if (!open_round_.has_value()) return;
  RoundRecord next = rounds_[*open_round_];
  next.phase = RoundPhase::kAborted;
  next.abort_reason = reason;
  next.finished_unix_ms = clock_->NowUnixMs();
  if (absl::Status s = store_->Abort(next); !s.ok()) {
    Log(LogLevel::kError, "cannot abort the round: the store write failed",
        {{"round", std::to_string(next.round_id)}, {"error", s.ToString()}});
    return;
  }
  Log(LogLevel::kWarn, "round aborted",
      {{"round", std::to_string(next.round_id)}, {"reason", reason}});
  rounds_[next.round_id] = std::move(next);
  open_round_.reset();
  secagg_.reset();
  metrics_.AddCounter(kMetricAborted, kHelpAborted, 1);
}

// ------------------------------------------------------------------ Figures

RoundRecord* RoundManager::FindRoundByVersion(const std::string& version_id) {
  if (version_id.empty()) return nullptr;
  for (auto& [id, r] : rounds_) {
    if (r.version_id == version_id) return &r;
  }
  return nullptr;
}

void RoundManager::CompleteEval(RoundRecord& round) {
  if (round.eval_complete) return;
  round.eval_complete = true;
  if (round.finished_unix_ms > 0) {
    const uint64_t now = clock_->NowUnixMs();
    metrics_.Observe(kMetricPhase, kHelpPhase,
                     static_cast<double>(now - std::min(now, round.finished_unix_ms)) / 1000.0,
                     {{"phase", "eval"}});
  }
  dirty_rounds_.erase(round.round_id);
  if (absl::Status s = store_->PutRound(round); !s.ok()) {
    Log(LogLevel::kWarn, "cannot persist round figures", {{"error", s.ToString()}});
  }
  PrintRoundLine(round);
  MaybeFinish();
}

void RoundManager::PrintRoundLine(const RoundRecord& r) {
  const uint64_t up_agents = std::max<uint64_t>(1, r.updates.size());
  const uint64_t down_agents = std::max<uint64_t>(1, r.participants.size());
  std::string line = absl::StrCat(
      "round ", r.round_id, ": participants=", r.participants.size(),
      " train_loss=", Num(r.mean_train_loss()), " eval_loss ", Num(r.mean_eval_loss_before()),
      " -> ", Num(r.mean_eval_loss_after()), " bytes_up/agent=", r.bytes_up() / up_agents,
      " bytes_down/agent=", r.bytes_down / down_agents, " version=", r.version_id,
      " strategy=", r.strategy, r.secure_aggregation ? " secagg=on" : "",
      r.dp_epsilon ? absl::StrFormat(" epsilon=%.4g", *r.dp_epsilon) : "",
      r.discarded_energy ? absl::StrFormat(" discarded_energy=%.6g", *r.discarded_energy) : "",
      r.async() ? AsyncRoundSuffix(r) : "", "\n");
  if (out_ != nullptr) {
    *out_ << line;
    out_->flush();
  }
  Log(LogLevel::kInfo, "round evaluated",
      {{"round", std::to_string(r.round_id)},
       {"eval_reports", std::to_string(r.eval_after.size())},
       {"eval_loss_after", Num(r.mean_eval_loss_after())}});
}

void RoundManager::MaybeFinish() {
  if (finished_ || config_.rounds == 0 || open_round_.has_value()) return;
  std::vector<const RoundRecord*> done;
  for (const auto& [id, r] : rounds_) {
    if (r.phase != RoundPhase::kDone) continue;
    if (!r.eval_complete) return;
    done.push_back(&r);
  }
  if (done.size() < config_.rounds) return;
  // Key order as documented: rounds, eval_loss, versions, bytes_up, bytes_down,
  // participants, train_loss.
  nlohmann::ordered_json eval = nlohmann::ordered_json::array();
  eval.push_back(JsonNum(done.front()->mean_eval_loss_before()));
  nlohmann::ordered_json versions = nlohmann::ordered_json::array();
  nlohmann::ordered_json participants = nlohmann::ordered_json::array();
  nlohmann::ordered_json train = nlohmann::ordered_json::array();
  uint64_t bytes_up = 0, bytes_down = 0;
  for (const RoundRecord* r : done) {
    eval.push_back(JsonNum(r->mean_eval_loss_after()));
    versions.push_back(r->version_id);
    participants.push_back(r->participants.size());
    train.push_back(JsonNum(r->mean_train_loss()));
    bytes_up += r->bytes_up();
    bytes_down += r->bytes_down;
  }
  nlohmann::ordered_json summary;
  summary["rounds"] = done.size();
  summary["eval_loss"] = eval;
  summary["versions"] = versions;
  summary["bytes_up"] = bytes_up;
  summary["bytes_down"] = bytes_down;
  summary["participants"] = participants;
  summary["train_loss"] = train;
  if (out_ != nullptr) {
    *out_ << summary.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) << "\n";
    out_->flush();
  }
  finished_ = true;
  Log(LogLevel::kInfo, "all rounds done", {{"rounds", std::to_string(done.size())}});
  if (finished_callback_) finished_callback_();
}

// ------------------------------------------------------------------ Adapters and status

void RoundManager::CacheBlob(const std::string& version_id, BlobRef ref) {
  std::lock_guard<std::mutex> lock(blob_mu_);
  if (blob_cache_.size() >= 4) blob_cache_.erase(blob_cache_.begin());  // oldest id first
  blob_cache_[version_id] = std::move(ref);
}

void RoundManager::GetVersionBlob(std::string version_id,
                                  std::function<void(absl::StatusOr<BlobRef>)> done) {
  if (!workers_) {
    done(absl::UnavailableError("the round manager is not running"));
    return;
  }
  boost::asio::post(*workers_, [this, version_id = std::move(version_id),
                                done = std::move(done)]() {
    auto load = [&]() -> absl::StatusOr<BlobRef> {
      if (version_id.empty()) {
        return absl::InvalidArgumentError("FetchAdapterRequest.version_id is empty");
      }
      {
        std::lock_guard<std::mutex> lock(blob_mu_);
        auto it = blob_cache_.find(version_id);
        if (it != blob_cache_.end()) return it->second;
      }
      ASSIGN_OR_RETURN(auto version, store_->GetVersion(version_id));
      if (!version.has_value()) {
        return absl::NotFoundError(
            absl::StrCat("adapter version '", version_id, "' does not exist"));
      }
      ASSIGN_OR_RETURN(std::string blob, store_->GetBlob(version->sha256));
      if (common::Sha256Hex(blob) != version->sha256) {
        return absl::DataLossError(absl::StrCat("stored blob of version '", version_id,
                                                "' does not match its SHA-256 ", version->sha256));
      }
      BlobRef ref{version_id, version->sha256,
                  std::make_shared<const std::string>(std::move(blob)), version->signature};
      CacheBlob(version_id, ref);
      return ref;
    };
    absl::StatusOr<BlobRef> result;
    try {
      result = load();
    } catch (const std::exception& e) {
      result = absl::InternalError(absl::StrCat("loading the version threw: ", e.what()));
    }
    done(std::move(result));
  });
}

void RoundManager::RecordBytesDown(std::string version_id, uint64_t bytes) {
  metrics_.AddCounter(kMetricBytesOut, kHelpBytesOut, static_cast<double>(bytes));
  Post([this, version_id = std::move(version_id), bytes]() {
    RoundRecord* r = FindRoundByVersion(version_id);
    if (r == nullptr) return;
    r->bytes_down += bytes;
    dirty_rounds_.insert(r->round_id);
  });
}

void RoundManager::GetStatus(std::function<void(v1::StatusResponse)> done) {
  Post([this, done = std::move(done)]() {
    v1::StatusResponse response;
    response.set_coordinator_id(config_.coordinator_id);
    if (open_round_.has_value()) {
      response.set_current_round(*open_round_);
      response.set_current_phase(RoundPhaseName(rounds_[*open_round_].phase));
    } else {
      response.set_current_round(last_round_id_);
      response.set_current_phase("IDLE");
    }
    response.set_current_version(current_version_);
    auto agents = store_->ListAgents();
    if (agents.ok()) {
      for (const AgentRecord& a : *agents) {
        v1::AgentInfo* info = response.add_agents();
        info->set_agent_id(a.agent_id);
        auto it = online_.find(a.agent_id);
        info->set_online(it != online_.end());
        info->set_current_version(it != online_.end() ? it->second.hello.current_version()
                                                      : a.current_version);
        info->set_last_seen_unix_ms(it != online_.end() ? it->second.last_seen_unix_ms
                                                        : a.last_seen_unix_ms);
      }
    } else {
      Log(LogLevel::kWarn, "cannot list agents", {{"error", agents.status().ToString()}});
    }
    for (const auto& [id, r] : rounds_) {
      v1::RoundInfo* info = response.add_rounds();
      info->set_round_id(id);
      info->set_phase(RoundPhaseName(r.phase));
      info->set_participants(r.participants.size());
      info->set_updates_received(r.updates.size());
      info->set_version_id(r.version_id);
      info->set_mean_train_loss(r.mean_train_loss());
      info->set_eval_loss_before(r.mean_eval_loss_before());
      info->set_eval_loss_after(r.mean_eval_loss_after());
      info->set_bytes_up(r.bytes_up());
      info->set_bytes_down(r.bytes_down);
      info->set_aggregation(r.strategy);
      info->set_discarded_energy(r.discarded_energy.value_or(-1.0));
      info->set_secure_aggregation(r.secure_aggregation);
      info->set_dp_epsilon(r.dp_epsilon.value_or(-1.0));
    }
    response.set_updates_rejected(rejections_.load());
    if (!current_version_.empty()) {
      auto version = store_->GetVersion(current_version_);
      if (version.ok() && version->has_value()) {
        *response.mutable_current_version_info() = ToVersionInfo(**version, current_version_);
      }
    }
    done(std::move(response));
  });
}

// ------------------------------------------------------------------ Versions and backup

void RoundManager::ListVersions(
    std::function<void(absl::StatusOr<v1::ListVersionsResponse>)> done) {
  Post([this, done = std::move(done)]() {
    auto versions = store_->ListVersions();
    if (!versions.ok()) {
      done(versions.status());
      return;
    }
    v1::ListVersionsResponse response;
    response.set_current_version(current_version_);
    for (const VersionRecord& v : *versions) {
      *response.add_versions() = ToVersionInfo(v, current_version_);
    }
    done(std::move(response));
  });
}

void RoundManager::MoveCurrentVersion(
    VersionMove move, std::string target, std::string actor,
    std::function<void(absl::StatusOr<v1::VersionChangeResponse>)> done) {
  Post([this, move, target = std::move(target), actor = std::move(actor),
        done = std::move(done)]() {
    if (stopping_) {
      done(absl::UnavailableError("the coordinator is shutting down"));
      return;
    }
    auto to = ResolveVersionMove(*store_, current_version_, move, target);
    if (!to.ok()) {
      done(to.status());
      return;
    }
    v1::VersionChangeResponse response;
    response.set_previous_version(current_version_);
    response.set_current_version(to->version_id);
    if (open_round_.has_value()) {
      const uint64_t round_id = *open_round_;
      AbortOpenRound(absl::StrCat("the current version moved from '", current_version_, "' to '",
                                  to->version_id, "' (", VersionMoveAction(move), " by ", actor,
                                  ")"));
      if (open_round_.has_value()) {
        done(absl::UnavailableError(absl::StrCat(
            "cannot abort round ", round_id, " before moving the current version; retry")));
        return;
      }
      response.set_aborted_round(round_id);
    }
    nlohmann::json details{{"from", current_version_},
                           {"to", to->version_id},
                           {"round", to->round_id},
                           {"sha256", to->sha256}};
    if (response.aborted_round() != 0) details["aborted_round"] = response.aborted_round();
    if (absl::Status s = store_->SetCurrentVersion(to->version_id, actor, VersionMoveAction(move),
                                                   details.dump());
        !s.ok()) {
      Log(LogLevel::kError, "cannot move the current version: the store write failed",
          {{"to", to->version_id}, {"error", s.ToString()}});
      done(s);
      return;
    }
    current_version_ = to->version_id;
    current_shapes_ = to->shapes;
    Log(LogLevel::kWarn, move == VersionMove::kRollback ? "version rolled back" : "version promoted",
        {{"from", response.previous_version()},
         {"to", to->version_id},
         {"actor", actor},
         {"aborted_round", std::to_string(response.aborted_round())}});
    v1::CoordinatorMessage msg;
    v1::VersionNotice* notice = msg.mutable_version_notice();
    notice->set_version_id(to->version_id);
    notice->set_round_id(to->round_id);
    notice->set_sha256(to->sha256);
    notice->set_size_bytes(to->size_bytes);
    notice->set_signature(to->signature);
    for (auto& [id, agent] : online_) agent.link->Send(msg);
    done(std::move(response));
    MaybeOpenRound();
  });
}

void RoundManager::CreateBackup(
    std::string dir, std::string actor,
    std::function<void(absl::StatusOr<v1::CreateBackupResponse>)> done) {
  if (!workers_ || stopping_) {
    done(absl::UnavailableError("the round manager is not running"));
    return;
  }
  boost::asio::post(*workers_, [this, dir = std::move(dir), actor = std::move(actor),
                                done = std::move(done)]() {
    auto run = [&]() -> absl::StatusOr<v1::CreateBackupResponse> {
      RETURN_IF_ERROR(store_->CreateBackup(dir, actor));
      ASSIGN_OR_RETURN(auto backup, StateStore::OpenReadOnly(dir));
      ASSIGN_OR_RETURN(AuditVerifyReport report, VerifyAuditChain(backup->raw_store()));
      if (!report.ok) {
        return absl::DataLossError(absl::StrCat("backup ", dir, ": audit chain broken at seq ",
                                                report.first_bad_seq, ": ", report.error));
      }
      v1::CreateBackupResponse response;
      response.set_dir(dir);
      ASSIGN_OR_RETURN(std::string current, backup->CurrentVersion());
      response.set_current_version(current);
      response.set_audit_records(report.records);
      return response;
    };
    absl::StatusOr<v1::CreateBackupResponse> result;
    try {
      result = run();
    } catch (const std::exception& e) {
      result = absl::InternalError(absl::StrCat("backup threw: ", e.what()));
    }
    if (result.ok()) {
      Log(LogLevel::kInfo, "backup created",
          {{"dir", dir}, {"actor", actor}, {"current_version", result->current_version()}});
    }
    done(std::move(result));
  });
}

}  // namespace fedlora::coordinator
