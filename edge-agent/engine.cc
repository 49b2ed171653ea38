#include "edge-agent/engine.h"

#include <sys/stat.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"
#include "common/status/status.h"
#include "edge-agent/lora.h"
#include "edge-agent/model.h"
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

class TorchTrainer final : public LocalTrainer {
 public:
  TorchTrainer(std::unique_ptr<Model> model, std::unique_ptr<Tokenizer> tokenizer,
               SpecialTokens special, std::string hash)
      : model_(std::move(model)),
        tokenizer_(std::move(tokenizer)),
        special_(special),
        hash_(std::move(hash)) {}

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
                                    const TrainOptions& options) override {
    if (!has_adapter_) {
      return absl::FailedPreconditionError("Train: no adapter (call InitAdapter or SetAdapter)");
    }
    RETURN_IF_ERROR(CheckOptions(options));
    if (data.empty()) return absl::InvalidArgumentError("Train: expected examples, found none");
    common::TensorMap snapshot;  // restored if training fails part-way
    try {
      snapshot = ExportLora(*model_);
      absl::StatusOr<TrainResult> r = TrainImpl(data, options);
      if (!r.ok()) Restore(snapshot);
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
    if (max_seq_len < 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("Evaluate: max_seq_len: expected >= 2, found ", max_seq_len));
    }
    if (data.empty()) return absl::InvalidArgumentError("Evaluate: expected examples, found none");
    try {
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
        auto [sum, n] = BatchLoss(batch, nullptr);
        total += sum.item<double>();
        count += n;
      }
      if (count == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("Evaluate: no response tokens fit within max_seq_len ", max_seq_len));
      }
      EvalResult r;
      r.loss = total / static_cast<double>(count);
      r.tokens = static_cast<uint64_t>(count);
      return r;
    } catch (const c10::Error& e) {
      return TorchError("Evaluate", e);
    } catch (const std::exception& e) {
      return StdError("Evaluate", e);
    }
  }

 private:
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
    return absl::OkStatus();
  }

  // Tokenizes every example; ids the model cannot embed (a tokenizer with
  // more added tokens than the embedding has rows) are InvalidArgument.
  absl::StatusOr<std::vector<TokenizedExample>> Tokenize(const std::vector<Example>& data,
                                                         int max_seq_len) const {
    std::vector<TokenizedExample> out;
    out.reserve(data.size());
    const int64_t vocab = model_->config().vocab_size;
    for (size_t i = 0; i < data.size(); ++i) {
      out.push_back(TokenizeExample(*tokenizer_, special_, data[i], max_seq_len));
      for (int64_t id : out.back().ids) {
        if (id < 0 || id >= vocab) {
          return absl::InvalidArgumentError(
              absl::StrCat("example ", i, ": token id ", id,
                           " is outside the model's vocabulary (vocab_size ", vocab, ")"));
        }
      }
    }
    return out;
  }

  // Summed cross-entropy over labeled positions (next-token shift) and their count.
  std::pair<torch::Tensor, int64_t> BatchLoss(const std::vector<const TokenizedExample*>& batch,
                                              torch::Generator* gen) const {
    size_t len = 0;
    for (const auto* ex : batch) len = std::max(len, ex->ids.size());
    const int64_t B = static_cast<int64_t>(batch.size()), T = static_cast<int64_t>(len);
    // Right padding with id 0: causal attention keeps real tokens from seeing it.
    torch::Tensor ids = torch::zeros({B, T}, torch::kLong);
    torch::Tensor labels = torch::full({B, T}, kIgnoreLabel, torch::kLong);
    auto ids_a = ids.accessor<int64_t, 2>();
    auto lab_a = labels.accessor<int64_t, 2>();
    int64_t count = 0;
    for (int64_t b = 0; b < B; ++b) {
      const TokenizedExample& ex = *batch[static_cast<size_t>(b)];
      for (size_t t = 0; t < ex.ids.size(); ++t) {
        ids_a[b][static_cast<int64_t>(t)] = ex.ids[t];
        lab_a[b][static_cast<int64_t>(t)] = ex.labels[t];
      }
      count += ex.response_tokens();
    }
    torch::Tensor hidden = model_->ForwardHidden(ids, nullptr, gen);  // [B, T, H]
    // Position t predicts token t + 1: run the head only where that token is labeled.
    torch::Tensor target = labels.slice(1, 1);  // [B, T-1]
    torch::Tensor keep = target != kIgnoreLabel;
    torch::Tensor h = hidden.slice(1, 0, T - 1).index({keep});  // [N, H]
    torch::Tensor logits = model_->Logits(h);                   // [N, V]
    torch::Tensor sum = torch::nn::functional::cross_entropy(
        logits, target.index({keep}),
        torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
    return {sum, count};
  }

  absl::StatusOr<TrainResult> TrainImpl(const std::vector<Example>& data,
                                        const TrainOptions& options) {
    const auto start = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(std::vector<TokenizedExample> tok, Tokenize(data, options.max_seq_len));
    std::vector<size_t> usable;
    for (size_t i = 0; i < tok.size(); ++i) {
      if (tok[i].response_tokens() > 0) usable.push_back(i);
    }
    if (usable.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Train: no example has response tokens within max_seq_len ", options.max_seq_len));
    }
    std::vector<torch::Tensor> params = LoraParameters(*model_);
    torch::optim::AdamW opt(
        params,
        torch::optim::AdamWOptions(options.learning_rate).weight_decay(options.weight_decay));
    std::mt19937_64 rng(options.seed);
    torch::Generator gen = at::detail::createCPUGenerator(options.seed ^ 0x9e3779b97f4a7c15ull);
    const bool dropout = lora_.dropout > 0;
    std::vector<size_t> order;
    size_t cursor = 0;
    TrainResult result;
    double loss_sum = 0;
    int loss_steps = 0;
    for (int step = 0; step < options.steps; ++step) {
      std::vector<const TokenizedExample*> batch;
      if (static_cast<size_t>(options.batch_size) >= usable.size()) {
        // Tiny dataset: every step sees all of it once.
        for (size_t i : usable) batch.push_back(&tok[i]);
      } else {
        while (static_cast<int>(batch.size()) < options.batch_size) {
          if (cursor == order.size()) {
            order = usable;
            std::shuffle(order.begin(), order.end(), rng);
            cursor = 0;
          }
          batch.push_back(&tok[order[cursor++]]);
        }
      }
      for (const auto* ex : batch) result.tokens += ex->ids.size();
      const double lr = LearningRateAt(options, step);
      for (auto& group : opt.param_groups()) {
        static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
      }
      opt.zero_grad();
      auto [sum, count] = BatchLoss(batch, dropout ? &gen : nullptr);
      torch::Tensor loss = sum / static_cast<double>(count);
      const double value = loss.item<double>();
      if (!std::isfinite(value)) {
        return absl::InternalError(absl::StrCat("Train: non-finite loss ", value, " at step ", step,
                                                "; adapter restored (try a lower learning_rate)"));
      }
      loss.backward();
      if (options.max_grad_norm > 0) {
        torch::nn::utils::clip_grad_norm_(params, options.max_grad_norm);
      }
      opt.step();
      loss_sum += value;
      ++loss_steps;
      result.last_loss = value;
    }
    result.mean_loss = loss_steps > 0 ? loss_sum / loss_steps : 0;
    result.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return result;
  }

  std::unique_ptr<Model> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  SpecialTokens special_;
  std::string hash_;
  LoraConfig lora_;
  bool has_adapter_ = false;
};

}  // namespace

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

absl::StatusOr<std::unique_ptr<LocalTrainer>> LoadTrainer(const std::string& model_dir,
                                                          const EngineOptions& options) {
  if (options.threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("EngineOptions.threads: expected >= 0, found ", options.threads));
  }
  try {
    ConfigureThreads(options.threads);
    ModelLoadOptions mopts;
    mopts.base_dtype = options.base_dtype;
    ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(model_dir, mopts));
    ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer,
                     Tokenizer::FromFile(model_dir + "/tokenizer.json"));
    ASSIGN_OR_RETURN(SpecialTokens special,
                     ResolveSpecialTokens(model_dir, model->config(), *tokenizer));
    ASSIGN_OR_RETURN(std::string hash, common::HashModelDirectory(model_dir));
    return std::unique_ptr<LocalTrainer>(
        new TorchTrainer(std::move(model), std::move(tokenizer), special, std::move(hash)));
  } catch (const c10::Error& e) {
    return TorchError(absl::StrCat("LoadTrainer ", model_dir), e);
  } catch (const std::exception& e) {
    return StdError(absl::StrCat("LoadTrainer ", model_dir), e);
  }
}

}  // namespace fedlora::edge
