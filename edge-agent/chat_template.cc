#include "edge-agent/chat_template.h"

#include <cerrno>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/status/status.h"
#include "edge-agent/tokenizer_unicode.h"
#include "nlohmann/json.hpp"

namespace fedlora::edge {
namespace {

using json = nlohmann::json;

// Python's str.strip() (Jinja's `trim` filter): Unicode whitespace plus the
// ASCII separators U+001C..U+001F.
bool IsPyWhitespace(uint32_t cp) { return tok::IsWhitespace(cp) || (cp >= 0x1C && cp <= 0x1F); }

std::string PyStrip(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e) {
    size_t len;
    if (!IsPyWhitespace(tok::DecodeCodePoint(s, b, &len))) break;
    b += len;
  }
  while (e > b) {
    size_t start = e - 1;
    while (start > b && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    size_t len;
    if (!IsPyWhitespace(tok::DecodeCodePoint(s, start, &len))) break;
    e = start;
  }
  return std::string(s.substr(b, e - b));
}

absl::Status RoleError(const ChatTemplate& t, size_t index, const std::string& role,
                       const char* allowed) {
  return absl::InvalidArgumentError(absl::StrCat(ChatFamilyName(t.family),
                                                 " chat template: messages[", index,
                                                 "] has role \"", role, "\"; expected ", allowed));
}

absl::Status AlternationError(const ChatTemplate& t, size_t index, const std::string& role) {
  return absl::InvalidArgumentError(absl::StrCat(
      ChatFamilyName(t.family),
      " chat template: conversation roles must alternate user/assistant/user/...; messages[", index,
      "] has role \"", role, "\""));
}

std::string Llama3Turn(const std::string& role, const std::string& content) {
  return "<|start_header_id|>" + role + "<|end_header_id|>\n\n" + PyStrip(content) + "<|eot_id|>";
}

absl::StatusOr<std::string> FormatLlama3(const ChatTemplate& t,
                                         const std::vector<ChatMessage>& msgs, bool gen) {
  std::string out;
  for (size_t i = 0; i < msgs.size(); ++i) {
    if (i == 0) out += t.bos_token;
    out += Llama3Turn(msgs[i].role, msgs[i].content);
  }
  if (gen) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

absl::StatusOr<std::string> FormatLlama31(const ChatTemplate& t,
                                          const std::vector<ChatMessage>& msgs, bool gen) {
  std::string system;
  size_t first = 0;
  if (!msgs.empty() && msgs[0].role == "system") {
    system = PyStrip(msgs[0].content);
    first = 1;
  }
  std::string out = t.bos_token + "<|start_header_id|>system<|end_header_id|>\n\n";
  out += "Cutting Knowledge Date: December 2023\nToday Date: " + t.date_string + "\n\n";
  out += system + "<|eot_id|>";
  for (size_t i = first; i < msgs.size(); ++i) out += Llama3Turn(msgs[i].role, msgs[i].content);
  if (gen) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

absl::StatusOr<std::string> FormatChatMl(const ChatTemplate& t,
                                         const std::vector<ChatMessage>& msgs, bool gen) {
  std::string out;
  if (!t.default_system.empty() && !msgs.empty() && msgs[0].role != "system") {
    out += "<|im_start|>system\n" + t.default_system + "<|im_end|>\n";
  }
  for (const auto& m : msgs) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
  if (gen) out += "<|im_start|>assistant\n";
  return out;
}

absl::StatusOr<std::string> FormatPhi3(const ChatTemplate& t, const std::vector<ChatMessage>& msgs,
                                       bool gen) {
  std::string out;
  for (size_t i = 0; i < msgs.size(); ++i) {
    const auto& m = msgs[i];
    if (m.role != "system" && m.role != "user" && m.role != "assistant") {
      return RoleError(t, i, m.role, "\"system\", \"user\" or \"assistant\"");
    }
    out += "<|" + m.role + "|>\n" + m.content + "<|end|>\n";
  }
  out += gen ? "<|assistant|>\n" : t.eos_token;
  return out;
}

absl::StatusOr<std::string> FormatZephyr(const ChatTemplate& t,
                                         const std::vector<ChatMessage>& msgs, bool gen) {
  std::string out;
  for (size_t i = 0; i < msgs.size(); ++i) {
    const auto& m = msgs[i];
    if (m.role != "system" && m.role != "user" && m.role != "assistant") {
      return RoleError(t, i, m.role, "\"system\", \"user\" or \"assistant\"");
    }
    out += "<|" + m.role + "|>\n" + m.content + t.eos_token + "\n";
    if (i + 1 == msgs.size() && gen) out += "<|assistant|>\n";
  }
  return out;
}

absl::StatusOr<std::string> FormatLlama2(const ChatTemplate& t,
                                         const std::vector<ChatMessage>& msgs) {
  size_t first = 0;
  const std::string* system = nullptr;
  if (!msgs.empty() && msgs[0].role == "system") {
    system = &msgs[0].content;
    first = 1;
  }
  std::string out;
  for (size_t i = first; i < msgs.size(); ++i) {
    const auto& m = msgs[i];
    const size_t k = i - first;
    if (m.role != "user" && m.role != "assistant")
      return RoleError(t, i, m.role, "\"user\" or \"assistant\"");
    if ((m.role == "user") != (k % 2 == 0)) return AlternationError(t, i, m.role);
    std::string content = m.content;
    if (k == 0 && system != nullptr) content = "<<SYS>>\n" + *system + "\n<</SYS>>\n\n" + content;
    if (m.role == "user") {
      out += t.bos_token + "[INST] " + PyStrip(content) + " [/INST]";
    } else {
      out += " " + PyStrip(content) + " " + t.eos_token;
    }
  }
  return out;
}

absl::StatusOr<std::string> FormatMistral(const ChatTemplate& t,
                                          const std::vector<ChatMessage>& msgs) {
  std::string out = t.bos_token;
  for (size_t i = 0; i < msgs.size(); ++i) {
    const auto& m = msgs[i];
    if (m.role != "user" && m.role != "assistant") {
      return RoleError(t, i, m.role,
                       "\"user\" or \"assistant\" (the template supports no system message)");
    }
    if ((m.role == "user") != (i % 2 == 0)) return AlternationError(t, i, m.role);
    if (m.role == "user") {
      out += "[INST] " + m.content + " [/INST]";
    } else {
      out += m.content + t.eos_token + " ";
    }
  }
  return out;
}

// Parses a Jinja/Python single- or double-quoted string body escape.
std::string Unescape(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 == s.size()) {
      out.push_back(s[i]);
      continue;
    }
    char c = s[++i];
    switch (c) {
      case 'n':
        out.push_back('\n');
        break;
      case 't':
        out.push_back('\t');
        break;
      case 'r':
        out.push_back('\r');
        break;
      default:
        out.push_back(c);
    }
  }
  return out;
}

// The literal default system prompt of a ChatML template, e.g. Qwen2's
// '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n'.
std::string ExtractChatMlDefaultSystem(std::string_view tmpl) {
  const std::string_view marker = "<|im_start|>system";
  for (size_t pos = tmpl.find(marker); pos != std::string_view::npos;
       pos = tmpl.find(marker, pos + 1)) {
    size_t body = pos + marker.size();
    if (tmpl.compare(body, 2, "\\n") == 0) {
      body += 2;
    } else if (tmpl.compare(body, 1, "\n") == 0) {
      body += 1;
    } else {
      continue;
    }
    size_t end = tmpl.find("<|im_end|>", body);
    if (end == std::string_view::npos) continue;
    std::string_view text = tmpl.substr(body, end - body);
    // A dynamic system turn ('...system\n' + messages[0]['content'] + ...) leaves the string
    // literal.
    if (text.find_first_of("'\"{}") != std::string_view::npos) continue;
    return Unescape(text);
  }
  return "";
}

absl::StatusOr<std::string> TokenString(const json& cfg, const char* key,
                                        const std::string& source) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return std::string();
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto c = it->find("content");
    if (c != it->end() && c->is_string()) return c->get<std::string>();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(source, ": field \"", key,
                   "\": expected a string or {\"content\": string}, found ", it->dump()));
}

}  // namespace

const char* ChatFamilyName(ChatFamily family) {
  switch (family) {
    case ChatFamily::kLlama3:
      return "llama3";
    case ChatFamily::kLlama31:
      return "llama3.1";
    case ChatFamily::kChatMl:
      return "chatml";
    case ChatFamily::kPhi3:
      return "phi3";
    case ChatFamily::kZephyr:
      return "zephyr";
    case ChatFamily::kLlama2:
      return "llama2";
    case ChatFamily::kMistral:
      return "mistral";
  }
  return "unknown";
}

absl::StatusOr<ChatTemplate> ChatTemplateByName(std::string_view name) {
  ChatTemplate t;
  if (name == "llama3" || name == "llama3.1" || name == "llama3.2") {
    t.family = name == "llama3" ? ChatFamily::kLlama3 : ChatFamily::kLlama31;
    t.bos_token = "<|begin_of_text|>";
    t.eos_token = "<|eot_id|>";
  } else if (name == "chatml" || name == "qwen2" || name == "qwen2.5" || name == "smollm2") {
    t.family = ChatFamily::kChatMl;
    t.eos_token = "<|im_end|>";
    if (name == "qwen2") t.default_system = "You are a helpful assistant.";
    if (name == "qwen2.5")
      t.default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
    if (name == "smollm2")
      t.default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
  } else if (name == "phi3") {
    t.family = ChatFamily::kPhi3;
    t.bos_token = "<s>";
    t.eos_token = "<|endoftext|>";
  } else if (name == "zephyr" || name == "tinyllama") {
    t.family = ChatFamily::kZephyr;
    t.bos_token = "<s>";
    t.eos_token = "</s>";
  } else if (name == "llama2" || name == "mistral") {
    t.family = name == "llama2" ? ChatFamily::kLlama2 : ChatFamily::kMistral;
    t.bos_token = "<s>";
    t.eos_token = "</s>";
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown chat template name \"", std::string(name),
                     "\"; expected one of llama3, llama3.1, llama3.2, chatml, qwen2, qwen2.5, "
                     "smollm2, phi3, zephyr, "
                     "tinyllama, llama2, mistral"));
  }
  return t;
}

absl::StatusOr<ChatFamily> DetectChatFamily(std::string_view tmpl) {
  auto has = [&](std::string_view s) { return tmpl.find(s) != std::string_view::npos; };
  if (has("<|start_header_id|>")) {
    return has("Cutting Knowledge Date") ? ChatFamily::kLlama31 : ChatFamily::kLlama3;
  }
  if (has("<|im_start|>")) return ChatFamily::kChatMl;
  if (has("<|user|>")) return has("<|end|>") ? ChatFamily::kPhi3 : ChatFamily::kZephyr;
  if (has("[INST]")) return has("<<SYS>>") ? ChatFamily::kLlama2 : ChatFamily::kMistral;
  return absl::UnimplementedError(
      "chat template not recognised: expected the markers of Llama-3 (<|start_header_id|>), ChatML "
      "(<|im_start|>), Phi-3 (<|user|> and <|end|>), Zephyr (<|user|>) or Llama-2/Mistral "
      "([INST])");
}

absl::StatusOr<ChatTemplate> ChatTemplateFromConfigJson(std::string_view text,
                                                        const std::string& source) {
  json cfg;
  try {
    cfg = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON: ", e.what()));
  }
  if (!cfg.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": expected a JSON object, found ", cfg.type_name()));
  }
  auto it = cfg.find("chat_template");
  if (it == cfg.end() || it->is_null()) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": field \"chat_template\": missing (choose a template by name instead)"));
  }
  std::string tmpl;
  if (it->is_string()) {
    tmpl = it->get<std::string>();
  } else if (it->is_array()) {
    for (const auto& entry : *it) {
      if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template") &&
          entry["template"].is_string()) {
        tmpl = entry["template"].get<std::string>();
      }
    }
    if (tmpl.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": field \"chat_template\": no entry named \"default\" with a string template"));
    }
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": field \"chat_template\": expected a string or a list, found ", it->type_name()));
  }
  auto family = DetectChatFamily(tmpl);
  if (!family.ok()) {
    return absl::Status(
        family.status().code(),
        absl::StrCat(source, ": field \"chat_template\": ", family.status().message()));
  }
  ChatTemplate t;
  t.family = *family;
  ASSIGN_OR_RETURN(t.bos_token, TokenString(cfg, "bos_token", source));
  ASSIGN_OR_RETURN(t.eos_token, TokenString(cfg, "eos_token", source));
  if (t.family == ChatFamily::kChatMl) t.default_system = ExtractChatMlDefaultSystem(tmpl);
  return t;
}

absl::StatusOr<ChatTemplate> ChatTemplateFromConfigFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return common::ErrnoToStatus(errno, "opening tokenizer config " + path);
  std::ostringstream buf;
  buf << in.rdbuf();
  return ChatTemplateFromConfigJson(buf.str(), path);
}

absl::StatusOr<std::string> FormatChat(const ChatTemplate& tmpl,
                                       const std::vector<ChatMessage>& messages,
                                       bool add_generation_prompt) {
  switch (tmpl.family) {
    case ChatFamily::kLlama3:
      return FormatLlama3(tmpl, messages, add_generation_prompt);
    case ChatFamily::kLlama31:
      return FormatLlama31(tmpl, messages, add_generation_prompt);
    case ChatFamily::kChatMl:
      return FormatChatMl(tmpl, messages, add_generation_prompt);
    case ChatFamily::kPhi3:
      return FormatPhi3(tmpl, messages, add_generation_prompt);
    case ChatFamily::kZephyr:
      return FormatZephyr(tmpl, messages, add_generation_prompt);
    case ChatFamily::kLlama2:
      return FormatLlama2(tmpl, messages);
    case ChatFamily::kMistral:
      return FormatMistral(tmpl, messages);
  }
  return absl::InvalidArgumentError("unknown chat family");
}

absl::StatusOr<std::pair<std::string, std::string>> SplitChatForTraining(
    const ChatTemplate& tmpl, const std::vector<ChatMessage>& messages) {
  if (messages.empty() || messages.back().role != "assistant") {
    return absl::InvalidArgumentError(absl::StrCat(
        "SplitChatForTraining: the last message must have role \"assistant\", found ",
        messages.empty() ? std::string("no messages") : "\"" + messages.back().role + "\""));
  }
  std::vector<ChatMessage> head(messages.begin(), messages.end() - 1);
  ASSIGN_OR_RETURN(std::string prompt, FormatChat(tmpl, head, /*add_generation_prompt=*/true));
  ASSIGN_OR_RETURN(std::string full, FormatChat(tmpl, messages, /*add_generation_prompt=*/false));
  if (full.compare(0, prompt.size(), prompt) != 0) {
    return absl::InternalError(absl::StrCat("SplitChatForTraining: ", ChatFamilyName(tmpl.family),
                                            " prompt is not a prefix of the full conversation"));
  }
  return std::make_pair(prompt, full.substr(prompt.size()));
}

}  // namespace fedlora::edge
