// Interop proof: the GGUF files we write load in the real llama.cpp (through
// the @fugood/llama.node binding, driven by tests/interop/llama_cpp_check.mjs)
// and decode like the Hugging Face reference.
//
// Needs node and the npm package in $FEDLORA_INTEROP_DIR (default
// <repo>/build/interop; scripts/interop-deps.sh installs it). Missing tools
// are a FAILURE, not a skip.
//
// Checks, on the golden tiny Llama (fixtures/hf/llama; the Qwen2 fixture gets
// the f32 base and LoRA checks too):
//  - base GGUF f32 and f16: llama.cpp tokenizes the prompt to the HF ids, its
//    12 greedy tokens equal HF transformers' greedy_next_12, and its next-token
//    probabilities after the prompt equal softmax(HF logits) (|dlog p| <= 1e-3);
//  - q8_0 and q4_0 GGUFs load, generate, and stay close to those probabilities;
//  - base + LoRA GGUF adapter and the merged GGUF give the same greedy tokens
//    and the next-token probabilities of HF's logits_with_adapter / logits_merged;
//  - an rsLoRA adapter (alpha carried as alpha*sqrt(r)) equals its merge;
//  - against OUR engine: the files `fedlora-agent export` writes on a device
//    (gguf-lora, gguf-merged f32 and q8_0, from the fixture's non-zero PEFT
//    adapter and from the same adapter as a coordinator version blob) decode in
//    llama.cpp to exactly the greedy tokens of `fedlora-agent model generate
//    --adapter ... --json`, for Llama, Qwen2 and a Llama-3-RoPE-scaled Llama
//    (rope_freqs.weight), and llama.cpp refuses nothing.

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "common/export/adapter_export.h"
#include "common/export/gguf.h"
#include "common/export/gguf_llama.h"
#include "common/export/peft_export.h"
#include "common/quant/quant.h"
#include "tests/testing/hf_variants.h"

namespace fedlora::common {
namespace {

const std::string kLlamaFixture = std::string(FEDLORA_FIXTURES) + "/hf/llama";
const std::string kQwen2Fixture = std::string(FEDLORA_FIXTURES) + "/hf/qwen2";
const std::string kRepo = std::string(FEDLORA_TESTDATA) + "/../..";

std::string InteropDir() {
  const char* env = std::getenv("FEDLORA_INTEROP_DIR");
  return env != nullptr && *env != '\0' ? std::string(env) : kRepo + "/build/interop";
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string Quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'')
      out += "'\\''";
    else
      out += c;
  }
  return out + "'";
}

// GPT-2 byte-level alphabet: unicode code point -> byte.
std::map<uint32_t, uint8_t> ByteDecoder() {
  std::vector<int> bs;
  for (int b = 33; b <= 126; ++b) bs.push_back(b);
  for (int b = 161; b <= 172; ++b) bs.push_back(b);
  for (int b = 174; b <= 255; ++b) bs.push_back(b);
  std::vector<int> cs = bs;
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    if (std::find(bs.begin(), bs.end(), b) == bs.end()) {
      bs.push_back(b);
      cs.push_back(256 + n++);
    }
  }
  std::map<uint32_t, uint8_t> m;
  for (size_t i = 0; i < bs.size(); ++i)
    m[static_cast<uint32_t>(cs[i])] = static_cast<uint8_t>(bs[i]);
  return m;
}

bool ValidUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<uint8_t>(s[i]);
    size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((static_cast<uint8_t>(s[i + k]) & 0xc0) != 0x80) return false;
    }
    i += len;
  }
  return true;
}

// For each token id, the string llama.cpp's server-style formatting gives it
// (the raw bytes, or "byte: \xNN" for a lone high byte); ids whose bytes are
// not valid UTF-8 otherwise are left out (they cannot be told apart in JSON).
std::map<std::string, std::vector<int>> PieceTable(const nlohmann::json& tok) {
  const auto dec = ByteDecoder();
  std::map<std::string, std::vector<int>> table;
  auto add = [&](const std::string& piece, int id) { table[piece].push_back(id); };
  for (const auto& [text, id] : tok["model"]["vocab"].items()) {
    std::string bytes;
    bool ok = true;
    for (size_t i = 0; i < text.size();) {
      const auto c = static_cast<uint8_t>(text[i]);
      size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : 4;
      uint32_t cp = len == 1 ? c : c & (0xff >> (len + 1));
      for (size_t k = 1; k < len && i + k < text.size(); ++k) cp = (cp << 6) | (text[i + k] & 0x3f);
      i += len;
      auto it = dec.find(cp);
      if (it == dec.end()) {
        ok = false;
        break;
      }
      bytes.push_back(static_cast<char>(it->second));
    }
    if (!ok) continue;
    if (bytes.size() == 1 && (static_cast<uint8_t>(bytes[0]) & 0x80) != 0) {
      char buf[16];
      std::snprintf(buf, sizeof(buf), "byte: \\x%x", static_cast<uint8_t>(bytes[0]));
      add(buf, id.get<int>());
    } else if (ValidUtf8(bytes)) {
      add(bytes, id.get<int>());
    }
  }
  for (const auto& t : tok["added_tokens"])
    add(t["content"].get<std::string>(), t["id"].get<int>());
  return table;
}

struct LlamaRun {
  std::vector<int> prompt_ids;
  std::vector<int> ids;                           // greedy continuation
  std::vector<std::pair<int, double>> first_top;  // next-token (id, prob) after the prompt
  std::string raw;
};

// Shared by the llama and qwen2 suites (they run one after the other).
class InteropTestBase : public ::testing::Test {
 protected:
  // Converts `fixture` into the GGUF files the tests use; `full` adds the
  // f16 / quantized / rsLoRA variants.
  static void Prepare(const std::string& fixture, bool full) {
    const std::string& kFixture = fixture;
    char tmpl[] = "/tmp/fedlora_gguf_interop_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    reference_ = nlohmann::json::parse(ReadFile(kFixture + "/reference.json"));
    tokenizer_ = nlohmann::json::parse(ReadFile(kFixture + "/tokenizer.json"));
    auto adapter = ReadPeftAdapter(kFixture + "/adapter");
    ASSERT_TRUE(adapter.ok()) << adapter.status();
    adapter_ = new PeftAdapterFiles(std::move(*adapter));

    auto convert = [&](const std::string& file, GgmlType type, bool merged) {
      LlamaGgufOptions opt;
      opt.type = type;
      if (merged) {
        opt.lora = &adapter_->tensors;
        opt.lora_config = &adapter_->config;
      }
      absl::Status s = ConvertHfLlamaToGguf(kFixture, dir_ + "/" + file, opt);
      ASSERT_TRUE(s.ok()) << file << ": " << s;
    };
    convert("base-f32.gguf", GgmlType::kF32, false);
    convert("merged-f32.gguf", GgmlType::kF32, true);
    absl::Status s = ExportLoraGguf(kFixture, adapter_->tensors, adapter_->config,
                                    dir_ + "/lora-f32.gguf", GgmlType::kF32);
    ASSERT_TRUE(s.ok()) << s;
    if (!full) return;
    convert("base-f16.gguf", GgmlType::kF16, false);
    convert("base-q8_0.gguf", GgmlType::kQ8_0, false);
    convert("base-q4_0.gguf", GgmlType::kQ4_0, false);
    convert("merged-f16.gguf", GgmlType::kF16, true);
    convert("merged-q8_0.gguf", GgmlType::kQ8_0, true);
    convert("merged-q4_0.gguf", GgmlType::kQ4_0, true);
    // rsLoRA with a smaller alpha (scale 1/sqrt(4) = 0.5): the adapter GGUF must
    // express it through adapter.lora.alpha; the sequence is less degenerate
    // than with the fixture's scale of 2.
    PeftLoraConfig rs = adapter_->config;
    rs.lora_alpha = 1.0;
    rs.use_rslora = true;
    LlamaGgufOptions opt;
    opt.type = GgmlType::kF32;
    opt.lora = &adapter_->tensors;
    opt.lora_config = &rs;
    s = ConvertHfLlamaToGguf(kFixture, dir_ + "/merged-rs-f32.gguf", opt);
    ASSERT_TRUE(s.ok()) << s;
    s = ExportLoraGguf(kFixture, adapter_->tensors, rs, dir_ + "/lora-rs-f16.gguf", GgmlType::kF16);
    ASSERT_TRUE(s.ok()) << s;
  }

  static void Cleanup() {
    delete adapter_;
    adapter_ = nullptr;
    if (std::getenv("FEDLORA_KEEP_GGUF") == nullptr) {
      const std::string cmd = "rm -rf " + Quote(dir_);
      EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
    }
  }

  // Runs a command; returns its exit status and stdout+stderr.
  static int Shell(const std::string& cmd, std::string* output) {
    const std::string log = dir_ + "/shell.txt";
    const int rc = std::system((cmd + " > " + Quote(log) + " 2>&1").c_str());
    *output = ReadFile(log);
    unlink(log.c_str());
    return rc != -1 && WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  }

  static std::string Agent() { return std::string(FEDLORA_BIN_DIR) + "/fedlora-agent"; }

  // `fedlora-agent export ARGS` (the device-side export); the output in dir_.
  static void AgentExport(const std::string& args) {
    std::string out;
    const std::string cmd = Quote(Agent()) + " export " + args;
    ASSERT_EQ(Shell(cmd, &out), 0) << cmd << "\n" << out;
  }

  // Our engine's greedy continuation of the reference prompt ids.
  static void EngineGenerate(const std::string& model_dir, const std::string& adapter, int n,
                             std::vector<int>* ids) {
    std::string prompt;
    for (int id : Ints(reference_["input_ids"]))
      prompt += (prompt.empty() ? "" : ",") + std::to_string(id);
    std::string cmd = Quote(Agent()) + " model generate " + Quote(model_dir) + " --ids " + prompt +
                      " --max-new " + std::to_string(n) + " --json";
    if (!adapter.empty()) cmd += " --adapter " + Quote(adapter);
    std::string out;
    ASSERT_EQ(Shell(cmd, &out), 0) << cmd << "\n" << out;
    // The JSON is the last line (libtorch may log before it).
    const size_t start = out.rfind("{\"ids\"");
    ASSERT_NE(start, std::string::npos) << out;
    nlohmann::json j = nlohmann::json::parse(out.substr(start), nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << out;
    *ids = Ints(j["ids"]);
    ASSERT_FALSE(ids->empty()) << out;
  }

  // llama.cpp ignores eos; the engine stops at it: compare over the engine's length.
  static void ExpectSameTokens(const std::vector<int>& llama_cpp, const std::vector<int>& engine,
                               const std::string& what) {
    ASSERT_LE(engine.size(), llama_cpp.size()) << what;
    const std::vector<int> prefix(llama_cpp.begin(), llama_cpp.begin() + engine.size());
    EXPECT_EQ(prefix, engine) << what << ": llama.cpp's greedy tokens differ from our engine's";
  }

  static std::vector<int> Ints(const nlohmann::json& j) { return j.get<std::vector<int>>(); }

  // Runs llama_cpp_check.mjs; returns the exit status (-1 if it did not exit).
  static int Exec(const std::string& model, const std::string& lora, int n, std::string* out,
                  std::string* err, std::string* command) {
    const std::string interop = InteropDir();
    std::string ids;
    for (int id : Ints(reference_["input_ids"]))
      ids += (ids.empty() ? "" : ",") + std::to_string(id);
    std::string cmd = "FEDLORA_INTEROP_DIR=" + Quote(interop) + " node " +
                      Quote(kRepo + "/tests/interop/llama_cpp_check.mjs") + " --model " +
                      Quote(model) + " --ids " + ids + " --n " + std::to_string(n);
    if (!lora.empty()) cmd += " --lora " + Quote(lora);
    cmd += " > " + Quote(dir_ + "/out.json") + " 2> " + Quote(dir_ + "/err.txt");
    const int rc = std::system(cmd.c_str());
    *out = ReadFile(dir_ + "/out.json");
    *err = ReadFile(dir_ + "/err.txt");
    *command = cmd;
    return rc != -1 && WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  }

  static void CheckToolsInstalled() {
    const std::string interop = InteropDir();
    struct stat st;
    ASSERT_EQ(std::system("node --version > /dev/null 2>&1"), 0)
        << "node is not on PATH (apt-get install nodejs npm)";
    ASSERT_EQ(stat((interop + "/node_modules/@fugood/llama.node/package.json").c_str(), &st), 0)
        << "@fugood/llama.node is not installed in " << interop
        << "/node_modules: run scripts/interop-deps.sh (or set FEDLORA_INTEROP_DIR)";
  }

  // Runs llama.cpp on `model` (+ `lora`) with the reference prompt ids.
  static void Run(const std::string& model, const std::string& lora, int n, LlamaRun* run) {
    ASSERT_NO_FATAL_FAILURE(CheckToolsInstalled());
    std::string out, err, cmd;
    const std::string model_path = dir_ + "/" + model;
    const std::string lora_path = lora.empty() ? "" : dir_ + "/" + lora;
    int rc = Exec(model_path, lora_path, n, &out, &err, &cmd);
    // @fugood/llama.node 1.7.15 occasionally dies with a signal after (or
    // during) otherwise successful work; such a run is retried once. A refused
    // file never is: llama.cpp reports "failed to load" / "error loading".
    const bool refused = (out + err).find("error loading model") != std::string::npos ||
                         (out + err).find("failed to load") != std::string::npos;
    if (rc > 128 && !refused) {
      std::cerr << "llama.cpp run of " << model << " died (status " << rc << "); retrying once\n";
      rc = Exec(model_path, lora_path, n, &out, &err, &cmd);
    }
    ASSERT_EQ(rc, 0) << "llama.cpp run failed for " << model << (lora.empty() ? "" : " + " + lora)
                     << "\ncommand: " << cmd << "\nstderr (tail): "
                     << err.substr(err.size() > 4000 ? err.size() - 4000 : 0);
    const std::string kMarker = "\nFEDLORA_LLAMA_CPP_RESULT ";
    const size_t at = out.rfind(kMarker);
    ASSERT_NE(at, std::string::npos) << "no result line in: " << out;
    const std::string line = out.substr(at + kMarker.size());
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << "not JSON: " << line;
    run->raw = line;
    run->prompt_ids = Ints(j["prompt_ids"]);
    ASSERT_EQ(j["pieces"].size(), static_cast<size_t>(n)) << out;
    static const auto table = PieceTable(tokenizer_);
    for (const auto& p : j["pieces"]) {
      auto it = table.find(p.get<std::string>());
      ASSERT_TRUE(it != table.end() && it->second.size() == 1)
          << "cannot map llama.cpp's piece " << p.dump() << " to one token id";
      run->ids.push_back(it->second[0]);
    }
    ASSERT_FALSE(j["first_top"].empty()) << line;
    for (const auto& p : j["first_top"]) {
      auto it = table.find(p[0].get<std::string>());
      ASSERT_TRUE(it != table.end() && it->second.size() == 1)
          << "cannot map llama.cpp's piece " << p[0].dump() << " to one token id";
      run->first_top.emplace_back(it->second[0], p[1].get<double>());
    }
  }

  // llama.cpp's next-token probabilities after the prompt against softmax of
  // the reference logits' last row: |log p - log p_ref| <= tol for each of
  // llama.cpp's top candidates.
  static void ExpectFirstStepMatches(const LlamaRun& run, const nlohmann::json& logits, double tol,
                                     const std::string& what) {
    const auto row = logits.back().get<std::vector<double>>();
    double mx = row[0];
    for (double v : row) mx = std::max(mx, v);
    double sum = 0;
    for (double v : row) sum += std::exp(v - mx);
    for (const auto& [id, p] : run.first_top) {
      ASSERT_GE(id, 0);
      ASSERT_LT(static_cast<size_t>(id), row.size());
      const double ref = std::exp(row[id] - mx) / sum;
      EXPECT_NEAR(std::log(p), std::log(ref), tol)
          << what << ": token " << id << " llama.cpp p=" << p << " reference p=" << ref;
    }
  }

  static int ArgmaxLastRow(const nlohmann::json& logits) {
    const auto& row = logits.back();
    int best = 0;
    for (size_t i = 1; i < row.size(); ++i) {
      if (row[i].get<double>() > row[best].get<double>()) best = static_cast<int>(i);
    }
    return best;
  }

  static std::string dir_;
  static nlohmann::json reference_;
  static nlohmann::json tokenizer_;
  static PeftAdapterFiles* adapter_;
};

std::string InteropTestBase::dir_;
nlohmann::json InteropTestBase::reference_;
nlohmann::json InteropTestBase::tokenizer_;
PeftAdapterFiles* InteropTestBase::adapter_ = nullptr;

class LlamaCppInteropTest : public InteropTestBase {
 protected:
  static void SetUpTestSuite() { Prepare(kLlamaFixture, /*full=*/true); }
  static void TearDownTestSuite() { Cleanup(); }
};

class Qwen2LlamaCppInteropTest : public InteropTestBase {
 protected:
  static void SetUpTestSuite() { Prepare(kQwen2Fixture, /*full=*/false); }
  static void TearDownTestSuite() { Cleanup(); }
};

// The harness really fails when llama.cpp refuses a file.
TEST_F(LlamaCppInteropTest, TruncatedFileIsRefused) {
  ASSERT_NO_FATAL_FAILURE(CheckToolsInstalled());
  const std::string full = ReadFile(dir_ + "/base-f32.gguf");
  ASSERT_GT(full.size(), 4096u);
  const std::string cut = dir_ + "/truncated.gguf";
  {
    std::ofstream f(cut, std::ios::binary);
    f << full.substr(0, full.size() / 2);
  }
  std::string out, err, cmd;
  const int rc = Exec(cut, "", 4, &out, &err, &cmd);
  unlink(cut.c_str());
  EXPECT_NE(rc, 0) << out;
  EXPECT_EQ(out.find("FEDLORA_LLAMA_CPP_RESULT"), std::string::npos);
  EXPECT_NE((out + err).find("error loading model"), std::string::npos) << err;
}

// A checkpoint whose tokenizer uses the plain GPT-2 byte-level regex (as the
// simulator's make-model writes) must load: llama.cpp only knows the
// pre-tokenizer by the name "gpt-2".
TEST_F(LlamaCppInteropTest, Gpt2PreTokenizerModelLoads) {
  ASSERT_NO_FATAL_FAILURE(CheckToolsInstalled());
  const std::string model_dir = dir_ + "/gpt2-pre";
  ASSERT_EQ(mkdir(model_dir.c_str(), 0755), 0);
  for (const char* f : {"config.json", "model.safetensors"}) {
    std::ofstream(model_dir + "/" + f, std::ios::binary) << ReadFile(kLlamaFixture + "/" + f);
  }
  nlohmann::json tok = nlohmann::json::parse(ReadFile(kLlamaFixture + "/tokenizer.json"));
  tok["pre_tokenizer"] = {{"type", "ByteLevel"},
                          {"add_prefix_space", false},
                          {"trim_offsets", true},
                          {"use_regex", true}};
  std::ofstream(model_dir + "/tokenizer.json") << tok.dump();
  LlamaGgufOptions opt;
  opt.type = GgmlType::kF32;
  const std::string gguf = dir_ + "/gpt2-pre-f32.gguf";
  absl::Status s = ConvertHfLlamaToGguf(model_dir, gguf, opt);
  ASSERT_TRUE(s.ok()) << s;
  std::string out, err, cmd;
  const int rc = Exec(gguf, "", 4, &out, &err, &cmd);
  EXPECT_EQ(rc, 0) << cmd << "\n" << err.substr(err.size() > 2000 ? err.size() - 2000 : 0);
  EXPECT_NE(out.find("FEDLORA_LLAMA_CPP_RESULT"), std::string::npos) << out;
}

TEST_F(LlamaCppInteropTest, BaseF32MatchesHfGreedy) {
  LlamaRun run;
  ASSERT_NO_FATAL_FAILURE(Run("base-f32.gguf", "", 12, &run));
  EXPECT_EQ(run.prompt_ids, Ints(reference_["input_ids"])) << "llama.cpp tokenized differently";
  EXPECT_EQ(run.ids, Ints(reference_["greedy_next_12"])) << run.raw;
  ExpectFirstStepMatches(run, reference_["logits"], 1e-3, "base f32");
}

TEST_F(LlamaCppInteropTest, BaseF16MatchesHfGreedy) {
  LlamaRun run;
  ASSERT_NO_FATAL_FAILURE(Run("base-f16.gguf", "", 12, &run));
  EXPECT_EQ(run.prompt_ids, Ints(reference_["input_ids"]));
  EXPECT_EQ(run.ids, Ints(reference_["greedy_next_12"])) << run.raw;
  ExpectFirstStepMatches(run, reference_["logits"], 1e-3, "base f16");
}

TEST_F(LlamaCppInteropTest, QuantizedModelsLoadAndGenerate) {
  const int first = Ints(reference_["greedy_next_12"])[0];
  for (const char* model : {"base-q8_0.gguf", "base-q4_0.gguf"}) {
    LlamaRun run;
    ASSERT_NO_FATAL_FAILURE(Run(model, "", 12, &run)) << model;
    EXPECT_EQ(run.prompt_ids, Ints(reference_["input_ids"])) << model;
    EXPECT_EQ(run.ids.size(), 12u) << model;
    if (std::string(model) == "base-q8_0.gguf") {
      EXPECT_EQ(run.ids[0], first) << "q8_0 first greedy token differs from HF: " << run.raw;
      ExpectFirstStepMatches(run, reference_["logits"], 1e-2, model);
    } else {
      // 4-bit weights: probabilities within ~10% of the fp32 reference.
      ExpectFirstStepMatches(run, reference_["logits"], 0.1, model);
    }
  }
}

TEST_F(LlamaCppInteropTest, LoraAdapterMatchesMergedModelAndHf) {
  LlamaRun with_lora, merged, merged16;
  ASSERT_NO_FATAL_FAILURE(Run("base-f32.gguf", "lora-f32.gguf", 12, &with_lora));
  ASSERT_NO_FATAL_FAILURE(Run("merged-f32.gguf", "", 12, &merged));
  ASSERT_NO_FATAL_FAILURE(Run("merged-f16.gguf", "", 12, &merged16));
  EXPECT_EQ(with_lora.ids, merged.ids) << with_lora.raw << "\n" << merged.raw;
  EXPECT_EQ(merged16.ids, merged.ids) << merged16.raw << "\n" << merged.raw;
  // The adapter really changes the model, and in the direction HF computed.
  EXPECT_NE(merged.ids, Ints(reference_["greedy_next_12"]));
  EXPECT_EQ(merged.ids[0], ArgmaxLastRow(reference_["logits_with_adapter"]));
  EXPECT_EQ(with_lora.ids[0], ArgmaxLastRow(reference_["logits_merged"]));
  ExpectFirstStepMatches(with_lora, reference_["logits_with_adapter"], 1e-3, "base + LoRA GGUF");
  ExpectFirstStepMatches(merged, reference_["logits_merged"], 1e-3, "merged f32");
  ExpectFirstStepMatches(merged16, reference_["logits_merged"], 1e-2, "merged f16");
  // The merged model quantized: loads, generates, stays near HF's merged logits.
  for (const auto& [model, tol] : {std::pair<const char*, double>{"merged-q8_0.gguf", 1e-2},
                                   std::pair<const char*, double>{"merged-q4_0.gguf", 0.1}}) {
    LlamaRun q;
    ASSERT_NO_FATAL_FAILURE(Run(model, "", 12, &q));
    EXPECT_EQ(q.ids.size(), 12u);
    ExpectFirstStepMatches(q, reference_["logits_merged"], tol, model);
  }
}

TEST_F(LlamaCppInteropTest, RsLoraAdapterMatchesMergedModel) {
  LlamaRun with_lora, merged, fixture_merged;
  ASSERT_NO_FATAL_FAILURE(Run("base-f32.gguf", "lora-rs-f16.gguf", 12, &with_lora));
  ASSERT_NO_FATAL_FAILURE(Run("merged-rs-f32.gguf", "", 12, &merged));
  ASSERT_NO_FATAL_FAILURE(Run("merged-f32.gguf", "", 12, &fixture_merged));
  EXPECT_EQ(with_lora.ids, merged.ids) << with_lora.raw << "\n" << merged.raw;
  ASSERT_EQ(with_lora.first_top.size(), merged.first_top.size());
  for (size_t i = 0; i < merged.first_top.size(); ++i) {
    EXPECT_EQ(with_lora.first_top[i].first, merged.first_top[i].first) << i;
    EXPECT_NEAR(std::log(with_lora.first_top[i].second), std::log(merged.first_top[i].second), 1e-3)
        << "token " << merged.first_top[i].first;
  }
  // A different scale gives a different model: the alpha really is applied.
  EXPECT_NE(merged.ids, fixture_merged.ids);
  EXPECT_NE(merged.ids, Ints(reference_["greedy_next_12"]));
}

// The device-side export (`fedlora-agent export`) of the fixture's non-zero
// adapter, loaded by llama.cpp, decodes exactly like our engine running the
// same adapter (`fedlora-agent model generate --adapter --json`).
TEST_F(LlamaCppInteropTest, AgentExportsDecodeLikeOurEngine) {
  const std::string adapter = kLlamaFixture + "/adapter";
  const std::string from_dir = "--model " + Quote(kLlamaFixture) + " --adapter " + Quote(adapter);
  ASSERT_NO_FATAL_FAILURE(
      AgentExport(from_dir + " --format gguf-lora --out " + Quote(dir_ + "/agent-lora.gguf")));
  ASSERT_NO_FATAL_FAILURE(AgentExport(from_dir + " --format gguf-merged --quant f32 --out " +
                                      Quote(dir_ + "/agent-merged-f32.gguf")));
  ASSERT_NO_FATAL_FAILURE(AgentExport(from_dir + " --format gguf-merged --quant q8_0 --out " +
                                      Quote(dir_ + "/agent-merged-q8_0.gguf")));
  // The same adapter as the coordinator publishes it (f32 blob: lossless).
  const std::string blob = EncodeAdapterBlob(
      adapter_->tensors, Quant::kNone,
      {{kBlobLoraAlphaKey, "8"}, {kBlobLoraRankKey, "4"}});
  const std::string blob_path = dir_ + "/version.blob";
  std::ofstream(blob_path, std::ios::binary) << blob;
  ASSERT_NO_FATAL_FAILURE(AgentExport("--model " + Quote(kLlamaFixture) + " --version-blob " +
                                      Quote(blob_path) + " --format gguf-lora --out " +
                                      Quote(dir_ + "/agent-blob-lora.gguf")));

  std::vector<int> engine, engine_base;
  ASSERT_NO_FATAL_FAILURE(EngineGenerate(kLlamaFixture, adapter, 12, &engine));
  ASSERT_NO_FATAL_FAILURE(EngineGenerate(kLlamaFixture, "", 12, &engine_base));
  // The adapter changes the continuation: equality below is not the base model's.
  ASSERT_NE(engine, engine_base);

  LlamaRun base, lora, merged, merged_q8, blob_lora;
  ASSERT_NO_FATAL_FAILURE(Run("base-f32.gguf", "", 12, &base));
  ASSERT_NO_FATAL_FAILURE(Run("base-f32.gguf", "agent-lora.gguf", 12, &lora));
  ASSERT_NO_FATAL_FAILURE(Run("agent-merged-f32.gguf", "", 12, &merged));
  ASSERT_NO_FATAL_FAILURE(Run("agent-merged-q8_0.gguf", "", 12, &merged_q8));
  ASSERT_NO_FATAL_FAILURE(Run("base-f32.gguf", "agent-blob-lora.gguf", 12, &blob_lora));
  EXPECT_EQ(lora.prompt_ids, Ints(reference_["input_ids"]));
  ExpectSameTokens(base.ids, engine_base, "base f32 vs engine without adapter");
  ExpectSameTokens(lora.ids, engine, "base f32 + agent gguf-lora");
  ExpectSameTokens(merged.ids, engine, "agent gguf-merged f32");
  ExpectSameTokens(merged_q8.ids, engine, "agent gguf-merged q8_0");
  ExpectSameTokens(blob_lora.ids, engine, "base f32 + gguf-lora exported from a version blob");
}

// Llama-3 RoPE scaling: the GGUF carries rope_freqs.weight, llama.cpp loads it
// and decodes like our engine on the same checkpoint (base and merged adapter),
// and the scaling really changes the model.
TEST_F(LlamaCppInteropTest, Llama3RopeScaledModelDecodesLikeOurEngine) {
  const std::string model_dir = dir_ + "/llama3";
  ASSERT_EQ(mkdir(model_dir.c_str(), 0755), 0);
  for (const char* f : {"model.safetensors", "tokenizer.json", "generation_config.json"}) {
    std::ofstream(model_dir + "/" + f, std::ios::binary) << ReadFile(kLlamaFixture + "/" + f);
  }
  // head_dim 16: wavelengths 6.3, 19.9, 62.8 ... 19869; original context 32
  // with low/high factors 1/4 keeps the shortest, blends the next and divides
  // the other six by the factor, so the 24-token prompt already sees it.
  nlohmann::json cfg = nlohmann::json::parse(ReadFile(kLlamaFixture + "/config.json"));
  cfg["rope_parameters"] = {{"rope_type", "llama3"},          {"rope_theta", 10000.0},
                            {"factor", 8.0},                   {"low_freq_factor", 1.0},
                            {"high_freq_factor", 4.0},         {"original_max_position_embeddings", 32}};
  std::ofstream(model_dir + "/config.json") << cfg.dump(2);
  LlamaGgufOptions opt;
  opt.type = GgmlType::kF32;
  absl::Status s = ConvertHfLlamaToGguf(model_dir, dir_ + "/llama3-base.gguf", opt);
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_NO_FATAL_FAILURE(AgentExport("--model " + Quote(model_dir) + " --adapter " +
                                      Quote(kLlamaFixture + "/adapter") +
                                      " --format gguf-merged --quant f32 --out " +
                                      Quote(dir_ + "/llama3-merged.gguf")));
  for (const char* f : {"llama3-base.gguf", "llama3-merged.gguf"}) {
    auto gguf = GgufFile::Open(dir_ + "/" + f);
    ASSERT_TRUE(gguf.ok()) << gguf.status();
    const GgufTensorInfo* t = (*gguf)->FindTensor("rope_freqs.weight");
    ASSERT_NE(t, nullptr) << f;
    EXPECT_EQ(t->ne, (std::vector<int64_t>{8})) << f;
  }
  std::vector<int> engine_base, engine_merged;
  ASSERT_NO_FATAL_FAILURE(EngineGenerate(model_dir, "", 12, &engine_base));
  ASSERT_NO_FATAL_FAILURE(EngineGenerate(model_dir, kLlamaFixture + "/adapter", 12, &engine_merged));
  LlamaRun base, merged, unscaled;
  ASSERT_NO_FATAL_FAILURE(Run("llama3-base.gguf", "", 12, &base));
  ASSERT_NO_FATAL_FAILURE(Run("llama3-merged.gguf", "", 12, &merged));
  ASSERT_NO_FATAL_FAILURE(Run("base-f32.gguf", "", 12, &unscaled));
  ExpectSameTokens(base.ids, engine_base, "llama3-scaled base");
  ExpectSameTokens(merged.ids, engine_merged, "llama3-scaled merged adapter");
  // Same weights, other RoPE: llama.cpp's next-token distribution moves.
  double max_diff = 0;
  for (const auto& [id, p] : base.first_top) {
    for (const auto& [uid, up] : unscaled.first_top) {
      if (uid == id) max_diff = std::max(max_diff, std::abs(std::log(p) - std::log(up)));
    }
  }
  EXPECT_GT(max_diff, 1e-3) << base.raw << "\n" << unscaled.raw;
}

// Mistral and Phi-3: the Llama fixture rewritten in their layouts (same math;
// Phi-3 with fused qkv_proj / gate_up_proj) converts to GGUF (llama.cpp's
// llama and phi3 architectures), and llama.cpp -- an implementation of both
// independent of ours -- reproduces the Hugging Face Llama reference and our
// engine's greedy tokens on the variant.
TEST_F(LlamaCppInteropTest, MistralAndPhi3LayoutsDecodeLikeHfAndOurEngine) {
  struct Variant {
    const char* name;
    const char* arch;
    const char* model_type;
    bool fuse;
    const char* gguf_arch;
  };
  for (const Variant& v : {Variant{"mistral", "MistralForCausalLM", "mistral", false, "llama"},
                           Variant{"phi3", "Phi3ForCausalLM", "phi3", true, "phi3"}}) {
    SCOPED_TRACE(v.name);
    const std::string model_dir = dir_ + "/" + v.name;
    ASSERT_EQ(mkdir(model_dir.c_str(), 0755), 0);
    for (const char* f : {"tokenizer.json", "generation_config.json"}) {
      std::ofstream(model_dir + "/" + f, std::ios::binary) << ReadFile(kLlamaFixture + "/" + f);
    }
    ASSERT_NO_FATAL_FAILURE(testutil::WriteArchitectureVariant(kLlamaFixture, model_dir, v.arch,
                                                               v.model_type, v.fuse, 0));
    LlamaGgufOptions opt;
    opt.type = GgmlType::kF32;
    const std::string gguf_name = std::string(v.name) + "-f32.gguf";
    absl::Status s = ConvertHfLlamaToGguf(model_dir, dir_ + "/" + gguf_name, opt);
    ASSERT_TRUE(s.ok()) << s;
    auto gguf = GgufFile::Open(dir_ + "/" + gguf_name);
    ASSERT_TRUE(gguf.ok()) << gguf.status();
    EXPECT_EQ((*gguf)->GetString("general.architecture").value_or(""), v.gguf_arch);
    if (v.fuse) {
      ASSERT_NE((*gguf)->FindTensor("blk.1.attn_qkv.weight"), nullptr);
      EXPECT_EQ((*gguf)->FindTensor("blk.1.attn_q.weight"), nullptr);
      const GgufTensorInfo* up = (*gguf)->FindTensor("blk.1.ffn_up.weight");
      const GgufTensorInfo* down = (*gguf)->FindTensor("blk.1.ffn_down.weight");
      ASSERT_TRUE(up != nullptr && down != nullptr);
      EXPECT_EQ(up->ne[1], 2 * down->ne[0]);  // [gate; up] rows: twice the FFN width
    }
    LlamaRun run;
    ASSERT_NO_FATAL_FAILURE(Run(gguf_name, "", 12, &run));
    EXPECT_EQ(run.prompt_ids, Ints(reference_["input_ids"]));
    EXPECT_EQ(run.ids, Ints(reference_["greedy_next_12"])) << run.raw;
    ExpectFirstStepMatches(run, reference_["logits"], 1e-3, v.name);
    std::vector<int> engine;
    ASSERT_NO_FATAL_FAILURE(EngineGenerate(model_dir, "", 12, &engine));
    ExpectSameTokens(run.ids, engine, std::string(v.name) + " layout");
  }

  // A LoRA adapter on Phi-3's fused modules (qkv_proj, gate_up_proj), exported
  // by the agent as a GGUF adapter and merged: llama.cpp decodes both like our
  // engine running the PEFT adapter, and unlike the base model.
  const std::string phi3 = dir_ + "/phi3";
  nlohmann::json cfg = nlohmann::json::parse(ReadFile(phi3 + "/config.json"));
  const int64_t hidden = cfg["hidden_size"], inter = cfg["intermediate_size"];
  const int64_t head_dim = hidden / cfg["num_attention_heads"].get<int64_t>();
  const int64_t qkv_rows = hidden + 2 * cfg["num_key_value_heads"].get<int64_t>() * head_dim;
  PeftLoraConfig lora;
  lora.r = 4;
  lora.lora_alpha = 8;
  lora.target_modules = {"qkv_proj", "gate_up_proj"};
  TensorMap adapter;
  uint32_t state = 12345;
  auto random = [&](std::vector<int64_t> shape, float amp) {
    HostTensor t;
    t.shape = shape;
    t.data.resize(static_cast<size_t>(shape[0] * shape[1]));
    for (float& x : t.data) {
      state = state * 1664525u + 1013904223u;
      x = amp * (static_cast<float>(state >> 8) / 16777216.0f - 0.5f);
    }
    return t;
  };
  for (int layer = 0; layer < cfg["num_hidden_layers"].get<int>(); ++layer) {
    const std::string p = "base_model.model.model.layers." + std::to_string(layer) + ".";
    adapter[p + "self_attn.qkv_proj.lora_A.weight"] = random({4, hidden}, 0.6f);
    adapter[p + "self_attn.qkv_proj.lora_B.weight"] = random({qkv_rows, 4}, 0.6f);
    adapter[p + "mlp.gate_up_proj.lora_A.weight"] = random({4, hidden}, 0.6f);
    adapter[p + "mlp.gate_up_proj.lora_B.weight"] = random({2 * inter, 4}, 0.6f);
  }
  const std::string adapter_dir = dir_ + "/phi3-adapter";
  ASSERT_TRUE(WritePeftAdapter(adapter_dir, adapter, lora).ok());
  const std::string from = "--model " + Quote(phi3) + " --adapter " + Quote(adapter_dir);
  ASSERT_NO_FATAL_FAILURE(
      AgentExport(from + " --format gguf-lora --out " + Quote(dir_ + "/phi3-lora.gguf")));
  ASSERT_NO_FATAL_FAILURE(AgentExport(from + " --format gguf-merged --quant f32 --out " +
                                      Quote(dir_ + "/phi3-merged.gguf")));
  auto lora_gguf = GgufFile::Open(dir_ + "/phi3-lora.gguf");
  ASSERT_TRUE(lora_gguf.ok()) << lora_gguf.status();
  EXPECT_EQ((*lora_gguf)->GetString("general.architecture").value_or(""), "phi3");
  EXPECT_NE((*lora_gguf)->FindTensor("blk.0.attn_qkv.weight.lora_b"), nullptr);
  EXPECT_NE((*lora_gguf)->FindTensor("blk.1.ffn_up.weight.lora_a"), nullptr);
  std::vector<int> engine;
  ASSERT_NO_FATAL_FAILURE(EngineGenerate(phi3, adapter_dir, 12, &engine));
  LlamaRun with_lora, merged;
  ASSERT_NO_FATAL_FAILURE(Run("phi3-f32.gguf", "phi3-lora.gguf", 12, &with_lora));
  ASSERT_NO_FATAL_FAILURE(Run("phi3-merged.gguf", "", 12, &merged));
  ExpectSameTokens(with_lora.ids, engine, "phi3 base + gguf-lora");
  ExpectSameTokens(merged.ids, engine, "phi3 gguf-merged");
  EXPECT_NE(engine, Ints(reference_["greedy_next_12"])) << "the adapter changed nothing";
}

TEST_F(Qwen2LlamaCppInteropTest, BaseMatchesHf) {
  LlamaRun run;
  ASSERT_NO_FATAL_FAILURE(Run("base-f32.gguf", "", 12, &run));
  EXPECT_EQ(run.prompt_ids, Ints(reference_["input_ids"]));
  EXPECT_EQ(run.ids, Ints(reference_["greedy_next_12"])) << run.raw;
  ExpectFirstStepMatches(run, reference_["logits"], 1e-3, "qwen2 base f32");
}

TEST_F(Qwen2LlamaCppInteropTest, LoraAdapterMatchesMergedModelAndHf) {
  LlamaRun with_lora, merged;
  ASSERT_NO_FATAL_FAILURE(Run("base-f32.gguf", "lora-f32.gguf", 12, &with_lora));
  ASSERT_NO_FATAL_FAILURE(Run("merged-f32.gguf", "", 12, &merged));
  EXPECT_EQ(with_lora.ids, merged.ids) << with_lora.raw << "\n" << merged.raw;
  ExpectFirstStepMatches(with_lora, reference_["logits_with_adapter"], 1e-3,
                         "qwen2 base + LoRA GGUF");
  ExpectFirstStepMatches(merged, reference_["logits_merged"], 1e-3, "qwen2 merged f32");
  // Our engine with the same adapter decodes the same tokens.
  std::vector<int> engine;
  ASSERT_NO_FATAL_FAILURE(EngineGenerate(kQwen2Fixture, kQwen2Fixture + "/adapter", 12, &engine));
  ExpectSameTokens(with_lora.ids, engine, "qwen2 base + LoRA GGUF");
  ExpectSameTokens(merged.ids, engine, "qwen2 merged f32");
}

}  // namespace
}  // namespace fedlora::common
