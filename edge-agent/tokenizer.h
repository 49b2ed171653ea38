#pragma once
// Tokenizers loaded from a Hugging Face tokenizer.json.
//
// Supported models: BPE with a ByteLevel pre-tokenizer/decoder (GPT-2,
// Llama-3, Qwen2, SmolLM: Split regexes run on PCRE2 with Unicode
// properties) and SentencePiece-style BPE with byte fallback (Llama-2,
// TinyLlama, Mistral, Phi-3). Merges may be "a b" strings or ["a","b"] pairs.
// Added/special tokens are matched before pre-tokenization.
// Encode(text) equals `tokenizers` `encode(text, add_special_tokens=False)`;
// Decode(ids) equals `decode(ids)` (special tokens kept unless skip_special).
// Thread-compatible: const methods may run concurrently.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::edge {

class Tokenizer {
 public:
  // Parses tokenizer.json at `path`. Errors name the file and the JSON field.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(std::string_view json,
                                                             const std::string& source);
  virtual ~Tokenizer() = default;

  virtual std::vector<int32_t> Encode(std::string_view text) const = 0;
  virtual std::string Decode(const std::vector<int32_t>& ids, bool skip_special = false) const = 0;

  virtual int32_t vocab_size() const = 0;  // including added tokens
  // Id of a token string ("<|begin_of_text|>", "</s>", ...), if present.
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;
  virtual std::optional<std::string> IdToToken(int32_t id) const = 0;
};

}  // namespace fedlora::edge
