// KeyService: background work (scheduled rotation, the deletion executor)
// and the reconciliation of the HSM with the database after start-up.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "hsm/key_templates.h"
#include "kms/audit_scope.h"
#include "kms/key_service.h"

namespace custos::kms {
namespace {

Caller SystemCaller() { return Caller{kSystemPrincipal, "", ""}; }

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
  // Record what is about to be destroyed, durably, then destroy the HSM
  // objects, then commit DESTROYED: after a crash in between, the key is
  // still PENDING_DELETION with its destruction begun, and the next pass
  // (on whichever replica leads) records again, destroys what is left and
  // commits. The row never claims DESTROYED while material remains, and no
  // material goes without a record.
  for (const KeyVersion& v : key->versions) {
    if (v.state == VersionState::kDestroyed) continue;
    CUSTOS_RETURN_IF_ERROR(
        RecordMaterialEvent(key_id, v.number, "DestroyHsmObject",
                            absl::StrCat("object ", hsm::ObjectIdHex(v.hsm_id),
                                         ": the key's deletion window ended")));
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
  const bool may_destroy = destruction_allowed_.load();
  for (const std::shared_ptr<const Key>& key : registry_->All()) {
    if (DueForDestruction(*key, now) && !may_destroy) {
      spdlog::warn(
          "key {} is due for destruction, but the last reconciliation "
          "quarantined HSM objects: nothing is destroyed until that is "
          "settled (custos-hsmtool quarantine list)",
          key->id);
      continue;
    }
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

KeyService::VersionIds KeyService::LiveAndDeadIds(
    const std::vector<std::shared_ptr<const Key>>& keys) {
  VersionIds ids;
  for (const std::shared_ptr<const Key>& key : keys) {
    for (const KeyVersion& v : key->versions) {
      bool destroyed = v.state == VersionState::kDestroyed ||
                       key->state == KeyState::kDestroyed;
      if (destroyed) {
        ids.dead[v.hsm_id] = {key->id, v.number};
      } else {
        ids.live.insert(v.hsm_id);
      }
    }
  }
  return ids;
}

}  // namespace custos::kms
