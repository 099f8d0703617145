// ECDSA P-256 helpers built on OpenSSL, for the public half of keys whose
// private half lives in the HSM: export a PKCS#11 CKA_EC_POINT as PEM and
// verify raw r||s signatures (the form PKCS#11 CKM_ECDSA returns). Stateless
// and thread-safe.
#ifndef CUSTOS_COMMON_P256_H_
#define CUSTOS_COMMON_P256_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace custos {

inline constexpr size_t kP256RawSignatureSize = 64;  // r || s, 32 bytes each

// SHA-256 of `data`, 32 raw bytes.
std::string Sha256(absl::string_view data);

// Converts a CKA_EC_POINT value (a DER OCTET STRING holding an uncompressed
// P-256 point, 67 bytes) into a SubjectPublicKeyInfo PEM.
absl::StatusOr<std::string> P256PublicKeyPemFromEcPoint(
    absl::string_view ec_point_der);

// Verifies a raw r||s ECDSA signature over SHA-256(message) with a P-256
// public key in PEM. OK when valid; INVALID_ARGUMENT otherwise.
absl::Status VerifyP256Signature(absl::string_view public_key_pem,
                                 absl::string_view message,
                                 absl::string_view raw_signature);

}  // namespace custos

#endif  // CUSTOS_COMMON_P256_H_
