#pragma once
// Chat formatting for the common instruction-tuned model families. Instead of
// running Jinja, each family's published template is re-implemented exactly
// (add_generation_prompt respected; tools and other template extras are not
// supported). The family is recognised from tokenizer_config.json's
// "chat_template" by marker substrings, or chosen by name.
//
//   kLlama3   Llama-3 Instruct:
//   <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|> kLlama31
//   Llama-3.1/3.2 Instruct: as kLlama3 plus the mandatory system turn
//             "Cutting Knowledge Date: December 2023\nToday Date: <date>\n\n<system>"
//   kChatMl   Qwen2/2.5, SmolLM/SmolLM2: <|im_start|>user\nHi<|im_end|>\n, with an
//             optional default system turn when messages[0] is not "system"
//   kPhi3     Phi-3: <|user|>\nHi<|end|>\n ... then <|assistant|>\n or eos_token
//   kZephyr   TinyLlama-Chat / Zephyr: <|user|>\nHi</s>\n
//   kLlama2   Llama-2-chat: <s>[INST] <<SYS>>\n...\n<</SYS>>\n\nHi [/INST] answer </s>
//   kMistral  Mistral-7B-Instruct-v0.1: <s>[INST] Hi [/INST]answer</s> [INST] ...
//
// Where a published template raises an exception (roles that do not alternate
// in Llama-2/Mistral, a system message for Mistral) FormatChat returns
// InvalidArgument; where a template would silently drop a message with an
// unknown role (Phi-3, Zephyr, Llama-2, Mistral) FormatChat returns
// InvalidArgument too, naming the message index and role.
// All functions are pure and safe for concurrent use.

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::edge {

enum class ChatFamily { kLlama3, kLlama31, kChatMl, kPhi3, kZephyr, kLlama2, kMistral };

struct ChatMessage {
  std::string role;  // "system", "user", "assistant" (ChatML/Llama-3 accept any role)
  std::string content;
};

struct ChatTemplate {
  ChatFamily family = ChatFamily::kChatMl;
  std::string bos_token;                    // used by Llama-2/3/3.1 and Mistral
  std::string eos_token;                    // used by Llama-2, Mistral, Phi-3, Zephyr
  std::string default_system;               // kChatMl: system turn used when messages[0] is not
                                            // "system" (Qwen2, SmolLM2); empty = none
  std::string date_string = "26 Jul 2024";  // kLlama31 "Today Date" (the template default)
};

const char* ChatFamilyName(ChatFamily family);

// Templates by name with the reference model's special tokens and default
// system prompt: "llama3", "llama3.1" (also "llama3.2"), "chatml", "qwen2",
// "qwen2.5", "smollm2", "phi3", "zephyr" (also "tinyllama"), "llama2",
// "mistral". Unknown names are InvalidArgument listing the known ones.
absl::StatusOr<ChatTemplate> ChatTemplateByName(std::string_view name);

// Recognises the family of a Jinja chat template by marker substrings;
// Unimplemented when no supported family matches.
absl::StatusOr<ChatFamily> DetectChatFamily(std::string_view jinja_template);

// Reads "chat_template" (a string, or a list of {"name","template"} where the
// one named "default" is used), "bos_token" and "eos_token" (strings or
// {"content": ...} objects) from tokenizer_config.json. For ChatML the default
// system prompt is taken from the template text when it has one. Errors name
// the file and the field.
absl::StatusOr<ChatTemplate> ChatTemplateFromConfigJson(std::string_view json,
                                                        const std::string& source);
absl::StatusOr<ChatTemplate> ChatTemplateFromConfigFile(const std::string& path);

// Renders `messages` as the family's template does (no tokenization).
absl::StatusOr<std::string> FormatChat(const ChatTemplate& tmpl,
                                       const std::vector<ChatMessage>& messages,
                                       bool add_generation_prompt);

// For supervised training on a conversation whose last message is the
// assistant's: returns {prompt, response} with prompt = FormatChat(all but the
// last, add_generation_prompt=true) and prompt + response = FormatChat(all,
// false); the response therefore includes the end-of-turn marker.
// InvalidArgument when the conversation is empty or does not end with
// "assistant".
absl::StatusOr<std::pair<std::string, std::string>> SplitChatForTraining(
    const ChatTemplate& tmpl, const std::vector<ChatMessage>& messages);

}  // namespace fedlora::edge
