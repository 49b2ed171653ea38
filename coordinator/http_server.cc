#include "coordinator/http_server.h"

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <exception>
#include <mutex>
#include <optional>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "coordinator/logging.h"

namespace fedlora::coordinator {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = boost::asio::ip::tcp;

class HttpSession;

struct HttpServer::Impl {
  asio::io_context io;
  tcp::acceptor acceptor{io};
  MetricsFn metrics;
  const std::atomic<bool>* shutting_down = nullptr;
  bool stopping = false;  // io thread only
  std::set<std::shared_ptr<HttpSession>> sessions;  // io thread only

  void Accept();
};

class HttpSession : public std::enable_shared_from_this<HttpSession> {
 public:
  HttpSession(tcp::socket socket, HttpServer::Impl* server)
      : stream_(std::move(socket)), server_(server) {}

  void Begin() { Read(); }

  void Close() {
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream_.socket().close(ec);
  }

 private:
  void Read() {
    parser_.emplace();
    parser_->header_limit(kMaxHttpHeaderBytes);
    parser_->body_limit(kMaxHttpBodyBytes);
    stream_.expires_after(kHttpReadTimeout);
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, size_t) {
                       self->OnRead(ec);
                     });
  }

  void OnRead(beast::error_code ec) {
    try {
      if (ec == http::error::header_limit || ec == http::error::body_limit ||
          ec == http::error::buffer_overflow) {
        Respond(http::status::payload_too_large, "request too large\n", false, 11);
        return;
      }
      if (ec) {
        Finish();
        return;
      }
      const auto& req = parser_->get();
      const bool keep_alive = req.keep_alive();
      const unsigned version = req.version();
      std::string target(req.target());
      if (size_t q = target.find('?'); q != std::string::npos) target.resize(q);
      if (target != "/metrics" && target != "/healthz") {
        Respond(http::status::not_found, "not found\n", keep_alive, version);
        return;
      }
      if (req.method() != http::verb::get) {
        Respond(http::status::method_not_allowed, "method not allowed\n", keep_alive, version);
        return;
      }
      if (target == "/healthz") {
        if (server_->shutting_down->load()) {
          Respond(http::status::service_unavailable, "shutting down\n", false, version);
        } else {
          Respond(http::status::ok, "ok\n", keep_alive, version);
        }
        return;
      }
      std::string body;
      try {
        body = server_->metrics ? server_->metrics() : std::string();
      } catch (const std::exception& e) {
        Respond(http::status::internal_server_error, absl::StrCat("metrics failed: ", e.what()),
                false, version);
        return;
      }
      Respond(http::status::ok, std::move(body), keep_alive, version,
              "text/plain; version=0.0.4; charset=utf-8");
    } catch (const std::exception& e) {
      Log(LogLevel::kWarn, "http handler failed", {{"error", e.what()}});
      Finish();
    }
  }

  void Respond(http::status status, std::string body, bool keep_alive, unsigned version,
               const char* content_type = "text/plain; charset=utf-8") {
    auto res = std::make_shared<http::response<http::string_body>>(status, version);
    res->set(http::field::server, "fedlora-coordinator");
    res->set(http::field::content_type, content_type);
    if (status == http::status::method_not_allowed) res->set(http::field::allow, "GET");
    res->keep_alive(keep_alive);
    res->body() = std::move(body);
    res->prepare_payload();
    stream_.expires_after(kHttpReadTimeout);
    auto write_done = [self = shared_from_this(), res, keep_alive](beast::error_code ec, size_t) {
      try {
        if (ec || !keep_alive || self->server_->stopping) {
          self->Finish();
        } else {
          self->Read();
        }
      } catch (const std::exception&) {
        self->Finish();
      }
    };
    http::async_write(stream_, *res, std::move(write_done));
  }

  void Finish() {
    Close();
    server_->sessions.erase(shared_from_this());
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  HttpServer::Impl* server_;
};

void HttpServer::Impl::Accept() {
  acceptor.async_accept([this](beast::error_code ec, tcp::socket socket) {
    if (stopping || !acceptor.is_open()) return;
    if (!ec) {
      try {
        auto session = std::make_shared<HttpSession>(std::move(socket), this);
        sessions.insert(session);
        session->Begin();
      } catch (const std::exception& e) {
        Log(LogLevel::kWarn, "http accept failed", {{"error", e.what()}});
      }
    }
    Accept();
  });
}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& address,
                                                             MetricsFn metrics) {
  const size_t colon = address.rfind(':');
  int port = -1;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "metrics address: expected HOST:PORT with PORT in 0..65535, found '", address, "'"));
  }
  std::string host = address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  std::unique_ptr<HttpServer> server(new HttpServer());
  server->impl_ = std::make_shared<Impl>();
  Impl& impl = *server->impl_;
  impl.metrics = std::move(metrics);
  impl.shutting_down = &server->shutting_down_;
  beast::error_code ec;
  tcp::resolver resolver(impl.io);
  auto results = resolver.resolve(host, std::to_string(port), ec);
  if (ec || results.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("metrics address '", address,
                                                   "': cannot resolve host '", host,
                                                   "': ", ec.message()));
  }
  const tcp::endpoint endpoint = results.begin()->endpoint();
  impl.acceptor.open(endpoint.protocol(), ec);
  if (!ec) impl.acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl.acceptor.bind(endpoint, ec);
  if (!ec) impl.acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on metrics address '", address, "': ", ec.message()));
  }
  server->port_ = impl.acceptor.local_endpoint(ec).port();
  impl.Accept();
  server->thread_ = std::thread([impl = server->impl_]() {
    for (;;) {
      try {
        impl->io.run();
        return;
      } catch (const std::exception& e) {
        Log(LogLevel::kError, "http server handler threw", {{"error", e.what()}});
      }
    }
  });
  Log(LogLevel::kInfo, "metrics listening",
      {{"address", address}, {"port", std::to_string(server->port_)}});
  return server;
}

void HttpServer::Stop() {
  if (stopped_.exchange(true)) return;
  shutting_down_.store(true);
  if (!impl_) return;
  asio::post(impl_->io, [impl = impl_]() {
    impl->stopping = true;
    beast::error_code ec;
    impl->acceptor.close(ec);
    auto sessions = std::move(impl->sessions);
    impl->sessions.clear();
    for (const auto& s : sessions) s->Close();
  });
  if (thread_.joinable()) thread_.join();
}

HttpServer::~HttpServer() { Stop(); }

}  // namespace fedlora::coordinator
