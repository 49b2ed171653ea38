// The asynchronous (FedBuff) mode of the RoundManager (round_manager.h, "Async
// mode"; docs/protocol.md, "Async rounds"). Everything here runs on the manager
// thread except AggregateAsync (a worker).

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/quant/quant.h"
#include "common/status/status.h"
#include "coordinator/fedbuff.h"
#include "coordinator/logging.h"
#include "coordinator/round_manager.h"
#include "coordinator/update_validator.h"

namespace fedlora::coordinator {

namespace v1 = ::fedlora::v1;

namespace {
constexpr char kMetricBuffered[] = "fedlora_async_buffered_updates";
constexpr char kHelpBuffered[] = "Async mode: updates in the open buffer";
constexpr char kMetricTasks[] = "fedlora_async_tasks_in_flight";
constexpr char kHelpTasks[] = "Async mode: agents holding a task (training slots in use)";
}  // namespace

void RoundManager::UpdateAsyncGauges() {
  size_t buffered = 0;
  if (open_round_.has_value()) {
    const RoundRecord& r = rounds_[*open_round_];
    if (r.async()) buffered = r.updates.size();
  }
  metrics_.SetGauge(kMetricBuffered, kHelpBuffered, static_cast<double>(buffered));
  metrics_.SetGauge(kMetricTasks, kHelpTasks, static_cast<double>(async_busy_.size()));
}

void RoundManager::RebuildAsyncTasks() {
  async_tasks_.clear();
  async_busy_.clear();
  async_last_task_.clear();
  for (const auto& [id, r] : rounds_) {
    if (!r.async()) continue;
    for (const auto& [task_id, t] : r.tasks) {
      TaskState& state = async_tasks_[task_id];
      state.round_id = id;
      state.agent_id = t.agent_id;
      state.deadline_unix_ms = t.deadline_unix_ms;
      last_task_id_ = std::max(last_task_id_, task_id);
      uint64_t& last = async_last_task_[t.agent_id];
      last = std::max(last, task_id);
    }
  }
  // Updates name their task; a task whose update was taken (in any buffer, kept,
  // published or aborted) is done.
  for (const auto& [id, r] : rounds_) {
    if (!r.async()) continue;
    for (const auto& [key, u] : r.updates) {
      auto it = async_tasks_.find(u.task_id);
      if (it != async_tasks_.end()) it->second.accepted_in = id;
    }
  }
  const uint64_t now = clock_->NowUnixMs();
  for (const auto& [task_id, t] : async_tasks_) {
    if (t.accepted_in == 0 && now < t.deadline_unix_ms) async_busy_[t.agent_id] = task_id;
  }
}

void RoundManager::OpenAsyncRound() {
  RoundRecord r;
  r.round_id = last_round_id_ + 1;
  r.phase = RoundPhase::kTrain;
  r.mode = "async";
  r.base_version = current_version_;
  r.created_unix_ms = clock_->NowUnixMs();
  r.deadline_unix_ms = 0;  // each task has its own
  r.local_steps = config_.local_steps;
  r.learning_rate = config_.learning_rate;
  r.batch_size = config_.batch_size;
  r.lora_rank = config_.lora_rank;
  r.lora_alpha = config_.lora_alpha;
  r.lora_target_modules = config_.lora_target_modules;
  r.lora_init_seed = config_.lora_init_seed;
  r.max_update_bytes = config_.max_update_bytes;
  r.strategy = "fedbuff";
  r.prox_mu = config_.aggregation.strategy == Strategy::kFedProx ? config_.aggregation.prox_mu : 0;
  r.shapes = current_version_.empty() ? ShapeMap{} : current_shapes_;
  r.secure_aggregation = false;
  if (absl::Status s = store_->StartRound(r); !s.ok()) {  // audited
    Log(LogLevel::kError, "cannot open an async round: the store write failed",
        {{"round", std::to_string(r.round_id)}, {"error", s.ToString()}});
    return;
  }
  last_round_id_ = r.round_id;
  open_round_ = r.round_id;
  rounds_[r.round_id] = r;
  NoteRoundOpened(r.round_id);
  UpdateAsyncGauges();
  Log(LogLevel::kInfo, "round opened",
      {{"round", std::to_string(r.round_id)},
       {"mode", "async"},
       {"buffer_size", std::to_string(config_.async_buffer_size)},
       {"base_version", r.base_version.empty() ? "(fresh)" : r.base_version}});
  RunPendingAsyncCommits();
  DispatchAsyncTasks();
}

void RoundManager::AsyncTick(uint64_t now) {
  for (auto it = async_busy_.begin(); it != async_busy_.end();) {
    const TaskState& t = async_tasks_[it->second];
    if (now >= t.deadline_unix_ms) {
      Log(LogLevel::kInfo, "async task deadline passed; the agent's slot is free",
          {{"agent", it->first}, {"task", std::to_string(it->second)}});
      it = async_busy_.erase(it);
    } else {
      ++it;
    }
  }
  UpdateAsyncGauges();
  if (open_round_.has_value()) {
    const RoundRecord& r = rounds_[*open_round_];
    if (r.phase == RoundPhase::kTrain && r.updates.size() >= config_.async_buffer_size) {
      StartAggregate();
      return;
    }
  }
  DispatchAsyncTasks();
}

uint64_t RoundManager::StalenessOf(uint64_t task_round) const {
  uint64_t n = 0;
  for (auto it = rounds_.lower_bound(task_round); it != rounds_.end(); ++it) {
    n += it->second.phase == RoundPhase::kDone;
  }
  return n;
}

void RoundManager::DispatchAsyncTasks() {
  if (stopping_ || finished_ || !open_round_.has_value()) return;
  RoundRecord& round = rounds_[*open_round_];
  if (!round.async() || round.phase != RoundPhase::kTrain) return;
  const size_t busy = async_busy_.size();
  if (busy >= config_.async_concurrency) return;
  size_t free = config_.async_concurrency - busy;
  if (current_version_.empty()) {
    // Fresh start: an update from the fresh adapter cannot be merged once a version
    // exists, so hand out no more tasks than the first buffer needs.
    const size_t needed = config_.async_buffer_size -
                          std::min<size_t>(config_.async_buffer_size, round.updates.size());
    free = std::min(free, needed > busy ? needed - busy : 0);
  }
  if (free == 0) return;
  std::vector<std::string> idle;
  for (const auto& [id, agent] : online_) {
    if (async_busy_.count(id) == 0 && revoked_.count(id) == 0) idle.push_back(id);
  }
  if (idle.empty()) return;
  if (idle.size() > free) {
    // Agents never tasked first, then those whose last task is oldest.
    auto last = [&](const std::string& agent) {
      auto it = async_last_task_.find(agent);
      return it == async_last_task_.end() ? uint64_t{0} : it->second;
    };
    std::stable_sort(idle.begin(), idle.end(),
                     [&](const std::string& x, const std::string& y) { return last(x) < last(y); });
    idle.resize(free);
  }
  const uint64_t now = clock_->NowUnixMs();
  const uint64_t deadline = now + config_.round_deadline_s * 1000;
  RoundRecord next = round;
  uint64_t task_id = last_task_id_;
  std::vector<uint64_t> handed;
  for (const std::string& agent : idle) {
    next.tasks[++task_id] = AsyncTask{agent, deadline};
    handed.push_back(task_id);
  }
  if (absl::Status s = store_->PutRound(next); !s.ok()) {  // synced before any is sent
    Log(LogLevel::kError, "cannot hand out async tasks: the store write failed",
        {{"round", std::to_string(round.round_id)}, {"error", s.ToString()}});
    return;
  }
  round = std::move(next);
  last_task_id_ = task_id;
  for (uint64_t id : handed) {
    const std::string& agent = round.tasks.at(id).agent_id;
    async_tasks_[id] = TaskState{round.round_id, agent, deadline, 0};
    async_busy_[agent] = id;
    async_last_task_[agent] = id;
    SendAsyncTask(id);
  }
  UpdateAsyncGauges();
  Log(LogLevel::kInfo, "async tasks handed out",
      {{"round", std::to_string(round.round_id)},
       {"tasks", std::to_string(handed.size())},
       {"training", std::to_string(async_busy_.size())}});
}

void RoundManager::SendAsyncTask(uint64_t task_id) {
  auto it = async_tasks_.find(task_id);
  if (it == async_tasks_.end()) return;
  const TaskState& t = it->second;
  auto round = rounds_.find(t.round_id);
  if (round == rounds_.end()) return;
  RoundRecord as_sent = round->second;  // the round's task, under the task's id and deadline
  as_sent.round_id = task_id;
  as_sent.deadline_unix_ms = t.deadline_unix_ms;
  SendTask(as_sent, t.agent_id);
}

absl::Status RoundManager::PrecheckAsyncLocked(const std::string& peer_cn,
                                               const v1::UpdateHeader& header) const {
  if (header.masked()) {
    return absl::FailedPreconditionError(
        "the coordinator runs in async mode, without secure aggregation: masked inputs are "
        "refused");
  }
  const uint64_t task_id = header.round_id();
  auto it = async_tasks_.find(task_id);
  if (it == async_tasks_.end()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "task ", task_id,
        " is unknown (async mode: UpdateHeader.round_id is the id of a task handed out by this "
        "coordinator)"));
  }
  const TaskState& task = it->second;
  if (task.agent_id != peer_cn) {
    return absl::PermissionDeniedError(absl::StrCat("task ", task_id, " was given to agent '",
                                                    task.agent_id, "', not to '", peer_cn, "'"));
  }
  if (task.accepted_in != 0) {
    return absl::AlreadyExistsError(absl::StrCat("agent '", peer_cn,
                                                 "' already submitted an update for task ", task_id,
                                                 " (buffered in round ", task.accepted_in, ")"));
  }
  if (config_.rounds > 0) {
    uint64_t published = 0;
    for (const auto& [id, r] : rounds_) published += r.phase == RoundPhase::kDone;
    if (published >= config_.rounds) {
      return absl::FailedPreconditionError(absl::StrCat("the coordinator has published its ",
                                                        config_.rounds,
                                                        " rounds; no more updates are taken"));
    }
  }
  if (header.base_model_hash() != base_model_hash_) {
    return absl::FailedPreconditionError(absl::StrCat("UpdateHeader.base_model_hash '",
                                                      header.base_model_hash(), "', expected '",
                                                      base_model_hash_, "'"));
  }
  const RoundRecord& given = rounds_.at(task.round_id);
  if (header.base_version() != given.base_version) {
    return absl::FailedPreconditionError(absl::StrCat("UpdateHeader.base_version '",
                                                      header.base_version(), "', expected '",
                                                      given.base_version, "' for task ", task_id));
  }
  const uint64_t staleness = StalenessOf(task.round_id);
  if (staleness > config_.async_max_staleness) {
    return absl::FailedPreconditionError(absl::StrCat(
        "update for task ", task_id, " is stale: its base version '", given.base_version, "' is ",
        staleness, " versions behind the current version '", current_version_,
        "'; async_max_staleness is ", config_.async_max_staleness));
  }
  if (given.base_version.empty() && !current_version_.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "update for task ", task_id, " was trained from the fresh adapter, but version '",
        current_version_,
        "' exists now: its delta cannot be formed (the agents' seeded initialisation is not "
        "known to the coordinator)"));
  }
  return CheckHeaderFields(header, given.max_update_bytes);
}

void RoundManager::OnAsyncRefusal(const std::string& agent, uint64_t task_id,
                                  const absl::Status& status) {
  if (status.code() == absl::StatusCode::kUnavailable) return;  // the agent retries
  auto it = async_busy_.find(agent);
  if (it == async_busy_.end() || it->second != task_id) return;
  async_busy_.erase(it);
  UpdateAsyncGauges();
  DispatchAsyncTasks();
}

void RoundManager::CommitAsyncUpdate(IncomingUpdate update, common::TensorMap tensors,
                                     StatusCallback done) {
  if (stopping_) {
    done(absl::UnavailableError("the coordinator is shutting down"));
    return;
  }
  const std::string agent = update.peer_cn;
  const uint64_t task_id = update.header.round_id();
  if (absl::Status s = PrecheckAsyncLocked(agent, update.header); !s.ok()) {
    OnAsyncRefusal(agent, task_id, s);
    done(s);
    return;
  }
  if (!open_round_.has_value() || rounds_[*open_round_].phase != RoundPhase::kTrain) {
    // The buffer is being aggregated: this update goes into the next one.
    Log(LogLevel::kInfo, "update waits for the next buffer",
        {{"task", std::to_string(task_id)}, {"agent", agent}});
    async_pending_.push_back(PendingCommit{std::move(update), std::move(tensors), std::move(done)});
    return;
  }
  RoundRecord& round = rounds_[*open_round_];
  const TaskState& task = async_tasks_.at(task_id);
  const RoundRecord& given = rounds_.at(task.round_id);
  const std::string where = absl::StrCat("update of agent '", agent, "' for task ", task_id);
  absl::Status valid = round.shapes.empty()
                           ? CheckLoraStructure(tensors, round.lora_rank, round.lora_target_modules)
                           : CheckShapes(tensors, round.shapes);
  if (valid.ok() && !given.base_version.empty() && given.shapes != round.shapes) {
    valid = absl::InvalidArgumentError(absl::StrCat("its base version '", given.base_version,
                                                    "' has other tensors than the current one"));
  }
  if (!valid.ok()) {
    absl::Status s = absl::InvalidArgumentError(absl::StrCat(where, ": ", valid.message()));
    OnAsyncRefusal(agent, task_id, s);
    done(s);
    return;
  }
  const v1::UpdateHeader& h = update.header;
  UpdateRecord record;
  record.round_id = round.round_id;
  record.agent_id = agent;
  record.task_id = task_id;
  record.base_version = h.base_version();
  record.summary.num_examples = h.num_examples();
  record.summary.train_loss = h.metrics().train_loss();
  record.summary.eval_loss_before = h.metrics().eval_loss_before();
  record.summary.train_tokens = h.metrics().train_tokens();
  record.summary.train_seconds = h.metrics().train_seconds();
  record.summary.bytes = update.payload.size();
  record.summary.agent_id = agent;
  record.summary.task_id = task_id;
  record.summary.base_version = h.base_version();
  record.summary.staleness = StalenessOf(task.round_id);
  record.payload_sha256 = h.payload_sha256();
  record.received_unix_ms = clock_->NowUnixMs();
  record.sealed = std::move(update.payload);
  RoundRecord next = round;
  next.updates[TaskKey(task_id)] = record.summary;
  if (!next.IsParticipant(agent)) next.participants.push_back(agent);
  if (next.shapes.empty()) next.shapes = ShapesOf(tensors);
  if (absl::Status s = store_->AcceptUpdate(record, next); !s.ok()) {
    Log(LogLevel::kError, "cannot store an update", {{"agent", agent}, {"error", s.ToString()}});
    done(absl::UnavailableError(
        absl::StrCat("the coordinator could not store the update: ", s.message())));
    return;
  }
  round = std::move(next);
  async_tasks_[task_id].accepted_in = round.round_id;
  auto busy = async_busy_.find(agent);
  if (busy != async_busy_.end() && busy->second == task_id) async_busy_.erase(busy);
  NoteUpdateAccepted();
  UpdateAsyncGauges();
  Log(LogLevel::kInfo, "update accepted",
      {{"round", std::to_string(round.round_id)},
       {"task", std::to_string(task_id)},
       {"agent", agent},
       {"staleness", std::to_string(record.summary.staleness)},
       {"bytes", std::to_string(record.summary.bytes)},
       {"updates", absl::StrCat(round.updates.size(), "/", config_.async_buffer_size)}});
  done(absl::OkStatus());
  if (round.updates.size() >= config_.async_buffer_size) {
    StartAggregate();
  } else {
    DispatchAsyncTasks();
  }
}

void RoundManager::RunPendingAsyncCommits() {
  std::vector<PendingCommit> pending = std::move(async_pending_);
  async_pending_.clear();
  for (PendingCommit& p : pending) {
    // A commit may fill the buffer again; the rest then wait for the next one.
    CommitAsyncUpdate(std::move(p.update), std::move(p.tensors), std::move(p.done));
  }
}

bool RoundManager::DropAsyncUpdatesOf(const std::string& agent) {
  async_busy_.erase(agent);
  if (!open_round_.has_value()) return false;
  RoundRecord& round = rounds_[*open_round_];
  if (!round.async() || round.phase != RoundPhase::kTrain) return false;
  RoundRecord next = round;
  std::vector<std::string> entries;
  for (auto it = next.updates.begin(); it != next.updates.end();) {
    if (it->second.agent_id == agent) {
      entries.push_back(it->first);
      it = next.updates.erase(it);
    } else {
      ++it;
    }
  }
  if (entries.empty()) return false;
  next.participants.erase(std::remove(next.participants.begin(), next.participants.end(), agent),
                          next.participants.end());
  if (absl::Status s = store_->DiscardUpdates(next, entries); !s.ok()) {
    Log(LogLevel::kError, "cannot discard the updates of a revoked agent",
        {{"agent", agent}, {"error", s.ToString()}});
    return false;
  }
  round = std::move(next);
  UpdateAsyncGauges();
  DispatchAsyncTasks();  // the buffer needs more updates now
  return true;
}

absl::StatusOr<RoundManager::Aggregated> RoundManager::AggregateAsync(const RoundRecord& round) {
  // Adapters of the versions the buffered updates started from, decoded once each.
  std::map<std::string, common::TensorMap> bases;
  auto base_of = [&](const std::string& version_id) -> absl::StatusOr<const common::TensorMap*> {
    auto it = bases.find(version_id);
    if (it != bases.end()) return &it->second;
    ASSIGN_OR_RETURN(auto version, store_->GetVersion(version_id));
    if (!version.has_value()) {
      return absl::DataLossError(absl::StrCat("round ", round.round_id,
                                              " holds an update from version '", version_id,
                                              "', which is not stored"));
    }
    ASSIGN_OR_RETURN(std::string blob, store_->GetBlob(version->sha256));
    ASSIGN_OR_RETURN(common::TensorMap tensors, common::DecodeAdapterBlob(blob));
    return &bases.emplace(version_id, std::move(tensors)).first->second;
  };
  const common::TensorMap* current = nullptr;
  if (!round.base_version.empty()) {
    ASSIGN_OR_RETURN(current, base_of(round.base_version));
  }
  const FedBuffOptions options = config_.fedbuff();
  FedBuffAggregator aggregator(options, current);
  Aggregated out;
  out.strategy = "fedbuff";
  std::set<std::string> contributors;
  std::vector<std::string> weights;
  RETURN_IF_ERROR(store_->ForEachUpdate(round.round_id, [&](UpdateRecord u) -> absl::Status {
    const std::string where = absl::StrCat("stored update of agent '", u.agent_id, "' for task ",
                                           u.task_id, " in round ", u.round_id);
    auto summary = round.updates.find(TaskKey(u.task_id));
    if (u.task_id == 0 || summary == round.updates.end()) {
      return absl::DataLossError(absl::StrCat(where, ": not listed in the round record"));
    }
    ASSIGN_OR_RETURN(
        std::string plain,
        common::OpenSealed(seal_key_, u.sealed,
                           UpdateAad(u.task_id, u.agent_id, base_model_hash_, u.base_version)));
    u.sealed.clear();
    u.sealed.shrink_to_fit();
    ASSIGN_OR_RETURN(auto file, common::SafetensorsFile::FromBytes(std::move(plain), where));
    ASSIGN_OR_RETURN(common::TensorMap tensors, file->ToTensorMap());
    file.reset();
    const common::TensorMap* base = nullptr;
    if (!u.base_version.empty()) {
      ASSIGN_OR_RETURN(base, base_of(u.base_version));
    }
    const uint64_t staleness = summary->second.staleness;
    const double w = static_cast<double>(u.summary.num_examples);
    RETURN_IF_ERROR(aggregator.Add(tensors, base, w, staleness, u.agent_id));
    weights.push_back(
        absl::StrFormat("%s:tau=%d:w=%.6g", u.agent_id, staleness,
                        w * StalenessFactor(options.weight, options.exponent, staleness)));
    out.num_examples += u.summary.num_examples;
    contributors.insert(u.agent_id);
    return absl::OkStatus();
  }));
  if (aggregator.count() != round.updates.size()) {
    return absl::DataLossError(absl::StrCat("round ", round.round_id, " lists ",
                                            round.updates.size(), " updates, the store holds ",
                                            aggregator.count()));
  }
  ASSIGN_OR_RETURN(common::TensorMap next, aggregator.Finish());
  out.contributors.assign(contributors.begin(), contributors.end());
  Log(LogLevel::kInfo, "fedbuff aggregate",
      {{"round", std::to_string(round.round_id)},
       {"updates", std::to_string(aggregator.count())},
       {"weights", absl::StrJoin(weights, " ")},
       {"server_lr", absl::StrFormat("%.6g", options.server_lr)},
       {"staleness_weight", StalenessWeightName(options.weight)}});
  RETURN_IF_ERROR(EncodeAggregate(round, next, &out));
  return out;
}

}  // namespace fedlora::coordinator
