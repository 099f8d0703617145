#include "kms/key.h"

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace custos::kms {

const char* KeyStateName(KeyState state) {
  switch (state) {
    case KeyState::kEnabled:
      return "ENABLED";
    case KeyState::kDisabled:
      return "DISABLED";
    case KeyState::kPendingDeletion:
      return "PENDING_DELETION";
    case KeyState::kDestroyed:
      return "DESTROYED";
  }
  return "UNKNOWN";
}

const char* VersionStateName(VersionState state) {
  switch (state) {
    case VersionState::kEnabled:
      return "ENABLED";
    case VersionState::kDisabled:
      return "DISABLED";
    case VersionState::kDestroyed:
      return "DESTROYED";
  }
  return "UNKNOWN";
}

const KeyVersion* Key::FindVersion(uint32_t number) const {
  if (number == 0 || number > versions.size()) return nullptr;
  const KeyVersion& v = versions[number - 1];
  return v.number == number ? &v : nullptr;
}

KeyVersion* Key::FindVersion(uint32_t number) {
  return const_cast<KeyVersion*>(
      static_cast<const Key*>(this)->FindVersion(number));
}

std::string HsmLabel(const std::string& key_id, uint32_t version) {
  return absl::StrCat(kHsmLabelPrefix, key_id, ":v", version);
}

absl::Status ValidateAliasName(absl::string_view alias) {
  constexpr absl::string_view kPrefix = "alias/";
  if (!absl::StartsWith(alias, kPrefix) || alias.size() == kPrefix.size() ||
      alias.size() > kPrefix.size() + 250) {
    return absl::InvalidArgumentError(
        "alias: must be \"alias/\" followed by 1 to 250 characters, e.g. "
        "alias/photos");
  }
  for (char c : alias.substr(kPrefix.size())) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '/' || c == '_' || c == '-';
    if (!ok) {
      return absl::InvalidArgumentError(
          "alias: only letters, digits, '/', '_' and '-' may follow "
          "\"alias/\"");
    }
  }
  if (absl::StartsWith(alias, "alias/custos/")) {
    return absl::InvalidArgumentError(
        "alias: names under alias/custos/ are reserved");
  }
  return absl::OkStatus();
}

}  // namespace custos::kms
