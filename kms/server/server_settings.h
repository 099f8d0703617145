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

// Reads the files the config names; errors name the field.
absl::StatusOr<TlsMaterial> ReadTlsMaterial(const Config::Tls& tls);

// Server credentials that require and verify a client certificate.
std::shared_ptr<grpc::ServerCredentials> MutualTlsCredentials(
    const TlsMaterial& tls);

// Message size and stream limits, and no port sharing, applied to every
// custosd listener.
void ApplyLimits(const Config::Limits& limits, grpc::ServerBuilder* builder);

}  // namespace custos::server

#endif  // CUSTOS_KMS_SERVER_SERVER_SETTINGS_H_
