#include "kms/audit/checkpoint.h"

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/p256.h"
#include "common/status_macros.h"
#include "hsm/hsm.h"
#include "hsm/pkcs11.h"

namespace custos::kms {

namespace {

std::string SignerLabel(const std::string& node_id) {
  return absl::StrCat("custos:audit:", node_id);
}

// The signing key's CKA_ID, or empty if the token has none.
absl::StatusOr<std::string> FindSigner(hsm::Hsm* hsm,
                                       const std::string& label) {
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> ids,
                          hsm->FindKeyIdsByLabel(CKO_PRIVATE_KEY, label));
  if (ids.size() > 1) {
    return absl::FailedPreconditionError(
        absl::StrCat("audit: several HSM signing keys are labelled '", label,
                     "'; remove the extra ones"));
  }
  return ids.empty() ? std::string() : std::move(ids[0]);
}

}  // namespace

absl::StatusOr<std::unique_ptr<HsmAuditSigner>> HsmAuditSigner::Open(
    hsm::Hsm* hsm, const std::string& node_id) {
  const std::string label = SignerLabel(node_id);
  CUSTOS_ASSIGN_OR_RETURN(std::string key_id, FindSigner(hsm, label));
  if (key_id.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "audit: the token has no checkpoint signing key for node '", node_id,
        "' (label '", label,
        "'). custosd never makes one by itself: a lost key must not be "
        "replaced silently. For a new node run: custosd --config FILE "
        "--init; if the key was lost, restore the token"));
  }
  CUSTOS_ASSIGN_OR_RETURN(std::string pem, hsm->SigningPublicKeyPem(key_id));
  return std::unique_ptr<HsmAuditSigner>(
      new HsmAuditSigner(hsm, std::move(key_id), std::move(pem)));
}

absl::StatusOr<std::unique_ptr<HsmAuditSigner>> HsmAuditSigner::Create(
    hsm::Hsm* hsm, const std::string& node_id) {
  const std::string label = SignerLabel(node_id);
  CUSTOS_ASSIGN_OR_RETURN(std::string key_id, FindSigner(hsm, label));
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
