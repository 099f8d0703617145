#include "kms/audit/checkpoint.h"

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/p256.h"
#include "common/status_macros.h"
#include "hsm/hsm.h"
#include "hsm/pkcs11.h"

namespace custos::kms {

absl::StatusOr<std::unique_ptr<HsmAuditSigner>> HsmAuditSigner::Create(
    hsm::Hsm* hsm, const std::string& node_id) {
  const std::string label = absl::StrCat("custos:audit:", node_id);
  CUSTOS_ASSIGN_OR_RETURN(std::vector<hsm::HsmObject> objects,
                          hsm->ListKeyObjects());
  std::string key_id;
  for (const hsm::HsmObject& o : objects) {
    if (o.object_class != CKO_PRIVATE_KEY || o.label != label) continue;
    if (!key_id.empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat("audit: several HSM signing keys are labelled '", label,
                       "'; remove the extra ones"));
    }
    key_id = o.id;
  }
  if (key_id.empty()) {
    CUSTOS_ASSIGN_OR_RETURN(key_id, hsm->GenerateSigningKey(label));
  }
  CUSTOS_ASSIGN_OR_RETURN(std::string pem, hsm->SigningPublicKeyPem(key_id));
  return std::unique_ptr<HsmAuditSigner>(
      new HsmAuditSigner(hsm, std::move(key_id), std::move(pem)));
}

absl::StatusOr<std::string> HsmAuditSigner::Sign(absl::string_view message) {
  return hsm_->SignP256(key_id_, message);
}

}  // namespace custos::kms
