#include "coordinator/update_validator.h"

#include <cmath>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace fedlora::coordinator {
namespace {

constexpr char kASuffix[] = ".lora_A.weight";
constexpr char kBSuffix[] = ".lora_B.weight";

std::string ShapeStr(const std::vector<int64_t>& shape) {
  return "[" + absl::StrJoin(shape, ",") + "]";
}

}  // namespace

ShapeMap ShapesOf(const common::TensorMap& tensors) {
  ShapeMap shapes;
  for (const auto& [name, t] : tensors) shapes[name] = t.shape;
  return shapes;
}

absl::Status CheckShapes(const common::TensorMap& update, const ShapeMap& expected) {
  for (const auto& [name, shape] : expected) {
    auto it = update.find(name);
    if (it == update.end()) {
      return absl::InvalidArgumentError(absl::StrCat("update is missing tensor '", name,
                                                     "' (expected shape ", ShapeStr(shape), ")"));
    }
    if (it->second.shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': expected shape ",
                                                     ShapeStr(shape), ", found ",
                                                     ShapeStr(it->second.shape)));
    }
  }
  for (const auto& [name, t] : update) {
    if (expected.find(name) == expected.end()) {
      return absl::InvalidArgumentError(absl::StrCat("update has unexpected tensor '", name, "' (",
                                                     expected.size(), " tensors expected)"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckLoraStructure(const common::TensorMap& update, uint32_t rank,
                                const std::vector<std::string>& target_modules) {
  if (update.empty()) return absl::InvalidArgumentError("update holds no tensors");
  std::set<std::string> a_modules, b_modules;
  for (const auto& [name, t] : update) {
    const bool is_a = absl::EndsWith(name, kASuffix);
    const bool is_b = absl::EndsWith(name, kBSuffix);
    if (!is_a && !is_b) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", name,
                                                     "': expected a LoRA factor name ending in ",
                                                     kASuffix, " or ", kBSuffix));
    }
    const std::string module =
        name.substr(0, name.size() - (is_a ? sizeof(kASuffix) - 1 : sizeof(kBSuffix) - 1));
    bool targeted = false;
    for (const std::string& target : target_modules) {
      if (module == target || absl::EndsWith(module, "." + target)) targeted = true;
    }
    if (!targeted) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': module '", module,
                                                     "' is not one of the target modules [",
                                                     absl::StrJoin(target_modules, ","), "]"));
    }
    if (t.shape.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "': expected 2 dims, found ", ShapeStr(t.shape)));
    }
    const int64_t r = is_a ? t.shape[0] : t.shape[1];
    if (r != static_cast<int64_t>(rank) || t.shape[0] < 1 || t.shape[1] < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", name, "': expected rank ", rank, " in dim ", is_a ? 0 : 1,
          " (lora_A is [r, in], lora_B is [out, r]), found shape ", ShapeStr(t.shape)));
    }
    (is_a ? a_modules : b_modules).insert(module);
  }
  for (const std::string& m : a_modules) {
    if (!b_modules.count(m)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", m, kASuffix, "' has no matching '", m, kBSuffix, "'"));
    }
  }
  for (const std::string& m : b_modules) {
    if (!a_modules.count(m)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", m, kBSuffix, "' has no matching '", m, kASuffix, "'"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckFinite(const common::TensorMap& update) {
  for (const auto& [name, t] : update) {
    for (size_t i = 0; i < t.data.size(); ++i) {
      if (!std::isfinite(t.data[i])) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': value ", i, " is ",
                                                       t.data[i], "; expected finite values"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateUpdate(const common::TensorMap& update, const ShapeMap& expected,
                            uint32_t rank, const std::vector<std::string>& target_modules) {
  if (!expected.empty()) {
    if (absl::Status s = CheckShapes(update, expected); !s.ok()) return s;
  } else {
    if (absl::Status s = CheckLoraStructure(update, rank, target_modules); !s.ok()) return s;
  }
  return CheckFinite(update);
}

}  // namespace fedlora::coordinator
