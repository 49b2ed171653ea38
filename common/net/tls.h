#pragma once
// gRPC TLS credentials from PEM files, and peer identity.
//
// Servers always require and verify a client certificate signed by the fleet
// CA (mutual TLS). Clients verify the server against the same CA.
// Every server port speaks TLS 1.3 only: a client offering at most TLS 1.2 fails
// the handshake. (gRPC 1.51's public C++ API has no minimum-version setting;
// see tls.cc for how it is set.) The enrollment port is the one exception to
// mutual TLS: server authentication only (MakeServerAuthOnlyCredentials).
//
// A mutual-TLS server may add a PeerCertificateCheck: it runs inside every TLS
// handshake, after the client's chain verified against the CA, and a non-OK
// answer fails that handshake (the client's call ends UNAVAILABLE; no RPC reaches
// a service). The coordinator refuses revoked agents this way (docs/security.md).

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace grpc {
class ServerCredentials;
class ChannelCredentials;
class ServerContextBase;
}  // namespace grpc

namespace fedlora::common {

struct TlsFiles {
  std::string ca_cert;  // path to the fleet CA certificate (PEM)
  std::string cert;     // own certificate (PEM)
  std::string key;      // own private key (PEM)
};

// The verified client certificate's subject CN and PEM -> OK to accept the
// connection, or the reason to refuse it (logged by gRPC). Called on gRPC's
// handshake threads, concurrently: must be thread-safe and must not block.
using PeerCertificateCheck =
    std::function<absl::Status(const std::string& common_name, const std::string& cert_pem)>;

// Mutual TLS 1.3; `check` (may be empty) runs in every handshake as above.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFiles& files, PeerCertificateCheck check = nullptr);
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsFiles& files);

// TLS 1.3 server credentials that request no client certificate (the enrollment
// port, where the caller has no certificate yet). cert/key: PEM file paths.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerAuthOnlyCredentials(
    const std::string& cert, const std::string& key);
// Channel credentials that verify the server against `ca_cert` (path) and present
// no client certificate (fedlora-agent enroll).
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeServerAuthChannelCredentials(
    const std::string& ca_cert);

struct PeerIdentity {
  std::string common_name;
  std::string role;  // certificate OU: "agent", "admin", "viewer"
  std::string fingerprint;  // hex SHA-256 of the certificate's DER
};
// Identity of the authenticated peer of a server call; Unauthenticated if none.
absl::StatusOr<PeerIdentity> GetPeerIdentity(const grpc::ServerContextBase& context);

}  // namespace fedlora::common
