#include "coordinator/dp_budget.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

namespace fedlora::coordinator {
namespace {

using ::testing::HasSubstr;

TEST(DpBudgetTest, RefusesTheRoundThatWouldCrossTheBudget) {
  auto budget = DpBudget::Create({2.0, 1e-5}, "");
  ASSERT_TRUE(budget.ok()) << budget.status();
  EXPECT_EQ(budget->epsilon_spent(), 0.0);
  const double q = *SamplingRate(10, 100);
  EXPECT_DOUBLE_EQ(q, 0.1);
  int rounds = 0;
  double last = 0;
  absl::Status check;
  while ((check = budget->CheckRound(q, 1.5, 1)).ok()) {
    auto eps = budget->Commit(q, 1.5, 1);
    ASSERT_TRUE(eps.ok()) << eps.status();
    EXPECT_GT(*eps, last);
    EXPECT_LE(*eps, 2.0);
    last = *eps;
    ASSERT_LT(++rounds, 10000);
  }
  // sigma 1.5, q 0.1: about 0.95 after one round, 1.55 after 10, 2.85 after 50.
  EXPECT_GT(rounds, 10);
  EXPECT_LT(rounds, 50);
  EXPECT_EQ(budget->rounds(), static_cast<uint64_t>(rounds));
  EXPECT_EQ(check.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(check.message(), HasSubstr("round would raise epsilon to "));
  EXPECT_THAT(check.message(), HasSubstr("> budget 2"));
  // The refused round would indeed have crossed it, per the accountant.
  common::RdpAccountant acc = *common::RdpAccountant::FromJson(budget->StateJson());
  ASSERT_TRUE(acc.AddRound({q, 1.5, 1}).ok());
  EXPECT_GT(acc.EpsilonFor(1e-5)->epsilon, 2.0);
  EXPECT_DOUBLE_EQ(budget->epsilon_spent(), last);
  // More noise still fits.
  EXPECT_TRUE(budget->CheckRound(q, 50.0, 1).ok());
}

TEST(DpBudgetTest, StateSurvivesARestart) {
  auto a = DpBudget::Create({5.0, 1e-6}, "");
  ASSERT_TRUE(a.ok());
  for (int i = 0; i < 7; ++i) ASSERT_TRUE(a->Commit(0.05, 0.9, 1).ok());
  auto b = DpBudget::Create({5.0, 1e-6}, a->StateJson());
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->epsilon_spent(), a->epsilon_spent());
  EXPECT_EQ(b->rounds(), 7u);
  EXPECT_EQ(*b->Commit(0.05, 0.9, 1), *a->Commit(0.05, 0.9, 1));
}

TEST(DpBudgetTest, CommitRecordsEvenPastTheBudget) {
  auto budget = DpBudget::Create({0.1, 1e-5}, "");
  ASSERT_TRUE(budget.ok());
  EXPECT_FALSE(budget->CheckRound(1.0, 0.5, 1).ok());
  auto eps = budget->Commit(1.0, 0.5, 1);
  ASSERT_TRUE(eps.ok());
  EXPECT_GT(*eps, 0.1);
  EXPECT_EQ(budget->epsilon_spent(), *eps);
}

TEST(DpBudgetTest, RejectsBadInputAndKeepsState) {
  EXPECT_THAT(DpBudget::Create({0, 1e-5}, "").status().message(), HasSubstr("epsilon_budget"));
  EXPECT_THAT(DpBudget::Create({1, 0}, "").status().message(), HasSubstr("delta"));
  EXPECT_THAT(DpBudget::Create({1, 1e-5}, "{").status().message(), HasSubstr("not a JSON"));
  EXPECT_FALSE(SamplingRate(0, 10).ok());
  EXPECT_FALSE(SamplingRate(11, 10).ok());
  auto budget = DpBudget::Create({3, 1e-5}, "");
  ASSERT_TRUE(budget.ok());
  ASSERT_TRUE(budget->Commit(0.1, 1.0, 1).ok());
  const std::string before = budget->StateJson();
  const double eps = budget->epsilon_spent();
  EXPECT_EQ(budget->Commit(1.5, 1.0, 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(budget->Commit(0.1, -1.0, 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(budget->Commit(0.1, 0.0, 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(budget->CheckRound(0.1, -1.0, 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(budget->StateJson(), before);
  EXPECT_EQ(budget->epsilon_spent(), eps);
  // sigma = 0 is refused by the gate (infinite epsilon).
  EXPECT_EQ(budget->CheckRound(0.1, 0.0, 1).code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace fedlora::coordinator
