// Torch-free helpers of edge-agent/trainer.h: answer normalisation, token F1
// and LocalTrainer's default EvaluateWith.
#include "edge-agent/trainer.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fedlora::edge {
namespace {

TEST(NormalizeAnswerTest, CollapsesAndTrimsWhitespace) {
  EXPECT_EQ(NormalizeAnswer("  54\t years \n\n old "), "54 years old");
  EXPECT_EQ(NormalizeAnswer("male"), "male");
  EXPECT_EQ(NormalizeAnswer(" \n "), "");
  EXPECT_EQ(NormalizeAnswer(""), "");
  // Case and punctuation are kept: only whitespace is normalised.
  EXPECT_NE(NormalizeAnswer("Male."), NormalizeAnswer("male"));
}

TEST(TokenF1Test, BagOfTokensOverlap) {
  EXPECT_DOUBLE_EQ(TokenF1("follow up in two weeks", "follow up in two weeks"), 1.0);
  EXPECT_DOUBLE_EQ(TokenF1(" follow  up\nin two weeks", "follow up in two weeks"), 1.0);
  // 2 common of 3 predicted and 3 reference: P = R = 2/3.
  EXPECT_NEAR(TokenF1("a b c", "a b d"), 2.0 / 3.0, 1e-12);
  // P = 1/1, R = 1/4: F1 = 2 * 0.25 / 1.25 = 0.4.
  EXPECT_NEAR(TokenF1("metformin", "metformin 500mg BID daily"), 0.4, 1e-12);
  // Repeated tokens count only as often as the reference has them: P = 1/3, R = 1.
  EXPECT_NEAR(TokenF1("no no no", "no"), 0.5, 1e-12);
  EXPECT_DOUBLE_EQ(TokenF1("x", "y"), 0.0);
  EXPECT_DOUBLE_EQ(TokenF1("", ""), 1.0);
  EXPECT_DOUBLE_EQ(TokenF1("", "a"), 0.0);
  EXPECT_DOUBLE_EQ(TokenF1("a", " "), 0.0);
}

class LossOnlyTrainer : public LocalTrainer {
 public:
  std::string BaseModelHash() const override { return ""; }
  absl::Status InitAdapter(const LoraConfig&) override { return absl::OkStatus(); }
  absl::Status SetAdapter(const LoraConfig&, const common::TensorMap&) override {
    return absl::OkStatus();
  }
  absl::StatusOr<common::TensorMap> GetAdapter() const override { return common::TensorMap{}; }
  absl::StatusOr<TrainResult> Train(const std::vector<Example>&, const TrainOptions&) override {
    return TrainResult{};
  }
  absl::StatusOr<EvalResult> Evaluate(const std::vector<Example>&, int max_seq_len) override {
    EvalResult r;
    r.loss = max_seq_len;
    return r;
  }
};

TEST(EvaluateWithTest, DefaultForwardsLossOnlyAndRefusesGeneration) {
  LossOnlyTrainer t;
  EvalOptions o;
  o.max_seq_len = 17;
  auto r = t.EvaluateWith({}, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->loss, 17);
  o.generate_max_new_tokens = 4;
  EXPECT_EQ(t.EvaluateWith({}, o).status().code(), absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace fedlora::edge
