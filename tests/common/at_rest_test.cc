#include "common/crypto/at_rest.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/crypto/crypto.h"
#include "tests/testing/test_util.h"

namespace fedlora::common {
namespace {

using ::fedlora::testutil::TempDir;

using ::testing::HasSubstr;

void WriteFile(const std::string& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(data.data(), static_cast<std::streamsize>(data.size()));
  ASSERT_TRUE(f.good()) << path;
}

TEST(AtRest, RoundTripAndCiphertextHidesPlaintext) {
  auto c = AtRestCipher::FromKey(std::string(32, 'k'));
  ASSERT_TRUE(c.ok()) << c.status();
  const std::string plain = "secret adapter bytes secret adapter bytes";
  auto enc = c->Encrypt(plain, "blobs/abc");
  ASSERT_TRUE(enc.ok()) << enc.status();
  EXPECT_EQ(enc->size(), plain.size() + kAtRestOverhead);
  EXPECT_TRUE(AtRestCipher::IsEncrypted(*enc));
  EXPECT_EQ(AtRestCipher::RecordKeyId(*enc), c->key_id());
  EXPECT_EQ(enc->find("secret"), std::string::npos);
  auto dec = c->Decrypt(*enc, "blobs/abc", "blobs/abc");
  ASSERT_TRUE(dec.ok()) << dec.status();
  EXPECT_EQ(*dec, plain);
  // Fresh nonce per record: the same plaintext encrypts differently.
  EXPECT_NE(*c->Encrypt(plain, "blobs/abc"), *enc);
  // Empty plaintext works too.
  auto empty = c->Encrypt("", "a");
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(*c->Decrypt(*empty, "a", "a"), "");
}

TEST(AtRest, TamperWrongAadAndWrongKeyAreRefused) {
  auto c = AtRestCipher::FromKey(std::string(32, 'k'));
  auto other = AtRestCipher::FromKey(std::string(32, 'j'));
  ASSERT_TRUE(c.ok() && other.ok());
  EXPECT_NE(c->key_id(), other->key_id());
  auto enc = c->Encrypt("payload", "updates/1");
  ASSERT_TRUE(enc.ok());
  for (size_t i = 13; i < enc->size(); ++i) {  // nonce, ciphertext and tag bytes
    std::string bad = *enc;
    bad[i] ^= 0x40;
    auto r = c->Decrypt(bad, "updates/1", "updates/1");
    EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << "byte " << i;
  }
  auto moved = c->Decrypt(*enc, "updates/2", "updates/2");
  EXPECT_EQ(moved.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(moved.status().message()), HasSubstr("updates/2"));
  auto truncated = c->Decrypt(enc->substr(0, 20), "updates/1", "updates/1");
  EXPECT_EQ(truncated.status().code(), absl::StatusCode::kDataLoss);
  auto wrong = other->Decrypt(*enc, "updates/1", "updates/1");
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr(c->key_id()));
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr(other->key_id()));
  // A key id edited to match the other key still fails authentication.
  std::string relabeled = *enc;
  auto other_enc = other->Encrypt("x", "y");
  relabeled.replace(5, 8, other_enc->substr(5, 8));
  EXPECT_EQ(other->Decrypt(relabeled, "updates/1", "w").status().code(),
            absl::StatusCode::kDataLoss);
  // Plaintext where a record is expected.
  EXPECT_EQ(c->Decrypt("plain json", "a", "a").status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(AtRestCipher::FromKey("short").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(AtRest, KeyFiles) {
  TempDir dir;
  const std::string path = dir.path() + "/at-rest.key";
  ASSERT_TRUE(WriteNewAtRestKeyFile(path).ok());
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto text = ReadFileToString(path);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(text->size(), 65u);
  auto c = AtRestCipher::LoadFile(path);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(WriteNewAtRestKeyFile(path).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(*ReadFileToString(path), *text);

  // Raw and hex forms of the same key give the same key id.
  auto raw = HexDecode(text->substr(0, 64));
  ASSERT_TRUE(raw.ok());
  WriteFile(dir.path() + "/raw.key", *raw);
  auto c_raw = AtRestCipher::LoadFile(dir.path() + "/raw.key");
  ASSERT_TRUE(c_raw.ok()) << c_raw.status();
  EXPECT_EQ(c_raw->key_id(), c->key_id());
  auto enc = c->Encrypt("x", "a");
  EXPECT_EQ(*c_raw->Decrypt(*enc, "a", "a"), "x");

  WriteFile(dir.path() + "/bad.key", "too short\n");
  auto bad = AtRestCipher::LoadFile(dir.path() + "/bad.key");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("bad.key"));
  WriteFile(dir.path() + "/nothex.key", std::string(64, 'z'));
  EXPECT_EQ(AtRestCipher::LoadFile(dir.path() + "/nothex.key").status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fedlora::common
