#pragma once
// A minimal HTTP/1.1 server for operations endpoints (Boost.Beast), on its own
// io_context thread:
//
//   GET /metrics  -> 200, Content-Type "text/plain; version=0.0.4", body = metrics()
//   GET /healthz  -> 200 "ok\n" while serving; 503 "shutting down\n" after
//                    SetShuttingDown()
//   other paths   -> 404; methods other than GET -> 405 with "Allow: GET"
//
// A request whose header exceeds kMaxHttpHeaderBytes or that carries a body larger
// than kMaxHttpBodyBytes is answered 413 and the connection is closed; a connection
// idle for kHttpReadTimeout is closed. Keep-alive is honoured. No exception escapes an
// Asio handler (a throwing `metrics` callback gives 500).
//
//   ASSIGN_OR_RETURN(auto http, HttpServer::Start("127.0.0.1:0", [&] { return m.Render(); }));
//   http->port();   // the port chosen
//   http->Stop();   // closes the acceptor and every connection, joins the thread
//
// Start() fails with InvalidArgument for an address that is not HOST:PORT and with
// Unavailable when it cannot bind. Stop() is idempotent; the destructor calls it.

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace fedlora::coordinator {

inline constexpr size_t kMaxHttpHeaderBytes = 8 * 1024;
inline constexpr size_t kMaxHttpBodyBytes = 1024;
inline constexpr std::chrono::seconds kHttpReadTimeout{10};

class HttpServer {
 public:
  using MetricsFn = std::function<std::string()>;

  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const std::string& address,
                                                           MetricsFn metrics);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  int port() const { return port_; }
  // /healthz answers 503 from now on.
  void SetShuttingDown() { shutting_down_.store(true); }
  void Stop();

  struct Impl;

 private:
  HttpServer() = default;

  std::shared_ptr<Impl> impl_;
  std::thread thread_;
  int port_ = 0;
  std::atomic<bool> shutting_down_{false};
  std::atomic<bool> stopped_{false};
};

}  // namespace fedlora::coordinator
