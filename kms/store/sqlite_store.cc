#include "kms/store/sqlite_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "kms/store/rows.h"

namespace custos::kms {
namespace {

// Versioned migrations, applied in order, each in its own transaction. Never
// edit a released migration: add a new one.
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
  rotation_period_s INTEGER NOT NULL DEFAULT 0,
  next_rotation_us INTEGER,
  primary_version INTEGER NOT NULL,
  create_us INTEGER NOT NULL,
  update_us INTEGER NOT NULL,
  deletion_us INTEGER,
  policy TEXT NOT NULL
);
CREATE TABLE key_versions (
  key_id TEXT NOT NULL REFERENCES keys(id),
  number INTEGER NOT NULL,
  state INTEGER NOT NULL,
  hsm_id BLOB NOT NULL,
  create_us INTEGER NOT NULL,
  encryptions_reserved INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (key_id, number)
);
CREATE UNIQUE INDEX key_versions_hsm_id ON key_versions(hsm_id);
CREATE TABLE aliases (
  name TEXT PRIMARY KEY,
  key_id TEXT NOT NULL REFERENCES keys(id),
  create_us INTEGER NOT NULL
);
CREATE INDEX aliases_key_id ON aliases(key_id);
)sql"},
    // The deletion window measured on custosd's monotonic clock (see
    // Key::deletion_window). A key already pending keeps the window it was
    // given (deletion time less the time it was scheduled).
    {2, R"sql(
ALTER TABLE keys ADD COLUMN deletion_window_us INTEGER NOT NULL DEFAULT 0;
ALTER TABLE keys ADD COLUMN deletion_elapsed_us INTEGER NOT NULL DEFAULT 0;
UPDATE keys SET deletion_window_us = MAX(0, deletion_us - update_us)
  WHERE state = 3 AND deletion_us IS NOT NULL;
)sql"},
    // Key::destruction_started.
    {3, R"sql(
ALTER TABLE keys ADD COLUMN destruction_started INTEGER NOT NULL DEFAULT 0;
)sql"},
    // The deployment and its token (Deployment), and generate-intents
    // (MaterialIntent).
    {4, R"sql(
CREATE TABLE deployment (
  singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
  id BLOB NOT NULL,
  token_label TEXT NOT NULL,
  token_serial TEXT NOT NULL,
  create_us INTEGER NOT NULL
);
CREATE TABLE material_intents (
  hsm_id BLOB PRIMARY KEY,
  key_id TEXT NOT NULL,
  number INTEGER NOT NULL,
  create_us INTEGER NOT NULL,
  claimed INTEGER NOT NULL DEFAULT 0
);
)sql"},
};

// Prepared statement, finalised on destruction.
class Stmt {
 public:
  Stmt(sqlite3* db, const char* sql) : db_(db) {
    rc_ = sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr);
  }
  ~Stmt() { sqlite3_finalize(stmt_); }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;

  absl::Status prepared() const {
    if (rc_ == SQLITE_OK) return absl::OkStatus();
    return absl::InternalError(
        absl::StrCat("sqlite prepare: ", sqlite3_errmsg(db_)));
  }
  Stmt& Bind(int i, absl::string_view text) {
    sqlite3_bind_text(stmt_, i, text.data(), static_cast<int>(text.size()),
                      SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& BindBlob(int i, absl::string_view bytes) {
    sqlite3_bind_blob(stmt_, i, bytes.data(), static_cast<int>(bytes.size()),
                      SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& Bind(int i, int64_t v) {
    sqlite3_bind_int64(stmt_, i, v);
    return *this;
  }
  Stmt& BindNull(int i) {
    sqlite3_bind_null(stmt_, i);
    return *this;
  }
  // SQLITE_ROW, SQLITE_DONE, or an error code.
  int Step() { return sqlite3_step(stmt_); }
  std::string Text(int col) const {
    const unsigned char* p = sqlite3_column_text(stmt_, col);
    return p ? std::string(reinterpret_cast<const char*>(p),
                           sqlite3_column_bytes(stmt_, col))
             : std::string();
  }
  std::string Blob(int col) const {
    const void* p = sqlite3_column_blob(stmt_, col);
    return p ? std::string(static_cast<const char*>(p),
                           sqlite3_column_bytes(stmt_, col))
             : std::string();
  }
  int64_t Int(int col) const { return sqlite3_column_int64(stmt_, col); }
  bool IsNull(int col) const {
    return sqlite3_column_type(stmt_, col) == SQLITE_NULL;
  }

 private:
  sqlite3* db_;
  sqlite3_stmt* stmt_ = nullptr;
  int rc_;
};

// Maps a SQLite result code to a status. Busy and I/O trouble are
// UNAVAILABLE (retry later); constraint violations ALREADY_EXISTS.
absl::Status SqliteStatus(sqlite3* db, int rc, absl::string_view what) {
  if (rc == SQLITE_OK || rc == SQLITE_DONE || rc == SQLITE_ROW) {
    return absl::OkStatus();
  }
  std::string msg = absl::StrCat("database ", what, ": ", sqlite3_errmsg(db));
  switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_IOERR:
    case SQLITE_FULL:
    case SQLITE_READONLY:
    case SQLITE_CANTOPEN:
      return absl::UnavailableError(msg);
    case SQLITE_CONSTRAINT:
      return absl::AlreadyExistsError(msg);
    default:
      return absl::InternalError(msg);
  }
}

// Rolls back unless committed.
class Transaction {
 public:
  explicit Transaction(sqlite3* db) : db_(db) {}
  ~Transaction() {
    if (open_) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  }
  absl::Status Begin() {
    int rc = sqlite3_exec(db_, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr);
    CUSTOS_RETURN_IF_ERROR(SqliteStatus(db_, rc, "begin"));
    open_ = true;
    return absl::OkStatus();
  }
  // A read transaction: several SELECTs see one snapshot (WAL readers never
  // block the writer, nor wait for it).
  absl::Status BeginRead() {
    int rc = sqlite3_exec(db_, "BEGIN DEFERRED", nullptr, nullptr, nullptr);
    CUSTOS_RETURN_IF_ERROR(SqliteStatus(db_, rc, "begin"));
    open_ = true;
    return absl::OkStatus();
  }
  absl::Status Commit() {
    int rc = sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr);
    CUSTOS_RETURN_IF_ERROR(SqliteStatus(db_, rc, "commit"));
    open_ = false;
    return absl::OkStatus();
  }

 private:
  sqlite3* db_;
  bool open_ = false;
};

using rows::AppendVersion;
using rows::FromMicros;
using rows::kVersionColumns;
using rows::Micros;

// SELECT of every keys column that rows::KeyFromRow reads.
std::string SelectKeys() {
  return absl::StrCat("SELECT ", rows::kKeyColumns, " FROM keys");
}

}  // namespace

absl::StatusOr<std::unique_ptr<SqliteStore>> SqliteStore::Open(
    const std::string& path, OpenMode mode) {
  struct stat st;
  const bool exists = stat(path.c_str(), &st) == 0;
  if (!exists && mode == OpenMode::kExisting) {
    return NotInitialisedError(
        absl::StrCat("the SQLite database '", path, "' does not exist"));
  }
  if (!exists) {
    // Created here, owner-only, before SQLite opens it: key policies and
    // the key inventory are nobody else's business.
    const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (fd < 0 && errno != EEXIST) {
      return absl::UnavailableError(
          absl::StrCat("storage: cannot create SQLite database '", path,
                       "': ", strerror(errno)));
    }
    if (fd >= 0) close(fd);
  }
  sqlite3* db = nullptr;
  int rc =
      sqlite3_open_v2(path.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_FULLMUTEX, nullptr);
  if (rc != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return absl::UnavailableError(absl::StrCat(
        "storage: cannot open SQLite database '", path, "': ", msg));
  }
  std::unique_ptr<SqliteStore> store(new SqliteStore(db, path));
  absl::MutexLock lock(&store->mu_);
  sqlite3_busy_timeout(db, 5000);
  if (mode == OpenMode::kExisting) {
    // Before anything writes to it (WAL mode would).
    CUSTOS_ASSIGN_OR_RETURN(bool has_schema, store->HasSchema());
    if (!has_schema) {
      return NotInitialisedError(absl::StrCat("the SQLite database '", path,
                                              "' has no Custos schema"));
    }
  }
  // Processes opening a new database together (custosd and the CLI, or
  // tests) can meet SQLITE_BUSY without the busy handler while one of them
  // switches the file to WAL: each step is idempotent, so run them again.
  for (int attempt = 1;; ++attempt) {
    absl::Status s = store->Exec("PRAGMA journal_mode=WAL");
    if (s.ok()) s = store->Exec("PRAGMA synchronous=FULL");
    if (s.ok()) s = store->Exec("PRAGMA foreign_keys=ON");
    if (s.ok()) s = store->Migrate();
    if (s.ok()) return store;
    if (!absl::IsUnavailable(s) || attempt == 50) return s;
    absl::SleepFor(absl::Milliseconds(20));
  }
}

absl::StatusOr<bool> SqliteStore::HasSchema() {
  Stmt q(db_,
         "SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
         "name = 'schema_migrations'");
  if (!q.prepared().ok()) {
    // Not a database at all (a file of something else).
    return absl::FailedPreconditionError(
        absl::StrCat("storage: '", path_,
                     "' is not a SQLite database: ", sqlite3_errmsg(db_)));
  }
  const int rc = q.Step();
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  return SqliteStatus(db_, rc, "read schema");
}

SqliteStore::~SqliteStore() { sqlite3_close(db_); }

absl::Status SqliteStore::Exec(const char* sql) {
  char* err = nullptr;
  int rc = sqlite3_exec(db_, sql, nullptr, nullptr, &err);
  absl::Status s = SqliteStatus(db_, rc, "exec");
  sqlite3_free(err);
  return s;
}

absl::StatusOr<int> SqliteStore::ReadSchemaVersion() {
  Stmt current(db_, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations");
  CUSTOS_RETURN_IF_ERROR(current.prepared());
  if (current.Step() != SQLITE_ROW) {
    return SqliteStatus(db_, sqlite3_errcode(db_), "read schema version");
  }
  return static_cast<int>(current.Int(0));
}

absl::Status SqliteStore::Migrate() {
  CUSTOS_RETURN_IF_ERROR(
      Exec("CREATE TABLE IF NOT EXISTS schema_migrations ("
           "version INTEGER PRIMARY KEY, applied_us INTEGER NOT NULL)"));
  CUSTOS_ASSIGN_OR_RETURN(schema_version_, ReadSchemaVersion());
  constexpr int kLatest = kMigrations[std::size(kMigrations) - 1].version;
  if (schema_version_ > kLatest) {
    return absl::FailedPreconditionError(
        absl::StrCat("storage: database schema version ", schema_version_,
                     " is newer than this custosd understands (", kLatest,
                     "); run a newer custosd"));
  }
  for (const Migration& m : kMigrations) {
    if (m.version <= schema_version_) continue;
    Transaction tx(db_);
    CUSTOS_RETURN_IF_ERROR(tx.Begin());
    // Another process opening the database at the same time may have
    // migrated it meanwhile: read again under the write lock.
    CUSTOS_ASSIGN_OR_RETURN(schema_version_, ReadSchemaVersion());
    if (m.version <= schema_version_) continue;
    CUSTOS_RETURN_IF_ERROR(Exec(m.sql));
    Stmt record(db_,
                "INSERT INTO schema_migrations(version, applied_us) "
                "VALUES (?, ?)");
    CUSTOS_RETURN_IF_ERROR(record.prepared());
    record.Bind(1, int64_t{m.version}).Bind(2, Micros(absl::Now()));
    CUSTOS_RETURN_IF_ERROR(SqliteStatus(db_, record.Step(), "migrate"));
    CUSTOS_RETURN_IF_ERROR(tx.Commit());
    schema_version_ = m.version;
  }
  return absl::OkStatus();
}

absl::StatusOr<Key> SqliteStore::LoadKeyLocked(absl::string_view id) {
  Stmt q(db_, absl::StrCat(SelectKeys(), " WHERE id = ?").c_str());
  CUSTOS_RETURN_IF_ERROR(q.prepared());
  q.Bind(1, id);
  int rc = q.Step();
  if (rc == SQLITE_DONE) {
    return absl::NotFoundError(absl::StrCat("key ", id, " not found"));
  }
  if (rc != SQLITE_ROW) return SqliteStatus(db_, rc, "load key");
  CUSTOS_ASSIGN_OR_RETURN(Key key, rows::KeyFromRow(q));
  Stmt v(db_,
         absl::StrCat("SELECT ", kVersionColumns,
                      " FROM key_versions WHERE key_id = ? ORDER BY number")
             .c_str());
  CUSTOS_RETURN_IF_ERROR(v.prepared());
  v.Bind(1, id);
  while ((rc = v.Step()) == SQLITE_ROW) {
    CUSTOS_ASSIGN_OR_RETURN(KeyVersion version,
                            rows::VersionFromRow(v, key.id));
    CUSTOS_RETURN_IF_ERROR(AppendVersion(key, std::move(version)));
  }
  if (rc != SQLITE_DONE) return SqliteStatus(db_, rc, "load versions");
  Stmt a(db_, "SELECT name FROM aliases WHERE key_id = ? ORDER BY name");
  CUSTOS_RETURN_IF_ERROR(a.prepared());
  a.Bind(1, id);
  while ((rc = a.Step()) == SQLITE_ROW) key.aliases.push_back(a.Text(0));
  if (rc != SQLITE_DONE) return SqliteStatus(db_, rc, "load aliases");
  return key;
}

absl::Status SqliteStore::SettleIntentLocked(const KeyVersion& version) {
  Stmt q(db_, "SELECT claimed FROM material_intents WHERE hsm_id = ?");
  CUSTOS_RETURN_IF_ERROR(q.prepared());
  q.BindBlob(1, version.hsm_id);
  const int rc = q.Step();
  if (rc == SQLITE_DONE) return absl::OkStatus();  // made without an intent
  if (rc != SQLITE_ROW) return SqliteStatus(db_, rc, "settle intent");
  if (q.Int(0) != 0) {
    return absl::AbortedError(
        absl::StrCat("version ", version.number,
                     "'s HSM object was claimed as garbage before its commit"));
  }
  Stmt d(db_, "DELETE FROM material_intents WHERE hsm_id = ?");
  CUSTOS_RETURN_IF_ERROR(d.prepared());
  d.BindBlob(1, version.hsm_id);
  return SqliteStatus(db_, d.Step(), "settle intent");
}

absl::Status SqliteStore::WriteKeyLocked(const Key& key, bool insert,
                                         uint32_t first_new_version) {
  Stmt k(db_, insert ? "INSERT INTO keys (description, labels, purpose, state, "
                       "rotation_period_s, next_rotation_us, primary_version, "
                       "create_us, update_us, deletion_us, policy, "
                       "deletion_window_us, deletion_elapsed_us, "
                       "destruction_started, id) "
                       "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                     : "UPDATE keys SET description=?, labels=?, purpose=?, "
                       "state=?, rotation_period_s=?, next_rotation_us=?, "
                       "primary_version=?, create_us=?, update_us=?, "
                       "deletion_us=?, policy=?, deletion_window_us=?, "
                       "deletion_elapsed_us=?, destruction_started=? "
                       "WHERE id=?");
  CUSTOS_RETURN_IF_ERROR(k.prepared());
  k.Bind(1, key.description)
      .Bind(2, rows::LabelsToJson(key.labels))
      .Bind(3, static_cast<int64_t>(key.purpose))
      .Bind(4, static_cast<int64_t>(key.state))
      .Bind(5, absl::ToInt64Seconds(key.rotation_period));
  if (key.next_rotation_time == absl::InfinitePast()) {
    k.BindNull(6);
  } else {
    k.Bind(6, Micros(key.next_rotation_time));
  }
  k.Bind(7, int64_t{key.primary_version})
      .Bind(8, Micros(key.create_time))
      .Bind(9, Micros(key.update_time));
  if (key.deletion_time == absl::InfinitePast()) {
    k.BindNull(10);
  } else {
    k.Bind(10, Micros(key.deletion_time));
  }
  k.Bind(11, PolicyToJson(key.policy))
      .Bind(12, absl::ToInt64Microseconds(key.deletion_window))
      .Bind(13, absl::ToInt64Microseconds(key.deletion_elapsed))
      .Bind(14, int64_t{key.destruction_started ? 1 : 0})
      .Bind(15, key.id);
  CUSTOS_RETURN_IF_ERROR(SqliteStatus(db_, k.Step(), "write key"));
  if (!insert && sqlite3_changes(db_) != 1) {
    return absl::NotFoundError(absl::StrCat("key ", key.id, " not found"));
  }
  for (const KeyVersion& v : key.versions) {
    if (v.number >= first_new_version) {
      CUSTOS_RETURN_IF_ERROR(SettleIntentLocked(v));
    }
    Stmt w(db_,
           "INSERT INTO key_versions (key_id, number, state, hsm_id, "
           "create_us, encryptions_reserved) VALUES (?,?,?,?,?,?) "
           "ON CONFLICT(key_id, number) DO UPDATE SET state=excluded.state, "
           "encryptions_reserved=excluded.encryptions_reserved");
    CUSTOS_RETURN_IF_ERROR(w.prepared());
    w.Bind(1, key.id)
        .Bind(2, int64_t{v.number})
        .Bind(3, static_cast<int64_t>(v.state))
        .BindBlob(4, v.hsm_id)
        .Bind(5, Micros(v.create_time))
        .Bind(6, static_cast<int64_t>(v.encryptions_reserved));
    CUSTOS_RETURN_IF_ERROR(SqliteStatus(db_, w.Step(), "write version"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Key>> SqliteStore::LoadAllKeys() {
  absl::MutexLock lock(&mu_);
  // Three scans joined in memory, in one snapshot, rather than three
  // statements per key: start-up reads every key.
  Transaction tx(db_);
  CUSTOS_RETURN_IF_ERROR(tx.BeginRead());
  std::vector<Key> keys;
  absl::flat_hash_map<std::string, size_t> index;  // key id -> keys[i]
  {
    Stmt q(db_, absl::StrCat(SelectKeys(), " ORDER BY create_us, id").c_str());
    CUSTOS_RETURN_IF_ERROR(q.prepared());
    int rc;
    while ((rc = q.Step()) == SQLITE_ROW) {
      CUSTOS_ASSIGN_OR_RETURN(Key key, rows::KeyFromRow(q));
      index.emplace(key.id, keys.size());
      keys.push_back(std::move(key));
    }
    if (rc != SQLITE_DONE) return SqliteStatus(db_, rc, "list keys");
  }
  // Rows whose key_id has no keys row cannot exist (foreign keys are on);
  // were there any, they would be skipped, as the per-key reads did.
  auto find = [&](const std::string& key_id) -> Key* {
    auto it = index.find(key_id);
    return it == index.end() ? nullptr : &keys[it->second];
  };
  {
    // Ordered by number within each key, as AppendVersion requires.
    Stmt v(db_, absl::StrCat("SELECT ", kVersionColumns,
                             ", key_id FROM key_versions "
                             "ORDER BY key_id, number")
                    .c_str());
    CUSTOS_RETURN_IF_ERROR(v.prepared());
    int rc;
    while ((rc = v.Step()) == SQLITE_ROW) {
      Key* key = find(v.Text(5));
      if (key == nullptr) continue;
      CUSTOS_ASSIGN_OR_RETURN(KeyVersion version,
                              rows::VersionFromRow(v, key->id));
      CUSTOS_RETURN_IF_ERROR(AppendVersion(*key, std::move(version)));
    }
    if (rc != SQLITE_DONE) return SqliteStatus(db_, rc, "load versions");
  }
  {
    Stmt a(db_, "SELECT key_id, name FROM aliases ORDER BY key_id, name");
    CUSTOS_RETURN_IF_ERROR(a.prepared());
    int rc;
    while ((rc = a.Step()) == SQLITE_ROW) {
      if (Key* key = find(a.Text(0))) key->aliases.push_back(a.Text(1));
    }
    if (rc != SQLITE_DONE) return SqliteStatus(db_, rc, "load aliases");
  }
  CUSTOS_RETURN_IF_ERROR(tx.Commit());
  return keys;
}

absl::StatusOr<Key> SqliteStore::LoadKey(absl::string_view id) {
  absl::MutexLock lock(&mu_);
  return LoadKeyLocked(id);
}

absl::Status SqliteStore::InsertKey(const Key& key) {
  absl::MutexLock lock(&mu_);
  Transaction tx(db_);
  CUSTOS_RETURN_IF_ERROR(tx.Begin());
  CUSTOS_RETURN_IF_ERROR(
      WriteKeyLocked(key, /*insert=*/true, /*first_new_version=*/1));
  for (const std::string& alias : key.aliases) {
    Stmt a(db_, "INSERT INTO aliases (name, key_id, create_us) VALUES (?,?,?)");
    CUSTOS_RETURN_IF_ERROR(a.prepared());
    a.Bind(1, alias).Bind(2, key.id).Bind(3, Micros(key.create_time));
    absl::Status s = SqliteStatus(db_, a.Step(), "create alias");
    if (absl::IsAlreadyExists(s)) {
      return absl::AlreadyExistsError(
          absl::StrCat("alias ", alias, " already exists"));
    }
    CUSTOS_RETURN_IF_ERROR(s);
  }
  return tx.Commit();
}

absl::StatusOr<Key> SqliteStore::UpdateKey(absl::string_view id,
                                           Mutator mutate) {
  absl::MutexLock lock(&mu_);
  Transaction tx(db_);
  CUSTOS_RETURN_IF_ERROR(tx.Begin());
  CUSTOS_ASSIGN_OR_RETURN(Key key, LoadKeyLocked(id));
  const uint32_t first_new = static_cast<uint32_t>(key.versions.size()) + 1;
  CUSTOS_RETURN_IF_ERROR(mutate(key));
  if (key.id != id) return absl::InternalError("a key's id cannot change");
  CUSTOS_RETURN_IF_ERROR(WriteKeyLocked(key, /*insert=*/false, first_new));
  CUSTOS_RETURN_IF_ERROR(tx.Commit());
  return key;
}

absl::Status SqliteStore::CreateAlias(const AliasRecord& alias) {
  absl::MutexLock lock(&mu_);
  Transaction tx(db_);
  CUSTOS_RETURN_IF_ERROR(tx.Begin());
  {
    Stmt k(db_, "SELECT 1 FROM keys WHERE id = ?");
    CUSTOS_RETURN_IF_ERROR(k.prepared());
    k.Bind(1, alias.key_id);
    const int rc = k.Step();
    if (rc == SQLITE_DONE) {
      return absl::NotFoundError(
          absl::StrCat("key ", alias.key_id, " not found"));
    }
    if (rc != SQLITE_ROW) return SqliteStatus(db_, rc, "create alias");
  }
  Stmt a(db_, "INSERT INTO aliases (name, key_id, create_us) VALUES (?,?,?)");
  CUSTOS_RETURN_IF_ERROR(a.prepared());
  a.Bind(1, alias.name)
      .Bind(2, alias.key_id)
      .Bind(3, Micros(alias.create_time));
  absl::Status s = SqliteStatus(db_, a.Step(), "create alias");
  if (absl::IsAlreadyExists(s)) {
    return absl::AlreadyExistsError(
        absl::StrCat("alias ", alias.name, " already exists"));
  }
  CUSTOS_RETURN_IF_ERROR(s);
  return tx.Commit();
}

absl::Status SqliteStore::DeleteAlias(absl::string_view alias) {
  absl::MutexLock lock(&mu_);
  Stmt d(db_, "DELETE FROM aliases WHERE name = ?");
  CUSTOS_RETURN_IF_ERROR(d.prepared());
  d.Bind(1, alias);
  CUSTOS_RETURN_IF_ERROR(SqliteStatus(db_, d.Step(), "delete alias"));
  if (sqlite3_changes(db_) == 0) {
    return absl::NotFoundError(absl::StrCat("alias ", alias, " not found"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<AliasRecord>> SqliteStore::ListAliases() {
  absl::MutexLock lock(&mu_);
  Stmt q(db_, "SELECT name, key_id, create_us FROM aliases ORDER BY name");
  CUSTOS_RETURN_IF_ERROR(q.prepared());
  std::vector<AliasRecord> out;
  int rc;
  while ((rc = q.Step()) == SQLITE_ROW) {
    out.push_back({q.Text(0), q.Text(1), FromMicros(q.Int(2))});
  }
  if (rc != SQLITE_DONE) return SqliteStatus(db_, rc, "list aliases");
  return out;
}

absl::StatusOr<std::optional<Deployment>> SqliteStore::LoadDeployment() {
  absl::MutexLock lock(&mu_);
  Stmt q(db_,
         "SELECT id, token_label, token_serial, create_us FROM deployment");
  CUSTOS_RETURN_IF_ERROR(q.prepared());
  const int rc = q.Step();
  if (rc == SQLITE_DONE) return std::nullopt;
  if (rc != SQLITE_ROW) return SqliteStatus(db_, rc, "load deployment");
  return Deployment{q.Blob(0), q.Text(1), q.Text(2), FromMicros(q.Int(3))};
}

absl::Status SqliteStore::InsertDeployment(const Deployment& deployment) {
  absl::MutexLock lock(&mu_);
  Stmt w(db_,
         "INSERT INTO deployment (singleton, id, token_label, token_serial, "
         "create_us) VALUES (1, ?, ?, ?, ?)");
  CUSTOS_RETURN_IF_ERROR(w.prepared());
  w.BindBlob(1, deployment.id)
      .Bind(2, deployment.token_label)
      .Bind(3, deployment.token_serial)
      .Bind(4, Micros(deployment.create_time));
  absl::Status s = SqliteStatus(db_, w.Step(), "record deployment");
  if (absl::IsAlreadyExists(s)) {
    return absl::AlreadyExistsError("the database already has a deployment");
  }
  return s;
}

absl::Status SqliteStore::InsertIntent(const MaterialIntent& intent) {
  absl::MutexLock lock(&mu_);
  Stmt w(db_,
         "INSERT INTO material_intents (hsm_id, key_id, number, create_us) "
         "VALUES (?, ?, ?, ?)");
  CUSTOS_RETURN_IF_ERROR(w.prepared());
  w.BindBlob(1, intent.hsm_id)
      .Bind(2, intent.key_id)
      .Bind(3, int64_t{intent.version})
      .Bind(4, Micros(intent.create_time));
  return SqliteStatus(db_, w.Step(), "record generate-intent");
}

absl::StatusOr<std::vector<MaterialIntent>> SqliteStore::ListIntents() {
  absl::MutexLock lock(&mu_);
  Stmt q(db_,
         "SELECT hsm_id, key_id, number, create_us, claimed "
         "FROM material_intents ORDER BY create_us");
  CUSTOS_RETURN_IF_ERROR(q.prepared());
  std::vector<MaterialIntent> out;
  int rc;
  while ((rc = q.Step()) == SQLITE_ROW) {
    out.push_back({q.Blob(0), q.Text(1), static_cast<uint32_t>(q.Int(2)),
                   FromMicros(q.Int(3)), q.Int(4) != 0});
  }
  if (rc != SQLITE_DONE) return SqliteStatus(db_, rc, "list intents");
  return out;
}

absl::Status SqliteStore::DeleteIntent(absl::string_view hsm_id) {
  absl::MutexLock lock(&mu_);
  Stmt d(db_, "DELETE FROM material_intents WHERE hsm_id = ?");
  CUSTOS_RETURN_IF_ERROR(d.prepared());
  d.BindBlob(1, hsm_id);
  return SqliteStatus(db_, d.Step(), "delete intent");
}

absl::StatusOr<bool> SqliteStore::ClaimIntent(absl::string_view hsm_id) {
  absl::MutexLock lock(&mu_);
  Transaction tx(db_);
  CUSTOS_RETURN_IF_ERROR(tx.Begin());
  Stmt u(db_,
         "UPDATE material_intents SET claimed = 1 WHERE hsm_id = ? AND NOT "
         "EXISTS (SELECT 1 FROM key_versions WHERE hsm_id = ?)");
  CUSTOS_RETURN_IF_ERROR(u.prepared());
  u.BindBlob(1, hsm_id).BindBlob(2, hsm_id);
  CUSTOS_RETURN_IF_ERROR(SqliteStatus(db_, u.Step(), "claim intent"));
  const bool claimed = sqlite3_changes(db_) == 1;
  CUSTOS_RETURN_IF_ERROR(tx.Commit());
  return claimed;
}

}  // namespace custos::kms
