#include "tests/support/custosd_process.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "tests/support/test_token.h"

namespace custos::testing {
namespace {

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  int port = ntohs(addr.sin_port);
  close(fd);
  return port;
}

// Replaces the one line of `text` that starts with `prefix`.
absl::StatusOr<std::string> ReplaceLine(const std::string& text,
                                        const std::string& prefix,
                                        const std::string& line) {
  size_t at = 0;
  if (text.rfind(prefix, 0) != 0) {
    at = text.find("\n" + prefix);
    if (at != std::string::npos) ++at;
  }
  if (at == std::string::npos) {
    return absl::InternalError("no '" + prefix + "' line in custos.yaml:\n" +
                               text);
  }
  size_t end = text.find('\n', at);
  if (end == std::string::npos) end = text.size();
  return text.substr(0, at) + line + text.substr(end);
}

}  // namespace

std::string SourceDir() { return CUSTOS_SOURCE_DIR; }
std::string BinDir() { return CUSTOS_BIN_DIR; }

absl::StatusOr<std::string> CustosdProcess::CreateKeyFor(
    const std::string& user,
    const std::vector<custos::v1::KeyOperation>& operations) const {
  custos::v1::CreateKeyRequest req;
  custos::v1::PolicyBinding* binding = req.mutable_policy()->add_bindings();
  binding->add_principals(Principal(user));
  for (custos::v1::KeyOperation op : operations) binding->add_operations(op);
  custos::v1::Key key;
  grpc::ClientContext ctx;
  grpc::Status s = custos::v1::KeyManagementService::NewStub(Channel("admin"))
                       ->CreateKey(&ctx, req, &key);
  if (!s.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                        "CreateKey: " + s.error_message());
  }
  return key.key_id();
}

std::string CustosdProcess::Principal(const std::string& identity) {
  if (identity == "admin") return "spiffe://custos.test/admin";
  if (identity == "auditor") return "spiffe://custos.test/auditor";
  if (identity == "service-a") return "spiffe://custos.test/photos/uploader";
  if (identity == "service-b") return "spiffe://custos.test/billing/reader";
  return "";
}

absl::StatusOr<std::unique_ptr<CustosdProcess>> CustosdProcess::Start(
    Options options) {
  std::unique_ptr<CustosdProcess> p(new CustosdProcess());
  p->options_ = std::move(options);
  absl::StatusOr<std::string> dir = MakeTempDir("custos-e2e");
  if (!dir.ok()) return dir.status();
  p->dir_ = *dir;
  const int port = FreePort();
  p->address_ = absl::StrCat("localhost:", port);
  CommandResult env =
      RunCommand(absl::StrCat("CUSTOS_DEV_PORT=", port, " ", SourceDir(),
                              "/scripts/dev-env ", p->dir_, "/env --force"));
  if (env.exit_code != 0) {
    return absl::InternalError("scripts/dev-env failed: " + env.output);
  }
  // dev-env made DIR/env/...; use it as the process directory.
  p->dir_ += "/env";
  std::string config = ReadAll(p->dir_ + "/custos.yaml");
  if (!p->options_.hsm_module.empty()) {
    config =
        absl::StrReplaceAll(config, {{"module: /usr/lib/softhsm/libsofthsm2.so",
                                      "module: " + p->options_.hsm_module}});
  }
  for (const std::string& setting : p->options_.hsm_settings) {
    config = absl::StrReplaceAll(
        config, {{"\n  pool_size:", "\n  " + setting + "\n  pool_size:"}});
  }
  for (const std::string& setting : p->options_.tls_settings) {
    config = absl::StrReplaceAll(config,
                                 {{"\ntls:\n", "\ntls:\n  " + setting + "\n"}});
  }
  // Rewrite the lines (yaml-cpp keeps the first of duplicate keys, so
  // appending them would not do).
  if (!p->options_.storage_dir.empty()) {
    const std::string from =
        "\nstorage: sqlite://" + p->dir_ + "/data/custos.db\n";
    if (config.find(from) == std::string::npos) {
      return absl::InternalError("no storage line in custos.yaml:\n" + config);
    }
    config = absl::StrReplaceAll(
        config, {{from, "\nstorage: sqlite://" + p->database_path() + "\n"}});
  }
  if (!p->options_.audit_dir.empty()) {
    const std::string from = "\naudit_dir: " + p->dir_ + "/data/audit\n";
    if (config.find(from) == std::string::npos) {
      return absl::InternalError("no audit_dir line in custos.yaml:\n" +
                                 config);
    }
    config = absl::StrReplaceAll(
        config, {{from, "\naudit_dir: " + p->audit_dir() + "\n"}});
  }
  if (!p->options_.storage_url.empty()) {
    absl::StatusOr<std::string> rewritten =
        ReplaceLine(config, "storage: ", "storage: " + p->options_.storage_url);
    if (!rewritten.ok()) return rewritten.status();
    config = *std::move(rewritten);
  }
  if (!p->options_.node_id.empty()) {
    absl::StatusOr<std::string> rewritten =
        ReplaceLine(config, "node_id: ", "node_id: " + p->options_.node_id);
    if (!rewritten.ok()) return rewritten.status();
    config = *std::move(rewritten);
  }
  config += "\n" + p->options_.extra_config + "\n";
  if (p->options_.metrics) {
    p->metrics_address_ = absl::StrCat("127.0.0.1:", FreePort());
    config += absl::StrCat("metrics_listen: \"", p->metrics_address_, "\"\n");
  }
  absl::Status written =
      WriteFileAtomically(p->dir_ + "/custos.yaml", config, 0600);
  if (!written.ok()) return written;
  if (!p->options_.skip_init) {
    ProcessResult init = p->RunCustosd({"--init"});
    if (init.code != 0) {
      return absl::InternalError(
          absl::StrCat("custosd --init failed: ", init.out, init.err));
    }
  }
  absl::Status launched = p->Launch();
  if (!launched.ok()) return launched;
  return p;
}

absl::StatusOr<std::unique_ptr<CustosdProcess>> CustosdProcess::StartReplica(
    const CustosdProcess& first, Options options) {
  if (options.node_id.empty()) {
    return absl::InvalidArgumentError("StartReplica needs options.node_id");
  }
  std::unique_ptr<CustosdProcess> p(new CustosdProcess());
  p->options_ = std::move(options);
  p->dir_ = first.dir_;
  p->suffix_ = "-" + p->options_.node_id;
  const int port = FreePort();
  p->address_ = absl::StrCat("localhost:", port);
  std::string config = ReadAll(first.config_path());
  const std::vector<std::pair<std::string, std::string>> lines = {
      {"node_id: ", "node_id: " + p->options_.node_id},
      {"listen: ", absl::StrCat("listen: \"127.0.0.1:", port, "\"")},
      {"audit_dir: ", "audit_dir: " + p->audit_dir()},
  };
  for (const auto& [prefix, line] : lines) {
    absl::StatusOr<std::string> rewritten = ReplaceLine(config, prefix, line);
    if (!rewritten.ok()) return rewritten.status();
    config = *std::move(rewritten);
  }
  if (!p->options_.storage_url.empty()) {
    absl::StatusOr<std::string> rewritten =
        ReplaceLine(config, "storage: ", "storage: " + p->options_.storage_url);
    if (!rewritten.ok()) return rewritten.status();
    config = *std::move(rewritten);
  }
  if (config.find("\nmetrics_listen: ") != std::string::npos) {
    p->options_.metrics = true;
    p->metrics_address_ = absl::StrCat("127.0.0.1:", FreePort());
    absl::StatusOr<std::string> rewritten = ReplaceLine(
        config, "metrics_listen: ",
        absl::StrCat("metrics_listen: \"", p->metrics_address_, "\""));
    if (!rewritten.ok()) return rewritten.status();
    config = *std::move(rewritten);
  }
  config += "\n" + p->options_.extra_config + "\n";
  absl::Status written = WriteFileAtomically(p->config_path(), config, 0600);
  if (!written.ok()) return written;
  if (!p->options_.skip_init) {  // this node's audit signing key
    ProcessResult init = p->RunCustosd({"--init"});
    if (init.code != 0) {
      return absl::InternalError(
          absl::StrCat("custosd --init failed: ", init.out, init.err));
    }
  }
  absl::Status launched = p->Launch();
  if (!launched.ok()) return launched;
  return p;
}

ProcessResult CustosdProcess::RunCustosd(
    const std::vector<std::string>& args) const {
  std::vector<std::string> argv = {BinDir() + "/custosd-test", "--config",
                                   config_path()};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<std::string> env = EnvironmentWithout("SOFTHSM2_CONF=");
  env.push_back("SOFTHSM2_CONF=" + softhsm_conf());
  for (const auto& [name, value] : options_.env) {
    env.push_back(name + "=" + value);
  }
  return RunProcess(argv, env, "/dev/null",
                    absl::StrCat(dir_, "/custosd-run", suffix_));
}

ProcessResult CustosdProcess::StartExpectingFailure() const {
  // A server that starts after all is stopped by timeout(1) (code 124)
  // rather than hang the test.
  std::vector<std::string> argv = {"/usr/bin/timeout", "30",
                                   BinDir() + "/custosd-test", "--config",
                                   config_path()};
  std::vector<std::string> env = EnvironmentWithout("SOFTHSM2_CONF=");
  env.push_back("SOFTHSM2_CONF=" + softhsm_conf());
  for (const auto& [name, value] : options_.env) {
    env.push_back(name + "=" + value);
  }
  return RunProcess(argv, env, "/dev/null",
                    absl::StrCat(dir_, "/custosd-start", suffix_));
}

absl::Status CustosdProcess::Launch() {
  pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    int log = open(log_path().c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
    dup2(log, STDOUT_FILENO);
    dup2(log, STDERR_FILENO);
    setenv("SOFTHSM2_CONF", softhsm_conf().c_str(), 1);
    for (const auto& [name, value] : options_.env) {
      setenv(name.c_str(), value.c_str(), 1);
    }
    // The test build: it accepts the config's `testing:` section.
    std::string binary = BinDir() + "/custosd-test";
    std::string config = config_path();
    execl(binary.c_str(), binary.c_str(), "--config", config.c_str(),
          static_cast<char*>(nullptr));
    _exit(127);
  }
  pid_ = pid;
  // Ready when a TLS connection as admin succeeds; give up if it exits.
  auto channel = Channel("admin");
  for (int i = 0; i < 200; ++i) {
    int status;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return absl::InternalError("custosd exited during start-up:\n" +
                                 ReadAll(log_path()));
    }
    if (channel->WaitForConnected(std::chrono::system_clock::now() +
                                  std::chrono::milliseconds(100))) {
      return absl::OkStatus();
    }
  }
  Kill(SIGKILL);
  return absl::DeadlineExceededError("custosd did not start serving:\n" +
                                     ReadAll(log_path()));
}

CustosdProcess::~CustosdProcess() {
  if (pid_ > 0) Kill(SIGTERM);
  if (!dir_.empty() && suffix_.empty() &&
      std::getenv("CUSTOS_KEEP_TEST_DIRS") == nullptr) {
    std::error_code ec;
    std::filesystem::remove_all(std::filesystem::path(dir_).parent_path(), ec);
  }
}

absl::Status CustosdProcess::Restart() {
  if (pid_ > 0) return absl::FailedPreconditionError("custosd still runs");
  return Launch();
}

void CustosdProcess::Kill(int signal) {
  if (pid_ <= 0) return;
  kill(pid_, signal);
  int status;
  waitpid(pid_, &status, 0);
  pid_ = -1;
}

absl::Status CustosdProcess::Stop() {
  if (pid_ <= 0) return absl::OkStatus();
  kill(pid_, SIGTERM);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return absl::InternalError("custosd did not exit cleanly:\n" +
                               ReadAll(log_path()));
  }
  return absl::OkStatus();
}

ProcessResult CustosdProcess::VerifyAuditLog() const {
  static std::atomic<int> runs{0};
  return RunProcess({BinDir() + "/custos", "audit", "verify", audit_dir()},
                    EnvironmentWithout("CUSTOS_"), "/dev/null",
                    absl::StrCat(dir_, "/verify", suffix_, "-", ++runs));
}

std::string CustosdProcess::ReadPki(const std::string& file) const {
  return ReadAll(dir_ + "/pki/" + file);
}

std::shared_ptr<grpc::Channel> CustosdProcess::Channel(
    const std::string& identity) const {
  return ChannelWith(ReadPki(identity + ".key"), ReadPki(identity + ".pem"));
}

std::shared_ptr<grpc::Channel> CustosdProcess::ChannelWith(
    const std::string& key_pem, const std::string& cert_pem) const {
  grpc::SslCredentialsOptions tls;
  tls.pem_root_certs = ReadPki("ca.pem");
  tls.pem_private_key = key_pem;
  tls.pem_cert_chain = cert_pem;
  grpc::ChannelArguments args;
  // A fresh connection per channel: tests compare identities.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(address_, grpc::SslCredentials(tls), args);
}

}  // namespace custos::testing
