#pragma once
// Block quantization of adapters (ggml-compatible layouts).
//
// q8_0: blocks of 32 values; each block is an fp16 scale d = max|x|/127 followed
// by 32 int8 q = round(x/d); 34 bytes per block. The last block is zero-padded.
// q4_0: ggml's layout and rounding (common/export/gguf.h): blocks of 32 values;
// fp16 d = m/-8 (m the value of largest magnitude, sign kept), then 16 bytes of
// 4-bit q (low nibbles values 0..15, high nibbles 16..31), x = (q - 8) * d;
// 18 bytes per block. In adapter blobs the last block is zero-padded.
//
// Adapter blobs: a published adapter version is a safetensors file whose tensors
// are U8 arrays of q8_0 or q4_0 blocks (or F32 for Quant::kNone). Metadata keys:
//   "fedlora.format" = "adapter-v1", "fedlora.quant" = "q8_0" | "q4_0" | "f32",
//   "fedlora.shape.<tensor name>" = "d0,d1,...", plus caller metadata.
// DecodeAdapterBlob validates everything and returns fp32 tensors.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "common/tensor/tensor.h"

namespace fedlora::common {

enum class Quant { kNone, kQ8_0, kQ4_0 };
// "f32", "q8_0", "q4_0".
const char* QuantName(Quant quant);
// Inverse of QuantName; InvalidArgument naming the accepted names otherwise.
absl::StatusOr<Quant> ParseQuant(std::string_view name);
inline constexpr size_t kQ8BlockValues = 32;
inline constexpr size_t kQ8BlockBytes = 34;

std::string QuantizeQ8_0(const float* x, size_t n);
// `bytes` must hold ceil(n/32) blocks.
absl::Status DequantizeQ8_0(std::string_view bytes, size_t n, float* out);

// Reconstruction error of the dequantized blob vs the fp32 input, over all tensors.
struct QuantReport {
  double max_abs_error = 0;
  double rms_error = 0;
  double relative_l2_error = 0;  // ||x - dequant(x)||_2 / ||x||_2 (0 when x is all zero)
};

std::string EncodeAdapterBlob(const TensorMap& tensors, Quant quant, const Metadata& metadata = {},
                              QuantReport* report = nullptr);
absl::StatusOr<TensorMap> DecodeAdapterBlob(std::string_view blob, Metadata* metadata = nullptr);

}  // namespace fedlora::common
