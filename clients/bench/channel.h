// Mutual-TLS channels for custos-bench. Stateless.
#ifndef CUSTOS_CLIENTS_BENCH_CHANNEL_H_
#define CUSTOS_CLIENTS_BENCH_CHANNEL_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace custos::bench {

struct TlsFiles {
  std::string ca, cert, key;  // paths, PEM
};

// A connected channel to `address`. Channels with different `index` get
// their own connection (gRPC would otherwise share one subchannel).
absl::StatusOr<std::shared_ptr<grpc::Channel>> ConnectChannel(
    const std::string& address, const TlsFiles& tls, int index);

}  // namespace custos::bench

#endif  // CUSTOS_CLIENTS_BENCH_CHANNEL_H_
