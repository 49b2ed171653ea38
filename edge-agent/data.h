#pragma once
// Local training data: JSONL files of {"instruction","input","output"},
// {"messages":[{"role","content"},...]} or {"text"} (general text: empty
// prompt, the loss covers all of it) objects, one per line. Blank lines are
// skipped; every other bad line is an InvalidArgument error naming the file,
// the 1-based line number and the problem. Nothing is dropped silently.

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "edge-agent/trainer.h"

namespace fedlora::edge {

absl::StatusOr<std::vector<Example>> LoadJsonl(const std::string& path);

// Formats an instruction example as a plain prompt (see docs/formats.md).
std::string FormatInstructionPrompt(const std::string& instruction, const std::string& input);

}  // namespace fedlora::edge
