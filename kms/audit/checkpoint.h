// Signed checkpoints of the audit chain. Every N records or T seconds (and
// at shutdown) the audit log appends a checkpoint record whose signature,
// made by an ECDSA P-256 key that never leaves the HSM, covers the chain
// head: the hash of the last record. With the public key an auditor can
// check offline that nobody edited, reordered or cut the log before the last
// checkpoint.
//
// The signed message is ASCII:
//   "custos.audit.checkpoint.v1|<node>|<last seq>|<head hex>"
#ifndef CUSTOS_KMS_AUDIT_CHECKPOINT_H_
#define CUSTOS_KMS_AUDIT_CHECKPOINT_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kms/audit/audit_chain.h"

namespace custos::hsm {
class Hsm;
}

namespace custos::kms {

// Signs checkpoints. Implementations are thread-safe.
class AuditSigner {
 public:
  virtual ~AuditSigner() = default;
  // Raw r||s ECDSA P-256 signature over SHA-256(message).
  virtual absl::StatusOr<std::string> Sign(absl::string_view message) = 0;
  virtual const std::string& public_key_pem() const = 0;
  virtual const std::string& fingerprint() const = 0;
};

// The node's signing key in the HSM, labelled "custos:audit:<node>":
// found by its label, or generated (non-extractable, sign-only) on first
// start.
class HsmAuditSigner : public AuditSigner {
 public:
  // The node's signing key (labelled "custos:audit:NODE"), generated in
  // the HSM if it has none: for `custosd --init` and tests.
  static absl::StatusOr<std::unique_ptr<HsmAuditSigner>> Create(
      hsm::Hsm* hsm, const std::string& node_id);
  // The node's existing signing key; FAILED_PRECONDITION if there is none.
  // custosd never makes one silently: a lost key would otherwise be
  // replaced by a new one that verifies a rewritten history as well.
  static absl::StatusOr<std::unique_ptr<HsmAuditSigner>> Open(
      hsm::Hsm* hsm, const std::string& node_id);
  absl::StatusOr<std::string> Sign(absl::string_view message) override;
  const std::string& public_key_pem() const override { return pem_; }
  const std::string& fingerprint() const override { return fingerprint_; }

 private:
  HsmAuditSigner(hsm::Hsm* hsm, std::string key_id, std::string pem)
      : hsm_(hsm),
        key_id_(std::move(key_id)),
        pem_(std::move(pem)),
        fingerprint_(PublicKeyFingerprint(pem_)) {}
  hsm::Hsm* const hsm_;
  const std::string key_id_;
  const std::string pem_;
  const std::string fingerprint_;
};

}  // namespace custos::kms

#endif  // CUSTOS_KMS_AUDIT_CHECKPOINT_H_
