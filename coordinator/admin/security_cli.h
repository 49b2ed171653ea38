#pragma once
// fedlora-admin commands for agent identities (docs/security.md), wired into
// RunAdminCli; each calls SecurityAdmin on the coordinator with the global
// --coordinator --ca --cert --key (an admin certificate; viewers are refused):
//
//   fedlora-admin ... enroll create --name SITE [--expires 24h]
//     Prints the one-time enrollment token (shown once; the coordinator stores
//     only its SHA-256) and its expiry. --expires: N followed by s, m, h or d.
//   fedlora-admin ... enroll pending
//     Lists the enrollment requests waiting for a decision (enrollment_approval:
//     admin): id, agent name, key fingerprint, time, requester address.
//   fedlora-admin ... enroll approve ID [--reason TEXT]
//   fedlora-admin ... enroll deny ID [--reason TEXT]
//     Decides request ID (audited); approve signs the agent's CSR (role agent).
//   fedlora-admin ... agents revoke ID [--reason TEXT]
//     Revokes every certificate of agent ID at once: its session is cut, its
//     pending update in an open round discarded, later calls refused.

#include <memory>
#include <optional>
#include <ostream>
#include <string>

#include "coordinator/admin/admin_connection.h"

namespace CLI {
class App;
}

namespace fedlora::coordinator {


class SecurityCommands {
 public:
  // Adds `enroll` and `agents` to `app`.
  explicit SecurityCommands(CLI::App& app);
  // The exit code when one of these commands was parsed, else nullopt.
  std::optional<int> Run(const AdminConnection& connection, std::ostream& out,
                         std::ostream& err) const;

 private:
  CLI::App* enroll_create_ = nullptr;
  CLI::App* enroll_pending_ = nullptr;
  CLI::App* enroll_approve_ = nullptr;
  CLI::App* enroll_deny_ = nullptr;
  std::string request_id_;
  CLI::App* agents_revoke_ = nullptr;
  std::string name_;
  std::string expires_ = "24h";
  std::string agent_id_;
  std::string reason_;
};

// "90s", "30m", "24h", "7d" -> seconds; InvalidArgument-style message in *error.
std::optional<uint64_t> ParseDurationSeconds(const std::string& text, std::string* error);

}  // namespace fedlora::coordinator
