#include "coordinator/http_server.h"

#include <gtest/gtest.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <chrono>
#include <stdexcept>

#include "coordinator/metrics.h"

namespace fedlora::coordinator {
namespace {

using boost::asio::ip::tcp;

// Sends `request` raw to 127.0.0.1:port and returns all bytes read until the server
// closes the connection (errors end the read; what arrived is returned).
std::string RawExchange(int port, const std::string& request) {
  boost::asio::io_context io;
  tcp::socket socket(io);
  boost::system::error_code ec;
  socket.connect(tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), port), ec);
  if (ec) return "connect failed: " + ec.message();
  boost::asio::write(socket, boost::asio::buffer(request), ec);
  std::string out;
  char buf[4096];
  for (;;) {
    size_t n = socket.read_some(boost::asio::buffer(buf), ec);
    out.append(buf, n);
    if (ec) break;
  }
  return out;
}

std::string Get(int port, const std::string& target, const std::string& method = "GET") {
  return RawExchange(port, method + " " + target +
                               " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
}

std::string Body(const std::string& response) {
  size_t p = response.find("\r\n\r\n");
  return p == std::string::npos ? "" : response.substr(p + 4);
}

class HttpServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto server = HttpServer::Start("127.0.0.1:0", [this]() { return metrics_.Render(); });
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    ASSERT_GT(server_->port(), 0);
  }

  MetricsRegistry metrics_;
  std::unique_ptr<HttpServer> server_;
};

TEST_F(HttpServerTest, HealthzIsOkThen503WhileShuttingDown) {
  std::string r = Get(server_->port(), "/healthz");
  EXPECT_EQ(r.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << r;
  EXPECT_EQ(Body(r), "ok\n");
  server_->SetShuttingDown();
  r = Get(server_->port(), "/healthz");
  EXPECT_EQ(r.rfind("HTTP/1.1 503", 0), 0u) << r;
}

TEST_F(HttpServerTest, MetricsShowsCurrentValues) {
  metrics_.AddCounter("fedlora_updates_accepted_total", "Accepted", 2);
  metrics_.AddCounter("fedlora_updates_rejected_total", "Rejected", 1,
                      {{"reason", "INVALID_ARGUMENT"}});
  std::string r = Get(server_->port(), "/metrics");
  EXPECT_EQ(r.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << r;
  EXPECT_NE(r.find("Content-Type: text/plain; version=0.0.4"), std::string::npos) << r;
  EXPECT_EQ(Body(r), metrics_.Render());
  EXPECT_NE(Body(r).find("fedlora_updates_accepted_total 2\n"), std::string::npos) << r;
  EXPECT_NE(Body(r).find("fedlora_updates_rejected_total{reason=\"INVALID_ARGUMENT\"} 1\n"),
            std::string::npos);
  metrics_.AddCounter("fedlora_updates_accepted_total", "Accepted", 1);
  r = Get(server_->port(), "/metrics?x=1");
  EXPECT_NE(Body(r).find("fedlora_updates_accepted_total 3\n"), std::string::npos) << r;
}

TEST_F(HttpServerTest, UnknownPathIs404AndOtherMethodsAre405) {
  EXPECT_EQ(Get(server_->port(), "/nope").rfind("HTTP/1.1 404", 0), 0u);
  const std::string r = Get(server_->port(), "/metrics", "DELETE");
  EXPECT_EQ(r.rfind("HTTP/1.1 405", 0), 0u) << r;
  EXPECT_NE(r.find("Allow: GET"), std::string::npos) << r;
  EXPECT_EQ(RawExchange(server_->port(),
                        "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                        "Connection: close\r\n\r\nhi")
                .rfind("HTTP/1.1 405", 0),
            0u);
}

TEST_F(HttpServerTest, KeepAliveServesSeveralRequestsOnOneConnection) {
  const std::string r = RawExchange(
      server_->port(),
      "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n"
      "Connection: close\r\n\r\n");
  size_t first = r.find("HTTP/1.1 200 OK");
  ASSERT_NE(first, std::string::npos) << r;
  EXPECT_NE(r.find("HTTP/1.1 200 OK", first + 1), std::string::npos) << r;
}

TEST_F(HttpServerTest, OversizedRequestsAreRejected) {
  // A declared body over the limit: 413 as soon as the header is parsed.
  std::string r = RawExchange(server_->port(),
                              "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n");
  EXPECT_EQ(r.rfind("HTTP/1.1 413", 0), 0u) << r;
  // A header over the limit: 413 or a closed connection, never a page.
  r = RawExchange(server_->port(), "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " +
                                       std::string(kMaxHttpHeaderBytes + 100, 'a') + "\r\n\r\n");
  EXPECT_EQ(r.find("200 OK"), std::string::npos) << r.substr(0, 200);
  if (!r.empty()) {
    EXPECT_EQ(r.rfind("HTTP/1.1 413", 0), 0u) << r.substr(0, 200);
  }
  // Garbage is not a request either; the server keeps serving.
  r = RawExchange(server_->port(), "\x01\x02 garbage\r\n\r\n");
  EXPECT_EQ(r.find("200 OK"), std::string::npos);
  EXPECT_EQ(Get(server_->port(), "/healthz").rfind("HTTP/1.1 200 OK", 0), 0u);
}

TEST_F(HttpServerTest, ThrowingMetricsCallbackGives500) {
  auto server = HttpServer::Start("127.0.0.1:0", []() -> std::string {
    throw std::runtime_error("boom");
  });
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string r = Get((*server)->port(), "/metrics");
  EXPECT_EQ(r.rfind("HTTP/1.1 500", 0), 0u) << r;
  EXPECT_EQ(Get((*server)->port(), "/healthz").rfind("HTTP/1.1 200", 0), 0u);
}

TEST_F(HttpServerTest, StopClosesIdleConnectionsAndIsIdempotent) {
  boost::asio::io_context io;
  tcp::socket idle(io);
  idle.connect(tcp::endpoint(boost::asio::ip::make_address("127.0.0.1"), server_->port()));
  const int port = server_->port();
  const auto start = std::chrono::steady_clock::now();
  server_->Stop();
  server_->Stop();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  char c;
  boost::system::error_code ec;
  idle.read_some(boost::asio::buffer(&c, 1), ec);
  EXPECT_TRUE(ec) << "the idle connection should be closed";
  EXPECT_EQ(Get(port, "/healthz").rfind("connect failed", 0), 0u);
  server_.reset();
}

TEST(HttpServerStartTest, BadAddressesAreErrors) {
  auto fn = []() { return std::string(); };
  EXPECT_EQ(HttpServer::Start("no-port", fn).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(HttpServer::Start("127.0.0.1:99999", fn).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(HttpServer::Start("127.0.0.1:x", fn).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto first = HttpServer::Start("127.0.0.1:0", fn);
  ASSERT_TRUE(first.ok());
  auto second = HttpServer::Start("127.0.0.1:" + std::to_string((*first)->port()), fn);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable) << second.status();
}

}  // namespace
}  // namespace fedlora::coordinator
