// Who is calling: the identity of a verified client certificate.
//
// gRPC has already verified the chain to the configured client CA (and the
// validity period). On top of that Custos requires the clientAuth extended
// key usage and refuses CA certificates used as client leaves
// (docs/security.md, threat 4). The identity is the first SAN URI (e.g.
// spiffe://...), else the first DNS SAN (as dns:HOST), else the subject CN (as
// cn:NAME); see kms/principal.h for the spelling and the reserved names.
// Thread-safe.
#ifndef CUSTOS_KMS_SERVER_IDENTITY_H_
#define CUSTOS_KMS_SERVER_IDENTITY_H_

#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace custos::server {

// Extracts and checks the identity of a PEM client certificate.
// UNAUTHENTICATED with the reason when the certificate is not acceptable.
absl::StatusOr<std::string> IdentityFromPem(const std::string& pem);

// "cert-sha256:<hex>": the SHA-256 of the certificate's DER encoding (of the
// PEM text itself when it does not parse). The audit log records a caller
// that IdentityFromPem refuses by this, never by a name it claims.
std::string CertificateFingerprint(const std::string& pem);

// What a peer's certificate makes of it: its principal, or why it has none
// together with the certificate's fingerprint. A value type.
struct PeerIdentity {
  absl::StatusOr<std::string> principal;
  std::string fingerprint;  // set only when `principal` is an error
};

// IdentityFromPem (and CertificateFingerprint for refused certificates) with
// a bounded cache: a connection's certificate is the same for every call on
// it. Thread-safe.
class IdentityCache {
 public:
  PeerIdentity Lookup(absl::string_view pem);

 private:
  static constexpr size_t kMaxEntries = 4096;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, PeerIdentity> cache_ ABSL_GUARDED_BY(mu_);
};

}  // namespace custos::server

#endif  // CUSTOS_KMS_SERVER_IDENTITY_H_
