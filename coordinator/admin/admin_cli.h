#pragma once
// fedlora-admin: the fleet admin's command line.
//
//   fedlora-admin pki init DIR [--san NAME]... [--validity-days N]
//   fedlora-admin pki issue --ca-dir DIR --name NAME --role agent|admin|viewer --out DIR
//   fedlora-admin --coordinator HOST:PORT --ca F --cert F --key F [--timeout-s S] status [--json]
//   fedlora-admin models export VERSION --data-dir DIR --format peft|gguf-lora|gguf-merged
//                 [--base-model DIR] [--quant f32|f16|q8_0|q4_0] --out PATH
//     Runs on the coordinator host: opens the coordinator's data dir read-only
//     (works while the coordinator runs) and exports a published version
//     (VERSION "latest" / "current" = the current one); see coordinator/export_version.h.
//     --base-model is required for the GGUF formats.
//     With --at-rest-key the data dir's encrypted blobs are read with that key.
//     When the coordinator is not running the export is recorded in the audit log
//     (actor "local:<user>"); while it runs (the data dir is locked) the export
//     proceeds read-only and says that it was not recorded.
//   fedlora-admin ... enroll create --name SITE [--expires 24h]   (admin/security_cli.h)
//   fedlora-admin ... enroll pending | approve ID | deny ID [--reason TEXT]
//   fedlora-admin ... agents revoke ID [--reason TEXT]
//   fedlora-admin keys create-at-rest FILE        32 random bytes (hex), mode 0600
//   fedlora-admin keys create-signing DIR         DIR/coordinator-signing.key (0600) + .pub
//   fedlora-admin audit verify --data-dir DIR [--json]
//     Read-only: checks the hash chain; exit 0 intact, 1 broken (first bad seq named).
//   fedlora-admin audit list --data-dir DIR [--from SEQ] [--limit N] [--json]
//   fedlora-admin versions list|rollback|promote, backup create: coordinator/admin/ops_cli.h
// `pki init` also writes the coordinator's adapter signing key pair
// (coordinator-signing.key / coordinator-signing.pub) beside the certificates.
//
// RunAdminCli parses argv, runs the command and returns the process exit code
// (0 ok, 1 the command failed, 2 bad usage). Output goes to `out`, errors to `err`.

#include <ostream>

namespace fedlora::coordinator {

int RunAdminCli(int argc, const char* const* argv, std::ostream& out, std::ostream& err);

}  // namespace fedlora::coordinator
