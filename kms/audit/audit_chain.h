// The audit log's hash chain: each record carries `prev`, the SHA-256 (hex)
// of the previous record's line without its newline; the first record's
// `prev` is 64 zeros.
#ifndef CUSTOS_KMS_AUDIT_AUDIT_CHAIN_H_
#define CUSTOS_KMS_AUDIT_AUDIT_CHAIN_H_

#include <string>

#include "absl/strings/string_view.h"

namespace custos::kms {

std::string AuditLineHash(absl::string_view line);
inline constexpr char kAuditGenesisHash[] =
    "0000000000000000000000000000000000000000000000000000000000000000";

}  // namespace custos::kms

#endif  // CUSTOS_KMS_AUDIT_AUDIT_CHAIN_H_
