#include "coordinator/state_store.h"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>

#include <sys/stat.h>

#include <chrono>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/crypto/pki.h"
#include "common/status/status.h"
#include "coordinator/config.h"

namespace fedlora::coordinator {
namespace {

using nlohmann::json;

constexpr char kAgents[] = "agents";
constexpr char kRounds[] = "rounds";
constexpr char kUpdates[] = "updates";
constexpr char kVersions[] = "versions";
constexpr char kBlobs[] = "blobs";
constexpr char kMeta[] = "meta";
constexpr char kSecurity[] = "security";
constexpr char kSchemaKey[] = "schema_version";
constexpr char kCurrentKey[] = "current_version";
constexpr char kSealKey[] = "seal_private_key";
constexpr char kAtRestKeyIdKey[] = "at_rest_key_id";
constexpr char kAtRestCheckKey[] = "at_rest_check";
constexpr char kAtRestCheckPlain[] = "fedlora at-rest check v1";
constexpr char kSigningKeyFile[] = "coordinator-signing.key";

uint64_t WallUnixMs() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

double NaN() { return std::numeric_limits<double>::quiet_NaN(); }

// nlohmann writes NaN/Inf as null; read null back as NaN.
double GetDouble(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return NaN();
  return it->get<double>();
}
json PutDouble(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

json ShapesToJson(const ShapeMap& shapes) {
  json j = json::object();
  for (const auto& [name, shape] : shapes) j[name] = shape;
  return j;
}
ShapeMap ShapesFromJson(const json& j) {
  ShapeMap shapes;
  for (auto it = j.begin(); it != j.end(); ++it) {
    shapes[it.key()] = it.value().get<std::vector<int64_t>>();
  }
  return shapes;
}

json SummaryToJson(const UpdateSummary& s) {
  json j{{"num_examples", s.num_examples},
         {"train_loss", PutDouble(s.train_loss)},
         {"eval_loss_before", PutDouble(s.eval_loss_before)},
         {"train_tokens", s.train_tokens},
         {"train_seconds", PutDouble(s.train_seconds)},
         {"bytes", s.bytes}};
  if (s.task_id != 0) {
    j["agent_id"] = s.agent_id;
    j["task_id"] = s.task_id;
    j["base_version"] = s.base_version;
    j["staleness"] = s.staleness;
  }
  return j;
}
UpdateSummary SummaryFromJson(const json& j) {
  UpdateSummary s;
  s.num_examples = j.at("num_examples").get<uint64_t>();
  s.train_loss = GetDouble(j, "train_loss");
  s.eval_loss_before = GetDouble(j, "eval_loss_before");
  s.train_tokens = j.at("train_tokens").get<uint64_t>();
  s.train_seconds = GetDouble(j, "train_seconds");
  s.bytes = j.at("bytes").get<uint64_t>();
  // Async rounds only.
  s.agent_id = j.value("agent_id", std::string());
  s.task_id = j.value("task_id", uint64_t{0});
  s.base_version = j.value("base_version", std::string());
  s.staleness = j.value("staleness", uint64_t{0});
  return s;
}

json AgentToJson(const AgentRecord& a) {
  return json{{"agent_id", a.agent_id},
              {"base_model_hash", a.base_model_hash},
              {"agent_version", a.agent_version},
              {"current_version", a.current_version},
              {"num_train_examples", a.num_train_examples},
              {"first_seen_unix_ms", a.first_seen_unix_ms},
              {"last_seen_unix_ms", a.last_seen_unix_ms}};
}
AgentRecord AgentFromJson(const json& j) {
  AgentRecord a;
  a.agent_id = j.at("agent_id").get<std::string>();
  a.base_model_hash = j.at("base_model_hash").get<std::string>();
  a.agent_version = j.at("agent_version").get<std::string>();
  a.current_version = j.at("current_version").get<std::string>();
  a.num_train_examples = j.at("num_train_examples").get<uint64_t>();
  a.first_seen_unix_ms = j.at("first_seen_unix_ms").get<uint64_t>();
  a.last_seen_unix_ms = j.at("last_seen_unix_ms").get<uint64_t>();
  return a;
}

json VersionToJson(const VersionRecord& v) {
  return json{{"version_id", v.version_id},           {"round_id", v.round_id},
              {"parent_version", v.parent_version},   {"sha256", v.sha256},
              {"size_bytes", v.size_bytes},           {"quant", v.quant},
              {"created_unix_ms", v.created_unix_ms}, {"num_examples", v.num_examples},
              {"contributors", v.contributors},       {"shapes", ShapesToJson(v.shapes)},
              {"strategy", v.strategy},
              {"discarded_energy", v.discarded_energy ? json(*v.discarded_energy) : json(nullptr)},
              {"server_state_sha256", v.server_state_sha256},
              {"secure_aggregation", v.secure_aggregation},
              {"dp_epsilon", v.dp_epsilon ? json(*v.dp_epsilon) : json(nullptr)},
              {"base_model_hash", v.base_model_hash},
              {"signature", v.signature},
              {"quant_rel_l2_error", v.quant_rel_l2_error ? json(*v.quant_rel_l2_error) : json(nullptr)},
              {"quant_max_abs_error",
               v.quant_max_abs_error ? json(*v.quant_max_abs_error) : json(nullptr)}};
}
VersionRecord VersionFromJson(const json& j) {
  VersionRecord v;
  v.version_id = j.at("version_id").get<std::string>();
  v.round_id = j.at("round_id").get<uint64_t>();
  v.parent_version = j.at("parent_version").get<std::string>();
  v.sha256 = j.at("sha256").get<std::string>();
  v.size_bytes = j.at("size_bytes").get<uint64_t>();
  v.quant = j.at("quant").get<std::string>();
  v.created_unix_ms = j.at("created_unix_ms").get<uint64_t>();
  v.num_examples = j.at("num_examples").get<uint64_t>();
  v.contributors = j.at("contributors").get<std::vector<std::string>>();
  v.shapes = ShapesFromJson(j.at("shapes"));
  // Absent in records written before aggregation strategies existed.
  v.strategy = j.value("strategy", std::string("fedavg"));
  if (j.contains("discarded_energy") && !j.at("discarded_energy").is_null()) {
    v.discarded_energy = j.at("discarded_energy").get<double>();
  }
  v.server_state_sha256 = j.value("server_state_sha256", std::string());
  v.secure_aggregation = j.value("secure_aggregation", false);
  if (j.contains("dp_epsilon") && !j.at("dp_epsilon").is_null()) {
    v.dp_epsilon = j.at("dp_epsilon").get<double>();
  }
  // Absent in records written before signing existed.
  v.base_model_hash = j.value("base_model_hash", std::string());
  v.signature = j.value("signature", std::string());
  // Absent in records written before publish_quant existed.
  if (j.contains("quant_rel_l2_error") && !j.at("quant_rel_l2_error").is_null()) {
    v.quant_rel_l2_error = j.at("quant_rel_l2_error").get<double>();
  }
  if (j.contains("quant_max_abs_error") && !j.at("quant_max_abs_error").is_null()) {
    v.quant_max_abs_error = j.at("quant_max_abs_error").get<double>();
  }
  return v;
}

// Runs a decoder, turning any JSON exception into DataLoss naming `where`.
template <typename T, typename F>
absl::StatusOr<T> Decode(const std::string& text, const std::string& where, F&& f) {
  try {
    return f(json::parse(text));
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat("corrupt record ", where, ": ", e.what()));
  }
}

template <typename T>
absl::StatusOr<std::optional<T>> OptionalGet(
    absl::StatusOr<std::string> value,
    const std::function<absl::StatusOr<T>(const std::string&)>& decode) {
  if (absl::IsNotFound(value.status())) return std::optional<T>();
  if (!value.ok()) return value.status();
  ASSIGN_OR_RETURN(T record, decode(*value));
  return std::optional<T>(std::move(record));
}

}  // namespace

const char* RoundPhaseName(RoundPhase phase) {
  switch (phase) {
    case RoundPhase::kTrain:
      return "TRAIN";
    case RoundPhase::kSecAgg:
      return "SECAGG";
    case RoundPhase::kAggregate:
      return "AGGREGATE";
    case RoundPhase::kDone:
      return "DONE";
    case RoundPhase::kAborted:
      return "ABORTED";
  }
  return "UNKNOWN";
}

absl::StatusOr<RoundPhase> ParseRoundPhase(const std::string& name) {
  for (RoundPhase p : {RoundPhase::kTrain, RoundPhase::kSecAgg, RoundPhase::kAggregate,
                       RoundPhase::kDone, RoundPhase::kAborted}) {
    if (name == RoundPhaseName(p)) return p;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "expected a round phase TRAIN|SECAGG|AGGREGATE|DONE|ABORTED, found '", name, "'"));
}

uint64_t RoundRecord::bytes_up() const {
  uint64_t total = 0;
  for (const auto& [id, u] : updates) total += u.bytes;
  return total;
}

double RoundRecord::mean_train_loss() const {
  if (updates.empty()) return NaN();
  double sum = 0;
  for (const auto& [id, u] : updates) sum += u.train_loss;
  return sum / updates.size();
}

double RoundRecord::mean_eval_loss_before() const {
  if (updates.empty()) return NaN();
  double sum = 0;
  for (const auto& [id, u] : updates) sum += u.eval_loss_before;
  return sum / updates.size();
}

double RoundRecord::mean_eval_loss_after() const {
  if (eval_after.empty()) return NaN();
  double sum = 0;
  for (const auto& [id, loss] : eval_after) sum += loss;
  return sum / eval_after.size();
}

bool RoundRecord::IsParticipant(const std::string& agent_id) const {
  for (const auto& p : participants) {
    if (p == agent_id) return true;
  }
  return false;
}

std::string RoundKey(uint64_t round_id) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%020" PRIu64, round_id);
  return buf;
}

std::string UpdateKey(uint64_t round_id, const std::string& agent_id) {
  return RoundKey(round_id) + "/" + agent_id;
}

std::string TaskKey(uint64_t task_id) { return RoundKey(task_id); }

std::string VersionId(uint64_t round_id) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "v%06" PRIu64, round_id);
  return buf;
}

std::string EncodeRound(const RoundRecord& r) {
  json updates = json::object();
  for (const auto& [id, u] : r.updates) updates[id] = SummaryToJson(u);
  json evals = json::object();
  for (const auto& [id, loss] : r.eval_after) evals[id] = PutDouble(loss);
  json tasks = json::object();
  for (const auto& [id, t] : r.tasks) {
    tasks[TaskKey(id)] = json{{"agent_id", t.agent_id}, {"deadline_unix_ms", t.deadline_unix_ms}};
  }
  json j{{"round_id", r.round_id},
         {"phase", RoundPhaseName(r.phase)},
         {"participants", r.participants},
         {"base_version", r.base_version},
         {"created_unix_ms", r.created_unix_ms},
         {"deadline_unix_ms", r.deadline_unix_ms},
         {"finished_unix_ms", r.finished_unix_ms},
         {"local_steps", r.local_steps},
         {"learning_rate", r.learning_rate},
         {"batch_size", r.batch_size},
         {"lora_rank", r.lora_rank},
         {"lora_alpha", r.lora_alpha},
         {"lora_target_modules", r.lora_target_modules},
         {"lora_init_seed", r.lora_init_seed},
         {"max_update_bytes", r.max_update_bytes},
         {"shapes", ShapesToJson(r.shapes)},
         {"updates", updates},
         {"eval_after", evals},
         {"version_id", r.version_id},
         {"abort_reason", r.abort_reason},
         {"bytes_down", r.bytes_down},
         {"eval_complete", r.eval_complete},
         {"strategy", r.strategy},
         {"prox_mu", r.prox_mu},
         {"freeze_lora_a", r.freeze_lora_a},
         {"discarded_energy", r.discarded_energy ? json(*r.discarded_energy) : json(nullptr)},
         {"secure_aggregation", r.secure_aggregation},
         {"secagg_contributors", r.secagg_contributors},
         {"dp_clip_norm", r.dp_clip_norm},
         {"dp_noise_multiplier", r.dp_noise_multiplier},
         {"dp_accountant_state", r.dp_accountant_state},
         {"dp_epsilon", r.dp_epsilon ? json(*r.dp_epsilon) : json(nullptr)},
         {"mode", r.mode},
         {"tasks", tasks}};
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

absl::StatusOr<RoundRecord> DecodeRound(const std::string& text, const std::string& where) {
  return Decode<RoundRecord>(text, where, [&](const json& j) -> absl::StatusOr<RoundRecord> {
    RoundRecord r;
    r.round_id = j.at("round_id").get<uint64_t>();
    ASSIGN_OR_RETURN(r.phase, ParseRoundPhase(j.at("phase").get<std::string>()));
    r.participants = j.at("participants").get<std::vector<std::string>>();
    r.base_version = j.at("base_version").get<std::string>();
    r.created_unix_ms = j.at("created_unix_ms").get<uint64_t>();
    r.deadline_unix_ms = j.at("deadline_unix_ms").get<uint64_t>();
    r.finished_unix_ms = j.at("finished_unix_ms").get<uint64_t>();
    r.local_steps = j.at("local_steps").get<uint32_t>();
    r.learning_rate = j.at("learning_rate").get<double>();
    r.batch_size = j.at("batch_size").get<uint32_t>();
    r.lora_rank = j.at("lora_rank").get<uint32_t>();
    r.lora_alpha = j.at("lora_alpha").get<double>();
    r.lora_target_modules = j.at("lora_target_modules").get<std::vector<std::string>>();
    r.lora_init_seed = j.at("lora_init_seed").get<uint64_t>();
    r.max_update_bytes = j.at("max_update_bytes").get<uint64_t>();
    r.shapes = ShapesFromJson(j.at("shapes"));
    const json& updates = j.at("updates");
    for (auto it = updates.begin(); it != updates.end(); ++it) {
      r.updates[it.key()] = SummaryFromJson(it.value());
    }
    const json& evals = j.at("eval_after");
    for (auto it = evals.begin(); it != evals.end(); ++it) {
      r.eval_after[it.key()] = it.value().is_null() ? NaN() : it.value().get<double>();
    }
    r.version_id = j.at("version_id").get<std::string>();
    r.abort_reason = j.at("abort_reason").get<std::string>();
    r.bytes_down = j.at("bytes_down").get<uint64_t>();
    r.eval_complete = j.at("eval_complete").get<bool>();
    // Absent in records written before aggregation strategies existed.
    r.strategy = j.value("strategy", std::string("fedavg"));
    r.prox_mu = j.value("prox_mu", 0.0);
    r.freeze_lora_a = j.value("freeze_lora_a", false);
    if (j.contains("discarded_energy") && !j.at("discarded_energy").is_null()) {
      r.discarded_energy = j.at("discarded_energy").get<double>();
    }
    // Absent in records written before secure aggregation was wired in.
    r.secure_aggregation = j.value("secure_aggregation", false);
    r.secagg_contributors =
        j.value("secagg_contributors", std::vector<std::string>{});
    r.dp_clip_norm = j.value("dp_clip_norm", 0.0);
    r.dp_noise_multiplier = j.value("dp_noise_multiplier", 0.0);
    r.dp_accountant_state = j.value("dp_accountant_state", std::string());
    if (j.contains("dp_epsilon") && !j.at("dp_epsilon").is_null()) {
      r.dp_epsilon = j.at("dp_epsilon").get<double>();
    }
    // Absent in records written before the async mode existed.
    r.mode = j.value("mode", std::string("sync"));
    if (r.mode != "sync" && r.mode != "async") {
      return absl::InvalidArgumentError(
          absl::StrCat("mode: expected sync or async, found '", r.mode, "'"));
    }
    if (j.contains("tasks")) {
      const json& tasks = j.at("tasks");
      for (auto it = tasks.begin(); it != tasks.end(); ++it) {
        uint64_t id = 0;
        if (!absl::SimpleAtoi(it.key(), &id) || id == 0) {
          return absl::InvalidArgumentError(absl::StrCat("tasks: bad task id '", it.key(), "'"));
        }
        AsyncTask t;
        t.agent_id = it.value().at("agent_id").get<std::string>();
        t.deadline_unix_ms = it.value().at("deadline_unix_ms").get<uint64_t>();
        r.tasks[id] = std::move(t);
      }
    }
    return r;
  });
}

std::string EncodeUpdate(const UpdateRecord& u) {
  json j{{"round_id", u.round_id},
         {"agent_id", u.agent_id},
         {"base_version", u.base_version},
         {"summary", SummaryToJson(u.summary)},
         {"payload_sha256", u.payload_sha256},
         {"received_unix_ms", u.received_unix_ms}};
  if (u.task_id != 0) j["task_id"] = u.task_id;
  std::string meta = j.dump(-1, ' ', false, json::error_handler_t::replace);
  std::string out(8, '\0');
  uint64_t n = meta.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += meta;
  out += u.sealed;
  return out;
}

absl::StatusOr<UpdateRecord> DecodeUpdate(const std::string& bytes, const std::string& where) {
  if (bytes.size() < 8) {
    return absl::DataLossError(
        absl::StrCat("corrupt record ", where, ": expected >= 8 bytes, found ", bytes.size()));
  }
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[i])) << (8 * i);
  if (n > bytes.size() - 8) {
    return absl::DataLossError(absl::StrCat("corrupt record ", where, ": header length ", n,
                                            " exceeds the record size ", bytes.size()));
  }
  ASSIGN_OR_RETURN(
      UpdateRecord u,
      Decode<UpdateRecord>(bytes.substr(8, n), where,
                           [](const json& j) -> absl::StatusOr<UpdateRecord> {
                             UpdateRecord u;
                             u.round_id = j.at("round_id").get<uint64_t>();
                             u.agent_id = j.at("agent_id").get<std::string>();
                             u.base_version = j.at("base_version").get<std::string>();
                             u.summary = SummaryFromJson(j.at("summary"));
                             u.payload_sha256 = j.at("payload_sha256").get<std::string>();
                             u.received_unix_ms = j.at("received_unix_ms").get<uint64_t>();
                             u.task_id = j.value("task_id", uint64_t{0});
                             return u;
                           }));
  u.sealed = bytes.substr(8 + n);
  return u;
}

absl::StatusOr<StateStoreOptions> StateStoreOptionsFromConfig(const CoordinatorConfig& config) {
  StateStoreOptions options;
  options.memtable_budget_bytes = static_cast<uint64_t>(config.store_memtable_mb) << 20;
  if (!config.at_rest_key.empty()) {
    ASSIGN_OR_RETURN(options.at_rest, common::AtRestCipher::LoadFile(config.at_rest_key));
  }
  std::string signing = config.signing_key;
  if (signing.empty() && !config.tls_key.empty()) {
    const size_t slash = config.tls_key.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : config.tls_key.substr(0, slash);
    const std::string beside = dir + "/" + kSigningKeyFile;
    if (FileExists(beside)) signing = beside;
  }
  if (!signing.empty()) {
    ASSIGN_OR_RETURN(options.signing_key, common::SigningKey::LoadFile(signing));
  }
  if (!config.tls_cert.empty()) {
    auto pem = common::ReadFileToString(config.tls_cert);
    if (pem.ok()) {
      auto id = common::ReadCertIdentity(*pem);
      if (id.ok()) options.actor = id->common_name;
    }
  }
  return options;
}

common::AdapterStatement VersionStatement(const VersionRecord& v) {
  common::AdapterStatement s;
  s.version_id = v.version_id;
  s.round_id = v.round_id;
  s.parent_version = v.parent_version;
  s.blob_sha256 = v.sha256;
  s.base_model_hash = v.base_model_hash;
  s.quant = v.quant;
  return s;
}

StateStore::StateStore(std::unique_ptr<common::Store> store, StateStoreOptions options)
    : store_(std::move(store)),
      options_(std::move(options)),
      audit_(std::make_unique<AuditLog>(store_.get())) {}

namespace {

// The stored schema version (0 when never recorded); refuses a newer one.
absl::StatusOr<int> StoredSchema(const common::Store& store) {
  auto value = store.Get(kMeta, kSchemaKey);
  if (absl::IsNotFound(value.status())) return 0;
  if (!value.ok()) return value.status();
  int version = 0;
  if (!absl::SimpleAtoi(*value, &version) || version < 1) {
    return absl::DataLossError(
        absl::StrCat("meta/schema_version: expected a positive integer, found '", *value, "'"));
  }
  if (version > kSchemaVersion) {
    return absl::FailedPreconditionError(absl::StrCat("state store schema_version is ", version,
                                                      " but this coordinator understands up to ",
                                                      kSchemaVersion, "; upgrade the coordinator"));
  }
  return version;
}

}  // namespace

absl::StatusOr<std::unique_ptr<StateStore>> StateStore::Open(const std::string& dir,
                                                             StateStoreOptions options) {
  // Sealed updates (megabytes each, N per round) pass through the memtables; the
  // budget bounds what RocksDB holds of them before a flush.
  common::StoreTuning tuning;
  tuning.memtable_budget_bytes = options.memtable_budget_bytes;
  ASSIGN_OR_RETURN(auto store,
                   common::Store::Open(dir,
                                       {kAgents, kRounds, kUpdates, kVersions, kBlobs, kMeta,
                                        kAuditColumnFamily, kSecurity},
                                       tuning));
  std::unique_ptr<StateStore> state(new StateStore(std::move(store), std::move(options)));
  // Checks that can refuse come before any write.
  ASSIGN_OR_RETURN(int schema, StoredSchema(*state->store_));
  RETURN_IF_ERROR(state->audit_->Load());
  RETURN_IF_ERROR(state->CheckAtRest());
  if (schema < kSchemaVersion) {
    // New store, or schema 1 (no audit column family; it was just created).
    RETURN_IF_ERROR(
        state->store_->Put(kMeta, kSchemaKey, std::to_string(kSchemaVersion), /*sync=*/true));
  }
  if (state->options_.at_rest.has_value() && state->encrypted_key_id_.empty()) {
    RETURN_IF_ERROR(state->EncryptExistingRecords(dir));
  }
  return state;
}

absl::StatusOr<std::unique_ptr<StateStore>> StateStore::OpenReadOnly(const std::string& dir,
                                                                     StateStoreOptions options) {
  ASSIGN_OR_RETURN(auto store, common::Store::OpenReadOnly(dir));
  for (const char* cf : {kAgents, kRounds, kUpdates, kVersions, kBlobs, kMeta}) {
    // Probe the column family: an unknown one is InvalidArgument, absent keys NotFound.
    auto probe = store->Get(cf, kSchemaKey);
    if (absl::IsInvalidArgument(probe.status())) {
      return absl::FailedPreconditionError(
          absl::StrCat(dir, " is not a coordinator state store: expected column family '", cf,
                       "', found none"));
    }
  }
  std::unique_ptr<StateStore> state(new StateStore(std::move(store), std::move(options)));
  ASSIGN_OR_RETURN(int schema, StoredSchema(*state->store_));
  (void)schema;  // an older layout reads fine; the audit column family may be absent
  RETURN_IF_ERROR(state->audit_->Load());
  RETURN_IF_ERROR(state->CheckAtRest());
  return state;
}

absl::Status StateStore::CheckAtRest() {
  auto id = store_->Get(kMeta, kAtRestKeyIdKey);
  if (!id.ok() && !absl::IsNotFound(id.status())) return id.status();
  encrypted_key_id_ = id.ok() ? *id : "";
  const bool have_key = options_.at_rest.has_value();
  if (encrypted_key_id_.empty()) {
    if (have_key && (store_->read_only() || !options_.encrypt_existing)) {
      return absl::FailedPreconditionError(
          "the state store is not encrypted at rest; open it without an at-rest key (a writable "
          "open with the key encrypts it)");
    }
    return absl::OkStatus();  // plaintext store (a writable open with a key encrypts it)
  }
  if (!have_key) {
    if (store_->read_only()) return absl::OkStatus();  // encrypted records will refuse to read
    return absl::FailedPreconditionError(absl::StrCat(
        "the state store is encrypted at rest with key id ", encrypted_key_id_,
        "; pass its key file (--at-rest-key FILE)"));
  }
  const common::AtRestCipher& cipher = *options_.at_rest;
  if (cipher.key_id() != encrypted_key_id_) {
    return absl::FailedPreconditionError(
        absl::StrCat("wrong at-rest key: the state store is encrypted with key id ",
                     encrypted_key_id_, ", the key given has id ", cipher.key_id(),
                     "; nothing was changed"));
  }
  ASSIGN_OR_RETURN(std::string check, store_->Get(kMeta, kAtRestCheckKey));
  auto plain = cipher.Decrypt(check, "meta/at_rest_check", "meta/at_rest_check");
  if (!plain.ok() || *plain != kAtRestCheckPlain) {
    return absl::FailedPreconditionError(absl::StrCat(
        "wrong at-rest key: meta/at_rest_check does not decrypt under key id ", cipher.key_id(),
        " (", plain.ok() ? "unexpected check value" : plain.status().message(),
        "); nothing was changed"));
  }
  return absl::OkStatus();
}

absl::Status StateStore::EncryptExistingRecords(const std::string& dir) {
  const common::AtRestCipher& cipher = *options_.at_rest;
  common::Store::Batch batch(store_.get());
  uint64_t updates = 0, blobs = 0;
  absl::Status error;
  auto encrypt_cf = [&](const char* cf, uint64_t* count) -> absl::Status {
    RETURN_IF_ERROR(store_->Scan(cf, "", [&](std::string_view key, std::string_view value) {
      if (common::AtRestCipher::IsEncrypted(value)) {
        error = absl::DataLossError(absl::StrCat(
            cf, "/", std::string(key),
            " is already encrypted but meta/at_rest_key_id is absent; refusing to continue"));
        return false;
      }
      auto enc = cipher.Encrypt(value, absl::StrCat(cf, "/", std::string(key)));
      if (!enc.ok()) {
        error = enc.status();
        return false;
      }
      batch.Put(cf, key, *enc);
      ++*count;
      return true;
    }));
    return error;
  };
  RETURN_IF_ERROR(encrypt_cf(kUpdates, &updates));
  RETURN_IF_ERROR(encrypt_cf(kBlobs, &blobs));
  auto seal = store_->Get(kMeta, kSealKey);
  if (seal.ok()) {
    ASSIGN_OR_RETURN(std::string enc, cipher.Encrypt(*seal, std::string("meta/") + kSealKey));
    batch.Put(kMeta, kSealKey, enc);
  } else if (!absl::IsNotFound(seal.status())) {
    return seal.status();
  }
  ASSIGN_OR_RETURN(std::string check, cipher.Encrypt(kAtRestCheckPlain, "meta/at_rest_check"));
  batch.Put(kMeta, kAtRestKeyIdKey, cipher.key_id());
  batch.Put(kMeta, kAtRestCheckKey, check);
  json details{{"key_id", cipher.key_id()},
               {"updates", updates},
               {"blobs", blobs},
               {"seal_key", seal.ok()},
               {"data_dir", dir}};
  RETURN_IF_ERROR(CommitAudited(&batch, "at_rest.enabled",
                                details.dump(-1, ' ', false, json::error_handler_t::replace)));
  encrypted_key_id_ = cipher.key_id();
  return absl::OkStatus();
}

absl::StatusOr<std::string> StateStore::SealValue(const char* cf, const std::string& key,
                                                  std::string_view value) const {
  if (!options_.at_rest.has_value()) return std::string(value);
  return options_.at_rest->Encrypt(value, absl::StrCat(cf, "/", key));
}

absl::StatusOr<std::string> StateStore::OpenValue(const char* cf, const std::string& key,
                                                  std::string value) const {
  const std::string where = absl::StrCat(cf, "/", key);
  if (common::AtRestCipher::IsEncrypted(value)) {
    if (!options_.at_rest.has_value()) {
      return absl::FailedPreconditionError(absl::StrCat(
          where, " is encrypted at rest (key id ", common::AtRestCipher::RecordKeyId(value),
          "); pass its key file (--at-rest-key FILE)"));
    }
    return options_.at_rest->Decrypt(value, where, where);
  }
  if (!encrypted_key_id_.empty() || options_.at_rest.has_value()) {
    return absl::DataLossError(absl::StrCat(
        where, ": expected a record encrypted at rest, found plaintext (written around the "
               "encryption, or a downgrade)"));
  }
  return value;
}

absl::Status StateStore::CommitAudited(common::Store::Batch* batch, const std::string& action,
                                       const std::string& details_json) {
  return audit_->Commit(batch, options_.actor, action, details_json, WallUnixMs());
}

absl::Status StateStore::AppendAudit(const std::string& actor, const std::string& action,
                                     const std::string& details_json) {
  common::Store::Batch batch(store_.get());
  return audit_->Commit(&batch, actor, action, details_json, WallUnixMs());
}

absl::Status StateStore::SignVersion(VersionRecord* version) const {
  version->signature.clear();
  if (!options_.signing_key.has_value()) return absl::OkStatus();
  ASSIGN_OR_RETURN(version->signature,
                   common::SignAdapterStatement(*options_.signing_key, VersionStatement(*version)));
  return absl::OkStatus();
}

absl::StatusOr<common::X25519KeyPair> StateStore::LoadOrCreateSealKey() {
  auto value = store_->Get(kMeta, kSealKey);
  if (value.ok()) {
    ASSIGN_OR_RETURN(*value, OpenValue(kMeta, kSealKey, std::move(*value)));
    if (value->size() != 32) {
      return absl::DataLossError(
          absl::StrCat("meta/seal_private_key: expected 32 bytes, found ", value->size()));
    }
    return common::X25519FromPrivate(*value);
  }
  if (!absl::IsNotFound(value.status())) return value.status();
  ASSIGN_OR_RETURN(common::X25519KeyPair pair, common::GenerateX25519KeyPair());
  ASSIGN_OR_RETURN(std::string stored, SealValue(kMeta, kSealKey, pair.private_key));
  RETURN_IF_ERROR(store_->Put(kMeta, kSealKey, stored, /*sync=*/true));
  return pair;
}

absl::StatusOr<std::optional<AgentRecord>> StateStore::GetAgent(const std::string& agent_id) const {
  return OptionalGet<AgentRecord>(store_->Get(kAgents, agent_id), [&](const std::string& text) {
    return Decode<AgentRecord>(
        text, "agents/" + agent_id,
        [](const json& j) -> absl::StatusOr<AgentRecord> { return AgentFromJson(j); });
  });
}

absl::Status StateStore::PutAgent(const AgentRecord& agent, bool sync) {
  return store_->Put(kAgents, agent.agent_id,
                     AgentToJson(agent).dump(-1, ' ', false, json::error_handler_t::replace), sync);
}

absl::StatusOr<std::vector<AgentRecord>> StateStore::ListAgents() const {
  std::vector<AgentRecord> out;
  absl::Status error;
  RETURN_IF_ERROR(store_->Scan(kAgents, "", [&](std::string_view key, std::string_view value) {
    auto a = Decode<AgentRecord>(
        std::string(value), "agents/" + std::string(key),
        [](const json& j) -> absl::StatusOr<AgentRecord> { return AgentFromJson(j); });
    if (!a.ok()) {
      error = a.status();
      return false;
    }
    out.push_back(std::move(*a));
    return true;
  }));
  RETURN_IF_ERROR(error);
  return out;
}

absl::StatusOr<std::optional<RoundRecord>> StateStore::GetRound(uint64_t round_id) const {
  const std::string key = RoundKey(round_id);
  return OptionalGet<RoundRecord>(store_->Get(kRounds, key), [&](const std::string& text) {
    return DecodeRound(text, "rounds/" + key);
  });
}

absl::StatusOr<std::vector<RoundRecord>> StateStore::ListRounds() const {
  std::vector<RoundRecord> out;
  absl::Status error;
  RETURN_IF_ERROR(store_->Scan(kRounds, "", [&](std::string_view key, std::string_view value) {
    auto r = DecodeRound(std::string(value), "rounds/" + std::string(key));
    if (!r.ok()) {
      error = r.status();
      return false;
    }
    out.push_back(std::move(*r));
    return true;
  }));
  RETURN_IF_ERROR(error);
  return out;
}

absl::Status StateStore::PutRound(const RoundRecord& round) {
  return store_->Put(kRounds, RoundKey(round.round_id), EncodeRound(round), /*sync=*/true);
}

absl::Status StateStore::StartRound(const RoundRecord& round) {
  common::Store::Batch batch(store_.get());
  batch.Put(kRounds, RoundKey(round.round_id), EncodeRound(round));
  json details{{"round", round.round_id},
               {"participants", round.participants},
               {"base_version", round.base_version},
               {"deadline_unix_ms", round.deadline_unix_ms}};
  return CommitAudited(&batch, "round.started",
                       details.dump(-1, ' ', false, json::error_handler_t::replace));
}

absl::Status StateStore::AcceptUpdate(const UpdateRecord& update, const RoundRecord& round) {
  common::Store::Batch batch(store_.get());
  const std::string key =
      UpdateKey(update.round_id, update.task_id != 0 ? TaskKey(update.task_id) : update.agent_id);
  ASSIGN_OR_RETURN(std::string value, SealValue(kUpdates, key, EncodeUpdate(update)));
  batch.Put(kUpdates, key, value);
  batch.Put(kRounds, RoundKey(round.round_id), EncodeRound(round));
  return batch.Commit(/*sync=*/true);
}

absl::StatusOr<std::optional<UpdateRecord>> StateStore::GetUpdate(
    uint64_t round_id, const std::string& agent_id) const {
  const std::string key = UpdateKey(round_id, agent_id);
  return OptionalGet<UpdateRecord>(
      store_->Get(kUpdates, key), [&](const std::string& bytes) -> absl::StatusOr<UpdateRecord> {
        ASSIGN_OR_RETURN(std::string plain, OpenValue(kUpdates, key, bytes));
        return DecodeUpdate(plain, "updates/" + key);
      });
}

absl::Status StateStore::ForEachUpdate(uint64_t round_id,
                                       const std::function<absl::Status(UpdateRecord)>& fn) const {
  // Collect keys first, then load one value at a time (O(1 update) memory).
  std::vector<std::string> keys;
  RETURN_IF_ERROR(
      store_->Scan(kUpdates, RoundKey(round_id) + "/", [&](std::string_view key, std::string_view) {
        keys.emplace_back(key);
        return true;
      }));
  for (const std::string& key : keys) {
    ASSIGN_OR_RETURN(std::string bytes, store_->Get(kUpdates, key));
    ASSIGN_OR_RETURN(bytes, OpenValue(kUpdates, key, std::move(bytes)));
    ASSIGN_OR_RETURN(UpdateRecord u, DecodeUpdate(bytes, "updates/" + key));
    RETURN_IF_ERROR(fn(std::move(u)));
  }
  return absl::OkStatus();
}

absl::StatusOr<size_t> StateStore::CountUpdates(uint64_t round_id) const {
  size_t n = 0;
  RETURN_IF_ERROR(
      store_->Scan(kUpdates, RoundKey(round_id) + "/", [&](std::string_view, std::string_view) {
        ++n;
        return true;
      }));
  return n;
}

absl::Status StateStore::DeleteUpdates(uint64_t round_id, common::Store::Batch* batch) const {
  return store_->Scan(kUpdates, RoundKey(round_id) + "/",
                      [&](std::string_view key, std::string_view) {
                        batch->Delete(kUpdates, key);
                        return true;
                      });
}

absl::Status StateStore::Publish(const RoundRecord& round, const VersionRecord& version,
                                 const std::string& blob) {
  common::Store::Batch batch(store_.get());
  ASSIGN_OR_RETURN(std::string stored_blob, SealValue(kBlobs, version.sha256, blob));
  batch.Put(kBlobs, version.sha256, stored_blob);
  batch.Put(kVersions, version.version_id,
            VersionToJson(version).dump(-1, ' ', false, json::error_handler_t::replace));
  batch.Put(kMeta, kCurrentKey, version.version_id);
  batch.Put(kRounds, RoundKey(round.round_id), EncodeRound(round));
  RETURN_IF_ERROR(DeleteUpdates(round.round_id, &batch));
  json details{{"round", round.round_id},
               {"version", version.version_id},
               {"parent_version", version.parent_version},
               {"sha256", version.sha256},
               {"contributors", version.contributors},
               {"signed", !version.signature.empty()}};
  if (options_.signing_key.has_value() && !version.signature.empty()) {
    details["signing_key_id"] = options_.signing_key->key_id();
  }
  return CommitAudited(&batch, "round.published",
                       details.dump(-1, ' ', false, json::error_handler_t::replace));
}

absl::Status StateStore::Abort(const RoundRecord& round) {
  common::Store::Batch batch(store_.get());
  batch.Put(kRounds, RoundKey(round.round_id), EncodeRound(round));
  RETURN_IF_ERROR(DeleteUpdates(round.round_id, &batch));
  json details{{"round", round.round_id}, {"reason", round.abort_reason}};
  return CommitAudited(&batch, "round.aborted",
                       details.dump(-1, ' ', false, json::error_handler_t::replace));
}

absl::StatusOr<std::string> StateStore::CurrentVersion() const {
  auto value = store_->Get(kMeta, kCurrentKey);
  if (absl::IsNotFound(value.status())) return std::string();
  return value;
}

absl::StatusOr<std::optional<VersionRecord>> StateStore::GetVersion(
    const std::string& version_id) const {
  return OptionalGet<VersionRecord>(
      store_->Get(kVersions, version_id), [&](const std::string& text) {
        return Decode<VersionRecord>(
            text, "versions/" + version_id,
            [](const json& j) -> absl::StatusOr<VersionRecord> { return VersionFromJson(j); });
      });
}

absl::StatusOr<std::string> StateStore::PutBlob(const std::string& bytes) {
  const std::string sha = common::Sha256Hex(bytes);
  ASSIGN_OR_RETURN(std::string stored, SealValue(kBlobs, sha, bytes));
  RETURN_IF_ERROR(store_->Put(kBlobs, sha, stored, /*sync=*/true));
  return sha;
}

absl::StatusOr<std::string> StateStore::GetBlob(const std::string& sha256_hex) const {
  ASSIGN_OR_RETURN(std::string value, store_->Get(kBlobs, sha256_hex));
  if (!common::AtRestCipher::IsEncrypted(value)) {
    if (encrypted_key_id_.empty() && !options_.at_rest.has_value()) return value;
    // Content-addressed: a plaintext blob that hashes to its key is authentic
    // whatever wrote it, so it is not a downgrade.
    if (common::Sha256Hex(value) == sha256_hex) return value;
  }
  return OpenValue(kBlobs, sha256_hex, std::move(value));
}

absl::Status StateStore::Flush() { return store_->Flush(); }

// ------------------------------------------------------------------ Versions and backup

absl::StatusOr<std::vector<VersionRecord>> StateStore::ListVersions() const {
  std::vector<VersionRecord> out;
  absl::Status error;
  RETURN_IF_ERROR(store_->Scan(kVersions, "", [&](std::string_view key, std::string_view value) {
    auto v = Decode<VersionRecord>(
        std::string(value), "versions/" + std::string(key),
        [](const json& j) -> absl::StatusOr<VersionRecord> { return VersionFromJson(j); });
    if (!v.ok()) {
      error = v.status();
      return false;
    }
    out.push_back(std::move(*v));
    return true;
  }));
  RETURN_IF_ERROR(error);
  return out;
}

absl::Status StateStore::SetCurrentVersion(const std::string& version_id,
                                           const std::string& actor, const std::string& action,
                                           const std::string& details_json) {
  ASSIGN_OR_RETURN(auto version, GetVersion(version_id));
  if (!version.has_value()) {
    return absl::NotFoundError(
        absl::StrCat("cannot make '", version_id, "' current: no such version is stored"));
  }
  common::Store::Batch batch(store_.get());
  batch.Put(kMeta, kCurrentKey, version_id);
  return audit_->Commit(&batch, actor, action, details_json, WallUnixMs());
}

absl::Status StateStore::CreateBackup(const std::string& dir, const std::string& actor) {
  if (dir.empty() || dir[0] != '/') {
    // The path is resolved on the coordinator host, not where the admin runs the CLI.
    return absl::InvalidArgumentError(
        absl::StrCat("backup: expected an absolute directory path, found \"", dir, "\""));
  }
  struct stat st {};
  if (::stat(dir.c_str(), &st) == 0) {
    return absl::AlreadyExistsError(
        absl::StrCat("backup: ", dir, " already exists; expected a new directory"));
  }
  const size_t slash = dir.find_last_of('/');
  const std::string parent = slash == std::string::npos ? "." : dir.substr(0, std::max<size_t>(slash, 1));
  if (::stat(parent.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::NotFoundError(
        absl::StrCat("backup: parent directory ", parent, " of ", dir, " does not exist"));
  }
  RETURN_IF_ERROR(store_->Checkpoint(dir));
  json details{{"dir", dir}};
  return AppendAudit(actor, "backup.created",
                     details.dump(-1, ' ', false, json::error_handler_t::replace));
}

// ---- Security records

absl::StatusOr<std::optional<std::string>> StateStore::GetSecurityRecord(
    const std::string& key) const {
  auto value = store_->Get(kSecurity, key);
  if (absl::IsNotFound(value.status())) return std::optional<std::string>();
  // A read-only open of a store written before this column family existed.
  if (absl::IsInvalidArgument(value.status())) return std::optional<std::string>();
  if (!value.ok()) return value.status();
  return std::optional<std::string>(std::move(*value));
}

absl::Status StateStore::ScanSecurityRecords(
    const std::string& prefix,
    const std::function<void(std::string_view key, std::string_view value)>& fn) const {
  absl::Status s = store_->Scan(kSecurity, prefix, [&](std::string_view k, std::string_view v) {
    fn(k, v);
    return true;
  });
  if (absl::IsInvalidArgument(s)) return absl::OkStatus();  // no such column family (read-only)
  return s;
}

absl::Status StateStore::PutSecurityRecordsAudited(
    const std::vector<std::pair<std::string, std::string>>& records, const std::string& actor,
    const std::string& action, const std::string& details_json) {
  common::Store::Batch batch(store_.get());
  for (const auto& [key, value] : records) batch.Put(kSecurity, key, value);
  return audit_->Commit(&batch, actor, action, details_json, WallUnixMs());
}

absl::Status StateStore::DiscardUpdate(const RoundRecord& round, const std::string& agent_id) {
  return DiscardUpdates(round, {agent_id});
}

absl::Status StateStore::DiscardUpdates(const RoundRecord& round,
                                        const std::vector<std::string>& entries) {
  common::Store::Batch batch(store_.get());
  for (const std::string& entry : entries) batch.Delete(kUpdates, UpdateKey(round.round_id, entry));
  batch.Put(kRounds, RoundKey(round.round_id), EncodeRound(round));
  return batch.Commit(/*sync=*/true);
}

}  // namespace fedlora::coordinator
