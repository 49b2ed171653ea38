// fedlora-coordinator: parses flags / YAML config and runs the coordinator until
// SIGINT/SIGTERM or, with --rounds, until the last round is evaluated.
#include <signal.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <thread>

#include "coordinator/config.h"
#include "coordinator/logging.h"
#include "coordinator/server.h"

int main(int argc, char** argv) {
  using namespace fedlora::coordinator;
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
