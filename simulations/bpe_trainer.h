#pragma once
// Trains a byte-level BPE tokenizer on an in-memory corpus and returns it as a
// complete Hugging Face tokenizer.json (loadable by edge::Tokenizer and by
// `tokenizers`). Used by the simulator to build tokenizers for synthetic models.
//
// Layout of the result:
//   ids 0..K-1      the special tokens, in the given order (added_tokens with
//                   special=true, normalized=false; also in model.vocab)
//   ids K..K+255    the 256 byte tokens (GPT-2 bytes_to_unicode), in byte order
//   ids K+256..     one token per learned merge, in merge order
//   pre_tokenizer   ByteLevel, add_prefix_space=false, use_regex=true (GPT-2 regex)
//   decoder         ByteLevel
//   model.merges    [["left","right"], ...]
//
// Training is standard BPE: the corpus is split on the special tokens, then
// pre-tokenized exactly as the result will pre-tokenize; pair frequencies are
// counted over the distinct words weighted by their counts, and the most
// frequent pair is merged, ties broken by the smaller (left id, right id); this
// repeats until the vocab has `vocab_size` entries or no pair is left (so the
// vocab may be smaller than asked on a tiny corpus). The output is a pure
// function of the inputs: same corpus and arguments, byte-identical JSON.
//
// Errors: InvalidArgument when vocab_size < 256 + special_tokens.size(), or a
// special token is empty, repeated or not valid UTF-8.

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::sim {

absl::StatusOr<std::string> TrainByteLevelBpeTokenizerJson(
    const std::vector<std::string>& corpus, int vocab_size,
    const std::vector<std::string>& special_tokens);

}  // namespace fedlora::sim
