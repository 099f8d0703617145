// The gRPC server settings of custosd in one place: mutual TLS credentials
// and the limits every listener gets. custos-bench's baseline servers use
// the same functions, so a baseline measures the same transport. Stateless.
#ifndef CUSTOS_KMS_SERVER_SERVER_SETTINGS_H_
#define CUSTOS_KMS_SERVER_SERVER_SETTINGS_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kms/server/config.h"

namespace custos::server {

// PEM contents of the files named by `tls.*` in the config.
struct TlsMaterial {
  std::string cert;
  std::string key;
  std::string client_ca;
};

// Reads the files the config names and checks them: a certificate chain, a
// private key that belongs to its first certificate, and at least one CA
// certificate. Errors name the field and the fix.
absl::StatusOr<TlsMaterial> ReadTlsMaterial(const Config::Tls& tls);

// Server credentials that require and verify a client certificate (TLS 1.2
// or 1.3). gRPC's FileWatcherCertificateProvider re-reads tls.cert, tls.key
// and tls.client_ca every tls.reload_interval_seconds, and new connections
// use what it read. With tls.crl_dir, every handshake's client certificate
// is also checked against the CRLs there, re-read as often (see
// revocation.h). Checks the files first (ReadTlsMaterial); errors name the
// field.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerTlsCredentials(
    const Config::Tls& tls);

// Message size and stream limits, the maximum connection age, and no port
// sharing, applied to every custosd listener.
void ApplyLimits(const Config::Limits& limits, grpc::ServerBuilder* builder);

}  // namespace custos::server

#endif  // CUSTOS_KMS_SERVER_SERVER_SETTINGS_H_
