#pragma once
// `fedlora-agent model ...`: tools to look at a checkpoint with the engine.
// `args` are the words after "model":
//
//   inspect DIR
//       JSON: architecture, sizes, parameter count, checkpoint dtypes, memory
//       estimates, LoRA target modules, base model hash. Reads only the
//       config and safetensors headers (no weights are converted).
//   tokenize DIR --text T
//       {"ids": [...]} = tokenizer.json Encode(T) (no special tokens).
//   logits DIR (--ids 1,2,3 | --text T) [--adapter PEFT_DIR [--merge]]
//       {"logits": [[...], ...]}: fp32 logits, one row per input position.
//   generate DIR (--prompt T | --ids 1,2,3) --max-new N [--adapter PEFT_DIR] [--json]
//       Greedy decoding with a KV cache; stops at eos (config.json,
//       tokenizer_config.json or generation_config.json). Prints the generated
//       text, or with --json {"ids": [...generated...], "text": "..."}.
//       --prompt is tokenized like training prompts (bos when the model uses one).
//
// Returns 0 on success, 1 on a runtime error (message on `err`), 2 on a usage
// error. Never throws.

#include <ostream>
#include <string>
#include <vector>

namespace fedlora::edge {

int RunModelCli(const std::vector<std::string>& args);
int RunModelCli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace fedlora::edge
