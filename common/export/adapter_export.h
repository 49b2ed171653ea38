#pragma once
// Export of a LoRA adapter (fp32 TensorMap + PEFT config) to the files other
// tools load, torch-free. The one implementation behind both
// `fedlora-admin models export` (coordinator/export_version.h, which reads a
// published version from the state store) and `fedlora-agent export` (which
// reads an adapter blob file or a PEFT directory on a device).
//
//   PEFT        (kPeft):       a directory with adapter_config.json and
//                              adapter_model.safetensors (F32), for HF peft / vLLM.
//   GGUF LoRA   (kGgufLora):   one llama.cpp adapter GGUF (--lora), F32 or F16.
//   GGUF merged (kGgufMerged): the base model with W += scale * B @ A merged in, as
//                              one llama.cpp model GGUF, F32 / F16 / Q8_0 / Q4_0.
//
// When a base model directory is given (required for the GGUF formats,
// optional for PEFT), every LoRA pair is checked against the base weight it
// updates (model.safetensors): A [r, in] and B [out, r] must match W [out, in].
//
// Everything is built and validated in memory before anything is written: on
// any error nothing appears at `out` (a GGUF file is written atomically; a PEFT
// directory is written to a temporary sibling and renamed into place). An
// existing `out` is replaced (GGUF file) or its two adapter files are replaced
// (PEFT directory); an existing `out` of another kind (a directory or device
// for GGUF, a file for PEFT) is FailedPrecondition. Other errors are InvalidArgument naming the flag, file, tensor
// and shapes at fault. Thread-safe (no shared state).

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"
#include "common/export/gguf.h"
#include "common/export/peft_export.h"
#include "common/tensor/tensor.h"

namespace fedlora::common {

enum class ExportFormat { kPeft, kGgufLora, kGgufMerged };
// "peft", "gguf-lora", "gguf-merged".
const char* ExportFormatName(ExportFormat format);
absl::StatusOr<ExportFormat> ParseExportFormat(const std::string& name);

// Blob metadata keys the coordinator writes beside a published adapter.
inline constexpr char kBlobLoraRankKey[] = "fedlora.lora.rank";
inline constexpr char kBlobLoraAlphaKey[] = "fedlora.lora.alpha";
inline constexpr char kBlobLoraTargetsKey[] = "fedlora.lora.target_modules";

// The PEFT LoRA config of a decoded adapter blob (common::DecodeAdapterBlob):
// alpha from fedlora.lora.alpha (required: the scale alpha/r cannot be
// guessed), rank from fedlora.lora.rank (else the first lora_A's rows),
// target modules from fedlora.lora.target_modules (else the tensor names).
// The result is checked with CollectLoraPairs. Errors (InvalidArgument) name
// the key or tensor; callers prefix where the blob came from.
absl::StatusOr<PeftLoraConfig> LoraConfigFromBlobMetadata(const TensorMap& tensors,
                                                          const Metadata& metadata);

// Checks every LoRA pair against the base weights in `hf_dir`/model.safetensors.
absl::Status CheckAdapterFitsBase(const TensorMap& adapter, const PeftLoraConfig& config,
                                  const std::string& hf_dir);

struct AdapterExportOptions {
  ExportFormat format = ExportFormat::kPeft;
  std::string base_model_dir;  // HF model dir; required for the GGUF formats
  // Tensor type: "" = the format's default (gguf-lora "f32", gguf-merged "f16").
  // gguf-lora: f32 | f16; gguf-merged: f32 | f16 | q8_0 | q4_0; peft: "" or f32 only.
  std::string quant;
  std::string out;              // PEFT: a directory; GGUF: a file
  std::string name = "fedlora";  // GGUF general.name
  // How the calling command spells the base model flag, for error messages.
  std::string base_flag = "--base-model";
};

// Checks the option combination (out given, base model for GGUF, quant valid
// for the format) and returns the GGUF tensor type (F32 for PEFT).
absl::StatusOr<GgmlType> CheckExportOptions(const AdapterExportOptions& options);

struct AdapterExportResult {
  std::string out;          // options.out without trailing slashes
  size_t tensor_count = 0;  // tensors written (adapter tensors, or GGUF tensors)
};

// Validates, builds and writes the export. `config.base_model_name_or_path`
// is set to the base model dir when one is given.
absl::StatusOr<AdapterExportResult> ExportAdapter(const TensorMap& adapter, PeftLoraConfig config,
                                                  const AdapterExportOptions& options);

}  // namespace fedlora::common
