// fedlora-admin: thin entry point; see coordinator/admin/admin_cli.h.
#include <iostream>

#include "coordinator/admin/admin_cli.h"

int main(int argc, char** argv) {
  return fedlora::coordinator::RunAdminCli(argc, argv, std::cout, std::cerr);
}
