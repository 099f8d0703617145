#include "kms/server/metrics_http.h"

#include <civetweb.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace custos::server {
namespace {

constexpr char kContentType[] = "text/plain; version=0.0.4; charset=utf-8";

// civetweb's own messages (bad requests, socket errors) go to our log, not
// to stderr.
int LogMessage(const mg_connection*, const char* message) {
  spdlog::warn("metrics_listen: {}", message);
  return 1;
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& listen, const metrics::Registry* registry) {
  // Once per process, before any context (civetweb 1.15); never undone, as
  // the library lives as long as the process.
  static const unsigned initialized = mg_init_library(0);
  (void)initialized;
  std::unique_ptr<MetricsHttpServer> server(new MetricsHttpServer(registry));
  // No document_root: civetweb serves no files, and answers 404 to every
  // path without a handler.
  const char* options[] = {"listening_ports",
                           listen.c_str(),
                           "num_threads",
                           "2",
                           "request_timeout_ms",
                           "10000",
                           "enable_keep_alive",
                           "no",
                           nullptr};
  mg_callbacks callbacks = {};
  callbacks.log_message = &LogMessage;
  mg_init_data init = {};
  init.callbacks = &callbacks;
  init.user_data = server.get();
  init.configuration_options = options;
  char error_text[256] = "";
  unsigned error_code = 0;
  mg_error_data error = {};
  error.code = &error_code;
  error.text = error_text;
  error.text_buffer_size = sizeof(error_text);
  server->context_ = mg_start2(&init, &error);
  if (server->context_ == nullptr) {
    return absl::UnavailableError(absl::StrCat(
        "metrics_listen: cannot serve HTTP on ", listen, " (", error_text,
        "): address in use, or not an address of this host?"));
  }
  mg_set_request_handler(server->context_, "/metrics",
                         &MetricsHttpServer::HandleMetrics, server.get());
  mg_server_port ports[1] = {};
  if (mg_get_server_ports(server->context_, 1, ports) >= 1) {
    server->port_ = ports[0].port;
  }
  return server;
}

MetricsHttpServer::~MetricsHttpServer() {
  if (context_ != nullptr) mg_stop(context_);  // joins its threads
}

int MetricsHttpServer::HandleMetrics(mg_connection* connection, void* self) {
  const mg_request_info* info = mg_get_request_info(connection);
  // The handler also receives /metrics/<anything>.
  if (info->local_uri == nullptr ||
      std::strcmp(info->local_uri, "/metrics") != 0) {
    mg_send_http_error(connection, 404, "%s",
                       "Not found: the metrics are at /metrics\n");
    return 404;
  }
  const bool head = std::strcmp(info->request_method, "HEAD") == 0;
  if (!head && std::strcmp(info->request_method, "GET") != 0) {
    mg_response_header_start(connection, 405);
    mg_response_header_add(connection, "Allow", "GET, HEAD", -1);
    mg_response_header_add(connection, "Content-Length", "0", -1);
    mg_response_header_send(connection);
    return 405;
  }
  const std::string body =
      static_cast<MetricsHttpServer*>(self)->registry_->Render();
  mg_send_http_ok(connection, kContentType,
                  static_cast<long long>(body.size()));
  if (!head) mg_write(connection, body.data(), body.size());
  return 200;
}

}  // namespace custos::server
