#include "kms/store/postgres_store.h"

#include <poll.h>

#include <cstdlib>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "kms/encryption_context.h"
#include "kms/store/rows.h"

namespace custos::kms {
namespace pg {

// A PGresult, cleared on destruction.
class Result {
 public:
  explicit Result(PGresult* r) : r_(r) {}
  Result(Result&& o) noexcept : r_(std::exchange(o.r_, nullptr)) {}
  Result& operator=(Result&& o) noexcept {
    if (this != &o) {
      PQclear(r_);
      r_ = std::exchange(o.r_, nullptr);
    }
    return *this;
  }
  ~Result() { PQclear(r_); }
  PGresult* get() const { return r_; }
  int rows() const { return PQntuples(r_); }

 private:
  PGresult* r_;
};

// One row of a text-format result, read as rows::KeyFromRow expects.
// Columns that hold bytes are selected as encode(col, 'hex').
class Row {
 public:
  Row(const Result& r, int row) : r_(r.get()), row_(row) {}
  std::string Text(int col) const {
    return std::string(PQgetvalue(r_, row_, col), PQgetlength(r_, row_, col));
  }
  int64_t Int(int col) const {
    return std::strtoll(PQgetvalue(r_, row_, col), nullptr, 10);
  }
  bool IsNull(int col) const { return PQgetisnull(r_, row_, col) != 0; }
  std::string Blob(int col) const {
    return absl::HexStringToBytes(Text(col));  // encode() makes valid hex
  }

 private:
  PGresult* r_;
  int row_;
};

}  // namespace pg

namespace {

using rows::FromMicros;
using rows::Micros;

// A SQL parameter in text form, or NULL.
using Param = std::optional<std::string>;

constexpr char kChannel[] = "custos_keys";
// Advisory lock ids ("custos" in ASCII, then a purpose).
constexpr int64_t kMigrationLock = 0x637573746f730001;
constexpr int64_t kLeaderLock = 0x637573746f730002;
constexpr int kAttempts = 5;

// Versioned migrations, applied in order in one transaction. The same
// versions as SqliteStore's, in PostgreSQL's types. Never edit a released
// migration: add a new one.
struct Migration {
  int version;
  const char* sql;
};
constexpr Migration kMigrations[] = {
    {1, R"sql(
CREATE TABLE keys (
  id TEXT PRIMARY KEY,
  description TEXT NOT NULL DEFAULT '',
  labels TEXT NOT NULL DEFAULT '{}',
  purpose INTEGER NOT NULL,
  state INTEGER NOT NULL,
  rotation_period_s BIGINT NOT NULL DEFAULT 0,
  next_rotation_us BIGINT,
  primary_version BIGINT NOT NULL,
  create_us BIGINT NOT NULL,
  update_us BIGINT NOT NULL,
  deletion_us BIGINT,
  policy TEXT NOT NULL
);
CREATE TABLE key_versions (
  key_id TEXT NOT NULL REFERENCES keys(id),
  number BIGINT NOT NULL,
  state INTEGER NOT NULL,
  hsm_id BYTEA NOT NULL,
  create_us BIGINT NOT NULL,
  encryptions_reserved BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (key_id, number)
);
CREATE UNIQUE INDEX key_versions_hsm_id ON key_versions(hsm_id);
CREATE TABLE aliases (
  name TEXT PRIMARY KEY,
  key_id TEXT NOT NULL REFERENCES keys(id),
  create_us BIGINT NOT NULL
);
CREATE INDEX aliases_key_id ON aliases(key_id);
)sql"},
    {2, R"sql(
ALTER TABLE keys ADD COLUMN deletion_window_us BIGINT NOT NULL DEFAULT 0;
ALTER TABLE keys ADD COLUMN deletion_elapsed_us BIGINT NOT NULL DEFAULT 0;
UPDATE keys SET deletion_window_us = GREATEST(0, deletion_us - update_us)
  WHERE state = 3 AND deletion_us IS NOT NULL;
)sql"},
    {3, R"sql(
ALTER TABLE keys ADD COLUMN destruction_started INTEGER NOT NULL DEFAULT 0;
)sql"},
    {4, R"sql(
CREATE TABLE deployment (
  singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
  id BYTEA NOT NULL,
  token_label TEXT NOT NULL,
  token_serial TEXT NOT NULL,
  create_us BIGINT NOT NULL
);
CREATE TABLE material_intents (
  hsm_id BYTEA PRIMARY KEY,
  key_id TEXT NOT NULL,
  number BIGINT NOT NULL,
  create_us BIGINT NOT NULL,
  claimed INTEGER NOT NULL DEFAULT 0
);
)sql"},
};

// The version columns in rows::kVersionColumns' order, bytes as hex.
constexpr char kVersionSelect[] =
    "number, state, encode(hsm_id, 'hex'), create_us, encryptions_reserved";

std::string SelectKeys() {
  return absl::StrCat("SELECT ", rows::kKeyColumns, " FROM keys");
}

// Maps a failed command to a status by its SQLSTATE. Retryable conflicts
// are ABORTED; connection trouble, a full disk and a read-only server are
// UNAVAILABLE; unique violations ALREADY_EXISTS.
absl::Status ErrorStatus(PGconn* conn, const PGresult* r,
                         absl::string_view what) {
  const char* state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : nullptr;
  std::string detail = r ? PQresultErrorMessage(r) : PQerrorMessage(conn);
  while (!detail.empty() && (detail.back() == '\n' || detail.back() == ' ')) {
    detail.pop_back();
  }
  std::string msg = absl::StrCat("database ", what, ": ", detail);
  if (PQstatus(conn) == CONNECTION_BAD || state == nullptr) {
    return absl::UnavailableError(msg);
  }
  absl::string_view code(state);
  if (code == "23505") return absl::AlreadyExistsError(msg);
  if (code == "40001" || code == "40P01") return absl::AbortedError(msg);
  // lock_timeout: another session holds the row (a stalled replica).
  if (code == "55P03") return absl::UnavailableError(msg);
  if (absl::StartsWith(code, "08") || absl::StartsWith(code, "53") ||
      absl::StartsWith(code, "57") || code == "25006") {
    return absl::UnavailableError(msg);
  }
  return absl::InternalError(msg);
}

// Runs `sql` with text parameters; the result must be `expect`.
absl::StatusOr<pg::Result> Exec(PGconn* conn, const std::string& sql,
                                const std::vector<Param>& params,
                                absl::string_view what,
                                ExecStatusType expect = PGRES_COMMAND_OK) {
  std::vector<const char*> values;
  values.reserve(params.size());
  for (const Param& p : params) values.push_back(p ? p->c_str() : nullptr);
  pg::Result r(PQexecParams(conn, sql.c_str(), static_cast<int>(values.size()),
                            nullptr, values.data(), nullptr, nullptr, 0));
  if (r.get() == nullptr || PQresultStatus(r.get()) != expect) {
    return ErrorStatus(conn, r.get(), what);
  }
  return r;
}

absl::StatusOr<pg::Result> Query(PGconn* conn, const std::string& sql,
                                 const std::vector<Param>& params,
                                 absl::string_view what) {
  return Exec(conn, sql, params, what, PGRES_TUPLES_OK);
}

// PostgreSQL TEXT holds neither NUL nor invalid UTF-8 (and libpq would cut
// a parameter at its first NUL, naming another row).
bool Storable(absl::string_view text) {
  return text.find('\0') == absl::string_view::npos && IsValidUtf8(text);
}

// What a lookup by a name no row can have finds: nothing.
absl::Status NoSuch(absl::string_view what, absl::string_view name) {
  return absl::NotFoundError(
      absl::StrCat(what, " ", absl::CHexEscape(name), " not found"));
}

// Every text field of `key` can be stored.
absl::Status CheckStorable(const Key& key) {
  bool ok = Storable(key.id) && Storable(key.description) &&
            Storable(PolicyToJson(key.policy));
  for (const auto& [name, value] : key.labels) {
    ok = ok && Storable(name) && Storable(value);
  }
  for (const std::string& alias : key.aliases) ok = ok && Storable(alias);
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(
      "key text holds a NUL byte or invalid UTF-8, which the database cannot "
      "store");
}

Param Int(int64_t v) { return std::to_string(v); }
Param Text(absl::string_view v) { return std::string(v); }
Param MaybeTime(absl::Time t) {
  if (t == absl::InfinitePast()) return std::nullopt;
  return Int(Micros(t));
}

// Rolls back unless committed.
class Transaction {
 public:
  explicit Transaction(PGconn* conn) : conn_(conn) {}
  ~Transaction() {
    if (open_) PQclear(PQexec(conn_, "ROLLBACK"));
  }
  absl::Status Begin(const char* sql = "BEGIN") {
    CUSTOS_RETURN_IF_ERROR(Exec(conn_, sql, {}, "begin").status());
    open_ = true;
    return absl::OkStatus();
  }
  absl::Status Commit() {
    open_ = false;
    return Exec(conn_, "COMMIT", {}, "commit").status();
  }

 private:
  PGconn* conn_;
  bool open_ = false;
};

// Backs off before retry `attempt` (1, 2, ...): 10 ms, 20 ms, 40 ms, ...
void Backoff(int attempt) {
  absl::SleepFor(absl::Milliseconds(10) * (1 << (attempt - 1)));
}

void IgnoreNotice(void*, const char*) {}

// Text is UTF-8 whatever the server's defaults; a row lock held elsewhere
// (a stalled replica, a DBA) fails a change after 5 s, as SQLite's busy
// timeout does, rather than stall every call behind it; notices ("relation
// already exists, skipping") are not printed on stderr.
void ConfigureSession(PGconn* conn) {
  PQsetNoticeProcessor(conn, IgnoreNotice, nullptr);
  PQclear(
      PQexec(conn, "SET client_encoding = 'UTF8'; SET lock_timeout = '5s'"));
}

// Connects; UNAVAILABLE names the server without the password. `prompt`
// connections (the change feed, the leader lease) notice a vanished server
// within about a second (unacknowledged data, dead keepalives), where the
// kernel's defaults take minutes.
absl::StatusOr<PGconn*> Connect(const std::string& url, bool prompt = false) {
  // The URL first, expanded; the later settings override it.
  const char* keys[] = {"dbname",
                        "connect_timeout",
                        "tcp_user_timeout",
                        "keepalives_idle",
                        "keepalives_interval",
                        "keepalives_count",
                        nullptr};
  const char* values[] = {url.c_str(), "5", "1000", "1", "1", "2", nullptr};
  if (!prompt) {
    // The store's own connection: a partition is noticed within about 30 s
    // (queries can be slower than the feed's 1 s without being lost).
    values[2] = "30000";
    values[3] = "10";
    values[4] = "5";
    values[5] = "3";
  }
  PGconn* conn = PQconnectdbParams(keys, values, /*expand_dbname=*/1);
  if (conn == nullptr) return absl::ResourceExhaustedError("out of memory");
  if (PQstatus(conn) != CONNECTION_OK) {
    std::string msg = PQerrorMessage(conn);
    PQfinish(conn);
    while (!msg.empty() && msg.back() == '\n') msg.pop_back();
    return absl::UnavailableError(absl::StrCat(
        "storage: cannot connect to ", RedactStorageUrl(url), ": ", msg));
  }
  ConfigureSession(conn);
  return conn;
}

// The notifications waiting on `conn`, as key ids.
void DrainNotifications(PGconn* conn, std::vector<std::string>& out) {
  while (PGnotify* n = PQnotifies(conn)) {
    out.push_back(n->extra);
    PQfreemem(n);
  }
}

// Waits up to `timeout` for `conn`'s socket to be readable.
absl::Status WaitReadable(PGconn* conn, absl::Duration timeout) {
  pollfd fd{PQsocket(conn), POLLIN, 0};
  if (fd.fd < 0) return absl::UnavailableError("database connection closed");
  int rc = poll(&fd, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout)));
  if (rc < 0 && errno != EINTR) {
    return absl::UnavailableError("database connection: poll failed");
  }
  return absl::OkStatus();
}

// LISTEN custos_keys on a connection of its own.
class PostgresChangeFeed : public ChangeFeed {
 public:
  explicit PostgresChangeFeed(std::string url) : url_(std::move(url)) {}
  ~PostgresChangeFeed() override {
    if (conn_ != nullptr) PQfinish(conn_);
  }

  absl::StatusOr<std::vector<std::string>> Wait(
      absl::Duration timeout) override {
    std::vector<std::string> changed;
    if (conn_ == nullptr || PQstatus(conn_) != CONNECTION_OK) {
      if (conn_ != nullptr) PQfinish(std::exchange(conn_, nullptr));
      CUSTOS_ASSIGN_OR_RETURN(conn_, Connect(url_, /*prompt=*/true));
      CUSTOS_RETURN_IF_ERROR(
          Exec(conn_, absl::StrCat("LISTEN ", kChannel), {}, "listen")
              .status());
      // Whatever changed while no one listened is unknown.
      changed.push_back(kEverything);
      return changed;
    }
    DrainNotifications(conn_, changed);
    if (!changed.empty()) return changed;
    CUSTOS_RETURN_IF_ERROR(WaitReadable(conn_, timeout));
    if (PQconsumeInput(conn_) == 0) {
      return absl::UnavailableError(
          absl::StrCat("database change feed: ", PQerrorMessage(conn_)));
    }
    DrainNotifications(conn_, changed);
    if (changed.empty()) {
      // A round trip: proves that nothing was committed unheard before it
      // (notifications precede the reply), or fails on a dead server.
      CUSTOS_RETURN_IF_ERROR(
          Query(conn_, "SELECT 1", {}, "change feed").status());
      DrainNotifications(conn_, changed);
    }
    return changed;
  }

 private:
  const std::string url_;
  PGconn* conn_ = nullptr;
};

// pg_try_advisory_lock on a connection of its own: the lock lives as long
// as the session, so a dead leader's lock is released by the server.
class PostgresLeadership : public Leadership {
 public:
  explicit PostgresLeadership(std::string url) : url_(std::move(url)) {}
  ~PostgresLeadership() override {
    if (conn_ != nullptr) PQfinish(conn_);
  }

  bool Hold() override {
    if (conn_ != nullptr && PQstatus(conn_) != CONNECTION_OK) {
      PQfinish(std::exchange(conn_, nullptr));
      held_ = false;
    }
    if (conn_ == nullptr) {
      absl::StatusOr<PGconn*> conn = Connect(url_, /*prompt=*/true);
      if (!conn.ok()) return false;
      conn_ = *conn;
    }
    // A held session lock is confirmed by a round trip on its session.
    const std::string sql =
        held_ ? "SELECT 1"
              : absl::StrCat("SELECT pg_try_advisory_lock(", kLeaderLock, ")");
    absl::StatusOr<pg::Result> r = Query(conn_, sql, {}, "leadership");
    if (!r.ok() || r->rows() != 1) {
      PQfinish(std::exchange(conn_, nullptr));
      held_ = false;
      return false;
    }
    if (!held_) held_ = std::string(PQgetvalue(r->get(), 0, 0)) == "t";
    return held_;
  }

 private:
  const std::string url_;
  PGconn* conn_ = nullptr;
  bool held_ = false;
};

}  // namespace

absl::StatusOr<std::unique_ptr<PostgresStore>> PostgresStore::Open(
    const std::string& url, OpenMode mode) {
  CUSTOS_ASSIGN_OR_RETURN(PGconn * conn, Connect(url));
  std::unique_ptr<PostgresStore> store(new PostgresStore(conn, url));
  absl::MutexLock lock(&store->mu_);
  CUSTOS_RETURN_IF_ERROR(store->Migrate(mode));
  return store;
}

PostgresStore::~PostgresStore() { PQfinish(conn_); }

absl::Status PostgresStore::EnsureConnected() {
  if (PQstatus(conn_) == CONNECTION_OK) return absl::OkStatus();
  PQreset(conn_);
  if (PQstatus(conn_) != CONNECTION_OK) {
    return absl::UnavailableError(
        absl::StrCat("storage: lost the connection to ", RedactStorageUrl(url_),
                     " and cannot reconnect"));
  }
  ConfigureSession(conn_);
  return absl::OkStatus();
}

absl::Status PostgresStore::Migrate(OpenMode mode) {
  Transaction tx(conn_);
  CUSTOS_RETURN_IF_ERROR(tx.Begin());
  // Replicas starting together wait here for the first to finish.
  CUSTOS_RETURN_IF_ERROR(
      Query(conn_,
            absl::StrCat("SELECT pg_advisory_xact_lock(", kMigrationLock, ")"),
            {}, "migrate")
          .status());
  if (mode == OpenMode::kExisting) {
    CUSTOS_ASSIGN_OR_RETURN(
        pg::Result has,
        Query(conn_, "SELECT to_regclass('schema_migrations') IS NOT NULL", {},
              "read schema"));
    if (pg::Row(has, 0).Text(0) != "t") {
      return NotInitialisedError(absl::StrCat("the PostgreSQL database ",
                                              RedactStorageUrl(url_),
                                              " has no Custos schema"));
    }
  }
  CUSTOS_RETURN_IF_ERROR(
      Exec(conn_,
           "CREATE TABLE IF NOT EXISTS schema_migrations ("
           "version INTEGER PRIMARY KEY, applied_us BIGINT NOT NULL)",
           {}, "migrate")
          .status());
  CUSTOS_ASSIGN_OR_RETURN(
      pg::Result current,
      Query(conn_, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            {}, "read schema version"));
  schema_version_ = static_cast<int>(pg::Row(current, 0).Int(0));
  constexpr int kLatest = kMigrations[std::size(kMigrations) - 1].version;
  if (schema_version_ > kLatest) {
    return absl::FailedPreconditionError(
        absl::StrCat("storage: database schema version ", schema_version_,
                     " is newer than this custosd understands (", kLatest,
                     "); run a newer custosd"));
  }
  int version = schema_version_;
  for (const Migration& m : kMigrations) {
    if (m.version <= version) continue;
    pg::Result r(PQexec(conn_, m.sql));  // several statements: no parameters
    if (PQresultStatus(r.get()) != PGRES_COMMAND_OK) {
      return ErrorStatus(conn_, r.get(), "migrate");
    }
    CUSTOS_RETURN_IF_ERROR(
        Exec(conn_,
             "INSERT INTO schema_migrations(version, applied_us) "
             "VALUES ($1, $2)",
             {Int(m.version), Int(Micros(absl::Now()))}, "migrate")
            .status());
    version = m.version;
  }
  CUSTOS_RETURN_IF_ERROR(tx.Commit());
  schema_version_ = version;
  return absl::OkStatus();
}

absl::StatusOr<Key> PostgresStore::LoadKeyLocked(absl::string_view id,
                                                 bool for_update) {
  CUSTOS_ASSIGN_OR_RETURN(pg::Result k,
                          Query(conn_,
                                absl::StrCat(SelectKeys(), " WHERE id = $1",
                                             for_update ? " FOR UPDATE" : ""),
                                {Text(id)}, "load key"));
  if (k.rows() == 0) {
    return absl::NotFoundError(absl::StrCat("key ", id, " not found"));
  }
  CUSTOS_ASSIGN_OR_RETURN(Key key, rows::KeyFromRow(pg::Row(k, 0)));
  CUSTOS_ASSIGN_OR_RETURN(
      pg::Result v,
      Query(
          conn_,
          absl::StrCat("SELECT ", kVersionSelect,
                       " FROM key_versions WHERE key_id = $1 ORDER BY number"),
          {Text(id)}, "load versions"));
  for (int i = 0; i < v.rows(); ++i) {
    CUSTOS_ASSIGN_OR_RETURN(KeyVersion version,
                            rows::VersionFromRow(pg::Row(v, i), key.id));
    CUSTOS_RETURN_IF_ERROR(rows::AppendVersion(key, std::move(version)));
  }
  CUSTOS_ASSIGN_OR_RETURN(
      pg::Result a,
      Query(conn_, "SELECT name FROM aliases WHERE key_id = $1 ORDER BY name",
            {Text(id)}, "load aliases"));
  for (int i = 0; i < a.rows(); ++i) {
    key.aliases.push_back(pg::Row(a, i).Text(0));
  }
  return key;
}

absl::Status PostgresStore::SettleIntentLocked(const KeyVersion& version) {
  // The row lock of FOR UPDATE orders this against a concurrent claim.
  CUSTOS_ASSIGN_OR_RETURN(
      pg::Result q,
      Query(conn_,
            "SELECT claimed FROM material_intents WHERE hsm_id = "
            "decode($1, 'hex') FOR UPDATE",
            {absl::BytesToHexString(version.hsm_id)}, "settle intent"));
  if (q.rows() == 0) return absl::OkStatus();  // made without an intent
  if (pg::Row(q, 0).Int(0) != 0) {
    return absl::AbortedError(
        absl::StrCat("version ", version.number,
                     "'s HSM object was claimed as garbage before its commit"));
  }
  return Exec(conn_,
              "DELETE FROM material_intents WHERE hsm_id = decode($1, 'hex')",
              {absl::BytesToHexString(version.hsm_id)}, "settle intent")
      .status();
}

absl::Status PostgresStore::WriteKeyLocked(const Key& key, bool insert,
                                           uint32_t first_new_version) {
  const char* sql =
      insert ? "INSERT INTO keys (description, labels, purpose, state, "
               "rotation_period_s, next_rotation_us, primary_version, "
               "create_us, update_us, deletion_us, policy, "
               "deletion_window_us, deletion_elapsed_us, destruction_started, "
               "id) VALUES "
               "($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15)"
             : "UPDATE keys SET description=$1, labels=$2, purpose=$3, "
               "state=$4, rotation_period_s=$5, next_rotation_us=$6, "
               "primary_version=$7, create_us=$8, update_us=$9, "
               "deletion_us=$10, policy=$11, deletion_window_us=$12, "
               "deletion_elapsed_us=$13, destruction_started=$14 "
               "WHERE id=$15";
  CUSTOS_ASSIGN_OR_RETURN(
      pg::Result r,
      Exec(conn_, sql,
           {Text(key.description), rows::LabelsToJson(key.labels),
            Int(static_cast<int64_t>(key.purpose)),
            Int(static_cast<int64_t>(key.state)),
            Int(absl::ToInt64Seconds(key.rotation_period)),
            MaybeTime(key.next_rotation_time), Int(key.primary_version),
            Int(Micros(key.create_time)), Int(Micros(key.update_time)),
            MaybeTime(key.deletion_time), PolicyToJson(key.policy),
            Int(absl::ToInt64Microseconds(key.deletion_window)),
            Int(absl::ToInt64Microseconds(key.deletion_elapsed)),
            Int(key.destruction_started ? 1 : 0), Text(key.id)},
           "write key"));
  if (!insert && std::string(PQcmdTuples(r.get())) != "1") {
    return absl::NotFoundError(absl::StrCat("key ", key.id, " not found"));
  }
  for (const KeyVersion& v : key.versions) {
    if (v.number >= first_new_version) {
      CUSTOS_RETURN_IF_ERROR(SettleIntentLocked(v));
    }
    CUSTOS_RETURN_IF_ERROR(
        Exec(conn_,
             "INSERT INTO key_versions (key_id, number, state, hsm_id, "
             "create_us, encryptions_reserved) "
             "VALUES ($1,$2,$3,decode($4, 'hex'),$5,$6) "
             "ON CONFLICT (key_id, number) DO UPDATE SET "
             "state=excluded.state, "
             "encryptions_reserved=excluded.encryptions_reserved",
             {Text(key.id), Int(v.number), Int(static_cast<int64_t>(v.state)),
              absl::BytesToHexString(v.hsm_id), Int(Micros(v.create_time)),
              Int(static_cast<int64_t>(v.encryptions_reserved))},
             "write version")
            .status());
  }
  return absl::OkStatus();
}

absl::Status PostgresStore::NotifyLocked(absl::string_view key_id) {
  return Query(conn_, "SELECT pg_notify($1, $2)",
               {Text(kChannel), Text(key_id)}, "notify")
      .status();
}

absl::StatusOr<std::vector<Key>> PostgresStore::LoadAllKeys() {
  absl::MutexLock lock(&mu_);
  CUSTOS_RETURN_IF_ERROR(EnsureConnected());
  // Three scans joined in memory, in one snapshot.
  Transaction tx(conn_);
  CUSTOS_RETURN_IF_ERROR(
      tx.Begin("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"));
  std::vector<Key> keys;
  absl::flat_hash_map<std::string, size_t> index;
  {
    CUSTOS_ASSIGN_OR_RETURN(
        pg::Result k,
        Query(conn_, absl::StrCat(SelectKeys(), " ORDER BY create_us, id"), {},
              "list keys"));
    for (int i = 0; i < k.rows(); ++i) {
      CUSTOS_ASSIGN_OR_RETURN(Key key, rows::KeyFromRow(pg::Row(k, i)));
      index.emplace(key.id, keys.size());
      keys.push_back(std::move(key));
    }
  }
  auto find = [&](const std::string& key_id) -> Key* {
    auto it = index.find(key_id);
    return it == index.end() ? nullptr : &keys[it->second];
  };
  {
    CUSTOS_ASSIGN_OR_RETURN(
        pg::Result v,
        Query(
            conn_,
            absl::StrCat("SELECT ", kVersionSelect,
                         ", key_id FROM key_versions ORDER BY key_id, number"),
            {}, "load versions"));
    for (int i = 0; i < v.rows(); ++i) {
      pg::Row row(v, i);
      Key* key = find(row.Text(5));
      if (key == nullptr) continue;
      CUSTOS_ASSIGN_OR_RETURN(KeyVersion version,
                              rows::VersionFromRow(row, key->id));
      CUSTOS_RETURN_IF_ERROR(rows::AppendVersion(*key, std::move(version)));
    }
  }
  {
    CUSTOS_ASSIGN_OR_RETURN(
        pg::Result a,
        Query(conn_, "SELECT key_id, name FROM aliases ORDER BY key_id, name",
              {}, "load aliases"));
    for (int i = 0; i < a.rows(); ++i) {
      pg::Row row(a, i);
      if (Key* key = find(row.Text(0))) key->aliases.push_back(row.Text(1));
    }
  }
  CUSTOS_RETURN_IF_ERROR(tx.Commit());
  return keys;
}

absl::StatusOr<Key> PostgresStore::LoadKey(absl::string_view id) {
  if (!Storable(id)) return NoSuch("key", id);
  absl::MutexLock lock(&mu_);
  CUSTOS_RETURN_IF_ERROR(EnsureConnected());
  Transaction tx(conn_);
  CUSTOS_RETURN_IF_ERROR(
      tx.Begin("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"));
  CUSTOS_ASSIGN_OR_RETURN(Key key, LoadKeyLocked(id, /*for_update=*/false));
  CUSTOS_RETURN_IF_ERROR(tx.Commit());
  return key;
}

absl::Status PostgresStore::InsertKey(const Key& key) {
  CUSTOS_RETURN_IF_ERROR(CheckStorable(key));
  absl::MutexLock lock(&mu_);
  CUSTOS_RETURN_IF_ERROR(EnsureConnected());
  Transaction tx(conn_);
  CUSTOS_RETURN_IF_ERROR(tx.Begin());
  absl::Status s =
      WriteKeyLocked(key, /*insert=*/true, /*first_new_version=*/1);
  if (absl::IsAlreadyExists(s) && absl::StrContains(s.message(), "keys_pkey")) {
    return absl::AlreadyExistsError(
        absl::StrCat("key ", key.id, " already exists"));
  }
  CUSTOS_RETURN_IF_ERROR(s);
  for (const std::string& alias : key.aliases) {
    absl::Status a =
        Exec(conn_,
             "INSERT INTO aliases (name, key_id, create_us) VALUES ($1,$2,$3)",
             {Text(alias), Text(key.id), Int(Micros(key.create_time))},
             "create alias")
            .status();
    if (absl::IsAlreadyExists(a)) {
      return absl::AlreadyExistsError(
          absl::StrCat("alias ", alias, " already exists"));
    }
    CUSTOS_RETURN_IF_ERROR(a);
  }
  CUSTOS_RETURN_IF_ERROR(NotifyLocked(key.id));
  return tx.Commit();
}

absl::StatusOr<Key> PostgresStore::UpdateKey(absl::string_view id,
                                             Mutator mutate) {
  if (!Storable(id)) return NoSuch("key", id);
  absl::MutexLock lock(&mu_);
  for (int attempt = 1;; ++attempt) {
    std::optional<Transaction> tx;
    absl::StatusOr<Key> key = absl::UnknownError("not read");
    absl::Status s = EnsureConnected();
    if (s.ok()) {
      tx.emplace(conn_);
      s = tx->Begin();
    }
    if (s.ok()) {
      key = LoadKeyLocked(id, /*for_update=*/true);
      s = key.status();
    }
    // Nothing has run yet: a conflict or a dropped connection is retried
    // (a lock timeout is not: it has waited long enough).
    const bool retry = absl::IsAborted(s) || (absl::IsUnavailable(s) &&
                                              PQstatus(conn_) != CONNECTION_OK);
    if (retry && attempt < kAttempts) {
      tx.reset();
      Backoff(attempt);
      continue;
    }
    CUSTOS_RETURN_IF_ERROR(s);
    const uint32_t first_new = static_cast<uint32_t>(key->versions.size()) + 1;
    CUSTOS_RETURN_IF_ERROR(mutate(*key));
    if (key->id != id) return absl::InternalError("a key's id cannot change");
    CUSTOS_RETURN_IF_ERROR(CheckStorable(*key));
    CUSTOS_RETURN_IF_ERROR(WriteKeyLocked(*key, /*insert=*/false, first_new));
    CUSTOS_RETURN_IF_ERROR(NotifyLocked(key->id));
    CUSTOS_RETURN_IF_ERROR(tx->Commit());
    return key;
  }
}

absl::Status PostgresStore::CreateAlias(const AliasRecord& alias) {
  if (!Storable(alias.key_id)) return NoSuch("key", alias.key_id);
  if (!Storable(alias.name)) {
    return absl::InvalidArgumentError(
        "alias: holds a NUL byte or invalid UTF-8");
  }
  absl::MutexLock lock(&mu_);
  CUSTOS_RETURN_IF_ERROR(EnsureConnected());
  Transaction tx(conn_);
  CUSTOS_RETURN_IF_ERROR(tx.Begin());
  // The key's row lock orders this against changes to the key.
  CUSTOS_ASSIGN_OR_RETURN(
      pg::Result k, Query(conn_, "SELECT 1 FROM keys WHERE id = $1 FOR UPDATE",
                          {Text(alias.key_id)}, "create alias"));
  if (k.rows() == 0) {
    return absl::NotFoundError(
        absl::StrCat("key ", alias.key_id, " not found"));
  }
  absl::Status s =
      Exec(conn_,
           "INSERT INTO aliases (name, key_id, create_us) VALUES ($1,$2,$3)",
           {Text(alias.name), Text(alias.key_id),
            Int(Micros(alias.create_time))},
           "create alias")
          .status();
  if (absl::IsAlreadyExists(s)) {
    return absl::AlreadyExistsError(
        absl::StrCat("alias ", alias.name, " already exists"));
  }
  CUSTOS_RETURN_IF_ERROR(s);
  CUSTOS_RETURN_IF_ERROR(NotifyLocked(alias.key_id));
  return tx.Commit();
}

absl::Status PostgresStore::DeleteAlias(absl::string_view alias) {
  if (!Storable(alias)) return NoSuch("alias", alias);
  absl::MutexLock lock(&mu_);
  CUSTOS_RETURN_IF_ERROR(EnsureConnected());
  Transaction tx(conn_);
  CUSTOS_RETURN_IF_ERROR(tx.Begin());
  CUSTOS_ASSIGN_OR_RETURN(
      pg::Result d,
      Query(conn_, "DELETE FROM aliases WHERE name = $1 RETURNING key_id",
            {Text(alias)}, "delete alias"));
  if (d.rows() == 0) {
    return absl::NotFoundError(absl::StrCat("alias ", alias, " not found"));
  }
  CUSTOS_RETURN_IF_ERROR(NotifyLocked(pg::Row(d, 0).Text(0)));
  return tx.Commit();
}

absl::StatusOr<std::vector<AliasRecord>> PostgresStore::ListAliases() {
  absl::MutexLock lock(&mu_);
  CUSTOS_RETURN_IF_ERROR(EnsureConnected());
  CUSTOS_ASSIGN_OR_RETURN(
      pg::Result q,
      Query(conn_, "SELECT name, key_id, create_us FROM aliases ORDER BY name",
            {}, "list aliases"));
  std::vector<AliasRecord> out;
  for (int i = 0; i < q.rows(); ++i) {
    pg::Row row(q, i);
    out.push_back({row.Text(0), row.Text(1), FromMicros(row.Int(2))});
  }
  return out;
}

absl::StatusOr<std::optional<Deployment>> PostgresStore::LoadDeployment() {
  absl::MutexLock lock(&mu_);
  CUSTOS_RETURN_IF_ERROR(EnsureConnected());
  CUSTOS_ASSIGN_OR_RETURN(
      pg::Result q,
      Query(conn_,
            "SELECT encode(id, 'hex'), token_label, token_serial, create_us "
            "FROM deployment",
            {}, "load deployment"));
  if (q.rows() == 0) return std::nullopt;
  pg::Row row(q, 0);
  return Deployment{row.Blob(0), row.Text(1), row.Text(2),
                    FromMicros(row.Int(3))};
}

absl::Status PostgresStore::InsertDeployment(const Deployment& deployment) {
  if (!Storable(deployment.token_label) || !Storable(deployment.token_serial)) {
    return absl::InvalidArgumentError("token label or serial is not UTF-8");
  }
  absl::MutexLock lock(&mu_);
  CUSTOS_RETURN_IF_ERROR(EnsureConnected());
  absl::Status s =
      Exec(conn_,
           "INSERT INTO deployment (singleton, id, token_label, "
           "token_serial, create_us) VALUES (1, decode($1, 'hex'), $2, $3, "
           "$4)",
           {absl::BytesToHexString(deployment.id), Text(deployment.token_label),
            Text(deployment.token_serial), Int(Micros(deployment.create_time))},
           "record deployment")
          .status();
  if (absl::IsAlreadyExists(s)) {
    return absl::AlreadyExistsError("the database already has a deployment");
  }
  return s;
}

absl::Status PostgresStore::InsertIntent(const MaterialIntent& intent) {
  if (!Storable(intent.key_id)) {
    return absl::InvalidArgumentError("key id is not UTF-8");
  }
  absl::MutexLock lock(&mu_);
  CUSTOS_RETURN_IF_ERROR(EnsureConnected());
  return Exec(conn_,
              "INSERT INTO material_intents (hsm_id, key_id, number, "
              "create_us) VALUES (decode($1, 'hex'), $2, $3, $4)",
              {absl::BytesToHexString(intent.hsm_id), Text(intent.key_id),
               Int(intent.version), Int(Micros(intent.create_time))},
              "record generate-intent")
      .status();
}

absl::StatusOr<std::vector<MaterialIntent>> PostgresStore::ListIntents() {
  absl::MutexLock lock(&mu_);
  CUSTOS_RETURN_IF_ERROR(EnsureConnected());
  CUSTOS_ASSIGN_OR_RETURN(
      pg::Result q,
      Query(conn_,
            "SELECT encode(hsm_id, 'hex'), key_id, number, create_us, "
            "claimed FROM material_intents ORDER BY create_us",
            {}, "list intents"));
  std::vector<MaterialIntent> out;
  for (int i = 0; i < q.rows(); ++i) {
    pg::Row row(q, i);
    out.push_back({row.Blob(0), row.Text(1), static_cast<uint32_t>(row.Int(2)),
                   FromMicros(row.Int(3)), row.Int(4) != 0});
  }
  return out;
}

absl::Status PostgresStore::DeleteIntent(absl::string_view hsm_id) {
  absl::MutexLock lock(&mu_);
  CUSTOS_RETURN_IF_ERROR(EnsureConnected());
  return Exec(conn_,
              "DELETE FROM material_intents WHERE hsm_id = decode($1, 'hex')",
              {absl::BytesToHexString(hsm_id)}, "delete intent")
      .status();
}

absl::StatusOr<bool> PostgresStore::ClaimIntent(absl::string_view hsm_id) {
  absl::MutexLock lock(&mu_);
  CUSTOS_RETURN_IF_ERROR(EnsureConnected());
  // One statement: it waits for a commit holding the intent's row lock,
  // then sees the row gone (settled) or still there.
  const std::string hex = absl::BytesToHexString(hsm_id);
  CUSTOS_ASSIGN_OR_RETURN(
      pg::Result r,
      Query(conn_,
            "UPDATE material_intents SET claimed = 1 WHERE hsm_id = "
            "decode($1, 'hex') AND NOT EXISTS (SELECT 1 FROM key_versions "
            "WHERE hsm_id = decode($1, 'hex')) RETURNING 1",
            {hex}, "claim intent"));
  return r.rows() == 1;
}

absl::StatusOr<std::unique_ptr<ChangeFeed>> PostgresStore::WatchChanges() {
  return std::make_unique<PostgresChangeFeed>(url_);
}

absl::StatusOr<std::unique_ptr<Leadership>> PostgresStore::NewLeadership() {
  return std::make_unique<PostgresLeadership>(url_);
}

}  // namespace custos::kms
