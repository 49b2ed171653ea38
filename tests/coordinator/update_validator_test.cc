#include "coordinator/update_validator.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "tests/coordinator/coordinator_test_util.h"

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;
using testing::MakeLoraUpdate;

const std::vector<std::string> kModules = {"q_proj", "v_proj"};

TEST(UpdateValidatorTest, AcceptsWellFormedLoraUpdate) {
  common::TensorMap u = MakeLoraUpdate(8, 2, 16, 32, 1);
  EXPECT_TRUE(ValidateUpdate(u, {}, 8, kModules).ok());
  EXPECT_TRUE(ValidateUpdate(u, ShapesOf(u), 8, kModules).ok());
}

TEST(UpdateValidatorTest, RejectsWrongRank) {
  common::TensorMap u = MakeLoraUpdate(4, 1, 16, 32, 1);
  absl::Status s = ValidateUpdate(u, {}, 8, kModules);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("expected rank 8"));
}

TEST(UpdateValidatorTest, RejectsUntargetedModuleAndBadNames) {
  common::TensorMap u = MakeLoraUpdate(8, 1, 16, 32, 1, 0.5f, {"k_proj"});
  EXPECT_THAT(std::string(ValidateUpdate(u, {}, 8, kModules).message()),
              HasSubstr("not one of the target modules"));
  common::TensorMap bad = MakeLoraUpdate(8, 1, 16, 32, 1);
  bad["model.embed_tokens.weight"] = bad.begin()->second;
  EXPECT_THAT(std::string(ValidateUpdate(bad, {}, 8, kModules).message()),
              HasSubstr("model.embed_tokens.weight"));
}

TEST(UpdateValidatorTest, RejectsUnpairedFactor) {
  common::TensorMap u = MakeLoraUpdate(8, 1, 16, 32, 1);
  u.erase("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
  EXPECT_THAT(std::string(ValidateUpdate(u, {}, 8, kModules).message()),
              HasSubstr("has no matching"));
}

TEST(UpdateValidatorTest, ShapeMismatchExtraAndMissingTensor) {
  common::TensorMap ref = MakeLoraUpdate(8, 2, 16, 32, 1);
  const ShapeMap expected = ShapesOf(ref);

  common::TensorMap wrong = MakeLoraUpdate(8, 2, 17, 32, 2);
  absl::Status s = ValidateUpdate(wrong, expected, 8, kModules);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("expected shape [8,16], found [8,17]"));

  common::TensorMap extra = ref;
  extra["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = ref.begin()->second;
  EXPECT_THAT(std::string(ValidateUpdate(extra, expected, 8, kModules).message()),
              HasSubstr("unexpected tensor"));

  common::TensorMap missing = ref;
  missing.erase(missing.begin());
  EXPECT_THAT(std::string(ValidateUpdate(missing, expected, 8, kModules).message()),
              HasSubstr("missing tensor"));
}

TEST(UpdateValidatorTest, RejectsNaNAndInf) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    common::TensorMap u = MakeLoraUpdate(8, 1, 16, 32, 1);
    u.rbegin()->second.data[5] = bad;
    absl::Status s = ValidateUpdate(u, ShapesOf(u), 8, kModules);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()), HasSubstr("value 5"));
  }
}

}  // namespace
}  // namespace fedlora::coordinator
