// fedlora-admin end to end, in process: PKI commands, and `status` against a
// real server started on 127.0.0.1:0.
#include "coordinator/admin/admin_cli.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <filesystem>
#include <sstream>

#include "common/crypto/crypto.h"
#include "common/crypto/pki.h"
#include "common/export/gguf.h"
#include "common/export/peft_export.h"
#include "common/quant/quant.h"
#include "coordinator/state_store.h"
#include "coordinator/server.h"
#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;
using testing::kBaseHash;
using testing::CliResult;
using testing::RunCli;
using testing::TempDir;



TEST(AdminCliTest, PkiInitIssueAndStatus) {
  TempDir dir;
  const std::string pki = dir.Sub("pki");
  CliResult init = RunCli({"pki", "init", pki, "--san", "localhost", "--san", "127.0.0.1"});
  ASSERT_EQ(init.code, 0) << init.err;
  for (const char* f : {"ca.pem", "ca.key", "coordinator.pem", "admin.pem", "admin.key"}) {
    EXPECT_TRUE(common::ReadFileToString(pki + "/" + f).ok()) << f;
  }
  // A second init refuses to overwrite the CA.
  EXPECT_EQ(RunCli({"pki", "init", pki}).code, 1);

  CliResult issue = RunCli(
      {"pki", "issue", "--ca-dir", pki, "--name", "agent-7", "--role", "agent", "--out", pki});
  ASSERT_EQ(issue.code, 0) << issue.err;
  auto pem = common::ReadFileToString(pki + "/agent-7.pem");
  ASSERT_TRUE(pem.ok());
  auto id = common::ReadCertIdentity(*pem);
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(id->common_name, "agent-7");
  EXPECT_EQ(id->role, "agent");
  EXPECT_EQ(
      RunCli({"pki", "issue", "--ca-dir", pki, "--name", "x", "--role", "root", "--out", pki}).code,
      2);

  CoordinatorConfig config;
  config.listen_address = "127.0.0.1:0";
  config.data_dir = dir.Sub("data");
  config.tls_ca = pki + "/ca.pem";
  config.tls_cert = pki + "/coordinator.pem";
  config.tls_key = pki + "/coordinator.key";
  config.base_model_hash = kBaseHash;
  config.coordinator_id = "coord-under-test";
  std::ostringstream server_out;
  ServerOptions options;
  options.out = &server_out;
  auto server = CoordinatorServer::Start(config, options);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string target = "127.0.0.1:" + std::to_string((*server)->port());
  const std::vector<std::string> admin = {"--coordinator", target,
                                          "--ca",          pki + "/ca.pem",
                                          "--cert",        pki + "/admin.pem",
                                          "--key",         pki + "/admin.key",
                                          "--timeout-s",   "10"};
  std::vector<std::string> args = admin;
  args.push_back("status");
  CliResult text = RunCli(args);
  ASSERT_EQ(text.code, 0) << text.err;
  EXPECT_THAT(text.out, HasSubstr("coordinator:      coord-under-test"));
  EXPECT_THAT(text.out, HasSubstr("round:            0 (IDLE)"));
  EXPECT_THAT(text.out, HasSubstr("updates rejected: 0"));

  args.push_back("--json");
  CliResult json = RunCli(args);
  ASSERT_EQ(json.code, 0) << json.err;
  auto j = nlohmann::json::parse(json.out);
  EXPECT_EQ(j["coordinator_id"], "coord-under-test");
  EXPECT_EQ(j["current_phase"], "IDLE");

  // An agent certificate may not call Admin.Status.
  std::vector<std::string> as_agent = {"--coordinator", target,
                                       "--ca",          pki + "/ca.pem",
                                       "--cert",        pki + "/agent-7.pem",
                                       "--key",         pki + "/agent-7.key",
                                       "status"};
  CliResult denied = RunCli(as_agent);
  EXPECT_EQ(denied.code, 1);
  EXPECT_THAT(denied.err, HasSubstr("code 7"));
  EXPECT_THAT(denied.err, HasSubstr("role 'agent'"));

  // Missing connection flags is a usage error.
  EXPECT_EQ(RunCli({"status"}).code, 2);
  EXPECT_EQ(RunCli({}).code, 2);
  (*server)->Shutdown();
}

TEST(AdminCliTest, HelpExitsZero) {
  CliResult help = RunCli({"--help"});
  EXPECT_EQ(help.code, 0);
  EXPECT_THAT(help.out, HasSubstr("status"));
  CliResult issue_help = RunCli({"pki", "issue", "--help"});
  EXPECT_EQ(issue_help.code, 0);
  EXPECT_THAT(issue_help.out, HasSubstr("--role"));
}

TEST(AdminCliTest, ModelsExportWhileStoreIsHeldOpen) {
  const std::string base = std::string(FEDLORA_FIXTURES) + "/hf/llama";
  auto adapter = common::ReadPeftAdapter(base + "/adapter");
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  TempDir dir;
  const std::string data = dir.Sub("data");
  // The "coordinator" holds the store open (and its LOCK) throughout.
  auto store = StateStore::Open(data);
  ASSERT_TRUE(store.ok()) << store.status();
  std::string blob = common::EncodeAdapterBlob(
      adapter->tensors, common::Quant::kQ8_0,
      {{"fedlora.lora.rank", "4"},
       {"fedlora.lora.alpha", "8"},
       {"fedlora.lora.target_modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"}});
  RoundRecord round;
  round.round_id = 5;
  round.phase = RoundPhase::kDone;
  round.version_id = VersionId(5);
  VersionRecord version;
  version.version_id = VersionId(5);
  version.round_id = 5;
  version.sha256 = common::Sha256Hex(blob);
  version.size_bytes = blob.size();
  ASSERT_TRUE((*store)->Publish(round, version, blob).ok());

  CliResult peft = RunCli({"models", "export", "latest", "--data-dir", data, "--format", "peft",
                           "--out", dir.Sub("peft")});
  ASSERT_EQ(peft.code, 0) << peft.err;
  EXPECT_THAT(peft.out, HasSubstr("exported v000005 as peft"));
  EXPECT_THAT(peft.out, HasSubstr("r=4 alpha=8"));
  auto back = common::ReadPeftAdapter(dir.Sub("peft"));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->config.r, 4);
  EXPECT_DOUBLE_EQ(back->config.lora_alpha, 8);
  EXPECT_EQ(back->tensors.size(), adapter->tensors.size());

  CliResult merged =
      RunCli({"models", "export", "v000005", "--data-dir", data, "--base-model", base, "--format",
              "gguf-merged", "--quant", "q8_0", "--out", dir.Sub("m.gguf")});
  ASSERT_EQ(merged.code, 0) << merged.err;
  auto gguf = common::GgufFile::Open(dir.Sub("m.gguf"));
  ASSERT_TRUE(gguf.ok()) << gguf.status();
  EXPECT_EQ((*gguf)->FindTensor("blk.0.attn_q.weight")->type, common::GgmlType::kQ8_0);

  CliResult lora = RunCli({"models", "export", "current", "--data-dir", data, "--base-model",
                           base, "--format", "gguf-lora", "--out", dir.Sub("a.gguf")});
  ASSERT_EQ(lora.code, 0) << lora.err;
  auto lora_file = common::GgufFile::Open(dir.Sub("a.gguf"));
  ASSERT_TRUE(lora_file.ok()) << lora_file.status();
  EXPECT_NE((*lora_file)->FindTensor("blk.1.ffn_down.weight.lora_b"), nullptr);

  // Unknown version: exit 1, named, nothing written.
  CliResult missing = RunCli({"models", "export", "v000099", "--data-dir", data, "--format",
                              "peft", "--out", dir.Sub("x")});
  EXPECT_EQ(missing.code, 1);
  EXPECT_THAT(missing.err, HasSubstr("v000099"));
  EXPECT_THAT(missing.err, HasSubstr("not found"));
  EXPECT_FALSE(std::filesystem::exists(dir.Sub("x")));
  // Usage errors: exit 2.
  EXPECT_EQ(RunCli({"models", "export", "latest", "--data-dir", data, "--format", "onnx", "--out",
                    dir.Sub("y")})
                .code,
            2);
  CliResult no_base = RunCli({"models", "export", "latest", "--data-dir", data, "--format",
                              "gguf-lora", "--out", dir.Sub("y.gguf")});
  EXPECT_EQ(no_base.code, 2);
  EXPECT_THAT(no_base.err, HasSubstr("--base-model"));
  EXPECT_EQ(RunCli({"models", "export", "latest", "--format", "peft", "--out", dir.Sub("y")}).code,
            2);
  EXPECT_FALSE(std::filesystem::exists(dir.Sub("y")));
  EXPECT_FALSE(std::filesystem::exists(dir.Sub("y.gguf")));
  CliResult help = RunCli({"models", "export", "--help"});
  EXPECT_EQ(help.code, 0);
  EXPECT_THAT(help.out, HasSubstr("--base-model"));
}

}  // namespace
}  // namespace fedlora::coordinator
