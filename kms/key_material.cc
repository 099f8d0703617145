// KeyService: the making and the destruction of key versions' HSM material.
//
// Material is only ever destroyed when the database positively says it is
// garbage, and only after an audit record of the destruction is durable:
//   - a new version's CKA_ID is committed as a generate-intent before the
//     HSM generates it; the version's commit settles (deletes) the intent.
//     An intent left by a crash between generating and committing is
//     claimed as garbage in the database (Store::ClaimIntent) before its
//     object is destroyed, and a claimed intent can never be committed, so
//     no process, cache or clock can destroy material a version names;
//   - a version the database marks DESTROYED is garbage;
//   - an object that no row names (no intent, no version) was not made by
//     this database: it may belong to a newer database (an older backup was
//     restored), to another deployment sharing the token, or to a database
//     that is not the one custosd should have opened. It is quarantined:
//     reported in the log, a metric and the audit log, and destroyed only
//     when an operator names it (custos-hsmtool quarantine destroy).
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "hsm/key_templates.h"
#include "kms/key_service.h"

namespace custos::kms {
namespace {

// How many CKA_IDs the quarantine's audit record names (the log names
// every one).
constexpr size_t kQuarantineIdsRecorded = 8;

}  // namespace

absl::Status KeyService::RecordMaterialEvent(const std::string& key_id,
                                             uint32_t version,
                                             const std::string& operation,
                                             const std::string& detail) {
  AuditRecord record;
  record.time = options_.now();
  record.principal = kSystemPrincipal;
  record.operation = operation;
  record.key_id = key_id;
  record.key_version = version;
  record.outcome = AuditOutcome::kAllowed;
  record.code = absl::StatusCode::kOk;
  record.detail = detail;
  return audit_->Append(std::move(record));
}

absl::StatusOr<std::string> KeyService::GenerateVersionMaterial(
    const std::string& key_id, uint32_t version) {
  CUSTOS_ASSIGN_OR_RETURN(std::string hsm_id, hsm_->NewObjectId());
  CUSTOS_RETURN_IF_ERROR(registry_->store()->InsertIntent(
      MaterialIntent{hsm_id, key_id, version, options_.now()}));
  absl::StatusOr<std::string> generated =
      hsm_->GenerateAesKey(hsm_id, HsmLabel(key_id, version));
  if (!generated.ok()) {
    // Nothing was made under the intent (or, after a timeout, perhaps it
    // was: then the reconciler settles it as garbage).
    spdlog::warn("generating HSM material for {} v{} failed: {}", key_id,
                 version, generated.status().message());
  }
  return generated;
}

void KeyService::DiscardUncommitted(const std::string& key_id, uint32_t version,
                                    const std::string& hsm_id) {
  // A commit that failed may still have been applied (a connection lost
  // after COMMIT): the claim succeeds only if the database shows no version
  // owns the object, and from then on none can.
  absl::StatusOr<bool> claimed = registry_->store()->ClaimIntent(hsm_id);
  if (!claimed.ok()) {
    spdlog::warn(
        "HSM object {} of {} v{} was not committed; the database cannot say "
        "whether it is garbage now ({}): the reconciler settles it",
        hsm::ObjectIdHex(hsm_id), key_id, version, claimed.status().message());
    return;
  }
  if (!*claimed) return;  // committed after all
  absl::Status s =
      DestroyGarbage(key_id, version, hsm_id,
                     "its version was never committed (the change failed)");
  if (!s.ok()) {
    spdlog::warn("HSM object {} of {} v{} is left for the reconciler: {}",
                 hsm::ObjectIdHex(hsm_id), key_id, version, s.message());
  }
}

absl::Status KeyService::DestroyGarbage(const std::string& key_id,
                                        uint32_t version,
                                        const std::string& hsm_id,
                                        absl::string_view why) {
  CUSTOS_RETURN_IF_ERROR(RecordMaterialEvent(
      key_id, version, "DestroyHsmObject",
      absl::StrCat("object ", hsm::ObjectIdHex(hsm_id), ": ", why)));
  // The claimed intent stays as a tombstone: no commit can name the object.
  return hsm_->DestroyObjects(hsm_id).status();
}

bool KeyService::NamedByStoredVersion(const hsm::HsmObject& object) {
  // The label names the key ("custos:<key id>:v<n>"); the database, not
  // the label, says whether one of its versions owns the object.
  absl::string_view label = object.label;
  if (!absl::ConsumePrefix(&label, kHsmLabelPrefix)) return false;
  const std::string key_id(label.substr(0, label.find(':')));
  absl::StatusOr<Key> stored = registry_->store()->LoadKey(key_id);
  if (!stored.ok()) return false;
  for (const KeyVersion& v : stored->versions) {
    if (v.hsm_id == object.id) return true;
  }
  return false;
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
  size_t ours_count = 0;
  for (const hsm::HsmObject& o : objects) {
    if (o.object_class != CKO_SECRET_KEY) continue;
    present.insert(o.id);
    const bool ours = o.label.rfind(kHsmLabelPrefix, 0) == 0;
    if (!ours) continue;  // not a Custos object: leave it alone
    ++ours_count;
    if (before.live.count(o.id) == 0) candidates.push_back(&o);
  }

  // A candidate may belong to a CreateKey or rotation that recorded its
  // intent and generated it before the listing and has not committed yet.
  // In this process those hold material_mu_ shared from the intent until
  // they commit or discard: once this lock is ours, every listed object is
  // either owned by a committed row, seen in the registry now, or already
  // gone. Another replica's are ordered by the database instead: an intent
  // is claimed there before its object is destroyed, and a claimed intent
  // never commits. lifecycle_mu_ keeps the deletion executor from being
  // half way (objects destroyed, row not yet) while missing objects are
  // counted. The locks are released before anything is destroyed.
  struct Garbage {
    std::string id;
    std::string label;
    std::string key_id;
    uint32_t version = 0;
    bool from_intent = false;
  };
  std::vector<Garbage> garbage;
  std::vector<const hsm::HsmObject*> quarantined;
  VersionIds now;
  {
    absl::WriterMutexLock material(&material_mu_);
    absl::MutexLock lifecycle(&lifecycle_mu_);
    now = LiveAndDeadIds(registry_->All());
    CUSTOS_ASSIGN_OR_RETURN(std::vector<MaterialIntent> intent_list,
                            registry_->store()->ListIntents());
    absl::flat_hash_map<std::string, const MaterialIntent*> intents;
    for (const MaterialIntent& i : intent_list) intents[i.hsm_id] = &i;
    const absl::Time wall = options_.now();

    std::vector<std::pair<const hsm::HsmObject*, const MaterialIntent*>>
        uncommitted;
    for (const hsm::HsmObject* o : candidates) {
      if (now.live.count(o->id) != 0) continue;  // committed meanwhile
      if (auto dead = now.dead.find(o->id); dead != now.dead.end()) {
        garbage.push_back(
            {o->id, o->label, dead->second.first, dead->second.second, false});
        continue;
      }
      auto intent = intents.find(o->id);
      if (intent == intents.end()) {
        // Another replica's version this cache has not heard of yet?
        if (NamedByStoredVersion(*o)) continue;
        quarantined.push_back(o);
        continue;
      }
      uncommitted.emplace_back(o, intent->second);
    }

    // Quarantine: report, never destroy.
    report.quarantined = static_cast<int>(quarantined.size());
    // If most of the token's Custos objects are unknown to this database,
    // something is wrong with the pairing (the wrong database, an old
    // backup): then even objects the database calls garbage are left alone
    // until an operator has looked. With any object unknown, intents are
    // not claimed either: a restored backup may hold the intent of a
    // version that a newer database committed.
    report.refused = quarantined.size() * 2 > ours_count;
    if (quarantined.empty()) {
      for (const auto& [o, intent] : uncommitted) {
        // With replicas, another process may hold this intent between its
        // generate and its commit: leave it the grace before claiming (a
        // claim would fail that commit, never lose its material).
        if (!intent->claimed &&
            wall - intent->create_time < options_.orphan_grace) {
          ++report.orphans_waiting;
          continue;
        }
        absl::StatusOr<bool> claimed =
            intent->claimed ? true : registry_->store()->ClaimIntent(o->id);
        if (!claimed.ok()) {
          ++report.failures;
          spdlog::error("reconcile: could not claim the intent of {}: {}",
                        hsm::ObjectIdHex(o->id), claimed.status().message());
          continue;
        }
        if (!*claimed) continue;  // its version committed meanwhile
        garbage.push_back(
            {o->id, o->label, intent->key_id, intent->version, true});
      }
      // Intents with no object: the generate never happened, or has not
      // finished (a timed-out call). Claimed, so that an object that still
      // appears is garbage and can never be committed.
      for (const MaterialIntent& i : intent_list) {
        if (i.claimed || present.count(i.hsm_id) != 0 ||
            now.live.count(i.hsm_id) != 0 ||
            wall - i.create_time < options_.orphan_grace) {
          continue;
        }
        if (absl::Status c = registry_->store()->ClaimIntent(i.hsm_id).status();
            !c.ok()) {
          ++report.failures;
        }
      }
    } else {
      report.orphans_waiting += static_cast<int>(uncommitted.size());
    }
  }
  quarantined_objects_.store(report.quarantined);
  destruction_allowed_.store(!report.refused && report.quarantined == 0);

  if (!quarantined.empty()) {
    std::vector<std::string> ids;
    for (const hsm::HsmObject* o : quarantined) {
      spdlog::warn(
          "reconcile: HSM object {} ({}) is named by no row of this "
          "database: quarantined, NOT destroyed. It may belong to a newer "
          "database (was an older backup restored?) or another deployment. "
          "List: custos-hsmtool quarantine list; destroy one only by name",
          hsm::ObjectIdHex(o->id), o->label);
      if (ids.size() < kQuarantineIdsRecorded) {
        ids.push_back(hsm::ObjectIdHex(o->id));
      }
    }
    absl::Status s = RecordMaterialEvent(
        "", 0, "QuarantineHsmObjects",
        absl::StrCat(quarantined.size(),
                     " HSM objects named by no row quarantined: ",
                     absl::StrJoin(ids, ","),
                     quarantined.size() > ids.size() ? ",..." : ""));
    if (!s.ok()) ++report.failures;
    spdlog::warn(
        "reconcile: with objects quarantined, no uncommitted generate-intent "
        "is taken for garbage and the deletion executor destroys nothing "
        "until the quarantine is settled");
  }
  if (report.refused) {
    spdlog::error(
        "reconcile: {} of the {} Custos objects on the token are named by no "
        "row of this database; destroying nothing (not even the {} it calls "
        "garbage). Check that `storage` names this deployment's newest "
        "database and `hsm.token_label` its token",
        quarantined.size(), ours_count, garbage.size());
  } else {
    for (const Garbage& g : garbage) {
      const std::string why =
          g.from_intent
              ? "its generate-intent was never committed as a version (an "
                "interrupted create or rotate)"
              : "its version is destroyed in the database";
      absl::Status s = DestroyGarbage(g.key_id, g.version, g.id, why);
      if (!s.ok()) {
        ++report.failures;
        spdlog::error("reconcile: could not destroy HSM object {} ({}): {}",
                      hsm::ObjectIdHex(g.id), g.label, s.message());
        continue;
      }
      ++report.destroyed_objects;
      if (g.from_intent) ++report.orphans_destroyed;
      spdlog::warn("reconcile: destroyed HSM object {} ({}): {}",
                   hsm::ObjectIdHex(g.id), g.label, why);
    }
  }

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
      "reconcile: {} HSM objects, {} live versions; destroyed {} objects "
      "({} from interrupted creates); {} quarantined; {} waiting; {} missing",
      objects.size(), now.live.size(), report.destroyed_objects,
      report.orphans_destroyed, report.quarantined, report.orphans_waiting,
      report.missing_objects);
  return report;
}

}  // namespace custos::kms
