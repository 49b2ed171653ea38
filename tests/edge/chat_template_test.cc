// Tests for edge::FormatChat and friends. Expected strings are what each
// family's published Jinja chat template (tokenizer_config.json of the
// reference model) renders for the same messages.

#include "edge-agent/chat_template.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace fedlora::edge {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

const ChatMessage kSys{"system", "You are terse."};
const ChatMessage kUser1{"user", "Hi there"};
const ChatMessage kAsst1{"assistant", "Hello!"};
const ChatMessage kUser2{"user", "How are you?"};

ChatTemplate ByName(const char* name) {
  auto t = ChatTemplateByName(name);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *t : ChatTemplate{};
}

std::string Format(const ChatTemplate& t, const std::vector<ChatMessage>& m, bool gen) {
  auto s = FormatChat(t, m, gen);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : "<error>";
}

TEST(ChatTemplateTest, Llama3) {
  EXPECT_EQ(
      Format(ByName("llama3"), {kSys, kUser1, kAsst1, kUser2}, true),
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nHow are you?<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n");
  // `| trim` strips the content.
  EXPECT_EQ(Format(ByName("llama3"), {{"user", "  padded \n"}}, false),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\npadded<|eot_id|>");
}

TEST(ChatTemplateTest, Llama31AddsTheDatedSystemTurn) {
  EXPECT_EQ(Format(ByName("llama3.1"), {kUser1}, true),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(
      Format(ByName("llama3.1"), {kSys, kUser1}, false),
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
      "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>");
}

TEST(ChatTemplateTest, ChatMlWithAndWithoutDefaultSystem) {
  EXPECT_EQ(Format(ByName("qwen2"), {kUser1}, true),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(Format(ByName("qwen2"), {kSys, kUser1, kAsst1}, false),
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n");
  EXPECT_EQ(Format(ByName("chatml"), {kUser1}, true),
            "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplateTest, Phi3) {
  const auto t = ByName("phi3");
  EXPECT_EQ(Format(t, {kUser1, kAsst1, kUser2}, true),
            "<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nHow are "
            "you?<|end|>\n<|assistant|>\n");
  EXPECT_EQ(Format(t, {kSys, kUser1, kAsst1}, false),
            "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi "
            "there<|end|>\n<|assistant|>\nHello!<|end|>\n<|endoftext|>");
  auto bad = FormatChat(t, {kUser1, {"tool", "x"}}, true);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("messages[1] has role \"tool\""));
}

TEST(ChatTemplateTest, ZephyrTinyLlama) {
  EXPECT_EQ(Format(ByName("tinyllama"), {kSys, kUser1}, true),
            "<|system|>\nYou are terse.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n");
}

TEST(ChatTemplateTest, Llama2) {
  const auto t = ByName("llama2");
  EXPECT_EQ(Format(t, {kSys, kUser1, kAsst1, kUser2}, true),
            "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
            "<s>[INST] How are you? [/INST]");
  EXPECT_EQ(Format(t, {{"user", " spaced "}}, true), "<s>[INST] spaced [/INST]");
  auto bad = FormatChat(t, {kUser1, kUser2}, true);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("alternate"));
}

TEST(ChatTemplateTest, MistralV01) {
  const auto t = ByName("mistral");
  EXPECT_EQ(Format(t, {kUser1, kAsst1, kUser2}, true),
            "<s>[INST] Hi there [/INST]Hello!</s> [INST] How are you? [/INST]");
  auto bad = FormatChat(t, {kSys, kUser1}, true);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("messages[0] has role \"system\""));
}

TEST(ChatTemplateTest, UnknownNameListsTheKnownOnes) {
  auto t = ChatTemplateByName("gemma");
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("llama3"));
}

// Published chat_template strings (abridged only where noted) of the reference models.
const char kQwen2Template[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
const char kSmolLm2Template[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
const char kLlama3Template[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
    "trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ "
    "content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";
const char kPhi3Template[] =
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
    "message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif "
    "message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% "
    "endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% "
    "endif %}";
const char kTinyLlamaTemplate[] =
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + "
    "message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] "
    "+ eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + "
    "eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif "
    "%}\n{% endfor %}";
const char kLlama2Template[] =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
    "system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = "
    "false %}"
    "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') "
    "}}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
    "system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% "
    "endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% "
    "endif %}{% endfor %}";
const char kMistralTemplate[] =
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 "
    "% 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') "
    "}}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif "
    "message['role'] "
    "== 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only "
    "user and "
    "assistant roles are supported!') }}{% endif %}{% endfor %}";

TEST(ChatTemplateConfigTest, DetectsFamiliesFromPublishedTemplates) {
  EXPECT_EQ(DetectChatFamily(kQwen2Template).value(), ChatFamily::kChatMl);
  EXPECT_EQ(DetectChatFamily(kSmolLm2Template).value(), ChatFamily::kChatMl);
  EXPECT_EQ(DetectChatFamily(kLlama3Template).value(), ChatFamily::kLlama3);
  EXPECT_EQ(DetectChatFamily(std::string(kLlama3Template) +
                             "{{- \"Cutting Knowledge Date: December 2023\\n\" }}")
                .value(),
            ChatFamily::kLlama31);
  EXPECT_EQ(DetectChatFamily(kPhi3Template).value(), ChatFamily::kPhi3);
  EXPECT_EQ(DetectChatFamily(kTinyLlamaTemplate).value(), ChatFamily::kZephyr);
  EXPECT_EQ(DetectChatFamily(kLlama2Template).value(), ChatFamily::kLlama2);
  EXPECT_EQ(DetectChatFamily(kMistralTemplate).value(), ChatFamily::kMistral);
  EXPECT_EQ(DetectChatFamily("{{ messages }}").status().code(), absl::StatusCode::kUnimplemented);
}

TEST(ChatTemplateConfigTest, ReadsTokensAndDefaultSystemFromConfig) {
  json qwen = {
      {"chat_template", kQwen2Template}, {"eos_token", "<|im_end|>"}, {"bos_token", nullptr}};
  auto t = ChatTemplateFromConfigJson(qwen.dump(), "qwen/tokenizer_config.json");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->default_system, "You are a helpful assistant.");
  EXPECT_EQ(Format(*t, {kUser1}, true), Format(ByName("qwen2"), {kUser1}, true));

  json smol = {{"chat_template", kSmolLm2Template}};
  t = ChatTemplateFromConfigJson(smol.dump(), "smol");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->default_system,
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face");

  json llama2 = {{"chat_template", kLlama2Template},
                 {"bos_token", {{"__type", "AddedToken"}, {"content", "<s>"}, {"lstrip", false}}},
                 {"eos_token", {{"content", "</s>"}}}};
  t = ChatTemplateFromConfigJson(llama2.dump(), "llama2");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->bos_token, "<s>");
  EXPECT_EQ(t->eos_token, "</s>");
  EXPECT_EQ(Format(*t, {kSys, kUser1, kAsst1, kUser2}, true),
            Format(ByName("llama2"), {kSys, kUser1, kAsst1, kUser2}, true));

  json listed = {{"chat_template",
                  {{{"name", "tool_use"}, {"template", "{{ '[INST]' }}"}},
                   {{"name", "default"}, {"template", kLlama3Template}}}},
                 {"bos_token", "<|begin_of_text|>"}};
  t = ChatTemplateFromConfigJson(listed.dump(), "listed");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->family, ChatFamily::kLlama3);
  EXPECT_EQ(t->bos_token, "<|begin_of_text|>");
}

TEST(ChatTemplateConfigTest, ErrorsNameFileAndField) {
  auto missing = ChatTemplateFromConfigJson("{\"bos_token\": \"<s>\"}", "cfg.json");
  EXPECT_THAT(std::string(missing.status().message()),
              HasSubstr("cfg.json: field \"chat_template\""));
  auto unknown = ChatTemplateFromConfigJson("{\"chat_template\": \"{{ x }}\"}", "cfg.json");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(unknown.status().message()), HasSubstr("cfg.json"));
  auto bad_token = ChatTemplateFromConfigJson(
      json({{"chat_template", kQwen2Template}, {"eos_token", 5}}).dump(), "cfg.json");
  EXPECT_THAT(std::string(bad_token.status().message()), HasSubstr("field \"eos_token\""));
  auto not_json = ChatTemplateFromConfigJson("{", "cfg.json");
  EXPECT_EQ(not_json.status().code(), absl::StatusCode::kInvalidArgument);
  auto no_file = ChatTemplateFromConfigFile("/nonexistent/tokenizer_config.json");
  EXPECT_EQ(no_file.status().code(), absl::StatusCode::kNotFound);
}

TEST(ChatTemplateTest, SplitChatForTrainingEveryFamily) {
  for (const char* name : {"llama3", "llama3.1", "qwen2", "phi3", "zephyr", "llama2", "mistral"}) {
    const auto t = ByName(name);
    const std::vector<ChatMessage> conv = {kUser1, kAsst1, kUser2, {"assistant", "Fine."}};
    auto split = SplitChatForTraining(t, conv);
    ASSERT_TRUE(split.ok()) << name << ": " << split.status();
    EXPECT_EQ(split->first, Format(t, {kUser1, kAsst1, kUser2}, true)) << name;
    EXPECT_EQ(split->first + split->second, Format(t, conv, false)) << name;
    EXPECT_THAT(split->second, HasSubstr("Fine.")) << name;
    EXPECT_THAT(split->first, ::testing::Not(HasSubstr("Fine."))) << name;
  }
  EXPECT_EQ(SplitChatForTraining(ByName("llama3"), {kUser1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SplitChatForTraining(ByName("llama3"), {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto llama3 = SplitChatForTraining(ByName("llama3"), {kUser1, kAsst1});
  ASSERT_TRUE(llama3.ok());
  EXPECT_EQ(llama3->second, "Hello!<|eot_id|>");
}

}  // namespace
}  // namespace fedlora::edge
