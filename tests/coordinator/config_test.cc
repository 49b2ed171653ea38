#include "coordinator/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/crypto/crypto.h"
#include "coordinator/state_store.h"
#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;

TEST(ConfigTest, YamlThenFlagsOverride) {
  CoordinatorConfig cfg;
  ASSERT_TRUE(LoadYamlString("min_participants: 3\nmax_participants: 5\n"
                             "lora_target_modules: [q_proj, k_proj, v_proj]\n"
                             "learning_rate: 0.001\n",
                             "test.yaml", &cfg)
                  .ok());
  EXPECT_EQ(cfg.min_participants, 3u);
  EXPECT_EQ(cfg.lora_target_modules.size(), 3u);
  EXPECT_DOUBLE_EQ(cfg.learning_rate, 0.001);
}

TEST(ConfigTest, UnknownKeyIsAnErrorNamingIt) {
  CoordinatorConfig cfg;
  absl::Status s = LoadYamlString("min_participants: 3\nmin_participant: 4\n", "c.yaml", &cfg);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("c.yaml:2: unknown config key 'min_participant'"));
}

TEST(ConfigTest, WrongTypeIsAnError) {
  CoordinatorConfig cfg;
  absl::Status s = LoadYamlString("rounds: many\n", "c.yaml", &cfg);
  EXPECT_THAT(std::string(s.message()), HasSubstr("'rounds'"));
  EXPECT_FALSE(LoadYamlString("[1, 2]", "c.yaml", &cfg).ok());
  EXPECT_FALSE(LoadYamlString("a: [", "c.yaml", &cfg).ok());
}

TEST(ConfigTest, FlagsParseAndValidate) {
  const std::string hash(64, 'a');
  std::vector<const char*> argv = {"fedlora-coordinator",
                                   "--tls-ca",
                                   "ca.pem",
                                   "--tls-cert",
                                   "c.pem",
                                   "--tls-key",
                                   "c.key",
                                   "--base-model-hash",
                                   hash.c_str(),
                                   "--rounds",
                                   "3",
                                   "--lora-target-modules",
                                   "q_proj,o_proj"};
  auto cfg = ParseCoordinatorFlags(static_cast<int>(argv.size()), argv.data());
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->rounds, 3u);
  EXPECT_EQ(cfg->lora_target_modules, (std::vector<std::string>{"q_proj", "o_proj"}));

  std::vector<const char*> bad = {"fedlora-coordinator", "--tls-ca", "ca.pem"};
  auto missing = ParseCoordinatorFlags(static_cast<int>(bad.size()), bad.data());
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("tls_ca/tls_cert/tls_key"));

  std::vector<const char*> unknown = {"fedlora-coordinator", "--no-such-flag", "1"};
  EXPECT_EQ(ParseCoordinatorFlags(3, unknown.data()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ConfigTest, ValidateCrossFieldRules) {
  CoordinatorConfig cfg;
  cfg.tls_ca = cfg.tls_cert = cfg.tls_key = "x";
  cfg.base_model_hash = std::string(64, 'a');
  EXPECT_TRUE(cfg.Validate().ok());
  cfg.max_participants = 1;
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("max_participants"));
  cfg.max_participants = 10;
  cfg.base_model_dir = "/models/x";
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("exactly one"));
  cfg.base_model_dir = "";
  cfg.log_format = "xml";
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("log_format"));
  EXPECT_THAT(CoordinatorHelp(), HasSubstr("--min-participants"));
}

TEST(ConfigTest, EnrollmentFieldsAreValidated) {
  CoordinatorConfig cfg;
  cfg.tls_ca = cfg.tls_cert = cfg.tls_key = "x";
  cfg.base_model_hash = std::string(64, 'a');
  cfg.enroll_address = "0.0.0.0:7444";
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("ca_key"));
  cfg.ca_key = "ca.key";
  EXPECT_TRUE(cfg.Validate().ok());
  cfg.enroll_address = "7444";
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("enroll_address"));
  cfg.enroll_address = "";
  cfg.cert_validity_days = 0;
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("cert_validity_days"));
  cfg.cert_validity_days = 30;
  EXPECT_TRUE(cfg.Validate().ok());
  cfg.enrollment_approval = "admins";
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("enrollment_approval"));
  cfg.enrollment_approval = "admin";  // needs the enrollment port
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("enroll_address"));
  cfg.enroll_address = "0.0.0.0:7444";
  EXPECT_TRUE(cfg.Validate().ok());
  cfg.enroll_address = "";
  cfg.enrollment_approval = "token";
  const std::string help = CoordinatorHelp();
  EXPECT_THAT(help, HasSubstr("--enrollment-approval"));
  EXPECT_THAT(help, HasSubstr("--enroll-address"));
  EXPECT_THAT(help, HasSubstr("--ca-key"));
  EXPECT_THAT(help, HasSubstr("--cert-validity-days"));
}

TEST(ConfigTest, ConfigFileThenFlagsWin) {
  testing::TempDir dir;
  const std::string path = dir.Sub("coordinator.yaml");
  const std::string hash(64, 'd');
  ASSERT_TRUE(common::WriteFileAtomic(path,
                                      "tls_ca: ca.pem\ntls_cert: c.pem\ntls_key: c.key\n"
                                      "base_model_hash: " +
                                          hash +
                                          "\n"
                                          "min_participants: 3\nmax_participants: 4\n"
                                          "rounds: 2\nlog_format: json\n")
                  .ok());
  std::vector<const char*> argv = {"fedlora-coordinator", "--rounds", "5", "--config",
                                   path.c_str()};
  auto cfg = ParseCoordinatorFlags(static_cast<int>(argv.size()), argv.data());
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->rounds, 5u);            // the flag wins
  EXPECT_EQ(cfg->min_participants, 3u);  // from the file
  EXPECT_EQ(cfg->log_format, "json");
  EXPECT_EQ(cfg->base_model_hash, hash);

  std::vector<const char*> missing = {"fedlora-coordinator", "--config", "/nonexistent.yaml"};
  EXPECT_EQ(ParseCoordinatorFlags(3, missing.data()).status().code(), absl::StatusCode::kNotFound);
}

TEST(ConfigTest, PublishQuantKeyFlagAndValidation) {
  testing::TempDir dir;
  const std::string path = dir.Sub("coordinator.yaml");
  ASSERT_TRUE(common::WriteFileAtomic(path, "tls_ca: ca.pem\ntls_cert: c.pem\ntls_key: c.key\n"
                                            "base_model_hash: " + std::string(64, 'd') +
                                                "\npublish_quant: q4_0\n")
                  .ok());
  EXPECT_EQ(CoordinatorConfig().publish_quant, "q8_0");  // the default
  std::vector<const char*> argv = {"fedlora-coordinator", "--config", path.c_str()};
  auto cfg = ParseCoordinatorFlags(static_cast<int>(argv.size()), argv.data());
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->publish_quant, "q4_0");
  std::vector<const char*> flag = {"fedlora-coordinator", "--config", path.c_str(),
                                   "--publish-quant", "q8_0"};
  cfg = ParseCoordinatorFlags(static_cast<int>(flag.size()), flag.data());
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->publish_quant, "q8_0");  // the flag wins
  std::vector<const char*> bad = {"fedlora-coordinator", "--config", path.c_str(),
                                  "--publish-quant", "q5_1"};
  auto refused = ParseCoordinatorFlags(static_cast<int>(bad.size()), bad.data());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.status().message(), HasSubstr("publish_quant"));
  EXPECT_THAT(CoordinatorHelp(), HasSubstr("--publish-quant"));
}

TEST(ConfigTest, AggregationSectionAndFlags) {
  CoordinatorConfig cfg;
  EXPECT_EQ(cfg.aggregation.strategy, Strategy::kFedAvg);  // the default
  ASSERT_TRUE(LoadYamlString("rounds: 2\naggregation:\n  strategy: fedyogi\n  server_lr: 0.03\n"
                             "  beta1: 0.8\n  beta2: 0.995\n  tau: 0.0001\n  prox_mu: 0.2\n",
                             "a.yaml", &cfg)
                  .ok());
  EXPECT_EQ(cfg.aggregation.strategy, Strategy::kFedYogi);
  EXPECT_DOUBLE_EQ(cfg.aggregation.server_lr, 0.03);
  EXPECT_DOUBLE_EQ(cfg.aggregation.beta1, 0.8);
  EXPECT_DOUBLE_EQ(cfg.aggregation.beta2, 0.995);
  EXPECT_DOUBLE_EQ(cfg.aggregation.tau, 1e-4);
  EXPECT_DOUBLE_EQ(cfg.aggregation.prox_mu, 0.2);

  absl::Status s = LoadYamlString("aggregation:\n  strategy: fedsgd\n", "a.yaml", &cfg);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("a.yaml:2: config key 'aggregation.strategy': unknown aggregation "
                        "strategy 'fedsgd'"));
  s = LoadYamlString("aggregation:\n  strategy: fedavg\n  lr: 1\n", "a.yaml", &cfg);
  EXPECT_THAT(std::string(s.message()), HasSubstr("a.yaml:3: unknown config key 'aggregation.lr'"));
  s = LoadYamlString("aggregation:\n  tau: small\n", "a.yaml", &cfg);
  EXPECT_THAT(std::string(s.message()), HasSubstr("a.yaml:2: config key 'aggregation.tau'"));
  EXPECT_FALSE(LoadYamlString("aggregation: fedavg\n", "a.yaml", &cfg).ok());

  const std::string hash(64, 'a');
  std::vector<const char*> argv = {"fedlora-coordinator", "--tls-ca", "ca.pem", "--tls-cert",
                                   "c.pem", "--tls-key", "c.key", "--base-model-hash",
                                   hash.c_str(), "--strategy", "ffa-lora", "--prox-mu", "0.5",
                                   "--server-lr", "0.1", "--beta1", "0.5", "--beta2", "0.9",
                                   "--tau", "0.01"};
  auto parsed = ParseCoordinatorFlags(static_cast<int>(argv.size()), argv.data());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->aggregation.strategy, Strategy::kFfaLora);
  EXPECT_DOUBLE_EQ(parsed->aggregation.prox_mu, 0.5);
  EXPECT_DOUBLE_EQ(parsed->aggregation.server_lr, 0.1);
  EXPECT_DOUBLE_EQ(parsed->aggregation.beta1, 0.5);
  EXPECT_DOUBLE_EQ(parsed->aggregation.beta2, 0.9);
  EXPECT_DOUBLE_EQ(parsed->aggregation.tau, 0.01);
  argv[10] = "median";
  EXPECT_THAT(std::string(ParseCoordinatorFlags(static_cast<int>(argv.size()), argv.data())
                              .status()
                              .message()),
              HasSubstr("unknown aggregation strategy 'median'"));
  argv[10] = "fedadam";
  argv[18] = "1.5";  // --beta2
  EXPECT_THAT(std::string(ParseCoordinatorFlags(static_cast<int>(argv.size()), argv.data())
                              .status()
                              .message()),
              HasSubstr("aggregation.beta2"));
  EXPECT_THAT(CoordinatorHelp(), HasSubstr("--strategy"));
  EXPECT_THAT(CoordinatorHelp(), HasSubstr("--server-lr"));
}

}  // namespace
}  // namespace fedlora::coordinator

namespace fedlora::coordinator {
namespace {

TEST(ConfigTest, SecureAggregationAndDpRules) {
  CoordinatorConfig cfg;
  cfg.tls_ca = cfg.tls_cert = cfg.tls_key = "x";
  cfg.base_model_hash = std::string(64, 'a');
  ASSERT_TRUE(LoadYamlString("secure_aggregation: on\nsecagg_clip_range: 2.5\n"
                             "dp_clip_norm: 1.5\ndp_noise_multiplier: 0.8\n",
                             "s.yaml", &cfg)
                  .ok());
  EXPECT_TRUE(cfg.Validate().ok()) << cfg.Validate();
  EXPECT_EQ(cfg.secure_aggregation, "on");
  EXPECT_DOUBLE_EQ(cfg.secagg_clip_range, 2.5);
  EXPECT_TRUE(cfg.SecureAggregationFor(3));
  EXPECT_FALSE(cfg.SecureAggregationFor(2));
  cfg.secure_aggregation = "maybe";
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("secure_aggregation"));
  cfg.secure_aggregation = "off";  // DP noise is added in shares: it needs the masks
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("dp_clip_norm"));
  cfg.dp_clip_norm = 0;
  EXPECT_TRUE(cfg.Validate().ok());
  EXPECT_FALSE(cfg.SecureAggregationFor(10));
  cfg.secure_aggregation = "on";
  cfg.aggregation.strategy = Strategy::kLoraProduct;  // needs each agent's factors
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("lora-product"));
  cfg.secure_aggregation = "auto";
  EXPECT_TRUE(cfg.Validate().ok());
  EXPECT_FALSE(cfg.SecureAggregationFor(10));  // auto turns it off for per-agent strategies
  cfg.aggregation.strategy = Strategy::kFedAvg;
  cfg.secagg_clip_range = 0;
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("secagg_clip_range"));
  cfg.secagg_clip_range = 1;
  cfg.dp_clip_norm = 1;
  cfg.dp_delta = 1.5;
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("dp_delta"));
  EXPECT_THAT(CoordinatorHelp(), HasSubstr("--dp-epsilon-budget"));
}

TEST(ConfigTest, RobustRuleRules) {
  CoordinatorConfig cfg;
  cfg.tls_ca = cfg.tls_cert = cfg.tls_key = "x";
  cfg.base_model_hash = std::string(64, 'a');
  cfg.robust_rule = "trimmed-mean";
  cfg.robust_trim_fraction = 0.2;
  ASSERT_TRUE(cfg.Validate().ok()) << cfg.Validate();
  EXPECT_FALSE(cfg.SecureAggregationFor(10));  // robust rules need each update
  auto options = RobustOptionsFromConfig(cfg);
  ASSERT_TRUE(options.ok());
  EXPECT_EQ(options->rule, RobustRule::kTrimmedMean);
  EXPECT_EQ(options->norm_bound, NormBound::kMedianMultiple);
  cfg.robust_trim_fraction = 0.5;
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("trim"));
  cfg.robust_trim_fraction = 0.1;
  cfg.robust_rule = "mode";
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("robust_rule"));
  cfg.robust_rule = "median";
  cfg.secure_aggregation = "on";
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("robust_rule"));
  cfg.secure_aggregation = "auto";
  cfg.robust_norm_bound = "tight";
  EXPECT_THAT(std::string(cfg.Validate().message()), HasSubstr("robust_norm_bound"));
}

TEST(ConfigTest, AsyncModeKeysFlagsAndRules) {
  CoordinatorConfig cfg;
  cfg.tls_ca = cfg.tls_cert = cfg.tls_key = "x";
  cfg.base_model_hash = std::string(64, 'a');
  EXPECT_EQ(cfg.mode, "sync");  // the default keeps synchronous rounds
  ASSERT_TRUE(LoadYamlString("mode: async\nasync_buffer_size: 3\nasync_concurrency: 5\n"
                             "async_max_staleness: 2\nasync_staleness_weight: constant\n"
                             "async_staleness_exponent: 1.5\nasync_server_lr: 0.8\n",
                             "a.yaml", &cfg)
                  .ok());
  ASSERT_TRUE(cfg.Validate().ok()) << cfg.Validate();
  EXPECT_TRUE(cfg.async_mode());
  EXPECT_EQ(cfg.async_buffer_size, 3u);
  EXPECT_EQ(cfg.async_concurrency, 5u);
  EXPECT_EQ(cfg.async_max_staleness, 2u);
  EXPECT_EQ(cfg.fedbuff().weight, StalenessWeight::kConstant);
  EXPECT_DOUBLE_EQ(cfg.fedbuff().exponent, 1.5);
  EXPECT_DOUBLE_EQ(cfg.fedbuff().server_lr, 0.8);
  // secure_aggregation auto (the default) means off in async mode, whatever the cohort.
  EXPECT_FALSE(cfg.SecureAggregationFor(50));

  auto expect_field = [&](CoordinatorConfig c, const std::string& field) {
    absl::Status s = c.Validate();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_THAT(std::string(s.message()), HasSubstr("config field '" + field + "'")) << s;
  };
  CoordinatorConfig c = cfg;
  c.mode = "asynchronous";
  expect_field(c, "mode");
  c = cfg;
  c.async_buffer_size = 0;
  expect_field(c, "async_buffer_size");
  c = cfg;
  c.async_concurrency = 0;
  expect_field(c, "async_concurrency");
  c = cfg;
  c.async_staleness_weight = "hinge";
  expect_field(c, "async_staleness_weight");
  c = cfg;
  c.async_staleness_exponent = -0.5;
  expect_field(c, "async_staleness_exponent");
  c = cfg;
  c.async_server_lr = 0;
  expect_field(c, "async_server_lr");
  c = cfg;
  c.secure_aggregation = "on";  // no cohort reports together
  expect_field(c, "secure_aggregation");
  c.mode = "sync";  // the same setting is fine in sync mode
  EXPECT_TRUE(c.Validate().ok()) << c.Validate();
  c = cfg;
  c.aggregation.strategy = Strategy::kFedAdam;
  expect_field(c, "aggregation.strategy");
  c.aggregation.strategy = Strategy::kFedProx;  // the agent-side proximal term still applies
  EXPECT_TRUE(c.Validate().ok()) << c.Validate();
  c = cfg;
  c.robust_rule = "median";
  expect_field(c, "robust_rule");
  c = cfg;
  c.dp_clip_norm = 1.0;
  expect_field(c, "dp_clip_norm");

  // Flags, and the help text.
  const std::string hash(64, 'a');
  std::vector<const char*> argv = {"fedlora-coordinator",
                                   "--tls-ca",
                                   "ca.pem",
                                   "--tls-cert",
                                   "c.pem",
                                   "--tls-key",
                                   "c.key",
                                   "--base-model-hash",
                                   hash.c_str(),
                                   "--mode",
                                   "async",
                                   "--async-buffer-size",
                                   "4",
                                   "--async-staleness-exponent",
                                   "0.25"};
  auto parsed = ParseCoordinatorFlags(static_cast<int>(argv.size()), argv.data());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_TRUE(parsed->async_mode());
  EXPECT_EQ(parsed->async_buffer_size, 4u);
  EXPECT_DOUBLE_EQ(parsed->async_staleness_exponent, 0.25);
  EXPECT_EQ(parsed->async_staleness_weight, "polynomial");  // FedBuff's default
  std::vector<const char*> bad = argv;
  bad.push_back("--secure-aggregation");
  bad.push_back("on");
  auto refused = ParseCoordinatorFlags(static_cast<int>(bad.size()), bad.data());
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("secure_aggregation"));
  for (const char* flag :
       {"--mode", "--async-buffer-size", "--async-concurrency", "--async-max-staleness",
        "--async-staleness-weight", "--async-staleness-exponent", "--async-server-lr"}) {
    EXPECT_THAT(CoordinatorHelp(), HasSubstr(flag));
  }
}

TEST(ConfigTest, MemoryBoundsKeysFlagsAndDefaults) {
  // The documented defaults (docs/operations.md "Coordinator memory").
  EXPECT_EQ(CoordinatorConfig().grpc_memory_quota_mb, 128u);
  EXPECT_EQ(CoordinatorConfig().store_memtable_mb, 64u);
  CoordinatorConfig cfg;
  ASSERT_TRUE(
      LoadYamlString("grpc_memory_quota_mb: 256\nstore_memtable_mb: 0\n", "c.yaml", &cfg).ok());
  EXPECT_EQ(cfg.grpc_memory_quota_mb, 256u);
  EXPECT_EQ(cfg.store_memtable_mb, 0u);
  const std::string hash(64, 'a');
  std::vector<const char*> argv = {"fedlora-coordinator", "--tls-ca", "ca.pem", "--tls-cert",
                                   "c.pem", "--tls-key", "c.key", "--base-model-hash",
                                   hash.c_str(), "--grpc-memory-quota-mb", "0",
                                   "--store-memtable-mb", "16"};
  auto parsed = ParseCoordinatorFlags(static_cast<int>(argv.size()), argv.data());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->grpc_memory_quota_mb, 0u);
  EXPECT_EQ(parsed->store_memtable_mb, 16u);
  EXPECT_THAT(CoordinatorHelp(), HasSubstr("--grpc-memory-quota-mb"));
  EXPECT_THAT(CoordinatorHelp(), HasSubstr("--store-memtable-mb"));
  auto options = StateStoreOptionsFromConfig(*parsed);
  ASSERT_TRUE(options.ok()) << options.status();
  EXPECT_EQ(options->memtable_budget_bytes, 16ull << 20);
}

}  // namespace
}  // namespace fedlora::coordinator
