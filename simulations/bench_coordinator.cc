#include "simulations/bench_coordinator.h"

#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/write.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/crypto/crypto.h"
#include "common/crypto/pki.h"
#include "common/net/tls.h"
#include "common/status/status.h"
#include "common/tensor/tensor.h"
#include "edge-agent/agent.h"
#include "fedlora/v1/fedlora.grpc.pb.h"
#include "simulations/bench_util.h"

extern char** environ;

namespace fedlora::sim {
namespace {

namespace v1 = ::fedlora::v1;
using bench::Clock;
using bench::Seconds;
using bench::UniformUnit;

constexpr int64_t kModuleWidth = 1024;  // in = out of every full LoRA module
constexpr size_t kChunkBytes = edge::kUpdateChunkBytes;
constexpr int kSubmitAttempts = 3;  // like fedlora-agent's submit_max_attempts


struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
};

// PEFT LoRA factors of rank r on q_proj / v_proj (alternating, two per layer):
// full modules of width kModuleWidth, then one narrower module for the rest.
std::vector<TensorSpec> MakeLayout(int64_t params, int64_t r, int64_t* actual) {
  std::vector<TensorSpec> specs;
  int64_t total = 0;
  int module = 0;
  auto add = [&](int64_t in, int64_t out) {
    const std::string path = absl::StrCat("base_model.model.model.layers.", module / 2,
                                          ".self_attn.", module % 2 == 0 ? "q_proj" : "v_proj");
    specs.push_back({path + ".lora_A.weight", {r, in}});
    specs.push_back({path + ".lora_B.weight", {out, r}});
    total += r * (in + out);
    ++module;
  };
  const int64_t full = 2 * r * kModuleWidth;
  for (int64_t i = 0; i < params / full; ++i) add(kModuleWidth, kModuleWidth);
  const int64_t rest = (params - total) / r;  // in + out of the last module
  if (rest >= 2) add(rest / 2, rest - rest / 2);
  *actual = total;
  return specs;
}

// VmRSS / VmHWM of a process in bytes (0 when unreadable).
uint64_t ProcStatusBytes(pid_t pid, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) {
      return std::strtoull(line.c_str() + key.size() + 1, nullptr, 10) * 1024;
    }
  }
  return 0;
}

absl::StatusOr<std::string> HttpGet(int port, const std::string& path) {
  boost::asio::io_context io;
  boost::asio::ip::tcp::socket socket(io);
  boost::system::error_code ec;
  socket.connect({boost::asio::ip::make_address("127.0.0.1"), static_cast<uint16_t>(port)}, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("GET ", path, ": ", ec.message()));
  const std::string request = "GET " + path + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  boost::asio::write(socket, boost::asio::buffer(request), ec);
  std::string out;
  char buf[8192];
  while (!ec) out.append(buf, socket.read_some(boost::asio::buffer(buf), ec));
  const size_t body = out.find("\r\n\r\n");
  if (out.rfind("HTTP/1.1 200", 0) != 0 || body == std::string::npos) {
    return absl::UnavailableError(absl::StrCat("GET ", path, ": ", out.substr(0, 80)));
  }
  return out.substr(body + 4);
}

// Prometheus text: "series value" lines, keyed by the series (name{labels}).
std::map<std::string, double> ParseMetrics(const std::string& text) {
  std::map<std::string, double> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t sp = line.rfind(' ');
    if (sp == std::string::npos) continue;
    out[line.substr(0, sp)] = std::strtod(line.c_str() + sp + 1, nullptr);
  }
  return out;
}

double Get(const std::map<std::string, double>& m, const std::string& key) {
  auto it = m.find(key);
  return it == m.end() ? 0 : it->second;
}

double SumPrefix(const std::map<std::string, double>& m, const std::string& name) {
  double sum = 0;
  for (const auto& [k, v] : m) {
    if (k == name || k.rfind(name + "{", 0) == 0) sum += v;
  }
  return sum;
}

// ------------------------------------------------------------------ child process

class Child {
 public:
  ~Child() {
    if (pid_ > 0 && !exited_) {
      kill(pid_, SIGKILL);
      Wait(std::chrono::seconds(30));
    }
  }
  absl::Status Start(const std::vector<std::string>& argv, const std::string& out,
                     const std::string& err) {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&actions, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    const int rc = posix_spawn(&pid_, argv[0].c_str(), &actions, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) {
      pid_ = -1;
      return absl::FailedPreconditionError(
          absl::StrCat("cannot start '", argv[0], "': ", std::strerror(rc)));
    }
    return absl::OkStatus();
  }
  pid_t pid() const { return pid_; }
  bool exited() const { return exited_; }
  int exit_code() const { return exit_code_; }

  // Reaps the child if it exits within `timeout` (polled every 20 ms).
  bool Wait(std::chrono::milliseconds timeout) {
    if (pid_ <= 0 || exited_) return exited_;
    const auto end = Clock::now() + timeout;
    while (true) {
      int status = 0;
      pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        exited_ = true;
        exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        return true;
      }
      if (r < 0 || Clock::now() >= end) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  void Signal(int sig) {
    if (pid_ > 0 && !exited_) kill(pid_, sig);
  }

 private:
  pid_t pid_ = -1;
  bool exited_ = false;
  int exit_code_ = -1;
};

std::string Tail(const std::string& path, size_t bytes = 3000) {
  auto text = common::ReadFileToString(path);
  if (!text.ok()) return "";
  return text->size() > bytes ? text->substr(text->size() - bytes) : *text;
}

// ------------------------------------------------------------------ light agents

class Bench;

struct LightAgent {
  int index = 0;
  std::string id;
  std::unique_ptr<v1::Coordinator::Stub> stub;
  class SessionCall* session = nullptr;  // owned by Bench::sessions_
};

class SessionCall final : public grpc::ClientBidiReactor<v1::AgentMessage, v1::CoordinatorMessage> {
 public:
  SessionCall(Bench* bench, LightAgent* agent) : bench_(bench), agent_(agent) {}
  void Start(const std::string& base_hash, Clock::duration deadline);
  void Write(const v1::AgentMessage& message) {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    queue_.push_back(message);
    if (!writing_) {
      writing_ = true;
      StartWrite(&queue_.front());
    }
  }
  void Close() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (released_) return;
      closed_ = true;
      released_ = true;
    }
    context_.TryCancel();
    RemoveHold();
  }
  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.pop_front();
    writing_ = false;
    if (!ok) {
      closed_ = true;
      queue_.clear();
      return;
    }
    if (!queue_.empty()) {
      writing_ = true;
      StartWrite(&queue_.front());
    }
  }
  void OnReadDone(bool ok) override;
  void OnDone(const grpc::Status& status) override;

 private:
  Bench* const bench_;
  LightAgent* const agent_;
  grpc::ClientContext context_;
  v1::CoordinatorMessage in_;
  std::mutex mu_;
  std::deque<v1::AgentMessage> queue_;  // front() is in flight while writing_
  bool writing_ = false;
  bool closed_ = false;
  bool released_ = false;
};

struct UploadJob {
  LightAgent* agent = nullptr;
  v1::RoundTask task;
  std::shared_ptr<const std::string> payload;  // sealed
  std::string sha256;
  int attempt = 1;
};

class UploadCall final : public grpc::ClientWriteReactor<v1::UpdateChunk> {
 public:
  UploadCall(Bench* bench, UploadJob job) : bench_(bench), job_(std::move(job)) {}
  void Start() {
    context_.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(10));
    job_.agent->stub->async()->SubmitUpdate(&context_, &response_, this);
    Next();
    StartCall();
  }
  void OnWriteDone(bool ok) override {
    if (!ok) return;  // the server ended the call; OnDone says why
    offset_ += last_;
    Next();
  }
  void OnDone(const grpc::Status& status) override;

 private:
  void Next() {
    const std::string& p = *job_.payload;
    if (offset_ >= p.size()) {
      StartWritesDone();
      return;
    }
    chunk_.Clear();
    if (offset_ == 0) {
      v1::UpdateHeader* h = chunk_.mutable_header();
      h->set_round_id(job_.task.round_id());
      h->set_agent_id(job_.agent->id);
      h->set_base_model_hash(base_hash());
      h->set_base_version(job_.task.base_version());
      h->set_num_examples(100 + static_cast<uint64_t>(job_.agent->index % 50));
      h->set_total_size(p.size());
      h->set_payload_sha256(job_.sha256);
      h->mutable_metrics()->set_train_loss(2.0);
      h->mutable_metrics()->set_eval_loss_before(2.5);
      h->mutable_metrics()->set_train_tokens(1000);
      h->mutable_metrics()->set_train_seconds(1.0);
    }
    last_ = std::min(kChunkBytes, p.size() - offset_);
    chunk_.set_offset(offset_);
    chunk_.set_data(p.data() + offset_, last_);
    chunk_.set_chunk_sha256(common::Sha256Hex(chunk_.data()));
    StartWrite(&chunk_);
  }
  const std::string& base_hash() const;

  Bench* const bench_;
  UploadJob job_;
  grpc::ClientContext context_;
  v1::SubmitUpdateResponse response_;
  v1::UpdateChunk chunk_;
  size_t offset_ = 0;
  size_t last_ = 0;
};

struct RoundTrack {
  std::optional<Clock::time_point> first_task;
  Clock::time_point last_notice;
  int notices = 0;
  int accepted = 0;
  uint64_t bytes = 0;
};

class Bench {
 public:
  Bench(const CoordinatorBenchOptions& o, std::vector<TensorSpec> layout, std::string base_hash)
      : o_(o), layout_(std::move(layout)), base_hash_(std::move(base_hash)),
        pool_(static_cast<size_t>(std::max(1, o.prepare_threads))) {}
  ~Bench() { pool_.join(); }

  const std::string& base_hash() const { return base_hash_; }

  absl::Status Connect(const std::string& target, const std::string& pki) {
    for (int i = 0; i < o_.agents; ++i) {
      auto a = std::make_unique<LightAgent>();
      a->index = i;
      a->id = absl::StrFormat("bench-agent-%05d", i);
      ASSIGN_OR_RETURN(auto creds, common::MakeChannelCredentials(
                                       {pki + "/ca.pem", pki + "/" + a->id + ".pem",
                                        pki + "/" + a->id + ".key"}));
      grpc::ChannelArguments args;
      args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // one connection per agent
      a->stub = v1::Coordinator::NewStub(grpc::CreateCustomChannel(target, creds, args));
      agents_.push_back(std::move(a));
    }
    for (auto& a : agents_) {
      sessions_.push_back(std::make_unique<SessionCall>(this, a.get()));
      a->session = sessions_.back().get();
      a->session->Start(base_hash_, std::chrono::seconds(o_.timeout_s + 300));
    }
    return absl::OkStatus();
  }

  // Waits until `pred` holds (checked under mu_), a failure, or `deadline`.
  bool WaitUntil(Clock::time_point deadline, const std::function<bool()>& pred) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_until(lock, deadline, [&]() { return pred() || !error_.empty(); });
    return pred();
  }
  int welcomed() const { return welcomed_; }
  std::string error() {
    std::lock_guard<std::mutex> lock(mu_);
    return error_;
  }
  RoundTrack Round(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    return rounds_[id];
  }
  std::map<uint64_t, RoundTrack>& rounds_locked() { return rounds_; }
  std::mutex& mu() { return mu_; }

  void StartHeartbeats() {
    heartbeat_thread_ = std::thread([this]() {
      boost::asio::steady_timer timer(io_);
      std::function<void()> arm = [&]() {
        timer.expires_after(std::chrono::milliseconds(heartbeat_ms_.load()));
        timer.async_wait([&](const boost::system::error_code& ec) {
          if (ec || stopping_) return;
          v1::AgentMessage hb;
          hb.mutable_heartbeat()->set_unix_ms(static_cast<uint64_t>(
              std::chrono::duration_cast<std::chrono::milliseconds>(
                  std::chrono::system_clock::now().time_since_epoch())
                  .count()));
          for (auto& a : agents_) a->session->Write(hb);
          arm();
        });
      };
      arm();
      io_.run();
    });
  }

  // Sends the EvalReports held back for the last round, then lets sessions end.
  void ReleaseFinalEvals() {
    std::vector<std::pair<LightAgent*, v1::AgentMessage>> evals;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
      evals.swap(held_evals_);
    }
    for (auto& [a, m] : evals) a->session->Write(m);
  }

  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
      pending_.clear();
    }
    io_.stop();
    if (heartbeat_thread_.joinable()) heartbeat_thread_.join();
    for (auto& s : sessions_) s->Close();
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, std::chrono::seconds(120), [&]() {
      return sessions_done_ == static_cast<int>(sessions_.size()) && active_ == 0 &&
             uploads_running_ == 0;
    });
  }

  // ---- reactions (gRPC threads; never block)
  void OnMessage(LightAgent* a, const v1::CoordinatorMessage& m) {
    switch (m.kind_case()) {
      case v1::CoordinatorMessage::kWelcome: {
        if (m.welcome().heartbeat_interval_ms() > 0) {
          heartbeat_ms_ = m.welcome().heartbeat_interval_ms();
        }
        std::lock_guard<std::mutex> lock(mu_);
        ++welcomed_;
        cv_.notify_all();
        return;
      }
      case v1::CoordinatorMessage::kRoundTask: {
        std::lock_guard<std::mutex> lock(mu_);
        RoundTrack& r = rounds_[m.round_task().round_id()];
        if (!r.first_task) r.first_task = Clock::now();
        if (stopping_) return;
        if (active_ < o_.client_uploads) {
          ++active_;
          PostPrepare(a, m.round_task());
        } else {
          pending_.emplace_back(a, m.round_task());
        }
        return;
      }
      case v1::CoordinatorMessage::kVersionNotice: {
        const v1::VersionNotice& n = m.version_notice();
        v1::AgentMessage eval;
        eval.mutable_eval_report()->set_version_id(n.version_id());
        eval.mutable_eval_report()->set_eval_loss(2.0 + 0.001 * (a->index % 100));
        eval.mutable_eval_report()->set_eval_tokens(500);
        bool hold;
        {
          std::lock_guard<std::mutex> lock(mu_);
          RoundTrack& r = rounds_[n.round_id()];
          ++r.notices;
          r.last_notice = Clock::now();
          hold = static_cast<int>(n.round_id()) >= o_.rounds && !stopping_;
          if (hold) held_evals_.emplace_back(a, eval);
          cv_.notify_all();
        }
        if (!hold) a->session->Write(eval);
        return;
      }
      default:
        return;
    }
  }

  void OnSessionDone(LightAgent* a, const grpc::Status& status) {
    std::lock_guard<std::mutex> lock(mu_);
    ++sessions_done_;
    if (!stopping_ && error_.empty()) {
      error_ = absl::StrCat("the session of ", a->id, " ended: ", status.error_code(), " ",
                            status.error_message());
    }
    cv_.notify_all();
  }

  void OnUploadDone(UploadJob job, const grpc::Status& status,
                    const v1::SubmitUpdateResponse& response) {
    const bool ok = status.ok() && response.accepted();
    const bool already =
        job.attempt > 1 && status.error_code() == grpc::StatusCode::ALREADY_EXISTS;
    const bool retry = !ok && !already && job.attempt < kSubmitAttempts &&
                       (status.error_code() == grpc::StatusCode::UNAVAILABLE ||
                        status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED);
    {
      std::lock_guard<std::mutex> lock(mu_);
      --uploads_running_;
      if (ok || already) {
        RoundTrack& r = rounds_[job.task.round_id()];
        ++r.accepted;
        r.bytes += job.payload->size();
      } else if (!retry && !stopping_ && error_.empty()) {
        error_ = absl::StrCat("the update of ", job.agent->id, " for round ",
                              job.task.round_id(), " was not accepted: ", status.error_code(),
                              " ", status.error_message(), " ", response.message());
      }
      cv_.notify_all();
    }
    if (retry && !stopping_) {
      ++job.attempt;
      StartUpload(std::move(job));  // keeps its client slot
      return;
    }
    ReleaseClientSlot();
  }

  uint64_t update_bytes_each() const { return update_bytes_each_.load(); }

 private:
  void PostPrepare(LightAgent* a, v1::RoundTask task) {  // requires mu_
    boost::asio::post(pool_, [this, a, task = std::move(task)]() { Prepare(a, task); });
  }

  void Prepare(LightAgent* a, const v1::RoundTask& task) {
    if (stopping_) {
      ReleaseClientSlot();
      return;
    }
    std::string plain;
    {
      common::TensorMap tensors;
      uint64_t s = o_.seed * 0x100000001b3ULL + static_cast<uint64_t>(a->index) * 1000003ULL +
                   task.round_id();
      for (const TensorSpec& spec : layout_) {
        common::HostTensor& t = tensors[spec.name];
        t.shape = spec.shape;
        t.data.resize(static_cast<size_t>(spec.shape[0] * spec.shape[1]));
        for (float& v : t.data) {
          v = static_cast<float>(UniformUnit(s) * 0.02 - 0.01);
        }
      }
      plain = common::SerializeSafetensors(tensors);
    }
    const std::string aad =
        edge::UpdateAad(task.round_id(), a->id, base_hash_, task.base_version());
    auto sealed = common::SealToPublicKey(task.seal_public_key(), plain, aad);
    plain.clear();
    plain.shrink_to_fit();
    if (!sealed.ok()) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (error_.empty()) error_ = absl::StrCat("sealing failed: ", sealed.status().ToString());
        cv_.notify_all();
      }
      ReleaseClientSlot();
      return;
    }
    UploadJob job;
    job.agent = a;
    job.task = task;
    job.sha256 = common::Sha256Hex(*sealed);
    update_bytes_each_ = sealed->size();
    job.payload = std::make_shared<const std::string>(std::move(*sealed));
    StartUpload(std::move(job));
  }

  void StartUpload(UploadJob job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++uploads_running_;
    }
    (new UploadCall(this, std::move(job)))->Start();  // deletes itself in OnDone
  }

  void ReleaseClientSlot() {
    std::lock_guard<std::mutex> lock(mu_);
    --active_;
    if (!pending_.empty() && !stopping_) {
      auto [a, task] = std::move(pending_.front());
      pending_.pop_front();
      ++active_;
      PostPrepare(a, std::move(task));
    }
    cv_.notify_all();
  }

  const CoordinatorBenchOptions o_;
  const std::vector<TensorSpec> layout_;
  const std::string base_hash_;
  boost::asio::thread_pool pool_;
  boost::asio::io_context io_;
  std::thread heartbeat_thread_;
  std::atomic<uint32_t> heartbeat_ms_{10000};
  std::atomic<uint64_t> update_bytes_each_{0};
  std::vector<std::unique_ptr<LightAgent>> agents_;
  std::vector<std::unique_ptr<SessionCall>> sessions_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<bool> stopping_{false};
  int welcomed_ = 0;
  int sessions_done_ = 0;
  int active_ = 0;  // client slots taken (preparing or uploading)
  int uploads_running_ = 0;
  std::deque<std::pair<LightAgent*, v1::RoundTask>> pending_;
  std::map<uint64_t, RoundTrack> rounds_;
  std::vector<std::pair<LightAgent*, v1::AgentMessage>> held_evals_;
  std::string error_;
};

void SessionCall::Start(const std::string& base_hash, Clock::duration deadline) {
  context_.set_deadline(std::chrono::system_clock::now() +
                        std::chrono::duration_cast<std::chrono::system_clock::duration>(deadline));
  agent_->stub->async()->Session(&context_, this);
  AddHold();  // writes come from other threads (heartbeats, the bench)
  v1::AgentMessage hello;
  hello.mutable_hello()->set_agent_id(agent_->id);
  hello.mutable_hello()->set_base_model_hash(base_hash);
  hello.mutable_hello()->set_agent_version("fedlora-sim-bench/0.1.0");
  hello.mutable_hello()->set_num_train_examples(100 + static_cast<uint64_t>(agent_->index % 50));
  Write(hello);
  StartRead(&in_);
  StartCall();
}

void SessionCall::OnReadDone(bool ok) {
  if (!ok) return;  // OnDone follows
  bench_->OnMessage(agent_, in_);
  StartRead(&in_);
}

void SessionCall::OnDone(const grpc::Status& status) { bench_->OnSessionDone(agent_, status); }

void UploadCall::OnDone(const grpc::Status& status) {
  bench_->OnUploadDone(std::move(job_), status, response_);
  delete this;
}

const std::string& UploadCall::base_hash() const { return bench_->base_hash(); }

std::string DefaultCoordinatorBin() {
  std::error_code ec;
  auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return "fedlora-coordinator";
  return (self.parent_path() / "fedlora-coordinator").string();
}

}  // namespace

absl::StatusOr<CoordinatorBenchResult> RunCoordinatorBench(const CoordinatorBenchOptions& o) {
  auto bad = [](const std::string& field, const std::string& expected, const std::string& found) {
    return absl::InvalidArgumentError(
        absl::StrCat("bench coordinator: ", field, ": expected ", expected, ", found ", found));
  };
  if (o.agents < 1 || o.agents > 20000) return bad("agents", "1..20000", std::to_string(o.agents));
  if (o.rank < 1 || o.rank > 256) return bad("rank", "1..256", std::to_string(o.rank));
  if (o.params < 2 * o.rank) {
    return bad("params", absl::StrCat(">= 2 x rank (", 2 * o.rank, ")"), std::to_string(o.params));
  }
  if (o.rounds < 1) return bad("rounds", ">= 1", std::to_string(o.rounds));
  if (o.secure_aggregation != "off") {
    return bad("secure_aggregation",
               "off (sealed FedAvg; secure aggregation has its own bench: bench secagg)",
               "'" + o.secure_aggregation + "'");
  }
  if (o.max_concurrent_uploads < 1) {
    return bad("max_concurrent_uploads", ">= 1", std::to_string(o.max_concurrent_uploads));
  }
  if (o.worker_threads < 1) return bad("worker_threads", ">= 1", std::to_string(o.worker_threads));
  if (o.client_uploads < 1) return bad("client_uploads", ">= 1", std::to_string(o.client_uploads));
  if (o.timeout_s < 1) return bad("timeout_s", ">= 1", std::to_string(o.timeout_s));

  CoordinatorBenchResult result;
  result.options = o;
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::seconds(o.timeout_s);
  const std::vector<TensorSpec> layout = MakeLayout(o.params, o.rank, &result.params_actual);
  result.tensors = static_cast<int>(layout.size());
  result.updates_expected = static_cast<uint64_t>(o.agents) * static_cast<uint64_t>(o.rounds);

  // Work directory and PKI.
  std::string dir = o.work_dir;
  const bool own_dir = dir.empty();
  if (own_dir) {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern =
        std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/fedlora-bench-coord-XXXXXX";
    if (mkdtemp(pattern.data()) == nullptr) {
      return absl::InternalError(absl::StrCat("mkdtemp ", pattern, ": ", std::strerror(errno)));
    }
    dir = pattern;
  }
  struct Cleanup {
    std::string dir;
    bool own;
    ~Cleanup() {
      std::error_code ec;
      if (own) std::filesystem::remove_all(dir, ec);
    }
  } cleanup{dir, own_dir};
  const std::string pki = dir + "/pki";
  RETURN_IF_ERROR(common::InitPki(pki));
  for (int i = 0; i < o.agents; ++i) {
    RETURN_IF_ERROR(common::IssueCertificate(pki, absl::StrFormat("bench-agent-%05d", i),
                                             common::CertRole::kAgent, pki));
  }
  const std::string base_hash = common::Sha256Hex("fedlora bench coordinator base model");

  // The coordinator.
  const std::string bin = o.coordinator_bin.empty() ? DefaultCoordinatorBin() : o.coordinator_bin;
  const std::string log = dir + "/coordinator.log";
  const std::string out = dir + "/coordinator.out";
  std::vector<std::string> argv = {
      bin, "--listen-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0",
      "--data-dir", dir + "/data", "--tls-ca", pki + "/ca.pem", "--tls-cert",
      pki + "/coordinator.pem", "--tls-key", pki + "/coordinator.key", "--base-model-hash",
      base_hash, "--min-participants", std::to_string(o.agents), "--max-participants",
      std::to_string(o.agents), "--rounds", std::to_string(o.rounds), "--secure-aggregation",
      "off", "--max-concurrent-uploads", std::to_string(o.max_concurrent_uploads),
      "--worker-threads", std::to_string(o.worker_threads), "--lora-rank", std::to_string(o.rank),
      "--lora-target-modules", "q_proj,v_proj", "--round-deadline-s",
      std::to_string(o.timeout_s + 60), "--eval-grace-s", std::to_string(o.timeout_s + 60),
      "--tick-ms", "50", "--log-format", "json", "--log-level", "info"};
  Child coordinator;
  RETURN_IF_ERROR(coordinator.Start(argv, out, log));
  int port = 0, metrics_port = 0;
  while (port == 0 || metrics_port == 0) {
    if (coordinator.Wait(std::chrono::milliseconds(20))) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the coordinator exited with code ", coordinator.exit_code(), " at start:\n", Tail(log)));
    }
    if (Clock::now() > start + std::chrono::seconds(120) || Clock::now() > deadline) {
      return absl::DeadlineExceededError("the coordinator did not start listening:\n" + Tail(log));
    }
    std::ifstream in(log);
    std::string line;
    while (std::getline(in, line)) {
      auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (!j.is_object() || !j.contains("msg") || !j.contains("port") || !j["port"].is_string()) {
        continue;
      }
      const int p = std::atoi(j["port"].get<std::string>().c_str());
      if (j["msg"] == "coordinator listening") port = p;
      if (j["msg"] == "metrics listening") metrics_port = p;
    }
  }
  result.coordinator_start_rss_bytes = ProcStatusBytes(coordinator.pid(), "VmRSS");
  result.setup_s = Seconds(start, Clock::now());

  Bench bench(o, layout, base_hash);
  std::map<std::string, double> metrics;
  auto scrape = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(std::string text, HttpGet(metrics_port, "/metrics"));
    metrics = ParseMetrics(text);
    return absl::OkStatus();
  };
  auto finish_early = [&](const std::string& why) {
    if (result.error.empty()) result.error = why;
  };

  const auto connect_start = Clock::now();
  RETURN_IF_ERROR(bench.Connect("127.0.0.1:" + std::to_string(port), pki));
  bench.StartHeartbeats();
  if (!bench.WaitUntil(deadline, [&]() { return bench.welcomed() >= o.agents; })) {
    finish_early(bench.error().empty()
                     ? absl::StrCat("only ", bench.welcomed(), " of ", o.agents,
                                    " sessions were welcomed before the timeout")
                     : bench.error());
  } else {
    result.connect_s = Seconds(connect_start, Clock::now());
  }

  double phase_train = 0, phase_aggregate = 0;
  for (int k = 1; k <= o.rounds && result.error.empty(); ++k) {
    const uint64_t id = static_cast<uint64_t>(k);
    if (!bench.WaitUntil(deadline, [&]() { return bench.rounds_locked()[id].notices >= o.agents; })) {
      finish_early(bench.error().empty() ? absl::StrCat("round ", k, " did not complete before the "
                                                        "timeout")
                                         : bench.error());
      break;
    }
    if (absl::Status s = scrape(); !s.ok()) {
      finish_early(s.ToString());
      break;
    }
    RoundTrack t = bench.Round(id);
    CoordinatorBenchRound r;
    r.round_id = id;
    r.wall_s = t.first_task ? Seconds(*t.first_task, t.last_notice) : 0;
    const double train = Get(metrics, "fedlora_round_phase_seconds_sum{phase=\"train\"}");
    const double aggregate = Get(metrics, "fedlora_round_phase_seconds_sum{phase=\"aggregate\"}");
    r.collect_s = train - phase_train;
    r.aggregate_s = aggregate - phase_aggregate;
    phase_train = train;
    phase_aggregate = aggregate;
    r.update_bytes = t.bytes;
    r.updates_accepted = t.accepted;
    result.rounds.push_back(r);
    result.rounds_completed = k;
  }
  if (!metrics.empty()) {
    result.updates_accepted = static_cast<uint64_t>(Get(metrics, "fedlora_updates_accepted_total"));
    result.updates_rejected =
        static_cast<uint64_t>(SumPrefix(metrics, "fedlora_updates_rejected_total"));
    result.uploads_in_flight_peak = Get(metrics, "fedlora_uploads_in_flight_peak");
    result.uploads_waiting_peak = Get(metrics, "fedlora_uploads_waiting_peak");
  }
  result.updates_lost = result.updates_expected > result.updates_accepted
                            ? result.updates_expected - result.updates_accepted
                            : 0;
  result.update_bytes_each = bench.update_bytes_each();

  // VmHWM of the coordinator's own image. (wait4's ru_maxrss would not do: the
  // child starts as a vfork of this process and exec folds our RSS into it.)
  result.coordinator_peak_rss_bytes = ProcStatusBytes(coordinator.pid(), "VmHWM");
  // The last round's evaluations let the coordinator finish (--rounds) and exit.
  bench.ReleaseFinalEvals();
  if (result.error.empty()) {
    if (!coordinator.Wait(std::chrono::seconds(120))) {
      finish_early("the coordinator did not exit after the last round was evaluated");
    }
  }
  if (!coordinator.exited()) {
    coordinator.Signal(SIGTERM);
    if (!coordinator.Wait(std::chrono::seconds(60))) {
      coordinator.Signal(SIGKILL);
      coordinator.Wait(std::chrono::seconds(30));
    }
  }
  bench.Stop();
  result.coordinator_exit_code = coordinator.exit_code();
  struct rusage self {};
  getrusage(RUSAGE_SELF, &self);
  result.bench_peak_rss_bytes = static_cast<uint64_t>(self.ru_maxrss) * 1024;
  if (!result.error.empty()) result.error += "\ncoordinator log tail:\n" + Tail(log);
  return result;
}

namespace {

nlohmann::ordered_json Rate(double bytes, double seconds) {
  if (!(seconds > 0)) return nullptr;
  return bytes / seconds;
}

}  // namespace

std::string CoordinatorBenchRoundJson(const CoordinatorBenchResult& res,
                                      const CoordinatorBenchRound& r) {
  nlohmann::ordered_json j;
  j["bench"] = "coordinator";
  j["round"] = r.round_id;
  j["agents"] = res.options.agents;
  j["params"] = res.params_actual;
  j["round_wall_s"] = r.wall_s;
  j["collect_s"] = r.collect_s;
  j["aggregate_s"] = r.aggregate_s;
  j["update_bytes"] = r.update_bytes;
  j["aggregation_bytes_per_s"] = Rate(static_cast<double>(r.update_bytes), r.aggregate_s);
  j["updates_accepted"] = r.updates_accepted;
  return j.dump();
}

std::string CoordinatorBenchSummaryJson(const CoordinatorBenchResult& res) {
  const CoordinatorBenchOptions& o = res.options;
  double wall = 0, bytes = 0, agg = 0;
  for (const CoordinatorBenchRound& r : res.rounds) {
    wall += r.wall_s;
    bytes += static_cast<double>(r.update_bytes);
    agg += r.aggregate_s;
  }
  nlohmann::ordered_json j;
  j["bench"] = "coordinator";
  j["summary"] = true;
  j["agents"] = o.agents;
  j["params"] = res.params_actual;
  j["rank"] = o.rank;
  j["tensors"] = res.tensors;
  j["secure_aggregation"] = o.secure_aggregation;
  j["rounds"] = o.rounds;
  j["rounds_completed"] = res.rounds_completed;
  j["max_concurrent_uploads"] = o.max_concurrent_uploads;
  j["worker_threads"] = o.worker_threads;
  j["client_uploads"] = o.client_uploads;
  j["update_bytes_each"] = res.update_bytes_each;
  j["round_wall_s_mean"] =
      res.rounds.empty() ? nlohmann::ordered_json(nullptr)
                         : nlohmann::ordered_json(wall / static_cast<double>(res.rounds.size()));
  j["aggregation_bytes_per_s"] = Rate(bytes, agg);
  j["coordinator_peak_rss_bytes"] = res.coordinator_peak_rss_bytes;
  j["coordinator_start_rss_bytes"] = res.coordinator_start_rss_bytes;
  j["bench_peak_rss_bytes"] = res.bench_peak_rss_bytes;
  j["uploads_in_flight_peak"] = res.uploads_in_flight_peak;
  j["uploads_waiting_peak"] = res.uploads_waiting_peak;
  j["updates_expected"] = res.updates_expected;
  j["updates_accepted"] = res.updates_accepted;
  j["updates_rejected"] = res.updates_rejected;
  j["updates_lost"] = res.updates_lost;
  j["setup_s"] = res.setup_s;
  j["connect_s"] = res.connect_s;
  j["coordinator_exit_code"] = res.coordinator_exit_code;
  j["error"] = res.error;
  return j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

}  // namespace fedlora::sim
