// fedlora-coordinator: parses flags / YAML config and runs the coordinator until
// SIGINT/SIGTERM or, with --rounds, until the last round is evaluated.
#include <malloc.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <mutex>
#include <thread>

#include "coordinator/config.h"
#include "coordinator/logging.h"
#include "coordinator/server.h"

int main(int argc, char** argv) {
  using namespace fedlora::coordinator;
  // glibc gives each thread that contends for a lock its own arena (up to 8 per
  // core), and an arena keeps much of what is freed in it: megabyte payloads
  // allocated and freed on gRPC, worker and RocksDB threads stayed resident (bench
  // coordinator, 300 agents x 4 MB: peak RSS 303 MB with two arenas, 482-490 MB
  // with the default; docs/benchmarks.md). A fixed M_MMAP_THRESHOLD was tried
  // instead: it made aggregation ~15x slower. An operator's MALLOC_ARENA_MAX or
  // GLIBC_TUNABLES wins.
  if (std::getenv("MALLOC_ARENA_MAX") == nullptr && std::getenv("GLIBC_TUNABLES") == nullptr) {
    mallopt(M_ARENA_MAX, 2);
  }
  auto config = ParseCoordinatorFlags(argc, argv);
  if (!config.ok()) {
    if (absl::IsCancelled(config.status())) return 0;  // --help
    std::fprintf(stderr, "fedlora-coordinator: %s\n", config.status().ToString().c_str());
    return 2;
  }
  SetLogFormat(config->log_format == "json");
  SetLogLevel(ParseLogLevel(config->log_level));

  // Signals are taken synchronously by one thread (sigtimedwait), never by a handler.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  std::mutex mu;
  std::condition_variable cv;
  bool stop = false;
  auto request_stop = [&]() {
    std::lock_guard<std::mutex> lock(mu);
    stop = true;
    cv.notify_all();
  };

  ServerOptions options;
  options.on_finished = request_stop;
  auto server = CoordinatorServer::Start(*config, options);
  if (!server.ok()) {
    std::fprintf(stderr, "fedlora-coordinator: %s\n", server.status().ToString().c_str());
    return 1;
  }

  std::atomic<bool> done{false};
  std::thread signal_thread([&]() {
    timespec timeout{0, 200 * 1000 * 1000};
    while (!done) {
      int sig = sigtimedwait(&signals, nullptr, &timeout);
      if (sig == SIGINT || sig == SIGTERM) {
        Log(LogLevel::kInfo, "signal received", {{"signal", sig == SIGINT ? "SIGINT" : "SIGTERM"}});
        request_stop();
        return;
      }
    }
  });
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&]() { return stop; });
  }
  (*server)->Shutdown();
  done = true;
  signal_thread.join();
  std::cout.flush();
  return 0;
}
