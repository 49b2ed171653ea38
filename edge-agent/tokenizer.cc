// Hugging Face tokenizer.json pipeline: added tokens -> normalizer ->
// pre-tokenizer -> BPE model, and decoders back. Each stage mirrors the
// corresponding `tokenizers` (Rust) component; comments note where we differ.
//
// vocab_size() is 1 + the largest id of the model vocab and the added tokens
// (for dense vocabularies, as all supported families have, that is the count).

#include "edge-agent/tokenizer.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <fstream>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status/status.h"
#include "edge-agent/tokenizer_bpe.h"
#include "edge-agent/tokenizer_normalize.h"
#include "edge-agent/tokenizer_regex.h"
#include "edge-agent/tokenizer_unicode.h"
#include "nlohmann/json.hpp"

namespace fedlora::edge {
namespace {

using json = nlohmann::json;
using tok::Regex;

// Where a component lives, for error messages: file + JSON path.
struct Where {
  const std::string& file;
  std::string path;
  int depth = 0;  // Sequence nesting, bounded so hostile input cannot exhaust the stack
  absl::Status Error(const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(file, ": field \"", path, "\": ", what));
  }
  Where Sub(const std::string& key) const { return Where{file, path + "." + key, depth}; }
  Where Index(size_t i) const { return Where{file, absl::StrCat(path, "[", i, "]"), depth}; }
  // The i-th element of a Sequence's list `key`, one nesting level deeper.
  absl::StatusOr<Where> Nested(const std::string& key, size_t i) const {
    if (depth >= kMaxNesting)
      return Error(absl::StrCat("Sequence nested deeper than ", kMaxNesting, " levels"));
    Where w = Sub(key).Index(i);
    w.depth = depth + 1;
    return w;
  }
  static constexpr int kMaxNesting = 16;
};

absl::StatusOr<const json*> Field(const json& obj, const char* key, const Where& w) {
  auto it = obj.find(key);
  if (it == obj.end()) return w.Sub(key).Error("missing");
  return &*it;
}

absl::StatusOr<std::string> GetString(const json& obj, const char* key, const Where& w) {
  ASSIGN_OR_RETURN(const json* v, Field(obj, key, w));
  if (!v->is_string())
    return w.Sub(key).Error(absl::StrCat("expected a string, found ", v->type_name()));
  return v->get<std::string>();
}

absl::StatusOr<bool> GetBool(const json& obj, const char* key, bool dflt, const Where& w) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return dflt;
  if (!it->is_boolean()) {
    return w.Sub(key).Error(absl::StrCat("expected a boolean, found ", it->type_name()));
  }
  return it->get<bool>();
}

absl::StatusOr<std::string> GetType(const json& obj, const Where& w) {
  if (!obj.is_object()) return w.Error(absl::StrCat("expected an object, found ", obj.type_name()));
  return GetString(obj, "type", w);
}

// ---------------------------------------------------------------------------
// Patterns: {"String": "..."} (literal) or {"Regex": "..."}.

class Pattern {
 public:
  static absl::StatusOr<Pattern> FromJson(const json& j, const Where& w) {
    Pattern p;
    if (j.is_object() && j.contains("String") && j["String"].is_string()) {
      p.literal_ = j["String"].get<std::string>();
      return p;
    }
    if (j.is_object() && j.contains("Regex") && j["Regex"].is_string()) {
      auto re = Regex::Compile(j["Regex"].get<std::string>());
      if (!re.ok()) return w.Error(std::string(re.status().message()));
      p.regex_ = std::shared_ptr<Regex>(std::move(*re));
      return p;
    }
    return w.Error("expected {\"String\": ...} or {\"Regex\": ...}, found " + j.dump());
  }
  static Pattern FromRegex(std::shared_ptr<Regex> re) {
    Pattern p;
    p.regex_ = std::move(re);
    return p;
  }

  // Non-overlapping matches, left to right.
  std::vector<std::pair<size_t, size_t>> FindAll(std::string_view text) const {
    if (regex_) return regex_->FindAll(text);
    std::vector<std::pair<size_t, size_t>> out;
    if (literal_.empty()) return out;
    size_t pos = 0;
    while ((pos = text.find(literal_, pos)) != std::string_view::npos) {
      out.emplace_back(pos, pos + literal_.size());
      pos += literal_.size();
    }
    return out;
  }

 private:
  std::string literal_;
  std::shared_ptr<Regex> regex_;
};

// ---------------------------------------------------------------------------
// Normalizers (on one segment between added tokens).

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void Normalize(std::string* s) const = 0;
};

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> items)
      : items_(std::move(items)) {}
  void Normalize(std::string* s) const override {
    for (const auto& n : items_) n->Normalize(s);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> items_;
};

class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  void Normalize(std::string* s) const override {
    if (!s->empty()) s->insert(0, prefix_);
  }

 private:
  std::string prefix_;
};

class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(Pattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void Normalize(std::string* s) const override {
    auto matches = pattern_.FindAll(*s);
    if (matches.empty()) return;
    std::string out;
    size_t prev = 0;
    for (auto [b, e] : matches) {
      out.append(*s, prev, b - prev);
      out += content_;
      prev = e;
    }
    out.append(*s, prev, std::string::npos);
    *s = std::move(out);
  }

 private:
  Pattern pattern_;
  std::string content_;
};

class StripNormalizer final : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  void Normalize(std::string* s) const override {
    size_t b = 0, e = s->size();
    if (left_) {
      while (b < e) {
        size_t len;
        uint32_t cp = tok::DecodeCodePoint(*s, b, &len);
        if (!tok::IsWhitespace(cp)) break;
        b += len;
      }
    }
    if (right_) {
      while (e > b) {
        size_t start = e - 1;
        while (start > b && (static_cast<unsigned char>((*s)[start]) & 0xC0) == 0x80) --start;
        size_t len;
        uint32_t cp = tok::DecodeCodePoint(*s, start, &len);
        if (!tok::IsWhitespace(cp)) break;
        e = start;
      }
    }
    *s = s->substr(b, e - b);
  }

 private:
  bool left_, right_;
};

class NfcNormalizer final : public Normalizer {
 public:
  void Normalize(std::string* s) const override { *s = tok::ToNfc(*s); }
};

absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const json& j, const Where& w) {
  ASSIGN_OR_RETURN(std::string type, GetType(j, w));
  if (type == "Sequence") {
    ASSIGN_OR_RETURN(const json* arr, Field(j, "normalizers", w));
    if (!arr->is_array()) return w.Sub("normalizers").Error("expected an array");
    std::vector<std::unique_ptr<Normalizer>> items;
    for (size_t i = 0; i < arr->size(); ++i) {
      ASSIGN_OR_RETURN(Where wi, w.Nested("normalizers", i));
      ASSIGN_OR_RETURN(auto n, ParseNormalizer((*arr)[i], wi));
      items.push_back(std::move(n));
    }
    return std::unique_ptr<Normalizer>(new SequenceNormalizer(std::move(items)));
  }
  if (type == "Prepend") {
    ASSIGN_OR_RETURN(std::string prefix, GetString(j, "prepend", w));
    return std::unique_ptr<Normalizer>(new PrependNormalizer(std::move(prefix)));
  }
  if (type == "Replace") {
    ASSIGN_OR_RETURN(const json* pj, Field(j, "pattern", w));
    ASSIGN_OR_RETURN(Pattern pattern, Pattern::FromJson(*pj, w.Sub("pattern")));
    ASSIGN_OR_RETURN(std::string content, GetString(j, "content", w));
    return std::unique_ptr<Normalizer>(
        new ReplaceNormalizer(std::move(pattern), std::move(content)));
  }
  if (type == "Strip") {
    ASSIGN_OR_RETURN(bool left, GetBool(j, "strip_left", true, w));
    ASSIGN_OR_RETURN(bool right, GetBool(j, "strip_right", true, w));
    return std::unique_ptr<Normalizer>(new StripNormalizer(left, right));
  }
  if (type == "NFC") return std::unique_ptr<Normalizer>(new NfcNormalizer());
  return w.Sub("type").Error("unsupported normalizer type \"" + type +
                             "\" (supported: Sequence, Prepend, Replace, Strip, NFC)");
}

// ---------------------------------------------------------------------------
// Pre-tokenizers.

struct Piece {
  std::string text;
  bool at_origin;  // starts at offset 0 of the input (Metaspace prepend_scheme "first")
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// `tokenizers`' NormalizedString::split: cut `text` at the pattern matches and
// combine the parts per `behavior`; empty parts are dropped.
void SplitByMatches(const Piece& piece, const std::vector<std::pair<size_t, size_t>>& raw_matches,
                    bool invert, SplitBehavior behavior, std::vector<Piece>* out) {
  const std::string& text = piece.text;
  struct Part {
    size_t b, e;
    bool is_match;
  };
  std::vector<Part> parts;
  size_t prev = 0;
  for (auto [b, e] : raw_matches) {
    if (prev != b) parts.push_back({prev, b, false});
    parts.push_back({b, e, true});
    prev = e;
  }
  if (prev != text.size()) parts.push_back({prev, text.size(), false});
  if (invert) {
    for (auto& p : parts) p.is_match = !p.is_match;
  }
  struct Span {
    size_t b, e;
    bool remove;
  };
  std::vector<Span> spans;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const auto& p : parts) spans.push_back({p.b, p.e, false});
      break;
    case SplitBehavior::kRemoved:
      for (const auto& p : parts) spans.push_back({p.b, p.e, p.is_match});
      break;
    case SplitBehavior::kContiguous: {
      bool previous_match = false;
      for (const auto& p : parts) {
        if (p.is_match == previous_match && !spans.empty()) {
          spans.back().e = p.e;
        } else {
          spans.push_back({p.b, p.e, false});
        }
        previous_match = p.is_match;
      }
      break;
    }
    case SplitBehavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const auto& p : parts) {
        if (p.is_match && !previous_match && !spans.empty()) {
          spans.back().e = p.e;
        } else {
          spans.push_back({p.b, p.e, false});
        }
        previous_match = p.is_match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous_match = false;
      for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
        if (it->is_match && !previous_match && !spans.empty()) {
          spans.back().b = it->b;
        } else {
          spans.push_back({it->b, it->e, false});
        }
        previous_match = it->is_match;
      }
      std::reverse(spans.begin(), spans.end());
      break;
    }
  }
  for (const auto& s : spans) {
    if (s.remove || s.e == s.b) continue;
    out->push_back(Piece{text.substr(s.b, s.e - s.b), piece.at_origin && s.b == 0});
  }
}

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  virtual void PreTokenize(std::vector<Piece>* pieces) const = 0;
};

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> items)
      : items_(std::move(items)) {}
  void PreTokenize(std::vector<Piece>* pieces) const override {
    for (const auto& p : items_) p->PreTokenize(pieces);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> items_;
};

class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(Pattern pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  void PreTokenize(std::vector<Piece>* pieces) const override {
    std::vector<Piece> out;
    for (const auto& p : *pieces)
      SplitByMatches(p, pattern_.FindAll(p.text), invert_, behavior_, &out);
    *pieces = std::move(out);
  }

 private:
  Pattern pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::shared_ptr<Regex> regex)
      : add_prefix_space_(add_prefix_space), regex_(std::move(regex)) {}
  void PreTokenize(std::vector<Piece>* pieces) const override {
    std::vector<Piece> out;
    for (auto p : *pieces) {
      if (p.text.empty()) continue;
      if (add_prefix_space_ && p.text[0] != ' ') p.text.insert(0, " ");
      if (regex_) {
        SplitByMatches(p, regex_->FindAll(p.text), false, SplitBehavior::kIsolated, &out);
      } else if (!p.text.empty()) {
        out.push_back(std::move(p));
      }
    }
    for (auto& p : out) p.text = tok::BytesToUnicode(p.text);
    *pieces = std::move(out);
  }

 private:
  bool add_prefix_space_;
  std::shared_ptr<Regex> regex_;  // null when use_regex is false
};

enum class PrependScheme { kAlways, kFirst, kNever };

class MetaspacePreTokenizer final : public PreTokenizer {
 public:
  MetaspacePreTokenizer(std::string replacement, PrependScheme scheme, bool split)
      : replacement_(std::move(replacement)), scheme_(scheme), split_(split) {}
  void PreTokenize(std::vector<Piece>* pieces) const override {
    std::vector<Piece> out;
    for (auto p : *pieces) {
      std::string replaced;
      for (char c : p.text) {
        if (c == ' ') {
          replaced += replacement_;
        } else {
          replaced.push_back(c);
        }
      }
      p.text = std::move(replaced);
      bool starts = p.text.compare(0, replacement_.size(), replacement_) == 0;
      if (!starts && (scheme_ == PrependScheme::kAlways ||
                      (scheme_ == PrependScheme::kFirst && p.at_origin))) {
        p.text.insert(0, replacement_);
      }
      if (split_) {
        Piece whole{p.text, p.at_origin};
        std::vector<std::pair<size_t, size_t>> matches;
        for (size_t pos = 0; (pos = p.text.find(replacement_, pos)) != std::string::npos;
             pos += replacement_.size()) {
          matches.emplace_back(pos, pos + replacement_.size());
        }
        SplitByMatches(whole, matches, false, SplitBehavior::kMergedWithNext, &out);
      } else if (!p.text.empty()) {
        out.push_back(std::move(p));
      }
    }
    *pieces = std::move(out);
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
  bool split_;
};

absl::StatusOr<SplitBehavior> ParseBehavior(const json& j, const Where& w) {
  ASSIGN_OR_RETURN(std::string b, GetString(j, "behavior", w));
  if (b == "Removed") return SplitBehavior::kRemoved;
  if (b == "Isolated") return SplitBehavior::kIsolated;
  if (b == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (b == "Contiguous") return SplitBehavior::kContiguous;
  return w.Sub("behavior").Error("unknown split behavior \"" + b + "\"");
}

absl::StatusOr<std::shared_ptr<Regex>> Gpt2Regex() {
  static auto* compiled =
      new absl::StatusOr<std::shared_ptr<Regex>>([]() -> absl::StatusOr<std::shared_ptr<Regex>> {
        ASSIGN_OR_RETURN(auto re, Regex::Compile(tok::kGpt2SplitRegex));
        return std::shared_ptr<Regex>(std::move(re));
      }());
  return *compiled;
}

absl::StatusOr<PrependScheme> ParsePrependScheme(const json& j, const Where& w) {
  auto it = j.find("prepend_scheme");
  if (it != j.end() && !it->is_null()) {
    if (!it->is_string()) return w.Sub("prepend_scheme").Error("expected a string");
    const auto& s = it->get_ref<const std::string&>();
    if (s == "always") return PrependScheme::kAlways;
    if (s == "first") return PrependScheme::kFirst;
    if (s == "never") return PrependScheme::kNever;
    return w.Sub("prepend_scheme")
        .Error("expected \"always\", \"first\" or \"never\", found \"" + s + "\"");
  }
  // Legacy files carry add_prefix_space instead.
  ASSIGN_OR_RETURN(bool add, GetBool(j, "add_prefix_space", true, w));
  return add ? PrependScheme::kAlways : PrependScheme::kNever;
}

absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const json& j, const Where& w) {
  ASSIGN_OR_RETURN(std::string type, GetType(j, w));
  if (type == "Sequence") {
    ASSIGN_OR_RETURN(const json* arr, Field(j, "pretokenizers", w));
    if (!arr->is_array()) return w.Sub("pretokenizers").Error("expected an array");
    std::vector<std::unique_ptr<PreTokenizer>> items;
    for (size_t i = 0; i < arr->size(); ++i) {
      ASSIGN_OR_RETURN(Where wi, w.Nested("pretokenizers", i));
      ASSIGN_OR_RETURN(auto p, ParsePreTokenizer((*arr)[i], wi));
      items.push_back(std::move(p));
    }
    return std::unique_ptr<PreTokenizer>(new SequencePreTokenizer(std::move(items)));
  }
  if (type == "Split") {
    ASSIGN_OR_RETURN(const json* pj, Field(j, "pattern", w));
    ASSIGN_OR_RETURN(Pattern pattern, Pattern::FromJson(*pj, w.Sub("pattern")));
    ASSIGN_OR_RETURN(SplitBehavior behavior, ParseBehavior(j, w));
    ASSIGN_OR_RETURN(bool invert, GetBool(j, "invert", false, w));
    return std::unique_ptr<PreTokenizer>(
        new SplitPreTokenizer(std::move(pattern), behavior, invert));
  }
  if (type == "ByteLevel") {
    ASSIGN_OR_RETURN(bool add_prefix_space, GetBool(j, "add_prefix_space", true, w));
    ASSIGN_OR_RETURN(bool use_regex, GetBool(j, "use_regex", true, w));
    std::shared_ptr<Regex> re;
    if (use_regex) {
      auto compiled = Gpt2Regex();
      if (!compiled.ok()) return compiled.status();
      re = *compiled;
    }
    return std::unique_ptr<PreTokenizer>(
        new ByteLevelPreTokenizer(add_prefix_space, std::move(re)));
  }
  if (type == "Metaspace") {
    std::string replacement = "\xE2\x96\x81";  // U+2581
    auto it = j.find("replacement");
    if (it != j.end() && it->is_string()) replacement = it->get<std::string>();
    if (replacement.empty())
      return w.Sub("replacement").Error("expected one character, found \"\"");
    ASSIGN_OR_RETURN(PrependScheme scheme, ParsePrependScheme(j, w));
    ASSIGN_OR_RETURN(bool split, GetBool(j, "split", true, w));
    return std::unique_ptr<PreTokenizer>(new MetaspacePreTokenizer(replacement, scheme, split));
  }
  if (type == "Digits") {
    ASSIGN_OR_RETURN(bool individual, GetBool(j, "individual_digits", false, w));
    ASSIGN_OR_RETURN(auto re, Regex::Compile("\\p{N}"));
    return std::unique_ptr<PreTokenizer>(new SplitPreTokenizer(
        Pattern::FromRegex(std::shared_ptr<Regex>(std::move(re))),
        individual ? SplitBehavior::kIsolated : SplitBehavior::kContiguous, false));
  }
  return w.Sub("type").Error("unsupported pre_tokenizer type \"" + type +
                             "\" (supported: Sequence, Split, ByteLevel, Metaspace, Digits)");
}

// ---------------------------------------------------------------------------
// Decoders: token strings -> token strings (`decode_chain`), joined at the end.

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void DecodeChain(std::vector<std::string>* tokens) const = 0;
};

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> items)
      : items_(std::move(items)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (const auto& d : items_) d->DecodeChain(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> items_;
};

class ByteLevelDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::string bytes;
    for (const auto& t : *tokens) {
      auto b = tok::UnicodeToBytes(t);
      bytes += b ? *b : t;  // tokens outside the byte alphabet pass through raw
    }
    tokens->assign(1, tok::Utf8Lossy(bytes));
  }
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(Pattern pattern, std::string content)
      : normalizer_(std::move(pattern), std::move(content)) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (auto& t : *tokens) normalizer_.Normalize(&t);
  }

 private:
  ReplaceNormalizer normalizer_;
};

class ByteFallbackDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::vector<std::string> out;
    std::string pending;
    size_t pending_count = 0;
    auto flush = [&] {
      if (pending_count == 0) return;
      if (tok::IsValidUtf8(pending)) {
        out.push_back(pending);
      } else {
        for (size_t i = 0; i < pending_count; ++i) out.push_back("\xEF\xBF\xBD");
      }
      pending.clear();
      pending_count = 0;
    };
    for (auto& t : *tokens) {
      int byte = ParseByteToken(t);
      if (byte >= 0) {
        pending.push_back(static_cast<char>(byte));
        ++pending_count;
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    *tokens = std::move(out);
  }

 private:
  static int HexDigit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  }
  // "<0xNN>" -> NN, else -1.
  static int ParseByteToken(const std::string& t) {
    if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
    int hi = HexDigit(t[3]), lo = HexDigit(t[4]);
    if (hi < 0 || lo < 0) return -1;
    return hi * 16 + lo;
  }
};

class FuseDecoder final : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::string all;
    for (const auto& t : *tokens) all += t;
    tokens->assign(1, std::move(all));
  }
};

class StripDecoder final : public Decoder {
 public:
  StripDecoder(std::string content, size_t start, size_t stop)
      : content_(std::move(content)), start_(start), stop_(stop) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (auto& t : *tokens) {
      auto chars = tok::Utf8Chars(t);
      size_t b = 0, e = chars.size();
      for (size_t i = 0; i < start_ && b < e && chars[b] == content_; ++i) ++b;
      for (size_t i = 0; i < stop_ && e > b && chars[e - 1] == content_; ++i) --e;
      std::string out;
      for (size_t i = b; i < e; ++i) out.append(chars[i]);
      t = std::move(out);
    }
  }

 private:
  std::string content_;
  size_t start_, stop_;
};

class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, PrependScheme scheme)
      : replacement_(std::move(replacement)), scheme_(scheme) {}
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (size_t i = 0; i < tokens->size(); ++i) {
      std::string out;
      for (auto c : tok::Utf8Chars((*tokens)[i])) {
        if (c == replacement_) {
          // `tokenizers` drops every replacement char of the first token.
          if (i == 0 && scheme_ != PrependScheme::kNever) continue;
          out.push_back(' ');
        } else {
          out.append(c);
        }
      }
      (*tokens)[i] = std::move(out);
    }
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
};

absl::StatusOr<size_t> GetSize(const json& j, const char* key, const Where& w) {
  ASSIGN_OR_RETURN(const json* v, Field(j, key, w));
  if (!v->is_number_unsigned() && !(v->is_number_integer() && v->get<int64_t>() >= 0)) {
    return w.Sub(key).Error("expected a non-negative integer, found " + v->dump());
  }
  return v->get<size_t>();
}

absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const json& j, const Where& w) {
  ASSIGN_OR_RETURN(std::string type, GetType(j, w));
  if (type == "Sequence") {
    ASSIGN_OR_RETURN(const json* arr, Field(j, "decoders", w));
    if (!arr->is_array()) return w.Sub("decoders").Error("expected an array");
    std::vector<std::unique_ptr<Decoder>> items;
    for (size_t i = 0; i < arr->size(); ++i) {
      ASSIGN_OR_RETURN(Where wi, w.Nested("decoders", i));
      ASSIGN_OR_RETURN(auto d, ParseDecoder((*arr)[i], wi));
      items.push_back(std::move(d));
    }
    return std::unique_ptr<Decoder>(new SequenceDecoder(std::move(items)));
  }
  if (type == "ByteLevel") return std::unique_ptr<Decoder>(new ByteLevelDecoder());
  if (type == "Replace") {
    ASSIGN_OR_RETURN(const json* pj, Field(j, "pattern", w));
    ASSIGN_OR_RETURN(Pattern pattern, Pattern::FromJson(*pj, w.Sub("pattern")));
    ASSIGN_OR_RETURN(std::string content, GetString(j, "content", w));
    return std::unique_ptr<Decoder>(new ReplaceDecoder(std::move(pattern), std::move(content)));
  }
  if (type == "ByteFallback") return std::unique_ptr<Decoder>(new ByteFallbackDecoder());
  if (type == "Fuse") return std::unique_ptr<Decoder>(new FuseDecoder());
  if (type == "Strip") {
    ASSIGN_OR_RETURN(std::string content, GetString(j, "content", w));
    if (tok::Utf8Chars(content).size() != 1)
      return w.Sub("content").Error("expected one character");
    ASSIGN_OR_RETURN(size_t start, GetSize(j, "start", w));
    ASSIGN_OR_RETURN(size_t stop, GetSize(j, "stop", w));
    return std::unique_ptr<Decoder>(new StripDecoder(std::move(content), start, stop));
  }
  if (type == "Metaspace") {
    std::string replacement = "\xE2\x96\x81";
    auto it = j.find("replacement");
    if (it != j.end() && it->is_string()) replacement = it->get<std::string>();
    ASSIGN_OR_RETURN(PrependScheme scheme, ParsePrependScheme(j, w));
    return std::unique_ptr<Decoder>(new MetaspaceDecoder(std::move(replacement), scheme));
  }
  return w.Sub("type").Error(
      "unsupported decoder type \"" + type +
      "\" (supported: Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip, "
      "Metaspace)");
}

// ---------------------------------------------------------------------------

struct AddedToken {
  std::string content;
  std::string match;  // content, or its normalized form for normalized tokens
  int32_t id = 0;
  bool special = false;
  bool normalized = false;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
};

// A stretch of input: plain text, or one added token (id >= 0).
struct Segment {
  std::string text;
  int32_t id;
  bool at_origin;
};

bool IsWordChar(std::string_view s, size_t i, size_t* len) {
  uint32_t cp = tok::DecodeCodePoint(s, i, len);
  if (cp < 0x80) return std::isalnum(static_cast<int>(cp)) != 0;
  return !tok::IsWhitespace(cp);  // approximation of char::is_alphanumeric outside ASCII
}

class HfTokenizer final : public Tokenizer {
 public:
  HfTokenizer(std::string source, std::unique_ptr<Normalizer> normalizer,
              std::unique_ptr<PreTokenizer> pre_tokenizer, tok::BpeModel model,
              std::unique_ptr<Decoder> decoder, std::vector<AddedToken> added)
      : source_(std::move(source)),
        normalizer_(std::move(normalizer)),
        pre_tokenizer_(std::move(pre_tokenizer)),
        model_(std::move(model)),
        decoder_(std::move(decoder)),
        added_(std::move(added)) {
    max_id_ = model_.max_id();
    for (size_t i = 0; i < added_.size(); ++i) {
      added_by_id_[added_[i].id] = i;
      added_by_content_[added_[i].content] = added_[i].id;
      max_id_ = std::max(max_id_, added_[i].id);
      if (added_[i].match.empty()) continue;
      (added_[i].normalized && normalizer_ ? normalized_matchers_ : raw_matchers_).push_back(i);
    }
    auto by_length = [this](size_t a, size_t b) {
      if (added_[a].match.size() != added_[b].match.size()) {
        return added_[a].match.size() > added_[b].match.size();
      }
      return a < b;
    };
    std::sort(raw_matchers_.begin(), raw_matchers_.end(), by_length);
    std::sort(normalized_matchers_.begin(), normalized_matchers_.end(), by_length);
  }

  std::vector<int32_t> Encode(std::string_view input) const override {
    std::vector<int32_t> ids;
    if (input.empty()) return ids;
    std::string text = tok::IsValidUtf8(input) ? std::string(input) : tok::Utf8Lossy(input);

    std::vector<Segment> segments;
    SplitOnAdded(Segment{text, -1, true}, raw_matchers_, &segments);
    std::vector<Segment> normalized;
    for (auto& seg : segments) {
      if (seg.id >= 0 || !normalizer_) {
        normalized.push_back(std::move(seg));
        continue;
      }
      normalizer_->Normalize(&seg.text);
      SplitOnAdded(seg, normalized_matchers_, &normalized);
    }
    for (const auto& seg : normalized) {
      if (seg.id >= 0) {
        ids.push_back(seg.id);
        continue;
      }
      if (seg.text.empty()) continue;
      std::vector<Piece> pieces{Piece{seg.text, seg.at_origin}};
      if (pre_tokenizer_) pre_tokenizer_->PreTokenize(&pieces);
      for (const auto& p : pieces) model_.Tokenize(p.text, &ids);
    }
    return ids;
  }

  std::string Decode(const std::vector<int32_t>& ids, bool skip_special) const override {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (int32_t id : ids) {
      auto it = added_by_id_.find(id);
      if (it != added_by_id_.end()) {
        if (skip_special && added_[it->second].special) continue;
        tokens.push_back(added_[it->second].content);
        continue;
      }
      auto t = model_.IdToToken(id);
      if (t) tokens.push_back(std::move(*t));  // unknown ids are skipped, as in `tokenizers`
    }
    if (!decoder_) {
      std::string out;
      for (size_t i = 0; i < tokens.size(); ++i) {
        if (i > 0) out.push_back(' ');
        out += tokens[i];
      }
      return out;
    }
    decoder_->DecodeChain(&tokens);
    std::string out;
    for (const auto& t : tokens) out += t;
    return out;
  }

  int32_t vocab_size() const override { return max_id_ + 1; }

  std::optional<int32_t> TokenToId(std::string_view token) const override {
    auto it = added_by_content_.find(std::string(token));
    if (it != added_by_content_.end()) return it->second;
    return model_.TokenToId(token);
  }

  std::optional<std::string> IdToToken(int32_t id) const override {
    auto it = added_by_id_.find(id);
    if (it != added_by_id_.end()) return added_[it->second].content;
    return model_.IdToToken(id);
  }

 private:
  // Finds added tokens in `seg` (leftmost, then longest), honouring
  // single_word / lstrip / rstrip like `tokenizers`' AddedVocabulary.
  void SplitOnAdded(const Segment& seg, const std::vector<size_t>& matchers,
                    std::vector<Segment>* out) const {
    const std::string& s = seg.text;
    if (matchers.empty() || s.empty()) {
      out->push_back(seg);
      return;
    }
    size_t start_offset = 0;  // end of the previous emitted token
    size_t pos = 0;
    while (pos < s.size()) {
      const AddedToken* found = nullptr;
      for (size_t idx : matchers) {
        const AddedToken& t = added_[idx];
        if (s.compare(pos, t.match.size(), t.match) != 0) continue;
        if (t.single_word) {
          size_t len;
          bool start_ok = true, stop_ok = true;
          if (pos > 0) {
            size_t b = pos - 1;
            while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80) --b;
            start_ok = !IsWordChar(s, b, &len);
          }
          size_t e = pos + t.match.size();
          if (e < s.size()) stop_ok = !IsWordChar(s, e, &len);
          if (!start_ok || !stop_ok) continue;
        }
        found = &t;
        break;
      }
      if (found == nullptr) {
        pos += tok::Utf8SeqLen(static_cast<unsigned char>(s[pos]));
        continue;
      }
      size_t start = pos, stop = pos + found->match.size();
      if (found->lstrip) {
        size_t b = start;
        while (b > start_offset) {
          size_t cb = b - 1;
          while (cb > start_offset && (static_cast<unsigned char>(s[cb]) & 0xC0) == 0x80) --cb;
          size_t len;
          if (!tok::IsWhitespace(tok::DecodeCodePoint(s, cb, &len))) break;
          b = cb;
        }
        start = b;
      }
      if (found->rstrip) {
        while (stop < s.size()) {
          size_t len;
          if (!tok::IsWhitespace(tok::DecodeCodePoint(s, stop, &len))) break;
          stop += len;
        }
      }
      if (start_offset < start) {
        out->push_back(Segment{s.substr(start_offset, start - start_offset), -1,
                               seg.at_origin && start_offset == 0});
      }
      out->push_back(Segment{s.substr(start, stop - start), found->id, false});
      start_offset = stop;
      pos = stop;
    }
    if (start_offset < s.size()) {
      out->push_back(Segment{s.substr(start_offset), -1, seg.at_origin && start_offset == 0});
    }
  }

  std::string source_;
  std::unique_ptr<Normalizer> normalizer_;
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
  tok::BpeModel model_;
  std::unique_ptr<Decoder> decoder_;
  std::vector<AddedToken> added_;
  std::unordered_map<int32_t, size_t> added_by_id_;
  std::unordered_map<std::string, int32_t> added_by_content_;
  std::vector<size_t> raw_matchers_;         // matched on the raw text
  std::vector<size_t> normalized_matchers_;  // matched after normalization
  int32_t max_id_ = -1;
};

absl::StatusOr<std::vector<AddedToken>> ParseAddedTokens(const json& root, const Where& w,
                                                         const Normalizer* normalizer) {
  std::vector<AddedToken> out;
  auto it = root.find("added_tokens");
  if (it == root.end() || it->is_null()) return out;
  if (!it->is_array()) return w.Error(absl::StrCat("expected an array, found ", it->type_name()));
  for (size_t i = 0; i < it->size(); ++i) {
    const json& j = (*it)[i];
    Where wi = w.Index(i);
    if (!j.is_object()) return wi.Error(absl::StrCat("expected an object, found ", j.type_name()));
    AddedToken t;
    ASSIGN_OR_RETURN(t.content, GetString(j, "content", wi));
    ASSIGN_OR_RETURN(const json* idj, Field(j, "id", wi));
    if (!idj->is_number_integer() || idj->get<int64_t>() < 0 || idj->get<int64_t>() >= INT32_MAX) {
      return wi.Sub("id").Error("expected an integer in [0, 2147483647), found " + idj->dump());
    }
    t.id = static_cast<int32_t>(idj->get<int64_t>());
    ASSIGN_OR_RETURN(t.special, GetBool(j, "special", false, wi));
    ASSIGN_OR_RETURN(t.normalized, GetBool(j, "normalized", !t.special, wi));
    ASSIGN_OR_RETURN(t.lstrip, GetBool(j, "lstrip", false, wi));
    ASSIGN_OR_RETURN(t.rstrip, GetBool(j, "rstrip", false, wi));
    ASSIGN_OR_RETURN(t.single_word, GetBool(j, "single_word", false, wi));
    t.match = t.content;
    if (t.normalized && normalizer != nullptr) normalizer->Normalize(&t.match);
    out.push_back(std::move(t));
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return common::ErrnoToStatus(errno, "opening tokenizer file " + path);
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) return common::ErrnoToStatus(errno, "reading tokenizer file " + path);
  return FromJson(buf.str(), path);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(std::string_view text,
                                                               const std::string& source) {
  json root;
  try {
    root = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": not a valid tokenizer.json: ", e.what()));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": expected a JSON object at top level, found ", root.type_name()));
  }
  auto sub = [&](const char* key) { return Where{source, key}; };

  std::unique_ptr<Normalizer> normalizer;
  if (auto it = root.find("normalizer"); it != root.end() && !it->is_null()) {
    ASSIGN_OR_RETURN(normalizer, ParseNormalizer(*it, sub("normalizer")));
  }
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  if (auto it = root.find("pre_tokenizer"); it != root.end() && !it->is_null()) {
    ASSIGN_OR_RETURN(pre_tokenizer, ParsePreTokenizer(*it, sub("pre_tokenizer")));
  }
  std::unique_ptr<Decoder> decoder;
  if (auto it = root.find("decoder"); it != root.end() && !it->is_null()) {
    ASSIGN_OR_RETURN(decoder, ParseDecoder(*it, sub("decoder")));
  }

  auto mit = root.find("model");
  if (mit == root.end() || !mit->is_object()) {
    return sub("model").Error(mit == root.end()
                                  ? "missing"
                                  : absl::StrCat("expected an object, found ", mit->type_name()));
  }
  std::string type;
  if (auto t = mit->find("type"); t != mit->end()) {
    if (!t->is_string()) return sub("model.type").Error("expected a string");
    type = t->get<std::string>();
  } else if (mit->contains("merges")) {
    type = "BPE";  // very old files omit the type
  }
  if (type != "BPE") {
    return sub("model.type").Error("unsupported model type \"" + type + "\" (supported: BPE)");
  }
  ASSIGN_OR_RETURN(tok::BpeModel model, tok::BpeModel::FromJson(*mit, source));
  ASSIGN_OR_RETURN(std::vector<AddedToken> added,
                   ParseAddedTokens(root, sub("added_tokens"), normalizer.get()));
  return std::unique_ptr<Tokenizer>(new HfTokenizer(source, std::move(normalizer),
                                                    std::move(pre_tokenizer), std::move(model),
                                                    std::move(decoder), std::move(added)));
}

}  // namespace fedlora::edge
