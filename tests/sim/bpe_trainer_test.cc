// Tests for sim::TrainByteLevelBpeTokenizerJson: the result loads in
// edge::Tokenizer, round-trips text, compresses corpus text, is deterministic.

#include "simulations/bpe_trainer.h"

#include <string>
#include <vector>

#include "edge-agent/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace fedlora::sim {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

const std::vector<std::string> kSpecials = {"<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"};

std::vector<std::string> Corpus() {
  std::vector<std::string> docs;
  const char* templates[] = {
      "The patient was given %d mg of metformin twice daily and the blood pressure was %d/%d.",
      "Federated learning keeps the training data on the device; only the adapter update leaves "
      "it.",
      "Die Überweisung über %d Euro an Müller wurde am Montag ausgeführt.",
      "the quick brown fox jumps over the lazy dog %d times",
      "def train(step):\n    return step * %d  # scale the learning rate\n",
  };
  char buf[256];
  for (int i = 0; i < 60; ++i) {
    for (const char* t : templates) {
      std::snprintf(buf, sizeof(buf), t, 100 + i * 7, 120 + i, 80 + i % 9);
      docs.emplace_back(buf);
    }
  }
  docs.push_back("<|begin_of_text|>a document with special tokens inside<|end_of_text|>");
  return docs;
}

std::unique_ptr<edge::Tokenizer> Train(int vocab_size) {
  auto j = TrainByteLevelBpeTokenizerJson(Corpus(), vocab_size, kSpecials);
  EXPECT_TRUE(j.ok()) << j.status();
  if (!j.ok()) return nullptr;
  auto tok = edge::Tokenizer::FromJson(*j, "trained");
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(*tok) : nullptr;
}

TEST(BpeTrainerTest, ProducesRequestedLayout) {
  auto text = TrainByteLevelBpeTokenizerJson(Corpus(), 400, kSpecials);
  ASSERT_TRUE(text.ok()) << text.status();
  json j = json::parse(*text);
  EXPECT_EQ(j["model"]["type"], "BPE");
  EXPECT_EQ(j["pre_tokenizer"]["type"], "ByteLevel");
  EXPECT_EQ(j["decoder"]["type"], "ByteLevel");
  ASSERT_EQ(j["added_tokens"].size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(j["added_tokens"][i]["content"], kSpecials[i]);
    EXPECT_EQ(j["added_tokens"][i]["id"], i);
    EXPECT_EQ(j["added_tokens"][i]["special"], true);
    EXPECT_EQ(j["model"]["vocab"][kSpecials[i]], i);
  }
  EXPECT_EQ(j["model"]["vocab"].size(), 400u);
  EXPECT_EQ(j["model"]["merges"].size(), 400u - 256 - 3);
  EXPECT_EQ(j["model"]["vocab"]["A"], 3 + 'A');         // bytes follow the specials in byte order
  EXPECT_EQ(j["model"]["vocab"]["\xC4\xA0"], 3 + ' ');  // "Ġ" is the space byte
}

TEST(BpeTrainerTest, LoadsAndRoundTripsArbitraryText) {
  auto tok = Train(500);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 500);
  for (const std::string& text : std::vector<std::string>{
           "", "hello", "The patient was given 5 mg.", "Ünïcödé ✓ 日本語 😀 and tabs\t\n",
           "   spaces   ", "<|begin_of_text|>special<|end_of_text|><|pad|>",
           std::string("\x00\x01\x7F", 3)}) {
    EXPECT_EQ(tok->Decode(tok->Encode(text)), text) << text;
  }
  auto ids = tok->Encode("<|begin_of_text|>x");
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids.front(), 0);
}

TEST(BpeTrainerTest, MergesShortenCorpusText) {
  auto tok = Train(600);
  ASSERT_NE(tok, nullptr);
  size_t bytes = 0, tokens = 0;
  for (const auto& doc : Corpus()) {
    bytes += doc.size();
    tokens += tok->Encode(doc).size();
  }
  // The byte baseline (no merges) uses one token per byte.
  auto base = Train(256 + 3);
  ASSERT_NE(base, nullptr);
  size_t base_tokens = 0;
  for (const auto& doc : Corpus()) base_tokens += base->Encode(doc).size();
  EXPECT_LT(base_tokens, bytes);  // only the special tokens collapse
  EXPECT_LT(tokens * 3, bytes) << "expected > 3 bytes per token on training text, got " << tokens
                               << " tokens for " << bytes << " bytes";
}

TEST(BpeTrainerTest, FrequentWordsBecomeSingleTokens) {
  auto tok = Train(600);
  ASSERT_NE(tok, nullptr);
  // " the" and " patient" occur hundreds of times; they must be merged whole.
  EXPECT_EQ(tok->Encode(" the").size(), 1u);
  EXPECT_EQ(tok->Encode(" patient").size(), 1u);
  EXPECT_TRUE(tok->TokenToId("\xC4\xA0the").has_value());
}

TEST(BpeTrainerTest, IsDeterministic) {
  auto a = TrainByteLevelBpeTokenizerJson(Corpus(), 450, kSpecials);
  auto b = TrainByteLevelBpeTokenizerJson(Corpus(), 450, kSpecials);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, *b);
  auto c = TrainByteLevelBpeTokenizerJson({"something else entirely"}, 450, kSpecials);
  ASSERT_TRUE(c.ok());
  EXPECT_NE(*a, *c);
}

TEST(BpeTrainerTest, StopsWhenNoPairsRemain) {
  auto text = TrainByteLevelBpeTokenizerJson({"abab"}, 10000, {});
  ASSERT_TRUE(text.ok()) << text.status();
  json j = json::parse(*text);
  // "abab": merge (a,b) -> "ab", then (ab,ab) -> "abab"; nothing else.
  ASSERT_EQ(j["model"]["merges"].size(), 2u);
  EXPECT_EQ(j["model"]["merges"][0], json::array({"a", "b"}));
  EXPECT_EQ(j["model"]["merges"][1], json::array({"ab", "ab"}));
  EXPECT_EQ(j["model"]["vocab"].size(), 258u);
}

TEST(BpeTrainerTest, TiesBreakTowardsSmallerIds) {
  // Every adjacent pair of "abcd" occurs once; (a,b) has the smallest ids.
  auto text = TrainByteLevelBpeTokenizerJson({"abcd"}, 257, {});
  ASSERT_TRUE(text.ok()) << text.status();
  json j = json::parse(*text);
  ASSERT_EQ(j["model"]["merges"].size(), 1u);
  EXPECT_EQ(j["model"]["merges"][0], json::array({"a", "b"}));
}

TEST(BpeTrainerTest, RejectsBadArguments) {
  auto small = TrainByteLevelBpeTokenizerJson(Corpus(), 258, kSpecials);
  EXPECT_EQ(small.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(small.status().message()), HasSubstr("vocab_size 258"));
  auto empty = TrainByteLevelBpeTokenizerJson(Corpus(), 300, {"<a>", ""});
  EXPECT_THAT(std::string(empty.status().message()), HasSubstr("special_tokens[1] is empty"));
  auto dup = TrainByteLevelBpeTokenizerJson(Corpus(), 300, {"<a>", "<a>"});
  EXPECT_THAT(std::string(dup.status().message()), HasSubstr("repeated"));
  auto bad = TrainByteLevelBpeTokenizerJson(Corpus(), 300, {"\xFF"});
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("not valid UTF-8"));
}

}  // namespace
}  // namespace fedlora::sim
