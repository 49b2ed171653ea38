#include "edge-agent/data.h"

#include <unistd.h>

#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fedlora::edge {
namespace {

using ::testing::HasSubstr;

class DataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = ::testing::TempDir() + "/data_test_" + std::to_string(getpid()) + ".jsonl";
  }
  void TearDown() override { unlink(path_.c_str()); }
  void Write(const std::string& text) {
    std::ofstream(path_, std::ios::binary | std::ios::trunc) << text;
  }
  // Expects an InvalidArgument naming "<file>:<line>:" and `what`.
  void ExpectError(const std::string& text, int line, const std::string& what) {
    Write(text);
    auto r = LoadJsonl(path_);
    ASSERT_FALSE(r.ok()) << text;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(r.status().message()),
                HasSubstr(path_ + ":" + std::to_string(line) + ": "));
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(what));
  }
  std::string path_;
};

TEST_F(DataTest, InstructionFormat) {
  Write(
      "{\"instruction\": \"Summarize\", \"input\": \"BP 140/90\", \"output\": \"High BP\"}\n"
      "\n"
      "   \n"
      "{\"instruction\": \"Say hi\", \"output\": \"hi\", \"id\": 7}\r\n"
      "{\"instruction\": \"Say hi\", \"input\": \"\", \"output\": \"hi\"}");
  auto r = LoadJsonl(path_);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 3u);
  EXPECT_EQ((*r)[0].prompt,
            "### Instruction:\nSummarize\n\n### Input:\nBP 140/90\n\n### Response:\n");
  EXPECT_EQ((*r)[0].response, "High BP");
  EXPECT_EQ((*r)[1].prompt, "### Instruction:\nSay hi\n\n### Response:\n");
  EXPECT_EQ((*r)[1].prompt, (*r)[2].prompt);
  EXPECT_EQ((*r)[1].response, "hi");
}

TEST_F(DataTest, TextFormatIsGeneralText) {
  Write("{\"text\": \"The heart has four chambers.\"}\n{\"text\": \"Water boils.\"}\n");
  auto r = LoadJsonl(path_);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 2u);
  EXPECT_EQ((*r)[0].prompt, "");
  EXPECT_EQ((*r)[0].response, "The heart has four chambers.");
  EXPECT_EQ((*r)[1].response, "Water boils.");
  ExpectError("{\"text\": \"ok\"}\n{\"text\": \"\"}\n", 2, "field 'text'");
  ExpectError("{\"text\": 5}\n", 1, "field 'text': expected a string");
  ExpectError("{\"body\": \"x\"}\n", 1, "\"text\"");
}

TEST_F(DataTest, FormatInstructionPrompt) {
  EXPECT_EQ(FormatInstructionPrompt("A", "B"),
            "### Instruction:\nA\n\n### Input:\nB\n\n### Response:\n");
  EXPECT_EQ(FormatInstructionPrompt("A", ""), "### Instruction:\nA\n\n### Response:\n");
}

TEST_F(DataTest, MessagesFormat) {
  Write(
      R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Dose?"}, {"role": "assistant", "content": "500mg"}]})"
      "\n"
      R"({"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]})"
      "\n");
  auto r = LoadJsonl(path_);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 2u);
  EXPECT_EQ((*r)[0].prompt,
            "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello\n\n"
            "### Instruction:\nDose?\n\n### Response:\n");
  EXPECT_EQ((*r)[0].response, "500mg");
  EXPECT_EQ((*r)[1].prompt, FormatInstructionPrompt("Say hi", ""));
  EXPECT_EQ((*r)[1].response, "hi");
}

TEST_F(DataTest, EmptyFileGivesNoExamples) {
  Write("\n\n");
  auto r = LoadJsonl(path_);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->empty());
}

TEST_F(DataTest, MissingFile) {
  auto r = LoadJsonl("/nonexistent/data.jsonl");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("/nonexistent/data.jsonl"));
}

const char kGood[] = "{\"instruction\": \"a\", \"output\": \"b\"}\n";

TEST_F(DataTest, BadJson) {
  ExpectError(std::string(kGood) + "{\"instruction\": \"a\", \"output\": \n", 2, "invalid JSON");
}
TEST_F(DataTest, NotAnObject) { ExpectError(std::string(kGood) + "[1, 2]\n", 2, "object"); }
TEST_F(DataTest, UnknownShape) {
  ExpectError(std::string(kGood) + kGood + "{\"prompt\": \"a\"}\n", 3, "instruction");
}
TEST_F(DataTest, MissingInstruction) {
  ExpectError("{\"output\": \"b\"}\n", 1, "missing field 'instruction'");
}
TEST_F(DataTest, MissingOutput) {
  ExpectError("{\"instruction\": \"a\"}\n", 1, "missing field 'output'");
}
TEST_F(DataTest, NonStringOutput) {
  ExpectError("{\"instruction\": \"a\", \"output\": 5}\n", 1, "field 'output': expected a string");
}
TEST_F(DataTest, NonStringInstruction) {
  ExpectError("{\"instruction\": [\"a\"], \"output\": \"b\"}\n", 1,
              "field 'instruction': expected a string");
}
TEST_F(DataTest, NonStringInput) {
  ExpectError("{\"instruction\": \"a\", \"input\": {}, \"output\": \"b\"}\n", 1,
              "field 'input': expected a string");
}
TEST_F(DataTest, EmptyOutput) {
  ExpectError("\n" + std::string(kGood) + "{\"instruction\": \"a\", \"output\": \"\"}\n", 3,
              "field 'output'");
}
TEST_F(DataTest, MessagesNotArray) {
  ExpectError("{\"messages\": \"hi\"}\n", 1, "field 'messages': expected an array");
}
TEST_F(DataTest, MessagesEmpty) { ExpectError("{\"messages\": []}\n", 1, "at least one message"); }
TEST_F(DataTest, MessageNotObject) {
  ExpectError("{\"messages\": [3]}\n", 1, "messages[0]: expected an object");
}
TEST_F(DataTest, MessageMissingRole) {
  ExpectError("{\"messages\": [{\"content\": \"x\"}]}\n", 1, "messages[0]: missing field 'role'");
}
TEST_F(DataTest, MessageNonStringContent) {
  ExpectError(
      R"({"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]})"
      "\n",
      1, "messages[0]: field 'content': expected a string");
}
TEST_F(DataTest, MessageUnknownRole) {
  ExpectError(
      R"({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]})"
      "\n",
      1, "tool");
}
TEST_F(DataTest, MessagesLastNotAssistant) {
  ExpectError(R"({"messages": [{"role": "user", "content": "x"}]})"
              "\n",
              1, "'assistant'");
}
TEST_F(DataTest, MessagesEmptyAssistant) {
  ExpectError(
      R"({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]})"
      "\n",
      1, "empty assistant content");
}

}  // namespace
}  // namespace fedlora::edge
