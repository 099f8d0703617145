#include "kms/audit/audit_chain.h"

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/p256.h"

namespace custos::kms {

std::string AuditLineHash(absl::string_view line) {
  return absl::BytesToHexString(Sha256(line));
}

std::string CheckpointMessage(absl::string_view node, uint64_t last_seq,
                              absl::string_view head) {
  return absl::StrCat("custos.audit.checkpoint.v1|", node, "|", last_seq, "|",
                      head);
}

std::string PublicKeyFingerprint(absl::string_view public_key_pem) {
  return absl::BytesToHexString(Sha256(public_key_pem)).substr(0, 16);
}

}  // namespace custos::kms
