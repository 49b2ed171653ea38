#include "common/crypto/crypto.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>
#include "tests/testing/test_util.h"

namespace fedlora::common {
namespace {

using ::fedlora::testutil::TempDir;
using ::fedlora::testutil::StatusIs;

using ::testing::HasSubstr;

std::string Unhex(const std::string& hex) {
  auto r = HexDecode(hex);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : std::string();
}

void WriteFile(const std::string& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(data.data(), static_cast<std::streamsize>(data.size()));
  ASSERT_TRUE(f.good()) << path;
}

// ---- hashing, hex, randomness ------------------------------------------------

TEST(Sha256, KnownVectors) {
  // FIPS 180-2 examples.
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Sha256Hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(Sha256Hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  std::string raw = Sha256("abc");
  ASSERT_EQ(raw.size(), 32u);
  EXPECT_EQ(HexEncode(raw), Sha256Hex("abc"));
}

TEST(Hex, RoundTripAllBytes) {
  std::string all;
  for (int i = 0; i < 256; ++i) all.push_back(static_cast<char>(i));
  std::string hex = HexEncode(all);
  EXPECT_EQ(hex.substr(0, 8), "00010203");
  EXPECT_EQ(hex.substr(hex.size() - 4), "feff");
  auto back = HexDecode(hex);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, all);
  auto upper = HexDecode("DEADbeef");
  ASSERT_TRUE(upper.ok());
  EXPECT_EQ(*upper, std::string("\xde\xad\xbe\xef"));
  EXPECT_EQ(HexEncode(""), "");
}

TEST(Hex, RejectsBadInput) {
  EXPECT_THAT(HexDecode("abc").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "even number of digits"));
  EXPECT_THAT(HexDecode("00zz").status(), StatusIs(absl::StatusCode::kInvalidArgument, "offset 2"));
  EXPECT_THAT(HexDecode("0g").status(), StatusIs(absl::StatusCode::kInvalidArgument, "offset 1"));
}

TEST(RandomBytes, SizesAndUniqueness) {
  EXPECT_EQ(RandomBytes(0).size(), 0u);
  EXPECT_EQ(RandomBytes(17).size(), 17u);
  std::set<std::string> seen;
  for (int i = 0; i < 100; ++i) seen.insert(RandomBytes(16));
  EXPECT_EQ(seen.size(), 100u);
}

// ---- X25519 -------------------------------------------------------------------

// RFC 7748, section 6.1.
constexpr char kAlicePriv[] = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
constexpr char kAlicePub[] = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";
constexpr char kBobPriv[] = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb";
constexpr char kBobPub[] = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f";
constexpr char kShared[] = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742";

TEST(X25519, Rfc7748Vectors) {
  auto alice = X25519FromPrivate(Unhex(kAlicePriv));
  ASSERT_TRUE(alice.ok()) << alice.status();
  EXPECT_EQ(HexEncode(alice->public_key), kAlicePub);
  EXPECT_EQ(HexEncode(alice->private_key), kAlicePriv);
  auto bob = X25519FromPrivate(Unhex(kBobPriv));
  ASSERT_TRUE(bob.ok()) << bob.status();
  EXPECT_EQ(HexEncode(bob->public_key), kBobPub);

  auto ab = X25519SharedSecret(alice->private_key, bob->public_key);
  auto ba = X25519SharedSecret(bob->private_key, alice->public_key);
  ASSERT_TRUE(ab.ok()) << ab.status();
  ASSERT_TRUE(ba.ok()) << ba.status();
  EXPECT_EQ(HexEncode(*ab), kShared);
  EXPECT_EQ(HexEncode(*ba), kShared);
}

TEST(X25519, GeneratedPairsAgree) {
  auto a = GenerateX25519KeyPair();
  auto b = GenerateX25519KeyPair();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->private_key.size(), 32u);
  EXPECT_EQ(a->public_key.size(), 32u);
  EXPECT_NE(a->private_key, b->private_key);
  auto again = X25519FromPrivate(a->private_key);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->public_key, a->public_key);
  auto ab = X25519SharedSecret(a->private_key, b->public_key);
  auto ba = X25519SharedSecret(b->private_key, a->public_key);
  ASSERT_TRUE(ab.ok() && ba.ok());
  EXPECT_EQ(*ab, *ba);
}

TEST(X25519, RejectsBadKeys) {
  EXPECT_THAT(X25519FromPrivate("short").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "expected 32 bytes, found 5"));
  auto a = GenerateX25519KeyPair();
  ASSERT_TRUE(a.ok());
  EXPECT_THAT(X25519SharedSecret(a->private_key, std::string(31, 'x')).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "found 31"));
  // The zero point has small order: the agreement would be all zero.
  EXPECT_THAT(X25519SharedSecret(a->private_key, std::string(32, '\0')).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "small order"));
}

// ---- sealing ------------------------------------------------------------------

X25519KeyPair MustKeyPair() {
  auto kp = GenerateX25519KeyPair();
  EXPECT_TRUE(kp.ok()) << kp.status();
  return kp.ok() ? *kp : X25519KeyPair{};
}

TEST(Seal, RoundTripVariousSizes) {
  X25519KeyPair me = MustKeyPair();
  for (size_t n : {size_t{0}, size_t{1}, size_t{15}, size_t{16}, size_t{1000}, size_t{1} << 20}) {
    std::string plain = RandomBytes(n);
    auto sealed = SealToPublicKey(me.public_key, plain, "round|agent|hash");
    ASSERT_TRUE(sealed.ok()) << sealed.status();
    EXPECT_EQ(sealed->size(), n + 4 + 32 + 12 + 16);
    EXPECT_EQ(sealed->substr(0, 4), "FLS1");
    auto opened = OpenSealed(me, *sealed, "round|agent|hash");
    ASSERT_TRUE(opened.ok()) << opened.status() << " n=" << n;
    EXPECT_EQ(*opened, plain);
  }
}

TEST(Seal, FreshEphemeralKeyAndNonceEachTime) {
  X25519KeyPair me = MustKeyPair();
  auto s1 = SealToPublicKey(me.public_key, "same plaintext", "");
  auto s2 = SealToPublicKey(me.public_key, "same plaintext", "");
  ASSERT_TRUE(s1.ok() && s2.ok());
  EXPECT_NE(s1->substr(4, 32), s2->substr(4, 32));
  EXPECT_NE(s1->substr(36, 12), s2->substr(36, 12));
  EXPECT_NE(s1->substr(48), s2->substr(48));
  // The plaintext does not appear in the output.
  EXPECT_EQ(s1->find("same plaintext"), std::string::npos);
}

// Opens a sealed message with an independent implementation of the format in
// crypto.h (EVP_PKEY HKDF rather than EVP_KDF), so the wire format is pinned.
std::string ReferenceOpen(const X25519KeyPair& me, const std::string& sealed,
                          const std::string& aad) {
  std::string eph = sealed.substr(4, 32);
  std::string nonce = sealed.substr(36, 12);
  std::string ct = sealed.substr(48, sealed.size() - 64);
  std::string tag = sealed.substr(sealed.size() - 16);
  auto shared = X25519SharedSecret(me.private_key, eph);
  EXPECT_TRUE(shared.ok());
  std::string salt = eph + me.public_key;
  std::string info = "fedlora seal v1";
  unsigned char key[32];
  size_t key_len = sizeof(key);
  EVP_PKEY_CTX* kctx = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, nullptr);
  EXPECT_EQ(EVP_PKEY_derive_init(kctx), 1);
  EXPECT_EQ(EVP_PKEY_CTX_set_hkdf_md(kctx, EVP_sha256()), 1);
  EXPECT_EQ(EVP_PKEY_CTX_set1_hkdf_salt(kctx, reinterpret_cast<const unsigned char*>(salt.data()),
                                        static_cast<int>(salt.size())),
            1);
  EXPECT_EQ(EVP_PKEY_CTX_set1_hkdf_key(kctx, reinterpret_cast<const unsigned char*>(shared->data()),
                                       static_cast<int>(shared->size())),
            1);
  EXPECT_EQ(EVP_PKEY_CTX_add1_hkdf_info(kctx, reinterpret_cast<const unsigned char*>(info.data()),
                                        static_cast<int>(info.size())),
            1);
  EXPECT_EQ(EVP_PKEY_derive(kctx, key, &key_len), 1);
  EVP_PKEY_CTX_free(kctx);

  EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
  std::string out(ct.size() + 16, '\0');
  int len = 0, total = 0;
  EXPECT_EQ(EVP_DecryptInit_ex(c, EVP_aes_256_gcm(), nullptr, key,
                               reinterpret_cast<const unsigned char*>(nonce.data())),
            1);
  EXPECT_EQ(EVP_DecryptUpdate(c, nullptr, &len, reinterpret_cast<const unsigned char*>(aad.data()),
                              static_cast<int>(aad.size())),
            1);
  EXPECT_EQ(EVP_DecryptUpdate(c, reinterpret_cast<unsigned char*>(out.data()), &len,
                              reinterpret_cast<const unsigned char*>(ct.data()),
                              static_cast<int>(ct.size())),
            1);
  total = len;
  EXPECT_EQ(EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, 16, tag.data()), 1);
  int ok = EVP_DecryptFinal_ex(c, reinterpret_cast<unsigned char*>(out.data()) + total, &len);
  EVP_CIPHER_CTX_free(c);
  EXPECT_EQ(ok, 1) << "reference implementation rejected the tag";
  out.resize(static_cast<size_t>(total));
  return out;
}

TEST(Seal, MatchesDocumentedFormat) {
  X25519KeyPair me = MustKeyPair();
  std::string plain = "fedlora update payload \x01\x02\x03";
  std::string aad = "fedlora-update-v1|r1|agent-7|abc|v000001";
  auto sealed = SealToPublicKey(me.public_key, plain, aad);
  ASSERT_TRUE(sealed.ok());
  EXPECT_EQ(ReferenceOpen(me, *sealed, aad), plain);
}

TEST(Seal, WrongKeyOrAadFails) {
  X25519KeyPair me = MustKeyPair();
  X25519KeyPair other = MustKeyPair();
  auto sealed = SealToPublicKey(me.public_key, "secret update", "aad-1");
  ASSERT_TRUE(sealed.ok());
  EXPECT_THAT(OpenSealed(other, *sealed, "aad-1").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "authentication failed"));
  EXPECT_THAT(OpenSealed(me, *sealed, "aad-2").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "authentication failed"));
  EXPECT_THAT(OpenSealed(me, *sealed, "").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "authentication failed"));
  // A stale public_key field does not matter: the private key decides.
  X25519KeyPair stale = me;
  stale.public_key = other.public_key;
  auto opened = OpenSealed(stale, *sealed, "aad-1");
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(*opened, "secret update");
}

TEST(Seal, EveryByteFlipIsRejected) {
  X25519KeyPair me = MustKeyPair();
  auto sealed = SealToPublicKey(me.public_key, "twenty byte message!", "aad");
  ASSERT_TRUE(sealed.ok());
  for (size_t i = 0; i < sealed->size(); ++i) {
    for (unsigned char mask : {0x01, 0x80, 0xff}) {
      std::string bad = *sealed;
      bad[i] = static_cast<char>(bad[i] ^ mask);
      EXPECT_THAT(OpenSealed(me, bad, "aad").status(),
                  StatusIs(absl::StatusCode::kInvalidArgument, "authentication failed"))
          << "byte " << i << " mask " << int{mask};
    }
  }
}

TEST(Seal, TruncatedOrExtendedIsRejected) {
  X25519KeyPair me = MustKeyPair();
  auto sealed = SealToPublicKey(me.public_key, "some plaintext", "aad");
  ASSERT_TRUE(sealed.ok());
  for (size_t n = 0; n < sealed->size(); ++n) {
    EXPECT_THAT(OpenSealed(me, sealed->substr(0, n), "aad").status(),
                StatusIs(absl::StatusCode::kInvalidArgument, "authentication failed"))
        << "length " << n;
  }
  EXPECT_THAT(OpenSealed(me, *sealed + "x", "aad").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "authentication failed"));
}

TEST(Seal, RejectsBadRecipientKeys) {
  EXPECT_THAT(SealToPublicKey("short", "x", "").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "32-byte"));
  EXPECT_THAT(SealToPublicKey(std::string(32, '\0'), "x", "").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "small order"));
  X25519KeyPair bad;
  bad.private_key = "nope";
  auto sealed = SealToPublicKey(MustKeyPair().public_key, "x", "");
  ASSERT_TRUE(sealed.ok());
  EXPECT_EQ(OpenSealed(bad, *sealed, "").status().code(), absl::StatusCode::kInvalidArgument);
}

// ---- files ---------------------------------------------------------------------

// The documented framing: name | 0x00 | u64le size | bytes, config.json first.
std::string ExpectedModelHash(const std::vector<std::pair<std::string, std::string>>& files) {
  std::string stream;
  for (const auto& [name, data] : files) {
    stream += name;
    stream.push_back('\0');
    uint64_t size = data.size();
    for (int i = 0; i < 8; ++i) stream.push_back(static_cast<char>(size >> (8 * i)));
    stream += data;
  }
  return Sha256Hex(stream);
}

TEST(HashModelDirectory, StableAndMatchesFraming) {
  TempDir dir;
  std::string config = R"({"model_type": "llama"})";
  std::string shard1 = RandomBytes(3 * (1 << 20) + 123);  // crosses 1 MiB read boundaries
  std::string shard2 = RandomBytes(1000);
  WriteFile(dir.path() + "/config.json", config);
  WriteFile(dir.path() + "/model-00002-of-00002.safetensors", shard2);
  WriteFile(dir.path() + "/model-00001-of-00002.safetensors", shard1);
  WriteFile(dir.path() + "/tokenizer.json", "{}");                     // not part of the hash
  std::filesystem::create_directory(dir.path() + "/sub.safetensors");  // not a file: ignored

  auto h1 = HashModelDirectory(dir.path());
  ASSERT_TRUE(h1.ok()) << h1.status();
  EXPECT_EQ(h1->size(), 64u);
  EXPECT_EQ(*h1, ExpectedModelHash({{"config.json", config},
                                    {"model-00001-of-00002.safetensors", shard1},
                                    {"model-00002-of-00002.safetensors", shard2}}));
  auto h2 = HashModelDirectory(dir.path());
  ASSERT_TRUE(h2.ok());
  EXPECT_EQ(*h1, *h2);

  // Files outside the hashed set do not matter.
  WriteFile(dir.path() + "/tokenizer.json", "{\"changed\": true}");
  EXPECT_EQ(*HashModelDirectory(dir.path()), *h1);

  // One byte changed in the middle of a shard changes the hash.
  std::string changed = shard1;
  changed[changed.size() / 2] ^= 0x01;
  WriteFile(dir.path() + "/model-00001-of-00002.safetensors", changed);
  auto h3 = HashModelDirectory(dir.path());
  ASSERT_TRUE(h3.ok());
  EXPECT_NE(*h3, *h1);
  WriteFile(dir.path() + "/model-00001-of-00002.safetensors", shard1);
  EXPECT_EQ(*HashModelDirectory(dir.path()), *h1);

  // So does a change to config.json, or a renamed shard.
  WriteFile(dir.path() + "/config.json", config + " ");
  EXPECT_NE(*HashModelDirectory(dir.path()), *h1);
  WriteFile(dir.path() + "/config.json", config);
  std::filesystem::rename(dir.path() + "/model-00002-of-00002.safetensors",
                          dir.path() + "/model-00003-of-00002.safetensors");
  EXPECT_NE(*HashModelDirectory(dir.path()), *h1);
}

TEST(HashModelDirectory, GoldenHuggingFaceFixtures) {
  const std::string llama = std::string(FEDLORA_FIXTURES) + "/hf/llama";
  const std::string qwen = std::string(FEDLORA_FIXTURES) + "/hf/qwen2";
  auto h = HashModelDirectory(llama);
  ASSERT_TRUE(h.ok()) << h.status();
  auto config = ReadFileToString(llama + "/config.json");
  auto weights = ReadFileToString(llama + "/model.safetensors");
  ASSERT_TRUE(config.ok() && weights.ok());
  // tokenizer.json, reference.json and adapter/ are not part of the identity.
  EXPECT_EQ(*h, ExpectedModelHash({{"config.json", *config}, {"model.safetensors", *weights}}));
  auto hq = HashModelDirectory(qwen);
  ASSERT_TRUE(hq.ok()) << hq.status();
  EXPECT_NE(*h, *hq);
}

TEST(HashModelDirectory, MovingBytesBetweenFilesChangesHash) {
  TempDir a, b;
  WriteFile(a.path() + "/config.json", "{}");
  WriteFile(a.path() + "/a.safetensors", "xy");
  WriteFile(a.path() + "/b.safetensors", "z");
  WriteFile(b.path() + "/config.json", "{}");
  WriteFile(b.path() + "/a.safetensors", "x");
  WriteFile(b.path() + "/b.safetensors", "yz");
  auto ha = HashModelDirectory(a.path());
  auto hb = HashModelDirectory(b.path());
  ASSERT_TRUE(ha.ok() && hb.ok());
  EXPECT_NE(*ha, *hb);
}

TEST(HashModelDirectory, Errors) {
  TempDir dir;
  EXPECT_THAT(HashModelDirectory(dir.path() + "/missing").status(),
              StatusIs(absl::StatusCode::kNotFound, "missing"));
  WriteFile(dir.path() + "/model.safetensors", "x");
  EXPECT_THAT(HashModelDirectory(dir.path()).status(),
              StatusIs(absl::StatusCode::kNotFound, "config.json"));
  std::filesystem::remove(dir.path() + "/model.safetensors");
  WriteFile(dir.path() + "/config.json", "{}");
  EXPECT_THAT(HashModelDirectory(dir.path()).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "*.safetensors"));
}

TEST(Files, ReadAndWriteAtomic) {
  TempDir dir;
  std::string path = dir.path() + "/out.bin";
  std::string data = RandomBytes(70000);
  ASSERT_TRUE(WriteFileAtomic(path, data, 0600).ok());
  auto back = ReadFileToString(path);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, data);
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  // Overwrite, with another mode; no temporary files are left behind.
  ASSERT_TRUE(WriteFileAtomic(path, "short", 0644).ok());
  EXPECT_EQ(*ReadFileToString(path), "short");
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
  ASSERT_TRUE(WriteFileAtomic(path, "", 0644).ok());
  EXPECT_EQ(*ReadFileToString(path), "");
  int entries = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) {
    (void)e;
    ++entries;
  }
  EXPECT_EQ(entries, 1);
}

TEST(Files, ErrorsNameThePath) {
  TempDir dir;
  EXPECT_THAT(ReadFileToString(dir.path() + "/nope.txt").status(),
              StatusIs(absl::StatusCode::kNotFound, "nope.txt"));
  EXPECT_EQ(WriteFileAtomic(dir.path() + "/no/such/dir/x", "data").code(),
            absl::StatusCode::kNotFound);
  EXPECT_THAT(ReadFileToString(dir.path()).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "directory"));
  if (::geteuid() != 0) {  // root ignores file permissions
    std::string locked = dir.path() + "/locked";
    ASSERT_TRUE(WriteFileAtomic(locked, "x", 0000).ok());
    EXPECT_THAT(ReadFileToString(locked).status(),
                StatusIs(absl::StatusCode::kPermissionDenied, "locked"));
  }
}

}  // namespace
}  // namespace fedlora::common
