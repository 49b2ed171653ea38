#include "edge-agent/tokenizer_bpe.h"

#include <cstdio>
#include <queue>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "edge-agent/tokenizer_unicode.h"

namespace fedlora::edge::tok {
namespace {

using json = nlohmann::json;

absl::Status FieldError(const std::string& where, const std::string& field,
                        const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(where, ": field \"", field, "\": ", what));
}

std::string JsonTypeName(const json& j) { return j.type_name(); }

// Optional string-or-null field.
absl::StatusOr<std::string> OptString(const json& obj, const char* key, const std::string& where,
                                      const std::string& path) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return std::string();
  if (!it->is_string()) {
    return FieldError(where, path + "." + key,
                      absl::StrCat("expected a string or null, found ", JsonTypeName(*it)));
  }
  return it->get<std::string>();
}

absl::StatusOr<bool> OptBool(const json& obj, const char* key, bool dflt, const std::string& where,
                             const std::string& path) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return dflt;
  if (!it->is_boolean()) {
    return FieldError(where, path + "." + key,
                      absl::StrCat("expected a boolean, found ", JsonTypeName(*it)));
  }
  return it->get<bool>();
}

}  // namespace

absl::StatusOr<BpeModel> BpeModel::FromJson(const json& model, const std::string& where) {
  BpeModel m;
  for (int b = 0; b < 256; ++b) m.byte_ids_[b] = -1;

  auto vit = model.find("vocab");
  if (vit == model.end() || !vit->is_object()) {
    return FieldError(where, "model.vocab",
                      vit == model.end()
                          ? "missing (expected an object token -> id)"
                          : "expected an object token -> id, found " + JsonTypeName(*vit));
  }
  for (auto it = vit->begin(); it != vit->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() >= INT32_MAX) {
      return FieldError(where, "model.vocab[\"" + it.key() + "\"]",
                        "expected an integer id in [0, 2147483647), found " + it.value().dump());
    }
    auto id = static_cast<int32_t>(it.value().get<int64_t>());
    m.vocab_[it.key()] = id;
    m.vocab_r_[id] = it.key();
    if (id > m.max_id_) m.max_id_ = id;
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    auto it = m.vocab_.find(name);
    if (it != m.vocab_.end()) m.byte_ids_[b] = it->second;
  }

  const std::string path = "model";
  auto s = OptString(model, "unk_token", where, path);
  if (!s.ok()) return s.status();
  if (!s->empty()) {
    auto it = m.vocab_.find(*s);
    if (it == m.vocab_.end()) {
      return FieldError(where, "model.unk_token", "token \"" + *s + "\" is not in model.vocab");
    }
    m.unk_id_ = it->second;
  }
  auto prefix = OptString(model, "continuing_subword_prefix", where, path);
  if (!prefix.ok()) return prefix.status();
  m.continuing_subword_prefix_ = *prefix;
  auto suffix = OptString(model, "end_of_word_suffix", where, path);
  if (!suffix.ok()) return suffix.status();
  m.end_of_word_suffix_ = *suffix;
  auto b = OptBool(model, "byte_fallback", false, where, path);
  if (!b.ok()) return b.status();
  m.byte_fallback_ = *b;
  b = OptBool(model, "fuse_unk", false, where, path);
  if (!b.ok()) return b.status();
  m.fuse_unk_ = *b;
  b = OptBool(model, "ignore_merges", false, where, path);
  if (!b.ok()) return b.status();
  m.ignore_merges_ = *b;
  // "dropout" only matters for training-time sampling; encoding here is deterministic.

  auto mit = model.find("merges");
  if (mit != model.end() && !mit->is_null()) {
    if (!mit->is_array()) {
      return FieldError(where, "model.merges", "expected an array, found " + JsonTypeName(*mit));
    }
    int32_t rank = 0;
    for (const auto& entry : *mit) {
      const std::string field = absl::StrCat("model.merges[", rank, "]");
      std::string a, bstr;
      if (entry.is_string()) {
        const auto& line = entry.get_ref<const std::string&>();
        size_t sp = line.find(' ');
        if (sp == std::string::npos || line.find(' ', sp + 1) != std::string::npos) {
          return FieldError(where, field,
                            "expected \"left right\" (one space), found \"" + line + "\"");
        }
        a = line.substr(0, sp);
        bstr = line.substr(sp + 1);
      } else if (entry.is_array() && entry.size() == 2 && entry[0].is_string() &&
                 entry[1].is_string()) {
        a = entry[0].get<std::string>();
        bstr = entry[1].get<std::string>();
      } else {
        return FieldError(
            where, field,
            "expected \"left right\" or [\"left\", \"right\"], found " + entry.dump());
      }
      auto ia = m.vocab_.find(a);
      auto ib = m.vocab_.find(bstr);
      if (ia == m.vocab_.end() || ib == m.vocab_.end()) {
        return FieldError(
            where, field,
            "token \"" + (ia == m.vocab_.end() ? a : bstr) + "\" is not in model.vocab");
      }
      std::string merged = a;
      if (!m.continuing_subword_prefix_.empty() &&
          bstr.compare(0, m.continuing_subword_prefix_.size(), m.continuing_subword_prefix_) == 0) {
        merged += bstr.substr(m.continuing_subword_prefix_.size());
      } else {
        merged += bstr;
      }
      auto im = m.vocab_.find(merged);
      if (im == m.vocab_.end()) {
        return FieldError(where, field, "merged token \"" + merged + "\" is not in model.vocab");
      }
      // Like `tokenizers`, a repeated pair keeps its last rank.
      m.merges_[PairKey(ia->second, ib->second)] = MergeInfo{rank, im->second};
      ++rank;
    }
  }
  return m;
}

const BpeModel::MergeInfo* BpeModel::FindMerge(int32_t a, int32_t b) const {
  auto it = merges_.find(PairKey(a, b));
  return it == merges_.end() ? nullptr : &it->second;
}

std::optional<int32_t> BpeModel::TokenToId(std::string_view token) const {
  auto it = vocab_.find(std::string(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

std::optional<std::string> BpeModel::IdToToken(int32_t id) const {
  auto it = vocab_r_.find(id);
  if (it == vocab_r_.end()) return std::nullopt;
  return it->second;
}

void BpeModel::Tokenize(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    auto it = vocab_.find(std::string(word));
    if (it != vocab_.end()) {
      ids->push_back(it->second);
      return;
    }
  }

  // Initial symbols, one per character (or per byte with byte fallback).
  std::vector<int32_t> syms;
  syms.reserve(word.size());
  std::optional<int32_t> pending_unk;
  auto chars = Utf8Chars(word);
  for (size_t i = 0; i < chars.size(); ++i) {
    std::string s(chars[i]);
    if (i > 0 && !continuing_subword_prefix_.empty()) s = continuing_subword_prefix_ + s;
    if (i + 1 == chars.size() && !end_of_word_suffix_.empty()) s += end_of_word_suffix_;
    auto it = vocab_.find(s);
    if (it != vocab_.end()) {
      if (pending_unk) {
        syms.push_back(*pending_unk);
        pending_unk.reset();
      }
      syms.push_back(it->second);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (char c : s) all = all && byte_ids_[static_cast<unsigned char>(c)] >= 0;
      if (all) {
        // `tokenizers` does not flush a pending unk here; keep its order.
        for (char c : s) syms.push_back(byte_ids_[static_cast<unsigned char>(c)]);
        continue;
      }
    }
    if (!unk_id_) continue;  // `tokenizers` fails with MissingUnkToken; we drop the character
    if (pending_unk && fuse_unk_) continue;
    if (pending_unk) syms.push_back(*pending_unk);
    pending_unk = *unk_id_;
  }
  if (pending_unk) syms.push_back(*pending_unk);
  if (syms.empty()) return;

  // Priority merge over a doubly linked list of symbols.
  const int n = static_cast<int>(syms.size());
  std::vector<int> prev(n), next(n);
  std::vector<bool> alive(n, true);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  using Entry = std::tuple<int32_t, int, int32_t>;  // rank, left position, new id
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> queue;
  for (int i = 0; i + 1 < n; ++i) {
    if (const MergeInfo* mi = FindMerge(syms[i], syms[i + 1]))
      queue.emplace(mi->rank, i, mi->new_id);
  }
  while (!queue.empty()) {
    auto [rank, pos, new_id] = queue.top();
    queue.pop();
    if (!alive[pos] || next[pos] < 0) continue;
    int right = next[pos];
    const MergeInfo* mi = FindMerge(syms[pos], syms[right]);
    if (mi == nullptr || mi->new_id != new_id || mi->rank != rank) continue;
    syms[pos] = new_id;
    alive[right] = false;
    next[pos] = next[right];
    if (next[right] >= 0) prev[next[right]] = pos;
    if (prev[pos] >= 0) {
      if (const MergeInfo* l = FindMerge(syms[prev[pos]], syms[pos])) {
        queue.emplace(l->rank, prev[pos], l->new_id);
      }
    }
    if (next[pos] >= 0) {
      if (const MergeInfo* r = FindMerge(syms[pos], syms[next[pos]]))
        queue.emplace(r->rank, pos, r->new_id);
    }
  }
  for (int i = 0; i >= 0; i = next[i]) ids->push_back(syms[i]);
}

}  // namespace fedlora::edge::tok
