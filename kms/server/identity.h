// Who is calling: the identity of a verified client certificate.
//
// gRPC has already verified the chain to the configured client CA (and the
// validity period). On top of that Custos requires the clientAuth extended
// key usage and refuses CA certificates used as client leaves (SECURITY.md,
// threat 4). The identity is the first SAN URI (e.g. spiffe://...), else the
// first DNS SAN, else the subject CN. Thread-safe.
#ifndef CUSTOS_KMS_SERVER_IDENTITY_H_
#define CUSTOS_KMS_SERVER_IDENTITY_H_

#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace custos::server {

// Extracts and checks the identity of a PEM client certificate.
// UNAUTHENTICATED with the reason when the certificate is not acceptable.
absl::StatusOr<std::string> IdentityFromPem(const std::string& pem);

// IdentityFromPem with a bounded cache: a connection's certificate is the
// same for every call on it.
class IdentityCache {
 public:
  absl::StatusOr<std::string> Lookup(absl::string_view pem);

 private:
  static constexpr size_t kMaxEntries = 4096;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, absl::StatusOr<std::string>> cache_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace custos::server

#endif  // CUSTOS_KMS_SERVER_IDENTITY_H_
