// Quarantined HSM objects: Custos key objects (AES keys labelled custos:...)
// that no row of the database names, neither a key version nor a
// generate-intent. The reconciler never destroys them (they may belong to a
// newer database than the one restored, or to another deployment); an
// operator lists them and destroys one only by naming it
// (custos-hsmtool quarantine).
//
// Free functions over a Store, an Hsm and an AuditLog; as thread-safe as
// those are.
#ifndef CUSTOS_KMS_QUARANTINE_H_
#define CUSTOS_KMS_QUARANTINE_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "hsm/hsm.h"
#include "kms/audit/audit_log.h"
#include "kms/store/store.h"

namespace custos::kms {

// The quarantined objects on the token, in the token's order.
absl::StatusOr<std::vector<hsm::HsmObject>> FindQuarantined(Store& store,
                                                            hsm::Hsm& hsm);

// Destroys the quarantined object with CKA_ID `id`, after writing a durable
// audit record naming `operator_name` and the object. FAILED_PRECONDITION
// (and nothing destroyed) if a row names the object or it is not a Custos
// key object; NOT_FOUND if the token has no such object.
absl::Status DestroyQuarantined(Store& store, hsm::Hsm& hsm, AuditLog& audit,
                                absl::string_view id,
                                absl::string_view operator_name,
                                absl::Time now);

}  // namespace custos::kms

#endif  // CUSTOS_KMS_QUARANTINE_H_
