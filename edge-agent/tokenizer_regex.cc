#include "edge-agent/tokenizer_regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "absl/strings/str_cat.h"
#include "edge-agent/tokenizer_unicode.h"

namespace fedlora::edge::tok {

absl::StatusOr<std::unique_ptr<Regex>> Regex::Compile(const std::string& pattern) {
  int err = 0;
  PCRE2_SIZE err_offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF | PCRE2_UCP, &err, &err_offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof(msg));
    return absl::InvalidArgumentError(absl::StrCat("regex \"", pattern,
                                                   "\" does not compile at offset ", err_offset,
                                                   ": ", reinterpret_cast<char*>(msg)));
  }
  // JIT is an optimisation only; the interpreter is used when it is unavailable.
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  std::unique_ptr<Regex> re(new Regex());
  re->pattern_ = pattern;
  re->code_ = code;
  return re;
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

std::vector<std::pair<size_t, size_t>> Regex::FindAll(std::string_view text) const {
  std::vector<std::pair<size_t, size_t>> out;
  auto* code = static_cast<pcre2_code*>(code_);
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(code, nullptr);
  if (md == nullptr) return out;
  auto subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t pos = 0;
  while (pos <= text.size()) {
    // The first call validates the whole subject as UTF-8; repeating that on
    // every call would make the scan quadratic.
    int rc = pcre2_match(code, subject, text.size(), pos, pos == 0 ? 0 : PCRE2_NO_UTF_CHECK, md,
                         nullptr);
    if (rc < 0) break;  // PCRE2_ERROR_NOMATCH or a resource limit
    PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    size_t start = ov[0], end = ov[1];
    if (end < start) break;  // \K games; not used by tokenizer patterns
    out.emplace_back(start, end);
    if (end == start) {
      if (end >= text.size()) break;
      pos = end + Utf8SeqLen(static_cast<unsigned char>(text[end]));
    } else {
      pos = end;
    }
  }
  pcre2_match_data_free(md);
  return out;
}

}  // namespace fedlora::edge::tok
