#pragma once
// Checks a decrypted, parsed update before it is accepted (docs/protocol.md, Collect).
//
// - Against a known spec (the round's base version, or the round's first accepted
//   update): exactly the same tensor names and shapes.
// - Fresh LoRA rounds before any update is accepted: every tensor is a PEFT LoRA
//   factor "<module path>.lora_A.weight" [r, in] or "<module path>.lora_B.weight"
//   [out, r], where the module path ends with one of the target modules, and A and
//   B come in pairs.
// - Every value finite (no NaN / Inf).
// Errors are InvalidArgument naming the tensor and what was expected and found.
// Pure functions; safe for concurrent use.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/tensor/tensor.h"
#include "coordinator/state_store.h"

namespace fedlora::coordinator {

ShapeMap ShapesOf(const common::TensorMap& tensors);

absl::Status CheckShapes(const common::TensorMap& update, const ShapeMap& expected);
absl::Status CheckLoraStructure(const common::TensorMap& update, uint32_t rank,
                                const std::vector<std::string>& target_modules);
absl::Status CheckFinite(const common::TensorMap& update);

// All of the above: CheckShapes when `expected` is non-empty, else CheckLoraStructure;
// then CheckFinite.
absl::Status ValidateUpdate(const common::TensorMap& update, const ShapeMap& expected,
                            uint32_t rank, const std::vector<std::string>& target_modules);

}  // namespace fedlora::coordinator
