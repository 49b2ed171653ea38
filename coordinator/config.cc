#include "coordinator/config.h"

#include <yaml-cpp/yaml.h>

#include <CLI/CLI.hpp>
#include <cmath>
#include <functional>
#include <iostream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "common/crypto/crypto.h"
#include "common/status/status.h"

namespace fedlora::coordinator {
namespace {

struct Field {
  std::string key;  // YAML key; the flag is "--" + key with '-' for '_'
  std::string help;
  std::function<void(CLI::App&, CoordinatorConfig*)> add_flag;
  std::function<void(const YAML::Node&, CoordinatorConfig*)> load;  // throws YAML::Exception
};

std::string FlagName(const std::string& key) {
  return "--" + absl::StrReplaceAll(key, {{"_", "-"}});
}

template <typename T>
Field MakeField(std::string key, std::string help, T CoordinatorConfig::*member) {
  Field f;
  f.key = key;
  f.help = help;
  f.add_flag = [key, help, member](CLI::App& app, CoordinatorConfig* cfg) {
    CLI::Option* opt = app.add_option(FlagName(key), cfg->*member, help);
    opt->capture_default_str();
    if constexpr (std::is_same_v<T, std::vector<std::string>>) opt->delimiter(',');
  };
  f.load = [member](const YAML::Node& node, CoordinatorConfig* cfg) {
    cfg->*member = node.as<T>();
  };
  return f;
}

const std::vector<Field>& Fields() {
  using C = CoordinatorConfig;
  static const std::vector<Field>* fields = new std::vector<Field>{
      MakeField("coordinator_id", "Name reported to agents and admins", &C::coordinator_id),
      MakeField("listen_address", "gRPC listen address HOST:PORT (port 0 = any free port)",
                &C::listen_address),
      MakeField("metrics_address",
                "HTTP address HOST:PORT for /metrics and /healthz (\"\" = off, port 0 = any)",
                &C::metrics_address),
      MakeField("data_dir", "RocksDB state directory (created if absent)", &C::data_dir),
      MakeField("tls_ca", "Fleet CA certificate (PEM)", &C::tls_ca),
      MakeField("tls_cert", "Coordinator server certificate (PEM)", &C::tls_cert),
      MakeField("tls_key", "Coordinator server private key (PEM)", &C::tls_key),
      MakeField("at_rest_key",
                "Key file (32 bytes, raw or hex) encrypting updates and blobs at rest "
                "(\"\" = off)",
                &C::at_rest_key),
      MakeField("signing_key",
                "Ed25519 key (PEM) signing published versions (default: "
                "coordinator-signing.key beside --tls-key, if present)",
                &C::signing_key),
      MakeField("ca_key",
                "Fleet CA private key (PEM) signing enrolled and renewed agent certificates "
                "(\"\" = enrollment and renewal off)",
                &C::ca_key),
      MakeField("enroll_address",
                "Enrollment port HOST:PORT (TLS 1.3, no client certificate; \"\" = off)",
                &C::enroll_address),
      MakeField("cert_validity_days", "Validity of enrolled and renewed agent certificates",
                &C::cert_validity_days),
      MakeField("enrollment_approval",
                "token: enroll with one-time tokens only; admin: also accept token-less "
                "requests that wait for `fedlora-admin enroll approve`",
                &C::enrollment_approval),
      MakeField("base_model_hash", "Hex SHA-256 of the base model agents must hold",
                &C::base_model_hash),
      MakeField("base_model_dir", "Base model directory to hash instead of --base-model-hash",
                &C::base_model_dir),
      MakeField("min_participants", "Fewest agents a round needs", &C::min_participants),
      MakeField("max_participants", "Most agents selected for a round", &C::max_participants),
      MakeField("rounds", "Rounds to publish, then print the summary and exit (0 = forever)",
                &C::rounds),
      MakeField("select_wait_ms",
                "After min participants are online, wait this long (or for max) before "
                "selecting",
                &C::select_wait_ms),
      MakeField("local_steps", "Local training steps per round", &C::local_steps),
      MakeField("learning_rate", "Agent learning rate", &C::learning_rate),
      MakeField("batch_size", "Agent batch size", &C::batch_size),
      MakeField("lora_rank", "LoRA rank r", &C::lora_rank),
      MakeField("lora_alpha", "LoRA alpha", &C::lora_alpha),
      MakeField("lora_target_modules", "LoRA target modules (comma separated)",
                &C::lora_target_modules),
      MakeField("lora_init_seed", "Seed of the shared initial LoRA A matrices", &C::lora_init_seed),
      MakeField("round_deadline_s", "Seconds agents have to submit their update",
                &C::round_deadline_s),
      MakeField("max_update_bytes", "Largest sealed update accepted (bytes)", &C::max_update_bytes),
      MakeField("max_concurrent_uploads",
                "SubmitUpdate uploads read at once; more wait with their bytes in the client "
                "(payload memory ~ this x update size)",
                &C::max_concurrent_uploads),
      MakeField("grpc_bdp_probe",
                "Let gRPC grow HTTP/2 receive windows by BDP probing (faster uploads on "
                "long-RTT links; waiting uploads may then hold megabytes each)",
                &C::grpc_bdp_probe),
      MakeField("grpc_memory_quota_mb",
                "Memory quota of all gRPC connections of the main port (MiB; under its "
                "pressure gRPC reads in smaller pieces and frees idle buffers, at it it may "
                "cancel calls; 0 = none)",
                &C::grpc_memory_quota_mb),
      MakeField("store_memtable_mb",
                "RocksDB memtable budget of all column families together (MiB; 0 = RocksDB "
                "defaults, up to 2 x 64 MiB per column family)",
                &C::store_memtable_mb),
      MakeField("heartbeat_interval_ms", "Heartbeat interval told to agents",
                &C::heartbeat_interval_ms),
      MakeField("eval_grace_s", "Seconds to wait for eval reports after a publish",
                &C::eval_grace_s),
      MakeField("tick_ms", "Round manager timer period (ms)", &C::tick_ms),
      MakeField("shutdown_grace_ms", "Deadline for in-flight calls at shutdown (ms)",
                &C::shutdown_grace_ms),
      MakeField("worker_threads", "Threads for decryption, parsing and aggregation",
                &C::worker_threads),
      MakeField("secure_aggregation",
                "Secure aggregation: auto (rounds of >= 3 agents) | on | off", &C::secure_aggregation),
      MakeField("secagg_neighbours", "SecAgg+ neighbourhood size k (0 = default for the cohort)",
                &C::secagg_neighbours),
      MakeField("secagg_threshold", "Shamir threshold t (0 = majority of each neighbourhood)",
                &C::secagg_threshold),
      MakeField("secagg_clip_range", "Fixed-point range R: adapter values clipped to [-R, R]",
                &C::secagg_clip_range),
      MakeField("secagg_phase_timeout_s", "Seconds for each secure-aggregation phase",
                &C::secagg_phase_timeout_s),
      MakeField("dp_clip_norm", "DP: agents clip their update to this L2 norm (0 = no DP)",
                &C::dp_clip_norm),
      MakeField("dp_noise_multiplier", "DP: Gaussian noise multiplier sigma", &C::dp_noise_multiplier),
      MakeField("dp_epsilon_budget", "DP: refuse rounds past this epsilon (0 = no limit)",
                &C::dp_epsilon_budget),
      MakeField("dp_delta", "DP: delta of the reported (epsilon, delta)", &C::dp_delta),
      MakeField("robust_rule",
                "Robust aggregation of sealed updates: none | mean | trimmed-mean | median",
                &C::robust_rule),
      MakeField("robust_trim_fraction", "trimmed-mean: fraction dropped at each end",
                &C::robust_trim_fraction),
      MakeField("robust_norm_bound",
                "Norm bound before the robust rule: none | absolute | median-multiple",
                &C::robust_norm_bound),
      MakeField("robust_norm_bound_value", "The bound B, or the multiple of the median norm",
                &C::robust_norm_bound_value),
      MakeField("mode",
                "Rounds: sync (selected agents, deadline) | async (FedBuff: buffered, "
                "staleness-weighted)",
                &C::mode),
      MakeField("async_buffer_size", "async: updates aggregated into each published version (K)",
                &C::async_buffer_size),
      MakeField("async_concurrency", "async: most agents training at once", &C::async_concurrency),
      MakeField("async_max_staleness",
                "async: refuse updates whose base version is more than this many versions old",
                &C::async_max_staleness),
      MakeField("async_staleness_weight",
                "async: staleness weight s(tau): constant | polynomial (1/(1+tau)^a)",
                &C::async_staleness_weight),
      MakeField("async_staleness_exponent", "async: exponent a of the polynomial staleness weight",
                &C::async_staleness_exponent),
      MakeField("async_server_lr",
                "async: server learning rate (next = current + lr * weighted mean delta)",
                &C::async_server_lr),
      MakeField("log_format", "Log format on stderr: text | json", &C::log_format),
      MakeField("log_level", "Log level: debug | info | warn | error", &C::log_level),
      MakeField("publish_quant",
                "Quantization of published adapters: q8_0 | q4_0 (error reported per version)",
                &C::publish_quant),
  };
  return *fields;
}

// The `aggregation:` section: YAML key, flag, help, member.
struct AggregationKey {
  const char* key;
  const char* flag;
  const char* help;
  double StrategyParams::*member;  // null for "strategy"
};
const AggregationKey kAggregationKeys[] = {
    {"strategy", "--strategy",
     "Aggregation: fedavg | fedprox | fedadam | fedyogi | ffa-lora | lora-product", nullptr},
    {"prox_mu", "--prox-mu", "FedProx proximal weight mu sent to agents", &StrategyParams::prox_mu},
    {"server_lr", "--server-lr", "FedAdam/FedYogi server learning rate eta",
     &StrategyParams::server_lr},
    {"beta1", "--beta1", "FedAdam/FedYogi first-moment decay", &StrategyParams::beta1},
    {"beta2", "--beta2", "FedAdam/FedYogi second-moment decay", &StrategyParams::beta2},
    {"tau", "--tau", "FedAdam/FedYogi adaptivity (denominator offset)", &StrategyParams::tau},
};

void AddAggregationFlags(CLI::App& app, CoordinatorConfig* cfg) {
  for (const AggregationKey& k : kAggregationKeys) {
    if (k.member == nullptr) {
      app.add_option_function<std::string>(
             k.flag,
             [cfg](const std::string& value) {
               auto strategy = ParseStrategy(value);
               if (!strategy.ok()) {
                 throw CLI::ValidationError("--strategy", std::string(strategy.status().message()));
               }
               cfg->aggregation.strategy = *strategy;
             },
             k.help)
          ->default_str(StrategyName(cfg->aggregation.strategy));
    } else {
      app.add_option(k.flag, cfg->aggregation.*(k.member), k.help)->capture_default_str();
    }
  }
}

absl::Status LoadAggregation(const YAML::Node& node, const std::string& source, int line,
                             CoordinatorConfig* config) {
  if (node.IsNull()) return absl::OkStatus();
  if (!node.IsMap()) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ":", line, ": config key 'aggregation': expected a mapping of strategy, ",
        "prox_mu, server_lr, beta1, beta2, tau"));
  }
  for (const auto& kv : node) {
    const int sub_line = kv.first.Mark().line + 1;
    std::string key;
    try {
      key = kv.first.as<std::string>();
    } catch (const YAML::Exception&) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ":", sub_line, ": aggregation key is not a string"));
    }
    const AggregationKey* found = nullptr;
    std::vector<std::string> known;
    for (const AggregationKey& k : kAggregationKeys) {
      if (key == k.key) found = &k;
      known.push_back(k.key);
    }
    if (found == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ":", sub_line, ": unknown config key 'aggregation.", key,
                       "'; known keys: ", absl::StrJoin(known, ", ")));
    }
    try {
      if (found->member == nullptr) {
        auto strategy = ParseStrategy(kv.second.as<std::string>());
        if (!strategy.ok()) {
          return absl::InvalidArgumentError(absl::StrCat(source, ":", sub_line,
                                                         ": config key 'aggregation.strategy': ",
                                                         strategy.status().message()));
        }
        config->aggregation.strategy = *strategy;
      } else {
        config->aggregation.*(found->member) = kv.second.as<double>();
      }
    } catch (const YAML::Exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(source, ":", sub_line, ": config key 'aggregation.",
                                                     key, "': value has the wrong type (", e.msg,
                                                     ")"));
    }
  }
  return absl::OkStatus();
}

void AddFlags(CLI::App& app, CoordinatorConfig* cfg, std::string* config_path) {
  app.add_option("--config", *config_path,
                 "YAML config file (flat keys = flag names with '_'); flags override it");
  for (const Field& f : Fields()) f.add_flag(app, cfg);
  AddAggregationFlags(app, cfg);
}

}  // namespace

absl::Status CoordinatorConfig::Validate() const {
  auto bad = [](const std::string& field, const std::string& expected, const std::string& found) {
    return absl::InvalidArgumentError(
        absl::StrCat("config field '", field, "': expected ", expected, ", found ", found));
  };
  if (listen_address.empty() || listen_address.find(':') == std::string::npos) {
    return bad("listen_address", "HOST:PORT", "'" + listen_address + "'");
  }
  if (!metrics_address.empty() && metrics_address.find(':') == std::string::npos) {
    return bad("metrics_address", "HOST:PORT or empty", "'" + metrics_address + "'");
  }
  if (data_dir.empty()) return bad("data_dir", "a directory", "''");
  if (!enroll_address.empty() && enroll_address.find(':') == std::string::npos) {
    return bad("enroll_address", "HOST:PORT or empty", "'" + enroll_address + "'");
  }
  if (!enroll_address.empty() && ca_key.empty()) {
    return bad("ca_key", "the CA key file when enroll_address is set", "''");
  }
  if (enrollment_approval != "token" && enrollment_approval != "admin") {
    return bad("enrollment_approval", "'token' or 'admin'", "'" + enrollment_approval + "'");
  }
  if (enrollment_approval == "admin" && enroll_address.empty()) {
    return bad("enroll_address", "HOST:PORT when enrollment_approval is admin", "''");
  }
  if (cert_validity_days < 1 || cert_validity_days > 3650) {
    return bad("cert_validity_days", "1..3650", absl::StrCat(cert_validity_days));
  }
  if (tls_ca.empty() || tls_cert.empty() || tls_key.empty()) {
    return bad("tls_ca/tls_cert/tls_key", "all three PEM files",
               absl::StrCat("ca='", tls_ca, "' cert='", tls_cert, "' key='", tls_key, "'"));
  }
  if (base_model_hash.empty() == base_model_dir.empty()) {
    return bad("base_model_hash/base_model_dir", "exactly one of them",
               base_model_hash.empty() ? "neither" : "both");
  }
  if (!base_model_hash.empty() && base_model_hash.size() != 64) {
    return bad("base_model_hash", "64 hex characters",
               absl::StrCat(base_model_hash.size(), " characters"));
  }
  if (min_participants < 1) return bad("min_participants", ">= 1", "0");
  if (max_participants < min_participants) {
    return bad("max_participants", absl::StrCat(">= min_participants (", min_participants, ")"),
               absl::StrCat(max_participants));
  }
  if (local_steps < 1) return bad("local_steps", ">= 1", "0");
  if (!(learning_rate > 0) || !std::isfinite(learning_rate)) {
    return bad("learning_rate", "a positive number", absl::StrCat(learning_rate));
  }
  if (batch_size < 1) return bad("batch_size", ">= 1", "0");
  if (lora_rank < 1) return bad("lora_rank", ">= 1", "0");
  if (!(lora_alpha > 0) || !std::isfinite(lora_alpha)) {
    return bad("lora_alpha", "a positive number", absl::StrCat(lora_alpha));
  }
  if (lora_target_modules.empty()) return bad("lora_target_modules", "at least one module", "none");
  if (round_deadline_s < 1) return bad("round_deadline_s", ">= 1", "0");
  if (max_update_bytes < 1) return bad("max_update_bytes", ">= 1", "0");
  if (max_concurrent_uploads < 1) return bad("max_concurrent_uploads", ">= 1", "0");
  if (heartbeat_interval_ms < 1) return bad("heartbeat_interval_ms", ">= 1", "0");
  if (tick_ms < 1) return bad("tick_ms", ">= 1", "0");
  if (worker_threads < 1) return bad("worker_threads", ">= 1", "0");
  if (log_format != "text" && log_format != "json") {
    return bad("log_format", "text or json", "'" + log_format + "'");
  }
  if (log_level != "debug" && log_level != "info" && log_level != "warn" && log_level != "error") {
    return bad("log_level", "debug, info, warn or error", "'" + log_level + "'");
  }
  if (publish_quant != "q8_0" && publish_quant != "q4_0") {
    return bad("publish_quant", "q8_0 or q4_0", "'" + publish_quant + "'");
  }
  if (absl::Status s = ValidateStrategyParams(aggregation); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("config field ", s.message()));
  }
  if (secure_aggregation != "auto" && secure_aggregation != "on" && secure_aggregation != "off") {
    return bad("secure_aggregation", "auto, on or off", "'" + secure_aggregation + "'");
  }
  if (!(secagg_clip_range > 0) || !std::isfinite(secagg_clip_range)) {
    return bad("secagg_clip_range", "a positive number", absl::StrCat(secagg_clip_range));
  }
  if (secagg_phase_timeout_s < 1) return bad("secagg_phase_timeout_s", ">= 1", "0");
  const bool per_agent_strategy = aggregation.strategy == Strategy::kLoraProduct ||
                                  aggregation.strategy == Strategy::kFfaLora;
  if (secure_aggregation == "on" && per_agent_strategy) {
    return bad("secure_aggregation",
               "auto or off with strategy lora-product or ffa-lora (they need each agent's "
               "factors; secure aggregation reveals only their sum)",
               "'" + secure_aggregation + "'");
  }
  if (mode != "sync" && mode != "async") return bad("mode", "sync or async", "'" + mode + "'");
  if (async_buffer_size < 1) return bad("async_buffer_size", ">= 1", "0");
  if (async_concurrency < 1) return bad("async_concurrency", ">= 1", "0");
  if (!ParseStalenessWeight(async_staleness_weight).ok()) {
    return bad("async_staleness_weight", "constant or polynomial",
               "'" + async_staleness_weight + "'");
  }
  if (!(async_staleness_exponent >= 0) || !std::isfinite(async_staleness_exponent)) {
    return bad("async_staleness_exponent", "a finite number >= 0",
               absl::StrCat(async_staleness_exponent));
  }
  if (!(async_server_lr > 0) || !std::isfinite(async_server_lr)) {
    return bad("async_server_lr", "a finite number > 0", absl::StrCat(async_server_lr));
  }
  if (async_mode()) {
    if (secure_aggregation == "on") {
      return bad("secure_aggregation",
                 "auto or off with mode async (secure aggregation needs a cohort that reports "
                 "together; auto means off in async mode)",
                 "'on'");
    }
    if (aggregation.strategy != Strategy::kFedAvg && aggregation.strategy != Strategy::kFedProx) {
      return bad("aggregation.strategy",
                 "fedavg or fedprox with mode async (the buffer is aggregated by FedBuff)",
                 absl::StrCat("'", StrategyName(aggregation.strategy), "'"));
    }
    if (robust_rule != "none") {
      return bad("robust_rule", "none with mode async", "'" + robust_rule + "'");
    }
    if (dp_clip_norm != 0) {
      return bad("dp_clip_norm", "0 with mode async (DP needs secure aggregation)",
                 absl::StrCat(dp_clip_norm));
    }
  }
  if (robust_rule != "none") {
    auto robust = RobustOptionsFromConfig(*this);
    if (!robust.ok()) return absl::InvalidArgumentError(absl::StrCat("config field ", robust.status().message()));
    if (secure_aggregation == "on") {
      return bad("secure_aggregation",
                 "auto or off with a robust_rule (robust rules compare individual updates)",
                 "'on'");
    }
    if (per_agent_strategy) {
      return bad("robust_rule", "none with strategy ffa-lora or lora-product",
                 "'" + robust_rule + "'");
    }
    if (dp_clip_norm > 0) {
      return bad("dp_clip_norm", "0 with a robust_rule (DP needs secure aggregation)",
                 absl::StrCat(dp_clip_norm));
    }
  }
  if (!(dp_clip_norm >= 0) || !std::isfinite(dp_clip_norm)) {
    return bad("dp_clip_norm", "a number >= 0", absl::StrCat(dp_clip_norm));
  }
  if (dp_clip_norm > 0) {
    if (secure_aggregation == "off" || per_agent_strategy) {
      return bad("dp_clip_norm",
                 "0 when secure_aggregation is off (agents add noise shares only in secure "
                 "rounds)",
                 absl::StrCat(dp_clip_norm));
    }
    if (!(dp_noise_multiplier > 0) || !std::isfinite(dp_noise_multiplier)) {
      return bad("dp_noise_multiplier", "a positive number", absl::StrCat(dp_noise_multiplier));
    }
    if (!(dp_delta > 0 && dp_delta < 1)) {
      return bad("dp_delta", "a number in (0, 1)", absl::StrCat(dp_delta));
    }
    if (!(dp_epsilon_budget >= 0) || !std::isfinite(dp_epsilon_budget)) {
      return bad("dp_epsilon_budget", "a number >= 0", absl::StrCat(dp_epsilon_budget));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<RobustOptions> RobustOptionsFromConfig(const CoordinatorConfig& config) {
  RobustOptions o;
  if (config.robust_rule == "mean") {
    o.rule = RobustRule::kMean;
  } else if (config.robust_rule == "trimmed-mean") {
    o.rule = RobustRule::kTrimmedMean;
  } else if (config.robust_rule == "median") {
    o.rule = RobustRule::kMedian;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "robust_rule: expected none, mean, trimmed-mean or median, found '", config.robust_rule,
        "'"));
  }
  if (config.robust_norm_bound == "none") {
    o.norm_bound = NormBound::kNone;
  } else if (config.robust_norm_bound == "absolute") {
    o.norm_bound = NormBound::kAbsolute;
  } else if (config.robust_norm_bound == "median-multiple") {
    o.norm_bound = NormBound::kMedianMultiple;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "robust_norm_bound: expected none, absolute or median-multiple, found '",
        config.robust_norm_bound, "'"));
  }
  o.trim_fraction = config.robust_trim_fraction;
  o.norm_bound_value = config.robust_norm_bound_value;
  RETURN_IF_ERROR(ValidateRobustOptions(o));
  return o;
}

FedBuffOptions CoordinatorConfig::fedbuff() const {
  FedBuffOptions o;
  o.server_lr = async_server_lr;
  o.weight = ParseStalenessWeight(async_staleness_weight).value_or(StalenessWeight::kPolynomial);
  o.exponent = async_staleness_exponent;
  return o;
}

bool CoordinatorConfig::SecureAggregationFor(size_t participants) const {
  if (secure_aggregation == "off") return false;
  if (async_mode()) return false;  // no cohort reports together (Validate refuses "on")
  if (robust_rule != "none") return false;  // robust rules need each update
  if (aggregation.strategy == Strategy::kLoraProduct ||
      aggregation.strategy == Strategy::kFfaLora) {
    return false;  // per-agent strategies (Validate refuses "on" with them)
  }
  return participants >= 3;
}

absl::Status LoadYamlString(const std::string& yaml, const std::string& source,
                            CoordinatorConfig* config) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ":", e.mark.line + 1, ": YAML syntax error: ", e.msg));
  }
  if (root.IsNull()) return absl::OkStatus();  // empty file
  if (!root.IsMap()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": expected a mapping of config keys at the top level"));
  }
  for (const auto& kv : root) {
    std::string key;
    try {
      key = kv.first.as<std::string>();
    } catch (const YAML::Exception& e) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ":", kv.first.Mark().line + 1, ": config key is not a string"));
    }
    const Field* field = nullptr;
    for (const Field& f : Fields()) {
      if (f.key == key) field = &f;
    }
    const int line = kv.first.Mark().line + 1;
    if (key == "aggregation") {
      RETURN_IF_ERROR(LoadAggregation(kv.second, source, line, config));
      continue;
    }
    if (field == nullptr) {
      std::vector<std::string> known;
      for (const Field& f : Fields()) known.push_back(f.key);
      known.push_back("aggregation");
      return absl::InvalidArgumentError(
          absl::StrCat(source, ":", line, ": unknown config key '", key,
                       "'; known keys: ", absl::StrJoin(known, ", ")));
    }
    try {
      field->load(kv.second, config);
    } catch (const YAML::Exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(source, ":", line, ": config key '", key,
                                                     "': value has the wrong type (", e.msg, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status LoadYamlFile(const std::string& path, CoordinatorConfig* config) {
  ASSIGN_OR_RETURN(std::string text, common::ReadFileToString(path));
  return LoadYamlString(text, path, config);
}

std::string CoordinatorHelp() {
  CoordinatorConfig cfg;
  std::string config_path;
  CLI::App app{"fedlora-coordinator: runs federated LoRA rounds over mutual-TLS gRPC",
               "fedlora-coordinator"};
  AddFlags(app, &cfg, &config_path);
  return app.help();
}

absl::StatusOr<CoordinatorConfig> ParseCoordinatorFlags(int argc, const char* const* argv) {
  CoordinatorConfig cfg;
  std::string config_path;
  CLI::App app{"fedlora-coordinator: runs federated LoRA rounds over mutual-TLS gRPC",
               "fedlora-coordinator"};
  AddFlags(app, &cfg, &config_path);
  auto parse = [&]() -> absl::Status {
    try {
      app.parse(argc, argv);
    } catch (const CLI::CallForHelp&) {
      std::cout << app.help();
      return absl::CancelledError("help requested");
    } catch (const CLI::ParseError& e) {
      return absl::InvalidArgumentError(absl::StrCat("command line: ", e.what()));
    }
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(parse());
  if (!config_path.empty()) {
    // Defaults, then the file, then the flags again (they win).
    cfg = CoordinatorConfig{};
    RETURN_IF_ERROR(LoadYamlFile(config_path, &cfg));
    RETURN_IF_ERROR(parse());
  }
  RETURN_IF_ERROR(cfg.Validate());
  return cfg;
}

}  // namespace fedlora::coordinator
