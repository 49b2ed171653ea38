#pragma once
// Helpers shared by the test areas (header-only: every area links it without a
// library of its own).
//
//  * TempDir: a fresh directory under gtest's temp dir, removed with everything
//    in it when the object goes out of scope.
//  * StatusIs(code, message): matches an absl::Status whose code is `code` and
//    whose message contains `message` (a string) or matches it (a matcher, e.g.
//    HasSubstr or AllOf); on a mismatch it prints the status.
//  * RunBinary(name, args): runs FEDLORA_BIN_DIR/name with `args` through the
//    shell and returns its exit code and output (stdout, plus stderr unless
//    `with_stderr` is false); a missing binary is exit code -1 with a message
//    naming it.

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fedlora::testutil {

class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "fedlora_test") {
    std::string tmpl = ::testing::TempDir() + "/" + prefix + "_XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    const char* made = ::mkdtemp(buf.data());
    if (made == nullptr) ADD_FAILURE() << "mkdtemp " << tmpl << " failed";
    path_ = made != nullptr ? made : tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// The message part of StatusIs: a string means "contains it".
inline ::testing::Matcher<std::string> MessageMatcher(const char* substr) {
  return ::testing::HasSubstr(substr);
}
inline ::testing::Matcher<std::string> MessageMatcher(const std::string& substr) {
  return ::testing::HasSubstr(substr);
}
template <typename M>
M MessageMatcher(M matcher) {
  return matcher;
}

MATCHER_P2(StatusIs, code, message, "") {
  const absl::Status s = arg;
  if (s.code() != code) {
    *result_listener << "status is " << s;
    return false;
  }
  if (!::testing::Matches(::fedlora::testutil::MessageMatcher(message))(std::string(s.message()))) {
    *result_listener << "message is \"" << s.message() << "\"";
    return false;
  }
  return true;
}

struct CommandResult {
  int exit_code = -1;
  std::string output;
};

inline CommandResult RunBinary(const std::string& name, const std::string& args,
                               bool with_stderr = true) {
  const std::string bin = std::string(FEDLORA_BIN_DIR) + "/" + name;
  CommandResult r;
  if (!std::filesystem::exists(bin)) {
    r.output = "missing binary " + bin + " (build the " + name + " target)";
    return r;
  }
  FILE* p = ::popen((bin + " " + args + (with_stderr ? " 2>&1" : "")).c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) r.output.append(buf, n);
  const int status = ::pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

}  // namespace fedlora::testutil
