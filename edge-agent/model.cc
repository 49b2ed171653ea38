#include "edge-agent/model.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <ATen/autocast_mode.h>

#include <atomic>
#include <cmath>
#include <optional>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/crypto/crypto.h"
#include "common/status/status.h"
#include "edge-agent/attention.h"
#include "edge-agent/fused_ops.h"
#include "edge-agent/gemm.h"
#include "edge-agent/head_loss.h"
#include "nlohmann/json.hpp"
#include "torch/csrc/autograd/custom_function.h"

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
    if (src != store) {
      t = t.to(store);
      Release(name);
    }
    return t;
  }

  // Drops the resident pages of `name`'s bytes in the mapping once a converted
  // copy exists, so the fp32 checkpoint and its conversion are not both
  // resident. Only whole pages inside the tensor are dropped; the mapping is
  // read-only and private, so a later access would just re-read the file.
  void Release(const std::string& name) {
    auto it = views_.find(name);
    if (it == views_.end()) return;
    const common::TensorView& v = *it->second.view;
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(v.data) + page - 1) / page * page;
    const uintptr_t end = (reinterpret_cast<uintptr_t>(v.data) + v.nbytes) / page * page;
    if (end > begin) {
      (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
    }
  }

 private:
  struct Entry {
    common::SafetensorsFile* file;
    const common::TensorView* view;
  };
  std::map<std::string, Entry> views_;
  std::set<std::string> used_;
};

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

ModelLoadOptions LoadOptionsFor(const std::string& base_dtype, bool bf16_autocast) {
  ModelLoadOptions o;
  o.base_dtype = base_dtype == "auto" ? "fp32" : base_dtype;
  o.autocast_bf16_weights = base_dtype == "auto" && bf16_autocast;
  return o;
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& model_dir,
                                                   const ModelLoadOptions& options) {
  torch::ScalarType store;
  bool int8 = false, int4 = false;
  if (options.base_dtype == "fp32") {
    store = torch::kFloat;
  } else if (options.base_dtype == "bf16") {
    store = torch::kBFloat16;
  } else if (options.base_dtype == "fp16") {
    store = torch::kHalf;
  } else if (options.base_dtype == "int8") {
    store = torch::kBFloat16;  // embeddings and lm_head
    int8 = true;
  } else if (options.base_dtype == "int4") {
    store = torch::kBFloat16;  // embeddings and lm_head
    int4 = true;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "base_dtype: expected \"fp32\", \"bf16\", \"fp16\", \"int8\" or \"int4\", found \"",
        options.base_dtype, "\""));
  }
  if (options.autocast_bf16_weights && options.base_dtype != "fp32") {
    return absl::InvalidArgumentError(absl::StrCat(
        "autocast_bf16_weights: applies to base_dtype \"fp32\" only, found \"",
        options.base_dtype, "\""));
  }
  // The dtype of the weights autocast reads rounded: the projections and lm_head.
  const torch::ScalarType product_store = options.autocast_bf16_weights ? torch::kBFloat16 : store;
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
      ASSIGN_OR_RETURN(m->lm_head_, src.Get("lm_head.weight", {V, H}, product_store));
    }
    auto linear = [&](const std::string& name, int64_t out, int64_t in, bool bias,
                      LoraLinear* l) -> absl::Status {
      if (int8) {
        ASSIGN_OR_RETURN(torch::Tensor w, src.Get(name + ".weight", {out, in}));
        torch::Tensor scale = w.abs().amax(1).clamp_min(1e-30) / 127.0;
        l->weight = (w / scale.unsqueeze(1)).round().clamp(-127, 127).to(torch::kChar);
        l->weight_scale = scale.to(torch::kFloat).contiguous();
        src.Release(name + ".weight");
      } else if (int4) {
        ASSIGN_OR_RETURN(torch::Tensor w, src.Get(name + ".weight", {out, in}));
        QuantizeInt4(w, l);
        src.Release(name + ".weight");
      } else {
        ASSIGN_OR_RETURN(l->weight, src.Get(name + ".weight", {out, in}, product_store));
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

void QuantizeInt4(const torch::Tensor& w, LoraLinear* l) {
  torch::NoGradGuard no_grad;
  const int64_t out = w.size(0), in = w.size(1), g = LoraLinear::kInt4Group;
  const int64_t groups = (in + g - 1) / g;
  torch::Tensor padded = w.to(torch::kFloat);
  if (groups * g != in) {
    padded = torch::nn::functional::pad(padded, torch::nn::functional::PadFuncOptions({0, groups * g - in}));
  }
  padded = padded.reshape({out, groups, g});
  torch::Tensor scale = padded.abs().amax(-1, /*keepdim=*/true).clamp_min(1e-30) / 7.0;
  torch::Tensor codes = (padded / scale).round().clamp(-8, 7).add(8).to(torch::kByte);
  codes = codes.reshape({out, groups * g / 2, 2});
  // Codes are <= 15, so hi * 16 + lo fits a byte.
  l->weight = (codes.select(2, 0) + codes.select(2, 1) * 16).contiguous();
  l->weight_scale = scale.reshape({out, groups}).contiguous();
  l->int4_in = in;
}

torch::Tensor DequantizeWeight(const torch::Tensor& weight, const torch::Tensor& weight_scale,
                               int64_t int4_in) {
  switch (weight.scalar_type()) {
    case torch::kFloat:
      return weight;
    case torch::kChar:
      return weight.to(torch::kFloat) * weight_scale.unsqueeze(1);
    case torch::kByte: {
      const int64_t out = weight.size(0), packed = weight.size(1);
      const int64_t groups = weight_scale.size(1);
      torch::Tensor w = torch::empty({out, packed, 2}, torch::kFloat);
      w.select(2, 0).copy_(weight.bitwise_and(15));
      w.select(2, 1).copy_(weight.bitwise_right_shift(4));
      torch::Tensor s = weight_scale.unsqueeze(-1);
      w = w.view({out, groups, -1}).mul_(s).sub_(s * 8.0).view({out, packed * 2});
      return packed * 2 == int4_in ? w : w.slice(1, 0, int4_in);
    }
    default:
      return weight.to(torch::kFloat);
  }
}

namespace {

// Rows of a compact weight dequantized at a time: a large matrix (the lm_head
// or embedding, vocab x hidden) is never converted to fp32 as a whole.
constexpr int64_t kDequantRows = 4096;

// Whether a weight's products run on it whole: fp32 (used in place) or small
// enough to dequantize at once.
bool WholeWeight(const torch::Tensor& weight) {
  return weight.size(0) <= kDequantRows || weight.scalar_type() == torch::kFloat;
}

torch::Tensor ScaleRows(const torch::Tensor& scale, int64_t r0, int64_t r1) {
  return scale.defined() && scale.numel() > 0 ? scale.slice(0, r0, r1) : scale;
}

// x W^T with W dequantized kDequantRows rows at a time.
torch::Tensor DequantMatmul(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& weight_scale, int64_t int4_in) {
  const int64_t rows = weight.size(0);
  if (WholeWeight(weight)) {
    return MatmulNT(x, DequantizeWeight(weight, weight_scale, int4_in));
  }
  torch::Tensor out;
  for (int64_t r0 = 0; r0 < rows; r0 += kDequantRows) {
    const int64_t r1 = std::min(rows, r0 + kDequantRows);
    torch::Tensor part = MatmulNT(
        x, DequantizeWeight(weight.slice(0, r0, r1), ScaleRows(weight_scale, r0, r1), int4_in));
    if (!out.defined()) {
      std::vector<int64_t> shape(part.sizes().begin(), part.sizes().end());
      shape.back() = rows;
      out = torch::empty(shape, part.options());
    }
    out.slice(-1, r0, r1).copy_(part);
  }
  return out;
}

// g W (the input gradient of x W^T), W dequantized kDequantRows rows at a time.
torch::Tensor DequantGradInput(const torch::Tensor& g, const torch::Tensor& weight,
                               const torch::Tensor& weight_scale, int64_t int4_in) {
  const int64_t rows = weight.size(0);
  if (WholeWeight(weight)) {
    torch::Tensor w = DequantizeWeight(weight, weight_scale, int4_in);
    if (w.scalar_type() != g.scalar_type()) w = w.to(g.scalar_type());
    return MatmulNN(g, w);
  }
  torch::Tensor gx;
  for (int64_t r0 = 0; r0 < rows; r0 += kDequantRows) {
    const int64_t r1 = std::min(rows, r0 + kDequantRows);
    torch::Tensor w =
        DequantizeWeight(weight.slice(0, r0, r1), ScaleRows(weight_scale, r0, r1), int4_in);
    if (w.scalar_type() != g.scalar_type()) w = w.to(g.scalar_type());
    torch::Tensor part = MatmulNN(g.slice(-1, r0, r1), w);
    gx = gx.defined() ? gx.add_(part) : part;
  }
  return gx;
}

// Frozen-projection outputs of a checkpointed layer: recorded by its forward,
// replayed (in the same order) by its recompute in backward instead of running
// the GEMMs again. Set per thread by CheckpointedLayerFn for the duration of the
// layer's forward or recompute.
struct GemmReplay {
  bool record = true;
  std::vector<torch::Tensor> outputs;
  size_t next = 0;
};
thread_local GemmReplay* g_gemm_replay = nullptr;

class GemmReplayScope {
 public:
  explicit GemmReplayScope(GemmReplay* r) : saved_(g_gemm_replay) { g_gemm_replay = r; }
  ~GemmReplayScope() { g_gemm_replay = saved_; }
  GemmReplayScope(const GemmReplayScope&) = delete;
  GemmReplayScope& operator=(const GemmReplayScope&) = delete;

 private:
  GemmReplay* saved_;
};

// x W^T, or the recorded output of this call when replaying (checked against
// the expected shape; a mismatch stops the replay and computes).
torch::Tensor ComputeOrReplay(const torch::Tensor& x, const torch::Tensor& weight,
                              const torch::Tensor& weight_scale, int64_t int4_in) {
  GemmReplay* r = g_gemm_replay;
  if (r != nullptr && !r->record) {
    if (r->next < r->outputs.size()) {
      torch::Tensor y = r->outputs[r->next];
      std::vector<int64_t> expect(x.sizes().begin(), x.sizes().end());
      expect.back() = weight.size(0);
      if (y.sizes() == c10::IntArrayRef(expect)) {
        r->outputs[r->next++] = torch::Tensor();  // handed over: freed with its last use
        return y;
      }
    }
    r->outputs.clear();  // out of step: compute from here on
    r->next = 0;
  }
  torch::Tensor y = DequantMatmul(x, weight, weight_scale, int4_in);
  if (r != nullptr && r->record) r->outputs.push_back(y);
  return y;
}

// y = x W^T for a frozen W: autograd would otherwise hold the converted fp32 W
// of every compact layer until backward, and an fp32 W's products would run on
// BLAS instead of oneDNN (gemm.h).
class FrozenMatmulFn : public torch::autograd::Function<FrozenMatmulFn> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight, const torch::Tensor& weight_scale,
                               int64_t int4_in) {
    ctx->save_for_backward({weight, weight_scale});
    ctx->saved_data["int4_in"] = int4_in;
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    return ComputeOrReplay(x, weight, weight_scale, int4_in);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor& g = grads[0];
    torch::Tensor gx = DequantGradInput(g, saved[0], saved[1], ctx->saved_data["int4_in"].toInt());
    const auto x_dtype = static_cast<torch::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    if (gx.scalar_type() != x_dtype) gx = gx.to(x_dtype);
    return {gx, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// Whether a frozen product under CPU autocast runs as MatmulNTBf16 (gemm.h):
// autocast to bf16 on the oneDNN backend. The weight (fp32 or bf16) and the
// input are rounded to bf16, the product accumulates in fp32 and stays fp32, so
// what follows (residual adds, norms, attention, the LoRA branch) takes fp32
// without a widening copy. Otherwise autocast's own matmul (bf16 result).
bool DirectBf16Product() {
  return at::autocast::get_autocast_cpu_dtype() == at::kBFloat16 &&
         gemm_backend() == GemmBackend::kOnednn;
}

// Under CPU autocast with a frozen W: y = x W^T with bf16 operands, as
// autocast's own matmul computes it, but the low-precision copy of W made for
// it is not kept for backward (autograd's matmul keeps one per projection until
// then: 212 MB of bf16 on smollm135m); backward converts W again.
class AutocastFrozenMatmulFn : public torch::autograd::Function<AutocastFrozenMatmulFn> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight) {
    const bool direct = DirectBf16Product();
    ctx->save_for_backward({weight});
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["low"] = static_cast<int64_t>(at::autocast::get_autocast_cpu_dtype());
    ctx->saved_data["direct"] = direct;
    if (direct) return MatmulNTBf16(x, weight);
    return torch::matmul(x, weight.t());  // autocast casts both operands
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::Tensor weight = ctx->get_saved_variables()[0];
    const auto low = static_cast<torch::ScalarType>(ctx->saved_data["low"].toInt());
    const auto x_dtype = static_cast<torch::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    const torch::Tensor& g = grads[0];
    torch::Tensor gx;
    if (ctx->saved_data["direct"].toBool()) {
      gx = MatmulNNBf16(g, weight);
    } else {
      gx = torch::matmul(g.scalar_type() == low ? g : g.to(low),
                         weight.scalar_type() == low ? weight : weight.to(low));
    }
    return {gx.scalar_type() == x_dtype ? gx : gx.to(x_dtype), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor FrozenMatmul(const torch::Tensor& x, const torch::Tensor& weight,
                           const torch::Tensor& weight_scale, int64_t int4_in) {
  if (at::autocast::is_cpu_enabled() &&
      (weight.scalar_type() == torch::kFloat ||
       weight.scalar_type() == at::autocast::get_autocast_cpu_dtype())) {
    // Autocast picks the product's dtype; a weight stored in it is used as is
    // (not widened to fp32 and narrowed back).
    if (torch::GradMode::is_enabled() && x.requires_grad()) {
      return AutocastFrozenMatmulFn::apply(x, weight);
    }
    if (DirectBf16Product()) return MatmulNTBf16(x, weight);
    return torch::matmul(x, weight.t());
  }
  if (torch::GradMode::is_enabled() && x.requires_grad()) {
    // Function::apply needs defined tensors; bf16 / fp16 weights have no scale.
    return FrozenMatmulFn::apply(
        x, weight, weight_scale.defined() ? weight_scale : torch::empty({0}), int4_in);
  }
  return ComputeOrReplay(x, weight, weight_scale, int4_in);
}

torch::Tensor LoraLinear::DenseWeight() const {
  return DequantizeWeight(weight, weight_scale, int4_in);
}

namespace {

// CPU autocast off for its lifetime (the state restored after).
class NoAutocast {
 public:
  NoAutocast() : saved_(at::autocast::is_cpu_enabled()) { at::autocast::set_cpu_enabled(false); }
  ~NoAutocast() { at::autocast::set_cpu_enabled(saved_); }
  NoAutocast(const NoAutocast&) = delete;
  NoAutocast& operator=(const NoAutocast&) = delete;

 private:
  bool saved_;
};

// The LoRA branch (x A^T) B^T * scale as one autograd node whose four
// products (forward two, backward up to four) run on oneDNN (gemm.h): through
// autograd's matmul they ran on OpenBLAS, which packs the whole activation for
// a product only r columns wide. Saves x (the caller keeps it anyway) and the
// [..., r] intermediate. fp32 only (LoraDeltaApplies); under autocast it turns
// autocast off for its products, which stay fp32 on oneDNN (they are r
// columns wide: rounding them to bf16 would save little and lose precision).
class LoraDeltaFn : public torch::autograd::Function<LoraDeltaFn> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& a, const torch::Tensor& b, double scale) {
    NoAutocast no_autocast;
    // The scale goes on the [..., r] intermediate, not the [..., out] result.
    torch::Tensor hs = MatmulNT(x, a).mul_(scale);  // [..., r]
    ctx->save_for_backward({x, a, b, hs});
    ctx->saved_data["scale"] = scale;
    return MatmulNT(hs, b);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &x = saved[0], &a = saved[1], &b = saved[2], &hs = saved[3];
    const double scale = ctx->saved_data["scale"].toDouble();
    const torch::Tensor g = grads[0].contiguous();
    torch::Tensor gx, ga, gb;
    if (ctx->needs_input_grad(2)) gb = MatmulTN(g, hs);  // [out, r]
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1)) {
      torch::Tensor gh = MatmulNN(g, b).mul_(scale);  // [..., r]
      if (ctx->needs_input_grad(1)) ga = MatmulTN(gh, x);  // [r, in]
      if (ctx->needs_input_grad(0)) gx = MatmulNN(gh, a);  // [..., in]
    }
    return {gx, ga, gb, torch::Tensor()};
  }
};

bool LoraDeltaApplies(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& b) {
  return gemm_backend() == GemmBackend::kOnednn && x.scalar_type() == torch::kFloat &&
         a.scalar_type() == torch::kFloat && b.scalar_type() == torch::kFloat && x.dim() >= 1 &&
         x.numel() > 0;
}

// Projections with adapters of one rank and scale that read the same input x
// (one projection, or q, k and v, or gate and up) as one autograd node, for
// training on the oneDNN path. Forward: y_i = x W_i^T (+ bias_i), then
// y_i += ((x A_i^T) scale) B_i^T added by the GEMM into y_i's memory (a oneDNN
// sum post-op), with the adapters' A stacked ([n r, in]) so that x A^T is one
// GEMM. Backward: gx = sum_i g_i W_i, each added by its GEMM into gx (fp32
// weights; other dtypes through add_), then gx += ((g B) scale) A_stacked;
// the A gradients are one GEMM too. Against a frozen node plus a LoRA node per
// projection this saves the [.., out] deltas and their adds, the adapters'
// [.., in] input gradients and autograd's adds of them, and all but one graph
// node. The frozen products are FrozenMatmulFn's (any stored dtype), or under
// bf16 autocast (`bf16`) MatmulNTBf16's; the adapters' products are fp32
// either way. lora: a_0, b_0, a_1, b_1, ...; frozen: weight_i, weight_scale_i,
// bias_i (empty when none) per projection.
class AdaptedProjectionsFn : public torch::autograd::Function<AdaptedProjectionsFn> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const torch::Tensor& x, at::TensorList lora,
                                                at::TensorList frozen, double scale,
                                                int64_t int4_in, bool bf16) {
    NoAutocast no_autocast;
    const int64_t n = static_cast<int64_t>(lora.size() / 2), r = lora[0].size(0);
    std::vector<torch::Tensor> as, saved = {x};
    for (int64_t i = 0; i < n; ++i) as.push_back(lora[2 * i]);
    const torch::Tensor a_cat = torch::cat(as, 0);             // [n r, in]
    const torch::Tensor hs = MatmulNT(x, a_cat).mul_(scale);  // [..., n r]
    saved.push_back(a_cat);
    saved.push_back(hs);
    torch::autograd::variable_list ys;
    for (int64_t i = 0; i < n; ++i) {
      const torch::Tensor &w = frozen[3 * i], &ws = frozen[3 * i + 1], &bias = frozen[3 * i + 2];
      torch::Tensor y = bf16 ? MatmulNTBf16(x, w) : ComputeOrReplay(x, w, ws, int4_in);
      if (bias.numel() > 0) y.add_(bias);
      MatmulNTAccumulate(hs.narrow(-1, i * r, r), lora[2 * i + 1], y);
      ys.push_back(y);
      saved.push_back(lora[2 * i + 1]);
      saved.push_back(w);
      saved.push_back(ws);
    }
    ctx->save_for_backward(saved);
    ctx->set_materialize_grads(false);  // an unused output: no gradients for its adapter
    ctx->saved_data["n"] = n;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["int4_in"] = int4_in;
    ctx->saved_data["bf16"] = bf16;
    return ys;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &x = saved[0], &a_cat = saved[1], &hs = saved[2];
    const int64_t n = ctx->saved_data["n"].toInt(), r = a_cat.size(0) / n;
    const double scale = ctx->saved_data["scale"].toDouble();
    const bool bf16 = ctx->saved_data["bf16"].toBool();
    const int64_t int4_in = ctx->saved_data["int4_in"].toInt();
    const bool need_x = ctx->needs_input_grad(0);
    bool need_a = false;
    for (int64_t i = 0; i < n; ++i) need_a = need_a || ctx->needs_input_grad(1 + 2 * i);
    // x, the LoRA tensors, the frozen tensors, then scale, int4_in, bf16.
    torch::autograd::variable_list out(1 + 2 * n + 3 * n + 3);
    torch::Tensor gx, gh;
    // [..., n r]: each adapter's (g B) scale; an unused output's columns stay 0.
    if (need_x || need_a) gh = torch::zeros(hs.sizes(), hs.options());
    for (int64_t i = 0; i < n; ++i) {
      if (!grads[i].defined()) continue;
      const torch::Tensor g = grads[i].contiguous();
      const torch::Tensor &b = saved[3 + 3 * i], &w = saved[4 + 3 * i], &ws = saved[5 + 3 * i];
      if (need_x) {
        if (!gx.defined()) {
          gx = bf16 ? MatmulNNBf16(g, w) : DequantGradInput(g, w, ws, int4_in);
        } else if (!bf16 && w.scalar_type() == torch::kFloat) {
          MatmulNNAccumulate(g, w, gx);
        } else {
          gx.add_(bf16 ? MatmulNNBf16(g, w) : DequantGradInput(g, w, ws, int4_in));
        }
      }
      if (ctx->needs_input_grad(2 + 2 * i)) out[2 + 2 * i] = MatmulTN(g, hs.narrow(-1, i * r, r));
      if (gh.defined()) gh.narrow(-1, i * r, r).copy_(MatmulNN(g, b).mul_(scale));
    }
    if (need_a) {
      const torch::Tensor ga = MatmulTN(gh, x);  // [n r, in]
      for (int64_t i = 0; i < n; ++i) {
        if (ctx->needs_input_grad(1 + 2 * i) && grads[i].defined()) {
          out[1 + 2 * i] = ga.narrow(0, i * r, r);
        }
      }
    }
    if (need_x && gx.defined()) MatmulNNAccumulate(gh, a_cat, gx);
    out[0] = gx;
    return out;
  }
};

// How a projection with an adapter trains as one node (AdaptedProjectionsFn):
// on the oneDNN path, when no dropout applies, no checkpointed layer records
// or replays the frozen product, and the frozen product is fp32 (any stored
// dtype, autocast off: kFp32) or autocast's bf16 one taken directly (kBf16).
// kNo: the frozen node plus the LoRA node.
enum class OneNode { kNo, kFp32, kBf16 };
OneNode OneNodeMode(const LoraLinear& l, const torch::Tensor& x, torch::Generator* dropout_gen) {
  if (!l.lora_a.defined() || !torch::GradMode::is_enabled() ||
      !(x.requires_grad() || l.lora_a.requires_grad() || l.lora_b.requires_grad()) ||
      g_gemm_replay != nullptr || (dropout_gen != nullptr && l.dropout > 0) ||
      !LoraDeltaApplies(x, l.lora_a, l.lora_b)) {
    return OneNode::kNo;
  }
  if (!at::autocast::is_cpu_enabled()) return OneNode::kFp32;
  const bool bf16 = DirectBf16Product() && (l.weight.scalar_type() == torch::kFloat ||
                                            l.weight.scalar_type() == torch::kBFloat16);
  return bf16 ? OneNode::kBf16 : OneNode::kNo;
}

torch::Tensor OrEmpty(const torch::Tensor& t) { return t.defined() ? t : torch::empty({0}); }

// The projections through one AdaptedProjectionsFn (their OneNodeMode `mode`).
std::vector<torch::Tensor> AdaptedProjections(const std::vector<const LoraLinear*>& projections,
                                              const torch::Tensor& x, OneNode mode) {
  std::vector<torch::Tensor> lora, frozen;
  for (const LoraLinear* l : projections) {
    lora.push_back(l->lora_a);
    lora.push_back(l->lora_b);
    frozen.push_back(l->weight);
    frozen.push_back(OrEmpty(l->weight_scale));
    frozen.push_back(OrEmpty(l->bias));
  }
  const LoraLinear& first = *projections.front();
  return AdaptedProjectionsFn::apply(x, at::TensorList(lora), at::TensorList(frozen), first.scale,
                                     first.int4_in, mode == OneNode::kBf16);
}

}  // namespace

std::vector<torch::Tensor> ForwardSharedInput(const std::vector<const LoraLinear*>& projections,
                                              const torch::Tensor& x,
                                              torch::Generator* dropout_gen) {
  const LoraLinear& first = *projections.front();
  OneNode mode = OneNodeMode(first, x, dropout_gen);
  for (size_t i = 1; i < projections.size() && mode != OneNode::kNo; ++i) {
    const LoraLinear* l = projections[i];
    if (OneNodeMode(*l, x, dropout_gen) != mode || l->lora_a.size(0) != first.lora_a.size(0) ||
        l->scale != first.scale || l->int4_in != first.int4_in) {
      mode = OneNode::kNo;
    }
  }
  if (mode != OneNode::kNo) return AdaptedProjections(projections, x, mode);
  std::vector<torch::Tensor> out;
  for (const LoraLinear* l : projections) out.push_back(l->forward(x, dropout_gen));
  return out;
}

torch::Tensor LoraLinear::forward(const torch::Tensor& x, torch::Generator* dropout_gen) const {
  const OneNode mode = OneNodeMode(*this, x, dropout_gen);
  if (mode != OneNode::kNo) return AdaptedProjections({this}, x, mode)[0];
  torch::Tensor y = FrozenMatmul(x, weight, weight_scale, int4_in);
  // y is this call's own tensor (the frozen node does not save it), unless a
  // checkpointed layer's forward is recording it for replay.
  bool own_y = g_gemm_replay == nullptr || !g_gemm_replay->record;
  if (bias.defined()) {
    y = y + bias;
    own_y = true;
  }
  if (lora_a.defined()) {
    torch::Tensor xin = x;
    if (dropout_gen != nullptr && dropout > 0) {
      torch::Tensor keep = torch::empty_like(x).bernoulli_(1.0 - dropout, *dropout_gen);
      xin = x * keep / (1.0 - dropout);
    }
    if (LoraDeltaApplies(xin, lora_a, lora_b)) {
      torch::Tensor delta = LoraDeltaFn::apply(xin, lora_a, lora_b, scale);
      // In place when the sum keeps y's dtype: one pass over y, no new buffer.
      y = own_y && y.scalar_type() == delta.scalar_type() ? y.add_(delta) : y + delta;
    } else {
      y = y + torch::matmul(torch::matmul(xin, lora_a.t()), lora_b.t()) * scale;
    }
  }
  return y;
}

torch::Tensor Model::Embed(const torch::Tensor& ids) const {
  torch::Tensor e = torch::embedding(embed_, ids);
  return e.scalar_type() == torch::kFloat ? e : e.to(torch::kFloat);
}

torch::Tensor Model::Rms(const torch::Tensor& x, const torch::Tensor& w) const {
  return RmsNorm(x, w, config_.rms_norm_eps);
}

namespace {

// VisibleRangeStarts of a packing mask, worked out once per mask: every layer
// (and its recompute under checkpointing) gets the same mask tensor. The cache
// holds a weak reference to the mask: its memory is freed with the mask, but the
// tensor object's address cannot be reused while the reference exists; an
// in-place change shows in its version counter.
torch::Tensor PackedStarts(const torch::Tensor& masked, int64_t B, int64_t T) {
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    WeakImpl mask{c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
    torch::Tensor starts;
    int64_t version = 0, B = 0, T = 0;
  };
  thread_local Entry cache;
  const int64_t version = masked._version();
  if (!cache.mask.expired() && cache.mask._unsafe_get_target() == masked.unsafeGetTensorImpl() &&
      cache.version == version && cache.B == B && cache.T == T) {
    return cache.starts;
  }
  cache = Entry{WeakImpl(masked.getIntrusivePtr()), VisibleRangeStarts(masked, B, T), version, B,
                T};
  return cache.starts;
}

}  // namespace

torch::Tensor Model::Attention(const DecoderLayer& L, int index, const torch::Tensor& h,
                               const torch::Tensor& cos, const torch::Tensor& sin, KvCache* cache,
                               int64_t past, torch::Generator* gen,
                               const torch::Tensor& masked_in) const {
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
    const std::vector<torch::Tensor> qkv =
        ForwardSharedInput({&L.q_proj, &L.k_proj, &L.v_proj}, h, gen);
    q = qkv[0];
    k = qkv[1];
    v = qkv[2];
  }
  q = q.reshape({B, T, nh, D}).transpose(1, 2);
  k = k.reshape({B, T, nkv, D}).transpose(1, 2);
  v = v.reshape({B, T, nkv, D}).transpose(1, 2);
  q = Rope(q, cos, sin);
  k = Rope(k, cos, sin);
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
  // Under autocast v leaves its projection in bf16 while RoPE widened q and k.
  if (fused_attention_ && q.scalar_type() == torch::kFloat && v.scalar_type() != torch::kFloat) {
    v = v.to(torch::kFloat);
  }
  if (fused_attention_ && past == 0 && S == T && FusedAttentionApplies(q, k, v)) {
    // A packing mask (sliding window included) that leaves each query a
    // contiguous range of keys runs fused too, as per-query starts.
    const torch::Tensor starts =
        masked_in.defined() ? PackedStarts(masked_in, B, T) : torch::Tensor();
    if (!masked_in.defined() || starts.defined()) {
      torch::Tensor out =
          FusedCausalAttention(q, k, v, 1.0 / std::sqrt(static_cast<double>(D)),
                               masked_in.defined() ? 0 : c.sliding_window, starts);
      return L.o_proj.forward(out.transpose(1, 2).reshape({B, T, nh * D}), gen);
    }
  }
  if (nh != nkv) {
    const int64_t rep = nh / nkv;
    k = k.unsqueeze(2).expand({B, nkv, rep, S, D}).reshape({B, nh, S, D});
    v = v.unsqueeze(2).expand({B, nkv, rep, S, D}).reshape({B, nh, S, D});
  }
  torch::Tensor scores = torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(D));
  if (masked_in.defined()) {
    scores = scores.masked_fill(masked_in, -std::numeric_limits<float>::infinity());
  } else if (T > 1 || c.sliding_window > 0) {
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
    const std::vector<torch::Tensor> gu = ForwardSharedInput({&L.gate_proj, &L.up_proj}, h, gen);
    gate = gu[0];
    up = gu[1];
  }
  return L.down_proj.forward(SwiGlu(gate, up), gen);
}

torch::Tensor Model::Layer(size_t i, const torch::Tensor& x, const torch::Tensor& cos,
                           const torch::Tensor& sin, KvCache* cache, int64_t past,
                           torch::Generator* gen, const torch::Tensor& masked) const {
  const DecoderLayer& L = layers_[i];
  torch::Tensor h = x + Attention(L, static_cast<int>(i), Rms(x, L.input_norm), cos, sin, cache,
                                  past, gen, masked);
  return h + Mlp(L, Rms(h, L.post_norm), gen);
}

std::vector<torch::Tensor> Model::LayerLoraTensors(size_t i) const {
  const DecoderLayer& L = layers_[i];
  std::vector<torch::Tensor> out;
  for (const LoraLinear* l : {&L.q_proj, &L.k_proj, &L.v_proj, &L.qkv_proj, &L.o_proj,
                              &L.gate_proj, &L.up_proj, &L.gate_up_proj, &L.down_proj}) {
    if (!l->has_lora()) continue;
    out.push_back(l->lora_a);
    out.push_back(l->lora_b);
  }
  return out;
}

namespace {

std::atomic<int64_t> g_checkpoint_recomputes{0};

// One decoder layer whose forward keeps only its input: backward runs the
// layer again with grad enabled (and the same dropout draws, from a copy of
// the generator taken before the forward) and backpropagates through that.
// The LoRA tensors of the layer are inputs so that autograd routes their
// gradients here.
class CheckpointedLayerFn : public torch::autograd::Function<CheckpointedLayerFn> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               at::TensorList lora, const Model* model, int64_t index,
                               const torch::Tensor& cos, const torch::Tensor& sin,
                               torch::Generator* gen, const torch::Tensor& masked) {
    ctx->save_for_backward({x});
    // An empty `masked` stands for "plain causal" (apply needs defined tensors).
    const torch::Tensor mask = masked.numel() > 0 ? masked : torch::Tensor();
    if (mask.defined()) ctx->saved_data["masked"] = mask;
    ctx->saved_data["model"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(model));
    ctx->saved_data["index"] = index;
    ctx->saved_data["cos"] = cos;
    ctx->saved_data["sin"] = sin;
    ctx->saved_data["n_lora"] = static_cast<int64_t>(lora.size());
    if (gen != nullptr) ctx->saved_data["gen"] = gen->clone();
    torch::NoGradGuard no_grad;
    if (!model->checkpoint_keeps_gemm_outputs()) {
      return model->Layer(static_cast<size_t>(index), x, cos, sin, nullptr, 0, gen, mask);
    }
    GemmReplay record;
    torch::Tensor y;
    {
      GemmReplayScope scope(&record);
      y = model->Layer(static_cast<size_t>(index), x, cos, sin, nullptr, 0, gen, mask);
    }
    c10::List<at::Tensor> outputs;
    for (auto& t : record.outputs) outputs.push_back(std::move(t));
    ctx->saved_data["gemm_out"] = outputs;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    g_checkpoint_recomputes.fetch_add(1, std::memory_order_relaxed);
    const torch::Tensor x = ctx->get_saved_variables()[0];
    const auto* model =
        reinterpret_cast<const Model*>(static_cast<intptr_t>(ctx->saved_data["model"].toInt()));
    const auto index = static_cast<size_t>(ctx->saved_data["index"].toInt());
    std::optional<torch::Generator> gen;
    if (ctx->saved_data.count("gen")) gen = ctx->saved_data["gen"].toGenerator().clone();
    const std::vector<torch::Tensor> lora = model->LayerLoraTensors(index);
    TORCH_CHECK(static_cast<int64_t>(lora.size()) == ctx->saved_data["n_lora"].toInt(),
                "gradient checkpointing: the adapter changed between forward and backward");
    torch::Tensor xin = x.detach().requires_grad_(x.requires_grad());
    torch::Tensor y;
    GemmReplay replay;
    replay.record = false;
    if (ctx->saved_data.count("gemm_out")) {
      for (const at::Tensor& t : ctx->saved_data["gemm_out"].toTensorList()) {
        replay.outputs.push_back(t);
      }
      ctx->saved_data.erase("gemm_out");  // the replay owns them now
    }
    {
      GemmReplayScope scope(replay.outputs.empty() ? nullptr : &replay);
      torch::AutoGradMode grad_mode(true);
      y = model->Layer(
          index, xin, ctx->saved_data["cos"].toTensor(), ctx->saved_data["sin"].toTensor(), nullptr,
          0, gen ? &*gen : nullptr,
          ctx->saved_data.count("masked") ? ctx->saved_data["masked"].toTensor() : torch::Tensor());
    }
    std::vector<torch::Tensor> wrt;
    std::vector<size_t> where;  // position of each wrt entry in the returned list
    if (xin.requires_grad()) {
      wrt.push_back(xin);
      where.push_back(0);
    }
    for (size_t j = 0; j < lora.size(); ++j) {
      if (!lora[j].requires_grad()) continue;
      wrt.push_back(lora[j]);
      where.push_back(1 + j);
    }
    // x, the LoRA tensors, then model, index, cos, sin, gen, masked (no gradients).
    torch::autograd::variable_list out(1 + lora.size() + 6);
    if (wrt.empty()) return out;
    torch::autograd::variable_list g =
        torch::autograd::grad({y}, wrt, {grads[0]}, /*retain_graph=*/false,
                              /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t k = 0; k < wrt.size(); ++k) out[where[k]] = g[k];
    return out;
  }
};

}  // namespace

int64_t Model::CheckpointRecomputeCount() { return g_checkpoint_recomputes.load(); }

torch::Tensor Model::CheckpointedLayer(size_t i, const torch::Tensor& x, const torch::Tensor& cos,
                                       const torch::Tensor& sin, torch::Generator* gen,
                                       const torch::Tensor& masked) const {
  const std::vector<torch::Tensor> lora = LayerLoraTensors(i);
  return CheckpointedLayerFn::apply(x, at::TensorList(lora), this, static_cast<int64_t>(i), cos,
                                    sin, gen,
                                    masked.defined() ? masked : torch::empty({0}, torch::kBool));
}

torch::Tensor Model::Forward(const torch::Tensor& ids, KvCache* cache,
                             torch::Generator* dropout_gen, bool last_only) const {
  return Logits(ForwardHidden(ids, cache, dropout_gen, last_only));
}

torch::Tensor Model::Logits(const torch::Tensor& hidden) const {
  return FrozenMatmul(hidden, lm_head_, torch::Tensor(), 0);
}

torch::Tensor Model::HeadLossSum(const torch::Tensor& hidden, const torch::Tensor& targets) const {
  if (hidden.scalar_type() == torch::kFloat && hidden.dim() == 2) {
    // Under gradient checkpointing (memory first) the logit blocks are
    // recomputed in backward instead of kept.
    return HeadCrossEntropySum(hidden, lm_head_, targets,
                               gradient_checkpointing_ ? 0 : kHeadKeepLogitsBytes);
  }
  torch::Tensor logits = Logits(hidden);
  if (logits.scalar_type() != torch::kFloat) logits = logits.to(torch::kFloat);
  return torch::nn::functional::cross_entropy(
      logits, targets, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
}

void Model::CheckIds(const torch::Tensor& ids) const {
  TORCH_CHECK(ids.dim() == 2, "Forward: expected ids of shape [B, T], found ", ids.sizes());
  TORCH_CHECK(ids.size(1) > 0, "Forward: expected at least one token");
  TORCH_CHECK(ids.scalar_type() == torch::kLong, "Forward: expected int64 ids");
  if (ids.numel() > 0) {
    const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < config_.vocab_size, "Forward: token id out of range [0, ",
                config_.vocab_size, "): found ", lo < 0 ? lo : hi);
  }
}

torch::Tensor Model::RunLayers(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                               KvCache* cache, int64_t past, torch::Generator* gen,
                               const torch::Tensor& masked) const {
  const bool checkpoint =
      gradient_checkpointing_ && cache == nullptr && torch::GradMode::is_enabled();
  for (size_t i = 0; i < layers_.size(); ++i) {
    x = checkpoint ? CheckpointedLayer(i, x, cos, sin, gen, masked)
                   : Layer(i, x, cos, sin, cache, past, gen, masked);
  }
  return x;
}

torch::Tensor Model::ForwardHidden(const torch::Tensor& ids, KvCache* cache,
                                   torch::Generator* dropout_gen, bool last_only) const {
  CheckIds(ids);
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

  torch::Tensor x = RunLayers(Embed(ids), cos, sin, cache, past, dropout_gen, torch::Tensor());
  if (cache != nullptr) cache->length = past + T;
  if (last_only) x = x.slice(1, T - 1);
  return Rms(x, norm_);
}

torch::Tensor Model::ForwardHiddenPacked(const torch::Tensor& ids, const torch::Tensor& positions,
                                         const torch::Tensor& segments,
                                         torch::Generator* dropout_gen) const {
  CheckIds(ids);
  TORCH_CHECK(positions.sizes() == ids.sizes() && segments.sizes() == ids.sizes(),
              "ForwardHiddenPacked: expected positions and segments of shape ", ids.sizes(),
              ", found ", positions.sizes(), " and ", segments.sizes());
  TORCH_CHECK(positions.scalar_type() == torch::kLong && segments.scalar_type() == torch::kLong,
              "ForwardHiddenPacked: expected int64 positions and segments");
  const int64_t T = ids.size(1);
  // Per-row rotary tables [B, 1, T, D] (broadcast over heads).
  torch::Tensor freqs =
      positions.to(torch::kFloat).unsqueeze(-1) * inv_freq_.view({1, 1, -1});  // [B, T, D/2]
  torch::Tensor emb = torch::cat({freqs, freqs}, -1).unsqueeze(1);
  torch::Tensor cos = emb.cos(), sin = emb.sin();
  // Query i sees key j iff same segment and j <= i (positions are contiguous
  // within a segment, so i - j is also the position distance).
  torch::Tensor idx = torch::arange(T, torch::kLong);
  torch::Tensor later = (idx.unsqueeze(0) > idx.unsqueeze(1)).unsqueeze(0);  // [1, T, T]
  torch::Tensor other = segments.unsqueeze(2) != segments.unsqueeze(1);      // [B, T, T]
  torch::Tensor masked = torch::logical_or(later, other);
  if (config_.sliding_window > 0) {
    torch::Tensor far = ((idx.unsqueeze(1) - idx.unsqueeze(0)) >= config_.sliding_window);
    masked = torch::logical_or(masked, far.unsqueeze(0));
  }
  masked = masked.unsqueeze(1);  // [B, 1, T, T]
  return Rms(RunLayers(Embed(ids), cos, sin, nullptr, 0, dropout_gen, masked), norm_);
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
