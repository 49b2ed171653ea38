#pragma once
// Minimal structured logging to stderr for the coordinator: one line per event,
// either text ("2026-01-01T00:00:00.000Z INFO round opened round=1 participants=3")
// or a JSON object per line ({"ts":..,"level":..,"msg":..,"round":1,...}).
// Safe for concurrent use; lines never interleave.

#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fedlora::coordinator {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

// Process-wide settings (set once at startup; defaults: text, info).
void SetLogFormat(bool json);
void SetLogLevel(LogLevel level);
// "debug" | "info" | "warn" | "error"; anything else -> info.
LogLevel ParseLogLevel(std::string_view name);

using LogFields = std::vector<std::pair<std::string, std::string>>;
void Log(LogLevel level, std::string_view message, const LogFields& fields = {});

}  // namespace fedlora::coordinator
