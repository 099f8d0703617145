// The two baseline servers of custos-bench, built with custosd's own gRPC
// and TLS settings (kms/server/server_settings.h) from the same config file:
//   kPlain: Echo returns the payload (the cost of gRPC + mutual TLS);
//   kHsm:   Echo encrypts the payload once with AES-256-GCM in the HSM
//           through hsm/ (the ceiling a KMS call can reach on this HSM).
// Both use the callback API, as custosd does.
#ifndef CUSTOS_CLIENTS_BENCH_ECHO_SERVER_H_
#define CUSTOS_CLIENTS_BENCH_ECHO_SERVER_H_

#include <string>

#include "absl/status/status.h"
#include "kms/server/config.h"

namespace custos::bench {

enum class EchoMode { kPlain, kHsm };

// Serves on `listen` (or the config's listen address when empty) until
// SIGTERM or SIGINT. With kHsm it creates a throwaway AES key on the
// config's token and destroys it on the way out.
absl::Status ServeEcho(const server::Config& config, const std::string& listen,
                       EchoMode mode);

}  // namespace custos::bench

#endif  // CUSTOS_CLIENTS_BENCH_ECHO_SERVER_H_
