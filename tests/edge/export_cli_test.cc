// `fedlora-agent export` (edge::RunExportCli), in process: every input kind and
// format, the files read back, and the errors (usage = 2, bad input = 1, nothing
// written).

#include "edge-agent/export_cli.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <string>

#include "common/crypto/crypto.h"
#include "common/export/adapter_export.h"
#include "common/export/gguf.h"
#include "common/export/peft_export.h"
#include "common/quant/quant.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fedlora::edge {
namespace {

using ::testing::HasSubstr;

const std::string kLlama = std::string(FEDLORA_FIXTURES) + "/hf/llama";

struct CliResult {
  int code;
  std::string out, err;
};

CliResult Cli(const std::vector<std::string>& args) {
  std::ostringstream out, err;
  const int code = RunExportCli(args, out, err);
  return {code, out.str(), err.str()};
}

class ExportCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/export_cli_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto adapter = common::ReadPeftAdapter(kLlama + "/adapter");
    ASSERT_TRUE(adapter.ok()) << adapter.status();
    adapter_ = std::move(*adapter);
    // The fixture adapter as the coordinator publishes it (q8_0 blob + metadata).
    blob_ = common::EncodeAdapterBlob(adapter_.tensors, common::Quant::kQ8_0,
                                      {{common::kBlobLoraAlphaKey, "8"},
                                       {common::kBlobLoraRankKey, "4"},
                                       {common::kBlobLoraTargetsKey,
                                        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"}});
    ASSERT_TRUE(common::WriteFileAtomic(Path("v1.blob"), blob_).ok());
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  std::string dir_;
  common::PeftAdapterFiles adapter_;
  std::string blob_;
};

TEST_F(ExportCliTest, HelpNamesEveryInputAndFormat) {
  CliResult r = Cli({"--help"});
  EXPECT_EQ(r.code, 0);
  for (const char* word : {"--model", "--adapter", "--version-blob", "--sha256", "--format",
                           "gguf-lora", "gguf-merged", "q8_0", "--out"}) {
    EXPECT_THAT(r.out, HasSubstr(word));
  }
}

TEST_F(ExportCliTest, PeftDirectoryToPeftRoundTrips) {
  CliResult r = Cli({"--model", kLlama, "--adapter", kLlama + "/adapter", "--format", "peft",
                     "--out", Path("peft")});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("as peft to " + Path("peft") + " (28 tensors)"));
  auto back = common::ReadPeftAdapter(Path("peft"));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->config.r, 4);
  EXPECT_DOUBLE_EQ(back->config.lora_alpha, 8);
  EXPECT_EQ(back->config.base_model_name_or_path, kLlama);
  ASSERT_EQ(back->tensors.size(), adapter_.tensors.size());
  for (const auto& [name, t] : adapter_.tensors) EXPECT_EQ(back->tensors.at(name).data, t.data);
}

TEST_F(ExportCliTest, VersionBlobToEveryFormat) {
  const std::string sha = common::Sha256Hex(blob_);
  CliResult r = Cli({"--model", kLlama, "--version-blob", Path("v1.blob"), "--sha256", sha,
                     "--format", "gguf-lora", "--quant", "f16", "--out", Path("a.gguf"),
                     "--name", "device-v1"});
  ASSERT_EQ(r.code, 0) << r.err;
  auto lora = common::GgufFile::Open(Path("a.gguf"));
  ASSERT_TRUE(lora.ok()) << lora.status();
  EXPECT_EQ(*(*lora)->GetString("general.type"), "adapter");
  EXPECT_EQ(*(*lora)->GetString("general.name"), "device-v1");
  EXPECT_DOUBLE_EQ(*(*lora)->GetFloat("adapter.lora.alpha"), 8.0);
  EXPECT_EQ((*lora)->tensors().size(), 28u);
  const common::GgufTensorInfo* a = (*lora)->FindTensor("blk.1.ffn_down.weight.lora_a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->type, common::GgmlType::kF16);
  EXPECT_EQ(a->ne, (std::vector<int64_t>{176, 4}));

  r = Cli({"--model", kLlama, "--version-blob", Path("v1.blob"), "--format", "gguf-merged",
           "--quant=q8_0", "--out", Path("m.gguf")});
  ASSERT_EQ(r.code, 0) << r.err;
  auto merged = common::GgufFile::Open(Path("m.gguf"));
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ(*(*merged)->GetString("general.type"), "model");
  EXPECT_EQ((*merged)->FindTensor("blk.0.attn_q.weight")->type, common::GgmlType::kQ8_0);

  // The q8_0 blob decodes to its dequantized values: the PEFT export holds them.
  r = Cli({"--model", kLlama, "--version-blob", Path("v1.blob"), "--format", "peft", "--out",
           Path("p")});
  ASSERT_EQ(r.code, 0) << r.err;
  auto peft = common::ReadPeftAdapter(Path("p"));
  ASSERT_TRUE(peft.ok()) << peft.status();
  auto decoded = common::DecodeAdapterBlob(blob_);
  ASSERT_TRUE(decoded.ok());
  for (const auto& [name, t] : *decoded) EXPECT_EQ(peft->tensors.at(name).data, t.data) << name;
  EXPECT_EQ(peft->config.target_modules.size(), 7u);
}

TEST_F(ExportCliTest, UsageErrorsExitTwo) {
  const std::vector<std::vector<std::string>> cases = {
      {},
      {"--model", kLlama, "--adapter", kLlama + "/adapter", "--format", "peft"},  // no --out
      {"--model", kLlama, "--format", "peft", "--out", Path("x")},               // no input
      {"--model", kLlama, "--adapter", kLlama + "/adapter", "--version-blob", Path("v1.blob"),
       "--format", "peft", "--out", Path("x")},
      {"--model", kLlama, "--adapter", kLlama + "/adapter", "--format", "onnx", "--out", Path("x")},
      {"--model", kLlama, "--adapter", kLlama + "/adapter", "--format", "gguf-lora", "--quant",
       "q8_0", "--out", Path("x")},
      {"--model", kLlama, "--adapter", kLlama + "/adapter", "--sha256", "00", "--format", "peft",
       "--out", Path("x")},
      {"--model", kLlama, "--adapter", kLlama + "/adapter", "--format", "peft", "--out", Path("x"),
       "--bogus", "1"},
      {"--model", kLlama, "--adapter"},
  };
  for (const auto& args : cases) {
    CliResult r = Cli(args);
    EXPECT_EQ(r.code, 2) << ::testing::PrintToString(args) << r.err;
    EXPECT_THAT(r.err, HasSubstr("usage: fedlora-agent export"));
  }
  EXPECT_THAT(Cli({"--model", kLlama, "--adapter", kLlama + "/adapter", "--format",
                   "gguf-lora", "--quant", "q8_0", "--out", Path("x")})
                  .err,
              HasSubstr("--quant expected f32 or f16"));
  EXPECT_FALSE(std::filesystem::exists(Path("x")));
}

TEST_F(ExportCliTest, BadInputsNameTheFileAndWriteNothing) {
  // Wrong hash.
  CliResult r = Cli({"--model", kLlama, "--version-blob", Path("v1.blob"), "--sha256",
                     std::string(64, 'a'), "--format", "gguf-lora", "--out", Path("o.gguf")});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr(Path("v1.blob")));
  EXPECT_THAT(r.err, HasSubstr("SHA-256"));
  // Not a blob.
  ASSERT_TRUE(common::WriteFileAtomic(Path("junk.blob"), "not a blob").ok());
  r = Cli({"--model", kLlama, "--version-blob", Path("junk.blob"), "--format", "peft", "--out",
           Path("o")});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr(Path("junk.blob") + ": not a fedlora adapter blob"));
  // A blob without the alpha the scale needs.
  ASSERT_TRUE(common::WriteFileAtomic(Path("noalpha.blob"),
                                      common::EncodeAdapterBlob(adapter_.tensors,
                                                                common::Quant::kNone))
                  .ok());
  r = Cli({"--model", kLlama, "--version-blob", Path("noalpha.blob"), "--format", "peft",
           "--out", Path("o")});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("fedlora.lora.alpha"));
  // Missing files.
  r = Cli({"--model", kLlama, "--version-blob", Path("missing.blob"), "--format", "peft", "--out",
           Path("o")});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr(Path("missing.blob")));
  r = Cli({"--model", kLlama, "--adapter", Path("nope"), "--format", "peft", "--out", Path("o")});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr(Path("nope") + "/adapter_config.json"));
  // Never renamed over something that is not a file (a directory, /dev/null).
  r = Cli({"--model", kLlama, "--adapter", kLlama + "/adapter", "--format", "gguf-lora", "--out",
           dir_});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("is not a regular file"));
  EXPECT_TRUE(std::filesystem::is_directory(dir_));
  // A --model folder without weights.
  r = Cli({"--model", std::string(FEDLORA_FIXTURES) + "/hf/tok-bytelevel", "--adapter",
           kLlama + "/adapter", "--format", "gguf-merged", "--out", Path("o.gguf")});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("model.safetensors"));
  EXPECT_FALSE(std::filesystem::exists(Path("o")));
  EXPECT_FALSE(std::filesystem::exists(Path("o.gguf")));
}

}  // namespace
}  // namespace fedlora::edge
