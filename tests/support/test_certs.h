// A certificate factory for tests: P-256 CAs, client and server leaves, CA
// leaves and self-signed look-alikes, and CRLs, built in memory with the
// OpenSSL 3 API (no `openssl` command). Every certificate is X.509 v3 with a
// random 127-bit serial, subject and authority key identifiers, and a SHA-256
// ECDSA signature. Keys are PKCS#8 PEM. Pure functions; thread-safe.
#ifndef CUSTOS_TESTS_SUPPORT_TEST_CERTS_H_
#define CUSTOS_TESTS_SUPPORT_TEST_CERTS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace custos::testing {

struct KeyAndCert {
  std::string key_pem;
  std::string cert_pem;
};

struct CertSpec {
  // Subject CN; empty: the subject has no CN at all.
  std::string common_name = "client";
  std::vector<std::string> uris;                // SAN URIs
  std::vector<std::string> dns_names;           // SAN DNS names
  std::vector<std::string> ips;                 // SAN IPs (server certs)
  absl::Duration not_before = -absl::Hours(1);  // relative to now
  absl::Duration not_after = absl::Hours(24);   // relative to now
  // basicConstraints CA:TRUE with keyCertSign/cRLSign; otherwise CA:FALSE
  // with digitalSignature.
  bool is_ca = false;
  bool client_auth = true;   // EKU clientAuth
  bool server_auth = false;  // EKU serverAuth
  bool include_eku = true;   // false: no EKU extension at all
};

// A self-signed P-256 CA, valid from an hour ago for ten years.
absl::StatusOr<KeyAndCert> MakeCa(const std::string& common_name);
// A P-256 leaf (or CA when spec.is_ca) signed by `issuer`.
absl::StatusOr<KeyAndCert> MakeCert(const KeyAndCert& issuer,
                                    const CertSpec& spec);
// A self-signed leaf that copies `spec` (a look-alike of a real client,
// unknown CA).
absl::StatusOr<KeyAndCert> MakeSelfSigned(const CertSpec& spec);

// A version 2 CRL signed by `issuer` that revokes the certificates
// `revoked_cert_pems` (by serial number; reason unspecified), issued an hour
// ago and due again at now + `next_update` (negative: already overdue). PEM.
absl::StatusOr<std::string> MakeCrl(
    const KeyAndCert& issuer, const std::vector<std::string>& revoked_cert_pems,
    absl::Duration next_update = absl::Hours(24 * 7));
// The DER form of a PEM CRL.
absl::StatusOr<std::string> CrlPemToDer(const std::string& crl_pem);
// A PEM certificate's serial number in upper-case hex, e.g. "1A2B...".
absl::StatusOr<std::string> SerialHex(const std::string& cert_pem);

}  // namespace custos::testing

#endif  // CUSTOS_TESTS_SUPPORT_TEST_CERTS_H_
