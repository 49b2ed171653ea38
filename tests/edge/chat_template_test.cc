// Tests for edge::FormatChat and friends. Expected strings are what each
// family's published Jinja chat template (tokenizer_config.json of the
// reference model) renders for the same messages.

#include "edge-agent/chat_template.h"

#include <fstream>
#include <sstream>
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

json ReadTestJson(const std::string& rel) {
  std::ifstream in(std::string(FEDLORA_TESTDATA) + "/" + rel);
  std::stringstream ss;
  ss << in.rdbuf();
  return json::parse(ss.str());
}

// A published chat_template string of a reference model (tests/data/chat/templates.json).
std::string Published(const std::string& key) {
  static const json templates = ReadTestJson("chat/templates.json").at("templates");
  return templates.at(key).at("template").get<std::string>();
}

// FormatChat against Hugging Face's Jinja implementation (@huggingface/jinja)
// rendering the published templates (tests/data/chat/chat_reference.json, made
// by make_chat_reference.mjs beside it from templates.json): 7 templates x 9
// conversations x add_generation_prompt. Where the template raises, FormatChat
// must fail; where it silently drops a message of another role (Phi-3, Zephyr,
// Llama-2, Mistral), FormatChat fails too, by contract (chat_template.h).
TEST(ChatTemplateReferenceTest, MatchesTheJinjaRenderingOfThePublishedTemplates) {
  const json templates = ReadTestJson("chat/templates.json").at("templates");
  const json results = ReadTestJson("chat/chat_reference.json").at("results");
  ASSERT_EQ(results.size(), templates.size());
  int rendered = 0, refused = 0;
  for (const auto& [key, entries] : results.items()) {
    const json& t = templates.at(key);
    auto tmpl = ChatTemplateByName(t.at("name").get<std::string>());
    ASSERT_TRUE(tmpl.ok()) << key;
    EXPECT_EQ(tmpl->bos_token, t.at("bos_token").get<std::string>()) << key;
    EXPECT_EQ(tmpl->eos_token, t.at("eos_token").get<std::string>()) << key;
    const bool drops_other_roles =
        tmpl->family == ChatFamily::kPhi3 || tmpl->family == ChatFamily::kZephyr ||
        tmpl->family == ChatFamily::kLlama2 || tmpl->family == ChatFamily::kMistral;
    for (const auto& e : entries) {
      std::vector<ChatMessage> messages;
      bool other_role = false;
      for (const auto& m : e.at("messages")) {
        messages.push_back({m.at("role"), m.at("content")});
        const std::string role = m.at("role");
        other_role |= role != "system" && role != "user" && role != "assistant";
      }
      const bool gen = e.at("add_generation_prompt");
      const std::string what = key + " " + e.at("messages").dump() + (gen ? " +gen" : "");
      auto got = FormatChat(*tmpl, messages, gen);
      if (e.contains("error") || (other_role && drops_other_roles)) {
        EXPECT_FALSE(got.ok()) << what << " gave " << (got.ok() ? *got : "");
        if (!got.ok()) {
          EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument) << what;
        }
        ++refused;
      } else {
        ASSERT_TRUE(got.ok()) << what << ": " << got.status();
        EXPECT_EQ(*got, e.at("text").get<std::string>()) << what;
        ++rendered;
      }
    }
  }
  EXPECT_GE(rendered, 100);
  EXPECT_GE(refused, 10);
}

TEST(ChatTemplateConfigTest, DetectsFamiliesFromPublishedTemplates) {
  EXPECT_EQ(DetectChatFamily(Published("Qwen2")).value(), ChatFamily::kChatMl);
  EXPECT_EQ(DetectChatFamily(Published("SmolLm2")).value(), ChatFamily::kChatMl);
  EXPECT_EQ(DetectChatFamily(Published("Llama3")).value(), ChatFamily::kLlama3);
  EXPECT_EQ(DetectChatFamily(Published("Llama3") +
                             "{{- \"Cutting Knowledge Date: December 2023\\n\" }}")
                .value(),
            ChatFamily::kLlama31);
  EXPECT_EQ(DetectChatFamily(Published("Phi3")).value(), ChatFamily::kPhi3);
  EXPECT_EQ(DetectChatFamily(Published("TinyLlama")).value(), ChatFamily::kZephyr);
  EXPECT_EQ(DetectChatFamily(Published("Llama2")).value(), ChatFamily::kLlama2);
  EXPECT_EQ(DetectChatFamily(Published("Mistral")).value(), ChatFamily::kMistral);
  EXPECT_EQ(DetectChatFamily("{{ messages }}").status().code(), absl::StatusCode::kUnimplemented);
}

TEST(ChatTemplateConfigTest, ReadsTokensAndDefaultSystemFromConfig) {
  json qwen = {
      {"chat_template", Published("Qwen2")}, {"eos_token", "<|im_end|>"}, {"bos_token", nullptr}};
  auto t = ChatTemplateFromConfigJson(qwen.dump(), "qwen/tokenizer_config.json");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->default_system, "You are a helpful assistant.");
  EXPECT_EQ(Format(*t, {kUser1}, true), Format(ByName("qwen2"), {kUser1}, true));

  json smol = {{"chat_template", Published("SmolLm2")}};
  t = ChatTemplateFromConfigJson(smol.dump(), "smol");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->default_system,
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face");

  json llama2 = {{"chat_template", Published("Llama2")},
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
                   {{"name", "default"}, {"template", Published("Llama3")}}}},
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
      json({{"chat_template", Published("Qwen2")}, {"eos_token", 5}}).dump(), "cfg.json");
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
