// Tests for edge::Tokenizer against the golden `tokenizers` fixtures and a
// hand-built SentencePiece-style tokenizer (tests/data/tokenizers/).

#include "edge-agent/tokenizer.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "edge-agent/tokenizer_normalize.h"
#include "edge-agent/tokenizer_unicode.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace fedlora::edge {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using json = nlohmann::json;

const std::string kFixtures = FEDLORA_FIXTURES;
const std::string kTestData = FEDLORA_TESTDATA;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  std::ostringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

std::unique_ptr<Tokenizer> LoadOrDie(const std::string& path) {
  auto tok = Tokenizer::FromFile(path);
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(*tok) : nullptr;
}

// ---------------------------------------------------------------------------
// Byte-level BPE (Llama-3 split regex) against `tokenizers` 0.23 output.

TEST(TokenizerByteLevelTest, MatchesEveryFixtureCase) {
  auto tok = LoadOrDie(kFixtures + "/hf/tok-bytelevel/tokenizer.json");
  ASSERT_NE(tok, nullptr);
  json cases = json::parse(ReadFile(kFixtures + "/hf/tok-bytelevel/cases.json"));
  ASSERT_GE(cases["cases"].size(), 10u);
  for (const auto& c : cases["cases"]) {
    const std::string text = c["text"];
    const std::vector<int32_t> want = c["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(tok->Encode(text), want) << "text: \"" << text << "\"";
    EXPECT_EQ(tok->Decode(want), c["decoded"].get<std::string>()) << "ids of \"" << text << "\"";
  }
}

TEST(TokenizerByteLevelTest, MatchesModelReferencePrompts) {
  for (const char* model : {"llama", "qwen2"}) {
    const std::string dir = kFixtures + "/hf/" + model;
    auto tok = LoadOrDie(dir + "/tokenizer.json");
    ASSERT_NE(tok, nullptr);
    json ref = json::parse(ReadFile(dir + "/reference.json"));
    const std::string text = ref["text"];
    const auto want = ref["input_ids"].get<std::vector<int32_t>>();
    auto got = tok->Encode(text);
    ASSERT_GE(got.size(), want.size()) << model;
    got.resize(want.size());  // the reference keeps the first 24 tokens
    EXPECT_EQ(got, want) << model;
  }
}

TEST(TokenizerByteLevelTest, SpecialTokensAreMatchedBeforeSplitting) {
  auto tok = LoadOrDie(kFixtures + "/hf/tok-bytelevel/tokenizer.json");
  ASSERT_NE(tok, nullptr);
  ASSERT_EQ(tok->TokenToId("<|begin_of_text|>"), 0);
  ASSERT_EQ(tok->TokenToId("<|end_of_text|>"), 1);
  EXPECT_EQ(tok->IdToToken(2), "<|pad|>");
  EXPECT_EQ(tok->vocab_size(), 600);
  const auto hello = tok->Encode("Hello world");
  std::vector<int32_t> want = {0};
  want.insert(want.end(), hello.begin(), hello.end());
  want.push_back(1);
  EXPECT_EQ(tok->Encode("<|begin_of_text|>Hello world<|end_of_text|>"), want);
  EXPECT_EQ(tok->Decode(want), "<|begin_of_text|>Hello world<|end_of_text|>");
  EXPECT_EQ(tok->Decode(want, /*skip_special=*/true), "Hello world");
  // A partial special token is ordinary text.
  auto partial = tok->Encode("<|begin_of_text");
  EXPECT_EQ(std::count(partial.begin(), partial.end(), 0), 0);
  EXPECT_EQ(tok->Decode(partial), "<|begin_of_text");
}

TEST(TokenizerByteLevelTest, RoundTripsArbitraryText) {
  auto tok = LoadOrDie(kFixtures + "/hf/tok-bytelevel/tokenizer.json");
  ASSERT_NE(tok, nullptr);
  for (const std::string text :
       {"", " ", "\n\n\n", "a  b\t\tc\r\nd", "Ünïcödé ✓ — “quotes” 日本語テキスト 😀🚀",
        "x=1;y=2;\tz=[3,4]", "   leading and trailing   ", "I'LL SHE'S they'Re"}) {
    EXPECT_EQ(tok->Decode(tok->Encode(text)), text);
  }
}

TEST(TokenizerByteLevelTest, InvalidUtf8InputIsReplacedNotCrashing) {
  auto tok = LoadOrDie(kFixtures + "/hf/tok-bytelevel/tokenizer.json");
  ASSERT_NE(tok, nullptr);
  const std::string bad = std::string("ok ") + "\xC3" + " x \xFF\xFE";
  EXPECT_EQ(tok->Decode(tok->Encode(bad)), "ok \xEF\xBF\xBD x \xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(TokenizerByteLevelTest, DecodeOfPartialUtf8IsLossyAndUnknownIdsSkipped) {
  auto tok = LoadOrDie(kFixtures + "/hf/tok-bytelevel/tokenizer.json");
  ASSERT_NE(tok, nullptr);
  // "€" is three bytes; its first byte alone decodes to U+FFFD, like
  // String::from_utf8_lossy.
  auto ids = tok->Encode("€");
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(tok->Decode({ids[0]}), "\xEF\xBF\xBD");
  EXPECT_EQ(tok->Decode({-5, 999999}), "");
}

// ---------------------------------------------------------------------------
// SentencePiece-style BPE (Llama-2 layout). There is no golden fixture for
// this family, so tests/data/tokenizers/sp_bpe_tokenizer.json was written by
// hand (normalizer Prepend("▁") + Replace(" "->"▁"), byte fallback with
// <0x00>..<0xFF> at ids 3..258, fuse_unk, 15 merges) and every expected id
// below was derived by hand from the published `tokenizers` BPE algorithm:
// normalize, split into characters (unknown ones to <0xNN>), then apply the
// lowest-rank merge first, leftmost first. Vocab ids used here:
//   259 ▁  260 e  261 l  262 o  263 h  269 ll  270 ▁h  274 llo  275 ▁hello
//   278 ▁world  282 ▁test  283 ▁▁;  <0xNN> = 3 + NN.
// Merge ranks: 0 "l l", 1 "▁ h", 2 "o r", 3 "▁ w", 4 "▁h e", 5 "ll o",
//   6 "▁he llo", 7 "l d", 8 "▁w or", 9 "▁wor ld", 10 "e s", 11 "t es",
//   12 "▁ tes", 13 "▁tes t", 14 "▁ ▁".

const std::string kSpPath = kTestData + "/tokenizers/sp_bpe_tokenizer.json";

std::unique_ptr<Tokenizer> LoadSpVariant(const std::function<void(json*)>& edit) {
  json j = json::parse(ReadFile(kSpPath));
  edit(&j);
  auto tok = Tokenizer::FromJson(j.dump(), "sp-variant");
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(*tok) : nullptr;
}

TEST(TokenizerSentencePieceTest, EncodesHandDerivedIds) {
  auto tok = LoadOrDie(kSpPath);
  ASSERT_NE(tok, nullptr);
  // "▁hello▁world": ll, ▁h, or, ▁w, ▁he, llo, ▁hello, ld, ▁wor, ▁world.
  EXPECT_THAT(tok->Encode("hello world"), ElementsAre(275, 278));
  // "é" is not in the vocab: byte fallback to <0xC3><0xA9>; then ll, ▁h, llo.
  EXPECT_THAT(tok->Encode("héllo"), ElementsAre(270, 3 + 0xC3, 3 + 0xA9, 274));
  // Added tokens are split off first; the Prepend normalizer then runs on
  // "hello" alone (the legacy Llama-2 behaviour).
  EXPECT_THAT(tok->Encode("<s>hello</s>"), ElementsAre(1, 275, 2));
  // "▁▁▁test": es, tes, ▁tes (at the third ▁), ▁test, then ▁▁ at the front.
  EXPECT_THAT(tok->Encode("  test"), ElementsAre(283, 282));
  EXPECT_THAT(tok->Encode(" "), ElementsAre(283));
  EXPECT_THAT(tok->Encode("\n"), ElementsAre(259, 3 + 0x0A));
  EXPECT_THAT(tok->Encode(""), ElementsAre());
}

TEST(TokenizerSentencePieceTest, DecodesWithByteFallbackAndStrip) {
  auto tok = LoadOrDie(kSpPath);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Decode({275, 278}), "hello world");
  EXPECT_EQ(tok->Decode({270, 3 + 0xC3, 3 + 0xA9, 274}), "héllo");
  EXPECT_EQ(tok->Decode({1, 275, 2}), "<s> hello</s>");
  EXPECT_EQ(tok->Decode({1, 275, 2}, /*skip_special=*/true), "hello");
  EXPECT_EQ(tok->Decode({283, 282}), "  test");
  // A lone continuation byte is invalid UTF-8: one U+FFFD per byte token.
  EXPECT_EQ(tok->Decode({275, 3 + 0xA9, 3 + 0xA9}), "hello\xEF\xBF\xBD\xEF\xBF\xBD");
  for (const std::string text :
       {"hello world", "  test  ", "ünïcödé 日本 😀", "tab\tnew\nline", "x"}) {
    EXPECT_EQ(tok->Decode(tok->Encode(text)), text);
  }
  EXPECT_EQ(tok->TokenToId("<0x41>"), 3 + 0x41);
  EXPECT_EQ(tok->IdToToken(275), "\xE2\x96\x81hello");
  EXPECT_EQ(tok->vocab_size(), 284);
}

TEST(TokenizerSentencePieceTest, PairArrayMergesEqualStringMerges) {
  auto tok = LoadSpVariant([](json* j) {
    json pairs = json::array();
    for (const auto& m : (*j)["model"]["merges"]) {
      const std::string s = m;
      pairs.push_back(json::array({s.substr(0, s.find(' ')), s.substr(s.find(' ') + 1)}));
    }
    (*j)["model"]["merges"] = pairs;
  });
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("hello world"), ElementsAre(275, 278));
  EXPECT_THAT(tok->Encode("  test"), ElementsAre(283, 282));
}

TEST(TokenizerSentencePieceTest, UnknownCharactersWithoutByteFallback) {
  auto fused = LoadSpVariant([](json* j) { (*j)["model"]["byte_fallback"] = false; });
  ASSERT_NE(fused, nullptr);
  // "é€" are both unknown: one fused <unk> (id 0); then ll, ▁h, llo.
  EXPECT_THAT(fused->Encode("hé€llo"), ElementsAre(270, 0, 274));
  EXPECT_EQ(fused->Decode({270, 0, 274}), "h<unk>llo");
  auto unfused = LoadSpVariant([](json* j) {
    (*j)["model"]["byte_fallback"] = false;
    (*j)["model"]["fuse_unk"] = false;
  });
  ASSERT_NE(unfused, nullptr);
  EXPECT_THAT(unfused->Encode("hé€llo"), ElementsAre(270, 0, 0, 274));
}

TEST(TokenizerSentencePieceTest, MetaspaceLayoutPrependsOnlyAtTheStart) {
  // The newer Llama/Mistral layout: no normalizer, Metaspace pre-tokenizer and
  // decoder with prepend_scheme "first".
  auto tok = LoadSpVariant([](json* j) {
    (*j)["normalizer"] = nullptr;
    (*j)["pre_tokenizer"] = {{"type", "Metaspace"},
                             {"replacement", "\xE2\x96\x81"},
                             {"prepend_scheme", "first"},
                             {"split", false}};
    (*j)["decoder"] = {{"type", "Metaspace"},
                       {"replacement", "\xE2\x96\x81"},
                       {"prepend_scheme", "first"},
                       {"split", false}};
  });
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("hello world"), ElementsAre(275, 278));
  // After <s> the text does not start at offset 0: no ▁ prepended; h e llo.
  EXPECT_THAT(tok->Encode("<s>hello"), ElementsAre(1, 263, 260, 274));
  EXPECT_EQ(tok->Decode({275, 278}), "hello world");
}

// The same tokenizer and variants against Hugging Face's tokenizers.js
// (tests/data/tokenizers/sp_bpe_reference.json, written by make_sp_reference.mjs
// beside it; the Python stack is not available here, and tokenizers.js agrees
// with it on every golden tok-bytelevel case). Add the Python-made fixture when
// that stack is at hand.
TEST(TokenizerSentencePieceTest, MatchesTheTokenizersJsReference) {
  const json ref = json::parse(ReadFile(kTestData + "/tokenizers/sp_bpe_reference.json"));
  const json metaspace = {{"type", "Metaspace"},
                          {"replacement", "\xE2\x96\x81"},
                          {"prepend_scheme", "first"},
                          {"split", false}};
  const std::map<std::string, std::function<void(json*)>> edits = {
      {"normalizer", [](json*) {}},
      {"metaspace",
       [&](json* j) {
         (*j)["normalizer"] = nullptr;
         (*j)["pre_tokenizer"] = metaspace;
         (*j)["decoder"] = metaspace;
       }},
      {"metaspace_byte_fallback_decoder",
       [&](json* j) {
         (*j)["normalizer"] = nullptr;
         (*j)["pre_tokenizer"] = metaspace;
       }},
      {"no_byte_fallback", [](json* j) { (*j)["model"]["byte_fallback"] = false; }},
  };
  ASSERT_EQ(ref.at("variants").size(), edits.size());
  int checked = 0;
  for (const auto& [name, cases] : ref.at("variants").items()) {
    ASSERT_TRUE(edits.count(name)) << name;
    auto tok = LoadSpVariant(edits.at(name));
    ASSERT_NE(tok, nullptr) << name;
    for (const auto& c : cases) {
      const std::string text = c.at("text");
      const std::vector<int32_t> want = c.at("ids").get<std::vector<int32_t>>();
      const auto got = tok->Encode(text);
      EXPECT_EQ(std::vector<int32_t>(got.begin(), got.end()), want) << name << ": " << text;
      std::string decoded = c.at("decoded"), decoded_skip = c.at("decoded_skip_special");
      // One known divergence: tokenizers.js's Metaspace decoder strips a single
      // leading space from the first token, while the Rust crate the Python
      // stack runs on (tokenizers/src/pre_tokenizers/metaspace.rs, decode_chain)
      // drops every ▁ of the first token. We follow the Rust crate. Only a first
      // token made of ▁ alone ("▁▁") shows the difference here.
      const std::string first = want.empty() ? "" : tok->IdToToken(want[0]).value_or("");
      const std::string meta = "\xE2\x96\x81";
      const size_t metas = first.size() / meta.size();
      if (name == "metaspace" && metas >= 2 && first == [&] {
            std::string all;
            for (size_t k = 0; k < metas; ++k) all += meta;
            return all;
          }()) {
        ASSERT_EQ(decoded.substr(0, metas - 1), std::string(metas - 1, ' ')) << text;
        decoded = decoded.substr(metas - 1);
        decoded_skip = decoded_skip.substr(metas - 1);
      }
      EXPECT_EQ(tok->Decode(want), decoded) << name << ": " << text;
      EXPECT_EQ(tok->Decode(want, /*skip_special=*/true), decoded_skip) << name << ": " << text;
      ++checked;
    }
  }
  EXPECT_GE(checked, 80);
}

// ---------------------------------------------------------------------------
// Small inline tokenizers for individual pipeline features.

std::unique_ptr<Tokenizer> FromJsonOrDie(const json& j) {
  auto tok = Tokenizer::FromJson(j.dump(), "inline");
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(*tok) : nullptr;
}

json HelloTokenizer(bool ignore_merges, bool add_prefix_space) {
  return {{"model",
           {{"type", "BPE"},
            {"ignore_merges", ignore_merges},
            {"vocab",
             {{"h", 0},
              {"e", 1},
              {"l", 2},
              {"o", 3},
              {"\xC4\xA0", 4},
              {"he", 5},
              {"ll", 6},
              {"hello", 7},
              {"llo", 8}}},
            {"merges", {"h e", "l l", "ll o"}}}},
          {"pre_tokenizer",
           {{"type", "ByteLevel"}, {"add_prefix_space", add_prefix_space}, {"use_regex", true}}},
          {"decoder", {{"type", "ByteLevel"}}}};
}

TEST(TokenizerPipelineTest, IgnoreMergesEmitsWholeVocabWords) {
  auto merged = FromJsonOrDie(HelloTokenizer(false, false));
  auto whole = FromJsonOrDie(HelloTokenizer(true, false));
  ASSERT_NE(merged, nullptr);
  ASSERT_NE(whole, nullptr);
  // No merge builds "hello" ("he" + "llo" is not a merge).
  EXPECT_THAT(merged->Encode("hello"), ElementsAre(5, 8));
  EXPECT_THAT(whole->Encode("hello"), ElementsAre(7));
  // The GPT-2 regex splits " hello" off; "Ġhello" is not in the vocab.
  EXPECT_THAT(whole->Encode("hello hello"), ElementsAre(7, 4, 5, 8));
}

TEST(TokenizerPipelineTest, ByteLevelAddPrefixSpace) {
  auto tok = FromJsonOrDie(HelloTokenizer(false, true));
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("hello"), ElementsAre(4, 5, 8));
  EXPECT_EQ(tok->Decode({4, 5, 8}), " hello");
}

std::vector<int32_t> EncodeWithSplit(const std::string& behavior, bool invert,
                                     const std::string& text) {
  json j = {{"model",
             {{"type", "BPE"},
              {"vocab", {{"a", 0}, {"b", 1}, {"-", 2}, {"a-", 3}, {"-b", 4}, {"--", 5}}},
              {"merges", json::array({json::array({"a", "-"}), json::array({"-", "b"}),
                                      json::array({"-", "-"})})}}},
            {"pre_tokenizer",
             {{"type", "Split"},
              {"pattern", {{"String", "-"}}},
              {"behavior", behavior},
              {"invert", invert}}}};
  auto tok = FromJsonOrDie(j);
  return tok ? tok->Encode(text) : std::vector<int32_t>{-1};
}

TEST(TokenizerPipelineTest, SplitBehaviors) {
  // ids: a 0, b 1, - 2, a- 3, -b 4, -- 5. Merges only act inside a piece.
  EXPECT_THAT(EncodeWithSplit("Isolated", false, "a-b"), ElementsAre(0, 2, 1));
  EXPECT_THAT(EncodeWithSplit("Removed", false, "a-b"), ElementsAre(0, 1));
  EXPECT_THAT(EncodeWithSplit("MergedWithPrevious", false, "a-b"), ElementsAre(3, 1));
  EXPECT_THAT(EncodeWithSplit("MergedWithNext", false, "a-b"), ElementsAre(0, 4));
  EXPECT_THAT(EncodeWithSplit("Contiguous", false, "a--b"), ElementsAre(0, 5, 1));
  EXPECT_THAT(EncodeWithSplit("Isolated", false, "a--b"), ElementsAre(0, 2, 2, 1));
  // invert: the non-dash stretches are the "matches", so Removed keeps dashes.
  EXPECT_THAT(EncodeWithSplit("Removed", true, "a-b"), ElementsAre(2));
}

TEST(TokenizerPipelineTest, AddedTokenStripAndNormalizedFlags) {
  json j = {
      {"model", {{"type", "BPE"}, {"vocab", {{"a", 0}, {" ", 1}}}, {"merges", json::array()}}},
      {"added_tokens",
       {{{"id", 2},
         {"content", "<m>"},
         {"special", true},
         {"normalized", false},
         {"lstrip", true},
         {"rstrip", true}},
        {{"id", 3}, {"content", "<mask>"}, {"special", false}, {"normalized", false}}}}};
  auto tok = FromJsonOrDie(j);
  ASSERT_NE(tok, nullptr);
  // lstrip/rstrip swallow the spaces around <m>; longest match wins over "<m".
  EXPECT_THAT(tok->Encode("a  <m>  a"), ElementsAre(0, 2, 0));
  EXPECT_THAT(tok->Encode("a <mask> a"), ElementsAre(0, 1, 3, 1, 0));
  EXPECT_EQ(tok->Decode({0, 2, 3}, /*skip_special=*/true), "a <mask>");
  EXPECT_EQ(tok->Decode({0, 2, 3}), "a <m> <mask>");  // no decoder: tokens joined by spaces
}

TEST(TokenizerPipelineTest, NfcNormalizer) {
  json j = {{"normalizer", {{"type", "NFC"}}},
            {"model",
             {{"type", "BPE"},
              {"vocab", {{"\xC3\xA9", 0}, {"e", 1}, {"\xCC\x81", 2}}},
              {"merges", json::array()}}}};
  auto tok = FromJsonOrDie(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("e\xCC\x81"), ElementsAre(0));  // e + COMBINING ACUTE -> é
  EXPECT_THAT(tok->Encode("\xC3\xA9"
                          "e"),
              ElementsAre(0, 1));
}

TEST(TokenizerNfcTest, ComposesReordersAndHandlesHangul) {
  // Expected values from Python's unicodedata.normalize("NFC", ...).
  EXPECT_EQ(tok::ToNfc("Cafe\xCC\x81"), "Caf\xC3\xA9");
  EXPECT_EQ(tok::ToNfc("A\xCC\x8A"), "\xC3\x85");              // A + ring -> Å
  EXPECT_EQ(tok::ToNfc("\xE2\x84\xAB"), "\xC3\x85");           // ANGSTROM SIGN -> Å
  EXPECT_EQ(tok::ToNfc("a\xCC\x82\xCC\xA3"), "\xE1\xBA\xAD");  // a + ^ + dot below -> ậ
  EXPECT_EQ(tok::ToNfc("a\xCC\xA3\xCC\x82"), "\xE1\xBA\xAD");
  EXPECT_EQ(tok::ToNfc("\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8"), "\xEA\xB0\x81");  // jamo -> 각
  EXPECT_EQ(tok::ToNfc("\xEA\xB0\x81"), "\xEA\xB0\x81");
  EXPECT_EQ(tok::ToNfc("plain ascii"), "plain ascii");
  EXPECT_EQ(tok::ToNfc("\xE0\xA4\x95\xE0\xA4\xBC"),
            "\xE0\xA4\x95\xE0\xA4\xBC");  // excluded: क़ stays decomposed
}

// ---------------------------------------------------------------------------
// Errors name the file and the field.

TEST(TokenizerErrorTest, MissingFile) {
  auto tok = Tokenizer::FromFile("/nonexistent/dir/tokenizer.json");
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr("/nonexistent/dir/tokenizer.json"));
}

TEST(TokenizerErrorTest, BadJson) {
  const std::string path = ::testing::TempDir() + "/bad_tokenizer.json";
  {
    std::ofstream out(path);
    out << "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0,}}";
  }
  auto tok = Tokenizer::FromFile(path);
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr(path));
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr("not a valid tokenizer.json"));
  std::remove(path.c_str());
}

absl::Status LoadError(const json& j) {
  auto tok = Tokenizer::FromJson(j.dump(), "my/tokenizer.json");
  return tok.ok() ? absl::OkStatus() : tok.status();
}

TEST(TokenizerErrorTest, UnsupportedOrMalformedFieldsAreNamed) {
  json base = json::parse(ReadFile(kSpPath));
  struct Case {
    std::function<void(json*)> edit;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {[](json* j) { (*j)["model"]["type"] = "WordPiece"; },
       {"my/tokenizer.json", "model.type", "WordPiece"}},
      {[](json* j) { j->erase("model"); }, {"\"model\"", "missing"}},
      {[](json* j) { (*j)["model"]["vocab"] = json::array(); },
       {"model.vocab", "expected an object"}},
      {[](json* j) { (*j)["model"]["merges"][3] = "nope x"; }, {"model.merges[3]", "\"nope\""}},
      {[](json* j) { (*j)["model"]["merges"][2] = 7; }, {"model.merges[2]"}},
      {[](json* j) { (*j)["model"]["unk_token"] = "<missing>"; }, {"model.unk_token", "<missing>"}},
      {[](json* j) { (*j)["normalizer"]["normalizers"][1]["type"] = "NFKD"; },
       {"normalizer.normalizers[1].type", "NFKD"}},
      {[](json* j) {
         (*j)["pre_tokenizer"] = {
             {"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
       },
       {"pre_tokenizer.pattern", "does not compile"}},
      {[](json* j) {
         (*j)["pre_tokenizer"] = {{"type", "BertPreTokenizer"}};
       },
       {"pre_tokenizer.type", "BertPreTokenizer"}},
      {[](json* j) { (*j)["decoder"]["decoders"][3]["start"] = "one"; },
       {"decoder.decoders[3].start"}},
      {[](json* j) { (*j)["added_tokens"][1].erase("content"); },
       {"added_tokens[1].content", "missing"}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    json j = base;
    cases[i].edit(&j);
    absl::Status s = LoadError(j);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << "case " << i << ": " << s;
    for (const auto& needle : cases[i].needles) {
      EXPECT_THAT(std::string(s.message()), HasSubstr(needle)) << "case " << i;
    }
  }
  EXPECT_THAT(std::string(LoadError(json::array()).message()), HasSubstr("expected a JSON object"));
}

TEST(TokenizerErrorTest, DeepSequenceNestingIsRejected) {
  json n = {{"type", "Prepend"}, {"prepend", "x"}};
  for (int i = 0; i < 40; ++i) n = {{"type", "Sequence"}, {"normalizers", json::array({n})}};
  json j = json::parse(ReadFile(kSpPath));
  j["normalizer"] = n;
  absl::Status s = LoadError(j);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("nested deeper"));
  j["normalizer"] = nullptr;
  j["model"]["vocab"]["huge"] = 2147483647;
  EXPECT_THAT(std::string(LoadError(j).message()), HasSubstr("model.vocab[\"huge\"]"));
}

// Mutated tokenizer.json files must load or fail cleanly, never crash; what
// loads must encode and decode without crashing.
TEST(TokenizerErrorTest, MutatedFilesNeverCrash) {
  const std::string base = ReadFile(kSpPath);
  const std::string bytelevel = ReadFile(kFixtures + "/hf/tok-bytelevel/tokenizer.json");
  uint64_t state = 0x9E3779B97F4A7C15ull;
  auto next = [&state] {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  int loaded = 0;
  for (int iter = 0; iter < 400; ++iter) {
    std::string text = (iter % 2 == 0) ? base : bytelevel;
    const int edits = 1 + static_cast<int>(next() % 4);
    for (int e = 0; e < edits; ++e) {
      size_t pos = next() % text.size();
      switch (next() % 4) {
        case 0:
          text[pos] = static_cast<char>(next() & 0xFF);
          break;
        case 1:
          text.erase(pos, 1 + next() % 8);
          break;
        case 2:
          text.insert(pos, 1, "{}[]\",:0 \\"[next() % 11]);
          break;
        default:
          text.resize(pos);
          break;
      }
    }
    auto tok = Tokenizer::FromJson(text, "mutated");
    if (!tok.ok()) {
      EXPECT_THAT(std::string(tok.status().message()), HasSubstr("mutated"));
      continue;
    }
    ++loaded;
    auto ids = (*tok)->Encode("Hello wörld <s> 12345 \xF0\x9F\x99\x82");
    (void)(*tok)->Decode(ids);
    (void)(*tok)->Decode({0, 1, 2, 300, 599, -1});
  }
  EXPECT_GT(loaded, 0);  // some mutations (e.g. inside strings) still load
}

TEST(TokenizerByteLevelTest, LongInputsAreFullyCovered) {
  auto tok = LoadOrDie(kFixtures + "/hf/tok-bytelevel/tokenizer.json");
  ASSERT_NE(tok, nullptr);
  // Long runs stress PCRE2's JIT stack and the merge queue; the output must
  // still decode to the input, and a run of one letter must tokenize like the
  // same run built from shorter repeats of the fixture's 40-x case.
  for (const std::string& text : {std::string(200000, 'x'), std::string(100000, ' ') + "x",
                                  std::string(50000, '\n') + "y", std::string(100000, '7')}) {
    auto ids = tok->Encode(text);
    EXPECT_EQ(tok->Decode(ids), text);
    EXPECT_LE(ids.size(), text.size());
  }
  // 200000 'x' = 5000 x 40; "xxxx...x"(40) -> [587, 587, 421], and 587 is 16 x's
  // ("x" x 40 = 16 + 16 + 8), so the long run is 12500 x 587.
  auto ids = tok->Encode(std::string(200000, 'x'));
  EXPECT_EQ(ids.size(), 12500u);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 587), 12500);
}

TEST(TokenizerByteLevelTest, ConcurrentEncodeIsConsistent) {
  auto tok = LoadOrDie(kFixtures + "/hf/tok-bytelevel/tokenizer.json");
  ASSERT_NE(tok, nullptr);
  const std::string text =
      "Patient: 54yo male, BP 140/90, metformin 500mg BID. Überweisung €1.234,56";
  const auto want = tok->Encode(text);
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 200; ++i) {
        if (tok->Encode(text) != want || tok->Decode(want) != text) ++mismatches;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
}

}  // namespace
}  // namespace fedlora::edge
