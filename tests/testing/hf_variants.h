#pragma once
// WriteArchitectureVariant(fixture_dir, out_dir, arch, model_type, fuse,
// sliding_window): rewrites an HF Llama checkpoint folder (config.json +
// model.safetensors) as another architecture with the same math, for tests
// that check an implementation of that architecture against the Llama
// fixture's reference outputs:
//  * config.json gets "architectures": [arch] and "model_type": model_type,
//    and "sliding_window" when sliding_window > 0;
//  * with `fuse`, each layer's q/k/v projections become one qkv_proj (rows
//    q, k, v) and gate/up one gate_up_proj (rows gate, up): the Phi-3 layout.
// Other files are not copied. Uses gtest assertions (call it under
// ASSERT_NO_FATAL_FAILURE).

#include <string>
#include <vector>

#include "common/crypto/crypto.h"
#include "common/tensor/tensor.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace fedlora::testutil {

inline void WriteArchitectureVariant(const std::string& fixture_dir, const std::string& dir,
                                     const std::string& arch, const std::string& model_type,
                                     bool fuse, int64_t sliding_window) {
  auto cfg_text = common::ReadFileToString(fixture_dir + "/config.json");
  ASSERT_TRUE(cfg_text.ok()) << cfg_text.status();
  nlohmann::json cfg = nlohmann::json::parse(*cfg_text);
  cfg["architectures"] = {arch};
  cfg["model_type"] = model_type;
  if (sliding_window > 0) cfg["sliding_window"] = sliding_window;
  ASSERT_TRUE(common::WriteFileAtomic(dir + "/config.json", cfg.dump()).ok());
  auto file = common::SafetensorsFile::Open(fixture_dir + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  auto map = (*file)->ToTensorMap();
  ASSERT_TRUE(map.ok()) << map.status();
  if (fuse) {
    auto concat_rows = [&](const std::vector<std::string>& names, const std::string& to) {
      common::HostTensor out;
      out.shape = {0, map->at(names[0]).shape[1]};
      for (const auto& n : names) {
        const common::HostTensor& t = map->at(n);
        out.shape[0] += t.shape[0];
        out.data.insert(out.data.end(), t.data.begin(), t.data.end());
        map->erase(n);
      }
      (*map)[to] = std::move(out);
    };
    const int64_t layers = cfg.at("num_hidden_layers").get<int64_t>();
    for (int64_t i = 0; i < layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      concat_rows({p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                   p + "self_attn.v_proj.weight"},
                  p + "self_attn.qkv_proj.weight");
      concat_rows({p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"},
                  p + "mlp.gate_up_proj.weight");
    }
  }
  ASSERT_TRUE(common::WriteSafetensors(dir + "/model.safetensors", *map).ok());
}

}  // namespace fedlora::testutil
