// KeyService: key management operations (admins only).
#include <algorithm>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"
#include "kms/audit_scope.h"
#include "kms/ciphertext_blob.h"
#include "kms/key_service.h"

namespace custos::kms {
namespace {

constexpr uint32_t kDefaultPageSize = 100;
constexpr uint32_t kMaxPageSize = 1000;
constexpr uint32_t kDefaultDeletionDays = 30;
constexpr uint32_t kMinDeletionDays = 7;
constexpr uint32_t kMaxDeletionDays = 30;
constexpr size_t kMaxLabels = 64;

bool IsLabelChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-';
}

}  // namespace

absl::Status KeyService::ValidateLabels(
    const std::map<std::string, std::string>& labels) {
  if (labels.size() > kMaxLabels) {
    return absl::InvalidArgumentError(
        absl::StrCat("labels: ", labels.size(), " labels; at most 64"));
  }
  for (const auto& [name, value] : labels) {
    if (name.empty() || name.size() > 63 ||
        !std::all_of(name.begin(), name.end(), IsLabelChar)) {
      return absl::InvalidArgumentError(
          "labels: names are 1-63 characters of [a-z0-9_-]");
    }
    if (value.size() > 63 ||
        !std::all_of(value.begin(), value.end(), IsLabelChar)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "labels[", name, "]: values are 0-63 characters of [a-z0-9_-]"));
    }
  }
  return absl::OkStatus();
}

absl::Status KeyService::ValidateRotationPeriod(absl::Duration period) {
  if (period == absl::ZeroDuration()) return absl::OkStatus();
  if (period < options_.min_rotation_period) {
    return absl::InvalidArgumentError(
        absl::StrCat("rotation_period: ", absl::FormatDuration(period),
                     " is shorter than the minimum of ",
                     absl::FormatDuration(options_.min_rotation_period),
                     "; leave it unset for no scheduled rotation"));
  }
  if (period > absl::Hours(24 * 365 * 100)) {
    return absl::InvalidArgumentError("rotation_period: longer than 100 years");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const Key>> KeyService::AdminKey(
    const Caller& caller, Rpc rpc, const std::string& name, Audit& audit) {
  if (absl::Status allowed = authorizer_->Check(
          caller, rpc, nullptr, KeyOperation{}, nullptr, nullptr);
      !allowed.ok()) {
    audit.AddDetail(absl::StrCat("requested key=", name.substr(0, 64)));
    return allowed;
  }
  if (name.empty()) {
    return absl::InvalidArgumentError(
        "key: empty; name a key by id (k-...) or alias (alias/NAME)");
  }
  if (name.size() > 256 ||
      (!IsValidKeyId(name) && ValidateAliasName(name).ok() == false)) {
    return absl::InvalidArgumentError(
        "key: not a key id (k- followed by 26 base32 characters) or an "
        "alias (alias/NAME)");
  }
  CUSTOS_ASSIGN_OR_RETURN(std::shared_ptr<const Key> key,
                          registry_->Find(name));
  audit.SetKey(key->id, 0);
  return key;
}

absl::StatusOr<std::shared_ptr<const Key>> KeyService::CreateKey(
    const Caller& caller, const CreateKeyParams& params) {
  Audit audit(this, caller, Rpc::kCreateKey);
  return audit.Run<std::shared_ptr<const Key>>(
      [&]() -> absl::StatusOr<std::shared_ptr<const Key>> {
        CUSTOS_RETURN_IF_ERROR(authorizer_->Check(caller, Rpc::kCreateKey,
                                                  nullptr, KeyOperation{},
                                                  nullptr, nullptr));
        if (params.description.size() > kMaxDescriptionBytes) {
          return absl::InvalidArgumentError(
              "description: longer than 8192 bytes");
        }
        CUSTOS_RETURN_IF_ERROR(ValidateLabels(params.labels));
        CUSTOS_RETURN_IF_ERROR(ValidateRotationPeriod(params.rotation_period));
        CUSTOS_RETURN_IF_ERROR(ValidatePolicy(params.policy));
        if (!params.alias.empty()) {
          CUSTOS_RETURN_IF_ERROR(ValidateAliasName(params.alias));
          if (registry_->Find(params.alias).ok()) {
            return absl::AlreadyExistsError(
                absl::StrCat("alias ", params.alias, " already exists"));
          }
        }
        const absl::Time now = options_.now();
        Key key;
        key.id = NewKeyId();
        audit.SetKey(key.id, 1);
        key.description = params.description;
        key.labels = params.labels;
        key.purpose = KeyPurpose::kEncryptDecrypt;
        key.state = KeyState::kEnabled;
        key.rotation_period = params.rotation_period;
        if (key.rotation_period > absl::ZeroDuration()) {
          key.next_rotation_time = now + key.rotation_period;
        }
        key.primary_version = 1;
        key.create_time = key.update_time = now;
        key.policy = params.policy;
        key.policy.version = 1;
        audit.SetPolicy(key.policy);
        if (!params.alias.empty()) key.aliases.push_back(params.alias);
        // Until the row commits (or the object is discarded), a concurrent
        // Reconcile must not take the new object for garbage.
        absl::ReaderMutexLock material(&material_mu_);
        CUSTOS_ASSIGN_OR_RETURN(std::string hsm_id,
                                GenerateVersionMaterial(key.id, 1));
        KeyVersion v1;
        v1.number = 1;
        v1.state = VersionState::kEnabled;
        v1.hsm_id = hsm_id;
        v1.create_time = now;
        key.versions.push_back(std::move(v1));
        std::string id = key.id;
        // If the record cannot be written, the object stays with its intent
        // (its destruction could not be recorded either): the reconciler
        // claims and destroys it once the audit log writes again.
        absl::Status s = audit.RecordBeforeCommit();
        if (s.ok()) s = registry_->Insert(std::move(key));
        if (!s.ok()) {
          DiscardUncommitted(id, 1, hsm_id);
          return s;
        }
        return registry_->Find(id);
      });
}

absl::StatusOr<std::shared_ptr<const Key>> KeyService::GetKey(
    const Caller& caller, const std::string& name) {
  Audit audit(this, caller, Rpc::kGetKey);
  return audit.Run<std::shared_ptr<const Key>>(
      [&] { return AdminKey(caller, Rpc::kGetKey, name, audit); });
}

absl::StatusOr<ListKeysResult> KeyService::ListKeys(
    const Caller& caller, const ListKeysParams& params) {
  Audit audit(this, caller, Rpc::kListKeys);
  return audit.Run<ListKeysResult>([&]() -> absl::StatusOr<ListKeysResult> {
    CUSTOS_RETURN_IF_ERROR(authorizer_->Check(
        caller, Rpc::kListKeys, nullptr, KeyOperation{}, nullptr, nullptr));
    uint32_t page_size =
        params.page_size == 0 ? kDefaultPageSize : params.page_size;
    if (page_size > kMaxPageSize) {
      return absl::InvalidArgumentError("page_size: at most 1000");
    }
    std::string after;
    if (!params.page_token.empty() &&
        (!absl::WebSafeBase64Unescape(params.page_token, &after) ||
         !IsValidKeyId(after))) {
      return absl::InvalidArgumentError(
          "page_token: not a token from a previous ListKeys response");
    }
    std::string label_name = params.label, label_value;
    bool match_value = false;
    if (size_t eq = params.label.find('='); eq != std::string::npos) {
      label_name = params.label.substr(0, eq);
      label_value = params.label.substr(eq + 1);
      match_value = true;
    }
    std::vector<std::shared_ptr<const Key>> all = registry_->All();
    auto it = all.begin();
    if (!after.empty()) {
      it = std::find_if(all.begin(), all.end(),
                        [&](const auto& k) { return k->id == after; });
      if (it == all.end()) {
        return absl::InvalidArgumentError(
            "page_token: not a token from a previous ListKeys response");
      }
      ++it;
    }
    ListKeysResult result;
    for (; it != all.end(); ++it) {
      const Key& k = **it;
      if (params.filter_state && k.state != params.state) continue;
      if (!label_name.empty()) {
        auto l = k.labels.find(label_name);
        if (l == k.labels.end() || (match_value && l->second != label_value)) {
          continue;
        }
      }
      if (result.keys.size() == page_size) {
        result.next_page_token =
            absl::WebSafeBase64Escape(result.keys.back()->id);
        break;
      }
      result.keys.push_back(*it);
    }
    audit.AddDetail(absl::StrCat("returned=", result.keys.size()));
    return result;
  });
}

absl::StatusOr<std::shared_ptr<const Key>> KeyService::UpdateKey(
    const Caller& caller, const UpdateKeyParams& params) {
  Audit audit(this, caller, Rpc::kUpdateKey);
  return audit.Run<std::shared_ptr<const Key>>(
      [&]() -> absl::StatusOr<std::shared_ptr<const Key>> {
        CUSTOS_ASSIGN_OR_RETURN(
            std::shared_ptr<const Key> key,
            AdminKey(caller, Rpc::kUpdateKey, params.key, audit));
        if (!params.set_description && !params.set_labels &&
            !params.set_rotation_period) {
          return absl::InvalidArgumentError(
              "update_mask: name at least one of description, labels, "
              "rotation_period");
        }
        if (params.set_description &&
            params.description.size() > kMaxDescriptionBytes) {
          return absl::InvalidArgumentError(
              "description: longer than 8192 bytes");
        }
        if (params.set_labels) {
          CUSTOS_RETURN_IF_ERROR(ValidateLabels(params.labels));
        }
        if (params.set_rotation_period) {
          CUSTOS_RETURN_IF_ERROR(
              ValidateRotationPeriod(params.rotation_period));
        }
        const absl::Time now = options_.now();
        return registry_->Update(key->id, [&](Key& k) -> absl::Status {
          if (k.state == KeyState::kDestroyed) {
            return absl::FailedPreconditionError(
                absl::StrCat("key ", k.id, " is DESTROYED"));
          }
          if (params.set_description) k.description = params.description;
          if (params.set_labels) k.labels = params.labels;
          if (params.set_rotation_period) {
            k.rotation_period = params.rotation_period;
            k.next_rotation_time = k.rotation_period > absl::ZeroDuration()
                                       ? now + k.rotation_period
                                       : absl::InfinitePast();
          }
          k.update_time = now;
          return audit.RecordBeforeCommit();
        });
      });
}

absl::StatusOr<std::shared_ptr<const Key>> KeyService::RotateKey(
    const Caller& caller, const std::string& name) {
  Audit audit(this, caller, Rpc::kRotateKey);
  return audit.Run<std::shared_ptr<const Key>>(
      [&]() -> absl::StatusOr<std::shared_ptr<const Key>> {
        CUSTOS_ASSIGN_OR_RETURN(std::shared_ptr<const Key> key,
                                AdminKey(caller, Rpc::kRotateKey, name, audit));
        CUSTOS_ASSIGN_OR_RETURN(
            std::shared_ptr<const Key> rotated,
            RotateFrom(key->id, key->primary_version, &audit));
        audit.SetKey(rotated->id, rotated->primary_version);
        return rotated;
      });
}

absl::StatusOr<std::shared_ptr<const Key>> KeyService::EnableKey(
    const Caller& caller, const std::string& name) {
  Audit audit(this, caller, Rpc::kEnableKey);
  return audit.Run<std::shared_ptr<const Key>>(
      [&]() -> absl::StatusOr<std::shared_ptr<const Key>> {
        CUSTOS_ASSIGN_OR_RETURN(std::shared_ptr<const Key> key,
                                AdminKey(caller, Rpc::kEnableKey, name, audit));
        return registry_->Update(key->id, [&](Key& k) -> absl::Status {
          if (k.state == KeyState::kPendingDeletion) {
            return absl::FailedPreconditionError(
                absl::StrCat("key ", k.id,
                             " is PENDING_DELETION: cancel the deletion first "
                             "(CancelKeyDeletion), then enable it"));
          }
          if (k.state == KeyState::kDestroyed) {
            return absl::FailedPreconditionError(
                absl::StrCat("key ", k.id, " is DESTROYED"));
          }
          k.state = KeyState::kEnabled;
          k.update_time = options_.now();
          return audit.RecordBeforeCommit();
        });
      });
}

absl::StatusOr<std::shared_ptr<const Key>> KeyService::DisableKey(
    const Caller& caller, const std::string& name) {
  Audit audit(this, caller, Rpc::kDisableKey);
  return audit.Run<std::shared_ptr<const Key>>(
      [&]() -> absl::StatusOr<std::shared_ptr<const Key>> {
        CUSTOS_ASSIGN_OR_RETURN(
            std::shared_ptr<const Key> key,
            AdminKey(caller, Rpc::kDisableKey, name, audit));
        return registry_->Update(key->id, [&](Key& k) -> absl::Status {
          if (k.state != KeyState::kEnabled && k.state != KeyState::kDisabled) {
            return absl::FailedPreconditionError(
                absl::StrCat("key ", k.id, " is ", KeyStateName(k.state),
                             "; only ENABLED keys can be disabled"));
          }
          k.state = KeyState::kDisabled;
          k.update_time = options_.now();
          return audit.RecordBeforeCommit();
        });
      });
}

absl::StatusOr<std::shared_ptr<const Key>> KeyService::ScheduleKeyDeletion(
    const Caller& caller, const std::string& name, uint32_t days) {
  Audit audit(this, caller, Rpc::kScheduleKeyDeletion);
  return audit.Run<std::shared_ptr<const Key>>(
      [&]() -> absl::StatusOr<std::shared_ptr<const Key>> {
        CUSTOS_ASSIGN_OR_RETURN(
            std::shared_ptr<const Key> key,
            AdminKey(caller, Rpc::kScheduleKeyDeletion, name, audit));
        if (days == 0) days = kDefaultDeletionDays;
        if (days < kMinDeletionDays || days > kMaxDeletionDays) {
          return absl::InvalidArgumentError(absl::StrCat(
              "pending_window_days: ", days, "; choose 7 to 30 (default 30)"));
        }
        audit.AddDetail(absl::StrCat("pending_window_days=", days));
        const absl::Time now = options_.now();
        const absl::Duration scheduled_at = options_.monotonic_now();
        absl::StatusOr<std::shared_ptr<const Key>> pending =
            registry_->Update(key->id, [&](Key& k) -> absl::Status {
              if (k.state == KeyState::kPendingDeletion) {
                return absl::FailedPreconditionError(absl::StrCat(
                    "key ", k.id, " is already pending deletion, at ",
                    absl::FormatTime(k.deletion_time)));
              }
              if (k.state == KeyState::kDestroyed) {
                return absl::FailedPreconditionError(
                    absl::StrCat("key ", k.id, " is DESTROYED"));
              }
              k.state = KeyState::kPendingDeletion;
              k.deletion_window = options_.deletion_day * days;
              k.deletion_elapsed = absl::ZeroDuration();
              k.deletion_time = now + k.deletion_window;
              k.update_time = now;
              return audit.RecordBeforeCommit();
            });
        if (pending.ok()) {
          // The window starts counting now on this process's monotonic
          // clock (see CountDeletionWindows).
          absl::MutexLock lock(&window_mu_);
          window_marks_[key->id] = {(*pending)->deletion_time, scheduled_at};
        }
        return pending;
      });
}

absl::StatusOr<std::shared_ptr<const Key>> KeyService::CancelKeyDeletion(
    const Caller& caller, const std::string& name) {
  Audit audit(this, caller, Rpc::kCancelKeyDeletion);
  return audit.Run<std::shared_ptr<const Key>>(
      [&]() -> absl::StatusOr<std::shared_ptr<const Key>> {
        CUSTOS_ASSIGN_OR_RETURN(
            std::shared_ptr<const Key> key,
            AdminKey(caller, Rpc::kCancelKeyDeletion, name, audit));
        // Never while the deletion executor is destroying this key.
        absl::MutexLock lifecycle(&lifecycle_mu_);
        return registry_->Update(key->id, [&](Key& k) -> absl::Status {
          if (k.state != KeyState::kPendingDeletion) {
            return absl::FailedPreconditionError(
                absl::StrCat("key ", k.id, " is ", KeyStateName(k.state),
                             ", not PENDING_DELETION"));
          }
          if (k.destruction_started) {
            return absl::FailedPreconditionError(absl::StrCat(
                "key ", k.id,
                " is being destroyed: its deletion window ended and its key "
                "material is being destroyed; it cannot be cancelled"));
          }
          // As in AWS KMS: a rescued key comes back disabled, so that an
          // admin decides explicitly to use it again.
          k.state = KeyState::kDisabled;
          k.deletion_time = absl::InfinitePast();
          k.deletion_window = absl::ZeroDuration();
          k.deletion_elapsed = absl::ZeroDuration();
          k.update_time = options_.now();
          return audit.RecordBeforeCommit();
        });
      });
}

absl::StatusOr<AliasRecord> KeyService::CreateAlias(const Caller& caller,
                                                    const std::string& alias,
                                                    const std::string& name) {
  Audit audit(this, caller, Rpc::kCreateAlias);
  return audit.Run<AliasRecord>([&]() -> absl::StatusOr<AliasRecord> {
    CUSTOS_ASSIGN_OR_RETURN(std::shared_ptr<const Key> key,
                            AdminKey(caller, Rpc::kCreateAlias, name, audit));
    CUSTOS_RETURN_IF_ERROR(ValidateAliasName(alias));
    audit.AddDetail(absl::StrCat("alias=", alias));
    if (key->state == KeyState::kDestroyed) {
      return absl::FailedPreconditionError(
          absl::StrCat("key ", key->id, " is DESTROYED"));
    }
    AliasRecord record{alias, key->id, options_.now()};
    CUSTOS_RETURN_IF_ERROR(audit.RecordBeforeCommit());
    CUSTOS_RETURN_IF_ERROR(registry_->CreateAlias(record));
    return record;
  });
}

absl::Status KeyService::DeleteAlias(const Caller& caller,
                                     const std::string& alias) {
  Audit audit(this, caller, Rpc::kDeleteAlias);
  return audit
      .Run<bool>([&]() -> absl::StatusOr<bool> {
        CUSTOS_RETURN_IF_ERROR(authorizer_->Check(caller, Rpc::kDeleteAlias,
                                                  nullptr, KeyOperation{},
                                                  nullptr, nullptr));
        CUSTOS_RETURN_IF_ERROR(ValidateAliasName(alias));
        audit.AddDetail(absl::StrCat("alias=", alias));
        if (auto key = registry_->Find(alias); key.ok()) {
          audit.SetKey((*key)->id, 0);
        }
        if (!registry_->Find(alias).ok()) {
          return absl::NotFoundError(
              absl::StrCat("alias ", alias, " not found"));
        }
        CUSTOS_RETURN_IF_ERROR(audit.RecordBeforeCommit());
        CUSTOS_RETURN_IF_ERROR(registry_->DeleteAlias(alias));
        return true;
      })
      .status();
}

absl::StatusOr<std::vector<AliasRecord>> KeyService::ListAliases(
    const Caller& caller, const std::string& name) {
  Audit audit(this, caller, Rpc::kListAliases);
  return audit.Run<std::vector<AliasRecord>>(
      [&]() -> absl::StatusOr<std::vector<AliasRecord>> {
        if (name.empty()) {
          CUSTOS_RETURN_IF_ERROR(authorizer_->Check(caller, Rpc::kListAliases,
                                                    nullptr, KeyOperation{},
                                                    nullptr, nullptr));
          return registry_->Aliases("");
        }
        CUSTOS_ASSIGN_OR_RETURN(
            std::shared_ptr<const Key> key,
            AdminKey(caller, Rpc::kListAliases, name, audit));
        return registry_->Aliases(key->id);
      });
}

absl::StatusOr<KeyPolicy> KeyService::GetKeyPolicy(const Caller& caller,
                                                   const std::string& name) {
  Audit audit(this, caller, Rpc::kGetKeyPolicy);
  return audit.Run<KeyPolicy>([&]() -> absl::StatusOr<KeyPolicy> {
    CUSTOS_ASSIGN_OR_RETURN(std::shared_ptr<const Key> key,
                            AdminKey(caller, Rpc::kGetKeyPolicy, name, audit));
    return key->policy;
  });
}

absl::StatusOr<KeyPolicy> KeyService::SetKeyPolicy(const Caller& caller,
                                                   const std::string& name,
                                                   const KeyPolicy& policy,
                                                   uint64_t expected_version) {
  Audit audit(this, caller, Rpc::kSetKeyPolicy);
  return audit.Run<KeyPolicy>([&]() -> absl::StatusOr<KeyPolicy> {
    CUSTOS_ASSIGN_OR_RETURN(std::shared_ptr<const Key> key,
                            AdminKey(caller, Rpc::kSetKeyPolicy, name, audit));
    CUSTOS_RETURN_IF_ERROR(ValidatePolicy(policy));
    CUSTOS_ASSIGN_OR_RETURN(
        std::shared_ptr<const Key> updated,
        registry_->Update(key->id, [&](Key& k) -> absl::Status {
          if (expected_version != 0 && k.policy.version != expected_version) {
            return absl::AbortedError(
                absl::StrCat("policy of ", k.id, " is at version ",
                             k.policy.version, ", not ", expected_version,
                             ": someone changed it meanwhile; read it again"));
          }
          uint64_t next = k.policy.version + 1;
          k.policy = policy;
          k.policy.version = next;
          k.update_time = options_.now();
          audit.AddDetail(absl::StrCat("policy_version=", next,
                                       " bindings=", policy.bindings.size()));
          audit.SetPolicy(k.policy);
          return audit.RecordBeforeCommit();
        }));
    return updated->policy;
  });
}

}  // namespace custos::kms
