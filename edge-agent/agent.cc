#include "edge-agent/agent.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <deque>
#include <sys/stat.h>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/crypto/crypto.h"
#include "common/crypto/pki.h"
#include "common/quant/quant.h"
#include "common/status/status.h"
#include "fedlora/v1/fedlora.grpc.pb.h"

namespace fedlora::edge {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

uint64_t UnixMillis() {
  return static_cast<uint64_t>(std::chrono::duration_cast<milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

std::chrono::system_clock::time_point DeadlineIn(milliseconds d) {
  return std::chrono::system_clock::now() + d;
}

absl::Status FromGrpc(const grpc::Status& s, const std::string& context) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat(context, ": ", s.error_message()));
}

// Codes with which the coordinator refuses an agent for good: retrying the
// same Hello would only be refused again.
bool IsFatalSessionCode(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kUnimplemented:
    case absl::StatusCode::kUnauthenticated:
      return true;
    default:
      return false;
  }
}

// Codes after which a bulk call (FetchAdapter / SubmitUpdate) may succeed on
// a new attempt: the connection or the server broke, not the request.
bool IsTransientCode(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kCancelled:
      return true;
    default:
      return false;
  }
}

LoraConfig LoraFromSpec(const v1::LoraSpec& spec) {
  LoraConfig config;
  if (spec.rank() > 0) config.rank = static_cast<int>(spec.rank());
  if (spec.alpha() > 0) config.alpha = spec.alpha();
  if (spec.target_modules_size() > 0) {
    config.target_modules.assign(spec.target_modules().begin(), spec.target_modules().end());
  }
  config.init_seed = spec.init_seed();
  return config;
}

}  // namespace

std::string UpdateAad(uint64_t round_id, const std::string& agent_id,
                      const std::string& base_model_hash, const std::string& base_version) {
  return absl::StrCat("fedlora-update-v1|", round_id, "|", agent_id, "|", base_model_hash, "|",
                      base_version);
}

LoraConfig InferLoraConfig(const common::TensorMap& tensors, const common::Metadata& metadata,
                           const LoraConfig& fallback) {
  LoraConfig config = fallback;
  std::vector<std::string> modules;
  int rank = 0;
  for (const auto& [name, tensor] : tensors) {
    // ...<module>.lora_A.weight [r, in]
    static constexpr std::string_view kSuffix = ".lora_A.weight";
    if (name.size() <= kSuffix.size() ||
        name.compare(name.size() - kSuffix.size(), kSuffix.size(), kSuffix) != 0) {
      continue;
    }
    std::string_view stem(name.data(), name.size() - kSuffix.size());
    size_t dot = stem.rfind('.');
    std::string module(dot == std::string_view::npos ? stem : stem.substr(dot + 1));
    if (std::find(modules.begin(), modules.end(), module) == modules.end()) {
      modules.push_back(module);
    }
    if (rank == 0 && tensor.shape.size() == 2) rank = static_cast<int>(tensor.shape[0]);
  }
  if (rank > 0) config.rank = rank;
  if (!modules.empty()) config.target_modules = modules;
  if (auto it = metadata.find("fedlora.lora.alpha"); it != metadata.end()) {
    float alpha = 0;
    if (absl::SimpleAtof(it->second, &alpha) && alpha > 0) config.alpha = alpha;
  }
  return config;
}

// ---------------------------------------------------------------- Session

struct Agent::Session {
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReaderWriter<v1::AgentMessage, v1::CoordinatorMessage>> stream;

  std::mutex write_mu;  // one writer at a time
  bool writes_ok = true;

  std::mutex mu;  // guards the fields below
  std::condition_variable cv;
  std::deque<v1::CoordinatorMessage> inbox;
  bool ended = false;    // the reader saw the end of the stream
  bool closing = false;  // the heartbeat thread must stop

  bool Write(const v1::AgentMessage& message) {
    std::lock_guard<std::mutex> lock(write_mu);
    if (!writes_ok) return false;
    writes_ok = stream->Write(message);
    return writes_ok;
  }
};

// ---------------------------------------------------------------- Agent

absl::StatusOr<std::unique_ptr<Agent>> Agent::Create(AgentOptions options, LocalTrainer* trainer) {
  if (trainer == nullptr) return absl::InvalidArgumentError("Agent::Create: trainer is null");
  if (options.coordinator.empty()) {
    return absl::InvalidArgumentError("Agent::Create: coordinator address (host:port) is empty");
  }
  if (options.max_seq_len <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Agent::Create: max_seq_len must be > 0, got ", options.max_seq_len));
  }
  ASSIGN_OR_RETURN(std::string cert_pem, common::ReadFileToString(options.tls.cert));
  auto identity = common::ReadCertIdentity(cert_pem);
  if (!identity.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("agent certificate ", options.tls.cert,
                                                   ": ", identity.status().message()));
  }
  if (identity->common_name.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("agent certificate ", options.tls.cert, " has no CN (the agent id)"));
  }
  if (identity->role != "agent") {
    return absl::InvalidArgumentError(absl::StrCat("agent certificate ", options.tls.cert,
                                                   " has role (OU) '", identity->role,
                                                   "', expected 'agent'"));
  }
  ASSIGN_OR_RETURN(auto creds, common::MakeChannelCredentials(options.tls));
  grpc::ChannelArguments args;
  // Reconnect quickly once the coordinator is back (gRPC's default backoff grows to 120 s).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 250);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 5000);
  args.SetMaxReceiveMessageSize(16 << 20);
  if (!options.tls_server_name.empty()) {
    args.SetSslTargetNameOverride(options.tls_server_name);
  }
  auto channel = options.channel_interceptors
                     ? grpc::experimental::CreateCustomChannelWithInterceptors(
                           options.coordinator, creds, args, options.channel_interceptors())
                     : grpc::CreateCustomChannel(options.coordinator, creds, args);
  std::string agent_id = identity->common_name;
  std::string signing_pub = options.signing_public_key;
  bool explicit_key = !signing_pub.empty();
  if (!explicit_key) {
    const size_t slash = options.tls.ca_cert.rfind('/');
    const std::string dir =
        slash == std::string::npos ? "." : options.tls.ca_cert.substr(0, slash);
    struct stat st;
    if (::stat((dir + "/coordinator-signing.pub").c_str(), &st) == 0) {
      signing_pub = dir + "/coordinator-signing.pub";
    }
  }
  std::optional<common::VerifyKey> signing_key;
  if (!signing_pub.empty()) {
    auto key = common::VerifyKey::LoadFile(signing_pub);
    if (!key.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "coordinator signing public key", explicit_key ? "" : " (found beside the CA file)",
          ": ", key.status().message()));
    }
    signing_key = std::move(*key);
  }
  std::unique_ptr<Agent> agent(
      new Agent(std::move(options), trainer, std::move(agent_id), std::move(channel)));
  agent->signing_key_ = std::move(signing_key);
  if (agent->signing_key_.has_value()) {
    agent->Log(absl::StrCat("adapter signatures required: coordinator signing key id ",
                            agent->signing_key_->key_id(), " (", signing_pub, ")"));
  } else {
    agent->Log(
        "WARNING: no coordinator signing public key (--signing-pub, or coordinator-signing.pub "
        "beside the CA file): adapter versions are checked by SHA-256 only, not by signature");
  }
  return agent;
}

Agent::Agent(AgentOptions options, LocalTrainer* trainer, std::string agent_id,
             std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      trainer_(trainer),
      agent_id_(std::move(agent_id)),
      channel_(std::move(channel)) {
  base_model_hash_ = trainer_->BaseModelHash();
  rng_state_ = options_.seed ^ 0x9E3779B97F4A7C15ull ^ std::hash<std::string>()(agent_id_);
  if (rng_state_ == 0) rng_state_ = 1;
}

Agent::~Agent() = default;

AgentStats Agent::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void Agent::Stop() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!stop_) Log("stop requested");
  stop_ = true;
  for (grpc::ClientContext* ctx : calls_) ctx->TryCancel();
  stop_cv_.notify_all();
}

void Agent::RegisterCall(grpc::ClientContext* ctx) {
  std::lock_guard<std::mutex> lock(mu_);
  calls_.insert(ctx);
  if (stop_) ctx->TryCancel();
}

void Agent::UnregisterCall(grpc::ClientContext* ctx) {
  std::lock_guard<std::mutex> lock(mu_);
  calls_.erase(ctx);
}

bool Agent::SleepUnlessStopped(milliseconds d) {
  // While waiting, keep asking the channel to connect and poll it. With the
  // sync API nothing else drives a reconnection: calls fail fast while the
  // channel is in TRANSIENT_FAILURE, so without this a TLS handshake to a
  // restarted coordinator would stall until it times out.
  const Clock::time_point end = Clock::now() + d;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (stop_) return false;
    }
    Clock::time_point now = Clock::now();
    if (now >= end) return true;
    milliseconds slice =
        std::min(std::chrono::duration_cast<milliseconds>(end - now) + milliseconds(1),
                 milliseconds(100));
    if (channel_->GetState(/*try_to_connect=*/true) != GRPC_CHANNEL_READY &&
        !channel_->WaitForConnected(std::chrono::system_clock::now() + slice)) {
      continue;  // still connecting; the slice passed while polling
    }
    std::unique_lock<std::mutex> lock(mu_);
    stop_cv_.wait_for(lock, slice, [this] { return stop_; });
  }
}

milliseconds Agent::Backoff(int failures) {
  // Exponential with jitter in [50%, 100%] (xorshift64; Run()'s thread only).
  double base = static_cast<double>(options_.backoff_initial.count()) *
                std::pow(2.0, std::max(0, std::min(failures, 20) - 1));
  base = std::min(base, static_cast<double>(options_.backoff_max.count()));
  rng_state_ ^= rng_state_ << 13;
  rng_state_ ^= rng_state_ >> 7;
  rng_state_ ^= rng_state_ << 17;
  double jitter = 0.5 + 0.5 * static_cast<double>(rng_state_ % 1000) / 1000.0;
  return milliseconds(static_cast<int64_t>(base * jitter) + 1);
}

void Agent::NoteError(const std::string& message) {
  Log(message);
  std::lock_guard<std::mutex> lock(mu_);
  stats_.last_error = message;
}

absl::Status Agent::CountRefusal(absl::Status status) {
  // The count and the reason move together: a stats() snapshot never shows a refusal
  // without its reason.
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.adapters_refused;
  stats_.last_error = status.ToString();
  return status;
}

void Agent::Log(const std::string& message) const {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof(stamp), "%H:%M:%S", &tm);
  std::fprintf(stderr, "%s [agent %s] %s\n", stamp, agent_id_.c_str(), message.c_str());
}

absl::Status Agent::Run() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (ran_) return absl::FailedPreconditionError("Agent::Run may be called only once");
    ran_ = true;
  }
  Log(absl::StrFormat("starting: coordinator %s, base model %s, %d train / %d held-out examples",
                      options_.coordinator, base_model_hash_, options_.train.size(),
                      options_.eval.size()));
  Clock::time_point offline_since = Clock::now();
  int failures = 0;
  while (true) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) break;
    }
    if (options_.max_offline.count() > 0 && Clock::now() - offline_since > options_.max_offline) {
      Log(absl::StrFormat("coordinator unreachable for more than %d ms (--max-offline); exiting",
                          options_.max_offline.count()));
      break;
    }
    bool welcomed = false;
    absl::Status status = RunSession(&welcomed);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) break;
    }
    if (welcomed) {
      failures = 0;
      offline_since = Clock::now();
    } else {
      ++failures;
    }
    if (IsFatalSessionCode(status.code())) {
      NoteError(absl::StrCat("coordinator refused the session: ", status.ToString()));
      return status;
    }
    milliseconds delay = Backoff(std::max(failures, 1));
    if (failures <= 1 || failures % 10 == 0) {
      Log(absl::StrFormat("session %s (%s); reconnecting in %d ms",
                          welcomed ? "ended" : "failed", status.ToString(), delay.count()));
    }
    if (options_.max_offline.count() > 0) {
      auto left = std::chrono::duration_cast<milliseconds>(
          offline_since + options_.max_offline - Clock::now());
      delay = std::max(milliseconds(1), std::min(delay, left + milliseconds(1)));
    }
    if (!SleepUnlessStopped(delay)) break;
  }
  AgentStats s = stats();
  Log(absl::StrFormat("stopped: %d updates submitted, %d evals reported, %d bytes up, %d bytes down",
                      s.rounds_submitted, s.evals_reported, s.bytes_up, s.bytes_down));
  return absl::OkStatus();
}

absl::Status Agent::RunSession(bool* welcomed) {
  *welcomed = false;
  auto session = std::make_unique<Session>();
  Session* s = session.get();
  RegisterCall(&s->ctx);
  auto stub = v1::Coordinator::NewStub(channel_);
  s->stream = stub->Session(&s->ctx);

  std::thread reader([s] {
    v1::CoordinatorMessage message;
    while (s->stream->Read(&message)) {
      std::lock_guard<std::mutex> lock(s->mu);
      s->inbox.push_back(std::move(message));
      s->cv.notify_all();
      message.Clear();
    }
    std::lock_guard<std::mutex> lock(s->mu);
    s->ended = true;
    s->cv.notify_all();
  });

  v1::AgentMessage hello_message;
  v1::Hello* hello = hello_message.mutable_hello();
  hello->set_agent_id(agent_id_);
  hello->set_base_model_hash(base_model_hash_);
  hello->set_num_train_examples(options_.train.size());
  hello->set_current_version(cached_version_);
  hello->set_agent_version(kAgentSoftwareVersion);
  s->Write(hello_message);

  std::thread heartbeat;
  {
    std::unique_lock<std::mutex> lock(s->mu);
    bool got = s->cv.wait_for(lock, options_.hello_timeout,
                              [s] { return !s->inbox.empty() || s->ended; });
    if (!got) {
      lock.unlock();
      Log(absl::StrFormat("no Welcome within %d ms; closing the session",
                          options_.hello_timeout.count()));
      s->ctx.TryCancel();
    } else if (!s->inbox.empty()) {
      v1::CoordinatorMessage first = std::move(s->inbox.front());
      s->inbox.pop_front();
      lock.unlock();
      if (first.kind_case() != v1::CoordinatorMessage::kWelcome) {
        NoteError(absl::StrFormat("protocol error: expected Welcome as the first message, got "
                                  "message kind %d; closing the session",
                                  static_cast<int>(first.kind_case())));
        s->ctx.TryCancel();
      } else {
        const v1::Welcome& welcome = first.welcome();
        *welcomed = true;
        seal_public_key_ = welcome.seal_public_key();
        milliseconds interval(welcome.heartbeat_interval_ms() == 0
                                  ? 5000
                                  : std::max<uint32_t>(welcome.heartbeat_interval_ms(), 20));
        {
          std::lock_guard<std::mutex> stats_lock(mu_);
          ++stats_.sessions;
        }
        Log(absl::StrFormat("session open with coordinator '%s' (current version '%s', "
                            "heartbeat %d ms)",
                            welcome.coordinator_id(), welcome.current_version(),
                            interval.count()));
        heartbeat = std::thread([this, s, interval] {
          std::unique_lock<std::mutex> hb_lock(s->mu);
          while (!s->closing && !s->ended) {
            if (s->cv.wait_for(hb_lock, interval, [s] { return s->closing || s->ended; })) break;
            hb_lock.unlock();
            v1::AgentMessage beat;
            beat.mutable_heartbeat()->set_unix_ms(UnixMillis());
            bool ok = s->Write(beat);
            if (ok) {
              std::lock_guard<std::mutex> stats_lock(mu_);
              ++stats_.heartbeats_sent;
            }
            hb_lock.lock();
            if (!ok) break;
          }
        });
      }
    }
  }

  if (*welcomed) {
    while (true) {
      std::unique_lock<std::mutex> lock(s->mu);
      s->cv.wait(lock, [s] { return !s->inbox.empty() || s->ended; });
      if (s->inbox.empty()) break;
      v1::CoordinatorMessage message = std::move(s->inbox.front());
      s->inbox.pop_front();
      lock.unlock();
      {
        std::lock_guard<std::mutex> stop_lock(mu_);
        if (stop_) break;
      }
      switch (message.kind_case()) {
        case v1::CoordinatorMessage::kRoundTask:
          HandleRoundTask(message.round_task(), s);
          break;
        case v1::CoordinatorMessage::kVersionNotice:
          HandleVersionNotice(message.version_notice(), s);
          break;
        case v1::CoordinatorMessage::kSecaggSetup:
          HandleSecAggSetup(message.secagg_setup(), s);
          break;
        case v1::CoordinatorMessage::kSecagg:
          HandleSecAggMessage(message.secagg(), s);
          break;
        case v1::CoordinatorMessage::kWelcome:
          Log("ignoring a second Welcome on the same session");
          break;
        default:
          Log(absl::StrFormat("ignoring an unknown coordinator message (kind %d)",
                              static_cast<int>(message.kind_case())));
          break;
      }
    }
  }

  bool ended;
  {
    std::lock_guard<std::mutex> lock(s->mu);
    s->closing = true;
    ended = s->ended;
    s->cv.notify_all();
  }
  // We are closing (stop, protocol error): cancel first, so that a Write
  // blocked on flow control returns and the heartbeat thread can be joined.
  if (!ended) s->ctx.TryCancel();
  if (heartbeat.joinable()) heartbeat.join();
  reader.join();
  grpc::Status status = s->stream->Finish();
  UnregisterCall(&s->ctx);
  return FromGrpc(status, "Session");
}

void Agent::HandleRoundTask(const v1::RoundTask& task, Session* session) {
  const uint64_t round = task.round_id();
  Clock::time_point start = Clock::now();
  Log(absl::StrFormat("round %d: task (base version '%s', %d steps, lr %g, batch %d)", round,
                      task.base_version(), task.local_steps(), task.learning_rate(),
                      task.batch_size()));
  auto fail = [&](const absl::Status& status) {
    NoteError(absl::StrFormat("round %d: no update submitted: %s", round, status.ToString()));
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.rounds_failed;
  };
  if (options_.train.empty()) {
    return fail(absl::FailedPreconditionError("the training set is empty"));
  }
  if (secagg_ != nullptr && secagg_->round_id() == round) {
    Log(absl::StrFormat("round %d: already trained; re-sending SecAggReady", round));
    session->Write(secagg_->Ready());
    return;
  }
  if (task.local_steps() == 0 || task.batch_size() == 0) {
    return fail(absl::InvalidArgumentError(
        absl::StrFormat("RoundTask needs local_steps > 0 and batch_size > 0, got %d and %d",
                        task.local_steps(), task.batch_size())));
  }
  const std::string& seal_key =
      task.seal_public_key().empty() ? seal_public_key_ : task.seal_public_key();
  if (seal_key.size() != 32) {
    return fail(absl::InvalidArgumentError(absl::StrFormat(
        "seal public key must be 32 bytes (X25519), got %d bytes", seal_key.size())));
  }
  if (task.deadline_unix_ms() != 0 && UnixMillis() > task.deadline_unix_ms()) {
    return fail(absl::DeadlineExceededError("the round deadline passed before training began"));
  }
  LoraConfig lora = LoraFromSpec(task.lora());
  lora_ = lora;
  if (absl::Status s = ApplyVersion(task.base_version(), &lora, "", 0); !s.ok()) {
    return fail(s);
  }

  double eval_before = 0;
  if (!options_.eval.empty()) {
    auto eval = trainer_->Evaluate(options_.eval, options_.max_seq_len);
    if (!eval.ok()) return fail(eval.status());
    eval_before = eval->loss;
  }
  // Secure aggregation with DP needs the starting adapter (the update is after - before).
  common::TensorMap before;
  if (task.secagg().enabled()) {
    auto start = trainer_->GetAdapter();
    if (!start.ok()) return fail(start.status());
    before = std::move(*start);
  }

  TrainOptions train_options;
  train_options.steps = static_cast<int>(task.local_steps());
  train_options.learning_rate = task.learning_rate();
  train_options.batch_size = static_cast<int>(task.batch_size());
  train_options.max_seq_len = options_.max_seq_len;
  train_options.seed = options_.seed * 1000003ull + round;
  train_options.prox_mu = task.prox_mu();               // FedProx (0 = off)
  train_options.freeze_lora_a = task.freeze_lora_a();   // FFA-LoRA
  auto train = trainer_->Train(options_.train, train_options);
  if (!train.ok()) return fail(train.status());

  auto adapter = trainer_->GetAdapter();
  if (!adapter.ok()) return fail(adapter.status());
  if (task.secagg().enabled()) {
    v1::TrainMetrics metrics;
    metrics.set_train_loss(train->mean_loss);
    metrics.set_eval_loss_before(eval_before);
    metrics.set_train_tokens(train->tokens);
    metrics.set_train_seconds(train->seconds);
    auto created = SecAggClientRound::Create(task, std::move(before), std::move(*adapter),
                                             options_.train.size(), metrics);
    if (!created.ok()) return fail(created.status());
    secagg_ = std::move(*created);
    session->Write(secagg_->Ready());
    Log(absl::StrFormat("round %d: trained (loss %.4f, eval before %.4f); secure aggregation: "
                        "waiting for the coordinator's setup",
                        round, train->mean_loss, eval_before));
    return;
  }
  std::string plain = common::SerializeSafetensors(*adapter);
  std::string aad = UpdateAad(round, agent_id_, base_model_hash_, task.base_version());
  auto sealed = common::SealToPublicKey(seal_key, plain, aad);
  if (!sealed.ok()) return fail(sealed.status());
  if (task.max_update_bytes() != 0 && sealed->size() > task.max_update_bytes()) {
    return fail(absl::ResourceExhaustedError(
        absl::StrFormat("sealed update is %d bytes, the round allows at most %d", sealed->size(),
                        task.max_update_bytes())));
  }
  if (absl::Status s = SubmitUpdate(task, *sealed, *train, eval_before); !s.ok()) {
    return fail(s);
  }
  double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.rounds_submitted;
  }
  Log(absl::StrFormat(
      "round %d: update accepted: train loss %.4f (last %.4f), eval loss before %.4f, "
      "%d bytes sealed, %.1f s",
      round, train->mean_loss, train->last_loss, eval_before, sealed->size(), seconds));
}

void Agent::HandleSecAggSetup(const v1::SecAggSetup& setup, Session* session) {
  if (secagg_ == nullptr || secagg_->round_id() != setup.round_id()) {
    NoteError(absl::StrFormat("round %d: SecAggSetup for a round this agent did not train for",
                              setup.round_id()));
    return;
  }
  auto message = secagg_->OnSetup(setup);
  if (!message.ok()) {
    NoteError(absl::StrFormat("round %d: secure-aggregation setup refused: %s", setup.round_id(),
                              message.status().ToString()));
    return;
  }
  Log(absl::StrFormat("round %d: secure aggregation: party %d of %d, threshold %d",
                      setup.round_id(), setup.party_id(), setup.cohort_size(),
                      setup.threshold()));
  session->Write(*message);
}

void Agent::HandleSecAggMessage(const v1::SecAggMessage& message, Session* session) {
  const uint64_t round = message.round_id();
  if (secagg_ == nullptr || secagg_->round_id() != round) {
    NoteError(absl::StrFormat("round %d: a secure-aggregation message for a round this agent "
                              "is not in",
                              round));
    return;
  }
  auto out = secagg_->OnMessage(message);
  if (!out.ok()) {
    NoteError(absl::StrFormat("round %d: secure-aggregation message refused: %s", round,
                              out.status().ToString()));
    return;
  }
  if (out->message.has_value()) session->Write(*out->message);
  if (!out->masked_input.empty()) {
    TrainResult none;
    absl::Status s = SubmitUpdate(secagg_->task(), out->masked_input, none, 0, /*masked=*/true);
    std::lock_guard<std::mutex> lock(mu_);
    if (s.ok()) {
      ++stats_.rounds_submitted;
      Log(absl::StrFormat("round %d: masked input accepted (%d bytes)", round,
                          out->masked_input.size()));
    } else {
      ++stats_.rounds_failed;
      stats_.last_error = absl::StrFormat("round %d: masked input refused: %s", round,
                                          s.ToString());
      Log(stats_.last_error);
    }
  }
}

void Agent::HandleVersionNotice(const v1::VersionNotice& notice, Session* session) {
  const std::string& version = notice.version_id();
  if (version.empty()) {
    Log("ignoring a VersionNotice without version_id");
    return;
  }
  if (absl::Status s = ApplyVersion(version, lora_ ? &*lora_ : nullptr, notice.sha256(),
                                    notice.size_bytes(), notice.signature(), notice.round_id());
      !s.ok()) {
    NoteError(absl::StrFormat("version %s not applied: %s", version, s.ToString()));
    return;
  }
  if (options_.eval.empty()) {
    Log(absl::StrFormat("version %s applied; no held-out set, no EvalReport", version));
    return;
  }
  auto eval = trainer_->Evaluate(options_.eval, options_.max_seq_len);
  if (!eval.ok()) {
    NoteError(absl::StrFormat("version %s: evaluation failed: %s", version,
                              eval.status().ToString()));
    return;
  }
  v1::AgentMessage message;
  v1::EvalReport* report = message.mutable_eval_report();
  report->set_version_id(version);
  report->set_eval_loss(eval->loss);
  report->set_eval_tokens(eval->tokens);
  bool sent = session->Write(message);
  if (sent) {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.evals_reported;
  }
  Log(absl::StrFormat("version %s (round %d) applied: eval loss %.4f over %d tokens%s", version,
                      notice.round_id(), eval->loss, eval->tokens,
                      sent ? "" : " (EvalReport not sent: the session is closed)"));
}

absl::Status Agent::ApplyVersion(const std::string& version, const LoraConfig* lora,
                                 const std::string& expected_sha256, uint64_t expected_size,
                                 const std::string& signature, uint64_t round_id) {
  if (version.empty()) {
    if (lora == nullptr) return absl::InvalidArgumentError("no LoRA settings for a fresh adapter");
    return trainer_->InitAdapter(*lora);
  }
  if (version == cached_version_) {
    // The trainer's adapter may hold local training since; reset it to the version.
    LoraConfig config =
        lora != nullptr ? *lora : InferLoraConfig(cached_tensors_, cached_metadata_, LoraConfig{});
    return trainer_->SetAdapter(config, cached_tensors_);
  }
  std::string fetched_signature;
  ASSIGN_OR_RETURN(std::string blob,
                   FetchBlob(version, expected_sha256, expected_size, &fetched_signature));
  auto refuse = [&](absl::Status status) { return CountRefusal(std::move(status)); };
  auto refused = [&](const std::string& why) {
    return refuse(absl::PermissionDeniedError(absl::StrCat(
        "adapter version ", version, " refused, keeping ",
        cached_version_.empty() ? std::string("no version") : cached_version_, ": ", why)));
  };
  std::optional<common::AdapterStatement> statement;
  if (signing_key_.has_value()) {
    // The notice's statement, else the fetched one; verified before the blob is parsed.
    auto verified = VerifyVersion(version, blob, signature.empty() ? fetched_signature : signature,
                                  round_id);
    if (!verified.ok()) return refused(std::string(verified.status().message()));
    statement = std::move(*verified);
  }
  common::Metadata metadata;
  auto tensors = common::DecodeAdapterBlob(blob, &metadata);
  if (!tensors.ok()) {
    return refuse(absl::DataLossError(
        absl::StrCat("adapter blob of version ", version, ": ", tensors.status().message())));
  }
  if (statement.has_value()) {
    // The blob's own metadata must tell the same story as the signed statement.
    const std::pair<const char*, std::string> expect[] = {
        {"fedlora.version", statement->version_id},
        {"fedlora.round", std::to_string(statement->round_id)},
        {"fedlora.parent_version", statement->parent_version},
        {"fedlora.base_model_hash", statement->base_model_hash}};
    for (const auto& [key, want] : expect) {
      auto it = metadata.find(key);
      if (it != metadata.end() && it->second != want) {
        return refused(absl::StrCat("blob metadata ", key, " is '", it->second,
                                    "', the signed statement says '", want, "'"));
      }
    }
  }
  LoraConfig config = lora != nullptr ? *lora : InferLoraConfig(*tensors, metadata, LoraConfig{});
  RETURN_IF_ERROR(trainer_->SetAdapter(config, *tensors));
  cached_version_ = version;
  cached_tensors_ = std::move(*tensors);
  cached_metadata_ = std::move(metadata);
  std::lock_guard<std::mutex> lock(mu_);
  stats_.current_version = version;
  return absl::OkStatus();
}

absl::StatusOr<common::AdapterStatement> Agent::VerifyVersion(const std::string& version,
                                                               const std::string& blob,
                                                               const std::string& signature,
                                                               uint64_t round_id) const {
  if (signature.empty()) {
    return absl::PermissionDeniedError(absl::StrCat(
        "version ", version, " is not signed, and this agent requires signatures (key id ",
        signing_key_->key_id(), ")"));
  }
  ASSIGN_OR_RETURN(common::AdapterStatement s,
                   common::ParseAndVerifyAdapterStatement(*signing_key_, signature));
  const std::string sha = common::Sha256Hex(blob);
  if (s.version_id != version) {
    return absl::PermissionDeniedError(
        absl::StrCat("the signed statement is for version ", s.version_id));
  }
  if (s.blob_sha256 != sha) {
    return absl::PermissionDeniedError(absl::StrCat("blob SHA-256 is ", sha,
                                                    ", the signed statement says ", s.blob_sha256));
  }
  if (s.base_model_hash != base_model_hash_) {
    return absl::PermissionDeniedError(absl::StrCat(
        "the signed statement is for base model ", s.base_model_hash, ", this agent has ",
        base_model_hash_));
  }
  if (round_id != 0 && s.round_id != round_id) {
    return absl::PermissionDeniedError(absl::StrCat("the signed statement says round ",
                                                    s.round_id, ", the notice says ", round_id));
  }
  return s;
}

absl::StatusOr<std::string> Agent::FetchBlob(const std::string& version,
                                             const std::string& expected_sha256,
                                             uint64_t expected_size, std::string* signature) {
  const std::string want_sha = absl::AsciiStrToLower(expected_sha256);
  std::string blob;
  uint64_t total = 0;  // 0 = not known yet
  std::string blob_sha;
  int attempts = 0;
  int failures = 0;
  absl::Status last = absl::UnavailableError("no attempt made");
  auto refuse = [&](absl::Status status) { return CountRefusal(std::move(status)); };
  while (true) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) return absl::CancelledError("agent stopping");
    }
    if (attempts >= options_.fetch_max_attempts) {
      return absl::UnavailableError(
          absl::StrFormat("FetchAdapter %s: gave up after %d attempts at byte %d of %d: %s",
                          version, attempts, blob.size(), total, last.ToString()));
    }
    ++attempts;
    const uint64_t start_offset = blob.size();
    grpc::ClientContext ctx;
    ctx.set_deadline(DeadlineIn(options_.rpc_timeout));
    RegisterCall(&ctx);
    v1::FetchAdapterRequest request;
    request.set_version_id(version);
    request.set_offset(start_offset);
    request.set_chunk_size(options_.fetch_chunk_size);
    auto stub = v1::Coordinator::NewStub(channel_);
    auto reader = stub->FetchAdapter(&ctx, request);
    v1::AdapterChunk chunk;
    absl::Status chunk_error;      // retryable problem with a chunk
    absl::Status blob_error;       // the server's blob is not what it must be
    while (reader->Read(&chunk)) {
      const std::string where = absl::StrFormat("FetchAdapter %s, chunk at offset %d", version,
                                                chunk.offset());
      if (!chunk.version_id().empty() && chunk.version_id() != version) {
        blob_error = absl::DataLossError(
            absl::StrCat(where, ": version_id is '", chunk.version_id(), "'"));
      } else if (chunk.total_size() == 0 || chunk.total_size() > options_.max_adapter_bytes) {
        blob_error = absl::DataLossError(
            absl::StrFormat("%s: total_size %d, expected 1..%d", where, chunk.total_size(),
                            options_.max_adapter_bytes));
      } else if (expected_size != 0 && chunk.total_size() != expected_size) {
        blob_error = absl::DataLossError(absl::StrFormat(
            "%s: total_size %d, the VersionNotice said %d", where, chunk.total_size(),
            expected_size));
      } else if (total != 0 && (chunk.total_size() != total ||
                                absl::AsciiStrToLower(chunk.blob_sha256()) != blob_sha)) {
        blob_error = absl::DataLossError(
            absl::StrCat(where, ": total_size or blob_sha256 changed between chunks"));
      } else if (!want_sha.empty() && absl::AsciiStrToLower(chunk.blob_sha256()) != want_sha) {
        blob_error = absl::DataLossError(absl::StrCat(where, ": blob_sha256 ", chunk.blob_sha256(),
                                                      ", the VersionNotice said ", want_sha));
      } else if (chunk.offset() != blob.size()) {
        chunk_error = absl::DataLossError(
            absl::StrFormat("%s: expected offset %d", where, blob.size()));
      } else if (common::Sha256Hex(chunk.data()) != absl::AsciiStrToLower(chunk.chunk_sha256())) {
        chunk_error = absl::DataLossError(absl::StrCat(where, ": chunk SHA-256 mismatch"));
      } else if (blob.size() + chunk.data().size() > chunk.total_size()) {
        blob_error = absl::DataLossError(absl::StrFormat(
            "%s: %d data bytes run past total_size %d", where, chunk.data().size(),
            chunk.total_size()));
      }
      if (!chunk_error.ok() || !blob_error.ok()) break;
      total = chunk.total_size();
      blob_sha = absl::AsciiStrToLower(chunk.blob_sha256());
      if (signature != nullptr && !chunk.signature().empty()) *signature = chunk.signature();
      blob.append(chunk.data());
      {
        std::lock_guard<std::mutex> lock(mu_);
        stats_.bytes_down += chunk.data().size();
      }
      chunk.Clear();
    }
    if (!chunk_error.ok() || !blob_error.ok()) {
      ctx.TryCancel();
      while (reader->Read(&chunk)) {
      }
    }
    grpc::Status status = reader->Finish();
    UnregisterCall(&ctx);
    if (!blob_error.ok()) return refuse(blob_error);
    if (total != 0 && blob.size() == total) {
      std::string got = common::Sha256Hex(blob);
      if (got != blob_sha) {
        return refuse(absl::DataLossError(
            absl::StrFormat("FetchAdapter %s: blob SHA-256 is %s, the coordinator announced %s",
                            version, got, blob_sha)));
      }
      if (start_offset != 0) {
        Log(absl::StrFormat("FetchAdapter %s: resumed at byte %d, complete (%d bytes)", version,
                            start_offset, total));
      }
      return blob;
    }
    if (!chunk_error.ok()) {
      last = chunk_error;
    } else if (!status.ok()) {
      last = FromGrpc(status, absl::StrCat("FetchAdapter ", version));
      if (!IsTransientCode(last.code())) return last;
    } else {
      last = absl::UnavailableError(absl::StrFormat(
          "FetchAdapter %s: stream ended at byte %d of %d", version, blob.size(), total));
    }
    if (blob.size() > start_offset) {
      attempts = 0;  // progress was made: the bound counts attempts without progress
      failures = 0;
    }
    ++failures;
    milliseconds delay = Backoff(failures);
    Log(absl::StrFormat("%s; resuming at byte %d in %d ms", last.ToString(), blob.size(),
                        delay.count()));
    if (!SleepUnlessStopped(delay)) return absl::CancelledError("agent stopping");
  }
}

absl::Status Agent::SubmitUpdate(const v1::RoundTask& task, const std::string& payload,
                                 const TrainResult& train, double eval_before, bool masked) {
  absl::Status status;
  for (int attempt = 1; attempt <= options_.submit_max_attempts; ++attempt) {
    status = SubmitOnce(task, payload, train, eval_before, masked);
    if (status.ok()) return status;
    if (attempt > 1 && status.code() == absl::StatusCode::kAlreadyExists) {
      Log(absl::StrFormat("round %d: the coordinator already holds this update (an earlier "
                          "attempt reached it)",
                          task.round_id()));
      return absl::OkStatus();
    }
    // Broken connections, deadlines and calls the server cancelled (gRPC under
    // its memory quota) are retried: the coordinator deduplicates a replayed
    // update. Refusals (too large, wrong round, bad header) are final.
    if (!IsTransientCode(status.code())) return status;
    if (attempt == options_.submit_max_attempts) break;
    milliseconds delay = Backoff(attempt);
    Log(absl::StrFormat("round %d: %s; retrying SubmitUpdate in %d ms", task.round_id(),
                        status.ToString(), delay.count()));
    if (!SleepUnlessStopped(delay)) return absl::CancelledError("agent stopping");
  }
  return status;
}

absl::Status Agent::SubmitOnce(const v1::RoundTask& task, const std::string& payload,
                               const TrainResult& train, double eval_before, bool masked) {
  grpc::ClientContext ctx;
  ctx.set_deadline(DeadlineIn(options_.rpc_timeout));
  RegisterCall(&ctx);
  v1::SubmitUpdateResponse response;
  auto stub = v1::Coordinator::NewStub(channel_);
  auto writer = stub->SubmitUpdate(&ctx, &response);
  for (size_t offset = 0; offset < payload.size(); offset += kUpdateChunkBytes) {
    size_t n = std::min(kUpdateChunkBytes, payload.size() - offset);
    v1::UpdateChunk chunk;
    if (offset == 0) {
      v1::UpdateHeader* header = chunk.mutable_header();
      header->set_round_id(task.round_id());
      header->set_agent_id(agent_id_);
      header->set_base_model_hash(base_model_hash_);
      header->set_base_version(task.base_version());
      header->set_num_examples(options_.train.size());
      header->set_total_size(payload.size());
      header->set_payload_sha256(common::Sha256Hex(payload));
      header->set_masked(masked);
      v1::TrainMetrics* metrics = header->mutable_metrics();
      metrics->set_train_loss(train.mean_loss);
      metrics->set_eval_loss_before(eval_before);
      metrics->set_train_tokens(train.tokens);
      metrics->set_train_seconds(train.seconds);
    }
    chunk.set_offset(offset);
    chunk.set_data(payload.substr(offset, n));
    chunk.set_chunk_sha256(common::Sha256Hex(chunk.data()));
    if (!writer->Write(chunk)) break;  // the server ended the call; Finish() says why
    std::lock_guard<std::mutex> lock(mu_);
    stats_.bytes_up += n;
  }
  writer->WritesDone();
  grpc::Status status = writer->Finish();
  UnregisterCall(&ctx);
  RETURN_IF_ERROR(FromGrpc(status, absl::StrFormat("SubmitUpdate round %d", task.round_id())));
  if (!response.accepted()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "SubmitUpdate round %d: not accepted: %s", task.round_id(), response.message()));
  }
  return absl::OkStatus();
}

}  // namespace fedlora::edge
