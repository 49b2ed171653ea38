#pragma once
// Spawning and supervising the real fedlora binaries from integration tests.
//
// Process::Start runs `argv` (argv[0] = absolute path) with stdout and stderr
// redirected to files. The destructor kills (SIGKILL) and reaps a process
// still running, so a failing test never leaves strays behind.

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

namespace fedlora::testing {

class Process {
 public:
  static Process Start(const std::vector<std::string>& argv, const std::string& stdout_path,
                       const std::string& stderr_path);
  Process(Process&& other) noexcept;
  Process& operator=(Process&& other) noexcept;
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;
  ~Process();

  pid_t pid() const { return pid_; }
  bool running();
  // Waits up to `timeout` for exit; returns the exit status (or 128+signal), nullopt on timeout.
  std::optional<int> Wait(std::chrono::milliseconds timeout);
  void Signal(int sig);
  // SIGKILL + reap.
  void Kill();

 private:
  Process() = default;
  pid_t pid_ = -1;
  std::optional<int> exit_code_;
};

// Runs a command to completion (timeout), returning exit status; output to the files.
int RunToCompletion(const std::vector<std::string>& argv, const std::string& stdout_path,
                    const std::string& stderr_path, std::chrono::milliseconds timeout);

std::string ReadTextFile(const std::string& path);
// A fresh directory under TMPDIR (or /tmp), removed by RemoveTree.
std::string MakeTempDir(const std::string& prefix);
void RemoveTree(const std::string& path);
// A TCP port on 127.0.0.1 that was free a moment ago.
int PickFreePort();
// Path of a fedlora binary in the build tree.
std::string BinPath(const std::string& name);

}  // namespace fedlora::testing
