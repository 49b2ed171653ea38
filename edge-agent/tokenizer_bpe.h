#pragma once
// The BPE model of a Hugging Face tokenizer.json ("model": {"type": "BPE"}):
// vocab, ranked merges, byte fallback, unknown token, ignore_merges,
// continuing_subword_prefix / end_of_word_suffix. Tokenize() follows
// `tokenizers`' BPE::tokenize without dropout: split the pre-token into
// characters (unknown ones to <0xNN> byte tokens or the unk token), then
// apply merges lowest rank first, leftmost first among equal ranks.
// Immutable after FromJson; const methods are safe for concurrent use.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace fedlora::edge::tok {

class BpeModel {
 public:
  // `model` is the "model" object; `where` names the file for error messages.
  static absl::StatusOr<BpeModel> FromJson(const nlohmann::json& model, const std::string& where);

  // Appends the ids of one pre-token. A character that is neither in the vocab
  // nor covered by byte fallback becomes the unk token, or is dropped when the
  // model has none (`tokenizers` raises an error there).
  void Tokenize(std::string_view word, std::vector<int32_t>* ids) const;

  std::optional<int32_t> TokenToId(std::string_view token) const;
  std::optional<std::string> IdToToken(int32_t id) const;
  int32_t max_id() const { return max_id_; }  // -1 when the vocab is empty

 private:
  struct MergeInfo {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  const MergeInfo* FindMerge(int32_t a, int32_t b) const;

  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<int32_t, std::string> vocab_r_;
  std::unordered_map<uint64_t, MergeInfo> merges_;
  std::optional<int32_t> unk_id_;
  bool byte_fallback_ = false;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;
  std::string continuing_subword_prefix_;
  std::string end_of_word_suffix_;
  int32_t byte_ids_[256];  // <0xNN> token ids, -1 when absent
  int32_t max_id_ = -1;
};

}  // namespace fedlora::edge::tok
