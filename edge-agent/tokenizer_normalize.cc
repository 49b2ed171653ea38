// NFC. The tables in tokenizer_nfc_data.h come from this generator (Python 3):
//
//   import unicodedata as u
//   for cp in range(0x110000), skipping surrogates and Hangul syllables:
//     d = u.decomposition(chr(cp)); canonical when d and not d.startswith('<')
//       -> kDecompositions (cp, first, second|0)
//     composite when len(parts)==2 and NFC(chr(cp))==chr(cp) and ccc(first)==0
//       -> kCompositions (first, second, cp), sorted
//     u.combining(chr(cp)) != 0 -> kCcc ranges of equal class
//
// Composition exclusions need no list: an excluded character does not survive
// NFC, so the generator leaves it out of kCompositions.

#include "edge-agent/tokenizer_normalize.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "edge-agent/tokenizer_nfc_data.h"
#include "edge-agent/tokenizer_unicode.h"

namespace fedlora::edge::tok {
namespace {

constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
                   kSCount = kLCount * kNCount;

uint8_t Ccc(uint32_t cp) {
  if (cp < 0x300) return 0;
  const auto* begin = std::begin(nfc_data::kCcc);
  const auto* end = std::end(nfc_data::kCcc);
  auto it = std::upper_bound(begin, end, cp,
                             [](uint32_t c, const nfc_data::CccRange& r) { return c < r.first; });
  if (it == begin) return 0;
  --it;
  return cp <= it->last ? it->ccc : 0;
}

void Decompose(uint32_t cp, std::vector<uint32_t>* out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    uint32_t s = cp - kSBase;
    out->push_back(kLBase + s / kNCount);
    out->push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out->push_back(kTBase + s % kTCount);
    return;
  }
  if (cp >= 0xC0) {
    const auto* begin = std::begin(nfc_data::kDecompositions);
    const auto* end = std::end(nfc_data::kDecompositions);
    auto it = std::lower_bound(
        begin, end, cp, [](const nfc_data::Decomposition& d, uint32_t c) { return d.cp < c; });
    if (it != end && it->cp == cp) {
      Decompose(it->first, out);
      if (it->second != 0) Decompose(it->second, out);
      return;
    }
  }
  out->push_back(cp);
}

// Composite of (a, b), or 0.
uint32_t Compose(uint32_t a, uint32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount) {
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  }
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase &&
      b < kTBase + kTCount) {
    return a + (b - kTBase);
  }
  const auto* begin = std::begin(nfc_data::kCompositions);
  const auto* end = std::end(nfc_data::kCompositions);
  auto it =
      std::lower_bound(begin, end, std::make_pair(a, b),
                       [](const nfc_data::Composition& c, const std::pair<uint32_t, uint32_t>& k) {
                         return c.first != k.first ? c.first < k.first : c.second < k.second;
                       });
  if (it != end && it->first == a && it->second == b) return it->composite;
  return 0;
}

}  // namespace

std::string ToNfc(std::string_view text) {
  // Fast path: nothing below U+0300 changes under NFC.
  bool simple = true;
  for (size_t i = 0; i < text.size() && simple;) {
    size_t len;
    uint32_t cp = DecodeCodePoint(text, i, &len);
    simple = cp < 0x300;
    i += len;
  }
  if (simple) return std::string(text);

  std::string out;
  out.reserve(text.size());
  size_t i = 0;
  std::vector<uint32_t> cps;
  while (i < text.size()) {
    // Process runs of valid UTF-8; copy invalid bytes through untouched.
    cps.clear();
    while (i < text.size()) {
      size_t len;
      uint32_t cp = DecodeCodePoint(text, i, &len);
      if (len == 1 && static_cast<unsigned char>(text[i]) >= 0x80) break;  // invalid byte
      Decompose(cp, &cps);
      i += len;
    }
    // Canonical ordering: stable sort of each run of non-starters by class.
    for (size_t a = 0; a < cps.size();) {
      if (Ccc(cps[a]) == 0) {
        ++a;
        continue;
      }
      size_t b = a;
      while (b < cps.size() && Ccc(cps[b]) != 0) ++b;
      std::stable_sort(cps.begin() + a, cps.begin() + b,
                       [](uint32_t x, uint32_t y) { return Ccc(x) < Ccc(y); });
      a = b;
    }
    // Canonical composition.
    if (!cps.empty()) {
      std::vector<uint32_t> res;
      res.reserve(cps.size());
      int starter = -1;
      int last_ccc = -1;  // class of the last character appended after the starter
      for (uint32_t cp : cps) {
        int c = Ccc(cp);
        if (starter >= 0) {
          bool blocked = last_ccc != -1 && (last_ccc == 0 || last_ccc >= c);
          if (!blocked) {
            uint32_t comp = Compose(res[starter], cp);
            if (comp != 0) {
              res[starter] = comp;
              continue;
            }
          }
        }
        if (c == 0) {
          starter = static_cast<int>(res.size());
          last_ccc = -1;
        } else {
          last_ccc = c;
        }
        res.push_back(cp);
      }
      for (uint32_t cp : res) AppendUtf8(cp, &out);
    }
    if (i < text.size() && static_cast<unsigned char>(text[i]) >= 0x80) {
      size_t len;
      DecodeCodePoint(text, i, &len);
      if (len == 1) {
        out.push_back(text[i]);
        ++i;
      }
    }
  }
  return out;
}

}  // namespace fedlora::edge::tok
