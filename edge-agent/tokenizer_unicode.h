#pragma once
// UTF-8 and byte-level helpers shared by the tokenizer (edge::Tokenizer) and
// the BPE trainer (sim::TrainByteLevelBpeTokenizerJson).
//
// Byte level: GPT-2's bytes_to_unicode() table maps each of the 256 byte
// values to one printable code point (printable Latin-1 bytes map to
// themselves, the rest to U+0100 + n in byte order), so any byte string
// becomes a string of visible characters and back without loss.
// All functions are pure and safe for concurrent use.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace fedlora::edge::tok {

// Appends the UTF-8 encoding of `cp` (must be <= 0x10FFFF, not a surrogate).
void AppendUtf8(uint32_t cp, std::string* out);

// Byte length of the UTF-8 sequence that starts with lead byte `c`
// (1 for an invalid lead byte, so iteration always advances).
size_t Utf8SeqLen(unsigned char c);

// Converts bytes to valid UTF-8 the way Rust's String::from_utf8_lossy does:
// every maximal invalid subsequence becomes one U+FFFD.
std::string Utf8Lossy(std::string_view bytes);

// Decodes the code point at s[i] of valid UTF-8 and sets *len to its byte
// length (an invalid byte decodes as itself with length 1).
uint32_t DecodeCodePoint(std::string_view s, size_t i, size_t* len);

// Unicode White_Space (Rust's char::is_whitespace).
bool IsWhitespace(uint32_t cp);

// True when `s` is well-formed UTF-8.
bool IsValidUtf8(std::string_view s);

// Splits valid UTF-8 into one string_view per code point.
std::vector<std::string_view> Utf8Chars(std::string_view s);

// GPT-2 byte <-> unicode mapping.
const std::string& ByteToUnicode(unsigned char b);  // UTF-8 of the mapped code point
std::string BytesToUnicode(std::string_view bytes);
// Maps each character of `s` back to its byte; nullopt when a character is not
// in the table (then the caller decides what to do with the raw text).
std::optional<std::string> UnicodeToBytes(std::string_view s);

}  // namespace fedlora::edge::tok
