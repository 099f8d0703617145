// custosd: the Custos key management server.
//
//   custosd --config /etc/custos/custos.yaml --init   (once per deployment
//                                                      and node)
//   custosd --config /etc/custos/custos.yaml
//
// --init creates the database (never made otherwise), binds it to the HSM
// token (kms/deployment.h) and makes the node's audit signing key, then
// exits. Start-up: read the config (errors name the field), forbid core
// dumps, open the database (it must exist), load the PKCS#11 module and log
// in, check that the database and the token are a pair, open the audit log
// with the node's existing signing key, then
// serve gRPC over mutual TLS (plus health checking and reflection) until
// SIGTERM or SIGINT, when it stops accepting calls, drains the ones in
// flight, and closes the HSM. The reconciliation of the HSM with the
// database, which reads every object on the token, runs in the background
// once serving has begun.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <thread>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "CLI/CLI.hpp"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/logging.h"
#include "common/metrics.h"
#include "common/status_macros.h"
#include "hsm/hsm.h"
#include "hsm/module.h"
#include "kms/audit/audit_log.h"
#include "kms/audit/audit_reader.h"
#include "kms/audit/checkpoint.h"
#include "kms/audit_api.h"
#include "kms/authorizer.h"
#include "kms/deployment.h"
#include "kms/key_registry.h"
#include "kms/key_service.h"
#include "kms/server/audit_handler.h"
#include "kms/server/background.h"
#include "kms/server/config.h"
#include "kms/server/handlers.h"
#include "kms/server/metrics_http.h"
#include "kms/server/rpc_metrics.h"
#include "kms/server/rpc_support.h"
#include "kms/server/server_settings.h"
#include "kms/store/store.h"

namespace custos::server {
namespace {

// custosd-test (CMake target of the same name) is this program built for the
// tests: only it accepts the config's `testing:` section.
#ifdef CUSTOS_TEST_BUILD
constexpr bool kTestBuild = true;
#else
constexpr bool kTestBuild = false;
#endif

void ForbidCoreDumps() {
  // Key material passes through this process's memory (data keys): it must
  // never land in a core file (docs/security.md, threat 5).
  struct rlimit none = {0, 0};
  setrlimit(RLIMIT_CORE, &none);
  prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
}

absl::Status WritePublicKey(const Config& config, const std::string& pem) {
  mkdir(config.audit_dir.c_str(), 0700);
  const std::string path = absl::StrCat(config.audit_dir, "/audit-public-key-",
                                        config.node_id, ".pem");
  std::ofstream out(path, std::ios::trunc);
  out << pem;
  out.close();
  if (!out) {
    return absl::UnavailableError(
        absl::StrCat("audit_dir: cannot write ", path));
  }
  spdlog::info("audit: checkpoint key {} (public key in {})",
               kms::PublicKeyFingerprint(pem), path);
  return absl::OkStatus();
}

void SetUpLogging(const std::string& level) {
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%fZ %l custosd %v",
                      spdlog::pattern_time_type::utc);
  spdlog::set_level(spdlog::level::from_str(level));
}

absl::StatusOr<std::unique_ptr<hsm::Hsm>> OpenHsm(
    const Config& config, const hsm::Module& module, bool shared_token,
    metrics::Registry* metric_registry) {
  hsm::Hsm::Options hsm_options;
  hsm_options.token_label = config.hsm.token_label;
  hsm_options.pin_file = config.hsm.pin_file;
  hsm_options.pool.size = config.hsm.pool_size;
  hsm_options.pool.call_timeout = config.hsm.call_timeout;
  hsm_options.pool.lease_timeout = config.hsm.lease_timeout;
  hsm_options.pool.max_abandoned = config.hsm.pool_size;
  hsm_options.metrics = metric_registry;
  // Replicas share the token (see Hsm::Options::shared_token).
  hsm_options.shared_token = shared_token;
  absl::StatusOr<std::unique_ptr<hsm::Hsm>> hsm =
      hsm::Hsm::Open(module, hsm_options);
  if (!hsm.ok()) {
    return absl::Status(hsm.status().code(),
                        absl::StrCat("hsm: ", hsm.status().message()));
  }
  return hsm;
}

absl::StatusOr<std::unique_ptr<hsm::Module>> LoadModule(const Config& config) {
  absl::StatusOr<std::unique_ptr<hsm::Module>> module =
      hsm::Module::Load(config.hsm.module);
  if (!module.ok()) {
    return absl::Status(
        module.status().code(),
        absl::StrCat("hsm.module: ", module.status().message()));
  }
  return module;
}

// Whether the node has audit segments in its audit directory.
bool NodeHasAuditLog(const Config& config) {
  std::error_code ec;
  const std::string prefix = absl::StrCat("audit-", config.node_id, "-");
  for (const auto& entry :
       std::filesystem::directory_iterator(config.audit_dir, ec)) {
    // audit-<node>-<first seq, 20 digits>.jsonl, exactly (node "a" must
    // not take node "a-b"'s segments for its own).
    const std::string name = entry.path().filename().string();
    if (!absl::StartsWith(name, prefix) || !absl::EndsWith(name, ".jsonl")) {
      continue;
    }
    const std::string seq =
        name.substr(prefix.size(), name.size() - prefix.size() - 6);
    if (seq.size() == 20 &&
        seq.find_first_not_of("0123456789") == std::string::npos) {
      return true;
    }
  }
  return false;
}

// custosd --init: see the file comment. Idempotent: a second run on an
// initialised node changes nothing and says so.
absl::Status Init(const std::string& config_path) {
  CUSTOS_ASSIGN_OR_RETURN(
      Config config,
      LoadConfig(config_path, ParseOptions{.allow_testing = kTestBuild}));
  SetUpLogging(config.log_level);
  ForbidCoreDumps();
  CUSTOS_ASSIGN_OR_RETURN(
      std::unique_ptr<kms::Store> store,
      kms::OpenStore(config.storage, kms::OpenMode::kCreate));
  CUSTOS_ASSIGN_OR_RETURN(std::unique_ptr<hsm::Module> module,
                          LoadModule(config));
  CUSTOS_ASSIGN_OR_RETURN(
      std::unique_ptr<hsm::Hsm> hsm,
      OpenHsm(config, *module, store->Shared(), /*metric_registry=*/nullptr));
  CUSTOS_ASSIGN_OR_RETURN(kms::InitOutcome outcome,
                          kms::InitDeployment(*store, *hsm, absl::Now()));
  // A node whose audit log exists keeps the key that signed it: a new one
  // would vouch for a rewritten history as well as for the real one.
  absl::StatusOr<std::unique_ptr<kms::HsmAuditSigner>> signer =
      kms::HsmAuditSigner::Open(hsm.get(), config.node_id);
  if (!signer.ok() && absl::IsFailedPrecondition(signer.status()) &&
      NodeHasAuditLog(config)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "init: node ", config.node_id, " has an audit log in ",
        config.audit_dir,
        " but its checkpoint signing key is gone from the token. A new key "
        "is not made for an existing log (it would vouch for a rewritten "
        "history too): restore the token from its backup, or give this "
        "server a new node_id and audit_dir"));
  }
  if (!signer.ok() && absl::IsFailedPrecondition(signer.status())) {
    signer = kms::HsmAuditSigner::Create(hsm.get(), config.node_id);
  }
  CUSTOS_RETURN_IF_ERROR(signer.status());
  CUSTOS_RETURN_IF_ERROR(WritePublicKey(config, (*signer)->public_key_pem()));
  std::cout << (outcome == kms::InitOutcome::kCreated
                    ? "initialised: database "
                    : "already initialised: database ")
            << kms::RedactStorageUrl(config.storage) << " bound to token '"
            << hsm->token().label << "' (serial " << hsm->token().serial
            << "); node " << config.node_id << " signs checkpoints with key "
            << (*signer)->fingerprint() << "\n";
  return absl::OkStatus();
}

absl::Status Run(const std::string& config_path) {
  CUSTOS_ASSIGN_OR_RETURN(
      Config config,
      LoadConfig(config_path, ParseOptions{.allow_testing = kTestBuild}));
  SetUpLogging(config.log_level);
  ForbidCoreDumps();
  spdlog::info("starting node {} with config {}", config.node_id, config_path);
  // The process's one metrics registry, handed to each component; without
  // metrics_listen there is none, and nothing is measured at all.
  std::unique_ptr<metrics::Registry> metric_registry;
  if (!config.metrics_listen.empty()) {
    metric_registry = std::make_unique<metrics::Registry>();
  }

  // Mutual TLS from files re-read while serving (tls.*: certificate
  // rotation and revocation); the files are checked here.
  CUSTOS_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> tls,
                          ServerTlsCredentials(config.tls));

  CUSTOS_ASSIGN_OR_RETURN(
      std::unique_ptr<kms::Store> store,
      kms::OpenStore(config.storage, kms::OpenMode::kExisting));
  CUSTOS_ASSIGN_OR_RETURN(std::unique_ptr<hsm::Module> module,
                          LoadModule(config));
  CUSTOS_ASSIGN_OR_RETURN(
      std::unique_ptr<hsm::Hsm> hsm,
      OpenHsm(config, *module, store->Shared(), metric_registry.get()));
  spdlog::info("HSM: token '{}' (serial {}) via {}, {} sessions",
               config.hsm.token_label, hsm->token().serial, config.hsm.module,
               config.hsm.pool_size);
  // Before anything reads keys or reconciles: the database and the token
  // must be a pair.
  CUSTOS_RETURN_IF_ERROR(kms::CheckDeployment(*store, *hsm));
  CUSTOS_ASSIGN_OR_RETURN(std::unique_ptr<kms::KeyRegistry> registry,
                          kms::KeyRegistry::Load(store.get()));
  spdlog::info("storage: {} (schema {}), {} keys",
               kms::RedactStorageUrl(config.storage), store->SchemaVersion(),
               registry->size());
  metrics::CallbackHandle key_metrics;  // custos_keys{state}
  if (metric_registry != nullptr) {
    CUSTOS_ASSIGN_OR_RETURN(key_metrics,
                            registry->ExportMetrics(*metric_registry));
  }

  // The checkpoint signing key lives in the HSM; its public half is written
  // beside the segments for auditors (who should also keep a copy of their
  // own: a key next to the log it vouches for proves nothing by itself).
  CUSTOS_ASSIGN_OR_RETURN(std::unique_ptr<kms::HsmAuditSigner> signer,
                          kms::HsmAuditSigner::Open(hsm.get(), config.node_id));
  CUSTOS_RETURN_IF_ERROR(WritePublicKey(config, signer->public_key_pem()));
  kms::FileAuditLog::Options audit_options;
  audit_options.dir = config.audit_dir;
  audit_options.node_id = config.node_id;
  audit_options.signer = signer.get();
  audit_options.checkpoint_every = config.audit_checkpoint_every;
  audit_options.checkpoint_interval = config.audit_checkpoint_interval;
  audit_options.max_segment_bytes = config.audit_max_segment_bytes;
  audit_options.max_segment_age = config.audit_max_segment_age;
  audit_options.metrics = metric_registry.get();
  CUSTOS_ASSIGN_OR_RETURN(std::unique_ptr<kms::FileAuditLog> audit,
                          kms::FileAuditLog::Open(audit_options));
  spdlog::info("audit: appending to {}", audit->segment_path());

  kms::Authorizer authorizer(kms::Roles{config.admins, config.auditors});
  kms::KeyService::Options service_options;
  service_options.encryption_limit = config.encryption_limit;
  service_options.deletion_day = config.testing.deletion_day;
  service_options.min_rotation_period = config.testing.min_rotation_period;
  // Replicas may hold an HSM object generated but not yet committed.
  if (store->Shared()) service_options.orphan_grace = absl::Minutes(10);
  kms::KeyService service(service_options, hsm.get(), registry.get(),
                          audit.get(), &authorizer);
  metrics::CallbackHandle quarantine_metric;
  if (metric_registry != nullptr) {
    CUSTOS_ASSIGN_OR_RETURN(
        quarantine_metric,
        metric_registry->AddCallback(
            "custos_hsm_quarantined_objects",
            "Custos HSM objects that no database row names, found by the "
            "last reconciliation: kept, never destroyed automatically.",
            metrics::Registry::Type::kGauge, {}, [&service] {
              return std::vector<metrics::Sample>{
                  {{}, static_cast<double>(service.quarantined_objects())}};
            }));
  }

  kms::AuditReader audit_reader(config.audit_dir, config.node_id);
  kms::AuditApi audit_api(&audit_reader, audit.get(), &authorizer,
                          signer.get());

  std::unique_ptr<RateLimiter> rate_limiter;  // per principal, if set
  if (config.limits.requests_per_second_per_principal > 0) {
    rate_limiter = std::make_unique<RateLimiter>(RateLimiter::Options{
        .requests_per_second = config.limits.requests_per_second_per_principal,
        .burst = static_cast<double>(config.limits.burst_per_principal)});
  }
  CallerResolver tls_callers("", rate_limiter.get());
  CallerResolver dev_callers(config.development.insecure_principal,
                             rate_limiter.get());
  KeyManagementHandler kms_handler(&service, &tls_callers);
  CryptoHandler crypto_handler(&service, &tls_callers);
  AuditHandler audit_handler(&audit_api, &tls_callers);
  KeyManagementHandler dev_kms_handler(&service, &dev_callers);
  CryptoHandler dev_crypto_handler(&service, &dev_callers);

  std::unique_ptr<RpcMetrics> rpc_metrics;  // outlives the servers
  if (metric_registry != nullptr) {
    CUSTOS_ASSIGN_OR_RETURN(
        rpc_metrics,
        RpcMetrics::Create(*metric_registry,
                           {pb::KeyManagementService::service_full_name(),
                            pb::CryptoService::service_full_name(),
                            pb::AuditService::service_full_name()}));
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int bound_port = 0;
  builder.AddListeningPort(config.listen, tls, &bound_port);
  builder.RegisterService(&kms_handler);
  builder.RegisterService(&crypto_handler);
  builder.RegisterService(&audit_handler);
  ApplyLimits(config.limits, &builder);
  if (rpc_metrics != nullptr) rpc_metrics->InstallOn(&builder);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || bound_port == 0) {
    return absl::UnavailableError(
        absl::StrCat("listen: cannot serve on ", config.listen,
                     " (address in use, or not an address of this host?)"));
  }
  std::unique_ptr<grpc::Server> dev_server;
  if (!config.development.insecure_listen.empty()) {
    spdlog::warn(
        "development.insecure_listen: serving PLAINTEXT on {} where every "
        "call acts as '{}'. Never do this outside development.",
        config.development.insecure_listen,
        config.development.insecure_principal);
    grpc::ServerBuilder dev_builder;
    dev_builder.AddListeningPort(config.development.insecure_listen,
                                 grpc::InsecureServerCredentials());
    dev_builder.RegisterService(&dev_kms_handler);
    dev_builder.RegisterService(&dev_crypto_handler);
    ApplyLimits(config.limits, &dev_builder);
    if (rpc_metrics != nullptr) rpc_metrics->InstallOn(&dev_builder);
    dev_server = dev_builder.BuildAndStart();
    if (dev_server == nullptr) {
      return absl::UnavailableError(
          absl::StrCat("development.insecure_listen: cannot serve on ",
                       config.development.insecure_listen));
    }
  }
  spdlog::info("serving mutual TLS on {}", config.listen);
  std::unique_ptr<MetricsHttpServer> metrics_http;  // stops first
  if (metric_registry != nullptr) {
    CUSTOS_ASSIGN_OR_RETURN(
        metrics_http,
        MetricsHttpServer::Start(config.metrics_listen, metric_registry.get()));
    if (!absl::StartsWith(config.metrics_listen, "127.")) {
      spdlog::warn(
          "metrics_listen: {} is not a loopback address; /metrics has no "
          "TLS and no authentication",
          config.metrics_listen);
    }
    spdlog::info("serving metrics on http://{}/metrics", config.metrics_listen);
  }

  // Background work: reconciliation, scheduled rotations and deletions
  // (on one replica at a time when the store is shared), and other
  // replicas' changes.
  BackgroundWork::Options background_options;
  background_options.interval = config.maintenance_interval;
  BackgroundWork background(background_options, &service, registry.get(),
                            store.get());
  CUSTOS_RETURN_IF_ERROR(background.Start());

  // Wait for SIGTERM/SIGINT (blocked in every thread, taken here).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  int signal_number = 0;
  sigwait(&signals, &signal_number);
  spdlog::info("signal {}: draining calls and shutting down", signal_number);
  audit_handler.Stop();  // ends open StreamAuditEvents calls
  const auto deadline =
      std::chrono::system_clock::now() + std::chrono::seconds(10);
  server->Shutdown(deadline);
  if (dev_server) dev_server->Shutdown(deadline);
  // After the calls have drained: the change feed keeps this replica's keys
  // fresh (usable) while they do; then waits for a pass under way.
  background.Stop();
  server->Wait();
  spdlog::info("stopped");
  return absl::OkStatus();
}

}  // namespace
}  // namespace custos::server

int main(int argc, char** argv) {
  // Block the stop signals before any thread starts, so that only the main
  // thread's sigwait receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);
  // Debian's abseil checks every Mutex acquisition for lock-order cycles,
  // under one global lock: a measurable cost on the request path (seen in
  // perf). The tests keep the check on.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);

  CLI::App app{
      "custosd: the Custos key management server.\n"
      "Example: custosd --config /etc/custos/custos.yaml"};
  std::string config;
  bool init = false;
  app.add_option("--config", config, "YAML configuration file")->required();
  app.add_flag("--init", init,
               "Create the database, bind it to the HSM token and make this "
               "node's audit signing key, then exit (once per deployment and "
               "node; a second run changes nothing)");
  app.set_version_flag("--version", "custosd 0.1.0");
  CLI11_PARSE(app, argc, argv);
  absl::Status s =
      init ? custos::server::Init(config) : custos::server::Run(config);
  if (!s.ok()) {
    spdlog::critical("{}", s.message());
    std::cerr << "custosd: " << s.message() << "\n";
    return 1;
  }
  return 0;
}
