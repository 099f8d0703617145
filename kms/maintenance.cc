// KeyService: background work (scheduled rotation, the deletion executor)
// and start-up reconciliation of the HSM with the database.
#include <set>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "hsm/key_templates.h"
#include "kms/audit_scope.h"
#include "kms/key_service.h"

namespace custos::kms {
namespace {

Caller SystemCaller() { return Caller{kSystemPrincipal, "", ""}; }

}  // namespace

absl::Status KeyService::DestroyKeyMaterial(const std::string& key_id,
                                            MaintenanceReport& report,
                                            Audit& audit) {
  absl::MutexLock lifecycle(&lifecycle_mu_);
  CUSTOS_ASSIGN_OR_RETURN(std::shared_ptr<const Key> key,
                          registry_->Find(key_id));
  // Check again under the lock: the deletion may have been cancelled (or
  // cancelled and scheduled anew) since the pass read the key.
  if (key->state != KeyState::kPendingDeletion ||
      key->deletion_time > options_.now()) {
    return absl::AbortedError("deletion was cancelled or rescheduled");
  }
  // Destroy the HSM objects first, then record it: after a crash in
  // between, the key is still PENDING_DELETION and the next pass destroys
  // (finds nothing) and records. The row never claims DESTROYED while
  // material remains.
  for (const KeyVersion& v : key->versions) {
    if (v.state == VersionState::kDestroyed) continue;
    CUSTOS_ASSIGN_OR_RETURN(int n, hsm_->DestroyObjects(v.hsm_id));
    report.destroyed_objects += n;
  }
  const absl::Time now = options_.now();
  return registry_
      ->Update(key_id,
               [&](Key& k) -> absl::Status {
                 if (k.state != KeyState::kPendingDeletion ||
                     k.deletion_time > now) {
                   return absl::AbortedError(
                       "deletion was cancelled or rescheduled");
                 }
                 for (KeyVersion& v : k.versions) {
                   v.state = VersionState::kDestroyed;
                 }
                 k.state = KeyState::kDestroyed;
                 k.update_time = now;
                 return audit.RecordBeforeCommit();
               })
      .status();
}

MaintenanceReport KeyService::RunScheduledWork() {
  MaintenanceReport report;
  const absl::Time now = options_.now();
  for (const std::shared_ptr<const Key>& key : registry_->All()) {
    if (key->state == KeyState::kPendingDeletion && key->deletion_time <= now) {
      Audit audit(this, SystemCaller(), Rpc::kScheduleKeyDeletion);
      audit.SetKey(key->id, 0);
      audit.AddDetail("deletion window ended: key material destroyed");
      absl::Status s = audit
                           .Run<bool>([&]() -> absl::StatusOr<bool> {
                             CUSTOS_RETURN_IF_ERROR(
                                 DestroyKeyMaterial(key->id, report, audit));
                             return true;
                           })
                           .status();
      if (absl::IsAborted(s)) continue;  // cancelled meanwhile
      if (s.ok()) ++report.destroyed_keys;
      if (!s.ok()) ++report.failures;
      if (s.ok()) {
        spdlog::info("key {} destroyed: its deletion window ended", key->id);
      } else {
        spdlog::error("destroying key {} failed: {}", key->id, s.message());
      }
      continue;
    }
    if (key->state == KeyState::kEnabled &&
        key->rotation_period > absl::ZeroDuration() &&
        key->next_rotation_time != absl::InfinitePast() &&
        key->next_rotation_time <= now) {
      Audit audit(this, SystemCaller(), Rpc::kRotateKey);
      audit.SetKey(key->id, 0);
      audit.AddDetail("scheduled rotation");
      absl::StatusOr<std::shared_ptr<const Key>> rotated =
          audit.Run<std::shared_ptr<const Key>>([&] {
            return RotateFrom(key->id, key->primary_version, &audit);
          });
      if (rotated.ok()) {
        ++report.rotated;
        audit.SetKey(key->id, (*rotated)->primary_version);
        spdlog::info("key {} rotated on schedule to version {}", key->id,
                     (*rotated)->primary_version);
      } else {
        ++report.failures;
        spdlog::error("scheduled rotation of {} failed: {}", key->id,
                      rotated.status().message());
      }
    }
  }
  return report;
}

absl::StatusOr<MaintenanceReport> KeyService::Reconcile() {
  MaintenanceReport report;
  CUSTOS_ASSIGN_OR_RETURN(std::vector<hsm::HsmObject> objects,
                          hsm_->ListKeyObjects());
  // Which CKA_IDs the database knows, and which must be gone.
  std::set<std::string> live, dead;
  for (const std::shared_ptr<const Key>& key : registry_->All()) {
    for (const KeyVersion& v : key->versions) {
      bool destroyed = v.state == VersionState::kDestroyed ||
                       key->state == KeyState::kDestroyed;
      (destroyed ? dead : live).insert(v.hsm_id);
    }
  }
  std::set<std::string> present;
  for (const hsm::HsmObject& o : objects) {
    if (o.object_class != CKO_SECRET_KEY) continue;
    present.insert(o.id);
    const bool ours = o.label.rfind(kHsmLabelPrefix, 0) == 0;
    if (!ours) continue;  // not a Custos object: leave it alone
    if (live.count(o.id) != 0) continue;
    // Either a version that was destroyed in the database but not yet in
    // the HSM, or an object generated just before a crash whose row was
    // never committed (so no blob was ever issued under it).
    absl::StatusOr<int> n = hsm_->DestroyObjects(o.id);
    if (!n.ok()) {
      ++report.failures;
      spdlog::error("reconcile: could not destroy HSM object {} ({}): {}",
                    hsm::ObjectIdHex(o.id), o.label, n.status().message());
      continue;
    }
    report.destroyed_objects += *n;
    if (dead.count(o.id) == 0) ++report.orphans_destroyed;
    spdlog::warn("reconcile: destroyed HSM object {} ({}): {}",
                 hsm::ObjectIdHex(o.id), o.label,
                 dead.count(o.id)
                     ? "its version is destroyed in the database"
                     : "no key version owns it (left by an interrupted "
                       "create or rotate)");
  }
  for (const std::string& id : live) {
    if (present.count(id) == 0) {
      ++report.missing_objects;
      spdlog::error(
          "reconcile: HSM object {} of an enabled key version is missing: "
          "data wrapped under it cannot be decrypted",
          hsm::ObjectIdHex(id));
    }
  }
  spdlog::info(
      "reconcile: {} HSM objects, {} live versions; destroyed {} orphans and "
      "{} objects in all; {} missing",
      objects.size(), live.size(), report.orphans_destroyed,
      report.destroyed_objects, report.missing_objects);
  return report;
}

}  // namespace custos::kms
