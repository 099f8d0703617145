#include "kms/deployment.h"

#include <algorithm>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "hsm/key_templates.h"
#include "kms/key.h"

namespace custos::kms {
namespace {

std::string Describe(const std::string& label, const std::string& serial) {
  return absl::StrCat("'", label, "' (serial ", serial, ")");
}

// How many Custos key objects (AES keys labelled custos:...) the token has.
absl::StatusOr<size_t> CountCustosKeys(hsm::Hsm& hsm) {
  CUSTOS_ASSIGN_OR_RETURN(std::vector<hsm::HsmObject> objects,
                          hsm.ListKeyObjects());
  return static_cast<size_t>(
      std::count_if(objects.begin(), objects.end(), [](const auto& o) {
        return o.object_class == CKO_SECRET_KEY &&
               o.label.rfind(kHsmLabelPrefix, 0) == 0;
      }));
}

}  // namespace

absl::StatusOr<InitOutcome> InitDeployment(Store& store, hsm::Hsm& hsm,
                                           absl::Time now) {
  CUSTOS_ASSIGN_OR_RETURN(std::optional<Deployment> bound,
                          store.LoadDeployment());
  if (bound.has_value()) {
    CUSTOS_RETURN_IF_ERROR(CheckDeployment(store, hsm));
    return InitOutcome::kAlreadyBound;
  }
  const hsm::TokenSummary& token = hsm.token();
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> markers,
                          hsm.FindMarkers(kDeploymentMarkerLabel));
  if (!markers.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "init: token ", Describe(token.label, token.serial),
        " already belongs to another Custos deployment (marker ",
        hsm::ObjectIdHex(markers[0]),
        "), and this database is not it. One token serves one deployment: "
        "point `storage` at that deployment's database, or use another "
        "token"));
  }
  CUSTOS_ASSIGN_OR_RETURN(std::vector<Key> keys, store.LoadAllKeys());
  if (keys.empty()) {
    CUSTOS_ASSIGN_OR_RETURN(size_t on_token, CountCustosKeys(hsm));
    if (on_token > 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "init: token ", Describe(token.label, token.serial), " holds ",
          on_token,
          " Custos key objects but this database has no keys: it looks like "
          "a lost or replaced database. Restore the database that made "
          "them; a new deployment is not started over existing key "
          "material"));
    }
  }
  CUSTOS_ASSIGN_OR_RETURN(std::string marker, hsm.NewObjectId());
  CUSTOS_RETURN_IF_ERROR(hsm.CreateMarker(marker, kDeploymentMarkerLabel));
  absl::Status recorded =
      store.InsertDeployment({marker, token.label, token.serial, now});
  if (!recorded.ok()) {
    // Another --init won the race, or the write failed (perhaps only as far
    // as this process could tell): the marker (no secret) goes again only
    // if the database does not name it.
    absl::StatusOr<std::optional<Deployment>> stored = store.LoadDeployment();
    if (stored.ok() && stored->has_value() && (*stored)->id == marker) {
      return InitOutcome::kCreated;
    }
    if (stored.ok()) {
      hsm.DestroyMarker(marker, kDeploymentMarkerLabel).IgnoreError();
    }
    if (!absl::IsAlreadyExists(recorded)) return recorded;
    CUSTOS_RETURN_IF_ERROR(CheckDeployment(store, hsm));
    return InitOutcome::kAlreadyBound;
  }
  // Two --init runs on two databases against one token at once could each
  // have found no marker: the one that sees two gives way.
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> after,
                          hsm.FindMarkers(kDeploymentMarkerLabel));
  if (after.size() > 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "init: token ", Describe(token.label, token.serial), " now has ",
        after.size(),
        " deployment markers (another --init ran against it at the same "
        "time); this database stays bound but custosd will not start on it "
        "until only one deployment uses the token"));
  }
  return InitOutcome::kCreated;
}

absl::Status CheckDeployment(Store& store, hsm::Hsm& hsm) {
  CUSTOS_ASSIGN_OR_RETURN(std::optional<Deployment> bound,
                          store.LoadDeployment());
  if (!bound.has_value()) {
    return absl::FailedPreconditionError(
        "storage: the database is not bound to an HSM token (it was made "
        "before bindings existed, or never initialised). Run once: custosd "
        "--config FILE --init");
  }
  const hsm::TokenSummary& token = hsm.token();
  if (bound->token_label != token.label) {
    return absl::FailedPreconditionError(absl::StrCat(
        "hsm.token_label: the database belongs to token ",
        Describe(bound->token_label, bound->token_serial),
        ", but custosd opened token ", Describe(token.label, token.serial),
        ". Check `storage` and `hsm.token_label`"));
  }
  if (bound->token_serial != token.serial) {
    return absl::FailedPreconditionError(absl::StrCat(
        "hsm: the database belongs to token ",
        Describe(bound->token_label, bound->token_serial),
        ", but the token labelled '", token.label, "' has serial ",
        token.serial,
        " (another token with the same label, or one re-initialised). Check "
        "`storage` and the token"));
  }
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> markers,
                          hsm.FindMarkers(kDeploymentMarkerLabel));
  if (markers.size() > 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "hsm: token ", Describe(token.label, token.serial), " carries ",
        markers.size(),
        " deployment markers: more than one Custos deployment was bound to "
        "it. One token serves one deployment; find out which databases they "
        "are before removing any"));
  }
  if (std::find(markers.begin(), markers.end(), bound->id) == markers.end()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "hsm: token ", Describe(token.label, token.serial),
        " has no marker of this database (", hsm::ObjectIdHex(bound->id),
        markers.empty() ? "; it has none at all"
                        : absl::StrCat("; it has another deployment's, ",
                                       hsm::ObjectIdHex(markers[0])),
        "): the database and the token are not a pair. Check `storage` and "
        "the token"));
  }
  return absl::OkStatus();
}

}  // namespace custos::kms
