#include "tests/support/postgres_server.h"

#include <fcntl.h>
#include <grp.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "tests/support/test_token.h"

namespace custos::testing {
namespace {

constexpr char kDefaultBinDir[] = "/usr/lib/postgresql/15/bin";
constexpr char kSuperuser[] = "custos";
// initdb takes about a second on an idle machine, several on a loaded one.
constexpr absl::Duration kInitDbTimeout = absl::Seconds(120);
constexpr absl::Duration kStartTimeout = absl::Seconds(60);
constexpr absl::Duration kStopTimeout = absl::Seconds(30);

// A loopback port nobody listens on right now. Another process may take it
// before postgres binds it; Start() then tries another.
absl::StatusOr<int> FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError("socket failed");
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    return absl::InternalError(
        absl::StrCat("cannot find a free port: ", std::strerror(errno)));
  }
  close(fd);
  return ntohs(addr.sin_port);
}

// Waits up to `timeout` for child `pid` to exit; true (and its wait status)
// if it did.
bool WaitForExit(pid_t pid, absl::Duration timeout, int* status) {
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    pid_t r = waitpid(pid, status, WNOHANG);
    if (r == pid) return true;
    if (r < 0 && errno != EINTR) return true;  // not our child (any more)
    if (absl::Now() >= deadline) return false;
    absl::SleepFor(absl::Milliseconds(10));
  }
}

std::string DescribeExit(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exit ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return absl::StrCat("signal ", WTERMSIG(status));
  return "unknown status";
}

// The size of the file at `path`, or 0.
uint64_t FileSize(const std::string& path) {
  std::error_code ec;
  uint64_t size = std::filesystem::file_size(path, ec);
  return ec ? 0 : size;
}

std::string ReadFrom(const std::string& path, uint64_t offset) {
  std::ifstream in(path, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// When the tests run as root, every directory above `dir` must let the
// `postgres` user through.
absl::Status CheckTraversable(const std::string& dir, uid_t uid, gid_t gid) {
  std::filesystem::path p = std::filesystem::path(dir).parent_path();
  for (; !p.empty(); p = p.parent_path()) {
    struct stat st;
    if (stat(p.c_str(), &st) != 0) break;
    const bool ok = (st.st_mode & S_IXOTH) ||
                    (st.st_uid == uid && (st.st_mode & S_IXUSR)) ||
                    (st.st_gid == gid && (st.st_mode & S_IXGRP));
    if (!ok) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the postgres user cannot enter ", p.string(), " (above ", dir,
          "); point TMPDIR at a directory it can reach, e.g. /tmp"));
    }
    if (p == p.root_path()) break;
  }
  return absl::OkStatus();
}

bool ValidDatabaseName(const std::string& name) {
  if (name.empty() || name.size() > 63) return false;
  if (name[0] < 'a' || name[0] > 'z') return false;
  for (char c : name) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_')) {
      return false;
    }
  }
  return true;
}

struct PgConnDeleter {
  void operator()(PGconn* c) const { PQfinish(c); }
};
struct PgResultDeleter {
  void operator()(PGresult* r) const { PQclear(r); }
};

}  // namespace

absl::StatusOr<std::unique_ptr<PostgresServer>> PostgresServer::Start() {
  std::unique_ptr<PostgresServer> server(new PostgresServer());
  const char* bin_dir = std::getenv("CUSTOS_PG_BIN_DIR");
  server->bin_dir_ = bin_dir && *bin_dir ? bin_dir : kDefaultBinDir;
  for (const char* tool : {"initdb", "postgres"}) {
    const std::string path = server->bin_dir_ + "/" + tool;
    if (access(path.c_str(), X_OK) != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("no ", path, " (install Debian's postgresql-15, or set ",
                       "CUSTOS_PG_BIN_DIR)"));
    }
  }
  if (geteuid() == 0) {
    // PostgreSQL refuses to run as root.
    const passwd* pw = getpwnam("postgres");
    if (pw == nullptr) {
      return absl::FailedPreconditionError(
          "running as root and there is no 'postgres' user to run "
          "PostgreSQL as (Debian's postgresql package creates it)");
    }
    server->uid_ = pw->pw_uid;
    server->gid_ = pw->pw_gid;
  }
  absl::StatusOr<std::string> dir = MakeTempDir("custos-pg");
  if (!dir.ok()) return dir.status();
  server->dir_ = *dir;
  if (server->uid_ != static_cast<uid_t>(-1)) {
    if (chown(server->dir_.c_str(), server->uid_, server->gid_) != 0) {
      return absl::InternalError(absl::StrCat(
          "chown ", server->dir_, " to postgres: ", std::strerror(errno)));
    }
    absl::Status reachable =
        CheckTraversable(server->dir_, server->uid_, server->gid_);
    if (!reachable.ok()) return reachable;
  }
  absl::Status s = server->InitDb();
  if (!s.ok()) return s;
  // Another process may take the free port first: try a few.
  for (int attempt = 0;; ++attempt) {
    absl::StatusOr<int> port = FreePort();
    if (!port.ok()) return port.status();
    server->port_ = *port;
    bool port_taken = false;
    s = server->Launch(attempt < 4 ? &port_taken : nullptr);
    if (s.ok() || !port_taken) break;
  }
  if (!s.ok()) return s;
  return server;
}

PostgresServer::~PostgresServer() {
  Stop().IgnoreError();
  if (!dir_.empty() && std::getenv("CUSTOS_KEEP_TEST_DIRS") == nullptr) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
}

std::string PostgresServer::LogTail(size_t max_bytes) const {
  const uint64_t size = FileSize(log_path());
  return ReadFrom(log_path(), size > max_bytes ? size - max_bytes : 0);
}

absl::StatusOr<pid_t> PostgresServer::Spawn(
    const std::vector<std::string>& argv_in) {
  // Everything the child needs is prepared before fork: the child of a
  // multi-threaded process may only make async-signal-safe calls.
  std::vector<std::string> argv_s = argv_in;
  std::vector<std::string> env_s = {"PATH=/usr/bin:/bin", "LC_ALL=C"};
  std::vector<char*> argv, envp;
  for (std::string& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (std::string& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);
  const std::string log = log_path();
  int log_fd =
      open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (log_fd < 0 || null_fd < 0) {
    const std::string error = std::strerror(errno);
    if (log_fd >= 0) close(log_fd);
    if (null_fd >= 0) close(null_fd);
    return absl::InternalError(absl::StrCat("open ", log, ": ", error));
  }
  const bool switch_user = uid_ != static_cast<uid_t>(-1);
  if (switch_user && fchown(log_fd, uid_, gid_) != 0) {
    close(log_fd);
    close(null_fd);
    return absl::InternalError(
        absl::StrCat("chown ", log, ": ", std::strerror(errno)));
  }
  const uid_t uid = uid_;
  const gid_t gid = gid_;
  const char* const cwd = dir_.c_str();
  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) {
    close(log_fd);
    close(null_fd);
    return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  }
  if (pid == 0) {
    auto fail = [](const char* what) {
      (void)!write(STDERR_FILENO, what, std::strlen(what));
      _exit(126);
    };
    dup2(null_fd, STDIN_FILENO);
    dup2(log_fd, STDOUT_FILENO);
    dup2(log_fd, STDERR_FILENO);
    if (switch_user) {
      if (setgroups(0, nullptr) != 0 || setgid(gid) != 0 || setuid(uid) != 0) {
        fail("postgres_server: cannot switch to the postgres user\n");
      }
    }
    // After setuid, which clears it. Stops the server should the test
    // process die without running its destructor.
    prctl(PR_SET_PDEATHSIG, SIGINT);
    if (getppid() != parent) _exit(125);
    if (chdir(cwd) != 0) fail("postgres_server: cannot chdir\n");
    execve(argv[0], argv.data(), envp.data());
    fail("postgres_server: execve failed\n");
  }
  close(log_fd);
  close(null_fd);
  return pid;
}

absl::Status PostgresServer::InitDb() {
  absl::StatusOr<pid_t> pid = Spawn(
      {bin_dir_ + "/initdb", "-D", data_dir(), "--no-sync", "-A", "trust", "-U",
       kSuperuser, "--no-locale", "-E", "UTF8", "--no-instructions"});
  if (!pid.ok()) return pid.status();
  int status = 0;
  if (!WaitForExit(*pid, kInitDbTimeout, &status)) {
    kill(*pid, SIGKILL);
    waitpid(*pid, &status, 0);
    return absl::DeadlineExceededError(absl::StrCat(
        "initdb did not finish in ", absl::FormatDuration(kInitDbTimeout),
        "; its log:\n", LogTail()));
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return absl::InternalError(absl::StrCat(
        "initdb failed (", DescribeExit(status), "); its log:\n", LogTail()));
  }
  return absl::OkStatus();
}

absl::Status PostgresServer::Launch(bool* port_taken) {
  const std::string port = absl::StrCat(port_);
  const std::string ping =
      absl::StrCat("host=127.0.0.1 port=", port_, " user=", kSuperuser,
                   " dbname=postgres connect_timeout=2");
  const absl::Time deadline = absl::Now() + kStartTimeout;
  for (;;) {
    const uint64_t log_offset = FileSize(log_path());
    absl::StatusOr<pid_t> pid = Spawn({
        bin_dir_ + "/postgres",
        "-D",
        data_dir(),
        "-p",
        port,
        "-k",
        dir_,
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "fsync=off",
        "-c",
        "full_page_writes=off",
    });
    if (!pid.ok()) return pid.status();
    pid_ = *pid;
    for (;;) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        const std::string log = ReadFrom(log_path(), log_offset);
        const bool in_use = absl::StrContains(log, "Address already in use");
        // A postmaster killed with SIGKILL leaves backends behind for a
        // moment; they hold its shared memory, which the new one refuses to
        // share.
        const bool transient = in_use ||
                               absl::StrContains(log, "is still in use") ||
                               absl::StrContains(log, "lock file");
        if (in_use && port_taken != nullptr) {
          *port_taken = true;
          return absl::UnavailableError(
              absl::StrCat("port ", port_, " is taken:\n", log));
        }
        if (!transient || absl::Now() >= deadline) {
          return absl::InternalError(
              absl::StrCat("postgres exited during start-up (",
                           DescribeExit(status), "); its log:\n", LogTail()));
        }
        absl::SleepFor(absl::Milliseconds(100));
        break;  // and start it again
      }
      if (PQping(ping.c_str()) == PQPING_OK) return absl::OkStatus();
      if (absl::Now() >= deadline) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
        pid_ = -1;
        return absl::DeadlineExceededError(absl::StrCat(
            "postgres did not accept connections on port ", port_, " within ",
            absl::FormatDuration(kStartTimeout), "; its log:\n", LogTail()));
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
  }
}

absl::Status PostgresServer::Stop() {
  if (pid_ <= 0) return absl::OkStatus();
  const pid_t pid = pid_;
  pid_ = -1;
  int status = 0;
  // SIGINT is PostgreSQL's fast shutdown: abort transactions, disconnect,
  // checkpoint. SIGQUIT is its immediate shutdown, for a server that hangs.
  kill(pid, SIGINT);
  if (WaitForExit(pid, kStopTimeout, &status)) return absl::OkStatus();
  kill(pid, SIGQUIT);
  if (!WaitForExit(pid, absl::Seconds(5), &status)) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
  }
  return absl::DeadlineExceededError(absl::StrCat(
      "postgres did not shut down within ", absl::FormatDuration(kStopTimeout),
      "; its log:\n", LogTail()));
}

absl::Status PostgresServer::Restart() {
  absl::Status stopped = Stop();
  if (!stopped.ok()) return stopped;
  return Launch(/*port_taken=*/nullptr);
}

absl::StatusOr<std::string> PostgresServer::CreateDatabase(
    const std::string& name) {
  if (!ValidDatabaseName(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("database name '", name,
                     "' is not 1 to 63 of [a-z0-9_] starting with a letter"));
  }
  const std::string port = absl::StrCat(port_);
  const char* const keywords[] = {"host", "port", "user", "dbname", nullptr};
  const char* const values[] = {"127.0.0.1", port.c_str(), kSuperuser,
                                "postgres", nullptr};
  std::unique_ptr<PGconn, PgConnDeleter> conn(
      PQconnectdbParams(keywords, values, /*expand_dbname=*/0));
  if (PQstatus(conn.get()) != CONNECTION_OK) {
    return absl::UnavailableError(
        absl::StrCat("cannot connect to postgres on port ", port_, ": ",
                     PQerrorMessage(conn.get()), "its log:\n", LogTail()));
  }
  std::unique_ptr<PGresult, PgResultDeleter> result(
      PQexec(conn.get(), absl::StrCat("CREATE DATABASE ", name).c_str()));
  if (PQresultStatus(result.get()) != PGRES_COMMAND_OK) {
    const char* state = PQresultErrorField(result.get(), PG_DIAG_SQLSTATE);
    const std::string message = absl::StrCat("CREATE DATABASE ", name, ": ",
                                             PQerrorMessage(conn.get()));
    if (state != nullptr && std::strcmp(state, "42P04") == 0) {
      return absl::AlreadyExistsError(message);
    }
    return absl::InternalError(absl::StrCat(message, "its log:\n", LogTail()));
  }
  return absl::StrCat("postgresql://", kSuperuser, "@127.0.0.1:", port_, "/",
                      name);
}

}  // namespace custos::testing
