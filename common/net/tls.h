#pragma once
// gRPC TLS credentials from PEM files, and peer identity.
//
// Servers always require and verify a client certificate signed by the fleet
// CA (mutual TLS). Clients verify the server against the same CA.

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

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsFiles& files);
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsFiles& files);

struct PeerIdentity {
  std::string common_name;
  std::string role;  // certificate OU: "agent", "admin", "viewer"
};
// Identity of the authenticated peer of a server call; Unauthenticated if none.
absl::StatusOr<PeerIdentity> GetPeerIdentity(const grpc::ServerContextBase& context);

}  // namespace fedlora::common
