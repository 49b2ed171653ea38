#include "coordinator/versions.h"

#include <set>

#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"
#include "common/status/status.h"

namespace fedlora::coordinator {

const char* VersionMoveAction(VersionMove move) {
  return move == VersionMove::kRollback ? "version.rollback" : "version.promoted";
}

fedlora::v1::VersionInfo ToVersionInfo(const VersionRecord& v, const std::string& current) {
  fedlora::v1::VersionInfo info;
  info.set_version_id(v.version_id);
  info.set_round_id(v.round_id);
  info.set_parent_version(v.parent_version);
  info.set_strategy(v.strategy);
  for (const std::string& c : v.contributors) info.add_contributors(c);
  info.set_sha256(v.sha256);
  info.set_size_bytes(v.size_bytes);
  info.set_quant(v.quant);
  info.set_quant_rel_l2_error(v.quant_rel_l2_error.value_or(-1.0));
  info.set_quant_max_abs_error(v.quant_max_abs_error.value_or(-1.0));
  info.set_is_signed(!v.signature.empty());
  info.set_current(!current.empty() && v.version_id == current);
  info.set_created_unix_ms(v.created_unix_ms);
  info.set_num_examples(v.num_examples);
  return info;
}

namespace {

absl::StatusOr<VersionRecord> LoadVersion(const StateStore& store, const std::string& id,
                                          const std::string& what) {
  ASSIGN_OR_RETURN(auto version, store.GetVersion(id));
  if (!version.has_value()) {
    return absl::NotFoundError(absl::StrCat(what, ": version '", id, "' does not exist"));
  }
  return *version;
}

}  // namespace

absl::StatusOr<VersionRecord> ResolveVersionMove(const StateStore& store,
                                                 const std::string& current, VersionMove move,
                                                 const std::string& target) {
  const char* what = move == VersionMove::kRollback ? "rollback" : "promote";
  VersionRecord to;
  if (move == VersionMove::kPromote) {
    if (target.empty()) return absl::InvalidArgumentError("promote: expected a version id, found \"\"");
    ASSIGN_OR_RETURN(to, LoadVersion(store, target, what));
    if (target == current) {
      return absl::FailedPreconditionError(
          absl::StrCat("promote: '", target, "' is already the current version"));
    }
  } else {
    if (current.empty()) {
      return absl::FailedPreconditionError("rollback: there is no current version to roll back");
    }
    ASSIGN_OR_RETURN(VersionRecord cur, LoadVersion(store, current, what));
    if (cur.parent_version.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "rollback: the current version '", current,
          "' has no parent (it was trained from a fresh LoRA); use promote to pick a version"));
    }
    if (target.empty() || target == cur.parent_version) {
      ASSIGN_OR_RETURN(to, LoadVersion(store, cur.parent_version, what));
    } else {
      // Walk the parent chain of the current version looking for `target`.
      std::set<std::string> seen{current};
      std::string id = cur.parent_version;
      bool found = false;
      while (!id.empty() && seen.insert(id).second) {
        ASSIGN_OR_RETURN(VersionRecord v, LoadVersion(store, id, what));
        if (id == target) {
          to = std::move(v);
          found = true;
          break;
        }
        id = v.parent_version;
      }
      if (!found) {
        ASSIGN_OR_RETURN(to, LoadVersion(store, target, what));  // NotFound first
        return absl::InvalidArgumentError(
            absl::StrCat("rollback: expected --to to name an ancestor of the current version '",
                         current, "', found '", target, "'; use promote to move to it"));
      }
    }
  }
  auto blob = store.GetBlob(to.sha256);
  if (absl::IsNotFound(blob.status())) {
    return absl::FailedPreconditionError(absl::StrCat(what, ": the blob of version '",
                                                      to.version_id, "' (sha256 ", to.sha256,
                                                      ") is missing from the store"));
  }
  if (!blob.ok()) return blob.status();
  if (common::Sha256Hex(*blob) != to.sha256) {
    return absl::DataLossError(absl::StrCat(what, ": the stored blob of version '", to.version_id,
                                            "' does not match its SHA-256 ", to.sha256));
  }
  return to;
}

}  // namespace fedlora::coordinator
