// CustosdProcess: a real custosd for end-to-end tests. Start() makes a
// development environment with scripts/dev-env (PKI, SoftHSM2 token,
// config) in a temporary directory, picks a free loopback port, and runs
// build/bin/custosd-test (custosd built to accept the config's `testing:`
// section) on it; the test talks to it over mutual TLS with the
// environment's client certificates. Not thread-safe (one test thread
// drives it); the channels it hands out are.
#ifndef CUSTOS_TESTS_SUPPORT_CUSTOSD_PROCESS_H_
#define CUSTOS_TESTS_SUPPORT_CUSTOSD_PROCESS_H_

#include <grpcpp/grpcpp.h>
#include <sys/types.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "custos/v1/kms.grpc.pb.h"
#include "tests/support/subprocess.h"

namespace custos::testing {

class CustosdProcess {
 public:
  struct Options {
    // YAML appended to the generated custos.yaml (top-level keys).
    std::string extra_config;
    // Replaces hsm.module (e.g. the fault-injecting module).
    std::string hsm_module;
    // More settings under `hsm:`, one "name: value" per line.
    std::vector<std::string> hsm_settings;
    // More settings under `tls:`, one "name: value" per line (e.g.
    // "crl_dir: /path").
    std::vector<std::string> tls_settings;
    // Extra environment for the server process.
    std::vector<std::pair<std::string, std::string>> env;
    // The directory of the SQLite database (custos.db), instead of
    // DIR/data; e.g. a file system the test mounts. Must exist.
    std::string storage_dir;
    // The audit directory, instead of DIR/data/audit.
    std::string audit_dir;
    // Serve Prometheus metrics on a free loopback port (metrics_listen);
    // metrics_address() names it.
    bool metrics = false;
    // Replaces the storage URL (e.g. a PostgreSQL database's).
    std::string storage_url;
    // Replaces node_id (required by StartReplica).
    std::string node_id;
    // Start without running `custosd --init` first (the database then
    // exists only if the test made it).
    bool skip_init = false;
  };

  static absl::StatusOr<std::unique_ptr<CustosdProcess>> Start(Options options);
  // Another custosd on `first`'s environment (its PKI, SoftHSM2 token and
  // PIN) and its config, with its own node_id, port, audit directory
  // (DIR/data/audit-NODE unless options.audit_dir), config file and log.
  // With a shared storage_url the two are replicas. `first` must outlive
  // it.
  static absl::StatusOr<std::unique_ptr<CustosdProcess>> StartReplica(
      const CustosdProcess& first, Options options);
  // Stops the server (SIGTERM) if it runs and removes the directory.
  ~CustosdProcess();

  // Starts the server again on the same directory and port.
  absl::Status Restart();
  // Runs `custosd --config CONFIG ARGS...` to completion in the server's
  // environment (SOFTHSM2_CONF, Options::env), e.g. {"--init"}.
  ProcessResult RunCustosd(const std::vector<std::string>& args) const;
  // Starts the server once without waiting for it to serve, and returns
  // how it exited: for start-ups that must fail.
  ProcessResult StartExpectingFailure() const;
  // Sends `signal` and waits for the process to end.
  void Kill(int signal);
  // SIGTERM, then waits; an error if it did not exit cleanly.
  absl::Status Stop();
  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

  // A channel authenticated as one of the dev-env identities: "admin",
  // "auditor", "service-a", "service-b".
  std::shared_ptr<grpc::Channel> Channel(const std::string& identity) const;
  // A channel with any client key and certificate (PEM), or none.
  std::shared_ptr<grpc::Channel> ChannelWith(const std::string& key_pem,
                                             const std::string& cert_pem) const;

  const std::string& dir() const { return dir_; }
  const std::string& address() const { return address_; }
  // "127.0.0.1:port" of GET /metrics, or empty without Options::metrics.
  const std::string& metrics_address() const { return metrics_address_; }
  std::string log_path() const { return dir_ + "/custosd" + suffix_ + ".log"; }
  std::string config_path() const {
    return dir_ + "/custos" + suffix_ + ".yaml";
  }
  std::string audit_dir() const {
    return options_.audit_dir.empty() ? dir_ + "/data/audit" + suffix_
                                      : options_.audit_dir;
  }
  std::string database_path() const {
    return (options_.storage_dir.empty() ? dir_ + "/data"
                                         : options_.storage_dir) +
           "/custos.db";
  }
  std::string softhsm_conf() const { return dir_ + "/softhsm/softhsm2.conf"; }
  std::string pin_file() const { return dir_ + "/user.pin"; }
  std::string ReadPki(const std::string& file) const;
  // Creates a key as "admin" whose policy lets the dev-env identity `user`
  // do `operations`; returns its id.
  absl::StatusOr<std::string> CreateKeyFor(
      const std::string& user,
      const std::vector<custos::v1::KeyOperation>& operations) const;

  // Runs `custos audit verify` offline on this server's audit directory
  // (code 0: every chain intact).
  ProcessResult VerifyAuditLog() const;

  // The principal of a dev-env identity, e.g. spiffe://custos.test/admin.
  static std::string Principal(const std::string& identity);

 private:
  CustosdProcess() = default;
  absl::Status Launch();

  Options options_;
  std::string dir_;
  std::string address_;
  std::string metrics_address_;
  // "-NODE" for a replica sharing another's directory (which it does not
  // remove); empty for the process that owns the directory.
  std::string suffix_;
  pid_t pid_ = -1;
};

// The source tree's root (for scripts/) and the binaries' directory.
std::string SourceDir();
std::string BinDir();

}  // namespace custos::testing

#endif  // CUSTOS_TESTS_SUPPORT_CUSTOSD_PROCESS_H_
