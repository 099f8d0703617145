// How the SQL stores turn rows into keys and back: the column lists, the
// JSON forms of labels, times as Unix microseconds, and the checks that
// refuse a row this custosd cannot trust (an unknown state is never treated
// as usable; a gap in version numbers is a lost row). Shared by SqliteStore
// and PostgresStore, which read their rows through a small adapter with
// Text(col), Int(col), IsNull(col) and Blob(col). Stateless; thread-safe.
#ifndef CUSTOS_KMS_STORE_ROWS_H_
#define CUSTOS_KMS_STORE_ROWS_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/status_macros.h"
#include "kms/key.h"
#include "kms/policy.h"

namespace custos::kms::rows {

inline int64_t Micros(absl::Time t) { return absl::ToUnixMicros(t); }
inline absl::Time FromMicros(int64_t us) { return absl::FromUnixMicros(us); }

std::string LabelsToJson(const std::map<std::string, std::string>& labels);
// DATA_LOSS unless a JSON object of strings.
absl::StatusOr<std::map<std::string, std::string>> LabelsFromJson(
    const std::string& text);

// The columns of the keys table that KeyFromRow reads, in its order.
inline constexpr char kKeyColumns[] =
    "id, description, labels, purpose, state, rotation_period_s, "
    "next_rotation_us, primary_version, create_us, update_us, deletion_us, "
    "policy, deletion_window_us, deletion_elapsed_us, destruction_started";

// The columns VersionFromRow reads, in its order. Bulk queries append
// key_id after them.
inline constexpr char kVersionColumns[] =
    "number, state, hsm_id, create_us, encryptions_reserved";

// Checks stored enum values; DATA_LOSS names the key (never usable).
absl::Status CheckKeyRow(absl::string_view id, int64_t purpose, int64_t state);
absl::Status CheckVersionState(absl::string_view key_id, int64_t number,
                               int64_t state);
// The policy column, or DATA_LOSS naming the key.
absl::StatusOr<KeyPolicy> PolicyFromColumn(absl::string_view key_id,
                                           const std::string& json);

// One keys row (columns as kKeyColumns), without versions or aliases.
template <typename Row>
absl::StatusOr<Key> KeyFromRow(const Row& row) {
  Key key;
  key.id = row.Text(0);
  key.description = row.Text(1);
  CUSTOS_ASSIGN_OR_RETURN(key.labels, LabelsFromJson(row.Text(2)));
  CUSTOS_RETURN_IF_ERROR(CheckKeyRow(key.id, row.Int(3), row.Int(4)));
  key.purpose = static_cast<KeyPurpose>(row.Int(3));
  key.state = static_cast<KeyState>(row.Int(4));
  key.rotation_period = absl::Seconds(row.Int(5));
  if (!row.IsNull(6)) key.next_rotation_time = FromMicros(row.Int(6));
  key.primary_version = static_cast<uint32_t>(row.Int(7));
  key.create_time = FromMicros(row.Int(8));
  key.update_time = FromMicros(row.Int(9));
  if (!row.IsNull(10)) key.deletion_time = FromMicros(row.Int(10));
  CUSTOS_ASSIGN_OR_RETURN(key.policy, PolicyFromColumn(key.id, row.Text(11)));
  key.deletion_window = absl::Microseconds(row.Int(12));
  key.deletion_elapsed = absl::Microseconds(row.Int(13));
  key.destruction_started = row.Int(14) != 0;
  return key;
}

// One key_versions row (columns as kVersionColumns) of key `key_id`.
template <typename Row>
absl::StatusOr<KeyVersion> VersionFromRow(const Row& row,
                                          absl::string_view key_id) {
  KeyVersion version;
  version.number = static_cast<uint32_t>(row.Int(0));
  CUSTOS_RETURN_IF_ERROR(CheckVersionState(key_id, version.number, row.Int(1)));
  version.state = static_cast<VersionState>(row.Int(1));
  version.hsm_id = row.Blob(2);
  version.create_time = FromMicros(row.Int(3));
  version.encryptions_reserved = static_cast<uint64_t>(row.Int(4));
  return version;
}

// Appends `version` to `key`, whose versions must be read in ascending
// order: DATA_LOSS unless it is the next number (a gap means a lost row).
absl::Status AppendVersion(Key& key, KeyVersion version);

}  // namespace custos::kms::rows

#endif  // CUSTOS_KMS_STORE_ROWS_H_
