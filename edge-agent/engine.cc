#include "edge-agent/engine.h"

#include <ATen/autocast_mode.h>
#include <dlfcn.h>
#include <malloc.h>
#include <sys/stat.h>
#include <unistd.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/crypto/crypto.h"
#include "common/status/status.h"
#include "edge-agent/lora.h"
#include "edge-agent/model.h"
#include "edge-agent/optim.h"
#include "nlohmann/json.hpp"

namespace fedlora::edge {
namespace {

using nlohmann::json;

absl::Status TorchError(const std::string& where, const c10::Error& e) {
  return absl::InternalError(absl::StrCat(where, ": libtorch error: ", e.what_without_backtrace()));
}

// std::bad_alloc and friends: a huge model or batch must not take the process down.
absl::Status StdError(const std::string& where, const std::exception& e) {
  return absl::ResourceExhaustedError(absl::StrCat(where, ": ", e.what()));
}

// tokenizer_config.json tokens are "str" or {"content": "str", ...}.
std::optional<std::string> TokenString(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto c = it->find("content");
    if (c != it->end() && c->is_string()) return c->get<std::string>();
  }
  return std::nullopt;
}

// Does tokenizer.json's post-processor prepend a special token to single
// sequences? Returns that token's string, "" for "no", nullopt for "can't tell".
std::optional<std::string> TemplateBos(const json& post) {
  if (!post.is_object()) return std::nullopt;
  const std::string type = post.value("type", "");
  if (type == "Sequence") {
    auto procs = post.find("processors");
    if (procs == post.end() || !procs->is_array()) return std::nullopt;
    for (const json& p : *procs) {
      if (auto r = TemplateBos(p)) return r;
    }
    return std::nullopt;
  }
  if (type != "TemplateProcessing") return std::nullopt;
  auto single = post.find("single");
  if (single == post.end() || !single->is_array() || single->empty()) return std::string();
  const json& first = (*single)[0];
  if (first.is_object() && first.contains("SpecialToken")) {
    const json& st = first["SpecialToken"];
    if (st.is_object() && st.contains("id") && st["id"].is_string()) {
      return st["id"].get<std::string>();
    }
  }
  return std::string();
}

torch::Tensor BytesTensor(const std::string& bytes) {
  torch::Tensor t = torch::empty({static_cast<int64_t>(bytes.size())}, torch::kByte);
  if (!bytes.empty()) std::memcpy(t.data_ptr<uint8_t>(), bytes.data(), bytes.size());
  return t;
}

std::string TensorBytes(const torch::Tensor& t) {
  torch::Tensor c = t.contiguous().to(torch::kByte);
  return std::string(reinterpret_cast<const char*>(c.data_ptr<uint8_t>()),
                     static_cast<size_t>(c.numel()));
}

class TorchTrainer final : public LocalTrainer {
 public:
  TorchTrainer(std::unique_ptr<Model> model, std::unique_ptr<Tokenizer> tokenizer,
               SpecialTokens special, std::string hash, EngineOptions engine)
      : model_(std::move(model)),
        tokenizer_(std::move(tokenizer)),
        special_(special),
        hash_(std::move(hash)),
        engine_(std::move(engine)) {}

  std::string BaseModelHash() const override { return hash_; }

  absl::Status InitAdapter(const LoraConfig& config) override {
    try {
      RETURN_IF_ERROR(InitLora(*model_, config));
      lora_ = config;
      has_adapter_ = true;
      return absl::OkStatus();
    } catch (const c10::Error& e) {
      return TorchError("InitAdapter", e);
    } catch (const std::exception& e) {
      return StdError("InitAdapter", e);
    }
  }

  absl::Status SetAdapter(const LoraConfig& config, const common::TensorMap& tensors) override {
    try {
      RETURN_IF_ERROR(SetLora(*model_, config, tensors));
      lora_ = config;
      has_adapter_ = true;
      return absl::OkStatus();
    } catch (const c10::Error& e) {
      return TorchError("SetAdapter", e);
    } catch (const std::exception& e) {
      return StdError("SetAdapter", e);
    }
  }

  absl::StatusOr<common::TensorMap> GetAdapter() const override {
    if (!has_adapter_) {
      return absl::FailedPreconditionError(
          "GetAdapter: no adapter (call InitAdapter or SetAdapter)");
    }
    try {
      return ExportLora(*model_);
    } catch (const c10::Error& e) {
      return TorchError("GetAdapter", e);
    } catch (const std::exception& e) {
      return StdError("GetAdapter", e);
    }
  }

  absl::StatusOr<TrainResult> Train(const std::vector<Example>& data,
                                    const TrainOptions& call_options) override {
    if (!has_adapter_) {
      return absl::FailedPreconditionError("Train: no adapter (call InitAdapter or SetAdapter)");
    }
    const TrainOptions options = WithEngineSettings(call_options);
    RETURN_IF_ERROR(CheckOptions(options));
    if (data.empty()) return absl::InvalidArgumentError("Train: expected examples, found none");
    common::TensorMap snapshot;  // restored if training fails part-way
    try {
      EvalResult probe_before;
      if (!options.forgetting_probe.empty()) {
        absl::StatusOr<EvalResult> e = EvalLoss(options.forgetting_probe, options.max_seq_len);
        if (!e.ok()) {
          return absl::Status(e.status().code(),
                              absl::StrCat("Train: forgetting_probe: ", e.status().message()));
        }
        probe_before = *e;
      }
      snapshot = ExportLora(*model_);
      absl::StatusOr<TrainResult> r = TrainImpl(data, options);
      if (!r.ok()) {
        Restore(snapshot);
        return r;
      }
      if (!options.forgetting_probe.empty()) {
        absl::StatusOr<EvalResult> e = EvalLoss(options.forgetting_probe, options.max_seq_len);
        if (!e.ok()) {
          Restore(snapshot);
          return e.status();
        }
        r->has_probe = true;
        r->probe_before = probe_before;
        r->probe_after = *e;
        if (options.progress_every > 0 && !options.on_progress) {
          std::fprintf(stderr, "forgetting probe: perplexity %.3f -> %.3f (%llu tokens)\n",
                       probe_before.perplexity, e->perplexity,
                       static_cast<unsigned long long>(e->tokens));
        }
      }
      return r;
    } catch (const c10::Error& e) {
      Restore(snapshot);
      return TorchError("Train", e);
    } catch (const std::exception& e) {
      Restore(snapshot);
      return StdError("Train", e);
    }
  }

  absl::StatusOr<EvalResult> Evaluate(const std::vector<Example>& data, int max_seq_len) override {
    EvalOptions o;
    o.max_seq_len = max_seq_len;
    o.generate_max_new_tokens = engine_.eval_generate_max_new_tokens;
    return EvaluateWith(data, o);
  }

  absl::StatusOr<EvalResult> EvaluateWith(const std::vector<Example>& data,
                                          const EvalOptions& options) override {
    if (options.generate_max_new_tokens < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("EvalOptions.generate_max_new_tokens: expected >= 0, found ",
                       options.generate_max_new_tokens));
    }
    try {
      ASSIGN_OR_RETURN(EvalResult r, EvalLoss(data, options.max_seq_len));
      if (options.generate_max_new_tokens > 0) {
        RETURN_IF_ERROR(ScoreGeneration(data, options.generate_max_new_tokens, &r));
      }
      return r;
    } catch (const c10::Error& e) {
      return TorchError("Evaluate", e);
    } catch (const std::exception& e) {
      return StdError("Evaluate", e);
    }
  }

 private:
  // Mean response-token loss and perplexity over `data` (may throw c10::Error).
  absl::StatusOr<EvalResult> EvalLoss(const std::vector<Example>& data, int max_seq_len) const {
    if (max_seq_len < 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("Evaluate: max_seq_len: expected >= 2, found ", max_seq_len));
    }
    if (data.empty()) return absl::InvalidArgumentError("Evaluate: expected examples, found none");
    torch::NoGradGuard no_grad;
    ASSIGN_OR_RETURN(std::vector<TokenizedExample> tok, Tokenize(data, max_seq_len));
    double total = 0;
    int64_t count = 0;
    constexpr size_t kBatch = 8;
    for (size_t begin = 0; begin < tok.size(); begin += kBatch) {
      std::vector<const TokenizedExample*> batch;
      for (size_t i = begin; i < std::min(tok.size(), begin + kBatch); ++i) {
        if (tok[i].response_tokens() > 0) batch.push_back(&tok[i]);
      }
      if (batch.empty()) continue;
      auto [sum, n] = BatchLoss(batch, nullptr, /*pack_len=*/0, /*bf16=*/false);
      total += sum.item<double>();
      count += n;
    }
    if (count == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("Evaluate: no response tokens fit within max_seq_len ", max_seq_len));
    }
    EvalResult r;
    r.loss = total / static_cast<double>(count);
    r.perplexity = std::exp(r.loss);
    r.tokens = static_cast<uint64_t>(count);
    return r;
  }

  // Greedy-decodes each example's response from [bos] + prompt (not
  // truncated), stopping at eos or after max_new tokens, and scores it.
  absl::Status ScoreGeneration(const std::vector<Example>& data, int max_new, EvalResult* r) const {
    std::vector<int64_t> stop;
    if (special_.eos) stop.push_back(*special_.eos);
    double em = 0, f1 = 0;
    for (const Example& ex : data) {
      std::vector<int64_t> prompt;
      if (special_.bos) prompt.push_back(*special_.bos);
      for (int32_t id : tokenizer_->Encode(ex.prompt)) prompt.push_back(id);
      if (prompt.empty()) {
        return absl::InvalidArgumentError(
            "Evaluate: generation needs a non-empty prompt (no bos token and an empty prompt)");
      }
      std::vector<int64_t> out = model_->GenerateGreedy(prompt, max_new, stop);
      if (!out.empty() && special_.eos && out.back() == *special_.eos) out.pop_back();
      const std::string answer =
          tokenizer_->Decode(std::vector<int32_t>(out.begin(), out.end()), /*skip_special=*/true);
      em += NormalizeAnswer(answer) == NormalizeAnswer(ex.response) ? 1 : 0;
      f1 += TokenF1(answer, ex.response);
    }
    const double n = static_cast<double>(data.size());
    r->generated_examples = data.size();
    r->exact_match = em / n;
    r->token_f1 = f1 / n;
    return absl::OkStatus();
  }

  // The call's options with the engine's device-local settings applied (see EngineOptions).
  TrainOptions WithEngineSettings(const TrainOptions& o) const {
    TrainOptions out = o;
    out.bf16_autocast = o.bf16_autocast || engine_.bf16_autocast;
    out.pack_sequences = o.pack_sequences || engine_.pack_sequences;
    out.gradient_checkpointing = o.gradient_checkpointing || engine_.gradient_checkpointing;
    if (out.progress_every == 0) out.progress_every = engine_.progress_every;
    if (out.replay_fraction == 0 && out.replay.empty()) {
      out.replay_fraction = engine_.replay_fraction;
      out.replay = engine_.replay;
    }
    if (out.forgetting_probe.empty()) out.forgetting_probe = engine_.forgetting_probe;
    return out;
  }

  // Best effort: puts the pre-training adapter back (never throws).
  void Restore(const common::TensorMap& snapshot) {
    if (snapshot.empty()) return;
    try {
      (void)SetLora(*model_, lora_, snapshot);
    } catch (const std::exception&) {
    }
  }

  static absl::Status CheckOptions(const TrainOptions& o) {
    auto bad = [](const std::string& field, const std::string& expected, auto found) {
      return absl::InvalidArgumentError(
          absl::StrCat("TrainOptions.", field, ": expected ", expected, ", found ", found));
    };
    if (o.steps <= 0) return bad("steps", "> 0", o.steps);
    if (o.batch_size <= 0) return bad("batch_size", "> 0", o.batch_size);
    if (o.max_seq_len < 2) return bad("max_seq_len", ">= 2", o.max_seq_len);
    if (!(o.learning_rate > 0) || !std::isfinite(o.learning_rate)) {
      return bad("learning_rate", "a positive number", o.learning_rate);
    }
    if (!(o.weight_decay >= 0) || !std::isfinite(o.weight_decay)) {
      return bad("weight_decay", ">= 0", o.weight_decay);
    }
    if (std::isnan(o.max_grad_norm)) return bad("max_grad_norm", "a number", o.max_grad_norm);
    if (o.warmup_steps < 0) return bad("warmup_steps", ">= 0", o.warmup_steps);
    if (!(o.prox_mu >= 0) || !std::isfinite(o.prox_mu)) return bad("prox_mu", ">= 0", o.prox_mu);
    if (o.grad_accum_steps < 1) return bad("grad_accum_steps", ">= 1", o.grad_accum_steps);
    if (o.progress_every < 0) return bad("progress_every", ">= 0", o.progress_every);
    if (o.checkpoint_every < 0) return bad("checkpoint_every", ">= 0", o.checkpoint_every);
    if (!(o.replay_fraction >= 0 && o.replay_fraction < 1)) {
      return bad("replay_fraction", "in [0, 1)", o.replay_fraction);
    }
    if (o.replay_fraction > 0 && o.replay.empty()) {
      return bad("replay", "general examples when replay_fraction > 0", "none");
    }
    return absl::OkStatus();
  }

  // Tokenizes every example; ids the model cannot embed (a tokenizer with
  // more added tokens than the embedding has rows) are InvalidArgument.
  absl::StatusOr<std::vector<TokenizedExample>> Tokenize(const std::vector<Example>& data,
                                                         int max_seq_len,
                                                         const char* what = "example") const {
    std::vector<TokenizedExample> out;
    out.reserve(data.size());
    const int64_t vocab = model_->config().vocab_size;
    for (size_t i = 0; i < data.size(); ++i) {
      out.push_back(TokenizeExample(*tokenizer_, special_, data[i], max_seq_len));
      for (int64_t id : out.back().ids) {
        if (id < 0 || id >= vocab) {
          return absl::InvalidArgumentError(
              absl::StrCat(what, " ", i, ": token id ", id,
                           " is outside the model's vocabulary (vocab_size ", vocab, ")"));
        }
      }
    }
    return out;
  }

  // Summed cross-entropy over labeled positions (next-token shift) and their
  // count. pack_len > 0 packs the examples first-fit into rows of at most
  // pack_len tokens (Model::ForwardHiddenPacked); bf16 autocasts the forward.
  std::pair<torch::Tensor, int64_t> BatchLoss(const std::vector<const TokenizedExample*>& batch,
                                              torch::Generator* gen, int pack_len,
                                              bool bf16) const {
    // Rows of examples: one example per row, or packed first-fit.
    std::vector<std::vector<const TokenizedExample*>> rows;
    std::vector<size_t> used;
    for (const auto* ex : batch) {
      size_t r = rows.size();
      if (pack_len > 0) {
        for (size_t k = 0; k < rows.size(); ++k) {
          if (used[k] + ex->ids.size() <= static_cast<size_t>(pack_len)) {
            r = k;
            break;
          }
        }
      }
      if (r == rows.size()) {
        rows.emplace_back();
        used.push_back(0);
      }
      rows[r].push_back(ex);
      used[r] += ex->ids.size();
    }
    const size_t len = *std::max_element(used.begin(), used.end());
    const int64_t B = static_cast<int64_t>(rows.size()), T = static_cast<int64_t>(len);
    // Right padding with id 0: causal attention keeps real tokens from seeing it.
    torch::Tensor ids = torch::zeros({B, T}, torch::kLong);
    torch::Tensor labels = torch::full({B, T}, kIgnoreLabel, torch::kLong);
    torch::Tensor positions = torch::zeros({B, T}, torch::kLong);
    torch::Tensor segments = torch::full({B, T}, -1, torch::kLong);
    auto ids_a = ids.accessor<int64_t, 2>();
    auto lab_a = labels.accessor<int64_t, 2>();
    auto pos_a = positions.accessor<int64_t, 2>();
    auto seg_a = segments.accessor<int64_t, 2>();
    int64_t count = 0;
    for (int64_t b = 0; b < B; ++b) {
      int64_t off = 0, seg = 0;
      for (const TokenizedExample* ex : rows[static_cast<size_t>(b)]) {
        for (size_t t = 0; t < ex->ids.size(); ++t) {
          const int64_t at = off + static_cast<int64_t>(t);
          ids_a[b][at] = ex->ids[t];
          // An example's first token is never a target (in a packed row the
          // previous example's last position would otherwise predict it).
          lab_a[b][at] = t == 0 ? kIgnoreLabel : ex->labels[t];
          pos_a[b][at] = static_cast<int64_t>(t);
          seg_a[b][at] = seg;
        }
        off += static_cast<int64_t>(ex->ids.size());
        ++seg;
        count += ex->response_tokens();
      }
    }
    // Position t predicts token t + 1: run the head only where that token is labeled.
    torch::Tensor target = labels.slice(1, 1);  // [B, T-1]
    torch::Tensor keep = target != kIgnoreLabel;
    Bf16Autocast autocast(bf16);
    torch::Tensor hidden = pack_len > 0
                               ? model_->ForwardHiddenPacked(ids, positions, segments, gen)
                               : model_->ForwardHidden(ids, nullptr, gen);  // [B, T, H]
    torch::Tensor h = hidden.slice(1, 0, T - 1).index({keep});              // [N, H]
    return {model_->HeadLossSum(h, target.index({keep})), count};
  }

  // The trainable tensors (B only under freeze_lora_a) and, for FedProx, their
  // values at the start of the call.
  struct Trainable {
    std::vector<torch::Tensor> params;
    std::vector<torch::Tensor> frozen;  // A under freeze_lora_a (requires_grad off meanwhile)
    ~Trainable() {
      for (auto& t : frozen) t.set_requires_grad(true);
    }
  };

  // Data order and counters of one Train call (what a checkpoint must restore).
  struct RunState {
    std::mt19937_64 rng;
    std::vector<size_t> order;
    size_t cursor = 0;
    int step = 0;  // optimizer steps done
    double loss_sum = 0;
    double last_loss = 0;
    uint64_t tokens = 0;
  };

  // The examples of the next optimizer step: grad_accum_steps * batch_size
  // drawn in order from a shuffled permutation (reshuffled when used up), or
  // the whole (small) data set when it has no more than that.
  static std::vector<size_t> DrawStep(const std::vector<size_t>& usable, size_t effective,
                                      RunState& st) {
    std::vector<size_t> out;
    if (effective >= usable.size()) return usable;
    while (out.size() < effective) {
      if (st.cursor == st.order.size()) {
        st.order = usable;
        std::shuffle(st.order.begin(), st.order.end(), st.rng);
        st.cursor = 0;
      }
      out.push_back(st.order[st.cursor++]);
    }
    return out;
  }

  // What makes two Train calls the same run: base model, adapter config and
  // starting values, the tokenized data and every option that changes the result.
  std::string RunFingerprint(const std::vector<TokenizedExample>& tok,
                             const TrainOptions& o) const {
    json j;
    j["base"] = hash_;
    j["lora"] = {lora_.rank, lora_.alpha, lora_.target_modules, lora_.dropout, lora_.use_rslora};
    j["options"] = {o.steps,          o.learning_rate,  o.batch_size,       o.max_seq_len,
                    o.weight_decay,   o.max_grad_norm,  o.warmup_steps,     o.seed,
                    o.prox_mu,        o.freeze_lora_a,  o.grad_accum_steps, o.bf16_autocast,
                    o.pack_sequences, o.replay_fraction};
    j["threads"] = at::get_num_threads();
    std::string buf = j.dump();
    for (const TokenizedExample& ex : tok) {
      buf.append(reinterpret_cast<const char*>(ex.ids.data()), ex.ids.size() * sizeof(int64_t));
      buf.append(reinterpret_cast<const char*>(ex.labels.data()),
                 ex.labels.size() * sizeof(int64_t));
      buf.push_back('\n');
    }
    for (const torch::Tensor& t : LoraParameters(*model_)) {
      torch::Tensor c = t.detach().contiguous();
      buf.append(reinterpret_cast<const char*>(c.data_ptr<float>()),
                 static_cast<size_t>(c.numel()) * sizeof(float));
    }
    return common::Sha256Hex(buf);
  }

  // Writes the run's state to options.checkpoint_path (atomically).
  absl::Status SaveCheckpoint(const TrainOptions& options, const std::string& fingerprint,
                              const RunState& st, const std::vector<torch::Tensor>& trainable,
                              const std::vector<torch::Tensor>& anchors,
                              torch::optim::AdamW& opt, torch::Generator& gen) const {
    torch::NoGradGuard no_grad;
    std::ostringstream rng;
    rng << st.rng;
    json meta;
    meta["fingerprint"] = fingerprint;
    meta["step"] = st.step;
    meta["loss_sum"] = st.loss_sum;
    meta["last_loss"] = st.last_loss;
    meta["tokens"] = st.tokens;
    meta["cursor"] = st.cursor;
    meta["order"] = st.order;
    meta["rng"] = rng.str();
    torch::serialize::OutputArchive ar;
    ar.write("meta", BytesTensor(meta.dump()));
    ar.write("gen", gen.get_state());
    for (size_t i = 0; i < trainable.size(); ++i) {
      ar.write(absl::StrCat("param.", i), trainable[i].detach());
      if (i < anchors.size()) ar.write(absl::StrCat("anchor.", i), anchors[i]);
      auto it = opt.state().find(AdamStateKey(trainable[i]));
      if (it == opt.state().end()) continue;
      const auto& a = static_cast<const torch::optim::AdamWParamState&>(*it->second);
      ar.write(absl::StrCat("adam_step.", i), torch::tensor(a.step(), torch::kLong));
      ar.write(absl::StrCat("exp_avg.", i), a.exp_avg());
      ar.write(absl::StrCat("exp_avg_sq.", i), a.exp_avg_sq());
    }
    std::string bytes;
    ar.save_to([&bytes](const void* data, size_t n) {
      bytes.append(static_cast<const char*>(data), n);
      return n;
    });
    return common::WriteFileAtomic(options.checkpoint_path, bytes, 0600);
  }

  // Restores the run's state from options.checkpoint_path when that file
  // exists and belongs to this run. Returns whether it did. A missing,
  // unreadable or foreign file is not an error: the run starts from scratch.
  bool LoadCheckpoint(const TrainOptions& options, const std::string& fingerprint, RunState& st,
                      const std::vector<torch::Tensor>& trainable,
                      std::vector<torch::Tensor>& anchors, torch::optim::AdamW& opt,
                      torch::Generator& gen) const {
    absl::StatusOr<std::string> bytes = common::ReadFileToString(options.checkpoint_path);
    if (!bytes.ok()) return false;
    torch::NoGradGuard no_grad;
    try {
      torch::serialize::InputArchive ar;
      ar.load_from(bytes->data(), bytes->size());
      torch::Tensor t;
      ar.read("meta", t);
      json meta = json::parse(TensorBytes(t));
      if (meta.at("fingerprint").get<std::string>() != fingerprint) return false;
      RunState loaded;
      loaded.step = meta.at("step").get<int>();
      loaded.loss_sum = meta.at("loss_sum").get<double>();
      loaded.last_loss = meta.at("last_loss").get<double>();
      loaded.tokens = meta.at("tokens").get<uint64_t>();
      loaded.cursor = meta.at("cursor").get<size_t>();
      loaded.order = meta.at("order").get<std::vector<size_t>>();
      std::istringstream rng(meta.at("rng").get<std::string>());
      rng >> loaded.rng;
      if (!rng || loaded.step < 0 || loaded.step > options.steps ||
          loaded.cursor > loaded.order.size()) {
        return false;
      }
      // Read everything before changing anything.
      torch::Tensor gen_state;
      ar.read("gen", gen_state);
      std::vector<torch::Tensor> values(trainable.size()), anchor_values(trainable.size());
      std::vector<std::unique_ptr<torch::optim::AdamWParamState>> adam(trainable.size());
      for (size_t i = 0; i < trainable.size(); ++i) {
        ar.read(absl::StrCat("param.", i), values[i]);
        if (!values[i].defined() || !values[i].sizes().equals(trainable[i].sizes())) return false;
        if (!anchors.empty()) {
          ar.read(absl::StrCat("anchor.", i), anchor_values[i]);
          if (!anchor_values[i].defined() ||
              !anchor_values[i].sizes().equals(trainable[i].sizes())) {
            return false;
          }
        }
        torch::Tensor step, m, v;
        if (ar.try_read(absl::StrCat("adam_step.", i), step)) {
          ar.read(absl::StrCat("exp_avg.", i), m);
          ar.read(absl::StrCat("exp_avg_sq.", i), v);
          if (!m.sizes().equals(trainable[i].sizes()) || !v.sizes().equals(trainable[i].sizes())) {
            return false;
          }
          adam[i] = std::make_unique<torch::optim::AdamWParamState>();
          adam[i]->step(step.item<int64_t>());
          adam[i]->exp_avg(m.clone());
          adam[i]->exp_avg_sq(v.clone());
        }
      }
      gen.set_state(gen_state);
      for (size_t i = 0; i < trainable.size(); ++i) {
        trainable[i].copy_(values[i]);
        if (!anchors.empty()) anchors[i] = anchor_values[i].clone();
        if (adam[i]) opt.state()[AdamStateKey(trainable[i])] = std::move(adam[i]);
      }
      st = std::move(loaded);
      return true;
    } catch (const c10::Error&) {
      return false;
    } catch (const json::exception&) {
      return false;
    }
  }

  absl::StatusOr<TrainResult> TrainImpl(const std::vector<Example>& data,
                                        const TrainOptions& options) {
    const auto start = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(std::vector<TokenizedExample> tok, Tokenize(data, options.max_seq_len));
    uint64_t replay_examples = 0;
    if (options.replay_fraction > 0) {
      ASSIGN_OR_RETURN(std::vector<TokenizedExample> general,
                       Tokenize(options.replay, options.max_seq_len, "replay example"));
      const double f = options.replay_fraction;
      const auto k =
          static_cast<size_t>(std::llround(f * static_cast<double>(data.size()) / (1 - f)));
      std::mt19937_64 rng(options.seed ^ 0x5eedfeedull);
      std::vector<size_t> order;
      for (size_t i = 0; i < k; ++i) {
        if (i % general.size() == 0) {
          order.resize(general.size());
          std::iota(order.begin(), order.end(), 0);
          std::shuffle(order.begin(), order.end(), rng);
        }
        tok.push_back(general[order[i % general.size()]]);
      }
      replay_examples = k;
    }
    std::vector<size_t> usable;
    for (size_t i = 0; i < tok.size(); ++i) {
      if (tok[i].response_tokens() > 0) usable.push_back(i);
    }
    if (usable.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Train: no example has response tokens within max_seq_len ", options.max_seq_len));
    }
    Trainable tr;
    for (const Model::Adaptable& a : model_->AdaptableModules()) {
      if (!a.linear->has_lora()) continue;
      if (options.freeze_lora_a) {
        a.linear->lora_a.set_requires_grad(false);
        tr.frozen.push_back(a.linear->lora_a);
      } else {
        tr.params.push_back(a.linear->lora_a);
      }
      tr.params.push_back(a.linear->lora_b);
    }
    struct CheckpointingGuard {
      Model* m;
      ~CheckpointingGuard() { m->set_gradient_checkpointing(false); }
    } checkpointing{model_.get()};
    model_->set_gradient_checkpointing(options.gradient_checkpointing);
    std::vector<torch::Tensor> anchors;
    if (options.prox_mu > 0) {
      for (const auto& p : tr.params) anchors.push_back(p.detach().clone());
    }
    torch::optim::AdamW opt(
        tr.params,
        torch::optim::AdamWOptions(options.learning_rate).weight_decay(options.weight_decay));
    RunState st;
    st.rng.seed(options.seed);
    torch::Generator gen = at::detail::createCPUGenerator(options.seed ^ 0x9e3779b97f4a7c15ull);
    std::string fingerprint;
    if (!options.checkpoint_path.empty()) {
      fingerprint = RunFingerprint(tok, options);
      (void)LoadCheckpoint(options, fingerprint, st, tr.params, anchors, opt, gen);
    }
    const bool dropout = lora_.dropout > 0;
    const size_t micro = static_cast<size_t>(options.batch_size);
    const size_t effective = micro * static_cast<size_t>(options.grad_accum_steps);
    const int first_step = st.step;
    const uint64_t first_tokens = st.tokens;
    for (; st.step < options.steps;) {
      const int step = st.step;
      const std::vector<size_t> chosen = DrawStep(usable, effective, st);
      int64_t total_count = 0;
      for (size_t i : chosen) {
        total_count += tok[i].response_tokens();
        st.tokens += tok[i].ids.size();
      }
      const double lr = LearningRateAt(options, step);
      for (auto& group : opt.param_groups()) {
        static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
      }
      opt.zero_grad();
      double value = 0;
      for (size_t begin = 0; begin < chosen.size(); begin += micro) {
        std::vector<const TokenizedExample*> batch;
        for (size_t j = begin; j < std::min(chosen.size(), begin + micro); ++j) {
          batch.push_back(&tok[chosen[j]]);
        }
        // Token-weighted: each micro-batch's summed loss over the step's total count.
        torch::Tensor loss =
            BatchLoss(batch, dropout ? &gen : nullptr,
                      options.pack_sequences ? options.max_seq_len : 0, options.bf16_autocast)
                .first /
            static_cast<double>(total_count);
        const double v = loss.item<double>();
        if (!std::isfinite(v)) {
          return absl::InternalError(absl::StrCat("Train: non-finite loss ", v, " at step ",
                                                  step,
                                                  "; adapter restored (try a lower learning_rate)"));
        }
        value += v;
        loss.backward();
      }
      if (options.prox_mu > 0) ProximalTerm(tr.params, anchors, options.prox_mu).backward();
      if (options.max_grad_norm > 0) {
        ClipGradNorm(tr.params, options.max_grad_norm);
      }
      AdamWStep(opt);
      st.loss_sum += value;
      st.last_loss = value;
      ++st.step;
      const bool last = st.step == options.steps;
      if (!options.checkpoint_path.empty() && options.checkpoint_every > 0 && !last &&
          st.step % options.checkpoint_every == 0) {
        RETURN_IF_ERROR(SaveCheckpoint(options, fingerprint, st, tr.params, anchors, opt, gen));
      }
      if (options.progress_every > 0 && (st.step % options.progress_every == 0 || last)) {
        TrainProgress p;
        p.step = st.step;
        p.total_steps = options.steps;
        p.loss = value;
        p.mean_loss = st.loss_sum / st.step;
        p.tokens = st.tokens;
        const double secs =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        const int done = st.step - first_step;
        p.tokens_per_s = static_cast<double>(st.tokens - first_tokens) / std::max(secs, 1e-9);
        p.eta_seconds = secs / done * (options.steps - st.step);
        if (options.on_progress) {
          if (!options.on_progress(p)) {
            if (!options.checkpoint_path.empty() && !last) {
              RETURN_IF_ERROR(
                  SaveCheckpoint(options, fingerprint, st, tr.params, anchors, opt, gen));
            }
            return absl::CancelledError(absl::StrCat("Train: stopped by on_progress after step ",
                                                     st.step, " of ", options.steps));
          }
        } else {
          std::fprintf(stderr, "%s\n", FormatProgress(p).c_str());
        }
      }
    }
    if (!options.checkpoint_path.empty()) std::remove(options.checkpoint_path.c_str());
    TrainResult result;
    result.replay_examples = replay_examples;
    result.tokens = st.tokens;
    result.last_loss = st.last_loss;
    result.mean_loss = options.steps > 0 ? st.loss_sum / options.steps : 0;
    result.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return result;
  }

  std::unique_ptr<Model> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  SpecialTokens special_;
  std::string hash_;
  EngineOptions engine_;
  LoraConfig lora_;
  bool has_adapter_ = false;
};

}  // namespace

std::string FormatProgress(const TrainProgress& p) {
  const int64_t eta = static_cast<int64_t>(std::llround(p.eta_seconds));
  return absl::StrFormat("train step %d/%d loss %.4f mean %.4f tokens/s %.1f eta %dm%02ds",
                         p.step, p.total_steps, p.loss, p.mean_loss, p.tokens_per_s, eta / 60,
                         eta % 60);
}

int64_t TokenizedExample::response_tokens() const {
  int64_t n = 0;
  // Position 0 is never a target (nothing predicts it).
  for (size_t i = 1; i < labels.size(); ++i) n += labels[i] != kIgnoreLabel;
  return n;
}

absl::StatusOr<SpecialTokens> ResolveSpecialTokens(const std::string& model_dir,
                                                   const ModelConfig& config,
                                                   const Tokenizer& tokenizer) {
  SpecialTokens out;
  json tok_config;
  const std::string tc_path = model_dir + "/tokenizer_config.json";
  struct stat st;
  if (::stat(tc_path.c_str(), &st) == 0) {
    ASSIGN_OR_RETURN(std::string text, common::ReadFileToString(tc_path));
    try {
      tok_config = json::parse(text);
    } catch (const json::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(tc_path, ": not valid JSON: ", e.what()));
    }
    if (!tok_config.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(tc_path, ": expected a JSON object"));
    }
  }
  auto lookup = [&](const std::string& token, const char* what) -> absl::StatusOr<int32_t> {
    std::optional<int32_t> id = tokenizer.TokenToId(token);
    if (!id) {
      return absl::InvalidArgumentError(absl::StrCat(model_dir, ": ", what, " token '", token,
                                                     "' is not in the tokenizer vocabulary"));
    }
    return *id;
  };
  auto config_bos = [&]() -> std::optional<int32_t> {
    if (config.bos_token_id) return static_cast<int32_t>(*config.bos_token_id);
    return std::nullopt;
  };
  // bos
  const json* add_bos = nullptr;
  if (tok_config.is_object()) {
    auto it = tok_config.find("add_bos_token");
    if (it != tok_config.end() && it->is_boolean()) add_bos = &*it;
  }
  if (add_bos != nullptr) {
    if (add_bos->get<bool>()) {
      if (auto s = TokenString(tok_config, "bos_token")) {
        ASSIGN_OR_RETURN(out.bos, lookup(*s, "bos"));
      } else {
        out.bos = config_bos();
      }
    }
  } else {
    std::optional<std::string> from_template;
    auto tj = common::ReadFileToString(model_dir + "/tokenizer.json");
    if (tj.ok()) {
      json t = json::parse(*tj, nullptr, /*allow_exceptions=*/false);
      if (t.is_object() && t.contains("post_processor"))
        from_template = TemplateBos(t["post_processor"]);
    }
    if (from_template) {
      if (!from_template->empty()) {
        ASSIGN_OR_RETURN(out.bos, lookup(*from_template, "bos"));
      }
    } else if (config.architecture != Architecture::kQwen2) {
      out.bos = config_bos();
    }
  }
  // eos
  if (!config.eos_token_ids.empty()) {
    out.eos = static_cast<int32_t>(config.eos_token_ids[0]);
  } else if (tok_config.is_object()) {
    if (auto s = TokenString(tok_config, "eos_token")) {
      ASSIGN_OR_RETURN(out.eos, lookup(*s, "eos"));
    }
  }
  for (auto id : {out.bos, out.eos}) {
    if (id && (*id < 0 || *id >= config.vocab_size)) {
      return absl::InvalidArgumentError(absl::StrCat(model_dir, ": special token id ", *id,
                                                     " is outside the vocabulary (size ",
                                                     config.vocab_size, ")"));
    }
  }
  return out;
}

TokenizedExample TokenizeExample(const Tokenizer& tokenizer, const SpecialTokens& special,
                                 const Example& example, int max_seq_len) {
  TokenizedExample out;
  if (special.bos) {
    out.ids.push_back(*special.bos);
    out.labels.push_back(kIgnoreLabel);
  }
  for (int32_t id : tokenizer.Encode(example.prompt)) {
    out.ids.push_back(id);
    out.labels.push_back(kIgnoreLabel);
  }
  for (int32_t id : tokenizer.Encode(example.response)) {
    out.ids.push_back(id);
    out.labels.push_back(id);
  }
  if (special.eos) {
    out.ids.push_back(*special.eos);
    out.labels.push_back(*special.eos);
  }
  if (max_seq_len > 0 && out.ids.size() > static_cast<size_t>(max_seq_len)) {
    out.ids.resize(static_cast<size_t>(max_seq_len));
    out.labels.resize(static_cast<size_t>(max_seq_len));
  }
  return out;
}

double LearningRateAt(const TrainOptions& options, int step) {
  const double lr = options.learning_rate;
  if (step < options.warmup_steps) {
    return lr * static_cast<double>(step + 1) / static_cast<double>(options.warmup_steps + 1);
  }
  const int decay_steps = std::max(1, options.steps - options.warmup_steps);
  const double progress =
      std::min(1.0, static_cast<double>(step - options.warmup_steps) / decay_steps);
  return lr * 0.5 * (1.0 + std::cos(M_PI * progress));
}

Bf16Autocast::Bf16Autocast(bool on) : on_(on) {
  if (!on_) return;
  prev_enabled_ = at::autocast::is_cpu_enabled();
  prev_dtype_ = at::autocast::get_autocast_cpu_dtype();
  at::autocast::set_cpu_enabled(true);
  at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
}

Bf16Autocast::~Bf16Autocast() {
  if (!on_) return;
  at::autocast::set_cpu_enabled(prev_enabled_);
  at::autocast::set_autocast_cpu_dtype(prev_dtype_);
  if (!prev_enabled_) at::autocast::clear_cache();
}

void ConfigureThreads(int threads) {
  static std::once_flag interop_once;
  std::call_once(interop_once, [] {
    try {
      at::set_num_interop_threads(1);
    } catch (const c10::Error&) {
      // Already started by someone else: keep libtorch's setting.
    }
  });
  int n = threads;
  if (n <= 0) n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (at::get_num_threads() != n) at::set_num_threads(n);
}

void ConfigureAllocator() {
  static std::once_flag once;
  std::call_once(once, [] {
    // Setting the thresholds also turns off glibc's dynamic threshold adjustment.
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
  });
}

std::string MallocName() {
  // gperftools exports tc_malloc beside the malloc it replaces; glibc does not.
  return dlsym(RTLD_DEFAULT, "tc_malloc") != nullptr ? "tcmalloc" : "glibc";
}

namespace {

double CurrentRssMb() {
  FILE* f = fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  long pages = 0, resident = 0;
  const int n = fscanf(f, "%ld %ld", &pages, &resident);
  fclose(f);
  if (n != 2) return 0;
  return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) /
         (1024.0 * 1024.0);
}

// Read once, during static initialisation (shared libraries are initialised
// before the executable's and its static libraries' initialisers).
const double kStartupRssMb = CurrentRssMb();

}  // namespace

double StartupRssMb() { return kStartupRssMb; }

absl::StatusOr<std::unique_ptr<LocalTrainer>> LoadTrainer(const std::string& model_dir,
                                                          const EngineOptions& options) {
  if (options.threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("EngineOptions.threads: expected >= 0, found ", options.threads));
  }
  if (options.progress_every < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "EngineOptions.progress_every: expected >= 0, found ", options.progress_every));
  }
  if (options.eval_generate_max_new_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("EngineOptions.eval_generate_max_new_tokens: expected >= 0, found ",
                     options.eval_generate_max_new_tokens));
  }
  if (!(options.replay_fraction >= 0 && options.replay_fraction < 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "EngineOptions.replay_fraction: expected in [0, 1), found ", options.replay_fraction));
  }
  if (options.replay_fraction > 0 && options.replay.empty()) {
    return absl::InvalidArgumentError(
        "EngineOptions.replay: expected general examples when replay_fraction > 0, found none");
  }
  try {
    ConfigureThreads(options.threads);
    ConfigureAllocator();
    ASSIGN_OR_RETURN(
        std::unique_ptr<Model> model,
        Model::Load(model_dir, LoadOptionsFor(options.base_dtype, options.bf16_autocast)));
    ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer,
                     Tokenizer::FromFile(model_dir + "/tokenizer.json"));
    ASSIGN_OR_RETURN(SpecialTokens special,
                     ResolveSpecialTokens(model_dir, model->config(), *tokenizer));
    ASSIGN_OR_RETURN(std::string hash, common::HashModelDirectory(model_dir));
    return std::unique_ptr<LocalTrainer>(new TorchTrainer(std::move(model), std::move(tokenizer),
                                                          special, std::move(hash), options));
  } catch (const c10::Error& e) {
    return TorchError(absl::StrCat("LoadTrainer ", model_dir), e);
  } catch (const std::exception& e) {
    return StdError(absl::StrCat("LoadTrainer ", model_dir), e);
  }
}

}  // namespace fedlora::edge
