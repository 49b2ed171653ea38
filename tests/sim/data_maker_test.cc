#include "simulations/data_maker.h"

#include <stdlib.h>

#include <algorithm>
#include <filesystem>
#include <regex>
#include <set>
#include <string>

#include "common/crypto/crypto.h"
#include "edge-agent/data.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace fedlora::sim {
namespace {

using ::testing::HasSubstr;

std::string TempDir() {
  char tmpl[] = "/tmp/fedlora_data_maker_test_XXXXXX";
  const char* dir = mkdtemp(tmpl);
  return dir == nullptr ? std::string() : std::string(dir);
}

bool SameExamples(const std::vector<SiteExample>& a, const std::vector<SiteExample>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].instruction != b[i].instruction || a[i].input != b[i].input ||
        a[i].output != b[i].output) {
      return false;
    }
  }
  return true;
}

TEST(DataMakerTest, FormatFieldsIsTheFixedLine) {
  ClinicalRecord r{54, 'M', 140, 90, "metformin", "500mg", "BID", "type 2 diabetes"};
  EXPECT_EQ(FormatFields(r),
            "age=54; sex=M; bp=140/90; drug=metformin; dose=500mg; freq=BID; dx=type 2 diabetes");
}

TEST(DataMakerTest, GenerationIsDeterministicAndSeeded) {
  auto a = GenerateSite(1, 50, 10, 7);
  auto b = GenerateSite(1, 50, 10, 7);
  auto c = GenerateSite(1, 50, 10, 8);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  ASSERT_EQ(a->train.size(), 50u);
  ASSERT_EQ(a->heldout.size(), 10u);
  EXPECT_TRUE(SameExamples(a->train, b->train));
  EXPECT_TRUE(SameExamples(a->heldout, b->heldout));
  EXPECT_FALSE(SameExamples(a->train, c->train));
}

TEST(DataMakerTest, OutputsMatchTheirNotes) {
  const std::regex line(
      "age=(\\d+); sex=([MF]); bp=(\\d+)/(\\d+); drug=([a-z]+); dose=([0-9.]+)(mg|mcg); "
      "freq=(QD|BID|TID|QHS|PRN); dx=([A-Za-z0-9 ]+)");
  for (int site = 0; site < 3; ++site) {
    auto data = GenerateSite(site, 80, 20, 3);
    ASSERT_TRUE(data.ok());
    for (const SiteExample& e : data->train) {
      EXPECT_EQ(e.instruction, kExtractInstruction);
      std::smatch m;
      ASSERT_TRUE(std::regex_match(e.output, m, line)) << e.output;
      int age = std::stoi(m[1]);
      EXPECT_GE(age, 18);
      EXPECT_LE(age, 92);
      // Every field is recoverable from the note.
      EXPECT_THAT(e.input, HasSubstr(m[1].str())) << "site " << site;
      EXPECT_THAT(e.input, ::testing::AnyOf(HasSubstr(m[3].str() + "/" + m[4].str()),
                                          HasSubstr(m[3].str() + " over " + m[4].str())))
          << e.input;
      EXPECT_THAT(e.input, HasSubstr(m[5].str())) << e.input;
      EXPECT_THAT(e.input, HasSubstr(m[6].str())) << e.input;
    }
  }
}

TEST(DataMakerTest, SitesWriteInDifferentStyles) {
  auto terse = GenerateSite(0, 60, 0, 1);
  auto narrative = GenerateSite(1, 60, 0, 1);
  auto bullets = GenerateSite(2, 60, 0, 1);
  auto terse_again = GenerateSite(3, 60, 0, 1);
  ASSERT_TRUE(terse.ok() && narrative.ok() && bullets.ok() && terse_again.ok());
  for (const auto* site : {&terse->train, &terse_again->train}) {
    for (const SiteExample& e : *site) {
      EXPECT_EQ(e.input.find('\n'), std::string::npos) << e.input;
      EXPECT_THAT(e.input, HasSubstr("BP ")) << e.input;
      EXPECT_EQ(e.input.find("year"), std::string::npos) << e.input;
      EXPECT_LT(e.input.size(), 80u) << e.input;
    }
  }
  for (const SiteExample& e : narrative->train) {
    EXPECT_EQ(e.input.find('\n'), std::string::npos) << e.input;
    EXPECT_THAT(e.input, ::testing::ContainsRegex("[Bb]lood pressure")) << e.input;
    EXPECT_THAT(e.input, ::testing::ContainsRegex("year")) << e.input;
  }
  for (const SiteExample& e : bullets->train) {
    EXPECT_NE(e.input.find('\n'), std::string::npos) << e.input;
    EXPECT_TRUE(e.input.rfind("- ", 0) == 0 || e.input.rfind("* ", 0) == 0) << e.input;
  }
  // Same seed, different sites: different notes.
  EXPECT_NE(terse->train[0].input, terse_again->train[0].input);
  EXPECT_STREQ(StyleName(SiteStyle(4)), "narrative");
}

TEST(DataMakerTest, TrainAndHeldoutAreDisjointAndDistinct) {
  auto data = GenerateSite(2, 300, 60, 42);
  ASSERT_TRUE(data.ok());
  std::set<std::string> train;
  for (const auto& e : data->train) train.insert(e.input);
  EXPECT_EQ(train.size(), 300u);
  std::set<std::string> heldout;
  for (const auto& e : data->heldout) {
    EXPECT_EQ(train.count(e.input), 0u) << e.input;
    heldout.insert(e.input);
  }
  EXPECT_EQ(heldout.size(), 60u);
}

TEST(DataMakerTest, RejectsBadCounts) {
  EXPECT_EQ(GenerateSite(0, -1, 0, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeSiteData("/tmp/unused", 0, 10, 1, 0).code(), absl::StatusCode::kInvalidArgument);
}

TEST(DataMakerTest, WritesJsonlThatLoadJsonlParses) {
  std::string dir = TempDir();
  ASSERT_FALSE(dir.empty());
  ASSERT_TRUE(MakeSiteData(dir, 3, 25, 5, 9).ok());
  for (int site = 0; site < 3; ++site) {
    const std::string site_dir = dir + "/site-" + std::to_string(site);
    auto expected = GenerateSite(site, 25, 5, 9);
    ASSERT_TRUE(expected.ok());
    auto train = edge::LoadJsonl(site_dir + "/train.jsonl");
    ASSERT_TRUE(train.ok()) << train.status();
    auto heldout = edge::LoadJsonl(site_dir + "/heldout.jsonl");
    ASSERT_TRUE(heldout.ok()) << heldout.status();
    ASSERT_EQ(train->size(), 25u);
    ASSERT_EQ(heldout->size(), 5u);
    for (size_t i = 0; i < train->size(); ++i) {
      const SiteExample& e = expected->train[i];
      EXPECT_EQ((*train)[i].prompt, edge::FormatInstructionPrompt(e.instruction, e.input));
      EXPECT_EQ((*train)[i].response, e.output);
    }
    EXPECT_EQ((*heldout)[0].response, expected->heldout[0].output);
    // Each line is an {"instruction","input","output"} object.
    auto text = common::ReadFileToString(site_dir + "/train.jsonl");
    ASSERT_TRUE(text.ok());
    auto first = nlohmann::json::parse(text->substr(0, text->find('\n')));
    EXPECT_EQ(first.size(), 3u);
    EXPECT_EQ(first["instruction"], kExtractInstruction);
  }
  auto manifest = common::ReadFileToString(dir + "/manifest.json");
  ASSERT_TRUE(manifest.ok());
  auto j = nlohmann::json::parse(*manifest);
  ASSERT_EQ(j["sites"].size(), 3u);
  EXPECT_EQ(j["sites"][1]["style"], "narrative");
  std::filesystem::remove_all(dir);
}

TEST(DataMakerTest, CorpusCoversEverySiteDeterministically) {
  auto a = SyntheticCorpus(3, 20, 5);
  auto b = SyntheticCorpus(3, 20, 5);
  EXPECT_EQ(a, b);
  ASSERT_EQ(a.size(), 3u * 20 * 3);
  auto site2 = GenerateSite(2, 20, 0, 5);
  ASSERT_TRUE(site2.ok());
  EXPECT_NE(std::find(a.begin(), a.end(), site2->train[3].input), a.end());
  EXPECT_NE(SyntheticCorpus(3, 20, 6), a);
}

}  // namespace
}  // namespace fedlora::sim
