#include "kms/quarantine.h"

#include <set>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "hsm/key_templates.h"
#include "kms/key.h"

namespace custos::kms {
namespace {

// Every CKA_ID a row names: versions (any state) and generate-intents.
absl::StatusOr<std::set<std::string>> NamedIds(Store& store) {
  std::set<std::string> named;
  CUSTOS_ASSIGN_OR_RETURN(std::vector<Key> keys, store.LoadAllKeys());
  for (const Key& key : keys) {
    for (const KeyVersion& v : key.versions) named.insert(v.hsm_id);
  }
  CUSTOS_ASSIGN_OR_RETURN(std::vector<MaterialIntent> intents,
                          store.ListIntents());
  for (const MaterialIntent& i : intents) named.insert(i.hsm_id);
  return named;
}

bool IsCustosKey(const hsm::HsmObject& o) {
  return o.object_class == CKO_SECRET_KEY &&
         o.label.rfind(kHsmLabelPrefix, 0) == 0;
}

}  // namespace

absl::StatusOr<std::vector<hsm::HsmObject>> FindQuarantined(Store& store,
                                                            hsm::Hsm& hsm) {
  // Objects first, rows second: an object created between the two reads is
  // then named by its row, never listed as quarantined.
  CUSTOS_ASSIGN_OR_RETURN(std::vector<hsm::HsmObject> objects,
                          hsm.ListKeyObjects());
  CUSTOS_ASSIGN_OR_RETURN(std::set<std::string> named, NamedIds(store));
  std::vector<hsm::HsmObject> out;
  for (hsm::HsmObject& o : objects) {
    if (IsCustosKey(o) && named.count(o.id) == 0) out.push_back(std::move(o));
  }
  return out;
}

absl::Status DestroyQuarantined(Store& store, hsm::Hsm& hsm, AuditLog& audit,
                                absl::string_view id,
                                absl::string_view operator_name,
                                absl::Time now) {
  CUSTOS_ASSIGN_OR_RETURN(std::vector<hsm::HsmObject> objects,
                          hsm.ListKeyObjects());
  const hsm::HsmObject* found = nullptr;
  for (const hsm::HsmObject& o : objects) {
    if (o.id == id) found = &o;
  }
  const std::string hex = hsm::ObjectIdHex(id);
  if (found == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("the token has no key object with CKA_ID ", hex));
  }
  if (!IsCustosKey(*found)) {
    return absl::FailedPreconditionError(
        absl::StrCat("object ", hex, " ('", found->label,
                     "') is not a Custos key object; it is not Custos's to "
                     "destroy"));
  }
  CUSTOS_ASSIGN_OR_RETURN(std::set<std::string> named, NamedIds(store));
  if (named.count(found->id) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("object ", hex,
                     " is named by a row of this database (a key version or "
                     "a generate-intent): it is not quarantined. Keys are "
                     "destroyed through ScheduleKeyDeletion"));
  }
  AuditRecord record;
  record.time = now;
  record.principal = std::string(operator_name);
  record.operation = "DestroyQuarantinedHsmObject";
  record.outcome = AuditOutcome::kAllowed;
  record.code = absl::StatusCode::kOk;
  record.detail = absl::StrCat("object ", hex, " (", found->label,
                               "), named by no row, destroyed by an operator");
  CUSTOS_RETURN_IF_ERROR(audit.Append(std::move(record)));
  return hsm.DestroyObjects(found->id).status();
}

}  // namespace custos::kms
