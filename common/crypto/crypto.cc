#include "common/crypto/crypto.h"

#include <dirent.h>
#include <fcntl.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/crypto/openssl_util.h"
#include "common/status/status.h"

namespace fedlora::common {
namespace {

constexpr char kSealMagic[] = "FLS1";
constexpr size_t kMagicLen = 4;
constexpr size_t kX25519Len = 32;
constexpr size_t kNonceLen = 12;
constexpr size_t kTagLen = 16;
constexpr size_t kSealOverhead = kMagicLen + kX25519Len + kNonceLen + kTagLen;
constexpr char kSealInfo[] = "fedlora seal v1";
constexpr size_t kReadChunk = 1 << 20;

// absl::string_view is not std::string_view in this abseil build.
inline absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

const unsigned char* U8(std::string_view s) {
  return reinterpret_cast<const unsigned char*>(s.data());
}
unsigned char* U8(std::string& s) { return reinterpret_cast<unsigned char*>(s.data()); }

absl::Status AuthFailed() {
  return absl::InvalidArgumentError("sealed message: authentication failed");
}

absl::StatusOr<EvpPkeyPtr> X25519PrivateKey(std::string_view private_key) {
  if (private_key.size() != kX25519Len) {
    return absl::InvalidArgumentError(
        absl::StrCat("X25519 private key: expected 32 bytes, found ", private_key.size()));
  }
  EvpPkeyPtr key(
      EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, nullptr, U8(private_key), private_key.size()));
  if (!key) return OpenSslError("X25519 private key");
  return key;
}

absl::StatusOr<std::string> RawPublicKey(EVP_PKEY* key) {
  std::string pub(kX25519Len, '\0');
  size_t len = pub.size();
  if (EVP_PKEY_get_raw_public_key(key, U8(pub), &len) != 1 || len != kX25519Len) {
    return OpenSslError("X25519 public key");
  }
  return pub;
}

// Derives the AEAD key: HKDF-SHA256(ikm, salt = eph_pub || recipient_pub, info).
absl::StatusOr<std::string> DeriveSealKey(std::string_view shared, std::string_view eph_pub,
                                          std::string_view recipient_pub) {
  EvpKdfPtr kdf(EVP_KDF_fetch(nullptr, OSSL_KDF_NAME_HKDF, nullptr));
  if (!kdf) return OpenSslError("fetching HKDF");
  EvpKdfCtxPtr ctx(EVP_KDF_CTX_new(kdf.get()));
  if (!ctx) return OpenSslError("HKDF context");
  std::string salt = absl::StrCat(Sv(eph_pub), Sv(recipient_pub));
  std::string ikm(shared);
  std::string info(kSealInfo);
  char digest[] = "SHA256";
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, ikm.data(), ikm.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, salt.data(), salt.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, info.data(), info.size()),
      OSSL_PARAM_construct_end(),
  };
  std::string key(32, '\0');
  int ok = EVP_KDF_derive(ctx.get(), U8(key), key.size(), params);
  OPENSSL_cleanse(ikm.data(), ikm.size());
  if (ok != 1) return OpenSslError("HKDF-SHA256 derive");
  return key;
}

// Closes an fd on scope exit.
class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  ~FdCloser() {
    if (fd_ >= 0) ::close(fd_);
  }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

absl::Status WriteAll(int fd, std::string_view data, const std::string& path) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoToStatus(errno, "writing " + path);
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// Feeds one file into the hash: name | 0x00 | u64le size | bytes.
absl::Status HashFile(EVP_MD_CTX* sha, const std::string& dir, const std::string& name) {
  std::string path = dir + "/" + name;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoToStatus(errno, "opening " + path);
  FdCloser closer(fd);
  struct stat st;
  if (::fstat(fd, &st) != 0) return ErrnoToStatus(errno, "stat " + path);
  uint64_t size = static_cast<uint64_t>(st.st_size);
  unsigned char prefix[8];
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<unsigned char>(size >> (8 * i));
  if (EVP_DigestUpdate(sha, name.data(), name.size()) != 1 || EVP_DigestUpdate(sha, "\0", 1) != 1 ||
      EVP_DigestUpdate(sha, prefix, sizeof(prefix)) != 1) {
    return OpenSslError("SHA-256 update");
  }
  std::vector<char> buf(kReadChunk);
  uint64_t total = 0;
  for (;;) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoToStatus(errno, "reading " + path);
    }
    if (n == 0) break;
    if (EVP_DigestUpdate(sha, buf.data(), static_cast<size_t>(n)) != 1) {
      return OpenSslError("SHA-256 update");
    }
    total += static_cast<uint64_t>(n);
  }
  if (total != size) {
    return absl::AbortedError(absl::StrCat("hashing ", path, ": expected ", size,
                                           " bytes (stat), read ", total,
                                           "; file changed while hashing"));
  }
  return absl::OkStatus();
}

}  // namespace

std::string Sha256(std::string_view data) {
  std::string out(SHA256_DIGEST_LENGTH, '\0');
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), U8(out), &len, EVP_sha256(), nullptr) != 1) {
    // Only fails when the default provider is unusable: an environment fault.
    std::fprintf(stderr, "fatal: %s\n", OpenSslError("SHA-256").ToString().c_str());
    std::abort();
  }
  return out;
}

std::string Sha256Hex(std::string_view data) { return HexEncode(Sha256(data)); }

std::string HexEncode(std::string_view bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out(bytes.size() * 2, '\0');
  for (size_t i = 0; i < bytes.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(bytes[i]);
    out[2 * i] = kDigits[c >> 4];
    out[2 * i + 1] = kDigits[c & 0xf];
  }
  return out;
}

absl::StatusOr<std::string> HexDecode(std::string_view hex) {
  if (hex.size() % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("hex: expected an even number of digits, found ", hex.size()));
  }
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::string out(hex.size() / 2, '\0');
  for (size_t i = 0; i < hex.size(); i += 2) {
    int hi = nibble(hex[i]);
    int lo = nibble(hex[i + 1]);
    if (hi < 0 || lo < 0) {
      size_t bad = hi < 0 ? i : i + 1;
      return absl::InvalidArgumentError(absl::StrCat("hex: expected a hex digit at offset ", bad,
                                                     ", found byte 0x",
                                                     HexEncode(hex.substr(bad, 1))));
    }
    out[i / 2] = static_cast<char>((hi << 4) | lo);
  }
  return out;
}

std::string RandomBytes(size_t n) {
  std::string out(n, '\0');
  if (n > 0 && RAND_bytes(U8(out), static_cast<int>(n)) != 1) {
    // No usable CSPRNG: continuing would produce predictable keys.
    std::fprintf(stderr, "fatal: %s\n", OpenSslError("RAND_bytes").ToString().c_str());
    std::abort();
  }
  return out;
}

absl::StatusOr<X25519KeyPair> GenerateX25519KeyPair() {
  return X25519FromPrivate(RandomBytes(kX25519Len));
}

absl::StatusOr<X25519KeyPair> X25519FromPrivate(std::string_view private_key) {
  ASSIGN_OR_RETURN(EvpPkeyPtr key, X25519PrivateKey(private_key));
  X25519KeyPair pair;
  pair.private_key = std::string(private_key);
  ASSIGN_OR_RETURN(pair.public_key, RawPublicKey(key.get()));
  return pair;
}

absl::StatusOr<std::string> X25519SharedSecret(std::string_view private_key,
                                               std::string_view peer_public_key) {
  ASSIGN_OR_RETURN(EvpPkeyPtr key, X25519PrivateKey(private_key));
  if (peer_public_key.size() != kX25519Len) {
    return absl::InvalidArgumentError(
        absl::StrCat("X25519 peer public key: expected 32 bytes, found ", peer_public_key.size()));
  }
  EvpPkeyPtr peer(EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, nullptr, U8(peer_public_key),
                                              peer_public_key.size()));
  if (!peer) return OpenSslError("X25519 peer public key");
  EvpPkeyCtxPtr ctx(EVP_PKEY_CTX_new(key.get(), nullptr));
  if (!ctx || EVP_PKEY_derive_init(ctx.get()) != 1) return OpenSslError("X25519 derive init");
  if (EVP_PKEY_derive_set_peer(ctx.get(), peer.get()) != 1) {
    return OpenSslError("X25519 derive set peer");
  }
  std::string secret(kX25519Len, '\0');
  size_t len = secret.size();
  if (EVP_PKEY_derive(ctx.get(), U8(secret), &len) != 1 || len != kX25519Len) {
    // OpenSSL refuses an all-zero result (peer key of small order).
    ClearOpenSslErrors();
    return absl::InvalidArgumentError(
        "X25519: agreement failed (peer public key is of small order)");
  }
  return secret;
}

absl::StatusOr<std::string> SealToPublicKey(std::string_view recipient_public_key,
                                            std::string_view plaintext, std::string_view aad) {
  if (recipient_public_key.size() != kX25519Len) {
    return absl::InvalidArgumentError(
        absl::StrCat("seal: expected a 32-byte X25519 recipient public key, found ",
                     recipient_public_key.size(), " bytes"));
  }
  if (plaintext.size() > static_cast<size_t>(INT32_MAX) ||
      aad.size() > static_cast<size_t>(INT32_MAX)) {
    return absl::InvalidArgumentError("seal: plaintext or AAD larger than 2 GiB");
  }
  ASSIGN_OR_RETURN(X25519KeyPair eph, GenerateX25519KeyPair());
  ASSIGN_OR_RETURN(std::string shared, X25519SharedSecret(eph.private_key, recipient_public_key));
  OPENSSL_cleanse(eph.private_key.data(), eph.private_key.size());
  ASSIGN_OR_RETURN(std::string key, DeriveSealKey(shared, eph.public_key, recipient_public_key));
  OPENSSL_cleanse(shared.data(), shared.size());
  std::string nonce = RandomBytes(kNonceLen);

  std::string out;
  out.reserve(kSealOverhead + plaintext.size());
  out.append(kSealMagic, kMagicLen);
  out.append(eph.public_key);
  out.append(nonce);
  size_t ct_offset = out.size();
  out.resize(ct_offset + plaintext.size() + kTagLen);

  EvpCipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  int len = 0;
  bool ok =
      ctx && EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, U8(key), U8(nonce)) == 1;
  OPENSSL_cleanse(key.data(), key.size());
  if (!ok) return OpenSslError("seal: AES-256-GCM init");
  if (!aad.empty() &&
      EVP_EncryptUpdate(ctx.get(), nullptr, &len, U8(aad), static_cast<int>(aad.size())) != 1) {
    return OpenSslError("seal: AAD");
  }
  unsigned char* ct = U8(out) + ct_offset;
  int written = 0;
  if (!plaintext.empty()) {
    if (EVP_EncryptUpdate(ctx.get(), ct, &len, U8(plaintext), static_cast<int>(plaintext.size())) !=
        1) {
      return OpenSslError("seal: encrypt");
    }
    written = len;
  }
  if (EVP_EncryptFinal_ex(ctx.get(), ct + written, &len) != 1) {
    return OpenSslError("seal: encrypt final");
  }
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, kTagLen, ct + plaintext.size()) != 1) {
    return OpenSslError("seal: GCM tag");
  }
  return out;
}

absl::StatusOr<std::string> OpenSealed(const X25519KeyPair& recipient, std::string_view sealed,
                                       std::string_view aad) {
  if (sealed.size() < kSealOverhead) {
    return absl::InvalidArgumentError(absl::StrCat("sealed message: expected at least ",
                                                   kSealOverhead, " bytes, found ", sealed.size(),
                                                   "; authentication failed"));
  }
  if (sealed.substr(0, kMagicLen) != std::string_view(kSealMagic, kMagicLen)) {
    return absl::InvalidArgumentError(
        "sealed message: expected magic \"FLS1\"; authentication failed");
  }
  if (aad.size() > static_cast<size_t>(INT32_MAX) ||
      sealed.size() - kSealOverhead > static_cast<size_t>(INT32_MAX)) {
    return absl::InvalidArgumentError("open: sealed message or AAD larger than 2 GiB");
  }
  std::string_view eph_pub = sealed.substr(kMagicLen, kX25519Len);
  std::string_view nonce = sealed.substr(kMagicLen + kX25519Len, kNonceLen);
  std::string_view ct =
      sealed.substr(kMagicLen + kX25519Len + kNonceLen, sealed.size() - kSealOverhead);
  std::string tag(sealed.substr(sealed.size() - kTagLen));

  // The recipient's public key is recomputed, so a stale public_key field
  // cannot make a valid message fail (or a forged one pass).
  ASSIGN_OR_RETURN(X25519KeyPair me, X25519FromPrivate(recipient.private_key));
  auto shared = X25519SharedSecret(me.private_key, eph_pub);
  if (!shared.ok()) return AuthFailed();  // modified ephemeral key
  ASSIGN_OR_RETURN(std::string key, DeriveSealKey(*shared, eph_pub, me.public_key));
  OPENSSL_cleanse(shared->data(), shared->size());

  EvpCipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  bool ok =
      ctx && EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, U8(key), U8(nonce)) == 1;
  OPENSSL_cleanse(key.data(), key.size());
  if (!ok) return OpenSslError("open: AES-256-GCM init");
  int len = 0;
  if (!aad.empty() &&
      EVP_DecryptUpdate(ctx.get(), nullptr, &len, U8(aad), static_cast<int>(aad.size())) != 1) {
    return OpenSslError("open: AAD");
  }
  std::string plain(ct.size(), '\0');
  int written = 0;
  if (!ct.empty()) {
    if (EVP_DecryptUpdate(ctx.get(), U8(plain), &len, U8(ct), static_cast<int>(ct.size())) != 1) {
      return OpenSslError("open: decrypt");
    }
    written = len;
  }
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, kTagLen, tag.data()) != 1) {
    return OpenSslError("open: GCM tag");
  }
  if (EVP_DecryptFinal_ex(ctx.get(), U8(plain) + written, &len) != 1) {
    ClearOpenSslErrors();
    OPENSSL_cleanse(plain.data(), plain.size());
    return AuthFailed();
  }
  return plain;
}

absl::StatusOr<std::string> HashModelDirectory(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return ErrnoToStatus(errno, "opening model directory " + dir);
  std::vector<std::string> shards;
  bool has_config = false;
  errno = 0;
  while (struct dirent* e = ::readdir(d)) {
    std::string name = e->d_name;
    bool is_config = name == "config.json";
    if (!is_config && !EndsWith(name, ".safetensors")) continue;
    struct stat st;
    if (::stat((dir + "/" + name).c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    if (is_config) {
      has_config = true;
    } else {
      shards.push_back(std::move(name));
    }
  }
  ::closedir(d);
  if (!has_config) {
    return absl::NotFoundError("hashing model directory " + dir +
                               ": expected config.json, found none");
  }
  if (shards.empty()) {
    return absl::InvalidArgumentError("hashing model directory " + dir +
                                      ": expected at least one *.safetensors file, found none");
  }
  std::sort(shards.begin(), shards.end());
  EvpMdCtxPtr sha(EVP_MD_CTX_new());
  if (!sha || EVP_DigestInit_ex(sha.get(), EVP_sha256(), nullptr) != 1) {
    return OpenSslError("SHA-256 init");
  }
  RETURN_IF_ERROR(HashFile(sha.get(), dir, "config.json"));
  for (const std::string& name : shards) RETURN_IF_ERROR(HashFile(sha.get(), dir, name));
  std::string digest(SHA256_DIGEST_LENGTH, '\0');
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(sha.get(), U8(digest), &len) != 1) return OpenSslError("SHA-256 final");
  return HexEncode(digest);
}

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoToStatus(errno, "opening " + path);
  FdCloser closer(fd);
  struct stat st;
  if (::fstat(fd, &st) != 0) return ErrnoToStatus(errno, "stat " + path);
  if (S_ISDIR(st.st_mode)) {
    return absl::InvalidArgumentError("reading " + path + ": expected a file, found a directory");
  }
  std::string out;
  if (st.st_size > 0) out.reserve(static_cast<size_t>(st.st_size));
  std::vector<char> buf(kReadChunk);
  for (;;) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoToStatus(errno, "reading " + path);
    }
    if (n == 0) break;
    out.append(buf.data(), static_cast<size_t>(n));
  }
  return out;
}

absl::Status WriteFileAtomic(const std::string& path, std::string_view data, int mode) {
  size_t slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  std::string tmpl = path + ".tmp.XXXXXX";
  std::vector<char> tmp(tmpl.begin(), tmpl.end());
  tmp.push_back('\0');
  int fd = ::mkstemp(tmp.data());
  if (fd < 0) return ErrnoToStatus(errno, "creating temporary file for " + path);
  std::string tmp_path(tmp.data());
  auto fail = [&](absl::Status s) {
    ::unlink(tmp_path.c_str());
    return s;
  };
  {
    FdCloser closer(fd);
    if (::fchmod(fd, static_cast<mode_t>(mode)) != 0) {
      return fail(ErrnoToStatus(errno, "chmod " + tmp_path));
    }
    absl::Status s = WriteAll(fd, data, tmp_path);
    if (!s.ok()) return fail(s);
    if (::fsync(fd) != 0) return fail(ErrnoToStatus(errno, "fsync " + tmp_path));
    if (::close(closer.release()) != 0) return fail(ErrnoToStatus(errno, "closing " + tmp_path));
  }
  if (::rename(tmp_path.c_str(), path.c_str()) != 0) {
    return fail(ErrnoToStatus(errno, "renaming " + tmp_path + " to " + path));
  }
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return ErrnoToStatus(errno, "opening directory " + dir + " to fsync");
  FdCloser dcloser(dfd);
  if (::fsync(dfd) != 0) return ErrnoToStatus(errno, "fsync directory " + dir);
  return absl::OkStatus();
}

}  // namespace fedlora::common
