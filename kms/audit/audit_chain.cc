#include "kms/audit/audit_chain.h"

#include "absl/strings/escaping.h"
#include "common/p256.h"

namespace custos::kms {

std::string AuditLineHash(absl::string_view line) {
  return absl::BytesToHexString(Sha256(line));
}

}  // namespace custos::kms
