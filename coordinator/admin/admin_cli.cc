#include "coordinator/admin/admin_cli.h"

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <ctime>
#include <nlohmann/json.hpp>
#include <pwd.h>
#include <unistd.h>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/crypto/at_rest.h"
#include "common/crypto/pki.h"
#include "common/crypto/sign.h"
#include "common/net/tls.h"
#include "coordinator/admin/ops_cli.h"
#include "coordinator/admin/security_cli.h"
#include "coordinator/audit.h"
#include "coordinator/export_version.h"
#include "coordinator/state_store.h"
#include "fedlora/v1/fedlora.grpc.pb.h"

namespace fedlora::coordinator {
namespace {

std::string FormatTime(uint64_t unix_ms) {
  if (unix_ms == 0) return "never";
  std::time_t secs = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string Num(double v) { return std::isfinite(v) ? absl::StrFormat("%.4f", v) : "-"; }

// Audit actor of commands run on the coordinator host: "local:<user>".
std::string LocalActor() {
  struct passwd* pw = ::getpwuid(::getuid());
  if (pw != nullptr && pw->pw_name != nullptr) return std::string("local:") + pw->pw_name;
  return absl::StrCat("local:uid", ::getuid());
}

std::string RecordLine(const AuditRecord& r) {
  return absl::StrFormat("%6d %s %-24s %-18s %s", r.seq, FormatTime(r.time_unix_ms), r.actor,
                         r.action, r.details_json);
}

int AuditVerify(const std::string& data_dir, bool json, std::ostream& out, std::ostream& err) {
  auto store = StateStore::OpenReadOnly(data_dir);
  if (!store.ok()) {
    err << "fedlora-admin audit verify: " << store.status().ToString() << "\n";
    return 1;
  }
  auto report = VerifyAuditChain((*store)->raw_store());
  if (!report.ok()) {
    err << "fedlora-admin audit verify: " << report.status().ToString() << "\n";
    return 1;
  }
  if (json) {
    nlohmann::json j{{"ok", report->ok},
                     {"records", report->records},
                     {"head_seq", report->head_seq},
                     {"head_hash", report->head_hash},
                     {"first_bad_seq", report->first_bad_seq},
                     {"error", report->error}};
    out << j.dump() << "\n";
  } else if (report->ok) {
    out << "audit log intact: " << report->records << " records, head seq " << report->head_seq
        << " hash " << report->head_hash << "\n";
  } else {
    out << "audit log BROKEN at seq " << report->first_bad_seq << ": " << report->error << "\n";
  }
  return report->ok ? 0 : 1;
}

int AuditList(const std::string& data_dir, uint64_t from, size_t limit, bool json,
              std::ostream& out, std::ostream& err) {
  auto store = StateStore::OpenReadOnly(data_dir);
  if (!store.ok()) {
    err << "fedlora-admin audit list: " << store.status().ToString() << "\n";
    return 1;
  }
  auto records = ListAuditRecords((*store)->raw_store(), from, limit);
  if (!records.ok()) {
    err << "fedlora-admin audit list: " << records.status().ToString() << "\n";
    return 1;
  }
  for (const AuditRecord& r : *records) {
    if (json) {
      nlohmann::json j{{"seq", r.seq},
                       {"time_unix_ms", r.time_unix_ms},
                       {"actor", r.actor},
                       {"action", r.action},
                       {"details", nlohmann::json::parse(r.details_json, nullptr, false)},
                       {"prev_hash", r.prev_hash},
                       {"hash", r.hash}};
      out << j.dump() << "\n";
    } else {
      out << RecordLine(r) << "\n";
    }
  }
  return 0;
}

void PrintStatus(const fedlora::v1::StatusResponse& s, std::ostream& out) {
  size_t online = 0;
  for (const auto& a : s.agents()) online += a.online();
  out << "coordinator:      " << s.coordinator_id() << "\n"
      << "round:            " << s.current_round() << " (" << s.current_phase() << ")\n"
      << "current version:  " << (s.current_version().empty() ? "(none)" : s.current_version())
      << "\n";
  if (const auto& v = s.current_version_info(); !v.version_id().empty()) {
    out << absl::StrFormat("version quant:    %s (rel_l2_error %.3g, max_abs_error %.3g)\n",
                           v.quant(), v.quant_rel_l2_error(), v.quant_max_abs_error());
  }
  out << "updates rejected: " << s.updates_rejected() << "\n"
      << "agents:           " << online << " online / " << s.agents_size() << " known\n";
  for (const auto& a : s.agents()) {
    out << absl::StrFormat("  %-24s %-8s version=%-10s last_seen=%s\n", a.agent_id(),
                           a.online() ? "online" : "offline",
                           a.current_version().empty() ? "-" : a.current_version(),
                           FormatTime(a.last_seen_unix_ms()));
  }
  if (s.rounds_size() > 0) {
    out << absl::StrFormat("%-6s %-10s %6s %7s %-8s %10s %11s %10s %12s %12s %-12s %6s %8s\n",
                           "round", "phase", "agents", "updates", "version", "train_loss",
                           "eval_before", "eval_after", "bytes_up", "bytes_down", "strategy",
                           "secagg", "epsilon");
    for (const auto& r : s.rounds()) {
      out << absl::StrFormat("%-6d %-10s %6d %7d %-8s %10s %11s %10s %12d %12d %-12s %6s %8s\n",
                             r.round_id(), r.phase(), r.participants(), r.updates_received(),
                             r.version_id().empty() ? "-" : r.version_id(),
                             Num(r.mean_train_loss()), Num(r.eval_loss_before()),
                             Num(r.eval_loss_after()), r.bytes_up(), r.bytes_down(),
                             r.aggregation().empty() ? "-" : r.aggregation(),
                             r.secure_aggregation() ? "on" : "off",
                             r.dp_epsilon() < 0 ? "-" : absl::StrFormat("%.4g", r.dp_epsilon()));
    }
  }
}

}  // namespace

int RunAdminCli(int argc, const char* const* argv, std::ostream& out, std::ostream& err) {
  CLI::App app{"fedlora-admin: fleet PKI, coordinator status and model export", "fedlora-admin"};
  app.require_subcommand(1);
  app.fallthrough();
  std::string coordinator, ca, cert, key;
  double timeout_s = 10;
  app.add_option("--coordinator", coordinator, "Coordinator address HOST:PORT (status)");
  app.add_option("--ca", ca, "Fleet CA certificate (PEM) to verify the coordinator");
  app.add_option("--cert", cert, "Admin or viewer client certificate (PEM)");
  app.add_option("--key", key, "Private key of --cert (PEM)");
  app.add_option("--timeout-s", timeout_s, "Deadline of each RPC in seconds")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);

  CLI::App* pki = app.add_subcommand("pki", "Create the fleet CA and issue certificates");
  pki->require_subcommand(1);
  CLI::App* init = pki->add_subcommand(
      "init",
      "Create a CA, the coordinator's server certificate, an admin certificate and the "
      "coordinator's adapter signing key in DIR (ca.pem ca.key coordinator.pem coordinator.key "
      "admin.pem admin.key coordinator-signing.key coordinator-signing.pub)");
  std::string init_dir;
  std::vector<std::string> sans;
  int init_days = 365;
  init->add_option("DIR", init_dir, "Directory to create the PKI in")->required();
  init->add_option("--san", sans,
                   "Subject alternative name of the coordinator certificate (DNS name or IP); "
                   "repeatable; default: localhost and 127.0.0.1");
  init->add_option("--validity-days", init_days, "Certificate validity")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);

  CLI::App* issue = pki->add_subcommand("issue", "Issue a client certificate signed by the CA");
  std::string ca_dir, name, role, out_dir;
  int issue_days = 365;
  issue->add_option("--ca-dir", ca_dir, "Directory holding ca.pem and ca.key")->required();
  issue->add_option("--name", name, "Certificate CN (the agent id or admin name)")->required();
  issue->add_option("--role", role, "agent | admin | viewer")
      ->required()
      ->check(CLI::IsMember({"agent", "admin", "viewer"}));
  issue->add_option("--out", out_dir, "Directory for <name>.pem and <name>.key")->required();
  issue->add_option("--validity-days", issue_days, "Certificate validity")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);

  CLI::App* keys = app.add_subcommand("keys", "Create the at-rest and signing keys");
  keys->require_subcommand(1);
  CLI::App* create_at_rest = keys->add_subcommand(
      "create-at-rest",
      "Write a new at-rest encryption key (32 random bytes as hex, mode 0600) for the "
      "coordinator's --at-rest-key; refuses to overwrite");
  std::string at_rest_file;
  create_at_rest->add_option("FILE", at_rest_file, "Key file to create")->required();
  CLI::App* create_signing = keys->add_subcommand(
      "create-signing",
      "Write a new Ed25519 adapter signing key pair DIR/coordinator-signing.key (0600) and "
      "DIR/coordinator-signing.pub; refuses to overwrite");
  std::string signing_dir;
  create_signing->add_option("DIR", signing_dir, "Directory (e.g. the PKI directory)")
      ->required();

  CLI::App* audit = app.add_subcommand(
      "audit", "The coordinator's hash-chained audit log (coordinator host, read-only)");
  audit->require_subcommand(1);
  CLI::App* audit_verify = audit->add_subcommand(
      "verify", "Check the hash chain; exit 1 and name the first bad seq when it is broken");
  std::string audit_dir;
  bool audit_json = false;
  audit_verify->add_option("--data-dir", audit_dir, "The coordinator's data directory")
      ->required();
  audit_verify->add_flag("--json", audit_json, "Print the report as JSON");
  CLI::App* audit_list = audit->add_subcommand("list", "Print audit records in seq order");
  uint64_t audit_from = 1;
  size_t audit_limit = 0;
  audit_list->add_option("--data-dir", audit_dir, "The coordinator's data directory")
      ->required();
  audit_list->add_option("--from", audit_from, "First seq to print")->capture_default_str();
  audit_list->add_option("--limit", audit_limit, "Most records to print (0 = all)")
      ->capture_default_str();
  audit_list->add_flag("--json", audit_json, "One JSON object per line");

  CLI::App* status =
      app.add_subcommand("status",
                         "Show round, phase, version, agents and per-round figures (Admin.Status); "
                         "needs --coordinator --ca --cert --key");
  bool json = false;
  status->add_flag("--json", json, "Print the StatusResponse as JSON");

  SecurityCommands security(app);  // enroll create/pending/approve/deny, agents revoke

  CLI::App* models = app.add_subcommand("models", "Published adapter versions (coordinator host)");
  models->require_subcommand(1);
  CLI::App* exp = models->add_subcommand(
      "export",
      "Export a published version as a PEFT adapter directory, a llama.cpp LoRA GGUF, or a "
      "llama.cpp GGUF of the base model with the adapter merged in. Opens --data-dir read-only, "
      "so it works while the coordinator runs");
  std::string exp_version, exp_data_dir, exp_base, exp_format, exp_quant, exp_out;
  exp->add_option("VERSION", exp_version, "Version id (e.g. v000003), or latest / current")
      ->required();
  exp->add_option("--data-dir", exp_data_dir, "The coordinator's data directory")->required();
  exp->add_option("--base-model", exp_base,
                  "HF base model directory (config.json, model.safetensors, tokenizer.json); "
                  "required for gguf-lora and gguf-merged, checked against the adapter for peft");
  exp->add_option("--format", exp_format, "peft | gguf-lora | gguf-merged")
      ->required()
      ->check(CLI::IsMember({"peft", "gguf-lora", "gguf-merged"}));
  exp->add_option("--quant", exp_quant,
                  "Tensor type: gguf-merged f32|f16|q8_0|q4_0 (default f16); gguf-lora f32|f16 "
                  "(default f32); peft is always f32")
      ->check(CLI::IsMember({"f32", "f16", "q8_0", "q4_0"}));
  exp->add_option("--out", exp_out, "Output: a directory (peft) or a .gguf file")->required();
  std::string exp_at_rest;
  exp->add_option("--at-rest-key", exp_at_rest,
                  "The data dir's at-rest key file, when it is encrypted");

  OpsCommands ops(&app);  // versions list|rollback|promote, backup create

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help (also on a subcommand) prints that command's help and exits 0.
    const int code = app.exit(e, out, err);
    return code == 0 ? 0 : 2;
  }

  if (init->parsed()) {
    common::PkiOptions options;
    if (!sans.empty()) options.server_sans = sans;
    options.validity_days = init_days;
    absl::Status s = common::InitPki(init_dir, options);
    if (!s.ok()) {
      err << "fedlora-admin pki init: " << s.ToString() << "\n";
      return 1;
    }
    s = common::WriteNewSigningKeyPair(init_dir + "/coordinator-signing.key",
                                       init_dir + "/coordinator-signing.pub");
    if (!s.ok()) {
      err << "fedlora-admin pki init: signing key: " << s.ToString() << "\n";
      return 1;
    }
    out << "created PKI in " << init_dir
        << " (ca.pem ca.key coordinator.pem coordinator.key admin.pem admin.key "
           "coordinator-signing.key coordinator-signing.pub)\n";
    return 0;
  }
  if (create_at_rest->parsed()) {
    absl::Status s = common::WriteNewAtRestKeyFile(at_rest_file);
    if (!s.ok()) {
      err << "fedlora-admin keys create-at-rest: " << s.ToString() << "\n";
      return 1;
    }
    auto cipher = common::AtRestCipher::LoadFile(at_rest_file);
    out << "wrote at-rest key " << at_rest_file << " (key id "
        << (cipher.ok() ? cipher->key_id() : "?") << "); keep a copy off this host\n";
    return 0;
  }
  if (create_signing->parsed()) {
    const std::string priv = signing_dir + "/coordinator-signing.key";
    const std::string pub = signing_dir + "/coordinator-signing.pub";
    absl::Status s = common::WriteNewSigningKeyPair(priv, pub);
    if (!s.ok()) {
      err << "fedlora-admin keys create-signing: " << s.ToString() << "\n";
      return 1;
    }
    auto key = common::VerifyKey::LoadFile(pub);
    out << "wrote " << priv << " and " << pub << " (key id " << (key.ok() ? key->key_id() : "?")
        << ")\n";
    return 0;
  }
  if (auto rc = ops.Run({coordinator, ca, cert, key, timeout_s}, out, err)) return *rc;
  if (audit_verify->parsed()) return AuditVerify(audit_dir, audit_json, out, err);
  if (audit_list->parsed()) {
    return AuditList(audit_dir, audit_from, audit_limit, audit_json, out, err);
  }
  if (issue->parsed()) {
    common::CertRole cert_role = role == "agent"   ? common::CertRole::kAgent
                                 : role == "admin" ? common::CertRole::kAdmin
                                                   : common::CertRole::kViewer;
    absl::Status s = common::IssueCertificate(ca_dir, name, cert_role, out_dir, issue_days);
    if (!s.ok()) {
      err << "fedlora-admin pki issue: " << s.ToString() << "\n";
      return 1;
    }
    out << "issued " << out_dir << "/" << name << ".pem and " << out_dir << "/" << name
        << ".key (role " << role << ")\n";
    return 0;
  }
  if (auto code = security.Run({coordinator, ca, cert, key, timeout_s}, out, err)) return *code;
  if (status->parsed()) {
    if (coordinator.empty() || ca.empty() || cert.empty() || key.empty()) {
      err << "fedlora-admin status: needs --coordinator, --ca, --cert and --key\n";
      return 2;
    }
    auto creds = common::MakeChannelCredentials({ca, cert, key});
    if (!creds.ok()) {
      err << "fedlora-admin status: " << creds.status().ToString() << "\n";
      return 1;
    }
    auto channel = grpc::CreateChannel(coordinator, *creds);
    auto stub = fedlora::v1::Admin::NewStub(channel);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
    fedlora::v1::StatusResponse response;
    grpc::Status rpc = stub->Status(&context, fedlora::v1::StatusRequest(), &response);
    if (!rpc.ok()) {
      err << "fedlora-admin status: Admin.Status on " << coordinator << " failed: code "
          << static_cast<int>(rpc.error_code()) << ": " << rpc.error_message() << "\n";
      return 1;
    }
    if (json) {
      std::string text;
      google::protobuf::util::JsonPrintOptions options;
      options.always_print_primitive_fields = true;
      options.preserve_proto_field_names = true;
      auto s = google::protobuf::util::MessageToJsonString(response, &text, options);
      if (!s.ok()) {
        err << "fedlora-admin status: cannot print JSON: " << s.ToString() << "\n";
        return 1;
      }
      out << text << "\n";
    } else {
      PrintStatus(response, out);
    }
    return 0;
  }
  if (exp->parsed()) {
    ExportOptions options;
    options.version = exp_version;
    options.base_model_dir = exp_base;
    options.quant = exp_quant;
    options.out = exp_out;
    auto format = ParseExportFormat(exp_format);
    if (!format.ok()) {
      err << "fedlora-admin models export: " << format.status().ToString() << "\n";
      return 2;
    }
    options.format = *format;
    if (options.format != ExportFormat::kPeft && exp_base.empty()) {
      err << "fedlora-admin models export: --format " << exp_format
          << " needs --base-model DIR (the HF base model directory)\n";
      return 2;
    }
    StateStoreOptions store_options;
    store_options.actor = LocalActor();
    store_options.encrypt_existing = false;  // an export never changes how data is stored
    if (!exp_at_rest.empty()) {
      auto cipher = common::AtRestCipher::LoadFile(exp_at_rest);
      if (!cipher.ok()) {
        err << "fedlora-admin models export: " << cipher.status().ToString() << "\n";
        return 1;
      }
      store_options.at_rest = std::move(*cipher);
    }
    // Read-only first: it refuses a missing or foreign directory (a writable open
    // would create one) and a wrong key. Then writable when the coordinator is not
    // running, so that the export is audited.
    auto store = StateStore::OpenReadOnly(exp_data_dir, store_options);
    bool audited = false;
    if (store.ok()) {
      store->reset();
      store = StateStore::Open(exp_data_dir, store_options);
      audited = store.ok();
      if (absl::IsUnavailable(store.status())) {
        store = StateStore::OpenReadOnly(exp_data_dir, store_options);
      }
    }
    if (!store.ok()) {
      err << "fedlora-admin models export: " << store.status().ToString() << "\n";
      return 1;
    }
    auto result = ExportVersion(**store, options);
    if (!result.ok()) {
      err << "fedlora-admin models export: " << result.status().ToString() << "\n";
      return 1;
    }
    if (audited) {
      nlohmann::json details{{"version", result->version_id},
                             {"format", exp_format},
                             {"quant", exp_quant},
                             {"out", result->out}};
      absl::Status s = (*store)->AppendAudit(store_options.actor, "model.exported",
                                             details.dump());
      if (!s.ok()) {
        err << "fedlora-admin models export: exported, but the audit record failed: "
            << s.ToString() << "\n";
        return 1;
      }
    } else {
      err << "fedlora-admin models export: note: the coordinator holds " << exp_data_dir
          << "; the export was not recorded in the audit log\n";
    }
    out << "exported " << result->version_id << " as " << exp_format << " ("
        << result->tensor_count << " tensors, r=" << result->config.r
        << " alpha=" << result->config.lora_alpha << ") to " << result->out << "\n";
    return 0;
  }
  err << "fedlora-admin: no command; run 'fedlora-admin --help'\n";
  return 2;
}

}  // namespace fedlora::coordinator
