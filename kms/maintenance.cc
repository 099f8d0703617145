// KeyService: background work (scheduled rotation, the deletion executor)
// and the reconciliation of the HSM with the database after start-up.
#include <algorithm>
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

// The CKA_IDs of the versions in a registry snapshot: those whose material
// must exist, and those whose material must be gone.
struct VersionIds {
  std::set<std::string> live;
  std::set<std::string> dead;
};

VersionIds LiveAndDeadIds(const std::vector<std::shared_ptr<const Key>>& keys) {
  VersionIds ids;
  for (const std::shared_ptr<const Key>& key : keys) {
    for (const KeyVersion& v : key->versions) {
      bool destroyed = v.state == VersionState::kDestroyed ||
                       key->state == KeyState::kDestroyed;
      (destroyed ? ids.dead : ids.live).insert(v.hsm_id);
    }
  }
  return ids;
}

// Whether a pending key's window has ended: on the wall clock and on the
// monotonic count both, so that neither clock stepped alone ends it early.
bool WindowEnded(const Key& key, absl::Time now) {
  return key.state == KeyState::kPendingDeletion && key.deletion_time <= now &&
         key.deletion_elapsed >= key.deletion_window;
}

// Whether the executor must destroy the key now: its window ended, or its
// destruction began (and is finished whatever the clocks say).
bool DueForDestruction(const Key& key, absl::Time now) {
  return WindowEnded(key, now) ||
         (key.state == KeyState::kPendingDeletion && key.destruction_started);
}

}  // namespace

void KeyService::ForgetDeletionProgress() {
  absl::MutexLock lock(&window_mu_);
  window_marks_.clear();
}

void KeyService::CountDeletionWindows(MaintenanceReport& report) {
  absl::MutexLock lock(&window_mu_);
  const absl::Duration mono = options_.monotonic_now();
  absl::flat_hash_map<std::string, WindowMark> marks;
  for (const std::shared_ptr<const Key>& key : registry_->All()) {
    if (key->state != KeyState::kPendingDeletion) continue;
    WindowMark& mark = marks[key->id];
    mark = {key->deletion_time, mono};
    auto last = window_marks_.find(key->id);
    if (last == window_marks_.end() ||
        last->second.deletion_time != key->deletion_time) {
      continue;  // first seen pending here: count from now
    }
    const absl::Duration ran = mono - last->second.counted_at;
    if (key->deletion_elapsed >= key->deletion_window ||
        ran <= absl::ZeroDuration()) {
      continue;
    }
    absl::Status s =
        registry_
            ->Update(key->id,
                     [&](Key& k) -> absl::Status {
                       if (k.state != KeyState::kPendingDeletion ||
                           k.deletion_time != key->deletion_time) {
                         return absl::AbortedError("deletion was cancelled");
                       }
                       k.deletion_elapsed = std::min(k.deletion_elapsed + ran,
                                                     k.deletion_window);
                       return absl::OkStatus();
                     })
            .status();
    if (absl::IsAborted(s)) {
      marks.erase(key->id);
    } else if (!s.ok()) {
      // Not counted: keep the old mark, so the next pass counts this time.
      mark = last->second;
      ++report.failures;
      spdlog::error("counting the deletion window of {} failed: {}", key->id,
                    s.message());
    }
  }
  window_marks_ = std::move(marks);
}

absl::Status KeyService::DestroyKeyMaterial(const std::string& key_id,
                                            MaintenanceReport& report,
                                            Audit& audit) {
  absl::MutexLock lifecycle(&lifecycle_mu_);
  // First commit that destruction begins, in the key's row: from then on
  // no cancel (from this process or another replica, which lifecycle_mu_
  // does not reach) can bring back a key whose material is half gone. The
  // store re-reads the row, so a cancel committed anywhere is seen here.
  const absl::Time start = options_.now();
  CUSTOS_ASSIGN_OR_RETURN(
      std::shared_ptr<const Key> key,
      registry_->Update(key_id, [&](Key& k) -> absl::Status {
        if (!DueForDestruction(k, start)) {
          return absl::AbortedError("deletion was cancelled or rescheduled");
        }
        k.destruction_started = true;
        return absl::OkStatus();
      }));
  // Destroy the HSM objects, then record it: after a crash in between, the
  // key is still PENDING_DELETION with its destruction begun, and the next
  // pass (on whichever replica leads) destroys what is left and records.
  // The row never claims DESTROYED while material remains.
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
                     !k.destruction_started) {
                   return absl::InternalError(
                       "a key whose destruction began changed state");
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
  CountDeletionWindows(report);
  const absl::Time now = options_.now();
  for (const std::shared_ptr<const Key>& key : registry_->All()) {
    if (DueForDestruction(*key, now)) {
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
  // The versions committed before the listing. Each one's object was made
  // before its row committed, so the listing holds it unless it was
  // destroyed since.
  const VersionIds before = LiveAndDeadIds(registry_->All());
  // The slow part (it reads every object on the token) runs unlocked,
  // while calls are served and keys are created.
  CUSTOS_ASSIGN_OR_RETURN(std::vector<hsm::HsmObject> objects,
                          hsm_->ListKeyObjects());
  std::set<std::string> present;
  std::vector<const hsm::HsmObject*> candidates;
  for (const hsm::HsmObject& o : objects) {
    if (o.object_class != CKO_SECRET_KEY) continue;
    present.insert(o.id);
    const bool ours = o.label.rfind(kHsmLabelPrefix, 0) == 0;
    if (!ours) continue;  // not a Custos object: leave it alone
    if (before.live.count(o.id) == 0) candidates.push_back(&o);
  }

  // A candidate may belong to a CreateKey or rotation that generated it
  // before the listing and has not committed yet. Those hold material_mu_
  // shared until they commit or destroy the object: once this lock is ours,
  // every listed object is either owned by a committed row, seen in the
  // registry now, or already gone. Objects made after the listing were
  // never candidates. lifecycle_mu_ keeps the deletion executor from being
  // half way (objects destroyed, row not yet) while missing objects are
  // counted.
  absl::MutexLock orphans(&orphans_mu_);
  absl::WriterMutexLock material(&material_mu_);
  absl::MutexLock lifecycle(&lifecycle_mu_);
  const VersionIds now = LiveAndDeadIds(registry_->All());
  const absl::Duration mono = options_.monotonic_now();
  absl::flat_hash_map<std::string, absl::Duration> seen;
  for (const hsm::HsmObject* o : candidates) {
    if (now.live.count(o->id) != 0) continue;  // committed meanwhile
    if (options_.orphan_grace > absl::ZeroDuration() &&
        now.dead.count(o->id) == 0) {
      auto first = orphans_seen_.find(o->id);
      const absl::Duration first_seen =
          first == orphans_seen_.end() ? mono : first->second;
      seen[o->id] = first_seen;
      if (mono - first_seen < options_.orphan_grace) {
        ++report.orphans_waiting;
        spdlog::warn(
            "reconcile: HSM object {} ({}) has no key version; it is "
            "destroyed if still unclaimed after {}",
            hsm::ObjectIdHex(o->id), o->label,
            absl::FormatDuration(options_.orphan_grace));
        continue;
      }
    }
    // Either a version that was destroyed in the database but not yet in
    // the HSM, or an object generated just before a crash whose row was
    // never committed (so no blob was ever issued under it).
    absl::StatusOr<int> n = hsm_->DestroyObjects(o->id);
    if (!n.ok()) {
      ++report.failures;
      spdlog::error("reconcile: could not destroy HSM object {} ({}): {}",
                    hsm::ObjectIdHex(o->id), o->label, n.status().message());
      continue;
    }
    if (*n == 0) continue;  // its creator destroyed it after a failed commit
    report.destroyed_objects += *n;
    const bool dead = now.dead.count(o->id) != 0;
    if (!dead) ++report.orphans_destroyed;
    spdlog::warn("reconcile: destroyed HSM object {} ({}): {}",
                 hsm::ObjectIdHex(o->id), o->label,
                 dead ? "its version is destroyed in the database"
                      : "no key version owns it (left by an interrupted "
                        "create or rotate)");
  }
  orphans_seen_ = std::move(seen);
  // Missing: live before the listing and still live now. A version
  // committed after the listing may be absent from it without being lost.
  for (const std::string& id : before.live) {
    if (present.count(id) == 0 && now.live.count(id) != 0) {
      ++report.missing_objects;
      spdlog::error(
          "reconcile: HSM object {} of an enabled key version is missing: "
          "data wrapped under it cannot be decrypted",
          hsm::ObjectIdHex(id));
    }
  }
  spdlog::info(
      "reconcile: {} HSM objects, {} live versions; destroyed {} orphans and "
      "{} objects in all; {} orphans waiting; {} missing",
      objects.size(), now.live.size(), report.orphans_destroyed,
      report.destroyed_objects, report.orphans_waiting, report.missing_objects);
  return report;
}

}  // namespace custos::kms
