// MetricsHttpServer: serves a metrics::Registry over plain HTTP with
// civetweb (Debian's libcivetweb-dev). GET (or HEAD) /metrics answers the
// Prometheus text format 0.0.4; other methods on /metrics get 405, every
// other path 404. No files are served, no TLS, no authentication: bind it
// to a loopback or otherwise private address (config `metrics_listen`).
//
// Owns one civetweb context with two worker threads (scrapes are rare).
// Only kms/server depends on civetweb. Thread-safe; stops serving, waiting
// for scrapes in progress, on destruction.
#ifndef CUSTOS_KMS_SERVER_METRICS_HTTP_H_
#define CUSTOS_KMS_SERVER_METRICS_HTTP_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/metrics.h"

struct mg_context;
struct mg_connection;

namespace custos::server {

class MetricsHttpServer {
 public:
  // Listens on `listen` ("IPv4:port", e.g. "127.0.0.1:9464"); UNAVAILABLE
  // if it cannot (address in use, not an address of this host).
  // `registry` must outlive the server.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& listen, const metrics::Registry* registry);
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // The port bound (useful with port 0).
  int port() const { return port_; }

 private:
  explicit MetricsHttpServer(const metrics::Registry* registry)
      : registry_(registry) {}
  static int HandleMetrics(mg_connection* connection, void* self);

  const metrics::Registry* const registry_;
  mg_context* context_ = nullptr;
  int port_ = 0;
};

}  // namespace custos::server

#endif  // CUSTOS_KMS_SERVER_METRICS_HTTP_H_
