#pragma once
// Status helpers for fedlora. Fallible functions return absl::Status or
// absl::StatusOr<T>; these macros propagate errors without boilerplate.
//
//   RETURN_IF_ERROR(DoThing());
//   ASSIGN_OR_RETURN(auto value, ComputeValue());
//
// ErrnoToStatus maps an errno value to the closest absl code, with context.

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define FEDLORA_STATUS_CONCAT_INNER_(a, b) a##b
#define FEDLORA_STATUS_CONCAT_(a, b) FEDLORA_STATUS_CONCAT_INNER_(a, b)

#define RETURN_IF_ERROR(expr)                      \
  do {                                             \
    ::absl::Status _fedlora_status = (expr);       \
    if (!_fedlora_status.ok()) return _fedlora_status; \
  } while (0)

#define FEDLORA_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                                   \
  if (!tmp.ok()) return tmp.status();                   \
  lhs = std::move(tmp).value()

#define ASSIGN_OR_RETURN(lhs, rexpr) \
  FEDLORA_ASSIGN_OR_RETURN_IMPL_(    \
      FEDLORA_STATUS_CONCAT_(_fedlora_statusor_, __LINE__), lhs, rexpr)

namespace fedlora::common {

// Maps errno to an absl::Status whose message is "<context>: <strerror>".
absl::Status ErrnoToStatus(int err, const std::string& context);

}  // namespace fedlora::common
