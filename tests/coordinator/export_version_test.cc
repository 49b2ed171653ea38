// coordinator/export_version: a version published into a real state store (the
// PEFT fixture adapter of the tiny Llama, as q8_0 and f32 blobs) exported as
// PEFT, llama.cpp LoRA GGUF and merged GGUF, read back with the readers; the
// store is opened read-only while a writer instance holds it open.
#include "coordinator/export_version.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/crypto/crypto.h"
#include "common/export/gguf.h"
#include "common/export/gguf_llama.h"
#include "common/export/peft_export.h"
#include "common/quant/quant.h"
#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;
using testing::TempDir;

const std::string kBase = std::string(FEDLORA_FIXTURES) + "/hf/llama";
const std::string kAdapter = kBase + "/adapter";

common::PeftAdapterFiles FixtureAdapter() {
  auto files = common::ReadPeftAdapter(kAdapter);
  EXPECT_TRUE(files.ok()) << files.status();
  return files.ok() ? *files : common::PeftAdapterFiles{};
}

// Publishes `tensors` as version VersionId(round_id), with the metadata the
// coordinator's round manager writes. Returns the blob.
std::string PublishVersion(StateStore* store, uint64_t round_id, const common::TensorMap& tensors,
                           common::Quant quant, const common::PeftLoraConfig& config) {
  common::Metadata md{{"fedlora.version", VersionId(round_id)},
                      {"fedlora.lora.rank", std::to_string(config.r)},
                      {"fedlora.lora.alpha", absl::StrCat(config.lora_alpha)},
                      {"fedlora.lora.target_modules", absl::StrJoin(config.target_modules, ",")}};
  std::string blob = common::EncodeAdapterBlob(tensors, quant, md);
  RoundRecord round;
  round.round_id = round_id;
  round.phase = RoundPhase::kDone;
  round.lora_rank = static_cast<uint32_t>(config.r);
  round.lora_alpha = config.lora_alpha;
  round.lora_target_modules = config.target_modules;
  round.version_id = VersionId(round_id);
  VersionRecord v;
  v.version_id = VersionId(round_id);
  v.round_id = round_id;
  v.sha256 = common::Sha256Hex(blob);
  v.size_bytes = blob.size();
  v.quant = quant == common::Quant::kQ8_0 ? "q8_0" : "f32";
  for (const auto& [name, t] : tensors) v.shapes[name] = t.shape;
  absl::Status s = store->Publish(round, v, blob);
  EXPECT_TRUE(s.ok()) << s;
  return blob;
}

class ExportVersionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fixture_ = FixtureAdapter();
    ASSERT_FALSE(fixture_.tensors.empty());
    ASSERT_EQ(fixture_.config.r, 4);
    // The writer ("the running coordinator") stays open for the whole test.
    auto store = StateStore::Open(dir_.Sub("data"));
    ASSERT_TRUE(store.ok()) << store.status();
    writer_ = std::move(*store);
    q8_blob_ =
        PublishVersion(writer_.get(), 1, fixture_.tensors, common::Quant::kQ8_0, fixture_.config);
    f32_blob_ =
        PublishVersion(writer_.get(), 2, fixture_.tensors, common::Quant::kNone, fixture_.config);
  }

  absl::StatusOr<ExportResult> Export(const std::string& version, ExportFormat format,
                                      const std::string& out, const std::string& quant = "",
                                      const std::string& base = kBase) {
    ExportOptions options;
    options.version = version;
    options.format = format;
    options.base_model_dir = base;
    options.quant = quant;
    options.out = out;
    return ExportVersionFromDataDir(dir_.Sub("data"), options);
  }

  TempDir dir_;
  common::PeftAdapterFiles fixture_;
  std::unique_ptr<StateStore> writer_;
  std::string q8_blob_, f32_blob_;
};

TEST_F(ExportVersionTest, PeftRoundTripsBothBlobKinds) {
  for (const auto& [version, blob] :
       {std::pair<std::string, std::string>{"v000001", q8_blob_}, {"v000002", f32_blob_}}) {
    SCOPED_TRACE(version);
    const std::string out = dir_.Sub("peft-" + version);
    auto result = Export(version, ExportFormat::kPeft, out);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->version_id, version);
    EXPECT_EQ(result->tensor_count, fixture_.tensors.size());
    auto back = common::ReadPeftAdapter(out);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->config.r, 4);
    EXPECT_DOUBLE_EQ(back->config.lora_alpha, 8);
    EXPECT_EQ(back->config.target_modules, fixture_.config.target_modules);
    auto decoded = common::DecodeAdapterBlob(blob);
    ASSERT_TRUE(decoded.ok());
    ASSERT_EQ(back->tensors.size(), decoded->size());
    for (const auto& [name, t] : *decoded) {
      ASSERT_TRUE(back->tensors.count(name)) << name;
      EXPECT_EQ(back->tensors.at(name).shape, t.shape) << name;
      EXPECT_EQ(back->tensors.at(name).data, t.data) << name;
    }
  }
  // The f32 blob is lossless: the export equals the fixture adapter itself; q8_0 is close.
  auto f32 = common::ReadPeftAdapter(dir_.Sub("peft-v000002"));
  auto q8 = common::ReadPeftAdapter(dir_.Sub("peft-v000001"));
  ASSERT_TRUE(f32.ok() && q8.ok());
  double max_err = 0;
  bool any_differs = false;
  for (const auto& [name, t] : fixture_.tensors) {
    EXPECT_EQ(f32->tensors.at(name).data, t.data) << name;
    const auto& q = q8->tensors.at(name).data;
    for (size_t i = 0; i < t.data.size(); ++i) {
      max_err = std::max(max_err, static_cast<double>(std::fabs(q[i] - t.data[i])));
      any_differs |= q[i] != t.data[i];
    }
  }
  EXPECT_TRUE(any_differs);  // really quantized
  EXPECT_LT(max_err, 0.05);
  // Re-exporting into an existing directory replaces the files.
  ASSERT_TRUE(Export("v000002", ExportFormat::kPeft, dir_.Sub("peft-v000001")).ok());
  auto replaced = common::ReadPeftAdapter(dir_.Sub("peft-v000001"));
  ASSERT_TRUE(replaced.ok());
  EXPECT_EQ(replaced->tensors.begin()->second.data, fixture_.tensors.begin()->second.data);
}

TEST_F(ExportVersionTest, GgufLoraReadsBackWithLlamaCppNames) {
  const std::string out = dir_.Sub("adapter.gguf");
  auto result = Export("latest", ExportFormat::kGgufLora, out);  // latest = v000002 (f32)
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->version_id, "v000002");
  auto gguf = common::GgufFile::Open(out);
  ASSERT_TRUE(gguf.ok()) << gguf.status();
  EXPECT_EQ(*(*gguf)->GetString("general.type"), "adapter");
  EXPECT_EQ(*(*gguf)->GetString("adapter.type"), "lora");
  EXPECT_EQ(*(*gguf)->GetString("general.architecture"), "llama");
  EXPECT_DOUBLE_EQ(*(*gguf)->GetFloat("adapter.lora.alpha"), 8.0);
  EXPECT_EQ((*gguf)->tensors().size(), fixture_.tensors.size());
  EXPECT_EQ(result->tensor_count, fixture_.tensors.size());
  for (int layer = 0; layer < 2; ++layer) {
    for (const char* m :
         {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}) {
      for (const char* half : {"lora_a", "lora_b"}) {
        const std::string name = absl::StrCat("blk.", layer, ".", m, ".weight.", half);
        EXPECT_NE((*gguf)->FindTensor(name), nullptr) << name;
      }
    }
  }
  // v_proj is not permuted: lora_a equals the adapter's A exactly (F32), ne {in, r}.
  const common::GgufTensorInfo* va = (*gguf)->FindTensor("blk.1.attn_v.weight.lora_a");
  ASSERT_NE(va, nullptr);
  EXPECT_EQ(va->ne, (std::vector<int64_t>{64, 4}));
  auto host = (*gguf)->ToHost(*va);
  ASSERT_TRUE(host.ok());
  EXPECT_EQ(
      host->data,
      fixture_.tensors.at("base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight").data);

  // f16 is accepted; quantized types are not, and leave nothing behind.
  ASSERT_TRUE(Export("v000001", ExportFormat::kGgufLora, dir_.Sub("a16.gguf"), "f16").ok());
  auto g16 = common::GgufFile::Open(dir_.Sub("a16.gguf"));
  ASSERT_TRUE(g16.ok());
  EXPECT_EQ((*g16)->FindTensor("blk.0.attn_q.weight.lora_b")->type, common::GgmlType::kF16);
  auto q = Export("v000001", ExportFormat::kGgufLora, dir_.Sub("aq.gguf"), "q8_0");
  EXPECT_EQ(q.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(dir_.Sub("aq.gguf")));
}

TEST_F(ExportVersionTest, GgufMergedHasBaseTensorsWithAdapterMergedIn) {
  common::LlamaGgufOptions plain_options;
  plain_options.type = common::GgmlType::kF32;
  auto plain = common::BuildLlamaGguf(kBase, plain_options);
  ASSERT_TRUE(plain.ok()) << plain.status();
  auto plain_file = common::GgufFile::FromBytes(plain->Serialize(), "plain");
  ASSERT_TRUE(plain_file.ok());

  const std::string out = dir_.Sub("merged.gguf");
  auto result = Export("current", ExportFormat::kGgufMerged, out, "f32");
  ASSERT_TRUE(result.ok()) << result.status();
  auto merged = common::GgufFile::Open(out);
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ((*merged)->tensors().size(), (*plain_file)->tensors().size());
  EXPECT_EQ(result->tensor_count, (*plain_file)->tensors().size());
  EXPECT_EQ(*(*merged)->GetString("general.name"), "fedlora v000002");

  // blk.0.attn_v (not permuted) == W + (alpha/r) * B @ A.
  const auto& a =
      fixture_.tensors.at("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight");
  const auto& b =
      fixture_.tensors.at("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight");
  auto w0 = (*plain_file)->ToHost(*(*plain_file)->FindTensor("blk.0.attn_v.weight"));
  auto w1 = (*merged)->ToHost(*(*merged)->FindTensor("blk.0.attn_v.weight"));
  ASSERT_TRUE(w0.ok() && w1.ok());
  const int64_t out_dim = b.shape[0], r = a.shape[0], in = a.shape[1];
  ASSERT_EQ(w1->shape, (std::vector<int64_t>{out_dim, in}));
  double max_err = 0, max_delta = 0;
  for (int64_t o = 0; o < out_dim; ++o) {
    for (int64_t i = 0; i < in; ++i) {
      double delta = 0;
      for (int64_t k = 0; k < r; ++k) delta += b.data[o * r + k] * a.data[k * in + i];
      delta *= 8.0 / 4.0;
      const double got = w1->data[o * in + i] - w0->data[o * in + i];
      max_err = std::max(max_err, std::fabs(got - delta));
      max_delta = std::max(max_delta, std::fabs(delta));
    }
  }
  EXPECT_GT(max_delta, 1e-3);  // the adapter really changes the weight
  EXPECT_LT(max_err, 1e-4);

  // Quantized merged models: same tensors, q4_0 where rows allow it.
  const std::string q4 = dir_.Sub("merged-q4.gguf");
  ASSERT_TRUE(Export("v000001", ExportFormat::kGgufMerged, q4, "q4_0").ok());
  auto q4_file = common::GgufFile::Open(q4);
  ASSERT_TRUE(q4_file.ok()) << q4_file.status();
  EXPECT_EQ((*q4_file)->tensors().size(), (*plain_file)->tensors().size());
  EXPECT_EQ((*q4_file)->FindTensor("blk.0.attn_q.weight")->type, common::GgmlType::kQ4_0);
}

TEST_F(ExportVersionTest, UnknownVersionIsNotFoundAndWritesNothing) {
  for (ExportFormat f : {ExportFormat::kPeft, ExportFormat::kGgufLora, ExportFormat::kGgufMerged}) {
    const std::string out = dir_.Sub(std::string("missing-") + ExportFormatName(f));
    auto result = Export("v000042", f, out);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kNotFound) << result.status();
    EXPECT_THAT(std::string(result.status().message()), HasSubstr("v000042"));
    EXPECT_FALSE(std::filesystem::exists(out));
  }
  // "latest" on a store with no version published.
  TempDir empty;
  { ASSERT_TRUE(StateStore::Open(empty.Sub("data")).ok()); }
  ExportOptions options;
  options.version = "latest";
  options.out = empty.Sub("out");
  auto none = ExportVersionFromDataDir(empty.Sub("data"), options);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(none.status().message()), HasSubstr("no version has been published"));
  // No data dir at all.
  options.version = "v000001";
  EXPECT_EQ(ExportVersionFromDataDir(empty.Sub("nope"), options).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_FALSE(std::filesystem::exists(empty.Sub("out")));
}

TEST_F(ExportVersionTest, MismatchedBaseModelIsAClearErrorAndWritesNothing) {
  // A base model whose layer-1 k_proj has the wrong input size.
  const std::string bad = dir_.Sub("bad-base");
  std::filesystem::create_directories(bad);
  for (const char* f : {"config.json", "tokenizer.json"}) {
    std::filesystem::copy_file(kBase + "/" + f, bad + "/" + f);
  }
  auto st = common::SafetensorsFile::Open(kBase + "/model.safetensors");
  ASSERT_TRUE(st.ok());
  auto weights = (*st)->ToTensorMap();
  ASSERT_TRUE(weights.ok());
  common::HostTensor& k = weights->at("model.layers.1.self_attn.k_proj.weight");
  ASSERT_EQ(k.shape, (std::vector<int64_t>{32, 64}));
  k.shape = {64, 32};
  ASSERT_TRUE(common::WriteSafetensors(bad + "/model.safetensors", *weights).ok());

  for (ExportFormat f : {ExportFormat::kPeft, ExportFormat::kGgufLora, ExportFormat::kGgufMerged}) {
    SCOPED_TRACE(ExportFormatName(f));
    const std::string out = dir_.Sub(std::string("bad-") + ExportFormatName(f));
    auto result = Export("v000001", f, out, "", bad);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << result.status();
    const std::string msg(result.status().message());
    EXPECT_THAT(msg, HasSubstr("does not fit the base model"));
    EXPECT_THAT(msg, HasSubstr("model.layers.1.self_attn.k_proj.weight"));
    EXPECT_THAT(msg, HasSubstr("[32,64]"));
    EXPECT_THAT(msg, HasSubstr("[64,32]"));
    EXPECT_FALSE(std::filesystem::exists(out));
  }
  // The PEFT export needs no base model.
  auto no_base = Export("v000001", ExportFormat::kPeft, dir_.Sub("peft-nobase"), "", "");
  ASSERT_TRUE(no_base.ok()) << no_base.status();
  // The GGUF exports do.
  auto gguf_no_base = Export("v000001", ExportFormat::kGgufLora, dir_.Sub("nobase.gguf"), "", "");
  EXPECT_EQ(gguf_no_base.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(gguf_no_base.status().message()), HasSubstr("--base-model"));
  EXPECT_FALSE(std::filesystem::exists(dir_.Sub("nobase.gguf")));
}

TEST_F(ExportVersionTest, CorruptBlobAndMissingAlphaAreErrors) {
  // A version whose blob hash does not match what is stored.
  VersionRecord v;
  v.version_id = "v000009";
  v.round_id = 9;
  v.sha256 = common::Sha256Hex("other");
  ASSERT_TRUE(writer_->raw()->Put("blobs", v.sha256, q8_blob_, true).ok());
  RoundRecord r;
  r.round_id = 9;
  r.phase = RoundPhase::kDone;
  ASSERT_TRUE(writer_->Publish(r, v, q8_blob_).ok());
  auto corrupt = Export("v000009", ExportFormat::kPeft, dir_.Sub("c"));
  EXPECT_EQ(corrupt.status().code(), absl::StatusCode::kDataLoss) << corrupt.status();
  EXPECT_THAT(std::string(corrupt.status().message()), HasSubstr("SHA-256"));

  // A blob without fedlora.lora.alpha.
  std::string blob = common::EncodeAdapterBlob(fixture_.tensors, common::Quant::kNone);
  v.version_id = "v000010";
  v.round_id = 10;
  v.sha256 = common::Sha256Hex(blob);
  r.round_id = 10;
  ASSERT_TRUE(writer_->Publish(r, v, blob).ok());
  auto no_alpha = Export("v000010", ExportFormat::kPeft, dir_.Sub("na"));
  EXPECT_EQ(no_alpha.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(no_alpha.status().message()), HasSubstr("fedlora.lora.alpha"));
  EXPECT_FALSE(std::filesystem::exists(dir_.Sub("na")));
  EXPECT_FALSE(std::filesystem::exists(dir_.Sub("c")));
}

TEST(StateStoreReadOnlyTest, ReadsWhileWriterOpenAndRefusesWritesAndNewerSchema) {
  TempDir dir;
  auto writer = StateStore::Open(dir.path());
  ASSERT_TRUE(writer.ok()) << writer.status();
  AgentRecord agent;
  agent.agent_id = "a1";
  ASSERT_TRUE((*writer)->PutAgent(agent, true).ok());
  auto ro = StateStore::OpenReadOnly(dir.path());
  ASSERT_TRUE(ro.ok()) << ro.status();
  auto got = (*ro)->GetAgent("a1");
  ASSERT_TRUE(got.ok() && got->has_value());
  EXPECT_EQ(*(*ro)->CurrentVersion(), "");
  EXPECT_EQ((*ro)->PutAgent(agent, true).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*ro)->LoadOrCreateSealKey().status().code(), absl::StatusCode::kFailedPrecondition);
  ro->reset();
  const std::string newer_schema = std::to_string(kSchemaVersion + 1);
  ASSERT_TRUE((*writer)->raw()->Put("meta", "schema_version", newer_schema, true).ok());
  auto newer = StateStore::OpenReadOnly(dir.path());
  EXPECT_EQ(newer.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(newer.status().message()), HasSubstr("schema_version is " + newer_schema));
  // Not a state store: a plain store without the coordinator's column families.
  TempDir other;
  { ASSERT_TRUE(common::Store::Open(other.path(), {"x"}).ok()); }
  auto not_state = StateStore::OpenReadOnly(other.path());
  EXPECT_EQ(not_state.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(not_state.status().message()),
              HasSubstr("not a coordinator state store"));
}

}  // namespace
}  // namespace fedlora::coordinator
