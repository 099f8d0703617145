// The key model: a customer master key and its versions, as stored and as
// the service reasons about them. Plain value types; not thread-safe (the
// registry hands out immutable snapshots).
#ifndef CUSTOS_KMS_KEY_H_
#define CUSTOS_KMS_KEY_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "kms/policy.h"

namespace custos::kms {

// Stored values: never renumber (the numbers equal custos.v1.KeyState).
enum class KeyState {
  kEnabled = 1,
  kDisabled = 2,
  kPendingDeletion = 3,
  kDestroyed = 4,
};

// Stored values (equal to custos.v1.KeyVersionState).
enum class VersionState {
  kEnabled = 1,
  kDisabled = 2,
  kDestroyed = 3,
};

// Stored values (equal to custos.v1.KeyPurpose).
enum class KeyPurpose {
  kEncryptDecrypt = 1,
};

const char* KeyStateName(KeyState state);  // "ENABLED", ...
const char* VersionStateName(VersionState state);

// One piece of key material: an AES-256 object inside the HSM.
struct KeyVersion {
  uint32_t number = 0;
  VersionState state = VersionState::kEnabled;
  std::string hsm_id;  // CKA_ID of the HSM object (raw bytes)
  absl::Time create_time;
  // Encryptions reserved durably for this version (see EncryptionCounter):
  // the true count is at most this.
  uint64_t encryptions_reserved = 0;
};

// A customer master key.
struct Key {
  std::string id;  // "k-" + 26 base32 characters
  std::string description;
  std::map<std::string, std::string> labels;
  KeyPurpose purpose = KeyPurpose::kEncryptDecrypt;
  KeyState state = KeyState::kEnabled;
  absl::Duration rotation_period = absl::ZeroDuration();  // zero: never
  absl::Time next_rotation_time = absl::InfinitePast();   // unset
  uint32_t primary_version = 0;
  absl::Time create_time;
  absl::Time update_time;
  absl::Time deletion_time = absl::InfinitePast();  // unset
  // While PENDING_DELETION: the window asked for, and how much of it custosd
  // has seen pass on its monotonic clock. The key is destroyed only when
  // both the wall clock has reached deletion_time and deletion_elapsed has
  // reached deletion_window, so a clock stepped forward (or back) never
  // ends the window early. Time while no custosd runs does not count.
  absl::Duration deletion_window = absl::ZeroDuration();
  absl::Duration deletion_elapsed = absl::ZeroDuration();
  // Set, and committed, by the deletion executor before it destroys the
  // first HSM object. From then on the deletion cannot be cancelled (the
  // material may be half gone) and is finished by whichever replica leads,
  // even after a crash.
  bool destruction_started = false;
  KeyPolicy policy;
  std::vector<KeyVersion> versions;  // ordered by number
  std::vector<std::string> aliases;  // "alias/..." names, sorted

  const KeyVersion* FindVersion(uint32_t number) const;
  KeyVersion* FindVersion(uint32_t number);
};

// The HSM object label of a key version: "custos:<key id>:v<n>". The
// reconciler recognises Custos's objects by this prefix.
std::string HsmLabel(const std::string& key_id, uint32_t version);
inline constexpr char kHsmLabelPrefix[] = "custos:";

// "alias/" followed by 1–250 of [A-Za-z0-9/_-]; "alias/custos/" is reserved.
absl::Status ValidateAliasName(absl::string_view alias);

}  // namespace custos::kms

#endif  // CUSTOS_KMS_KEY_H_
