#pragma once
// `fedlora-agent export`: write this device's adapter as files other tools
// load, with the same implementation as `fedlora-admin models export`
// (common/export/adapter_export.h). `args` are the words after "export":
//
//   --model DIR                 base model (HF checkpoint folder); every LoRA pair
//                               is checked against its weights
//   --adapter PEFT_DIR          the adapter as a PEFT directory, or
//   --version-blob FILE         a published version's adapter blob, exactly the
//                               bytes the coordinator serves (FetchAdapter) and
//                               stores (q8_0 or f32 encoding with fedlora.lora.*
//                               metadata); the agent itself keeps applied
//                               versions in memory only
//   [--sha256 HEX]              with --version-blob: the blob's expected SHA-256
//                               (as announced by the coordinator); refused if it differs
//   --format peft|gguf-lora|gguf-merged
//   [--quant f32|f16|q8_0|q4_0] tensor type (gguf-lora: f32 | f16, default f32;
//                               gguf-merged: f32 | f16 | q8_0 | q4_0, default f16;
//                               peft: f32)
//   --out PATH                  PEFT: a directory; GGUF: a file
//   [--name NAME]               GGUF general.name (default "fedlora")
//
// Prints one line: what was written where. Nothing is written on any error.
// Returns 0 on success, 1 on a runtime error (bad or missing input file: the
// message names it), 2 on a usage error (message and usage on `err`). Never throws.

#include <ostream>
#include <string>
#include <vector>

namespace fedlora::edge {

int RunExportCli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace fedlora::edge
