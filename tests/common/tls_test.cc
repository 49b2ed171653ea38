// common/net/tls.h: every server port speaks TLS 1.3 only. A raw OpenSSL client
// with the fleet's client certificate is refused when it offers at most TLS 1.2
// and completes the handshake (at TLS 1.3) otherwise.
#include "common/net/tls.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "common/crypto/pki.h"
#include "fedlora/v1/fedlora.grpc.pb.h"
#include "tests/testing/test_util.h"

namespace fedlora::common {
namespace {

using ::fedlora::testutil::TempDir;

// Result of one raw handshake: the negotiated version (0 = failed).
int Handshake(int port, int max_version, const std::string& cert, const std::string& key) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  SSL_CTX_set_max_proto_version(ctx, max_version);
  if (!cert.empty()) {
    SSL_CTX_use_certificate_file(ctx, cert.c_str(), SSL_FILETYPE_PEM);
    SSL_CTX_use_PrivateKey_file(ctx, key.c_str(), SSL_FILETYPE_PEM);
  }
  static const unsigned char kAlpn[] = {2, 'h', '2'};
  SSL_CTX_set_alpn_protos(ctx, kAlpn, sizeof(kAlpn));
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int version = 0;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    SSL* ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) == 1) version = SSL_version(ssl);
    SSL_free(ssl);
  }
  ERR_clear_error();
  ::close(fd);
  SSL_CTX_free(ctx);
  return version;
}

class TlsVersionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pki_ = dir_.Sub("pki");
    ASSERT_TRUE(InitPki(pki_).ok());
    ASSERT_TRUE(IssueCertificate(pki_, "agent-1", CertRole::kAgent, pki_).ok());
  }
  std::unique_ptr<grpc::Server> Serve(std::shared_ptr<grpc::ServerCredentials> creds, int* port) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", creds, port);
    builder.RegisterService(&service_);  // gRPC will not start a server without one
    return builder.BuildAndStart();
  }
  TempDir dir_;
  std::string pki_;
  fedlora::v1::Admin::CallbackService service_;  // every method UNIMPLEMENTED
};

TEST_F(TlsVersionTest, MutualTlsPortRefusesTls12) {
  auto creds = MakeServerCredentials(
      {pki_ + "/ca.pem", pki_ + "/coordinator.pem", pki_ + "/coordinator.key"});
  ASSERT_TRUE(creds.ok()) << creds.status();
  int port = 0;
  auto server = Serve(*creds, &port);
  ASSERT_NE(server, nullptr);
  ASSERT_GT(port, 0);
  const std::string cert = pki_ + "/agent-1.pem", key = pki_ + "/agent-1.key";
  EXPECT_EQ(Handshake(port, TLS1_2_VERSION, cert, key), 0) << "a TLS 1.2-only client got in";
  EXPECT_EQ(Handshake(port, TLS1_3_VERSION, cert, key), TLS1_3_VERSION);
  server->Shutdown();
}

// A PeerCertificateCheck refuses in the handshake: the refused client's call
// ends UNAVAILABLE (no service is reached), an accepted one reaches the service
// (UNIMPLEMENTED here), and the check sees each verified client's CN.
TEST_F(TlsVersionTest, PeerCheckRefusesInTheHandshake) {
  ASSERT_TRUE(IssueCertificate(pki_, "agent-2", CertRole::kAgent, pki_).ok());
  std::mutex mu;
  std::set<std::string> seen;
  auto creds = MakeServerCredentials(
      {pki_ + "/ca.pem", pki_ + "/coordinator.pem", pki_ + "/coordinator.key"},
      [&](const std::string& cn, const std::string& pem) -> absl::Status {
        std::lock_guard<std::mutex> lock(mu);
        seen.insert(cn);
        if (pem.find("BEGIN CERTIFICATE") == std::string::npos) {
          return absl::InvalidArgumentError("no PEM");
        }
        return cn == "agent-1" ? absl::PermissionDeniedError("agent-1 is refused")
                               : absl::OkStatus();
      });
  ASSERT_TRUE(creds.ok()) << creds.status();
  int port = 0;
  auto server = Serve(*creds, &port);
  ASSERT_NE(server, nullptr);
  auto call = [&](const std::string& name) {
    auto channel_creds = MakeChannelCredentials(
        {pki_ + "/ca.pem", pki_ + "/" + name + ".pem", pki_ + "/" + name + ".key"});
    EXPECT_TRUE(channel_creds.ok());
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    auto stub = fedlora::v1::Admin::NewStub(
        grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(port), *channel_creds, args));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    fedlora::v1::StatusResponse response;
    return stub->Status(&ctx, fedlora::v1::StatusRequest(), &response).error_code();
  };
  EXPECT_EQ(call("agent-1"), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(call("agent-2"), grpc::StatusCode::UNIMPLEMENTED);
  {
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_EQ(seen, (std::set<std::string>{"agent-1", "agent-2"}));
  }
  // Still TLS 1.3 only, with the check installed.
  EXPECT_EQ(Handshake(port, TLS1_2_VERSION, pki_ + "/agent-2.pem", pki_ + "/agent-2.key"), 0);
  server->Shutdown();
}

TEST_F(TlsVersionTest, ServerAuthOnlyPortRefusesTls12) {
  auto creds = MakeServerAuthOnlyCredentials(pki_ + "/coordinator.pem", pki_ + "/coordinator.key");
  ASSERT_TRUE(creds.ok()) << creds.status();
  int port = 0;
  auto server = Serve(*creds, &port);
  ASSERT_NE(server, nullptr);
  EXPECT_EQ(Handshake(port, TLS1_2_VERSION, "", ""), 0);
  EXPECT_EQ(Handshake(port, TLS1_3_VERSION, "", ""), TLS1_3_VERSION);
  server->Shutdown();
}

TEST_F(TlsVersionTest, MissingFilesAreClearErrors) {
  auto creds = MakeServerAuthOnlyCredentials(pki_ + "/nope.pem", pki_ + "/coordinator.key");
  EXPECT_FALSE(creds.ok());
  auto channel = MakeServerAuthChannelCredentials(pki_ + "/coordinator.key");
  EXPECT_EQ(channel.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(channel.status().message(), ::testing::HasSubstr("BEGIN CERTIFICATE"));
}

}  // namespace
}  // namespace fedlora::common
