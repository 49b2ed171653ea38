#pragma once
// fedlora-admin: the fleet admin's command line.
//
//   fedlora-admin pki init DIR [--san NAME]... [--validity-days N]
//   fedlora-admin pki issue --ca-dir DIR --name NAME --role agent|admin|viewer --out DIR
//   fedlora-admin --coordinator HOST:PORT --ca F --cert F --key F [--timeout-s S] status [--json]
//
// RunAdminCli parses argv, runs the command and returns the process exit code
// (0 ok, 1 the command failed, 2 bad usage). Output goes to `out`, errors to `err`.

#include <ostream>

namespace fedlora::coordinator {

int RunAdminCli(int argc, const char* const* argv, std::ostream& out, std::ostream& err);

}  // namespace fedlora::coordinator
