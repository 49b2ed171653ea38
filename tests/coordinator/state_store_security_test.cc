// StateStore encryption at rest and version signing.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "common/crypto/at_rest.h"
#include "common/crypto/crypto.h"
#include "common/crypto/sign.h"
#include "coordinator/audit.h"
#include "coordinator/config.h"
#include "coordinator/state_store.h"
#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;
using testing::kBaseHash;
using testing::TempDir;

// Markers that must never appear in the database files of an encrypted store.
const std::string kUpdateSecret = "UPDATE-PLAINTEXT-MARKER-7f3a9c";
const std::string kBlobSecret = "BLOB-PLAINTEXT-MARKER-2b81d4";

StateStoreOptions WithKey(char fill) {
  StateStoreOptions o;
  o.at_rest = *common::AtRestCipher::FromKey(std::string(32, fill));
  return o;
}

RoundRecord Round(uint64_t id) {
  RoundRecord r;
  r.round_id = id;
  r.participants = {"a", "b"};
  return r;
}

UpdateRecord Update(uint64_t round, const std::string& agent) {
  UpdateRecord u;
  u.round_id = round;
  u.agent_id = agent;
  u.summary.num_examples = 3;
  u.sealed = kUpdateSecret + agent;
  return u;
}

VersionRecord Version(uint64_t round, const std::string& blob) {
  VersionRecord v;
  v.version_id = VersionId(round);
  v.round_id = round;
  v.sha256 = common::Sha256Hex(blob);
  v.size_bytes = blob.size();
  v.quant = "q8_0";
  v.base_model_hash = kBaseHash;
  return v;
}

// Every byte of every file under `dir` (SST, WAL, MANIFEST, ...).
std::string AllBytes(const std::string& dir) {
  std::string all;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    auto bytes = common::ReadFileToString(e.path().string());
    if (bytes.ok()) all += *bytes;
  }
  return all;
}

// Writes a seal key, a published round 1 (blob), and an open round 2 with two updates.
void Populate(StateStore* store, std::string* seal_private) {
  auto key = store->LoadOrCreateSealKey();
  ASSERT_TRUE(key.ok()) << key.status();
  *seal_private = key->private_key;
  const std::string blob = kBlobSecret + std::string(100, 'x');
  RoundRecord done = Round(1);
  done.phase = RoundPhase::kDone;
  ASSERT_TRUE(store->Publish(done, Version(1, blob), blob).ok());
  RoundRecord r2 = Round(2);
  ASSERT_TRUE(store->StartRound(r2).ok());
  ASSERT_TRUE(store->AcceptUpdate(Update(2, "a"), r2).ok());
  ASSERT_TRUE(store->AcceptUpdate(Update(2, "b"), r2).ok());
}

TEST(AtRestStoreTest, RoundTripAndRawBytesHoldNoPlaintext) {
  TempDir dir;
  std::string seal_private;
  {
    auto store = StateStore::Open(dir.path(), WithKey('k'));
    ASSERT_TRUE(store.ok()) << store.status();
    EXPECT_TRUE((*store)->encrypted());
    Populate(store->get(), &seal_private);
    // Not flushed: the values sit verbatim in the (uncompressed) WAL, the most
    // direct copy on disk, so the control below can see plaintext where it exists.
    // Stored values are records under the key, not plaintext.
    auto raw_update = (*store)->raw()->Get("updates", UpdateKey(2, "a"));
    ASSERT_TRUE(raw_update.ok());
    EXPECT_TRUE(common::AtRestCipher::IsEncrypted(*raw_update));
    EXPECT_EQ(common::AtRestCipher::RecordKeyId(*raw_update), WithKey('k').at_rest->key_id());
  }
  const std::string all = AllBytes(dir.path());
  ASSERT_FALSE(all.empty());
  EXPECT_EQ(all.find(kUpdateSecret), std::string::npos);
  EXPECT_EQ(all.find(kBlobSecret), std::string::npos);
  EXPECT_EQ(all.find(seal_private), std::string::npos);
  // A control: unencrypted metadata is there, so the search does see the files.
  EXPECT_NE(all.find("round.started"), std::string::npos);

  auto store = StateStore::Open(dir.path(), WithKey('k'));
  ASSERT_TRUE(store.ok()) << store.status();
  auto key = (*store)->LoadOrCreateSealKey();
  ASSERT_TRUE(key.ok());
  EXPECT_EQ(key->private_key, seal_private);
  auto u = (*store)->GetUpdate(2, "b");
  ASSERT_TRUE(u.ok() && u->has_value()) << u.status();
  EXPECT_EQ((*u)->sealed, kUpdateSecret + "b");
  size_t n = 0;
  ASSERT_TRUE((*store)
                  ->ForEachUpdate(2,
                                  [&](UpdateRecord rec) {
                                    EXPECT_EQ(rec.sealed, kUpdateSecret + rec.agent_id);
                                    ++n;
                                    return absl::OkStatus();
                                  })
                  .ok());
  EXPECT_EQ(n, 2u);
  auto blob = (*store)->GetBlob(common::Sha256Hex(kBlobSecret + std::string(100, 'x')));
  ASSERT_TRUE(blob.ok()) << blob.status();
  EXPECT_EQ(blob->substr(0, kBlobSecret.size()), kBlobSecret);
}

TEST(AtRestStoreTest, WrongOrMissingKeyIsRefusedAndChangesNothing) {
  TempDir dir;
  std::string seal_private;
  {
    auto store = StateStore::Open(dir.path(), WithKey('k'));
    ASSERT_TRUE(store.ok());
    Populate(store->get(), &seal_private);
  }
  auto head_before = [&]() {
    auto ro = StateStore::OpenReadOnly(dir.path());
    EXPECT_TRUE(ro.ok()) << ro.status();
    return ro.ok() ? (*ro)->audit().head_hash() : std::string();
  };
  const std::string head = head_before();

  auto wrong = StateStore::Open(dir.path(), WithKey('j'));
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr("wrong at-rest key"));
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr(WithKey('k').at_rest->key_id()));
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr(WithKey('j').at_rest->key_id()));
  auto none = StateStore::Open(dir.path());
  EXPECT_EQ(none.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(none.status().message()), HasSubstr("--at-rest-key"));
  EXPECT_EQ(StateStore::OpenReadOnly(dir.path(), WithKey('j')).status().code(),
            absl::StatusCode::kFailedPrecondition);

  // Read-only without the key: audit and metadata readable, encrypted records not.
  {
    auto ro = StateStore::OpenReadOnly(dir.path());
    ASSERT_TRUE(ro.ok()) << ro.status();
    EXPECT_EQ(*(*ro)->CurrentVersion(), "v000001");
    auto blob = (*ro)->GetBlob(common::Sha256Hex(kBlobSecret + std::string(100, 'x')));
    EXPECT_EQ(blob.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(std::string(blob.status().message()), HasSubstr("encrypted at rest"));
    auto report = VerifyAuditChain((*ro)->raw_store());
    ASSERT_TRUE(report.ok());
    EXPECT_TRUE(report->ok) << report->error;
  }
  EXPECT_EQ(head_before(), head);
  auto right = StateStore::Open(dir.path(), WithKey('k'));
  ASSERT_TRUE(right.ok()) << right.status();
  EXPECT_EQ((*right)->LoadOrCreateSealKey()->private_key, seal_private);
  EXPECT_EQ((*(*right)->GetUpdate(2, "a"))->sealed, kUpdateSecret + "a");
}

TEST(AtRestStoreTest, CorruptedMovedOrDowngradedRecordsAreRefused) {
  TempDir dir;
  std::string seal_private;
  auto opened = StateStore::Open(dir.path(), WithKey('k'));
  ASSERT_TRUE(opened.ok());
  StateStore& store = **opened;
  Populate(&store, &seal_private);
  const std::string blob_key = common::Sha256Hex(kBlobSecret + std::string(100, 'x'));

  std::string raw_blob = *store.raw()->Get("blobs", blob_key);
  raw_blob[raw_blob.size() / 2] ^= 0x01;
  ASSERT_TRUE(store.raw()->Put("blobs", blob_key, raw_blob, true).ok());
  auto blob = store.GetBlob(blob_key);
  EXPECT_EQ(blob.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(blob.status().message()), HasSubstr("blobs/" + blob_key));

  // Agent a's update moved under agent b's key: the AAD no longer matches.
  std::string raw_a = *store.raw()->Get("updates", UpdateKey(2, "a"));
  ASSERT_TRUE(store.raw()->Put("updates", UpdateKey(2, "b"), raw_a, true).ok());
  EXPECT_EQ(store.GetUpdate(2, "b").status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(store.ForEachUpdate(2, [](UpdateRecord) { return absl::OkStatus(); }).code(),
            absl::StatusCode::kDataLoss);

  // A plaintext update written around the encryption is refused.
  ASSERT_TRUE(
      store.raw()->Put("updates", UpdateKey(2, "c"), EncodeUpdate(Update(2, "c")), true).ok());
  auto plain = store.GetUpdate(2, "c");
  EXPECT_EQ(plain.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(plain.status().message()), HasSubstr("found plaintext"));

  // A corrupted seal key.
  std::string raw_seal = *store.raw()->Get("meta", "seal_private_key");
  raw_seal.back() ^= 0x80;
  ASSERT_TRUE(store.raw()->Put("meta", "seal_private_key", raw_seal, true).ok());
  EXPECT_EQ(store.LoadOrCreateSealKey().status().code(), absl::StatusCode::kDataLoss);
}

TEST(AtRestStoreTest, OpeningAPlaintextStoreWithAKeyEncryptsIt) {
  TempDir dir;
  std::string seal_private;
  {
    auto store = StateStore::Open(dir.path());
    ASSERT_TRUE(store.ok());
    EXPECT_FALSE((*store)->encrypted());
    Populate(store->get(), &seal_private);
    EXPECT_FALSE(
        common::AtRestCipher::IsEncrypted(*(*store)->raw()->Get("updates", UpdateKey(2, "a"))));
  }
  // Without encrypt_existing (as `models export` opens it) nothing changes.
  StateStoreOptions no_migrate = WithKey('k');
  no_migrate.encrypt_existing = false;
  EXPECT_EQ(StateStore::Open(dir.path(), no_migrate).status().code(),
            absl::StatusCode::kFailedPrecondition);
  auto store = StateStore::Open(dir.path(), WithKey('k'));
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_TRUE(
      common::AtRestCipher::IsEncrypted(*(*store)->raw()->Get("updates", UpdateKey(2, "b"))));
  EXPECT_TRUE(common::AtRestCipher::IsEncrypted(*(*store)->raw()->Get("meta", "seal_private_key")));
  EXPECT_EQ((*store)->LoadOrCreateSealKey()->private_key, seal_private);
  EXPECT_EQ((*(*store)->GetUpdate(2, "b"))->sealed, kUpdateSecret + "b");
  auto records = ListAuditRecords((*store)->raw_store(), 1, 0);
  ASSERT_TRUE(records.ok());
  ASSERT_FALSE(records->empty());
  EXPECT_EQ(records->back().action, "at_rest.enabled");
  auto details = nlohmann::json::parse(records->back().details_json);
  EXPECT_EQ(details["updates"], 2);
  EXPECT_EQ(details["blobs"], 1);
  auto report = VerifyAuditChain((*store)->raw_store());
  ASSERT_TRUE(report.ok());
  EXPECT_TRUE(report->ok) << report->error;
  store->reset();
  EXPECT_EQ(StateStore::Open(dir.path()).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(SigningStoreTest, SignVersionAndPublishKeepTheSignature) {
  TempDir dir;
  auto signing = common::SigningKey::Generate();
  ASSERT_TRUE(signing.ok());
  {
    // Without a key, versions stay unsigned.
    auto store = StateStore::Open(dir.Sub("plain"));
    ASSERT_TRUE(store.ok());
    VersionRecord v = Version(1, "blob");
    v.signature = "stale";
    ASSERT_TRUE((*store)->SignVersion(&v).ok());
    EXPECT_EQ(v.signature, "");
    EXPECT_FALSE((*store)->can_sign());
  }
  StateStoreOptions options;
  options.signing_key = *signing;
  auto store = StateStore::Open(dir.Sub("signed"), options);
  ASSERT_TRUE(store.ok());
  VersionRecord v = Version(3, "blob3");
  v.parent_version = "v000002";
  ASSERT_TRUE((*store)->SignVersion(&v).ok());
  auto verify = common::VerifyKey::FromRaw(signing->raw_public_key());
  auto statement = common::ParseAndVerifyAdapterStatement(*verify, v.signature);
  ASSERT_TRUE(statement.ok()) << statement.status();
  EXPECT_EQ(statement->version_id, "v000003");
  EXPECT_EQ(statement->round_id, 3u);
  EXPECT_EQ(statement->parent_version, "v000002");
  EXPECT_EQ(statement->blob_sha256, common::Sha256Hex("blob3"));
  EXPECT_EQ(statement->base_model_hash, kBaseHash);
  EXPECT_EQ(statement->quant, "q8_0");
  RoundRecord done = Round(3);
  done.phase = RoundPhase::kDone;
  ASSERT_TRUE((*store)->Publish(done, v, "blob3").ok());
  auto back = (*store)->GetVersion("v000003");
  ASSERT_TRUE(back.ok() && back->has_value());
  EXPECT_EQ((*back)->signature, v.signature);
  EXPECT_EQ((*back)->base_model_hash, kBaseHash);
  auto records = ListAuditRecords((*store)->raw_store(), 1, 0);
  ASSERT_TRUE(records.ok());
  auto details = nlohmann::json::parse(records->back().details_json);
  EXPECT_EQ(details["signed"], true);
  EXPECT_EQ(details["signing_key_id"], signing->key_id());
  // A version without a base-model hash cannot be signed.
  VersionRecord bad = Version(4, "b");
  bad.base_model_hash = "";
  EXPECT_EQ((*store)->SignVersion(&bad).code(), absl::StatusCode::kInvalidArgument);
}

TEST(SigningStoreTest, OptionsFromConfigFindTheKeysAndNameBadFiles) {
  TempDir dir;
  ASSERT_TRUE(common::WriteNewSigningKeyPair(dir.Sub("coordinator-signing.key"),
                                             dir.Sub("coordinator-signing.pub"))
                  .ok());
  ASSERT_TRUE(common::WriteNewAtRestKeyFile(dir.Sub("at-rest.key")).ok());
  CoordinatorConfig config;
  config.tls_key = dir.Sub("coordinator.key");  // need not exist: only its directory is used
  auto options = StateStoreOptionsFromConfig(config);
  ASSERT_TRUE(options.ok()) << options.status();
  ASSERT_TRUE(options->signing_key.has_value());
  EXPECT_EQ(options->signing_key->key_id(),
            common::VerifyKey::LoadFile(dir.Sub("coordinator-signing.pub"))->key_id());
  EXPECT_FALSE(options->at_rest.has_value());
  config.at_rest_key = dir.Sub("at-rest.key");
  options = StateStoreOptionsFromConfig(config);
  ASSERT_TRUE(options.ok());
  EXPECT_TRUE(options->at_rest.has_value());
  config.signing_key = dir.Sub("at-rest.key");  // not a PEM key
  options = StateStoreOptionsFromConfig(config);
  EXPECT_EQ(options.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(options.status().message()), HasSubstr("at-rest.key"));
  config.signing_key = "";
  config.at_rest_key = dir.Sub("missing.key");
  EXPECT_EQ(StateStoreOptionsFromConfig(config).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace fedlora::coordinator
