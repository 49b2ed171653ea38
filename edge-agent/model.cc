#include "edge-agent/model.h"

#include <sys/stat.h>

#include <cmath>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/crypto/crypto.h"
#include "common/status/status.h"
#include "nlohmann/json.hpp"

namespace fedlora::edge {
namespace {

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string ShapeStr(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

// Name -> view over every checkpoint file.
class WeightSource {
 public:
  absl::Status Open(const std::string& dir,
                    std::vector<std::shared_ptr<common::SafetensorsFile>>* files) {
    const std::string single = dir + "/model.safetensors";
    const std::string index = dir + "/model.safetensors.index.json";
    std::vector<std::string> shards;
    if (FileExists(single)) {
      shards.push_back("model.safetensors");
    } else if (FileExists(index)) {
      ASSIGN_OR_RETURN(std::string text, common::ReadFileToString(index));
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(text);
      } catch (const nlohmann::json::exception& e) {
        return absl::InvalidArgumentError(absl::StrCat(index, ": not valid JSON: ", e.what()));
      }
      auto wm = j.find("weight_map");
      if (!j.is_object() || wm == j.end() || !wm->is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index, ": field 'weight_map': expected an object"));
      }
      std::set<std::string> seen;
      for (auto it = wm->begin(); it != wm->end(); ++it) {
        if (!it.value().is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(index, ": weight_map['", it.key(), "']: expected a file name string"));
        }
        const std::string shard = it.value().get<std::string>();
        if (shard.empty() || shard.find('/') != std::string::npos || shard == "." ||
            shard == "..") {
          return absl::InvalidArgumentError(absl::StrCat(index, ": weight_map['", it.key(), "']: '",
                                                         shard, "' is not a plain file name"));
        }
        if (seen.insert(shard).second) shards.push_back(shard);
      }
      if (shards.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(index, ": weight_map is empty"));
      }
    } else {
      return absl::NotFoundError(absl::StrCat(
          dir, ": expected model.safetensors or model.safetensors.index.json, found neither"));
    }
    for (const std::string& shard : shards) {
      ASSIGN_OR_RETURN(std::unique_ptr<common::SafetensorsFile> file,
                       common::SafetensorsFile::Open(dir + "/" + shard));
      std::shared_ptr<common::SafetensorsFile> shared(std::move(file));
      for (const common::TensorView& v : shared->tensors()) {
        auto [it, inserted] = views_.emplace(v.name, Entry{shared.get(), &v});
        if (!inserted) {
          return absl::InvalidArgumentError(absl::StrCat("tensor '", v.name, "' appears in both ",
                                                         it->second.file->source(), " and ",
                                                         shared->source()));
        }
      }
      files->push_back(std::move(shared));
    }
    return absl::OkStatus();
  }

  bool Has(const std::string& name) const { return views_.count(name) > 0; }

  // Loads `name`, checking its shape. `store` is the dtype the model keeps it in.
  absl::StatusOr<torch::Tensor> Get(const std::string& name, const std::vector<int64_t>& shape,
                                    torch::ScalarType store = torch::kFloat) {
    auto it = views_.find(name);
    if (it == views_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint is missing tensor '", name,
                                                     "' (expected shape ", ShapeStr(shape), ")"));
    }
    const common::TensorView& v = *it->second.view;
    if (v.shape != shape) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "' in ", it->second.file->source(), ": expected shape ",
                       ShapeStr(shape), ", found ", ShapeStr(v.shape)));
    }
    used_.insert(name);
    torch::ScalarType src;
    switch (v.dtype) {
      case common::DType::kF32:
        src = torch::kFloat;
        break;
      case common::DType::kF16:
        src = torch::kHalf;
        break;
      case common::DType::kBF16:
        src = torch::kBFloat16;
        break;
      case common::DType::kF64:
        src = torch::kDouble;
        break;
      default:
        return absl::InvalidArgumentError(
            absl::StrCat("tensor '", name, "' in ", it->second.file->source(),
                         ": expected a floating dtype (F32/F16/BF16/F64), found ",
                         std::string(common::DTypeName(v.dtype))));
    }
    // A view over the read-only mapping; the Model keeps the file alive. It is
    // never written in place (MergeLora copies first).
    void* data = const_cast<uint8_t*>(v.data);
    const bool aligned = reinterpret_cast<uintptr_t>(data) % common::DTypeSize(v.dtype) == 0;
    torch::Tensor t;
    if (v.numel() == 0) {
      t = torch::zeros(shape, torch::TensorOptions().dtype(src));
    } else {
      t = torch::from_blob(data, shape, torch::TensorOptions().dtype(src));
      if (!aligned) t = t.clone();
    }
    if (src != store) t = t.to(store);
    return t;
  }

 private:
  struct Entry {
    common::SafetensorsFile* file;
    const common::TensorView* view;
  };
  std::map<std::string, Entry> views_;
  std::set<std::string> used_;
};

torch::Tensor RotateHalf(const torch::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return torch::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

torch::Tensor InvFreq(const ModelConfig& c) {
  const int64_t dim = c.head_dim;
  // As transformers: base ** (arange(0, dim, 2) / dim) in fp32.
  torch::Tensor exps =
      torch::arange(0, dim, 2, torch::kLong).to(torch::kFloat) / static_cast<float>(dim);
  torch::Tensor inv = 1.0 / torch::pow(static_cast<float>(c.rope_theta), exps);
  const RopeScaling& s = c.rope_scaling;
  if (s.type == "linear") {
    inv = inv / static_cast<float>(s.factor);
  } else if (s.type == "llama3") {
    const double old_len = static_cast<double>(s.original_max_position_embeddings);
    const double low_wavelen = old_len / s.low_freq_factor;
    const double high_wavelen = old_len / s.high_freq_factor;
    torch::Tensor wavelen = 2 * M_PI / inv;
    torch::Tensor scaled =
        torch::where(wavelen > low_wavelen, inv / static_cast<float>(s.factor), inv);
    torch::Tensor smooth =
        (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
    torch::Tensor smoothed = (1 - smooth) * scaled / static_cast<float>(s.factor) + smooth * scaled;
    torch::Tensor medium = torch::logical_and(wavelen >= high_wavelen, wavelen <= low_wavelen);
    inv = torch::where(medium, smoothed, scaled);
  }
  return inv.contiguous();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& model_dir,
                                                   const ModelLoadOptions& options) {
  torch::ScalarType store;
  bool int8 = false;
  if (options.base_dtype == "fp32") {
    store = torch::kFloat;
  } else if (options.base_dtype == "bf16") {
    store = torch::kBFloat16;
  } else if (options.base_dtype == "fp16") {
    store = torch::kHalf;
  } else if (options.base_dtype == "int8") {
    store = torch::kBFloat16;  // embeddings and lm_head
    int8 = true;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("base_dtype: expected \"fp32\", \"bf16\", \"fp16\" or \"int8\", found \"",
                     options.base_dtype, "\""));
  }
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  std::unique_ptr<Model> m(new Model());
  m->config_ = config;
  m->model_dir_ = model_dir;
  try {
    torch::NoGradGuard no_grad;
    WeightSource src;
    RETURN_IF_ERROR(src.Open(model_dir, &m->files_));
    for (const auto& f : m->files_) {
      for (const auto& v : f->tensors()) {
        m->dtypes_[std::string(common::DTypeName(v.dtype))]++;
        m->checkpoint_bytes_ += static_cast<int64_t>(v.nbytes);
      }
    }
    const ModelConfig& c = m->config_;
    const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
    ASSIGN_OR_RETURN(m->embed_, src.Get("model.embed_tokens.weight", {V, H}, store));
    ASSIGN_OR_RETURN(m->norm_, src.Get("model.norm.weight", {H}));
    if (c.tie_word_embeddings) {
      m->lm_head_ = m->embed_;
    } else {
      ASSIGN_OR_RETURN(m->lm_head_, src.Get("lm_head.weight", {V, H}, store));
    }
    auto linear = [&](const std::string& name, int64_t out, int64_t in, bool bias,
                      LoraLinear* l) -> absl::Status {
      if (int8) {
        ASSIGN_OR_RETURN(torch::Tensor w, src.Get(name + ".weight", {out, in}));
        torch::Tensor scale = w.abs().amax(1).clamp_min(1e-30) / 127.0;
        l->weight = (w / scale.unsqueeze(1)).round().clamp(-127, 127).to(torch::kChar);
        l->weight_scale = scale.to(torch::kFloat).contiguous();
      } else {
        ASSIGN_OR_RETURN(l->weight, src.Get(name + ".weight", {out, in}, store));
      }
      if (bias) {
        ASSIGN_OR_RETURN(l->bias, src.Get(name + ".bias", {out}));
      }
      return absl::OkStatus();
    };
    // One layer at a time: a config claiming more layers than the checkpoint
    // holds fails at the first missing tensor instead of allocating them all.
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      DecoderLayer& L = m->layers_.emplace_back();
      const std::string p = absl::StrCat("model.layers.", i, ".");
      ASSIGN_OR_RETURN(L.input_norm, src.Get(p + "input_layernorm.weight", {H}));
      ASSIGN_OR_RETURN(L.post_norm, src.Get(p + "post_attention_layernorm.weight", {H}));
      if (c.architecture == Architecture::kPhi3) {
        RETURN_IF_ERROR(
            linear(p + "self_attn.qkv_proj", c.q_size() + 2 * c.kv_size(), H, false, &L.qkv_proj));
        RETURN_IF_ERROR(linear(p + "mlp.gate_up_proj", 2 * I, H, false, &L.gate_up_proj));
      } else {
        RETURN_IF_ERROR(linear(p + "self_attn.q_proj", c.q_size(), H, c.attention_bias, &L.q_proj));
        RETURN_IF_ERROR(
            linear(p + "self_attn.k_proj", c.kv_size(), H, c.attention_bias, &L.k_proj));
        RETURN_IF_ERROR(
            linear(p + "self_attn.v_proj", c.kv_size(), H, c.attention_bias, &L.v_proj));
        RETURN_IF_ERROR(linear(p + "mlp.gate_proj", I, H, c.mlp_bias, &L.gate_proj));
        RETURN_IF_ERROR(linear(p + "mlp.up_proj", I, H, c.mlp_bias, &L.up_proj));
      }
      RETURN_IF_ERROR(linear(p + "self_attn.o_proj", H, c.q_size(), c.o_proj_bias, &L.o_proj));
      RETURN_IF_ERROR(linear(p + "mlp.down_proj", H, I, c.mlp_bias, &L.down_proj));
    }
    m->inv_freq_ = InvFreq(c);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("loading ", model_dir, ": libtorch error: ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::ResourceExhaustedError(absl::StrCat("loading ", model_dir, ": ", e.what()));
  }
  return m;
}

torch::Tensor LoraLinear::DenseWeight() const {
  if (weight.scalar_type() == torch::kFloat) return weight;
  if (weight.scalar_type() == torch::kChar) {
    return weight.to(torch::kFloat) * weight_scale.unsqueeze(1);
  }
  return weight.to(torch::kFloat);
}

torch::Tensor LoraLinear::forward(const torch::Tensor& x, torch::Generator* dropout_gen) const {
  const torch::Tensor w = DenseWeight();
  torch::Tensor y = torch::matmul(x, w.t());
  if (bias.defined()) y = y + bias;
  if (lora_a.defined()) {
    torch::Tensor xin = x;
    if (dropout_gen != nullptr && dropout > 0) {
      torch::Tensor keep = torch::empty_like(x).bernoulli_(1.0 - dropout, *dropout_gen);
      xin = x * keep / (1.0 - dropout);
    }
    y = y + torch::matmul(torch::matmul(xin, lora_a.t()), lora_b.t()) * scale;
  }
  return y;
}

torch::Tensor Model::Embed(const torch::Tensor& ids) const {
  torch::Tensor e = torch::embedding(embed_, ids);
  return e.scalar_type() == torch::kFloat ? e : e.to(torch::kFloat);
}

torch::Tensor Model::Rms(const torch::Tensor& x, const torch::Tensor& w) const {
  torch::Tensor var = x.pow(2).mean(-1, /*keepdim=*/true);
  return w * (x * torch::rsqrt(var + config_.rms_norm_eps));
}

torch::Tensor Model::Attention(const DecoderLayer& L, int index, const torch::Tensor& h,
                               const torch::Tensor& cos, const torch::Tensor& sin, KvCache* cache,
                               int64_t past, torch::Generator* gen) const {
  const ModelConfig& c = config_;
  const int64_t B = h.size(0), T = h.size(1), D = c.head_dim;
  const int64_t nh = c.num_attention_heads, nkv = c.num_key_value_heads;
  torch::Tensor q, k, v;
  if (c.architecture == Architecture::kPhi3) {
    torch::Tensor qkv = L.qkv_proj.forward(h, gen);
    q = qkv.slice(-1, 0, c.q_size());
    k = qkv.slice(-1, c.q_size(), c.q_size() + c.kv_size());
    v = qkv.slice(-1, c.q_size() + c.kv_size());
  } else {
    q = L.q_proj.forward(h, gen);
    k = L.k_proj.forward(h, gen);
    v = L.v_proj.forward(h, gen);
  }
  q = q.reshape({B, T, nh, D}).transpose(1, 2);
  k = k.reshape({B, T, nkv, D}).transpose(1, 2);
  v = v.reshape({B, T, nkv, D}).transpose(1, 2);
  q = q * cos + RotateHalf(q) * sin;
  k = k * cos + RotateHalf(k) * sin;
  if (cache != nullptr) {
    auto& ck = cache->k[static_cast<size_t>(index)];
    auto& cv = cache->v[static_cast<size_t>(index)];
    if (ck.defined()) {
      k = torch::cat({ck, k}, 2);
      v = torch::cat({cv, v}, 2);
    }
    ck = k;
    cv = v;
  }
  const int64_t S = k.size(2);
  if (nh != nkv) {
    const int64_t rep = nh / nkv;
    k = k.unsqueeze(2).expand({B, nkv, rep, S, D}).reshape({B, nh, S, D});
    v = v.unsqueeze(2).expand({B, nkv, rep, S, D}).reshape({B, nh, S, D});
  }
  torch::Tensor scores = torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(D));
  if (T > 1 || c.sliding_window > 0) {
    // Query i sits at absolute position past + i; key j is visible iff
    // j <= past + i (and past + i - j < window with sliding-window attention).
    torch::Tensor qpos = torch::arange(past, past + T, torch::kLong).unsqueeze(1);
    torch::Tensor kpos = torch::arange(0, S, torch::kLong).unsqueeze(0);
    torch::Tensor masked = kpos > qpos;
    if (c.sliding_window > 0) {
      masked = torch::logical_or(masked, (qpos - kpos) >= c.sliding_window);
    }
    scores = scores.masked_fill(masked, -std::numeric_limits<float>::infinity());
  }
  torch::Tensor probs = torch::softmax(scores, -1);
  torch::Tensor out = torch::matmul(probs, v).transpose(1, 2).reshape({B, T, nh * D});
  return L.o_proj.forward(out, gen);
}

torch::Tensor Model::Mlp(const DecoderLayer& L, const torch::Tensor& h,
                         torch::Generator* gen) const {
  torch::Tensor gate, up;
  if (config_.architecture == Architecture::kPhi3) {
    torch::Tensor gu = L.gate_up_proj.forward(h, gen);
    gate = gu.slice(-1, 0, config_.intermediate_size);
    up = gu.slice(-1, config_.intermediate_size);
  } else {
    gate = L.gate_proj.forward(h, gen);
    up = L.up_proj.forward(h, gen);
  }
  return L.down_proj.forward(torch::silu(gate) * up, gen);
}

torch::Tensor Model::Forward(const torch::Tensor& ids, KvCache* cache,
                             torch::Generator* dropout_gen, bool last_only) const {
  return Logits(ForwardHidden(ids, cache, dropout_gen, last_only));
}

torch::Tensor Model::Logits(const torch::Tensor& hidden) const {
  const torch::Tensor head =
      lm_head_.scalar_type() == torch::kFloat ? lm_head_ : lm_head_.to(torch::kFloat);
  return torch::matmul(hidden, head.t());
}

torch::Tensor Model::ForwardHidden(const torch::Tensor& ids, KvCache* cache,
                                   torch::Generator* dropout_gen, bool last_only) const {
  TORCH_CHECK(ids.dim() == 2, "Forward: expected ids of shape [B, T], found ", ids.sizes());
  TORCH_CHECK(ids.size(1) > 0, "Forward: expected at least one token");
  TORCH_CHECK(ids.scalar_type() == torch::kLong, "Forward: expected int64 ids");
  if (ids.numel() > 0) {
    const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < config_.vocab_size, "Forward: token id out of range [0, ",
                config_.vocab_size, "): found ", lo < 0 ? lo : hi);
  }
  const int64_t T = ids.size(1);
  int64_t past = 0;
  if (cache != nullptr) {
    if (cache->k.empty()) {
      cache->k.resize(layers_.size());
      cache->v.resize(layers_.size());
      cache->length = 0;
    }
    TORCH_CHECK(cache->k.size() == layers_.size(), "Forward: KV cache has ", cache->k.size(),
                " layers, model has ", layers_.size());
    past = cache->length;
  }
  torch::Tensor pos = torch::arange(past, past + T, torch::kLong).to(torch::kFloat);
  torch::Tensor freqs = torch::outer(pos, inv_freq_);  // [T, D/2]
  torch::Tensor emb = torch::cat({freqs, freqs}, -1);  // [T, D]
  torch::Tensor cos = emb.cos(), sin = emb.sin();

  torch::Tensor x = Embed(ids);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const DecoderLayer& L = layers_[i];
    x = x +
        Attention(L, static_cast<int>(i), Rms(x, L.input_norm), cos, sin, cache, past, dropout_gen);
    x = x + Mlp(L, Rms(x, L.post_norm), dropout_gen);
  }
  if (cache != nullptr) cache->length = past + T;
  if (last_only) x = x.slice(1, T - 1);
  return Rms(x, norm_);
}

std::vector<int64_t> Model::GenerateGreedy(const std::vector<int64_t>& prompt, int max_new_tokens,
                                           const std::vector<int64_t>& stop_ids) const {
  TORCH_CHECK(!prompt.empty(), "GenerateGreedy: expected a non-empty prompt");
  torch::NoGradGuard no_grad;
  KvCache cache;
  std::vector<int64_t> out;
  torch::Tensor ids = torch::tensor(prompt, torch::kLong).unsqueeze(0);
  for (int step = 0; step < max_new_tokens; ++step) {
    torch::Tensor logits = Forward(ids, &cache, nullptr, /*last_only=*/true);
    const int64_t next = logits.reshape({-1}).argmax().item<int64_t>();
    out.push_back(next);
    if (std::find(stop_ids.begin(), stop_ids.end(), next) != stop_ids.end()) break;
    ids = torch::full({1, 1}, next, torch::kLong);
  }
  return out;
}

std::vector<Model::Adaptable> Model::AdaptableModules() {
  std::vector<Adaptable> out;
  for (size_t i = 0; i < layers_.size(); ++i) {
    DecoderLayer& L = layers_[i];
    const std::string p = absl::StrCat("base_model.model.model.layers.", i, ".");
    auto add = [&](const char* group, const char* name, LoraLinear* l) {
      out.push_back({absl::StrCat(p, group, ".", name), name, static_cast<int>(i), l});
    };
    if (config_.architecture == Architecture::kPhi3) {
      add("self_attn", "qkv_proj", &L.qkv_proj);
      add("self_attn", "o_proj", &L.o_proj);
      add("mlp", "gate_up_proj", &L.gate_up_proj);
      add("mlp", "down_proj", &L.down_proj);
    } else {
      add("self_attn", "q_proj", &L.q_proj);
      add("self_attn", "k_proj", &L.k_proj);
      add("self_attn", "v_proj", &L.v_proj);
      add("self_attn", "o_proj", &L.o_proj);
      add("mlp", "gate_proj", &L.gate_proj);
      add("mlp", "up_proj", &L.up_proj);
      add("mlp", "down_proj", &L.down_proj);
    }
  }
  return out;
}

std::vector<const LoraLinear*> Model::AllLinears() const {
  std::vector<const LoraLinear*> out;
  for (const Adaptable& a : const_cast<Model*>(this)->AdaptableModules()) out.push_back(a.linear);
  return out;
}

std::vector<std::string> Model::ModuleNames() const {
  if (config_.architecture == Architecture::kPhi3) {
    return {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"};
  }
  return {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
}

std::map<std::string, torch::Tensor> Model::NamedParameters() const {
  std::map<std::string, torch::Tensor> out;
  out["model.embed_tokens.weight"] = embed_;
  out["model.norm.weight"] = norm_;
  if (!config_.tie_word_embeddings) out["lm_head.weight"] = lm_head_;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const DecoderLayer& L = layers_[i];
    const std::string p = absl::StrCat("model.layers.", i, ".");
    out[p + "input_layernorm.weight"] = L.input_norm;
    out[p + "post_attention_layernorm.weight"] = L.post_norm;
    auto add = [&](const std::string& name, const LoraLinear& l) {
      if (!l.weight.defined()) return;
      out[p + name + ".weight"] = l.weight;
      if (l.bias.defined()) out[p + name + ".bias"] = l.bias;
    };
    add("self_attn.q_proj", L.q_proj);
    add("self_attn.k_proj", L.k_proj);
    add("self_attn.v_proj", L.v_proj);
    add("self_attn.qkv_proj", L.qkv_proj);
    add("self_attn.o_proj", L.o_proj);
    add("mlp.gate_proj", L.gate_proj);
    add("mlp.up_proj", L.up_proj);
    add("mlp.gate_up_proj", L.gate_up_proj);
    add("mlp.down_proj", L.down_proj);
  }
  return out;
}

int64_t Model::NumParameters() const {
  int64_t n = 0;
  for (const auto& [name, t] : NamedParameters()) n += t.numel();
  return n;
}

}  // namespace fedlora::edge
