#include "common/crypto/sign.h"

#include <openssl/pem.h>
#include <sys/stat.h>

#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "common/crypto/crypto.h"
#include "common/crypto/openssl_util.h"
#include "common/status/status.h"

namespace fedlora::common {
namespace {

constexpr size_t kEd25519KeyLen = 32;
constexpr size_t kEd25519SigLen = 64;
constexpr char kStatementHeader[] = "fedlora-adapter-statement-v1";

// absl::string_view is not std::string_view in this abseil build.
inline absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

const unsigned char* U8(std::string_view s) {
  return reinterpret_cast<const unsigned char*>(s.data());
}

std::shared_ptr<EVP_PKEY> Share(EvpPkeyPtr key) {
  return std::shared_ptr<EVP_PKEY>(key.release(), EVP_PKEY_free);
}

absl::StatusOr<std::string> RawPublic(EVP_PKEY* key) {
  std::string pub(kEd25519KeyLen, '\0');
  size_t len = pub.size();
  if (EVP_PKEY_get_raw_public_key(key, reinterpret_cast<unsigned char*>(pub.data()), &len) != 1 ||
      len != kEd25519KeyLen) {
    return OpenSslError("Ed25519 public key");
  }
  return pub;
}

absl::StatusOr<std::string> BioContents(BIO* bio) {
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);  // NOLINT(runtime/int): OpenSSL's type
  if (len < 0) return OpenSslError("reading PEM buffer");
  return std::string(data, static_cast<size_t>(len));
}

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

bool IsLowerHex(std::string_view s, size_t n) {
  if (s.size() != n) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

bool IsToken(std::string_view s) {
  for (char c : s) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_' || c == '.';
    if (!ok) return false;
  }
  return true;
}

absl::Status CheckStatement(const AdapterStatement& s) {
  auto bad = [](const char* field, const char* expected, std::string_view found) {
    return absl::InvalidArgumentError(absl::StrCat("adapter statement field '", field,
                                                   "': expected ", expected, ", found '",
                                                   Sv(found.substr(0, 80)), "'"));
  };
  if (s.version_id.empty() || !IsToken(s.version_id)) {
    return bad("version_id", "a non-empty [A-Za-z0-9._-] id", s.version_id);
  }
  if (!IsToken(s.parent_version)) {
    return bad("parent_version", "an [A-Za-z0-9._-] id or empty", s.parent_version);
  }
  if (!IsLowerHex(s.blob_sha256, 64)) {
    return bad("blob_sha256", "64 lowercase hex characters", s.blob_sha256);
  }
  if (!IsLowerHex(s.base_model_hash, 64)) {
    return bad("base_model_hash", "64 lowercase hex characters", s.base_model_hash);
  }
  if (s.quant.empty() || !IsToken(s.quant)) {
    return bad("quant", "a non-empty [A-Za-z0-9._-] name", s.quant);
  }
  if (!IsLowerHex(s.key_id, 16)) return bad("key_id", "16 lowercase hex characters", s.key_id);
  return absl::OkStatus();
}

}  // namespace

std::string Ed25519KeyId(std::string_view raw_public_key) {
  return HexEncode(Sha256(raw_public_key).substr(0, 8));
}

// ---------------------------------------------------------------- SigningKey

absl::StatusOr<SigningKey> SigningKey::FromPem(std::string_view pem, std::string_view source) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return OpenSslError("BIO for signing key");
  EvpPkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!key) {
    ClearOpenSslErrors();
    return absl::InvalidArgumentError(absl::StrCat(
        Sv(source), ": expected an unencrypted PEM Ed25519 private key, found none"));
  }
  if (EVP_PKEY_get_id(key.get()) != EVP_PKEY_ED25519) {
    return absl::InvalidArgumentError(absl::StrCat(
        Sv(source), ": expected an Ed25519 private key, found a ", EVP_PKEY_get0_type_name(key.get()),
        " key"));
  }
  SigningKey out;
  ASSIGN_OR_RETURN(out.public_key_, RawPublic(key.get()));
  out.key_id_ = Ed25519KeyId(out.public_key_);
  out.key_ = Share(std::move(key));
  return out;
}

absl::StatusOr<SigningKey> SigningKey::LoadFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string pem, ReadFileToString(path));
  auto key = FromPem(pem, path);
  OPENSSL_cleanse(pem.data(), pem.size());
  return key;
}

absl::StatusOr<SigningKey> SigningKey::Generate() {
  EvpPkeyCtxPtr ctx(EVP_PKEY_CTX_new_id(EVP_PKEY_ED25519, nullptr));
  if (!ctx || EVP_PKEY_keygen_init(ctx.get()) != 1) return OpenSslError("Ed25519 keygen init");
  EVP_PKEY* raw = nullptr;
  if (EVP_PKEY_keygen(ctx.get(), &raw) != 1) return OpenSslError("Ed25519 keygen");
  EvpPkeyPtr key(raw);
  SigningKey out;
  ASSIGN_OR_RETURN(out.public_key_, RawPublic(key.get()));
  out.key_id_ = Ed25519KeyId(out.public_key_);
  out.key_ = Share(std::move(key));
  return out;
}

absl::StatusOr<std::string> SigningKey::Sign(std::string_view message) const {
  EvpMdCtxPtr ctx(EVP_MD_CTX_new());
  if (!ctx || EVP_DigestSignInit(ctx.get(), nullptr, nullptr, nullptr, key_.get()) != 1) {
    return OpenSslError("Ed25519 sign init");
  }
  std::string sig(kEd25519SigLen, '\0');
  size_t len = sig.size();
  if (EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(sig.data()), &len, U8(message),
                     message.size()) != 1 ||
      len != kEd25519SigLen) {
    return OpenSslError("Ed25519 sign");
  }
  return sig;
}

absl::StatusOr<std::string> SigningKey::PrivatePem() const {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_PrivateKey(bio.get(), key_.get(), nullptr, nullptr, 0, nullptr,
                                       nullptr) != 1) {
    return OpenSslError("encoding Ed25519 private key as PEM");
  }
  return BioContents(bio.get());
}

absl::StatusOr<std::string> SigningKey::PublicPem() const {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_PUBKEY(bio.get(), key_.get()) != 1) {
    return OpenSslError("encoding Ed25519 public key as PEM");
  }
  return BioContents(bio.get());
}

// ---------------------------------------------------------------- VerifyKey

absl::StatusOr<VerifyKey> VerifyKey::FromPem(std::string_view pem, std::string_view source) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return OpenSslError("BIO for public key");
  EvpPkeyPtr key(PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr));
  if (!key) {
    ClearOpenSslErrors();
    return absl::InvalidArgumentError(absl::StrCat(
        Sv(source), ": expected a PEM Ed25519 public key (BEGIN PUBLIC KEY), found none"));
  }
  if (EVP_PKEY_get_id(key.get()) != EVP_PKEY_ED25519) {
    return absl::InvalidArgumentError(absl::StrCat(
        Sv(source), ": expected an Ed25519 public key, found a ", EVP_PKEY_get0_type_name(key.get()),
        " key"));
  }
  VerifyKey out;
  ASSIGN_OR_RETURN(out.public_key_, RawPublic(key.get()));
  out.key_id_ = Ed25519KeyId(out.public_key_);
  out.key_ = Share(std::move(key));
  return out;
}

absl::StatusOr<VerifyKey> VerifyKey::LoadFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string pem, ReadFileToString(path));
  return FromPem(pem, path);
}

absl::StatusOr<VerifyKey> VerifyKey::FromRaw(std::string_view raw_public_key) {
  if (raw_public_key.size() != kEd25519KeyLen) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Ed25519 public key: expected 32 bytes, found ", raw_public_key.size()));
  }
  EvpPkeyPtr key(EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, U8(raw_public_key),
                                             raw_public_key.size()));
  if (!key) return OpenSslError("Ed25519 public key");
  VerifyKey out;
  out.public_key_ = std::string(raw_public_key);
  out.key_id_ = Ed25519KeyId(out.public_key_);
  out.key_ = Share(std::move(key));
  return out;
}

absl::Status VerifyKey::Verify(std::string_view message, std::string_view signature) const {
  if (signature.size() != kEd25519SigLen) {
    return absl::InvalidArgumentError(absl::StrCat(
        "signature verification failed: expected a 64-byte Ed25519 signature, found ",
        signature.size(), " bytes"));
  }
  EvpMdCtxPtr ctx(EVP_MD_CTX_new());
  if (!ctx || EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, key_.get()) != 1) {
    return OpenSslError("Ed25519 verify init");
  }
  int rc = EVP_DigestVerify(ctx.get(), U8(signature), signature.size(), U8(message),
                            message.size());
  if (rc != 1) {
    ClearOpenSslErrors();
    return absl::InvalidArgumentError(absl::StrCat(
        "signature verification failed (Ed25519, key id ", key_id_, ")"));
  }
  return absl::OkStatus();
}

absl::Status WriteNewSigningKeyPair(const std::string& private_path,
                                    const std::string& public_path) {
  for (const std::string& path : {private_path, public_path}) {
    if (FileExists(path)) {
      return absl::AlreadyExistsError(path + " already exists; refusing to overwrite a signing key");
    }
  }
  ASSIGN_OR_RETURN(SigningKey key, SigningKey::Generate());
  ASSIGN_OR_RETURN(std::string priv, key.PrivatePem());
  ASSIGN_OR_RETURN(std::string pub, key.PublicPem());
  // Public key first: a present private key then implies a complete pair.
  RETURN_IF_ERROR(WriteFileAtomic(public_path, pub, 0644));
  absl::Status s = WriteFileAtomic(private_path, priv, 0600);
  OPENSSL_cleanse(priv.data(), priv.size());
  return s;
}

// ---------------------------------------------------------------- Statements

absl::StatusOr<std::string> CanonicalAdapterMessage(const AdapterStatement& s) {
  RETURN_IF_ERROR(CheckStatement(s));
  return absl::StrCat(kStatementHeader, "\nversion_id=", s.version_id, "\nround_id=", s.round_id,
                      "\nparent_version=", s.parent_version, "\nblob_sha256=", s.blob_sha256,
                      "\nbase_model_hash=", s.base_model_hash, "\nquant=", s.quant,
                      "\nkey_id=", s.key_id, "\n");
}

absl::StatusOr<std::string> SignAdapterStatement(const SigningKey& key,
                                                 AdapterStatement statement) {
  statement.key_id = key.key_id();
  ASSIGN_OR_RETURN(std::string message, CanonicalAdapterMessage(statement));
  ASSIGN_OR_RETURN(std::string sig, key.Sign(message));
  return absl::StrCat(message, "signature=", HexEncode(sig), "\n");
}

absl::StatusOr<AdapterStatement> ParseAndVerifyAdapterStatement(const VerifyKey& key,
                                                                std::string_view encoded) {
  auto malformed = [](std::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter statement: malformed (", Sv(why), ")"));
  };
  if (encoded.empty()) return malformed("empty; the version is not signed");
  if (encoded.size() > 4096) return malformed("longer than 4096 bytes");
  if (encoded.back() != '\n') return malformed("expected a final newline");
  std::vector<absl::string_view> lines =
      absl::StrSplit(Sv(encoded.substr(0, encoded.size() - 1)), '\n');
  static const char* const kFields[] = {"version_id",      "round_id", "parent_version",
                                        "blob_sha256",     "base_model_hash", "quant",
                                        "key_id",          "signature"};
  constexpr size_t kNumFields = sizeof(kFields) / sizeof(kFields[0]);
  if (lines.size() != kNumFields + 1 || lines[0] != kStatementHeader) {
    return malformed(absl::StrCat("expected the header line '", kStatementHeader, "' and ",
                                  kNumFields, " fields"));
  }
  std::string values[kNumFields];
  for (size_t i = 0; i < kNumFields; ++i) {
    absl::string_view line = lines[i + 1];
    const std::string prefix = absl::StrCat(kFields[i], "=");
    if (!absl::StartsWith(line, prefix)) {
      return malformed(absl::StrCat("line ", i + 2, ": expected '", prefix, "...'"));
    }
    values[i] = std::string(line.substr(prefix.size()));
  }
  AdapterStatement s;
  s.version_id = values[0];
  if (!absl::SimpleAtoi(values[1], &s.round_id) || std::to_string(s.round_id) != values[1]) {
    return malformed(absl::StrCat("round_id '", values[1], "' is not a canonical decimal"));
  }
  s.parent_version = values[2];
  s.blob_sha256 = values[3];
  s.base_model_hash = values[4];
  s.quant = values[5];
  s.key_id = values[6];
  if (!IsLowerHex(values[7], 2 * kEd25519SigLen)) {
    return malformed("signature: expected 128 lowercase hex characters");
  }
  ASSIGN_OR_RETURN(std::string message, CanonicalAdapterMessage(s));
  if (absl::StrCat(message, "signature=", values[7], "\n") != encoded) {
    return malformed("not in canonical form");
  }
  if (s.key_id != key.key_id()) {
    return absl::FailedPreconditionError(
        absl::StrCat("adapter statement of version ", s.version_id, " is signed by key id ",
                     s.key_id, ", expected the coordinator signing key id ", key.key_id()));
  }
  ASSIGN_OR_RETURN(std::string sig, HexDecode(values[7]));
  RETURN_IF_ERROR(key.Verify(message, sig));
  return s;
}

}  // namespace fedlora::common
