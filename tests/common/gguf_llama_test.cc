#include "common/export/gguf_llama.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "common/export/gguf.h"
#include "common/export/peft_export.h"
#include "common/tensor/tensor.h"
#include "tests/testing/test_util.h"

namespace fedlora::common {
namespace {

using ::fedlora::testutil::StatusIs;

using ::testing::HasSubstr;

const std::string kLlama = std::string(FEDLORA_FIXTURES) + "/hf/llama";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
}

// A writable copy of the fixture whose files a test may edit.
class FixtureCopy {
 public:
  FixtureCopy() {
    char tmpl[] = "/tmp/gguf_llama_test_XXXXXX";
    dir_ = mkdtemp(tmpl);
    for (const char* f : {"config.json", "model.safetensors", "tokenizer.json"}) {
      WriteFile(dir_ + "/" + f, ReadFile(kLlama + "/" + f));
    }
  }
  ~FixtureCopy() { std::system(("rm -rf '" + dir_ + "'").c_str()); }
  const std::string& dir() const { return dir_; }
  void EditJson(const std::string& file, const std::function<void(nlohmann::json*)>& edit) {
    nlohmann::json j = nlohmann::json::parse(ReadFile(dir_ + "/" + file));
    edit(&j);
    WriteFile(dir_ + "/" + file, j.dump());
  }

 private:
  std::string dir_;
};

TensorMap FixtureWeights() {
  auto st = SafetensorsFile::Open(kLlama + "/model.safetensors");
  EXPECT_TRUE(st.ok()) << st.status();
  auto m = (*st)->ToTensorMap();
  EXPECT_TRUE(m.ok());
  return *m;
}

PeftAdapterFiles FixtureAdapter() {
  auto a = ReadPeftAdapter(kLlama + "/adapter");
  EXPECT_TRUE(a.ok()) << a.status();
  return *a;
}

HostTensor Host(const GgufFile& f, const std::string& name) {
  const GgufTensorInfo* t = f.FindTensor(name);
  EXPECT_NE(t, nullptr) << name;
  if (t == nullptr) return {};
  auto h = f.ToHost(*t);
  EXPECT_TRUE(h.ok()) << h.status();
  return *h;
}

std::unique_ptr<GgufFile> Parse(const GgufWriter& w) {
  auto f = GgufFile::FromBytes(w.Serialize(), "built");
  EXPECT_TRUE(f.ok()) << f.status();
  return f.ok() ? std::move(*f) : nullptr;
}

TEST(GgufLlamaTest, PermuteQkRowsInterleavesHalves) {
  // Two heads of size 4, one column: row r holds value r.
  HostTensor w;
  w.shape = {8, 1};
  w.data = {0, 1, 2, 3, 4, 5, 6, 7};
  auto p = PermuteQkRows(w, 2);
  ASSERT_TRUE(p.ok());
  // Within a head, HF's halves [x0 x1 | y0 y1] become pairs [x0 y0 x1 y1].
  EXPECT_EQ(p->data, (std::vector<float>{0, 2, 1, 3, 4, 6, 5, 7}));
  // Whole rows move.
  HostTensor w2;
  w2.shape = {4, 2};
  w2.data = {0, 10, 1, 11, 2, 12, 3, 13};
  auto p2 = PermuteQkRows(w2, 1);
  ASSERT_TRUE(p2.ok());
  EXPECT_EQ(p2->data, (std::vector<float>{0, 10, 2, 12, 1, 11, 3, 13}));
  EXPECT_THAT(PermuteQkRows(w, 3).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("n_head 3")));
}

TEST(GgufLlamaTest, TensorNamesFollowLlamaCpp) {
  EXPECT_EQ(*LlamaGgufTensorName("model.embed_tokens.weight"), "token_embd.weight");
  EXPECT_EQ(*LlamaGgufTensorName("model.norm.weight"), "output_norm.weight");
  EXPECT_EQ(*LlamaGgufTensorName("lm_head.weight"), "output.weight");
  EXPECT_EQ(*LlamaGgufTensorName("model.layers.11.self_attn.o_proj.weight"),
            "blk.11.attn_output.weight");
  EXPECT_EQ(*LlamaGgufTensorName("model.layers.0.mlp.gate_proj.weight"), "blk.0.ffn_gate.weight");
  EXPECT_EQ(*LlamaGgufTensorName("model.layers.3.post_attention_layernorm.weight"),
            "blk.3.ffn_norm.weight");
  EXPECT_EQ(LlamaGgufTensorName("model.layers.x.mlp.up_proj.weight").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(*LlamaGgufTensorName("model.layers.0.self_attn.q_proj.bias"), "blk.0.attn_q.bias");
  EXPECT_EQ(LlamaGgufTensorName("model.layers.0.self_attn.o_proj.bias").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(GgufLlamaTest, MergeLoraAddsScaledProduct) {
  TensorMap base = FixtureWeights();
  const TensorMap orig = base;
  PeftAdapterFiles a = FixtureAdapter();
  ASSERT_TRUE(MergeLora(&base, a.tensors, a.config).ok());
  const std::string m = "model.layers.1.self_attn.k_proj";
  const HostTensor& A = a.tensors.at("base_model.model." + m + ".lora_A.weight");  // [4, 64]
  const HostTensor& B = a.tensors.at("base_model.model." + m + ".lora_B.weight");  // [32, 4]
  const HostTensor& W0 = orig.at(m + ".weight");
  const HostTensor& W = base.at(m + ".weight");
  for (int o : {0, 7, 31}) {
    for (int i : {0, 33, 63}) {
      double d = 0;
      for (int k = 0; k < 4; ++k) d += static_cast<double>(B.data[o * 4 + k]) * A.data[k * 64 + i];
      EXPECT_NEAR(W.data[o * 64 + i], W0.data[o * 64 + i] + 2.0 * d, 1e-5) << o << "," << i;
    }
  }
  EXPECT_EQ(base.at("model.norm.weight").data, orig.at("model.norm.weight").data);
  // A base without the module fails with the module named.
  TensorMap partial = orig;
  partial.erase(m + ".weight");
  EXPECT_THAT(MergeLora(&partial, a.tensors, a.config),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(m)));
}

TEST(GgufLlamaTest, BaseModelMetadataAndTensors) {
  LlamaGgufOptions opt;
  opt.type = GgmlType::kF32;
  auto w = BuildLlamaGguf(kLlama, opt);
  ASSERT_TRUE(w.ok()) << w.status();
  auto f = Parse(*w);
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(*f->GetString("general.architecture"), "llama");
  EXPECT_EQ(*f->GetUint("general.file_type"), 0u);
  EXPECT_EQ(*f->GetUint("llama.block_count"), 2u);
  EXPECT_EQ(*f->GetUint("llama.embedding_length"), 64u);
  EXPECT_EQ(*f->GetUint("llama.feed_forward_length"), 176u);
  EXPECT_EQ(*f->GetUint("llama.attention.head_count"), 4u);
  EXPECT_EQ(*f->GetUint("llama.attention.head_count_kv"), 2u);
  EXPECT_EQ(*f->GetUint("llama.rope.dimension_count"), 16u);
  EXPECT_EQ(*f->GetUint("llama.context_length"), 256u);
  EXPECT_EQ(*f->GetUint("llama.vocab_size"), 600u);
  EXPECT_FLOAT_EQ(static_cast<float>(*f->GetFloat("llama.rope.freq_base")), 10000.0f);
  EXPECT_FLOAT_EQ(static_cast<float>(*f->GetFloat("llama.attention.layer_norm_rms_epsilon")),
                  1e-5f);
  EXPECT_EQ(f->Find("llama.rope.freq_base")->type(), GgufType::kFloat32);
  EXPECT_EQ(*f->GetString("tokenizer.ggml.model"), "gpt2");
  EXPECT_EQ(*f->GetString("tokenizer.ggml.pre"), "llama-bpe");
  const GgufValue* tokens = f->Find("tokenizer.ggml.tokens");
  ASSERT_NE(tokens, nullptr);
  ASSERT_EQ(tokens->items().size(), 600u);
  EXPECT_EQ(tokens->items()[0].str(), "<|begin_of_text|>");
  EXPECT_EQ(tokens->items()[16].str(), ".");
  const GgufValue* types = f->Find("tokenizer.ggml.token_type");
  ASSERT_EQ(types->items().size(), 600u);
  EXPECT_EQ(types->elem_type(), GgufType::kInt32);
  EXPECT_EQ(types->items()[0].as_i64(), 3);   // control
  EXPECT_EQ(types->items()[16].as_i64(), 1);  // normal
  const GgufValue* merges = f->Find("tokenizer.ggml.merges");
  ASSERT_EQ(merges->items().size(), 341u);
  EXPECT_EQ(merges->items()[0].str(), "Ġ Ġ");
  EXPECT_EQ(*f->GetUint("tokenizer.ggml.bos_token_id"), 1u);
  EXPECT_EQ(*f->GetUint("tokenizer.ggml.eos_token_id"), 2u);
  EXPECT_FALSE(f->Find("tokenizer.ggml.add_bos_token")->as_bool());

  EXPECT_EQ(f->tensors().size(), 2u * 9 + 3);
  EXPECT_EQ(f->tensors().front().name, "token_embd.weight");
  EXPECT_EQ(f->FindTensor("token_embd.weight")->ne, (std::vector<int64_t>{64, 600}));
  EXPECT_EQ(f->FindTensor("blk.1.ffn_down.weight")->ne, (std::vector<int64_t>{176, 64}));
  EXPECT_EQ(f->FindTensor("blk.0.attn_k.weight")->ne, (std::vector<int64_t>{64, 32}));

  const TensorMap hf = FixtureWeights();
  EXPECT_EQ(Host(*f, "output.weight").data, hf.at("lm_head.weight").data);
  EXPECT_EQ(Host(*f, "blk.0.attn_v.weight").data,
            hf.at("model.layers.0.self_attn.v_proj.weight").data);
  EXPECT_EQ(Host(*f, "blk.1.ffn_norm.weight").data,
            hf.at("model.layers.1.post_attention_layernorm.weight").data);
  EXPECT_EQ(Host(*f, "blk.0.attn_q.weight").data,
            PermuteQkRows(hf.at("model.layers.0.self_attn.q_proj.weight"), 4)->data);
  EXPECT_EQ(Host(*f, "blk.1.attn_k.weight").data,
            PermuteQkRows(hf.at("model.layers.1.self_attn.k_proj.weight"), 2)->data);
  EXPECT_NE(Host(*f, "blk.1.attn_k.weight").data,
            hf.at("model.layers.1.self_attn.k_proj.weight").data);
}

TEST(GgufLlamaTest, QuantizedTypesFallBackWhereBlocksDoNotFit) {
  for (GgmlType type : {GgmlType::kQ8_0, GgmlType::kQ4_0, GgmlType::kF16}) {
    LlamaGgufOptions opt;
    opt.type = type;
    auto w = BuildLlamaGguf(kLlama, opt);
    ASSERT_TRUE(w.ok()) << w.status();
    auto f = Parse(*w);
    ASSERT_NE(f, nullptr);
    EXPECT_EQ(f->FindTensor("blk.0.ffn_up.weight")->type, type);
    EXPECT_EQ(f->FindTensor("token_embd.weight")->type, type);
    // ffn_down rows have 176 values: not a multiple of 32.
    EXPECT_EQ(f->FindTensor("blk.0.ffn_down.weight")->type, GgmlType::kF16);
    EXPECT_EQ(f->FindTensor("blk.0.attn_norm.weight")->type, GgmlType::kF32);
    const HostTensor up = Host(*f, "blk.1.ffn_up.weight");
    const TensorMap hf = FixtureWeights();
    const HostTensor& ref = hf.at("model.layers.1.mlp.up_proj.weight");
    double max_err = 0, max_abs = 0;
    for (size_t i = 0; i < ref.data.size(); ++i) {
      max_err = std::max(max_err, std::fabs(static_cast<double>(up.data[i]) - ref.data[i]));
      max_abs = std::max(max_abs, std::fabs(static_cast<double>(ref.data[i])));
    }
    const double bound = type == GgmlType::kQ4_0   ? max_abs / 8
                         : type == GgmlType::kQ8_0 ? max_abs / 127
                                                   : 1e-3;
    EXPECT_LE(max_err, bound) << GgmlTypeName(type);
    EXPECT_GT(max_err, 0.0) << GgmlTypeName(type);
  }
}

TEST(GgufLlamaTest, MergedModelCarriesTheAdapter) {
  PeftAdapterFiles a = FixtureAdapter();
  LlamaGgufOptions opt;
  opt.type = GgmlType::kF32;
  opt.lora = &a.tensors;
  opt.lora_config = &a.config;
  auto w = BuildLlamaGguf(kLlama, opt);
  ASSERT_TRUE(w.ok()) << w.status();
  auto f = Parse(*w);
  TensorMap merged = FixtureWeights();
  ASSERT_TRUE(MergeLora(&merged, a.tensors, a.config).ok());
  EXPECT_EQ(Host(*f, "blk.1.attn_v.weight").data,
            merged.at("model.layers.1.self_attn.v_proj.weight").data);
  EXPECT_EQ(Host(*f, "blk.1.attn_q.weight").data,
            PermuteQkRows(merged.at("model.layers.1.self_attn.q_proj.weight"), 4)->data);
  EXPECT_NE(Host(*f, "blk.1.attn_v.weight").data,
            FixtureWeights().at("model.layers.1.self_attn.v_proj.weight").data);
  opt.lora_config = nullptr;
  EXPECT_THAT(BuildLlamaGguf(kLlama, opt).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("lora_config")));
}

TEST(GgufLlamaTest, LoraAdapterGguf) {
  PeftAdapterFiles a = FixtureAdapter();
  auto w = BuildLoraGguf(kLlama, a.tensors, a.config);
  ASSERT_TRUE(w.ok()) << w.status();
  auto f = Parse(*w);
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(*f->GetString("general.architecture"), "llama");
  EXPECT_EQ(*f->GetString("general.type"), "adapter");
  EXPECT_EQ(*f->GetString("adapter.type"), "lora");
  EXPECT_EQ(f->Find("adapter.lora.alpha")->type(), GgufType::kFloat32);
  EXPECT_FLOAT_EQ(static_cast<float>(*f->GetFloat("adapter.lora.alpha")), 8.0f);
  EXPECT_EQ(f->tensors().size(), 28u);
  const std::string p = "base_model.model.model.layers.";
  EXPECT_EQ(f->FindTensor("blk.0.ffn_down.weight.lora_a")->ne, (std::vector<int64_t>{176, 4}));
  EXPECT_EQ(f->FindTensor("blk.0.ffn_down.weight.lora_b")->ne, (std::vector<int64_t>{4, 64}));
  EXPECT_EQ(Host(*f, "blk.0.ffn_down.weight.lora_a").data,
            a.tensors.at(p + "0.mlp.down_proj.lora_A.weight").data);
  EXPECT_EQ(Host(*f, "blk.1.attn_v.weight.lora_b").data,
            a.tensors.at(p + "1.self_attn.v_proj.lora_B.weight").data);
  EXPECT_EQ(Host(*f, "blk.1.attn_q.weight.lora_a").data,
            a.tensors.at(p + "1.self_attn.q_proj.lora_A.weight").data);
  EXPECT_EQ(Host(*f, "blk.1.attn_q.weight.lora_b").data,
            PermuteQkRows(a.tensors.at(p + "1.self_attn.q_proj.lora_B.weight"), 4)->data);
  EXPECT_EQ(Host(*f, "blk.0.attn_k.weight.lora_b").data,
            PermuteQkRows(a.tensors.at(p + "0.self_attn.k_proj.lora_B.weight"), 2)->data);

  // rsLoRA: llama.cpp scales by alpha/r, so alpha is stored as alpha*sqrt(r).
  PeftLoraConfig rs = a.config;
  rs.use_rslora = true;
  auto wr = BuildLoraGguf(kLlama, a.tensors, rs, GgmlType::kF16);
  ASSERT_TRUE(wr.ok()) << wr.status();
  auto fr = Parse(*wr);
  EXPECT_FLOAT_EQ(static_cast<float>(*fr->GetFloat("adapter.lora.alpha")), 16.0f);
  EXPECT_NEAR(*fr->GetFloat("adapter.lora.alpha") / rs.r, rs.Scale(), 1e-6);
  EXPECT_EQ(fr->FindTensor("blk.0.attn_q.weight.lora_a")->type, GgmlType::kF16);
  EXPECT_THAT(BuildLoraGguf(kLlama, a.tensors, rs, GgmlType::kQ8_0).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("F32 or F16")));
}

TEST(GgufLlamaTest, WritesFiles) {
  FixtureCopy tmp;
  PeftAdapterFiles a = FixtureAdapter();
  LlamaGgufOptions opt;
  ASSERT_TRUE(ConvertHfLlamaToGguf(kLlama, tmp.dir() + "/m.gguf", opt).ok());
  ASSERT_TRUE(ExportLoraGguf(kLlama, a.tensors, a.config, tmp.dir() + "/l.gguf").ok());
  auto m = GgufFile::Open(tmp.dir() + "/m.gguf");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(*(*m)->GetUint("general.file_type"), 1u);
  auto l = GgufFile::Open(tmp.dir() + "/l.gguf");
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ((*l)->tensors().size(), 28u);
}

TEST(GgufLlamaTest, RejectsUnsupportedCheckpoints) {
  LlamaGgufOptions opt;
  {
    FixtureCopy c;
    c.EditJson("config.json", [](nlohmann::json* j) { (*j)["model_type"] = "gemma"; });
    EXPECT_THAT(BuildLlamaGguf(c.dir(), opt).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'model_type'")));
  }
  {
    // Phi-3 wants the fused projections; the Llama layout is missing them.
    FixtureCopy c;
    c.EditJson("config.json", [](nlohmann::json* j) { (*j)["model_type"] = "phi3"; });
    EXPECT_THAT(BuildLlamaGguf(c.dir(), opt).status(),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("missing tensor 'model.layers.0.self_attn.qkv_proj.weight'")));
  }
  {
    // Phi-3-128k's longrope is not supported; mistral has no q/k/v biases in llama.cpp.
    FixtureCopy c;
    c.EditJson("config.json", [](nlohmann::json* j) {
      (*j)["model_type"] = "phi3";
      (*j)["rope_scaling"] = {{"type", "longrope"}};
      j->erase("rope_parameters");
    });
    EXPECT_THAT(BuildLlamaGguf(c.dir(), opt).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("\"longrope\"")));
    FixtureCopy d;
    d.EditJson("config.json", [](nlohmann::json* j) {
      (*j)["model_type"] = "mistral";
      (*j)["attention_bias"] = true;
    });
    EXPECT_THAT(BuildLlamaGguf(d.dir(), opt).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'attention_bias'")));
  }
  {
    FixtureCopy c;
    c.EditJson("config.json",
               [](nlohmann::json* j) { (*j)["rope_parameters"]["rope_type"] = "yarn"; });
    EXPECT_THAT(BuildLlamaGguf(c.dir(), opt).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("\"yarn\"")));
  }
  {
    FixtureCopy c;
    c.EditJson("config.json", [](nlohmann::json* j) { (*j)["intermediate_size"] = 128; });
    EXPECT_THAT(
        BuildLlamaGguf(c.dir(), opt).status(),
        StatusIs(absl::StatusCode::kInvalidArgument,
                 HasSubstr("'model.layers.0.mlp.gate_proj.weight': expected shape [128,64]")));
  }
  {
    FixtureCopy c;
    c.EditJson("config.json", [](nlohmann::json* j) { j->erase("hidden_size"); });
    EXPECT_THAT(BuildLlamaGguf(c.dir(), opt).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'hidden_size'")));
  }
  {
    FixtureCopy c;
    c.EditJson("tokenizer.json", [](nlohmann::json* j) {
      (*j)["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\w+";
    });
    EXPECT_THAT(BuildLlamaGguf(c.dir(), opt).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unsupported split regex")));
  }
  {
    FixtureCopy c;
    TensorMap w = FixtureWeights();
    w.erase("model.layers.1.mlp.up_proj.weight");
    w["model.layers.1.mlp.extra.weight"] = w.at("model.norm.weight");
    ASSERT_TRUE(WriteSafetensors(c.dir() + "/model.safetensors", w).ok());
    EXPECT_THAT(BuildLlamaGguf(c.dir(), opt).status(),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("missing tensor 'model.layers.1.mlp.up_proj.weight'")));
    w["model.layers.1.mlp.up_proj.weight"] =
        FixtureWeights().at("model.layers.1.mlp.up_proj.weight");
    ASSERT_TRUE(WriteSafetensors(c.dir() + "/model.safetensors", w).ok());
    EXPECT_THAT(
        BuildLlamaGguf(c.dir(), opt).status(),
        StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("model.layers.1.mlp.extra.weight")));
  }
  {
    FixtureCopy c;
    c.EditJson("config.json", [](nlohmann::json* j) { (*j)["attention_bias"] = true; });
    EXPECT_THAT(BuildLlamaGguf(c.dir(), opt).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'attention_bias'")));
  }
  EXPECT_FALSE(BuildLlamaGguf("/nonexistent", opt).ok());
}

// Llama-3 RoPE scaling written in the form of Meta's published reference
// (llama3 `apply_scaling`): it returns the SCALED frequencies; llama.cpp's
// rope_freqs tensor holds the divisors freq / scaled_freq. Deliberately not the
// same expression as Llama3RopeFactors.
std::vector<double> MetaScaledFreqs(double theta, int dim, double factor, double low, double high,
                                    double old_context_len) {
  std::vector<double> out;
  const double low_freq_wavelen = old_context_len / low;
  const double high_freq_wavelen = old_context_len / high;
  for (int i = 0; i < dim; i += 2) {
    const double freq = 1.0 / std::pow(theta, static_cast<double>(i) / dim);
    const double wavelen = 2 * M_PI / freq;
    if (wavelen < high_freq_wavelen) {
      out.push_back(freq);
    } else if (wavelen > low_freq_wavelen) {
      out.push_back(freq / factor);
    } else {
      const double smooth = (old_context_len / wavelen - low) / (high - low);
      out.push_back((1 - smooth) * freq / factor + smooth * freq);
    }
  }
  return out;
}

// A tiny llama3-scaled config on the fixture's weights: head_dim 16 gives 8
// frequencies with wavelengths 6.3, 19.9, 62.8, 199, 628, ...; with
// original_max_position_embeddings 256 and low/high 1/4 the bands are
// < 64 (kept), 64..256 (blended) and > 256 (divided by factor).
void MakeLlama3(FixtureCopy* c, const char* field = "rope_parameters") {
  c->EditJson("config.json", [field](nlohmann::json* j) {
    j->erase("rope_parameters");
    (*j)["rope_theta"] = 10000.0;
    (*j)[field] = {{"rope_type", "llama3"},
                   {"rope_theta", 10000.0},
                   {"factor", 8.0},
                   {"low_freq_factor", 1.0},
                   {"high_freq_factor", 4.0},
                   {"original_max_position_embeddings", 256}};
    (*j)["max_position_embeddings"] = 2048;
  });
}

TEST(GgufLlamaTest, Llama3RopeFactorsFollowMetasFormula) {
  for (const char* field : {"rope_parameters", "rope_scaling"}) {
    SCOPED_TRACE(field);
    FixtureCopy c;
    MakeLlama3(&c, field);
    auto hp = ReadLlamaHParams(c.dir() + "/config.json");
    ASSERT_TRUE(hp.ok()) << hp.status();
    EXPECT_TRUE(hp->rope_llama3);
    const std::vector<float> factors = Llama3RopeFactors(*hp);
    const std::vector<double> scaled = MetaScaledFreqs(10000.0, 16, 8.0, 1.0, 4.0, 256);
    ASSERT_EQ(factors.size(), 8u);
    int kept = 0, divided = 0, blended = 0;
    for (size_t i = 0; i < factors.size(); ++i) {
      const double freq = 1.0 / std::pow(10000.0, 2.0 * static_cast<double>(i) / 16);
      EXPECT_NEAR(factors[i], freq / scaled[i], 1e-6 * freq / scaled[i]) << "dim " << i;
      if (factors[i] == 1.0f) {
        ++kept;
      } else if (factors[i] == 8.0f) {
        ++divided;
      } else {
        ++blended;
        EXPECT_GT(factors[i], 1.0f);
        EXPECT_LT(factors[i], 8.0f);
      }
    }
    // All three bands of the formula are exercised, in order.
    EXPECT_EQ(kept, 3);
    EXPECT_EQ(blended, 1);
    EXPECT_EQ(divided, 4);
    EXPECT_TRUE(std::is_sorted(factors.begin(), factors.end()));

    auto w = BuildLlamaGguf(c.dir(), LlamaGgufOptions{});
    ASSERT_TRUE(w.ok()) << w.status();
    auto f = GgufFile::FromBytes(w->Serialize(), "llama3.gguf");
    ASSERT_TRUE(f.ok()) << f.status();
    const GgufTensorInfo* t = (*f)->FindTensor("rope_freqs.weight");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->type, GgmlType::kF32);
    EXPECT_EQ(t->ne, (std::vector<int64_t>{8}));
    auto host = (*f)->ToHost(*t);
    ASSERT_TRUE(host.ok());
    EXPECT_EQ(host->data, factors);
    EXPECT_EQ(*(*f)->GetUint("llama.context_length"), 2048u);
    EXPECT_EQ(*(*f)->GetUint("llama.rope.dimension_count"), 16u);
  }
  // Without llama3 scaling there is no rope_freqs tensor.
  auto plain = BuildLlamaGguf(kLlama, LlamaGgufOptions{});
  ASSERT_TRUE(plain.ok());
  auto pf = GgufFile::FromBytes(plain->Serialize(), "plain.gguf");
  ASSERT_TRUE(pf.ok());
  EXPECT_EQ((*pf)->FindTensor("rope_freqs.weight"), nullptr);
}

TEST(GgufLlamaTest, Llama3RopeScalingNeedsItsParameters) {
  {
    FixtureCopy c;
    MakeLlama3(&c);
    c.EditJson("config.json", [](nlohmann::json* j) { (*j)["rope_parameters"].erase("factor"); });
    EXPECT_THAT(ReadLlamaHParams(c.dir() + "/config.json").status(),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("'rope_parameters.factor': expected a positive number")));
  }
  {
    FixtureCopy c;
    MakeLlama3(&c);
    c.EditJson("config.json",
               [](nlohmann::json* j) { (*j)["rope_parameters"]["high_freq_factor"] = 1.0; });
    EXPECT_THAT(ReadLlamaHParams(c.dir() + "/config.json").status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("high_freq_factor")));
  }
  {
    FixtureCopy c;
    MakeLlama3(&c);
    c.EditJson("config.json", [](nlohmann::json* j) { (*j)["model_type"] = "qwen2"; });
    EXPECT_THAT(ReadLlamaHParams(c.dir() + "/config.json").status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("only supported for the llama")));
  }
}

TEST(GgufLlamaTest, Qwen2KeepsHfRopeLayoutAndBiases) {
  const std::string qwen = std::string(FEDLORA_FIXTURES) + "/hf/qwen2";
  LlamaGgufOptions opt;
  opt.type = GgmlType::kF32;
  auto w = BuildLlamaGguf(qwen, opt);
  ASSERT_TRUE(w.ok()) << w.status();
  auto f = Parse(*w);
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(*f->GetString("general.architecture"), "qwen2");
  EXPECT_EQ(*f->GetUint("qwen2.block_count"), 2u);
  EXPECT_EQ(f->Find("llama.block_count"), nullptr);
  EXPECT_FLOAT_EQ(static_cast<float>(*f->GetFloat("qwen2.rope.freq_base")), 1e6f);
  EXPECT_EQ(f->FindTensor("output.weight"), nullptr);  // tied embeddings
  EXPECT_EQ(f->tensors().size(), 2u * 12 + 2);
  auto st = SafetensorsFile::Open(qwen + "/model.safetensors");
  ASSERT_TRUE(st.ok());
  TensorMap hf = *(*st)->ToTensorMap();
  // No permutation: llama.cpp's qwen2 rotates halves like HF.
  EXPECT_EQ(Host(*f, "blk.0.attn_q.weight").data,
            hf.at("model.layers.0.self_attn.q_proj.weight").data);
  EXPECT_EQ(Host(*f, "blk.1.attn_k.bias").data, hf.at("model.layers.1.self_attn.k_proj.bias").data);
  EXPECT_EQ(f->FindTensor("blk.1.attn_v.bias")->ne, (std::vector<int64_t>{32}));
  auto a = ReadPeftAdapter(qwen + "/adapter");
  ASSERT_TRUE(a.ok()) << a.status();
  auto lw = BuildLoraGguf(qwen, a->tensors, a->config);
  ASSERT_TRUE(lw.ok()) << lw.status();
  auto lf = Parse(*lw);
  EXPECT_EQ(*lf->GetString("general.architecture"), "qwen2");
  EXPECT_EQ(Host(*lf, "blk.0.attn_q.weight.lora_b").data,
            a->tensors.at("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight").data);
}

}  // namespace
}  // namespace fedlora::common
