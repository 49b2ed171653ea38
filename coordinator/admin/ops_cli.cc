#include "coordinator/admin/ops_cli.h"

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/net/tls.h"
#include "coordinator/state_store.h"
#include "coordinator/versions.h"
#include "fedlora/v1/fedlora.grpc.pb.h"

namespace fedlora::coordinator {
namespace {

namespace v1 = ::fedlora::v1;

std::string Err(double v) { return v < 0 || !std::isfinite(v) ? "-" : absl::StrFormat("%.3g", v); }

bool PrintJson(const google::protobuf::Message& message, const std::string& command,
               std::ostream& out, std::ostream& err) {
  std::string text;
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  auto s = google::protobuf::util::MessageToJsonString(message, &text, options);
  if (!s.ok()) {
    err << "fedlora-admin " << command << ": cannot print JSON: " << s.ToString() << "\n";
    return false;
  }
  out << text << "\n";
  return true;
}

void PrintVersions(const v1::ListVersionsResponse& r, std::ostream& out) {
  out << "current version: " << (r.current_version().empty() ? "(none)" : r.current_version())
      << "\n";
  out << absl::StrFormat("  %-8s %5s %-8s %-12s %5s %-5s %9s %9s %-6s %s\n", "version", "round",
                         "parent", "strategy", "contr", "quant", "rel_l2", "max_abs", "signed",
                         "sha256");
  for (const v1::VersionInfo& v : r.versions()) {
    out << absl::StrFormat("%s %-8s %5d %-8s %-12s %5d %-5s %9s %9s %-6s %s\n",
                           v.current() ? "*" : " ", v.version_id(), v.round_id(),
                           v.parent_version().empty() ? "-" : v.parent_version(), v.strategy(),
                           v.contributors_size(), v.quant(), Err(v.quant_rel_l2_error()),
                           Err(v.quant_max_abs_error()), v.is_signed() ? "yes" : "no",
                           v.sha256());
  }
}

// One unary Admin call with the connection's credentials and deadline.
template <typename Request, typename Response, typename Method>
int CallAdmin(const AdminConnection& c, const std::string& command, const char* rpc,
              Method method, const Request& request, Response* response, std::ostream& err) {
  if (c.coordinator.empty() || c.ca.empty() || c.cert.empty() || c.key.empty()) {
    err << "fedlora-admin " << command << ": needs --coordinator, --ca, --cert and --key\n";
    return 2;
  }
  auto creds = common::MakeChannelCredentials({c.ca, c.cert, c.key});
  if (!creds.ok()) {
    err << "fedlora-admin " << command << ": " << creds.status().ToString() << "\n";
    return 1;
  }
  auto stub = v1::Admin::NewStub(grpc::CreateChannel(c.coordinator, *creds));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(c.timeout_s * 1000)));
  grpc::Status rpc_status = ((*stub).*method)(&context, request, response);
  if (!rpc_status.ok()) {
    err << "fedlora-admin " << command << ": " << rpc << " on " << c.coordinator
        << " failed: code " << static_cast<int>(rpc_status.error_code()) << ": "
        << rpc_status.error_message() << "\n";
    return 1;
  }
  return 0;
}

absl::StatusOr<v1::ListVersionsResponse> ListFromDataDir(const std::string& dir) {
  auto store = StateStore::OpenReadOnly(dir);
  if (!store.ok()) return store.status();
  auto current = (*store)->CurrentVersion();
  if (!current.ok()) return current.status();
  auto versions = (*store)->ListVersions();
  if (!versions.ok()) return versions.status();
  v1::ListVersionsResponse response;
  response.set_current_version(*current);
  for (const VersionRecord& v : *versions) *response.add_versions() = ToVersionInfo(v, *current);
  return response;
}

}  // namespace

OpsCommands::OpsCommands(CLI::App* app) {
  CLI::App* versions = app->add_subcommand(
      "versions", "Published adapter versions: list, roll back, promote (docs/operations.md)");
  versions->require_subcommand(1);
  list_ = versions->add_subcommand(
      "list",
      "List versions (id, round, parent, strategy, contributors, quant and its error, signed, "
      "sha256; * = current): from --data-dir read-only, else via Admin.ListVersions");
  list_->add_option("--data-dir", data_dir_,
                    "The coordinator's data directory (read-only; works while it runs)");
  list_->add_flag("--json", json_, "Print the ListVersionsResponse as JSON");
  rollback_ = versions->add_subcommand(
      "rollback",
      "Move the current version back to its parent (or --to an ancestor); admin certificate, "
      "audited; an open round is aborted and the next round starts from it");
  rollback_->add_option("--to", to_, "An ancestor of the current version (default: its parent)");
  promote_ = versions->add_subcommand(
      "promote", "Make VERSION the current version; admin certificate, audited");
  promote_->add_option("VERSION", version_, "Version id, e.g. v000003")->required();

  CLI::App* backup = app->add_subcommand("backup", "Backups of the coordinator's state store");
  backup->require_subcommand(1);
  backup_create_ = backup->add_subcommand(
      "create",
      "Consistent on-line RocksDB checkpoint into DIR on the coordinator host (a new "
      "directory); admin certificate, audited. Restore: stop the coordinator and start it "
      "with --data-dir on (a copy of) DIR");
  backup_create_->add_option("DIR", backup_dir_,
                             "New directory, an absolute path on the coordinator host")
      ->required();
}

std::optional<int> OpsCommands::Run(const AdminConnection& c, std::ostream& out,
                                    std::ostream& err) const {
  if (list_->parsed()) {
    v1::ListVersionsResponse response;
    if (!data_dir_.empty()) {
      auto listed = ListFromDataDir(data_dir_);
      if (!listed.ok()) {
        err << "fedlora-admin versions list: " << listed.status().ToString() << "\n";
        return 1;
      }
      response = std::move(*listed);
    } else if (c.coordinator.empty()) {
      err << "fedlora-admin versions list: needs --data-dir DIR, or --coordinator, --ca, --cert "
             "and --key\n";
      return 2;
    } else if (int rc = CallAdmin(c, "versions list", "Admin.ListVersions",
                                  &v1::Admin::Stub::ListVersions, v1::ListVersionsRequest(),
                                  &response, err);
               rc != 0) {
      return rc;
    }
    if (json_) return PrintJson(response, "versions list", out, err) ? 0 : 1;
    PrintVersions(response, out);
    return 0;
  }
  if (rollback_->parsed() || promote_->parsed()) {
    const bool rollback = rollback_->parsed();
    const std::string command = rollback ? "versions rollback" : "versions promote";
    v1::VersionChangeResponse response;
    int rc;
    if (rollback) {
      v1::RollbackVersionRequest request;
      request.set_to_version(to_);
      rc = CallAdmin(c, command, "Admin.RollbackVersion", &v1::Admin::Stub::RollbackVersion,
                     request, &response, err);
    } else {
      v1::PromoteVersionRequest request;
      request.set_version_id(version_);
      rc = CallAdmin(c, command, "Admin.PromoteVersion", &v1::Admin::Stub::PromoteVersion,
                     request, &response, err);
    }
    if (rc != 0) return rc;
    out << "current version: " << response.previous_version() << " -> "
        << response.current_version();
    if (response.aborted_round() != 0) out << " (aborted open round " << response.aborted_round() << ")";
    out << "\n";
    return 0;
  }
  if (backup_create_->parsed()) {
    v1::CreateBackupRequest request;
    request.set_dir(backup_dir_);
    v1::CreateBackupResponse response;
    if (int rc = CallAdmin(c, "backup create", "Admin.CreateBackup",
                           &v1::Admin::Stub::CreateBackup, request, &response, err);
        rc != 0) {
      return rc;
    }
    out << "backup created in " << response.dir() << " on the coordinator host (current version "
        << (response.current_version().empty() ? "(none)" : response.current_version()) << ", "
        << response.audit_records() << " audit records, chain verified)\n";
    return 0;
  }
  return std::nullopt;
}

}  // namespace fedlora::coordinator
