// Principals: how Custos spells the identity of a caller, and which
// spellings are reserved. Every principal carries its type, so that names of
// different kinds never collide (docs/policies.md, "Principals"):
//
//   certificate name      principal
//   SAN URI               the URI itself, e.g. spiffe://example.org/svc
//   SAN DNS name          "dns:" + the name in lower case, e.g.
//   dns:db.example.org subject CN            "cn:" + the CN in UTF-8, e.g.
//   cn:billing-batch
//
// A URI whose scheme is one of the type prefixes (dns, cn), `custos` or
// `cert-sha256` is refused: it would pose as another type, as the service
// itself (`custos:system` is the principal of the service's own work), or as
// an unidentified caller (`cert-sha256:<hex>` names a certificate that gave
// no usable identity, in the audit log only). Every principal is 1 to
// kMaxPrincipalBytes bytes of UTF-8 without spaces or control characters.
//
// Pure functions; thread-safe.
#ifndef CUSTOS_KMS_PRINCIPAL_H_
#define CUSTOS_KMS_PRINCIPAL_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace custos::kms {

inline constexpr char kDnsPrincipalPrefix[] = "dns:";
inline constexpr char kCnPrincipalPrefix[] = "cn:";
// The audit log's name for a caller whose certificate gave no usable
// identity: this prefix and the SHA-256 (hex) of the certificate (DER).
inline constexpr char kCertHashPrincipalPrefix[] = "cert-sha256:";
// Reserved for the service's own principals (kSystemPrincipal).
inline constexpr char kReservedPrincipalPrefix[] = "custos:";

// True if `name` starts with "custos:" in any letter case.
bool IsReservedPrincipal(absl::string_view name);

// The principal of a SAN URI, of a SAN DNS name, of a subject CN (already
// converted to UTF-8). UNAUTHENTICATED, naming the certificate field and
// what is wrong with it, if the name cannot be a principal.
absl::StatusOr<std::string> UriPrincipal(absl::string_view uri);
absl::StatusOr<std::string> DnsPrincipal(absl::string_view dns_name);
absl::StatusOr<std::string> CnPrincipal(absl::string_view common_name);

// Checks a principal or principal pattern written by an operator (the
// config's role lists and development principal): the text rules above, not
// reserved, and typed: it starts with a URI scheme and ':' (dns: and cn:
// included), or with '*'. INVALID_ARGUMENT naming `field` and the fix.
// `allow_patterns` false also refuses '*'.
absl::Status ValidateConfiguredPrincipal(absl::string_view principal,
                                         absl::string_view field,
                                         bool allow_patterns);

}  // namespace custos::kms

#endif  // CUSTOS_KMS_PRINCIPAL_H_
