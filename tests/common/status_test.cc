#include "common/status/status.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cerrno>
#include <memory>
#include <string>

namespace fedlora::common {
namespace {

using ::testing::HasSubstr;

TEST(ErrnoToStatus, MapsCommonCodes) {
  struct Case {
    int err;
    absl::StatusCode code;
  } cases[] = {
      {ENOENT, absl::StatusCode::kNotFound},
      {EEXIST, absl::StatusCode::kAlreadyExists},
      {EACCES, absl::StatusCode::kPermissionDenied},
      {EPERM, absl::StatusCode::kPermissionDenied},
      {EINVAL, absl::StatusCode::kInvalidArgument},
      {ENOSPC, absl::StatusCode::kResourceExhausted},
      {ENOMEM, absl::StatusCode::kResourceExhausted},
      {EIO, absl::StatusCode::kInternal},
      {ENOTDIR, absl::StatusCode::kNotFound},
      {EROFS, absl::StatusCode::kPermissionDenied},
      {EISDIR, absl::StatusCode::kInvalidArgument},
      {EDQUOT, absl::StatusCode::kResourceExhausted},
      {EMFILE, absl::StatusCode::kResourceExhausted},
      {EAGAIN, absl::StatusCode::kUnavailable},
      {ECONNREFUSED, absl::StatusCode::kUnavailable},
      {ETIMEDOUT, absl::StatusCode::kDeadlineExceeded},
      {ENOSYS, absl::StatusCode::kUnimplemented},
  };
  for (const Case& c : cases) {
    absl::Status s = ErrnoToStatus(c.err, "opening /x/y");
    EXPECT_EQ(s.code(), c.code) << "errno " << c.err;
  }
}

TEST(ErrnoToStatus, UnknownErrnoIsInternalWithNumber) {
  absl::Status s = ErrnoToStatus(98765, "ctx");
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(s.message()), HasSubstr("ctx: "));
  EXPECT_THAT(std::string(s.message()), HasSubstr("98765"));  // glibc: "Unknown error N"
}

TEST(ErrnoToStatus, MessageHasContextAndReason) {
  absl::Status s = ErrnoToStatus(ENOENT, "opening /data/model.safetensors");
  EXPECT_THAT(std::string(s.message()), HasSubstr("opening /data/model.safetensors"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("No such file or directory"));
}

absl::Status Fails(int* calls) {
  ++*calls;
  return absl::DataLossError("broken");
}
absl::Status Succeeds(int* calls) {
  ++*calls;
  return absl::OkStatus();
}

absl::Status Chain(bool fail_first, int* calls) {
  RETURN_IF_ERROR(fail_first ? Fails(calls) : Succeeds(calls));
  RETURN_IF_ERROR(Succeeds(calls));
  return absl::OkStatus();
}

TEST(StatusMacros, ReturnIfErrorPropagatesAndStops) {
  int calls = 0;
  absl::Status s = Chain(/*fail_first=*/true, &calls);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(s.message(), "broken");
  EXPECT_EQ(calls, 1);  // the second call never ran

  calls = 0;
  EXPECT_TRUE(Chain(/*fail_first=*/false, &calls).ok());
  EXPECT_EQ(calls, 2);
}

absl::StatusOr<std::unique_ptr<int>> MakeInt(int v) {
  if (v < 0) return absl::InvalidArgumentError("negative");
  return std::make_unique<int>(v);
}

absl::StatusOr<int> SumTwice(int a, int b) {
  // Two uses on different lines must not collide; move-only values work.
  ASSIGN_OR_RETURN(std::unique_ptr<int> x, MakeInt(a));
  ASSIGN_OR_RETURN(auto y, MakeInt(b));
  return *x + *y;
}

TEST(StatusMacros, AssignOrReturn) {
  absl::StatusOr<int> ok = SumTwice(2, 3);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(*ok, 5);
  absl::StatusOr<int> bad = SumTwice(2, -1);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message(), "negative");
}

absl::Status AssignIntoExisting(int v, int* out) {
  int value = 0;
  ASSIGN_OR_RETURN(value, absl::StatusOr<int>(v < 0 ? absl::StatusOr<int>(absl::NotFoundError("no"))
                                                    : absl::StatusOr<int>(v)));
  *out = value;
  return absl::OkStatus();
}

TEST(StatusMacros, AssignOrReturnIntoExistingVariable) {
  int out = -7;
  ASSERT_TRUE(AssignIntoExisting(9, &out).ok());
  EXPECT_EQ(out, 9);
  out = -7;
  EXPECT_EQ(AssignIntoExisting(-1, &out).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(out, -7);
}

}  // namespace
}  // namespace fedlora::common
