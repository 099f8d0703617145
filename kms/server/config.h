// custosd's configuration, read from one YAML file. Every error names the
// field and the fix; unknown fields are refused (a typo must not silently
// leave a default in place). Secrets are never in this file: the HSM PIN is
// read from `hsm.pin_file`.
#ifndef CUSTOS_KMS_SERVER_CONFIG_H_
#define CUSTOS_KMS_SERVER_CONFIG_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace custos::server {

struct Config {
  std::string node_id = "custos-1";
  std::string listen;  // host:port for mutual TLS (required)
  // IPv4:port for Prometheus metrics over plain HTTP (GET /metrics); a port
  // alone ("9464" or ":9464") means 127.0.0.1:port; empty: no metrics.
  std::string metrics_listen;
  struct Tls {
    std::string cert;       // server certificate chain (PEM)
    std::string key;        // its private key (PEM)
    std::string client_ca;  // CA bundle that client certificates chain to
    // Certificate rotation and revocation (docs/operations.md): CRLs of
    // the client CAs (optional), and how often custosd re-reads these
    // files and cert, key and client_ca (whole seconds: gRPC's file
    // watcher counts in seconds).
    std::string crl_dir;
    int reload_interval_seconds = 5;
  } tls;
  struct Hsm {
    std::string module;
    std::string token_label;
    std::string pin_file;
    int pool_size = 2;
    absl::Duration call_timeout = absl::Seconds(10);
    absl::Duration lease_timeout = absl::Seconds(5);
  } hsm;
  std::string storage;                     // sqlite:///path
  std::string audit_dir;                   // audit segments
  uint64_t audit_checkpoint_every = 1000;  // records between checkpoints
  uint64_t audit_max_segment_bytes = 64ull << 20;          // roll at this size
  absl::Duration audit_max_segment_age = absl::Hours(24);  // or this age
  absl::Duration audit_checkpoint_interval = absl::Seconds(60);
  std::vector<std::string> admins;
  std::vector<std::string> auditors;
  struct Limits {
    int max_message_bytes = 64 * 1024;  // largest request
    int max_concurrent_streams = 256;
    // Connections end at this age (plus the grace for calls in flight), so
    // that a revoked client certificate stops working.
    absl::Duration max_connection_age = absl::Minutes(5);
    absl::Duration max_connection_age_grace = absl::Seconds(30);
    // Per-principal token bucket: requests per second refilled, and the
    // bucket's size. 0: no rate limit (the default; docs/operations.md).
    double requests_per_second_per_principal = 0;
    int burst_per_principal = 0;  // 0: one second's worth (at least 1)
  } limits;
  uint64_t encryption_limit = uint64_t{1} << 30;
  absl::Duration maintenance_interval = absl::Seconds(10);
  std::string log_level = "info";
  // Development only, off unless named: a plaintext listener on a loopback
  // address on which every call acts as `insecure_principal` (a typed
  // principal that is no admin).
  struct Development {
    std::string insecure_listen;
    std::string insecure_principal;
  } development;
  // Test only: shorten the clock of deletion windows and rotation periods.
  // Refused unless ParseOptions::allow_testing (custosd-test, the build the
  // tests run).
  struct Testing {
    absl::Duration deletion_day = absl::Hours(24);
    absl::Duration min_rotation_period = absl::Hours(24);
  } testing;
};

struct ParseOptions {
  // Accept the `testing:` section. Only custosd-test, built for the tests,
  // sets it: the shipped custosd refuses a config that shortens deletion
  // windows.
  bool allow_testing = false;
};

// Parses and validates YAML text. `base_dir` resolves relative paths.
absl::StatusOr<Config> ParseConfig(const std::string& yaml,
                                   const std::string& base_dir,
                                   ParseOptions options = {});
// Reads and parses the file at `path`. A file that cannot be read is
// NOT_FOUND naming the path (the operator's own, at start-up).
absl::StatusOr<Config> LoadConfig(const std::string& path,
                                  ParseOptions options = {});

}  // namespace custos::server

#endif  // CUSTOS_KMS_SERVER_CONFIG_H_
