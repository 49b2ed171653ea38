#pragma once
// Export of a published adapter version to files other tools load, torch-free.
// Reads the version from the state store; the formats, checks and writing are
// common/export/adapter_export.h's (shared with `fedlora-agent export`).
//
//   PEFT        (kPeft):       a directory with adapter_config.json and
//                              adapter_model.safetensors (F32), for HF peft / vLLM.
//   GGUF LoRA   (kGgufLora):   one llama.cpp adapter GGUF (--lora), F32 or F16.
//   GGUF merged (kGgufMerged): the base model with W += scale * B @ A merged in, as
//                              one llama.cpp model GGUF, F32 / F16 / Q8_0 / Q4_0.
//
// The version's blob is read from the state store (which may be opened
// read-only while the coordinator runs), checked against the version's
// SHA-256, decoded (common::DecodeAdapterBlob) and turned into a PEFT LoRA
// config from the blob metadata the coordinator writes: fedlora.lora.rank,
// fedlora.lora.alpha (required) and fedlora.lora.target_modules (derived from
// the tensor names when absent or empty). When a base model directory is given
// (required for the GGUF formats, optional for PEFT), every LoRA pair is checked
// against the base weight it updates (config.json + model.safetensors):
// A [r, in] and B [out, r] must match W [out, in].
//
// Everything is built and validated in memory before anything is written: on
// any error nothing appears at `out` (a GGUF file is written atomically; a PEFT
// directory is written to a temporary sibling and renamed into place). An
// existing `out` is replaced (GGUF file) or its two adapter files are replaced
// (PEFT directory).
//
// Errors: unknown version -> NotFound naming it; "latest"/"current" with no
// published version -> NotFound; a blob whose hash differs -> DataLoss; bad
// metadata or an adapter that does not fit the base model -> InvalidArgument
// naming the tensor and both shapes; bad format/quant combinations ->
// InvalidArgument. Thread-compatible (no shared state).

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"
#include "common/export/adapter_export.h"
#include "common/export/peft_export.h"
#include "common/tensor/tensor.h"
#include "coordinator/state_store.h"

namespace fedlora::coordinator {

using ExportFormat = common::ExportFormat;  // peft | gguf-lora | gguf-merged
using common::ExportFormatName;
using common::ParseExportFormat;

struct ExportOptions {
  std::string version = "latest";  // a version id, or "latest" / "current"
  ExportFormat format = ExportFormat::kPeft;
  std::string base_model_dir;  // HF model dir; required for the GGUF formats
  // Tensor type: "" = the format's default (gguf-lora "f32", gguf-merged "f16").
  // gguf-lora: f32 | f16; gguf-merged: f32 | f16 | q8_0 | q4_0; peft: "" or f32 only.
  std::string quant;
  std::string out;  // PEFT: a directory; GGUF: a file
};

struct ExportResult {
  std::string version_id;
  std::string out;
  size_t tensor_count = 0;  // tensors written (adapter tensors, or GGUF tensors)
  common::PeftLoraConfig config;
};

// The version's adapter and its LoRA config, decoded and checked (no base model check).
struct LoadedAdapter {
  std::string version_id;
  common::TensorMap tensors;
  common::Metadata metadata;
  common::PeftLoraConfig config;
};
absl::StatusOr<LoadedAdapter> LoadVersionAdapter(const StateStore& store,
                                                 const std::string& version);

// Checks every LoRA pair against the base weights in `hf_dir`/model.safetensors.
using common::CheckAdapterFitsBase;

absl::StatusOr<ExportResult> ExportVersion(const StateStore& store, const ExportOptions& options);

// Opens `data_dir` with StateStore::OpenReadOnly and exports.
absl::StatusOr<ExportResult> ExportVersionFromDataDir(const std::string& data_dir,
                                                      const ExportOptions& options);

}  // namespace fedlora::coordinator
