// PostgresServer: a real, throw-away PostgreSQL server for tests. Start()
// runs initdb into a fresh temporary directory and starts `postgres` on it,
// listening on 127.0.0.1 at a free port and on a unix socket in that
// directory, with fsync and full_page_writes off: a test database need not
// survive a power cut. synchronous_commit stays on, so that a committed
// transaction is in the kernel's hands and survives the postmaster being
// killed, as crash tests expect. The superuser is the role "custos",
// trusted without a password on loopback.
//
// PostgreSQL refuses to run as root; when the tests do (here and in CI),
// initdb and postgres run as the `postgres` system user that Debian's
// package creates, and the directory belongs to it.
//
// The postmaster is a child of this process; its output goes to
// DIR/postgres.log, whose tail every error status carries. The destructor
// shuts it down (fast shutdown: SIGINT) and removes the directory (kept if
// CUSTOS_KEEP_TEST_DIRS is set). Should this process die first, the
// postmaster gets SIGINT (PR_SET_PDEATHSIG), so no server outlives its test
// (its directory stays behind); for that reason, call Start() and Restart()
// from a thread that lives as long as the server (gtest's main thread does).
//
// The binaries come from /usr/lib/postgresql/15/bin, or from
// $CUSTOS_PG_BIN_DIR.
//
// Not thread-safe: one test thread drives it. The databases it creates are
// used through libpq from any thread.
#ifndef CUSTOS_TESTS_SUPPORT_POSTGRES_SERVER_H_
#define CUSTOS_TESTS_SUPPORT_POSTGRES_SERVER_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace custos::testing {

class PostgresServer {
 public:
  // initdb into a fresh temporary directory, start postgres on a free
  // loopback port, and wait until it accepts connections.
  static absl::StatusOr<std::unique_ptr<PostgresServer>> Start();
  // Fast shutdown, then removes the directory.
  ~PostgresServer();
  PostgresServer(const PostgresServer&) = delete;
  PostgresServer& operator=(const PostgresServer&) = delete;

  // Creates a fresh, empty database and returns its libpq URL,
  // "postgresql://custos@127.0.0.1:PORT/NAME". `name` must be 1 to 63 of
  // [a-z0-9_], starting with a letter; ALREADY_EXISTS if it is taken.
  absl::StatusOr<std::string> CreateDatabase(const std::string& name);

  // Stops the server (fast shutdown) and waits for it to exit. OK if it was
  // not running or has been killed by the test.
  absl::Status Stop();
  // Stops the server if it runs (or reaps it if the test killed it), and
  // starts it again on the same directory and port.
  absl::Status Restart();

  int port() const { return port_; }
  // The postmaster's pid (tests kill it to test reconnects), or -1 when
  // stopped.
  pid_t pid() const { return pid_; }
  const std::string& dir() const { return dir_; }
  std::string data_dir() const { return dir_ + "/data"; }
  std::string log_path() const { return dir_ + "/postgres.log"; }
  // The last `max_bytes` of the server's log.
  std::string LogTail(size_t max_bytes = 4096) const;

 private:
  PostgresServer() = default;
  // Runs initdb as the server's user.
  absl::Status InitDb();
  // Starts the postmaster on port_ and waits until it accepts connections.
  // While a killed predecessor's backends still hold its shared memory, or
  // its port, tries again until a deadline; if `port_taken` is not null,
  // returns at once instead when the port is taken, setting *port_taken.
  absl::Status Launch(bool* port_taken);
  // Forks and execs `argv` (a path first) as the server's user with output
  // appended to the log; returns the child's pid.
  absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv);

  std::string dir_;
  std::string bin_dir_;
  int port_ = 0;
  pid_t pid_ = -1;
  // The user initdb and postgres run as, or -1 for this process's own.
  uid_t uid_ = static_cast<uid_t>(-1);
  gid_t gid_ = static_cast<gid_t>(-1);
};

}  // namespace custos::testing

#endif  // CUSTOS_TESTS_SUPPORT_POSTGRES_SERVER_H_
