#include "simulations/bpe_trainer.h"

#include <cstdint>
#include <map>
#include <queue>
#include <set>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status/status.h"
#include "edge-agent/tokenizer_regex.h"
#include "edge-agent/tokenizer_unicode.h"
#include "nlohmann/json.hpp"

namespace fedlora::sim {
namespace {

using ojson = nlohmann::ordered_json;

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}
int32_t Left(uint64_t key) { return static_cast<int32_t>(key >> 32); }
int32_t Right(uint64_t key) { return static_cast<int32_t>(key & 0xFFFFFFFFu); }

// Splits `text` on occurrences of the special tokens (longest first at each
// position), appending the plain stretches to `out`.
void SplitOnSpecials(const std::string& text, const std::vector<std::string>& specials,
                     std::vector<std::string>* out) {
  size_t start = 0, pos = 0;
  while (pos < text.size()) {
    size_t best = 0;
    for (const auto& s : specials) {
      if (s.size() > best && text.compare(pos, s.size(), s) == 0) best = s.size();
    }
    if (best == 0) {
      ++pos;
      continue;
    }
    if (pos > start) out->push_back(text.substr(start, pos - start));
    pos += best;
    start = pos;
  }
  if (start < text.size()) out->push_back(text.substr(start));
}

struct Word {
  std::vector<int32_t> syms;
  int64_t count;
};

}  // namespace

absl::StatusOr<std::string> TrainByteLevelBpeTokenizerJson(
    const std::vector<std::string>& corpus, int vocab_size,
    const std::vector<std::string>& special_tokens) {
  const int num_special = static_cast<int>(special_tokens.size());
  if (vocab_size < 256 + num_special) {
    return absl::InvalidArgumentError(
        absl::StrCat("TrainByteLevelBpeTokenizerJson: vocab_size ", vocab_size,
                     " is below the minimum of 256 byte tokens + ", num_special,
                     " special tokens = ", 256 + num_special));
  }
  std::unordered_set<std::string> seen;
  for (size_t i = 0; i < special_tokens.size(); ++i) {
    if (special_tokens[i].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("TrainByteLevelBpeTokenizerJson: special_tokens[", i, "] is empty"));
    }
    if (!edge::tok::IsValidUtf8(special_tokens[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "TrainByteLevelBpeTokenizerJson: special_tokens[", i, "] is not valid UTF-8"));
    }
    if (!seen.insert(special_tokens[i]).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("TrainByteLevelBpeTokenizerJson: special_tokens[", i, "] \"",
                       special_tokens[i], "\" is repeated"));
    }
  }

  // Vocabulary: specials, then bytes.
  std::vector<std::string> id_to_token(special_tokens.begin(), special_tokens.end());
  std::unordered_map<std::string, int32_t> token_to_id;
  for (int i = 0; i < num_special; ++i) token_to_id[special_tokens[i]] = i;
  int32_t byte_id[256];
  for (int b = 0; b < 256; ++b) {
    const std::string& t = edge::tok::ByteToUnicode(static_cast<unsigned char>(b));
    auto [it, inserted] = token_to_id.emplace(t, static_cast<int32_t>(id_to_token.size()));
    if (inserted) id_to_token.push_back(t);  // a special token may equal a byte token
    byte_id[b] = it->second;
  }

  // Word counts over the pre-tokenized corpus (std::map: deterministic order).
  ASSIGN_OR_RETURN(auto regex, edge::tok::Regex::Compile(edge::tok::kGpt2SplitRegex));
  std::map<std::string, int64_t> word_counts;
  for (const auto& doc : corpus) {
    std::vector<std::string> stretches;
    SplitOnSpecials(edge::tok::Utf8Lossy(doc), special_tokens, &stretches);
    for (const auto& s : stretches) {
      for (auto [b, e] : regex->FindAll(s)) {
        if (e > b) ++word_counts[s.substr(b, e - b)];
      }
    }
  }
  std::vector<Word> words;
  words.reserve(word_counts.size());
  for (const auto& [w, c] : word_counts) {
    Word word{{}, c};
    for (char ch : w) word.syms.push_back(byte_id[static_cast<unsigned char>(ch)]);
    words.push_back(std::move(word));
  }

  // Pair statistics.
  std::unordered_map<uint64_t, int64_t> pair_counts;
  std::unordered_map<uint64_t, std::set<size_t>> where;
  for (size_t w = 0; w < words.size(); ++w) {
    const auto& syms = words[w].syms;
    for (size_t i = 0; i + 1 < syms.size(); ++i) {
      uint64_t k = PairKey(syms[i], syms[i + 1]);
      pair_counts[k] += words[w].count;
      where[k].insert(w);
    }
  }
  // Max-heap on count; among equal counts the smaller (left, right) first.
  using Entry = std::pair<int64_t, uint64_t>;
  auto cmp = [](const Entry& x, const Entry& y) {
    if (x.first != y.first) return x.first < y.first;
    return x.second > y.second;
  };
  std::priority_queue<Entry, std::vector<Entry>, decltype(cmp)> queue(cmp);
  for (const auto& [k, c] : pair_counts) queue.emplace(c, k);

  std::vector<std::pair<std::string, std::string>> merges;
  while (static_cast<int>(id_to_token.size()) < vocab_size && !queue.empty()) {
    auto [count, key] = queue.top();
    queue.pop();
    auto pc = pair_counts.find(key);
    int64_t actual = pc == pair_counts.end() ? 0 : pc->second;
    if (actual != count) {
      if (actual > 0) queue.emplace(actual, key);
      continue;
    }
    if (count <= 0) break;
    const int32_t a = Left(key), b = Right(key);
    std::string merged = id_to_token[a] + id_to_token[b];
    auto [tit, inserted] = token_to_id.emplace(merged, static_cast<int32_t>(id_to_token.size()));
    if (inserted) id_to_token.push_back(merged);
    const int32_t new_id = tit->second;
    merges.emplace_back(id_to_token[a], id_to_token[b]);

    std::set<size_t> affected = std::move(where[key]);
    where.erase(key);
    std::unordered_map<uint64_t, int64_t> delta;
    for (size_t w : affected) {
      auto& syms = words[w].syms;
      const int64_t wc = words[w].count;
      for (size_t i = 0; i + 1 < syms.size(); ++i) delta[PairKey(syms[i], syms[i + 1])] -= wc;
      std::vector<int32_t> out;
      out.reserve(syms.size());
      for (size_t i = 0; i < syms.size(); ++i) {
        if (i + 1 < syms.size() && syms[i] == a && syms[i + 1] == b) {
          out.push_back(new_id);
          ++i;
        } else {
          out.push_back(syms[i]);
        }
      }
      syms = std::move(out);
      for (size_t i = 0; i + 1 < syms.size(); ++i) {
        uint64_t k = PairKey(syms[i], syms[i + 1]);
        delta[k] += wc;
        where[k].insert(w);
      }
    }
    // Apply in a deterministic order (the queue order does not depend on it,
    // but keep the container walk reproducible anyway).
    std::map<uint64_t, int64_t> ordered(delta.begin(), delta.end());
    for (const auto& [k, d] : ordered) {
      if (d == 0) continue;
      int64_t& c = pair_counts[k];
      c += d;
      if (d > 0) queue.emplace(c, k);
      if (c <= 0) pair_counts.erase(k);
    }
    pair_counts.erase(key);
  }

  // Assemble tokenizer.json.
  ojson root;
  root["version"] = "1.0";
  root["truncation"] = nullptr;
  root["padding"] = nullptr;
  ojson added = ojson::array();
  for (int i = 0; i < num_special; ++i) {
    added.push_back(ojson{{"id", i},
                          {"content", special_tokens[i]},
                          {"single_word", false},
                          {"lstrip", false},
                          {"rstrip", false},
                          {"normalized", false},
                          {"special", true}});
  }
  root["added_tokens"] = std::move(added);
  root["normalizer"] = nullptr;
  root["pre_tokenizer"] = ojson{{"type", "ByteLevel"},
                                {"add_prefix_space", false},
                                {"trim_offsets", true},
                                {"use_regex", true}};
  root["post_processor"] = nullptr;
  root["decoder"] = ojson{{"type", "ByteLevel"},
                          {"add_prefix_space", true},
                          {"trim_offsets", true},
                          {"use_regex", true}};
  ojson vocab = ojson::object();
  for (size_t i = 0; i < id_to_token.size(); ++i) vocab[id_to_token[i]] = static_cast<int32_t>(i);
  ojson merge_list = ojson::array();
  for (const auto& [l, r] : merges) merge_list.push_back(ojson::array({l, r}));
  root["model"] = ojson{{"type", "BPE"},
                        {"dropout", nullptr},
                        {"unk_token", nullptr},
                        {"continuing_subword_prefix", nullptr},
                        {"end_of_word_suffix", nullptr},
                        {"fuse_unk", false},
                        {"byte_fallback", false},
                        {"ignore_merges", false},
                        {"vocab", std::move(vocab)},
                        {"merges", std::move(merge_list)}};
  return root.dump(2);
}

}  // namespace fedlora::sim
