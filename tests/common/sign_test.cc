#include "common/crypto/sign.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "common/crypto/crypto.h"
#include "tests/testing/test_util.h"

namespace fedlora::common {
namespace {

using ::fedlora::testutil::TempDir;

using ::testing::HasSubstr;

std::string Unhex(const std::string& hex) {
  auto r = HexDecode(hex);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : std::string();
}

// PEM of a raw Ed25519 private key (test vectors come as raw bytes).
std::string RawPrivateToPem(const std::string& raw) {
  EVP_PKEY* key = EVP_PKEY_new_raw_private_key(
      EVP_PKEY_ED25519, nullptr, reinterpret_cast<const unsigned char*>(raw.data()), raw.size());
  EXPECT_NE(key, nullptr);
  BIO* bio = BIO_new(BIO_s_mem());
  EXPECT_EQ(PEM_write_bio_PrivateKey(bio, key, nullptr, nullptr, 0, nullptr, nullptr), 1);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);  // NOLINT(runtime/int)
  std::string pem(data, static_cast<size_t>(len));
  BIO_free(bio);
  EVP_PKEY_free(key);
  return pem;
}

AdapterStatement SampleStatement() {
  AdapterStatement s;
  s.version_id = "v000002";
  s.round_id = 2;
  s.parent_version = "v000001";
  s.blob_sha256 = Sha256Hex("blob");
  s.base_model_hash = Sha256Hex("base");
  s.quant = "q8_0";
  return s;
}

TEST(Ed25519, Rfc8032TestVector1) {
  // RFC 8032 section 7.1, TEST 1 (empty message).
  auto key = SigningKey::FromPem(
      RawPrivateToPem(Unhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")),
      "vector");
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(HexEncode(key->raw_public_key()),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
  auto sig = key->Sign("");
  ASSERT_TRUE(sig.ok()) << sig.status();
  EXPECT_EQ(HexEncode(*sig),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065"
            "224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b");
  auto verify = VerifyKey::FromRaw(key->raw_public_key());
  ASSERT_TRUE(verify.ok()) << verify.status();
  EXPECT_TRUE(verify->Verify("", *sig).ok());
  EXPECT_EQ(verify->key_id(), key->key_id());
}

TEST(Ed25519, SignVerifyAndTamper) {
  auto key = SigningKey::Generate();
  ASSERT_TRUE(key.ok()) << key.status();
  auto pub_pem = key->PublicPem();
  ASSERT_TRUE(pub_pem.ok());
  auto verify = VerifyKey::FromPem(*pub_pem, "pub");
  ASSERT_TRUE(verify.ok()) << verify.status();
  auto sig = key->Sign("hello");
  ASSERT_TRUE(sig.ok());
  EXPECT_TRUE(verify->Verify("hello", *sig).ok());
  EXPECT_EQ(verify->Verify("hellO", *sig).code(), absl::StatusCode::kInvalidArgument);
  std::string bad = *sig;
  bad[10] ^= 1;
  absl::Status s = verify->Verify("hello", bad);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("signature verification failed"));
  EXPECT_EQ(verify->Verify("hello", sig->substr(0, 63)).code(),
            absl::StatusCode::kInvalidArgument);
  auto other = SigningKey::Generate();
  ASSERT_TRUE(other.ok());
  auto other_sig = other->Sign("hello");
  ASSERT_TRUE(other_sig.ok());
  EXPECT_FALSE(verify->Verify("hello", *other_sig).ok());
}

TEST(Ed25519, KeyFilesModesAndNoOverwrite) {
  TempDir dir;
  const std::string priv = dir.path() + "/s.key", pub = dir.path() + "/s.pub";
  ASSERT_TRUE(WriteNewSigningKeyPair(priv, pub).ok());
  struct stat st;
  ASSERT_EQ(::stat(priv.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(::stat(pub.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
  auto key = SigningKey::LoadFile(priv);
  ASSERT_TRUE(key.ok()) << key.status();
  auto verify = VerifyKey::LoadFile(pub);
  ASSERT_TRUE(verify.ok()) << verify.status();
  EXPECT_EQ(key->key_id(), verify->key_id());
  auto sig = key->Sign("m");
  ASSERT_TRUE(sig.ok());
  EXPECT_TRUE(verify->Verify("m", *sig).ok());
  auto before = ReadFileToString(priv);
  EXPECT_EQ(WriteNewSigningKeyPair(priv, pub).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(*ReadFileToString(priv), *before);
  // Files of the wrong kind are refused with the path named.
  auto wrong = SigningKey::LoadFile(pub);
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr(pub));
  EXPECT_EQ(VerifyKey::LoadFile(priv).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SigningKey::LoadFile(dir.path() + "/missing").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(AdapterStatement, SignParseVerifyRoundTrip) {
  auto key = SigningKey::Generate();
  ASSERT_TRUE(key.ok());
  auto verify = VerifyKey::FromRaw(key->raw_public_key());
  ASSERT_TRUE(verify.ok());
  auto encoded = SignAdapterStatement(*key, SampleStatement());
  ASSERT_TRUE(encoded.ok()) << encoded.status();
  EXPECT_THAT(*encoded, HasSubstr("version_id=v000002\nround_id=2\nparent_version=v000001\n"));
  auto parsed = ParseAndVerifyAdapterStatement(*verify, *encoded);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->version_id, "v000002");
  EXPECT_EQ(parsed->round_id, 2u);
  EXPECT_EQ(parsed->parent_version, "v000001");
  EXPECT_EQ(parsed->blob_sha256, Sha256Hex("blob"));
  EXPECT_EQ(parsed->base_model_hash, Sha256Hex("base"));
  EXPECT_EQ(parsed->quant, "q8_0");
  EXPECT_EQ(parsed->key_id, key->key_id());

  // An empty parent (first version) is allowed.
  AdapterStatement first = SampleStatement();
  first.parent_version = "";
  auto enc_first = SignAdapterStatement(*key, first);
  ASSERT_TRUE(enc_first.ok());
  EXPECT_TRUE(ParseAndVerifyAdapterStatement(*verify, *enc_first).ok());
}

TEST(AdapterStatement, EveryFieldIsCovered) {
  auto key = SigningKey::Generate();
  ASSERT_TRUE(key.ok());
  auto verify = VerifyKey::FromRaw(key->raw_public_key());
  auto encoded = SignAdapterStatement(*key, SampleStatement());
  ASSERT_TRUE(encoded.ok());
  // Each edit keeps the statement well-formed; only the signature can catch it.
  const std::vector<std::pair<std::string, std::string>> edits = {
      {"version_id=v000002", "version_id=v000003"},
      {"round_id=2", "round_id=3"},
      {"parent_version=v000001", "parent_version=v000000"},
      {"blob_sha256=" + Sha256Hex("blob"), "blob_sha256=" + Sha256Hex("bloc")},
      {"base_model_hash=" + Sha256Hex("base"), "base_model_hash=" + Sha256Hex("bass")},
      {"quant=q8_0", "quant=q4_0"},
  };
  for (const auto& [from, to] : edits) {
    std::string tampered = *encoded;
    size_t at = tampered.find(from);
    ASSERT_NE(at, std::string::npos) << from;
    tampered.replace(at, from.size(), to);
    auto r = ParseAndVerifyAdapterStatement(*verify, tampered);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << to;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("signature verification failed"))
        << to;
  }
}

TEST(AdapterStatement, WrongKeyAndMalformedAreRefused) {
  auto key = SigningKey::Generate();
  auto other = SigningKey::Generate();
  ASSERT_TRUE(key.ok() && other.ok());
  auto encoded = SignAdapterStatement(*key, SampleStatement());
  ASSERT_TRUE(encoded.ok());
  auto other_verify = VerifyKey::FromRaw(other->raw_public_key());
  auto wrong = ParseAndVerifyAdapterStatement(*other_verify, *encoded);
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr(key->key_id()));
  // A statement claiming the verifier's key id but signed by another key.
  std::string forged = *encoded;
  forged.replace(forged.find(key->key_id()), 16, other->key_id());
  EXPECT_THAT(std::string(ParseAndVerifyAdapterStatement(*other_verify, forged).status().message()),
              HasSubstr("signature verification failed"));

  auto verify = VerifyKey::FromRaw(key->raw_public_key());
  for (const std::string& bad :
       {std::string(), *encoded + "x\n", encoded->substr(0, encoded->size() - 1),
        std::string("junk\n"), std::string("fedlora-adapter-statement-v1\n")}) {
    EXPECT_EQ(ParseAndVerifyAdapterStatement(*verify, bad).status().code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
  // Non-canonical round id.
  std::string padded = *encoded;
  padded.replace(padded.find("round_id=2"), 10, "round_id=02");
  EXPECT_THAT(std::string(ParseAndVerifyAdapterStatement(*verify, padded).status().message()),
              HasSubstr("canonical"));
  // Bad field values are refused before signing.
  AdapterStatement s = SampleStatement();
  s.version_id = "v1\nround_id=9";
  EXPECT_EQ(SignAdapterStatement(*key, s).status().code(), absl::StatusCode::kInvalidArgument);
  s = SampleStatement();
  s.blob_sha256 = "ABC";
  EXPECT_THAT(std::string(SignAdapterStatement(*key, s).status().message()),
              HasSubstr("blob_sha256"));
}

}  // namespace
}  // namespace fedlora::common
