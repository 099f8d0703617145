// The audit log's hash chain: each record carries `prev`, the SHA-256 (hex)
// of the previous record's line without its newline; the first record's
// `prev` is 64 zeros.
#ifndef CUSTOS_KMS_AUDIT_AUDIT_CHAIN_H_
#define CUSTOS_KMS_AUDIT_AUDIT_CHAIN_H_

#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace custos::kms {

std::string AuditLineHash(absl::string_view line);
inline constexpr char kAuditGenesisHash[] =
    "0000000000000000000000000000000000000000000000000000000000000000";

// What a checkpoint signs (ASCII):
//   "custos.audit.checkpoint.v1|<node>|<last seq>|<head hex>"
std::string CheckpointMessage(absl::string_view node, uint64_t last_seq,
                              absl::string_view head);

// First 16 hex digits of SHA-256 of a public key PEM: names the key in
// checkpoint records.
std::string PublicKeyFingerprint(absl::string_view public_key_pem);

}  // namespace custos::kms

#endif  // CUSTOS_KMS_AUDIT_AUDIT_CHAIN_H_
