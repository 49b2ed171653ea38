#include "edge-agent/data.h"

#include <fstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

// JSONL formats (one object per line; blank lines skipped; unknown keys ignored):
//
//   {"instruction": str, "input": str (optional), "output": str (non-empty)}
//     prompt   = FormatInstructionPrompt(instruction, input)
//     response = output
//
//   {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
//     The last message must be from the assistant with non-empty content: it is
//     the response. The earlier ones render, in order, as
//       system    -> "{content}\n\n"
//       user      -> "### Instruction:\n{content}\n\n"
//       assistant -> "### Response:\n{content}\n\n"
//     followed by "### Response:\n". A single user turn therefore gives the
//     same prompt as the instruction format with an empty input.
//
//   {"text": str (non-empty)}
//     General text (replay data, forgetting probe): prompt "", response = text,
//     so the loss covers every token.

namespace fedlora::edge {
namespace {

using nlohmann::json;

}  // namespace

std::string FormatInstructionPrompt(const std::string& instruction, const std::string& input) {
  std::string out = "### Instruction:\n" + instruction + "\n\n";
  if (!input.empty()) out += "### Input:\n" + input + "\n\n";
  out += "### Response:\n";
  return out;
}

absl::StatusOr<std::vector<Example>> LoadJsonl(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open JSONL file"));
  std::vector<Example> out;
  std::string line;
  int64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t\r\n") == std::string::npos) continue;
    auto bad = [&](const std::string& msg) {
      return absl::InvalidArgumentError(absl::StrCat(path, ":", lineno, ": ", msg));
    };
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      return bad(absl::StrCat("invalid JSON: ", e.what()));
    }
    if (!j.is_object()) return bad(absl::StrCat("expected a JSON object, found ", j.type_name()));
    auto str_field = [&](const json& obj, const std::string& field, const std::string& where,
                         bool required, std::string* value) -> absl::Status {
      auto it = obj.find(field);
      if (it == obj.end() || it->is_null()) {
        if (required) return bad(absl::StrCat(where, "missing field '", field, "'"));
        return absl::OkStatus();
      }
      if (!it->is_string()) {
        return bad(
            absl::StrCat(where, "field '", field, "': expected a string, found ", it->type_name()));
      }
      *value = it->get<std::string>();
      return absl::OkStatus();
    };
    Example ex;
    if (j.contains("messages")) {
      const json& msgs = j["messages"];
      if (!msgs.is_array()) {
        return bad(absl::StrCat("field 'messages': expected an array, found ", msgs.type_name()));
      }
      if (msgs.empty()) return bad("field 'messages': expected at least one message, found none");
      std::string prompt;
      for (size_t i = 0; i < msgs.size(); ++i) {
        const std::string where = absl::StrCat("messages[", i, "]: ");
        if (!msgs[i].is_object()) {
          return bad(absl::StrCat(where, "expected an object, found ", msgs[i].type_name()));
        }
        std::string role, content;
        if (auto s = str_field(msgs[i], "role", where, true, &role); !s.ok()) return s;
        if (auto s = str_field(msgs[i], "content", where, true, &content); !s.ok()) return s;
        const bool last = i + 1 == msgs.size();
        if (last) {
          if (role != "assistant") {
            return bad(absl::StrCat(where,
                                    "expected the last message to have role 'assistant', "
                                    "found '",
                                    role, "'"));
          }
          if (content.empty()) return bad(absl::StrCat(where, "empty assistant content"));
          ex.response = content;
        } else if (role == "system") {
          prompt += content + "\n\n";
        } else if (role == "user") {
          prompt += "### Instruction:\n" + content + "\n\n";
        } else if (role == "assistant") {
          prompt += "### Response:\n" + content + "\n\n";
        } else {
          return bad(absl::StrCat(where,
                                  "field 'role': expected system, user or assistant, "
                                  "found '",
                                  role, "'"));
        }
      }
      ex.prompt = prompt + "### Response:\n";
    } else if (j.contains("instruction") || j.contains("output")) {
      std::string instruction, input, output;
      if (auto s = str_field(j, "instruction", "", true, &instruction); !s.ok()) return s;
      if (auto s = str_field(j, "input", "", false, &input); !s.ok()) return s;
      if (auto s = str_field(j, "output", "", true, &output); !s.ok()) return s;
      if (output.empty()) return bad("field 'output': expected a non-empty string, found \"\"");
      ex.prompt = FormatInstructionPrompt(instruction, input);
      ex.response = output;
    } else if (j.contains("text")) {
      std::string text;
      if (auto s = str_field(j, "text", "", true, &text); !s.ok()) return s;
      if (text.empty()) return bad("field 'text': expected a non-empty string, found \"\"");
      ex.response = text;  // general text: empty prompt, loss on every token
    } else {
      return bad("expected an object with \"instruction\"/\"output\", \"messages\" or \"text\"");
    }
    out.push_back(std::move(ex));
  }
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  return out;
}

}  // namespace fedlora::edge
