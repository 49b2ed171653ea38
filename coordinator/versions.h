#pragma once
// Version management shared by the RoundManager (Admin RPCs) and fedlora-admin
// (a data dir opened read-only): the Admin view of a stored version, and the
// checks of a move of the current pointer (docs/operations.md, "Versions").
//
// Published versions are immutable; rollback and promote only move
// meta/current_version (StateStore::SetCurrentVersion). Functions here only read.

#include <string>

#include "absl/status/statusor.h"
#include "coordinator/state_store.h"
#include "fedlora/v1/fedlora.pb.h"

namespace fedlora::coordinator {

enum class VersionMove { kRollback, kPromote };
// The audit action of a move: "version.rollback" | "version.promoted".
const char* VersionMoveAction(VersionMove move);

// The Admin view of a stored version; `current` is the current version id.
// Errors not recorded (older versions) read as -1.
fedlora::v1::VersionInfo ToVersionInfo(const VersionRecord& version, const std::string& current);

// The version a move of the current pointer (now `current`) goes to, checked:
//   promote:  `target` must be stored (NotFound) and not current (FailedPrecondition);
//   rollback: `target` "" = the current version's parent; FailedPrecondition when
//             there is no current version or it has no parent; a named target must
//             be a strict ancestor of the current version (InvalidArgument otherwise:
//             use promote).
// In both cases the target's blob must be stored (FailedPrecondition) and match the
// version's SHA-256 (DataLoss). Errors name the version.
absl::StatusOr<VersionRecord> ResolveVersionMove(const StateStore& store,
                                                 const std::string& current, VersionMove move,
                                                 const std::string& target);

}  // namespace fedlora::coordinator
