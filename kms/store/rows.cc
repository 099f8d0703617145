#include "kms/store/rows.h"

#include "nlohmann/json.hpp"

namespace custos::kms::rows {

std::string LabelsToJson(const std::map<std::string, std::string>& labels) {
  return nlohmann::json(labels).dump();
}

absl::StatusOr<std::map<std::string, std::string>> LabelsFromJson(
    const std::string& text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::DataLossError("stored labels are not a JSON object");
  }
  std::map<std::string, std::string> labels;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (!it->is_string()) {
      return absl::DataLossError("stored label value is not a string");
    }
    labels[it.key()] = it->get<std::string>();
  }
  return labels;
}

absl::Status CheckKeyRow(absl::string_view id, int64_t purpose, int64_t state) {
  if (purpose != static_cast<int64_t>(KeyPurpose::kEncryptDecrypt)) {
    return absl::DataLossError(
        absl::StrCat("key ", id, " has unknown stored purpose ", purpose));
  }
  if (state < 1 || state > 4) {
    // An unknown state is never treated as usable.
    return absl::DataLossError(
        absl::StrCat("key ", id, " has unknown stored state ", state));
  }
  return absl::OkStatus();
}

absl::Status CheckVersionState(absl::string_view key_id, int64_t number,
                               int64_t state) {
  if (state < 1 || state > 3) {
    return absl::DataLossError(absl::StrCat("key ", key_id, " version ", number,
                                            " has unknown stored state"));
  }
  return absl::OkStatus();
}

absl::StatusOr<KeyPolicy> PolicyFromColumn(absl::string_view key_id,
                                           const std::string& json) {
  absl::StatusOr<KeyPolicy> policy = PolicyFromJson(json);
  if (!policy.ok()) {
    return absl::DataLossError(
        absl::StrCat("key ", key_id,
                     " has an unreadable policy: ", policy.status().message()));
  }
  return policy;
}

absl::Status AppendVersion(Key& key, KeyVersion version) {
  if (version.number != key.versions.size() + 1) {
    return absl::DataLossError(
        absl::StrCat("key ", key.id, " has a gap in its version numbers"));
  }
  key.versions.push_back(std::move(version));
  return absl::OkStatus();
}

}  // namespace custos::kms::rows
