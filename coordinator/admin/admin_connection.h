#pragma once
// How fedlora-admin reaches the coordinator's Admin / SecurityAdmin services:
// the app's global options (--coordinator, --ca, --cert, --key), shared by the
// command groups (admin_cli.cc, ops_cli.h, security_cli.h).

#include <string>

namespace fedlora::coordinator {

struct AdminConnection {
  std::string coordinator;  // HOST:PORT
  std::string ca;           // fleet CA (PEM)
  std::string cert;         // admin (or viewer) certificate (PEM)
  std::string key;          // its private key (PEM)
  double timeout_s = 30;    // deadline of each call
};

}  // namespace fedlora::coordinator
