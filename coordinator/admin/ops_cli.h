#pragma once
// fedlora-admin commands for version management and backups (docs/operations.md):
//
//   fedlora-admin versions list [--data-dir DIR] [--json]
//     With --data-dir: opens the coordinator's data dir read-only (works while it
//     runs); otherwise asks Admin.ListVersions (needs --coordinator --ca --cert --key).
//     Columns: current marker, id, round, parent, strategy, contributors, quant,
//     relative L2 / max abs quantization error, signed, sha256.
//   fedlora-admin versions rollback [--to VERSION]     Admin.RollbackVersion
//   fedlora-admin versions promote VERSION             Admin.PromoteVersion
//   fedlora-admin backup create DIR                    Admin.CreateBackup
//     DIR is a new directory, an absolute path on the coordinator host. Restore: stop the
//     coordinator and start it with --data-dir on (a copy of) DIR.
// The moves and the backup need an admin certificate and are audited with its CN.
//
// OpsCommands registers these subcommands on the CLI11 app (it binds its own
// members, so it must outlive parsing) and runs the one that was parsed.

#include <CLI/CLI.hpp>
#include <optional>
#include <ostream>
#include <string>

#include "coordinator/admin/admin_connection.h"

namespace fedlora::coordinator {


class OpsCommands {
 public:
  explicit OpsCommands(CLI::App* app);
  OpsCommands(const OpsCommands&) = delete;
  OpsCommands& operator=(const OpsCommands&) = delete;

  // The exit code (0 ok, 1 failed, 2 bad usage) when one of these commands was
  // parsed; nullopt otherwise.
  std::optional<int> Run(const AdminConnection& connection, std::ostream& out,
                         std::ostream& err) const;

 private:
  CLI::App* list_ = nullptr;
  CLI::App* rollback_ = nullptr;
  CLI::App* promote_ = nullptr;
  CLI::App* backup_create_ = nullptr;
  std::string data_dir_;
  bool json_ = false;
  std::string to_;
  std::string version_;
  std::string backup_dir_;
};

}  // namespace fedlora::coordinator
