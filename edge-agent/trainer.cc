#include "edge-agent/trainer.h"

#include <map>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace fedlora::edge {

absl::StatusOr<EvalResult> LocalTrainer::EvaluateWith(const std::vector<Example>& data,
                                                      const EvalOptions& options) {
  if (options.generate_max_new_tokens > 0) {
    return absl::UnimplementedError(
        "EvaluateWith: this trainer does not generate (generate_max_new_tokens must be 0)");
  }
  return Evaluate(data, options.max_seq_len);
}

std::string NormalizeAnswer(const std::string& text) {
  std::string out;
  bool space = false;
  for (char c : text) {
    const bool ws = c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
    if (ws) {
      space = !out.empty();
      continue;
    }
    if (space) out.push_back(' ');
    space = false;
    out.push_back(c);
  }
  return out;
}

double TokenF1(const std::string& prediction, const std::string& reference) {
  auto split = [](const std::string& s) {
    std::map<std::string, int> bag;
    std::istringstream in(NormalizeAnswer(s));
    std::string w;
    int n = 0;
    while (in >> w) {
      ++bag[w];
      ++n;
    }
    return std::make_pair(bag, n);
  };
  auto [p, np] = split(prediction);
  auto [r, nr] = split(reference);
  if (np == 0 && nr == 0) return 1.0;
  if (np == 0 || nr == 0) return 0.0;
  int common = 0;
  for (const auto& [w, c] : p) {
    auto it = r.find(w);
    if (it != r.end()) common += std::min(c, it->second);
  }
  if (common == 0) return 0.0;
  const double precision = static_cast<double>(common) / np;
  const double recall = static_cast<double>(common) / nr;
  return 2 * precision * recall / (precision + recall);
}

}  // namespace fedlora::edge
