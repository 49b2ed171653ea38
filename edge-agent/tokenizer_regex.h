#pragma once
// A compiled PCRE2 regular expression for tokenizer pattern splitting
// (the Split pre-tokenizer, Replace normalizers, the GPT-2 ByteLevel regex).
// Compiled with PCRE2_UTF | PCRE2_UCP, so \p{L}, \s and (?i:...) follow
// Unicode like the Oniguruma engine of Hugging Face `tokenizers`.
// Immutable after Compile; FindAll is safe for concurrent use.

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::edge::tok {

// The pre-tokenization regex of GPT-2 (ByteLevel use_regex=true).
inline constexpr char kGpt2SplitRegex[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class Regex {
 public:
  // InvalidArgument with PCRE2's message and offset when `pattern` does not compile.
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(const std::string& pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Byte ranges [start, end) of the successive non-overlapping matches in
  // `text` (valid UTF-8), left to right. An empty match advances by one
  // character. A matching error (e.g. resource limits) ends the scan early.
  std::vector<std::pair<size_t, size_t>> FindAll(std::string_view text) const;

  const std::string& pattern() const { return pattern_; }

 private:
  Regex() = default;
  std::string pattern_;
  void* code_ = nullptr;  // pcre2_code_8*
};

}  // namespace fedlora::edge::tok
