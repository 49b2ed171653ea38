#pragma once
// Unicode Normalization Form C for the tokenizer's NFC normalizer (Qwen2 and
// others). Canonical decomposition, canonical ordering, then canonical
// composition (UAX #15), with data from edge-agent/tokenizer_nfc_data.h.
// Pure; safe for concurrent use.

#include <string>
#include <string_view>

namespace fedlora::edge::tok {

// `text` must be valid UTF-8 (the tokenizer sanitizes input first); invalid
// bytes are copied through unchanged.
std::string ToNfc(std::string_view text);

}  // namespace fedlora::edge::tok
