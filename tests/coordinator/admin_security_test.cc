// fedlora-admin security commands, in process: keys, pki init's signing key,
// audit verify/list, and audited exports of an encrypted data dir.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "common/crypto/at_rest.h"
#include "common/crypto/crypto.h"
#include "common/crypto/sign.h"
#include "common/export/peft_export.h"
#include "common/quant/quant.h"
#include "coordinator/admin/admin_cli.h"
#include "coordinator/audit.h"
#include "coordinator/state_store.h"
#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;
using testing::kBaseHash;
using testing::CliResult;
using testing::RunCli;
using testing::TempDir;



int Mode(const std::string& path) {
  struct stat st;
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return static_cast<int>(st.st_mode & 0777);
}

TEST(AdminSecurityTest, PkiInitWritesTheSigningKeyAndKeysCommandsRefuseToOverwrite) {
  TempDir dir;
  const std::string pki = dir.Sub("pki");
  CliResult init = RunCli({"pki", "init", pki});
  ASSERT_EQ(init.code, 0) << init.err;
  EXPECT_THAT(init.out, HasSubstr("coordinator-signing.key"));
  EXPECT_EQ(Mode(pki + "/coordinator-signing.key"), 0600);
  auto priv = common::SigningKey::LoadFile(pki + "/coordinator-signing.key");
  auto pub = common::VerifyKey::LoadFile(pki + "/coordinator-signing.pub");
  ASSERT_TRUE(priv.ok() && pub.ok());
  EXPECT_EQ(priv->key_id(), pub->key_id());

  CliResult at_rest = RunCli({"keys", "create-at-rest", dir.Sub("at-rest.key")});
  ASSERT_EQ(at_rest.code, 0) << at_rest.err;
  EXPECT_EQ(Mode(dir.Sub("at-rest.key")), 0600);
  auto cipher = common::AtRestCipher::LoadFile(dir.Sub("at-rest.key"));
  ASSERT_TRUE(cipher.ok());
  EXPECT_THAT(at_rest.out, HasSubstr(cipher->key_id()));
  EXPECT_EQ(RunCli({"keys", "create-at-rest", dir.Sub("at-rest.key")}).code, 1);

  CliResult signing = RunCli({"keys", "create-signing", dir.Sub("other")});
  EXPECT_EQ(signing.code, 1);  // the directory does not exist
  std::filesystem::create_directories(dir.Sub("other"));
  signing = RunCli({"keys", "create-signing", dir.Sub("other")});
  ASSERT_EQ(signing.code, 0) << signing.err;
  EXPECT_EQ(RunCli({"keys", "create-signing", dir.Sub("other")}).code, 1);
  EXPECT_EQ(RunCli({"keys", "create-signing", pki}).code, 1);  // pki init made one
}

class AdminAuditTest : public ::testing::Test {
 protected:
  // An encrypted data dir with one published, signed version and audit records.
  // Audit: seq 1 at_rest.enabled (the key's first open), 2 round.started, 3 round.published.
  void SetUp() override {
    ASSERT_TRUE(common::WriteNewAtRestKeyFile(dir_.Sub("at-rest.key")).ok());
    StateStoreOptions options;
    options.at_rest = *common::AtRestCipher::LoadFile(dir_.Sub("at-rest.key"));
    options.signing_key = *common::SigningKey::Generate();
    auto store = StateStore::Open(data(), options);
    ASSERT_TRUE(store.ok()) << store.status();
    RoundRecord round;
    round.round_id = 1;
    round.participants = {"a", "b"};
    ASSERT_TRUE((*store)->StartRound(round).ok());
    auto adapter =
        common::ReadPeftAdapter(std::string(FEDLORA_FIXTURES) + "/hf/llama/adapter");
    ASSERT_TRUE(adapter.ok()) << adapter.status();
    const std::string blob = common::EncodeAdapterBlob(
        adapter->tensors, common::Quant::kQ8_0,
        {{"fedlora.lora.rank", "4"}, {"fedlora.lora.alpha", "8"}});
    VersionRecord v;
    v.version_id = "v000001";
    v.round_id = 1;
    v.sha256 = common::Sha256Hex(blob);
    v.size_bytes = blob.size();
    v.quant = "q8_0";
    v.base_model_hash = kBaseHash;
    ASSERT_TRUE((*store)->SignVersion(&v).ok());
    round.phase = RoundPhase::kDone;
    round.version_id = v.version_id;
    ASSERT_TRUE((*store)->Publish(round, v, blob).ok());
  }
  std::string data() const { return dir_.Sub("data"); }

  TempDir dir_;
};

TEST_F(AdminAuditTest, VerifyAndListAnIntactLog) {
  CliResult verify = RunCli({"audit", "verify", "--data-dir", data()});
  EXPECT_EQ(verify.code, 0) << verify.err;
  EXPECT_THAT(verify.out, HasSubstr("intact: 3 records"));
  CliResult json = RunCli({"audit", "verify", "--data-dir", data(), "--json"});
  ASSERT_EQ(json.code, 0);
  auto j = nlohmann::json::parse(json.out);
  EXPECT_EQ(j["ok"], true);
  EXPECT_EQ(j["head_seq"], 3);
  CliResult list = RunCli({"audit", "list", "--data-dir", data()});
  ASSERT_EQ(list.code, 0) << list.err;
  EXPECT_THAT(list.out, HasSubstr("at_rest.enabled"));
  EXPECT_THAT(list.out, HasSubstr("round.started"));
  EXPECT_THAT(list.out, HasSubstr("round.published"));
  CliResult page = RunCli({"audit", "list", "--data-dir", data(), "--from", "3", "--limit", "1", "--json"});
  ASSERT_EQ(page.code, 0);
  auto rec = nlohmann::json::parse(page.out);
  EXPECT_EQ(rec["seq"], 3);
  EXPECT_EQ(rec["details"]["version"], "v000001");
  EXPECT_EQ(RunCli({"audit", "verify", "--data-dir", dir_.Sub("nothing")}).code, 1);
}

TEST_F(AdminAuditTest, VerifyNamesTheFirstBadSeq) {
  {
    auto store = common::Store::Open(data(), {});
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE((*store)->Delete(kAuditColumnFamily, AuditKey(2), true).ok());
  }
  CliResult verify = RunCli({"audit", "verify", "--data-dir", data()});
  EXPECT_EQ(verify.code, 1);
  EXPECT_THAT(verify.out, HasSubstr("BROKEN at seq 2"));
}

TEST_F(AdminAuditTest, ExportNeedsTheKeyAndIsAudited) {
  const std::string out = dir_.Sub("peft");
  CliResult no_key = RunCli({"models", "export", "latest", "--data-dir", data(), "--format",
                             "peft", "--out", out});
  EXPECT_EQ(no_key.code, 1);
  EXPECT_THAT(no_key.err, HasSubstr("--at-rest-key"));
  EXPECT_FALSE(std::filesystem::exists(out));

  CliResult exp = RunCli({"models", "export", "latest", "--data-dir", data(), "--format", "peft",
                          "--out", out, "--at-rest-key", dir_.Sub("at-rest.key")});
  ASSERT_EQ(exp.code, 0) << exp.err;
  EXPECT_TRUE(std::filesystem::exists(out + "/adapter_model.safetensors"));
  auto ro = StateStore::OpenReadOnly(data());
  ASSERT_TRUE(ro.ok());
  auto records = ListAuditRecords((*ro)->raw_store(), 1, 0);
  ASSERT_TRUE(records.ok());
  ASSERT_EQ(records->size(), 4u);
  EXPECT_EQ(records->back().action, "model.exported");
  EXPECT_THAT(records->back().actor, HasSubstr("local:"));
  EXPECT_THAT(records->back().details_json, HasSubstr("v000001"));
  auto report = VerifyAuditChain((*ro)->raw_store());
  ASSERT_TRUE(report.ok());
  EXPECT_TRUE(report->ok) << report->error;
  ro->reset();

  // While the coordinator holds the data dir, the export still works, unaudited.
  StateStoreOptions options;
  options.at_rest = *common::AtRestCipher::LoadFile(dir_.Sub("at-rest.key"));
  auto holder = StateStore::Open(data(), options);
  ASSERT_TRUE(holder.ok()) << holder.status();
  CliResult held = RunCli({"models", "export", "v000001", "--data-dir", data(), "--format",
                           "peft", "--out", dir_.Sub("peft2"), "--at-rest-key",
                           dir_.Sub("at-rest.key")});
  ASSERT_EQ(held.code, 0) << held.err;
  EXPECT_THAT(held.err, HasSubstr("not recorded in the audit log"));
  EXPECT_EQ((*holder)->audit().head_seq(), 4u);
}

}  // namespace
}  // namespace fedlora::coordinator
