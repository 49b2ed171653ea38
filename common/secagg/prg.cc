#include "common/secagg/prg.h"

#include <openssl/evp.h>

#include <algorithm>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/crypto/openssl_util.h"
#include "common/status/status.h"

namespace fedlora::common::secagg {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "PRG words are read as little-endian; add a byte swap for big-endian hosts");

constexpr size_t kBlockWords = 4;          // one AES block = 16 bytes = 4 words
constexpr size_t kChunkWords = 16 * 1024;  // 64 KiB of keystream per EVP call
constexpr size_t kCacheBlockWords = 16 * 1024;

absl::Status CheckSeed(std::string_view seed) {
  if (seed.size() != kSeedBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("PRG seed: expected 32 bytes, found ", seed.size()));
  }
  return absl::OkStatus();
}

const EVP_CIPHER* Aes256Ctr() {
  // Fetched once; EVP_CIPHER_fetch is expensive relative to a small chunk.
  static EVP_CIPHER* cipher = EVP_CIPHER_fetch(nullptr, "AES-256-CTR", nullptr);
  return cipher;
}

}  // namespace

struct MaskExpander::Impl {
  EvpCipherCtxPtr ctx{EVP_CIPHER_CTX_new()};
  std::vector<uint32_t> zeros = std::vector<uint32_t>(kChunkWords + kBlockWords, 0);
  std::vector<uint32_t> stream = std::vector<uint32_t>(kChunkWords + kBlockWords, 0);
};

MaskExpander::MaskExpander() : impl_(new Impl) {}
MaskExpander::~MaskExpander() { delete impl_; }

absl::Status MaskExpander::Apply(std::string_view seed, uint64_t start_word, MaskSign sign,
                                 absl::Span<uint32_t> out) {
  RETURN_IF_ERROR(CheckSeed(seed));
  if (!impl_->ctx) return OpenSslError("AES-256-CTR context");
  const EVP_CIPHER* cipher = Aes256Ctr();
  if (cipher == nullptr) return OpenSslError("fetching AES-256-CTR");
  uint64_t block = start_word / kBlockWords;
  size_t skip = static_cast<size_t>(start_word % kBlockWords);
  unsigned char iv[16] = {0};
  for (int i = 0; i < 8; ++i) iv[15 - i] = static_cast<unsigned char>(block >> (8 * i));
  if (EVP_EncryptInit_ex2(impl_->ctx.get(), cipher,
                          reinterpret_cast<const unsigned char*>(seed.data()), iv,
                          nullptr) != 1) {
    return OpenSslError("AES-256-CTR init");
  }
  size_t done = 0;
  while (done < out.size()) {
    // skip + want is a whole number of blocks except in the last chunk, so no
    // generated keystream word is ever skipped between chunks.
    size_t want = std::min(kChunkWords - skip, out.size() - done);
    // Whole blocks covering skip + want words.
    size_t words = (skip + want + kBlockWords - 1) / kBlockWords * kBlockWords;
    int outl = 0;
    if (EVP_EncryptUpdate(impl_->ctx.get(), reinterpret_cast<unsigned char*>(impl_->stream.data()),
                          &outl, reinterpret_cast<const unsigned char*>(impl_->zeros.data()),
                          static_cast<int>(words * sizeof(uint32_t))) != 1 ||
        outl != static_cast<int>(words * sizeof(uint32_t))) {
      return OpenSslError("AES-256-CTR keystream");
    }
    const uint32_t* ks = impl_->stream.data() + skip;
    uint32_t* dst = out.data() + done;
    if (sign == MaskSign::kAdd) {
      for (size_t i = 0; i < want; ++i) dst[i] += ks[i];
    } else {
      for (size_t i = 0; i < want; ++i) dst[i] -= ks[i];
    }
    done += want;
    skip = 0;  // later chunks start on a block boundary
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint32_t>> PrgExpand(std::string_view seed, size_t n) {
  std::vector<uint32_t> out(n, 0);
  MaskExpander expander;
  RETURN_IF_ERROR(expander.Apply(seed, 0, MaskSign::kAdd, absl::MakeSpan(out)));
  return out;
}

absl::Status ApplyMasks(const std::vector<MaskTerm>& terms, absl::Span<uint32_t> out,
                        int threads) {
  for (size_t j = 0; j < terms.size(); ++j) {
    if (terms[j].seed.size() != kSeedBytes) {
      return absl::InvalidArgumentError(absl::StrCat("mask term ", j, ": seed has ",
                                                     terms[j].seed.size(), " bytes, expected 32"));
    }
  }
  if (terms.empty() || out.empty()) return absl::OkStatus();
  threads = std::max(1, std::min<int>(threads, static_cast<int>(
                                                   (out.size() + kCacheBlockWords - 1) /
                                                   kCacheBlockWords)));
  // Each worker owns a contiguous range and, per cache-sized block, applies
  // every term, so the block stays in L2 while all keystreams are added.
  auto work = [&](size_t lo, size_t hi) -> absl::Status {
    MaskExpander expander;
    for (size_t b = lo; b < hi; b += kCacheBlockWords) {
      size_t len = std::min(kCacheBlockWords, hi - b);
      for (const MaskTerm& t : terms) {
        RETURN_IF_ERROR(expander.Apply(t.seed, b, t.sign, out.subspan(b, len)));
      }
    }
    return absl::OkStatus();
  };
  if (threads == 1) return work(0, out.size());
  size_t per = (out.size() + threads - 1) / threads;
  per = (per + kCacheBlockWords - 1) / kCacheBlockWords * kCacheBlockWords;
  std::vector<absl::Status> results(threads);
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i) {
    size_t lo = std::min(out.size(), per * i);
    size_t hi = std::min(out.size(), lo + per);
    pool.emplace_back([&, i, lo, hi] { results[i] = work(lo, hi); });
  }
  for (auto& t : pool) t.join();
  for (auto& s : results) RETURN_IF_ERROR(s);
  return absl::OkStatus();
}

}  // namespace fedlora::common::secagg
