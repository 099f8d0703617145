// RpcMetrics: every call custosd serves, counted by method and status code,
// and its latency, recorded in one place: a gRPC server interceptor (gRPC's
// experimental API, stable in practice since 1.20), which sees the status
// each call finishes with whether a callback handler, a synchronous one or
// gRPC itself (message limits, unknown methods) set it. Latency runs from
// the moment gRPC matched the call to a method until its status is sent;
// for a stream, that is the stream's lifetime.
//
// Per call: one small allocation (the interceptor), a hash lookup of the
// method, two clock reads, and the atomic adds of a counter and a histogram.
// Methods outside the services named at creation count as service and
// method "unknown", so that no client can grow the label sets. Thread-safe.
#ifndef CUSTOS_KMS_SERVER_RPC_METRICS_H_
#define CUSTOS_KMS_SERVER_RPC_METRICS_H_

#include <grpcpp/server_builder.h>
#include <grpcpp/support/server_interceptor.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "common/metrics.h"

namespace custos::server {

class RpcMetrics {
 public:
  // The metrics of one method: custos_rpc_requests_total{service,method,
  // code} and custos_rpc_duration_seconds{service,method}, made on first
  // use. Thread-safe.
  struct Method {
    Method(metrics::Family<metrics::Counter>* requests,
           metrics::Family<metrics::Histogram>* durations,
           const std::string& service, const std::string& method)
        : codes(requests, {service, method}),
          duration(durations, {service, method}) {}
    metrics::CodeCounters codes;
    metrics::LazyChild<metrics::Histogram> duration;
  };

  // Registers the metrics in `registry`; `services` are full service names
  // ("custos.v1.CryptoService") whose methods are found in the protobuf
  // generated pool; gRPC's health and reflection services are always
  // known. NOT_FOUND for a service the pool does not have.
  static absl::StatusOr<std::unique_ptr<RpcMetrics>> Create(
      metrics::Registry& registry, const std::vector<std::string>& services);
  RpcMetrics(const RpcMetrics&) = delete;
  RpcMetrics& operator=(const RpcMetrics&) = delete;

  // Makes every server `builder` builds record its calls here (replacing
  // interceptors set before). `this` must outlive those servers.
  void InstallOn(grpc::ServerBuilder* builder);

  // The metrics of `path` ("/package.Service/Method"), or of "unknown".
  Method& ForPath(absl::string_view path);

 private:
  RpcMetrics() = default;

  // Immutable after Create: read without a lock.
  absl::flat_hash_map<std::string, std::unique_ptr<Method>> methods_;
  std::unique_ptr<Method> unknown_;
};

}  // namespace custos::server

#endif  // CUSTOS_KMS_SERVER_RPC_METRICS_H_
