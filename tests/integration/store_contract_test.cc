// The Store contract (kms/store/store.h), run against every backend: a
// SQLite file in a temporary directory, and a fresh database on a real
// PostgreSQL server (tests/support/postgres_server.h; one server per test
// suite, one database per test). Round trips of every field, transactional
// updates, alias rules, refusal of rows the store cannot trust
// (docs/security.md: an unknown state is never treated as enabled), durability
// across reopen, migrations; and what several replicas on one database rely on:
// changes seen across stores, concurrent updates that lose nothing, concurrent
// inserts and aliases granted once, migrations that do not race.
//
// The tests that corrupt rows do so through a raw connection (sqlite3 or
// libpq), as a DBA or an attacker with database access would.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <libpq-fe.h>
#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <latch>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/testing/status_matchers.h"
#include "kms/key.h"
#include "kms/policy.h"
#include "kms/store/store.h"
#include "tests/integration/store_samples.h"
#include "tests/support/postgres_server.h"
#include "tests/support/test_token.h"

namespace custos::kms {
namespace {

using ::custos::kms::store_samples::ExpectSameKey;
using ::custos::kms::store_samples::kLatestSchemaVersion;
using ::custos::kms::store_samples::kT0;
using ::custos::kms::store_samples::SampleKey;
using ::custos::testing::IsOk;
using ::custos::testing::IsOkAndHolds;
using ::custos::testing::PostgresServer;
using ::custos::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr char kSqlite[] = "sqlite";
constexpr char kPostgres[] = "postgresql";

// Owns a raw libpq connection.
struct PgConnCloser {
  void operator()(PGconn* c) const { PQfinish(c); }
};
using PgConn = std::unique_ptr<PGconn, PgConnCloser>;
struct PgResultClearer {
  void operator()(PGresult* r) const { PQclear(r); }
};
using PgResult = std::unique_ptr<PGresult, PgResultClearer>;

// The parameter is the backend, "sqlite" or "postgresql". Each test gets a
// fresh, empty database of that kind, named by url_. For PostgreSQL, the
// server starts with the suite's first PostgreSQL test and stops after its
// last.
class StoreContractTest : public ::testing::TestWithParam<std::string> {
 protected:
  static void TearDownTestSuite() {
    server_.reset();
    server_error_ = absl::OkStatus();
  }

  void SetUp() override {
    absl::StatusOr<std::string> dir =
        ::custos::testing::MakeTempDir("custos-store");
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_ = *dir;
    if (postgres()) {
      ASSERT_THAT(StartServerOnce(), IsOk());
    }
    absl::StatusOr<std::string> url = NewDatabase();
    ASSERT_THAT(url, IsOk());
    url_ = *url;
  }
  void TearDown() override {
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  bool postgres() const { return GetParam() == kPostgres; }

  // Starts the suite's server, or returns why it could not start (once: a
  // server that cannot start fails every PostgreSQL test quickly).
  static absl::Status StartServerOnce() {
    if (server_ != nullptr || !server_error_.ok()) return server_error_;
    const absl::Time start = absl::Now();
    absl::StatusOr<std::unique_ptr<PostgresServer>> server =
        PostgresServer::Start();
    if (!server.ok()) {
      server_error_ = server.status();
      return server_error_;
    }
    server_ = *std::move(server);
    std::fprintf(stderr, "PostgreSQL on port %d, started in %s\n",
                 server_->port(),
                 absl::FormatDuration(absl::Now() - start).c_str());
    return absl::OkStatus();
  }

  // The URL of another fresh, empty database.
  absl::StatusOr<std::string> NewDatabase() {
    const int n = databases_++;
    if (!postgres()) {
      return absl::StrCat("sqlite://", dir_, "/custos-", n, ".db");
    }
    // Named after the test, for reading the server's log.
    std::string name = absl::AsciiStrToLower(
        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::replace_if(
        name.begin(), name.end(),
        [](char c) { return !absl::ascii_isalnum(c); }, '_');
    name = absl::StrCat("t", next_database_++, "_", name.substr(0, 40), "_", n);
    return server_->CreateDatabase(name);
  }

  std::unique_ptr<Store> Open() { return OpenAt(url_); }
  std::unique_ptr<Store> OpenAt(const std::string& url) {
    absl::StatusOr<std::unique_ptr<Store>> store =
        OpenStore(url, OpenMode::kCreate);
    EXPECT_THAT(store, IsOk()) << url;
    return store.ok() ? *std::move(store) : nullptr;
  }

  // A blob literal in the backend's SQL: `hex` is hex digits.
  std::string Blob(const std::string& hex) const {
    return postgres() ? absl::StrCat("'\\x", hex, "'::bytea")
                      : absl::StrCat("x'", hex, "'");
  }

  // Runs `sql` (one or more statements) on a separate raw connection to the
  // test's database.
  void RawExec(const std::string& sql) { RawExecAt(url_, sql); }
  void RawExecAt(const std::string& url, const std::string& sql) {
    if (postgres()) {
      PgConn conn(PQconnectdb(url.c_str()));
      ASSERT_EQ(PQstatus(conn.get()), CONNECTION_OK)
          << PQerrorMessage(conn.get());
      PgResult r(PQexec(conn.get(), sql.c_str()));
      const ExecStatusType status = PQresultStatus(r.get());
      EXPECT_TRUE(status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK)
          << PQerrorMessage(conn.get()) << "\n"
          << sql;
      return;
    }
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open_v2(SqlitePath(url).c_str(), &db,
                              SQLITE_OPEN_READWRITE, nullptr),
              SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    char* err = nullptr;
    int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err);
    EXPECT_EQ(rc, SQLITE_OK) << (err ? err : "") << "\n" << sql;
    sqlite3_free(err);
    sqlite3_close(db);
  }

  // The single integer result of `sql` on a raw connection, or -1.
  int64_t RawQueryInt(const std::string& sql) {
    return RawQueryIntAt(url_, sql);
  }
  int64_t RawQueryIntAt(const std::string& url, const std::string& sql) {
    if (postgres()) {
      PgConn conn(PQconnectdb(url.c_str()));
      EXPECT_EQ(PQstatus(conn.get()), CONNECTION_OK)
          << PQerrorMessage(conn.get());
      PgResult r(PQexec(conn.get(), sql.c_str()));
      EXPECT_EQ(PQresultStatus(r.get()), PGRES_TUPLES_OK)
          << PQerrorMessage(conn.get()) << "\n"
          << sql;
      if (PQresultStatus(r.get()) != PGRES_TUPLES_OK ||
          PQntuples(r.get()) < 1 || PQgetisnull(r.get(), 0, 0)) {
        return -1;
      }
      return std::strtoll(PQgetvalue(r.get(), 0, 0), nullptr, 10);
    }
    sqlite3* db = nullptr;
    EXPECT_EQ(sqlite3_open_v2(SqlitePath(url).c_str(), &db,
                              SQLITE_OPEN_READONLY, nullptr),
              SQLITE_OK);
    sqlite3_stmt* stmt = nullptr;
    EXPECT_EQ(sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr),
              SQLITE_OK)
        << sqlite3_errmsg(db);
    int64_t v = -1;
    if (sqlite3_step(stmt) == SQLITE_ROW) v = sqlite3_column_int64(stmt, 0);
    sqlite3_finalize(stmt);
    sqlite3_close(db);
    return v;
  }

  static std::string SqlitePath(const std::string& url) {
    return std::string(absl::StripPrefix(url, "sqlite://"));
  }

  static inline std::unique_ptr<PostgresServer> server_;
  static inline absl::Status server_error_;
  static inline int next_database_ = 0;

  std::string dir_;  // scratch directory (and SQLite's databases)
  std::string url_;  // the test's database
  int databases_ = 0;
};

std::string BackendName(const ::testing::TestParamInfo<std::string>& info) {
  return info.param;
}

INSTANTIATE_TEST_SUITE_P(Backends, StoreContractTest,
                         ::testing::Values(kSqlite, kPostgres), BackendName);

// ---- Migrations ----

TEST_P(StoreContractTest, MigrationsAreIdempotent) {
  {
    std::unique_ptr<Store> store = Open();
    ASSERT_NE(store, nullptr);
    EXPECT_EQ(store->SchemaVersion(), kLatestSchemaVersion);
  }
  {
    std::unique_ptr<Store> store = Open();
    ASSERT_NE(store, nullptr);
    EXPECT_EQ(store->SchemaVersion(), kLatestSchemaVersion);
  }
  EXPECT_EQ(RawQueryInt("SELECT COUNT(*) FROM schema_migrations"),
            kLatestSchemaVersion);
  EXPECT_EQ(RawQueryInt("SELECT MAX(version) FROM schema_migrations"),
            kLatestSchemaVersion);
}

TEST_P(StoreContractTest, RefusesSchemaNewerThanItKnows) {
  { ASSERT_NE(Open(), nullptr); }
  RawExec(absl::StrCat(
      "INSERT INTO schema_migrations(version, applied_us) VALUES (",
      kLatestSchemaVersion + 1, ", 0)"));
  EXPECT_THAT(
      OpenStore(url_, OpenMode::kCreate),
      StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("newer")));
}

// ---- Never a database by accident, the deployment, generate-intents ----

TEST_P(StoreContractTest, ExistingModeRefusesADatabaseWithoutTheSchema) {
  // A missing SQLite file, or an empty PostgreSQL database: neither is
  // created or given a schema.
  EXPECT_THAT(
      OpenStore(url_, OpenMode::kExisting),
      StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("--init")));
  if (!postgres()) {
    EXPECT_FALSE(std::filesystem::exists(SqlitePath(url_)));
    // An empty file (a truncated or freshly touched database) is refused
    // too, and left empty.
    std::ofstream(SqlitePath(url_)).close();
    EXPECT_THAT(OpenStore(url_, OpenMode::kExisting),
                StatusIs(absl::StatusCode::kFailedPrecondition,
                         HasSubstr("no Custos schema")));
    EXPECT_EQ(std::filesystem::file_size(SqlitePath(url_)), 0u);
  } else {
    EXPECT_EQ(RawQueryInt("SELECT COUNT(*) FROM pg_tables WHERE "
                          "tablename = 'schema_migrations'"),
              0);
  }
  { ASSERT_NE(Open(), nullptr); }  // kCreate
  absl::StatusOr<std::unique_ptr<Store>> store =
      OpenStore(url_, OpenMode::kExisting);
  ASSERT_THAT(store, IsOk());
  EXPECT_EQ((*store)->SchemaVersion(), kLatestSchemaVersion);
}

TEST_P(StoreContractTest, CreatedSqliteFileIsOwnerOnly) {
  if (postgres()) GTEST_SKIP() << "SQLite only";
  { ASSERT_NE(Open(), nullptr); }
  const auto perms = std::filesystem::status(SqlitePath(url_)).permissions();
  EXPECT_EQ(perms & (std::filesystem::perms::group_all |
                     std::filesystem::perms::others_all),
            std::filesystem::perms::none);
}

TEST_P(StoreContractTest, DeploymentIsRecordedOnce) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  absl::StatusOr<std::optional<Deployment>> none = store->LoadDeployment();
  ASSERT_THAT(none, IsOk());
  EXPECT_FALSE(none->has_value());
  const absl::Time t = absl::FromUnixMicros(1700000000123456);
  Deployment d{std::string("\x00\x01marker\xff", 9), "custos", "0123abcd", t};
  ASSERT_THAT(store->InsertDeployment(d), IsOk());
  EXPECT_THAT(store->InsertDeployment(d),
              StatusIs(absl::StatusCode::kAlreadyExists));
  std::unique_ptr<Store> again = Open();
  absl::StatusOr<std::optional<Deployment>> loaded = again->LoadDeployment();
  ASSERT_THAT(loaded, IsOk());
  ASSERT_TRUE(loaded->has_value());
  EXPECT_EQ((*loaded)->id, d.id);
  EXPECT_EQ((*loaded)->token_label, "custos");
  EXPECT_EQ((*loaded)->token_serial, "0123abcd");
  EXPECT_EQ((*loaded)->create_time, t);
}

TEST_P(StoreContractTest, IntentsRoundTrip) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  const std::string a(16, '\xaa'), b(16, '\x00');
  const absl::Time t = absl::FromUnixMicros(1700000000000001);
  ASSERT_THAT(store->InsertIntent({a, "k-a", 1, t}), IsOk());
  ASSERT_THAT(store->InsertIntent({b, "k-b", 7, t + absl::Seconds(1)}), IsOk());
  EXPECT_THAT(store->InsertIntent({a, "k-a", 1, t}),
              StatusIs(absl::StatusCode::kAlreadyExists));
  absl::StatusOr<std::vector<MaterialIntent>> intents = store->ListIntents();
  ASSERT_THAT(intents, IsOk());
  ASSERT_EQ(intents->size(), 2u);
  EXPECT_EQ((*intents)[0].hsm_id, a);
  EXPECT_EQ((*intents)[0].key_id, "k-a");
  EXPECT_EQ((*intents)[1].hsm_id, b);
  EXPECT_EQ((*intents)[1].version, 7u);
  EXPECT_EQ((*intents)[1].create_time, t + absl::Seconds(1));
  ASSERT_THAT(store->DeleteIntent(a), IsOk());
  ASSERT_THAT(store->DeleteIntent(a), IsOk());  // absent: not an error
  intents = store->ListIntents();
  ASSERT_THAT(intents, IsOk());
  ASSERT_EQ(intents->size(), 1u);
  EXPECT_EQ((*intents)[0].hsm_id, b);
}

// A version's commit settles its intent; a claimed intent never commits; a
// claim fails once a version names the object.
TEST_P(StoreContractTest, CommitsSettleIntentsAndClaimedIntentsNeverCommit) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  Key key = SampleKey("k-claims", "c");
  const KeyVersion v2 = key.versions[1];
  key.versions.pop_back();
  key.primary_version = 1;
  const std::string v1_id = key.versions[0].hsm_id;
  ASSERT_THAT(store->InsertIntent({v1_id, key.id, 1, kT0}), IsOk());
  ASSERT_THAT(store->InsertKey(key), IsOk());
  absl::StatusOr<std::vector<MaterialIntent>> intents = store->ListIntents();
  ASSERT_THAT(intents, IsOk());
  EXPECT_THAT(*intents, IsEmpty()) << "the commit left its intent";
  EXPECT_THAT(store->ClaimIntent(v1_id), IsOkAndHolds(false));

  // An intent claimed as garbage: claiming again still says so, and the
  // version that names it cannot be committed, nor can a claim undo that.
  ASSERT_THAT(store->InsertIntent({v2.hsm_id, key.id, 2, kT0}), IsOk());
  EXPECT_THAT(store->ClaimIntent(v2.hsm_id), IsOkAndHolds(true));
  EXPECT_THAT(store->ClaimIntent(v2.hsm_id), IsOkAndHolds(true));
  EXPECT_THAT(store->UpdateKey(key.id,
                               [&](Key& k) {
                                 k.versions.push_back(v2);
                                 k.primary_version = 2;
                                 return absl::OkStatus();
                               }),
              StatusIs(absl::StatusCode::kAborted, HasSubstr("claimed")));
  absl::StatusOr<Key> stored = store->LoadKey(key.id);
  ASSERT_THAT(stored, IsOk());
  EXPECT_EQ(stored->versions.size(), 1u);
  intents = store->ListIntents();
  ASSERT_THAT(intents, IsOk());
  ASSERT_EQ(intents->size(), 1u);
  EXPECT_TRUE((*intents)[0].claimed);
  // No intent at all (a key made before intents existed): nothing to claim.
  EXPECT_THAT(store->ClaimIntent(std::string(16, '\x42')), IsOkAndHolds(false));
}

// ---- Round trips ----

TEST_P(StoreContractTest, InsertThenLoadRoundTripsEveryField) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  Key key = SampleKey("k-roundtrip", "a");
  ASSERT_THAT(store->InsertKey(key), IsOk());
  absl::StatusOr<Key> loaded = store->LoadKey(key.id);
  ASSERT_THAT(loaded, IsOk());
  ExpectSameKey(*loaded, key);
}

TEST_P(StoreContractTest, RoundTripsSetOptionalTimesAndUnsetOnes) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  Key with = SampleKey("k-with", "w");
  with.state = KeyState::kPendingDeletion;
  with.deletion_time = kT0 + absl::Hours(24 * 7) + absl::Microseconds(3);
  with.deletion_window = absl::Hours(24 * 7);
  with.deletion_elapsed = absl::Hours(26) + absl::Microseconds(5);
  with.destruction_started = true;
  Key without = SampleKey("k-without", "o");
  without.next_rotation_time = absl::InfinitePast();
  without.rotation_period = absl::ZeroDuration();
  without.labels.clear();
  without.policy = KeyPolicy();
  without.aliases.clear();
  ASSERT_THAT(store->InsertKey(with), IsOk());
  ASSERT_THAT(store->InsertKey(without), IsOk());
  absl::StatusOr<Key> got = store->LoadKey("k-with");
  ASSERT_THAT(got, IsOk());
  ExpectSameKey(*got, with);
  got = store->LoadKey("k-without");
  ASSERT_THAT(got, IsOk());
  ExpectSameKey(*got, without);
}

TEST_P(StoreContractTest, LoadAllKeysReturnsEveryKeyInCreationOrder) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  Key later = SampleKey("k-a-later", "l");
  later.create_time = kT0 + absl::Seconds(1);
  later.aliases = {"alias/later"};
  Key earlier = SampleKey("k-b-earlier", "e");
  earlier.aliases = {"alias/earlier"};
  ASSERT_THAT(store->InsertKey(later), IsOk());
  ASSERT_THAT(store->InsertKey(earlier), IsOk());
  absl::StatusOr<std::vector<Key>> all = store->LoadAllKeys();
  ASSERT_THAT(all, IsOk());
  ASSERT_EQ(all->size(), 2u);
  ExpectSameKey((*all)[0], earlier);
  ExpectSameKey((*all)[1], later);
}

// LoadAllKeys reads every table once and joins in memory: each key must get
// exactly its own versions (in order) and aliases, whatever order the ids,
// creation times and rows come in.
TEST_P(StoreContractTest, LoadAllKeysJoinsEachKeyWithItsOwnRows) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  std::vector<Key> want;
  for (int i = 0; i < 40; ++i) {
    // Ids in the opposite order of creation for half of them, and pairs of
    // keys created at the same instant (ordered by id).
    Key key = SampleKey(absl::StrCat("k-", i % 2 ? "z" : "a", 99 - i),
                        absl::StrCat("h", i, "-"));
    key.create_time = kT0 + absl::Seconds(i / 2);
    key.versions.resize(i % 4);  // 0 to 3 versions
    for (size_t v = 0; v < key.versions.size(); ++v) {
      key.versions[v] = SampleKey("", "").versions[v % 2];
      key.versions[v].number = static_cast<uint32_t>(v + 1);
      key.versions[v].hsm_id = absl::StrCat("h", i, "-v", v);
    }
    key.aliases.clear();
    for (int a = 0; a < i % 3; ++a) {
      key.aliases.push_back(absl::StrCat("alias/", i, "-", a));
    }
    want.push_back(key);
  }
  // Inserted in neither id nor creation order.
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_THAT(store->InsertKey(want[(i * 7) % want.size()]), IsOk());
  }
  std::sort(want.begin(), want.end(), [](const Key& a, const Key& b) {
    if (a.create_time != b.create_time) return a.create_time < b.create_time;
    return a.id < b.id;
  });
  absl::StatusOr<std::vector<Key>> all = store->LoadAllKeys();
  ASSERT_THAT(all, IsOk());
  ASSERT_EQ(all->size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    SCOPED_TRACE(want[i].id);
    ExpectSameKey((*all)[i], want[i]);
    absl::StatusOr<Key> one = store->LoadKey(want[i].id);
    ASSERT_THAT(one, IsOk());
    ExpectSameKey(*one, want[i]);
  }
}

TEST_P(StoreContractTest, EmptyStoreLoadsNothing) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  EXPECT_THAT(store->LoadAllKeys(), IsOkAndHolds(IsEmpty()));
  EXPECT_THAT(store->ListAliases(), IsOkAndHolds(IsEmpty()));
  EXPECT_THAT(store->LoadKey("k-missing"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("k-missing")));
}

TEST_P(StoreContractTest, HostileIdsAreDataNotSql) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  for (const std::string id :
       {"'; DROP TABLE keys;--", "../etc/passwd", "*", "%", "k-\xff\xfe"}) {
    EXPECT_THAT(store->LoadKey(id), StatusIs(absl::StatusCode::kNotFound))
        << id;
  }
  Key key = SampleKey("'; DROP TABLE keys;--", "h");
  ASSERT_THAT(store->InsertKey(key), IsOk());
  absl::StatusOr<Key> got = store->LoadKey(key.id);
  ASSERT_THAT(got, IsOk());
  ExpectSameKey(*got, key);
  EXPECT_THAT(store->LoadKey("%"), StatusIs(absl::StatusCode::kNotFound));
}

// A NUL byte is valid UTF-8 (and valid in a proto3 string): an id that
// holds one is another id, never the id cut short at the NUL.
TEST_P(StoreContractTest, IdsWithNulBytesAreNotOtherIds) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  Key key = SampleKey("k-real", "n");
  ASSERT_THAT(store->InsertKey(key), IsOk());
  const std::string longer("k-real\0-other", 13);
  const std::string alias("alias/a-billing\0-other", 22);
  EXPECT_THAT(store->LoadKey(longer), StatusIs(absl::StatusCode::kNotFound));
  bool called = false;
  EXPECT_THAT(store->UpdateKey(longer,
                               [&](Key& k) {
                                 called = true;
                                 k.description = "changed through another id";
                                 return absl::OkStatus();
                               }),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_FALSE(called);
  EXPECT_THAT(store->DeleteAlias(alias), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(store->CreateAlias({"alias/new", longer, kT0}),
              StatusIs(absl::StatusCode::kNotFound));
  absl::StatusOr<Key> got = store->LoadKey("k-real");
  ASSERT_THAT(got, IsOk());
  ExpectSameKey(*got, key);
}

// Text with a NUL byte in it is stored whole or refused (INVALID_ARGUMENT),
// never cut short without a word.
TEST_P(StoreContractTest, TextWithNulBytesIsKeptWholeOrRefused) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  Key key = SampleKey("k-nul", "n");
  key.description = std::string("before\0after", 12);
  key.aliases = {std::string("alias/nul\0tail", 14)};
  absl::Status inserted = store->InsertKey(key);
  if (!inserted.ok()) {
    EXPECT_THAT(inserted, StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(store->LoadKey("k-nul"), StatusIs(absl::StatusCode::kNotFound));
    EXPECT_THAT(store->ListAliases(), IsOkAndHolds(IsEmpty()));
    return;
  }
  absl::StatusOr<Key> got = store->LoadKey("k-nul");
  ASSERT_THAT(got, IsOk());
  ExpectSameKey(*got, key);
}

TEST_P(StoreContractTest, DuplicateKeyIdIsAlreadyExists) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_THAT(store->InsertKey(SampleKey("k-dup", "1")), IsOk());
  Key again = SampleKey("k-dup", "2");
  again.aliases.clear();
  EXPECT_THAT(store->InsertKey(again),
              StatusIs(absl::StatusCode::kAlreadyExists));
}

TEST_P(StoreContractTest, InsertWithTakenAliasInsertsNothing) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_THAT(store->InsertKey(SampleKey("k-first", "1")), IsOk());
  Key second = SampleKey("k-second", "2");
  second.aliases = {"alias/fresh", "alias/b/billing"};  // the second is taken
  EXPECT_THAT(
      store->InsertKey(second),
      StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("alias/b/billing")));
  EXPECT_THAT(store->LoadKey("k-second"),
              StatusIs(absl::StatusCode::kNotFound));
  absl::StatusOr<std::vector<AliasRecord>> aliases = store->ListAliases();
  ASSERT_THAT(aliases, IsOk());
  for (const AliasRecord& a : *aliases) {
    EXPECT_EQ(a.key_id, "k-first") << a.name;
  }
  EXPECT_EQ(RawQueryInt("SELECT COUNT(*) FROM key_versions WHERE key_id = "
                        "'k-second'"),
            0);
}

// ---- UpdateKey ----

TEST_P(StoreContractTest, UpdateKeyWritesTheMutation) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  Key key = SampleKey("k-upd", "u");
  ASSERT_THAT(store->InsertKey(key), IsOk());
  KeyVersion v3;
  v3.number = 3;
  v3.hsm_id = std::string("u\0\x03", 3);
  v3.create_time = kT0 + absl::Hours(1);
  absl::StatusOr<Key> written =
      store->UpdateKey("k-upd", [&](Key& k) -> absl::Status {
        k.state = KeyState::kEnabled;
        k.description = "rotated";
        k.labels["rotated"] = "yes";
        k.primary_version = 3;
        k.update_time = kT0 + absl::Hours(1);
        k.policy.version = 8;
        k.versions[0].state = VersionState::kDestroyed;
        k.versions[1].encryptions_reserved = 1000;
        k.versions.push_back(v3);
        return absl::OkStatus();
      });
  ASSERT_THAT(written, IsOk());
  Key want = key;
  want.state = KeyState::kEnabled;
  want.description = "rotated";
  want.labels["rotated"] = "yes";
  want.primary_version = 3;
  want.update_time = kT0 + absl::Hours(1);
  want.policy.version = 8;
  want.versions[0].state = VersionState::kDestroyed;
  want.versions[1].encryptions_reserved = 1000;
  want.versions.push_back(v3);
  ExpectSameKey(*written, want);
  absl::StatusOr<Key> loaded = store->LoadKey("k-upd");
  ASSERT_THAT(loaded, IsOk());
  ExpectSameKey(*loaded, want);
}

TEST_P(StoreContractTest, UpdateKeyWhoseMutatorFailsChangesNothing) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  Key key = SampleKey("k-atomic", "a");
  ASSERT_THAT(store->InsertKey(key), IsOk());
  EXPECT_THAT(store->UpdateKey("k-atomic",
                               [](Key& k) -> absl::Status {
                                 k.state = KeyState::kEnabled;
                                 k.description = "changed";
                                 k.versions[0].state = VersionState::kEnabled;
                                 KeyVersion extra;
                                 extra.number = 3;
                                 extra.hsm_id = "extra";
                                 k.versions.push_back(extra);
                                 return absl::FailedPreconditionError(
                                     "mutator says no");
                               }),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("mutator says no")));
  absl::StatusOr<Key> loaded = store->LoadKey("k-atomic");
  ASSERT_THAT(loaded, IsOk());
  ExpectSameKey(*loaded, key);
}

// The key row is written before the versions; a version that cannot be
// written must take the key row's change back with it.
TEST_P(StoreContractTest, UpdateKeyRollsBackWhenAVersionWriteFails) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  Key first = SampleKey("k-one", "1");
  first.aliases.clear();
  Key second = SampleKey("k-two", "2");
  second.aliases.clear();
  ASSERT_THAT(store->InsertKey(first), IsOk());
  ASSERT_THAT(store->InsertKey(second), IsOk());
  absl::StatusOr<Key> result =
      store->UpdateKey("k-two", [&](Key& k) -> absl::Status {
        k.description = "should not stick";
        k.state = KeyState::kEnabled;
        KeyVersion clash;
        clash.number = 3;
        clash.hsm_id = first.versions[0].hsm_id;  // hsm_id is unique
        k.versions.push_back(clash);
        return absl::OkStatus();
      });
  EXPECT_FALSE(result.ok());
  absl::StatusOr<Key> loaded = store->LoadKey("k-two");
  ASSERT_THAT(loaded, IsOk());
  ExpectSameKey(*loaded, second);
  // And the store still works afterwards (no transaction left open).
  EXPECT_THAT(store->UpdateKey("k-two",
                               [](Key& k) {
                                 k.description = "fine";
                                 return absl::OkStatus();
                               }),
              IsOk());
}

TEST_P(StoreContractTest, UpdateKeyCannotChangeTheId) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  Key key = SampleKey("k-id", "i");
  ASSERT_THAT(store->InsertKey(key), IsOk());
  EXPECT_FALSE(store
                   ->UpdateKey("k-id",
                               [](Key& k) {
                                 k.id = "k-other";
                                 k.description = "moved";
                                 return absl::OkStatus();
                               })
                   .ok());
  EXPECT_THAT(store->LoadKey("k-other"), StatusIs(absl::StatusCode::kNotFound));
  absl::StatusOr<Key> loaded = store->LoadKey("k-id");
  ASSERT_THAT(loaded, IsOk());
  ExpectSameKey(*loaded, key);
}

TEST_P(StoreContractTest, UpdateMissingKeyIsNotFound) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  bool called = false;
  EXPECT_THAT(store->UpdateKey("k-nope",
                               [&](Key&) {
                                 called = true;
                                 return absl::OkStatus();
                               }),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_FALSE(called);
}

// ---- Aliases ----

TEST_P(StoreContractTest, AliasLifecycle) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  Key key = SampleKey("k-alias", "a");
  key.aliases.clear();
  ASSERT_THAT(store->InsertKey(key), IsOk());
  const absl::Time t = kT0 + absl::Microseconds(42);
  ASSERT_THAT(store->CreateAlias({"alias/z", "k-alias", t}), IsOk());
  ASSERT_THAT(store->CreateAlias({"alias/m", "k-alias", t}), IsOk());
  absl::StatusOr<std::vector<AliasRecord>> aliases = store->ListAliases();
  ASSERT_THAT(aliases, IsOk());
  ASSERT_EQ(aliases->size(), 2u);
  EXPECT_EQ((*aliases)[0].name, "alias/m");
  EXPECT_EQ((*aliases)[0].key_id, "k-alias");
  EXPECT_EQ((*aliases)[0].create_time, t);
  EXPECT_EQ((*aliases)[1].name, "alias/z");
  absl::StatusOr<Key> loaded = store->LoadKey("k-alias");
  ASSERT_THAT(loaded, IsOk());
  EXPECT_THAT(loaded->aliases, ElementsAre("alias/m", "alias/z"));

  ASSERT_THAT(store->DeleteAlias("alias/z"), IsOk());
  loaded = store->LoadKey("k-alias");
  ASSERT_THAT(loaded, IsOk());
  EXPECT_THAT(loaded->aliases, ElementsAre("alias/m"));
}

TEST_P(StoreContractTest, DuplicateAliasIsAlreadyExists) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  Key a = SampleKey("k-a", "a");
  a.aliases = {"alias/taken"};
  Key b = SampleKey("k-b", "b");
  b.aliases.clear();
  ASSERT_THAT(store->InsertKey(a), IsOk());
  ASSERT_THAT(store->InsertKey(b), IsOk());
  EXPECT_THAT(
      store->CreateAlias({"alias/taken", "k-b", kT0}),
      StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("alias/taken")));
  EXPECT_THAT(store->CreateAlias({"alias/taken", "k-a", kT0}),
              StatusIs(absl::StatusCode::kAlreadyExists));
  absl::StatusOr<std::vector<AliasRecord>> aliases = store->ListAliases();
  ASSERT_THAT(aliases, IsOk());
  ASSERT_EQ(aliases->size(), 1u);
  EXPECT_EQ((*aliases)[0].key_id, "k-a");
}

TEST_P(StoreContractTest, AliasOnMissingKeyIsNotFound) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  EXPECT_THAT(store->CreateAlias({"alias/orphan", "k-missing", kT0}),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("k-missing")));
  EXPECT_THAT(store->ListAliases(), IsOkAndHolds(IsEmpty()));
}

TEST_P(StoreContractTest, DeleteMissingAliasIsNotFound) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  EXPECT_THAT(store->DeleteAlias("alias/never"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("alias/never")));
  Key key = SampleKey("k-x", "x");
  ASSERT_THAT(store->InsertKey(key), IsOk());
  ASSERT_THAT(store->DeleteAlias("alias/a-billing"), IsOk());
  EXPECT_THAT(store->DeleteAlias("alias/a-billing"),
              StatusIs(absl::StatusCode::kNotFound));
}

// ---- Rows the store cannot trust ----

TEST_P(StoreContractTest, UnknownKeyStateIsDataLossNeverEnabled) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_THAT(store->InsertKey(SampleKey("k-state", "s")), IsOk());
  for (int state : {0, 5, 99, -1}) {
    RawExec(absl::StrCat("UPDATE keys SET state = ", state,
                         " WHERE id = 'k-state'"));
    EXPECT_THAT(store->LoadKey("k-state"),
                StatusIs(absl::StatusCode::kDataLoss, HasSubstr("state")))
        << state;
    EXPECT_THAT(store->LoadAllKeys(), StatusIs(absl::StatusCode::kDataLoss))
        << state;
    EXPECT_THAT(store->UpdateKey("k-state",
                                 [](Key& k) {
                                   k.state = KeyState::kEnabled;
                                   return absl::OkStatus();
                                 }),
                StatusIs(absl::StatusCode::kDataLoss))
        << state;
  }
  // A reopened store refuses it too.
  store.reset();
  store = Open();
  ASSERT_NE(store, nullptr);
  EXPECT_THAT(store->LoadKey("k-state"), StatusIs(absl::StatusCode::kDataLoss));
}

TEST_P(StoreContractTest, UnknownVersionStateIsDataLoss) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_THAT(store->InsertKey(SampleKey("k-vstate", "v")), IsOk());
  RawExec(
      "UPDATE key_versions SET state = 9 WHERE key_id = 'k-vstate' AND "
      "number = 2");
  EXPECT_THAT(store->LoadKey("k-vstate"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("state")));
}

// Like states, a stored purpose outside the enum must not be trusted.
TEST_P(StoreContractTest, UnknownPurposeIsDataLoss) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_THAT(store->InsertKey(SampleKey("k-purpose", "p")), IsOk());
  RawExec("UPDATE keys SET purpose = 77 WHERE id = 'k-purpose'");
  EXPECT_THAT(store->LoadKey("k-purpose"),
              StatusIs(absl::StatusCode::kDataLoss));
}

TEST_P(StoreContractTest, CorruptLabelsOrPolicyIsDataLoss) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_THAT(store->InsertKey(SampleKey("k-labels", "l")), IsOk());
  Key policy_key = SampleKey("k-policy", "p");
  policy_key.aliases.clear();
  ASSERT_THAT(store->InsertKey(policy_key), IsOk());
  RawExec("UPDATE keys SET labels = '[1,2]' WHERE id = 'k-labels'");
  RawExec(
      "UPDATE keys SET policy = '{\"bindings\":[{\"principals\":[\"*\"],"
      "\"operations\":[\"DECRYPT\"],\"extra\":1}]}' WHERE id = "
      "'k-policy'");
  EXPECT_THAT(store->LoadKey("k-labels"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("labels")));
  EXPECT_THAT(store->LoadKey("k-policy"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("policy")));
}

TEST_P(StoreContractTest, GapInVersionNumbersIsDataLoss) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_THAT(store->InsertKey(SampleKey("k-gap", "g")), IsOk());
  RawExec("DELETE FROM key_versions WHERE key_id = 'k-gap' AND number = 1");
  EXPECT_THAT(store->LoadKey("k-gap"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("gap")));
}

// LoadKey and LoadAllKeys share their row checks: a row one refuses, the
// other refuses too, even with sound keys around it.
TEST_P(StoreContractTest, EveryRowCheckRefusesLoadAllKeysAsLoadKey) {
  struct Case {
    std::string what;
    std::string sql;  // corrupts key 'k-bad'
    std::string message;
  };
  const Case cases[] = {
      {"unknown key state", "UPDATE keys SET state = 7 WHERE id = 'k-bad'",
       "state"},
      {"unknown purpose", "UPDATE keys SET purpose = 77 WHERE id = 'k-bad'",
       "purpose"},
      {"unreadable labels",
       "UPDATE keys SET labels = '[1,2]' WHERE id = 'k-bad'", "labels"},
      {"unreadable policy",
       "UPDATE keys SET policy = '{\"bindings\":7}' WHERE id = 'k-bad'",
       "policy"},
      {"unknown version state",
       "UPDATE key_versions SET state = 9 WHERE key_id = 'k-bad' AND "
       "number = 2",
       "version 2 has unknown stored state"},
      {"first version missing",
       "DELETE FROM key_versions WHERE key_id = 'k-bad' AND number = 1", "gap"},
      {"middle version missing",
       absl::StrCat("INSERT INTO key_versions (key_id, number, state, hsm_id, "
                    "create_us) VALUES ('k-bad', 4, 1, ",
                    Blob("0401"), ", 0)"),
       "gap"},
  };
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  // Sound keys sorting before and after 'k-bad' by id and by creation time.
  Key before = SampleKey("k-a-sound", "a");
  Key after = SampleKey("k-c-sound", "c");
  after.create_time = kT0 + absl::Hours(1);
  after.aliases = {"alias/c"};
  ASSERT_THAT(store->InsertKey(before), IsOk());
  ASSERT_THAT(store->InsertKey(after), IsOk());
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    Key bad = SampleKey("k-bad", "b");
    bad.create_time = kT0 + absl::Minutes(1);
    bad.aliases = {"alias/bad"};
    ASSERT_THAT(store->InsertKey(bad), IsOk());
    ASSERT_THAT(store->LoadAllKeys(), IsOk());
    RawExec(c.sql);
    EXPECT_THAT(store->LoadKey("k-bad"),
                StatusIs(absl::StatusCode::kDataLoss, HasSubstr(c.message)));
    EXPECT_THAT(store->LoadAllKeys(),
                StatusIs(absl::StatusCode::kDataLoss, HasSubstr(c.message)));
    RawExec(
        "DELETE FROM aliases WHERE key_id = 'k-bad'; "
        "DELETE FROM key_versions WHERE key_id = 'k-bad'; "
        "DELETE FROM keys WHERE id = 'k-bad'");
  }
  // The failed loads left no transaction open: the store still reads and
  // writes.
  absl::StatusOr<std::vector<Key>> all = store->LoadAllKeys();
  ASSERT_THAT(all, IsOk());
  ASSERT_EQ(all->size(), 2u);
  ExpectSameKey((*all)[0], before);
  ExpectSameKey((*all)[1], after);
  Key fresh = SampleKey("k-d-new", "d");
  fresh.aliases.clear();
  EXPECT_THAT(store->InsertKey(fresh), IsOk());
}

// ---- Durability ----

TEST_P(StoreContractTest, DataSurvivesReopen) {
  Key key = SampleKey("k-durable", "d");
  {
    std::unique_ptr<Store> store = Open();
    ASSERT_NE(store, nullptr);
    ASSERT_THAT(store->InsertKey(key), IsOk());
    ASSERT_THAT(store->CreateAlias({"alias/later", "k-durable", kT0}), IsOk());
    ASSERT_THAT(store->UpdateKey("k-durable",
                                 [](Key& k) {
                                   k.versions[1].encryptions_reserved = 5000;
                                   return absl::OkStatus();
                                 }),
                IsOk());
  }
  key.versions[1].encryptions_reserved = 5000;
  key.aliases = {"alias/a-billing", "alias/b/billing", "alias/later"};
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->SchemaVersion(), kLatestSchemaVersion);
  absl::StatusOr<Key> loaded = store->LoadKey("k-durable");
  ASSERT_THAT(loaded, IsOk());
  ExpectSameKey(*loaded, key);
}

// ---- Several stores on one database (replicas) ----
//
// Each "replica" is a Store of its own on the same database, as two custosd
// processes would have. For SQLite these are two connections to one file.

// Runs `body(i)` on `n` threads that start together; returns when all end.
void RunTogether(int n, const std::function<void(int)>& body) {
  std::latch start(n);
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      start.arrive_and_wait();
      body(i);
    });
  }
  for (std::thread& t : threads) t.join();
}

// A new version `number` for `key`, as a rotation would add it.
KeyVersion NewVersion(uint32_t number, const std::string& hsm_id) {
  KeyVersion v;
  v.number = number;
  v.state = VersionState::kEnabled;
  v.hsm_id = hsm_id;
  v.create_time = kT0 + absl::Seconds(number);
  return v;
}

// What the first replica commits, the second reads: no replica keeps a
// stale copy below the Store interface.
TEST_P(StoreContractTest, ReplicasSeeEachOthersChanges) {
  std::unique_ptr<Store> a = Open();
  std::unique_ptr<Store> b = Open();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_THAT(b->LoadAllKeys(), IsOkAndHolds(IsEmpty()));

  Key key = SampleKey("k-shared", "s");
  ASSERT_THAT(a->InsertKey(key), IsOk());
  absl::StatusOr<Key> seen = b->LoadKey("k-shared");
  ASSERT_THAT(seen, IsOk());
  ExpectSameKey(*seen, key);

  ASSERT_THAT(b->UpdateKey("k-shared",
                           [](Key& k) {
                             k.description = "rotated on b";
                             k.versions.push_back(NewVersion(3, "s-v3"));
                             k.primary_version = 3;
                             return absl::OkStatus();
                           }),
              IsOk());
  key.description = "rotated on b";
  key.versions.push_back(NewVersion(3, "s-v3"));
  key.primary_version = 3;
  seen = a->LoadKey("k-shared");
  ASSERT_THAT(seen, IsOk());
  ExpectSameKey(*seen, key);
  absl::StatusOr<std::vector<Key>> all = a->LoadAllKeys();
  ASSERT_THAT(all, IsOk());
  ASSERT_EQ(all->size(), 1u);
  ExpectSameKey((*all)[0], key);

  // An update on a, after b's, starts from b's version.
  ASSERT_THAT(a->UpdateKey("k-shared",
                           [](Key& k) {
                             EXPECT_EQ(k.description, "rotated on b");
                             EXPECT_EQ(k.versions.size(), 3u);
                             k.state = KeyState::kEnabled;
                             return absl::OkStatus();
                           }),
              IsOk());
  seen = b->LoadKey("k-shared");
  ASSERT_THAT(seen, IsOk());
  EXPECT_EQ(seen->state, KeyState::kEnabled);
  EXPECT_EQ(seen->description, "rotated on b");

  ASSERT_THAT(a->CreateAlias({"alias/from-a", "k-shared", kT0}), IsOk());
  absl::StatusOr<std::vector<AliasRecord>> aliases = b->ListAliases();
  ASSERT_THAT(aliases, IsOk());
  ASSERT_EQ(aliases->size(), 3u);
  EXPECT_EQ((*aliases)[2].name, "alias/from-a");
  EXPECT_THAT(b->CreateAlias({"alias/from-a", "k-shared", kT0}),
              StatusIs(absl::StatusCode::kAlreadyExists));
  ASSERT_THAT(b->DeleteAlias("alias/from-a"), IsOk());
  seen = a->LoadKey("k-shared");
  ASSERT_THAT(seen, IsOk());
  EXPECT_THAT(seen->aliases, ElementsAre("alias/a-billing", "alias/b/billing"));
}

// Two replicas appending versions to one key at once: every UpdateKey
// succeeds (a conflict is retried, never reported nor lost) and the key ends
// with every version, numbered without gaps. This is what a retry on a
// serialization failure must guarantee.
TEST_P(StoreContractTest, ConcurrentUpdatesFromTwoReplicasLoseNothing) {
  constexpr int kPerReplica = 50;
  std::unique_ptr<Store> stores[2] = {Open(), Open()};
  ASSERT_NE(stores[0], nullptr);
  ASSERT_NE(stores[1], nullptr);
  Key key = SampleKey("k-race", "r");
  ASSERT_THAT(stores[0]->InsertKey(key), IsOk());
  std::vector<absl::Status> failures[2];
  std::vector<uint32_t> numbers[2];  // as each replica wrote them
  RunTogether(2, [&](int r) {
    for (int n = 0; n < kPerReplica; ++n) {
      const std::string hsm_id = absl::StrCat("replica", r, "-", n);
      absl::StatusOr<Key> written = stores[r]->UpdateKey("k-race", [&](Key& k) {
        k.versions.push_back(
            NewVersion(static_cast<uint32_t>(k.versions.size() + 1), hsm_id));
        k.primary_version = k.versions.back().number;
        return absl::OkStatus();
      });
      if (!written.ok()) {
        failures[r].push_back(written.status());
        continue;
      }
      numbers[r].push_back(written->versions.back().number);
      EXPECT_EQ(written->versions.back().hsm_id, hsm_id);
    }
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_THAT(failures[r], IsEmpty())
        << "replica " << r << " first failure: "
        << (failures[r].empty() ? absl::OkStatus() : failures[r][0]);
    // Each replica's versions come in the order it wrote them.
    EXPECT_TRUE(std::is_sorted(numbers[r].begin(), numbers[r].end()))
        << "replica " << r;
  }
  absl::StatusOr<Key> final_key = stores[1]->LoadKey("k-race");
  ASSERT_THAT(final_key, IsOk());
  ASSERT_EQ(final_key->versions.size(), 2u + 2 * kPerReplica);
  EXPECT_EQ(final_key->primary_version, 2u + 2 * kPerReplica);
  std::set<std::string> hsm_ids;
  for (size_t i = 0; i < final_key->versions.size(); ++i) {
    EXPECT_EQ(final_key->versions[i].number, i + 1);
    hsm_ids.insert(final_key->versions[i].hsm_id);
  }
  for (int r = 0; r < 2; ++r) {
    for (int n = 0; n < kPerReplica; ++n) {
      EXPECT_TRUE(hsm_ids.count(absl::StrCat("replica", r, "-", n)))
          << "replica " << r << " version " << n << " was lost";
    }
  }
}

// Two replicas rotating one key at once, each only if nobody has yet (the
// mutator checks the primary version, as KeyAdmin's checks do): exactly one
// rotation happens and the other sees it. The mutator must see the state
// the winning transaction committed, never a stale snapshot.
TEST_P(StoreContractTest, ConditionalUpdateFromTwoReplicasAppliesOnce) {
  constexpr int kRounds = 20;
  std::unique_ptr<Store> stores[2] = {Open(), Open()};
  ASSERT_NE(stores[0], nullptr);
  ASSERT_NE(stores[1], nullptr);
  for (int round = 0; round < kRounds; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    const std::string id = absl::StrCat("k-rotate-", round);
    Key key = SampleKey(id, absl::StrCat("rot", round, "-"));
    key.aliases.clear();
    ASSERT_THAT(stores[0]->InsertKey(key), IsOk());
    absl::Status results[2];
    RunTogether(2, [&](int r) {
      results[r] = stores[r]
                       ->UpdateKey(id,
                                   [&](Key& k) -> absl::Status {
                                     if (k.primary_version != 2) {
                                       return absl::FailedPreconditionError(
                                           "already rotated");
                                     }
                                     k.versions.push_back(NewVersion(
                                         3, absl::StrCat(id, "-by-", r)));
                                     k.primary_version = 3;
                                     return absl::OkStatus();
                                   })
                       .status();
    });
    EXPECT_EQ(results[0].ok() + results[1].ok(), 1)
        << results[0] << " / " << results[1];
    for (const absl::Status& s : results) {
      if (!s.ok()) {
        EXPECT_THAT(s, StatusIs(absl::StatusCode::kFailedPrecondition,
                                HasSubstr("already rotated")));
      }
    }
    absl::StatusOr<Key> got = stores[round % 2]->LoadKey(id);
    ASSERT_THAT(got, IsOk());
    ASSERT_EQ(got->versions.size(), 3u);
    EXPECT_EQ(got->versions[2].hsm_id,
              absl::StrCat(id, "-by-", results[0].ok() ? 0 : 1));
  }
}

// Two replicas creating a key with the same id at once: exactly one wins,
// the other gets ALREADY_EXISTS, and nothing of the loser's is left (its
// versions and aliases are its own).
TEST_P(StoreContractTest, ConcurrentInsertOfOneIdFromTwoReplicasAddsItOnce) {
  constexpr int kRounds = 20;
  std::unique_ptr<Store> stores[2] = {Open(), Open()};
  ASSERT_NE(stores[0], nullptr);
  ASSERT_NE(stores[1], nullptr);
  for (int round = 0; round < kRounds; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    const std::string id = absl::StrCat("k-insert-", round);
    Key keys[2];
    for (int r = 0; r < 2; ++r) {
      keys[r] = SampleKey(id, absl::StrCat("ins", round, "-", r, "-"));
      keys[r].description = absl::StrCat("from replica ", r);
      keys[r].aliases = {absl::StrCat("alias/", id, "-", r)};
    }
    absl::Status results[2];
    RunTogether(2, [&](int r) { results[r] = stores[r]->InsertKey(keys[r]); });
    ASSERT_EQ(results[0].ok() + results[1].ok(), 1)
        << results[0] << " / " << results[1];
    const int winner = results[0].ok() ? 0 : 1;
    EXPECT_THAT(results[1 - winner],
                StatusIs(absl::StatusCode::kAlreadyExists));
    absl::StatusOr<Key> got = stores[1 - winner]->LoadKey(id);
    ASSERT_THAT(got, IsOk());
    ExpectSameKey(*got, keys[winner]);
  }
  absl::StatusOr<std::vector<AliasRecord>> aliases = stores[0]->ListAliases();
  ASSERT_THAT(aliases, IsOk());
  EXPECT_EQ(aliases->size(), static_cast<size_t>(kRounds));
  EXPECT_EQ(RawQueryInt("SELECT COUNT(*) FROM key_versions"), 2 * kRounds);
}

// Two replicas taking one alias (for different keys) at once: one gets it.
TEST_P(StoreContractTest, ConcurrentCreateAliasFromTwoReplicasGrantsItOnce) {
  constexpr int kRounds = 20;
  std::unique_ptr<Store> stores[2] = {Open(), Open()};
  ASSERT_NE(stores[0], nullptr);
  ASSERT_NE(stores[1], nullptr);
  for (int r = 0; r < 2; ++r) {
    Key key = SampleKey(absl::StrCat("k-owner-", r), absl::StrCat("o", r));
    key.aliases.clear();
    ASSERT_THAT(stores[0]->InsertKey(key), IsOk());
  }
  for (int round = 0; round < kRounds; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    const std::string alias = absl::StrCat("alias/contested-", round);
    absl::Status results[2];
    RunTogether(2, [&](int r) {
      results[r] = stores[r]->CreateAlias(
          {alias, absl::StrCat("k-owner-", r), kT0 + absl::Seconds(round)});
    });
    ASSERT_EQ(results[0].ok() + results[1].ok(), 1)
        << results[0] << " / " << results[1];
    const int winner = results[0].ok() ? 0 : 1;
    EXPECT_THAT(results[1 - winner],
                StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr(alias)));
  }
  absl::StatusOr<std::vector<AliasRecord>> aliases = stores[1]->ListAliases();
  ASSERT_THAT(aliases, IsOk());
  EXPECT_EQ(aliases->size(), static_cast<size_t>(kRounds));
}

// Replicas started together on an empty database each open it: the
// migrations run once, and neither fails on the other's tables.
TEST_P(StoreContractTest, ReplicasOpeningAFreshDatabaseAtOnceBothSucceed) {
  constexpr int kRounds = 5;
  constexpr int kReplicas = 3;
  for (int round = 0; round < kRounds; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    absl::StatusOr<std::string> url = NewDatabase();
    ASSERT_THAT(url, IsOk());
    absl::StatusOr<std::unique_ptr<Store>> stores[kReplicas];
    RunTogether(kReplicas,
                [&](int r) { stores[r] = OpenStore(*url, OpenMode::kCreate); });
    for (int r = 0; r < kReplicas; ++r) {
      ASSERT_THAT(stores[r].status(), IsOk()) << "replica " << r;
      EXPECT_EQ((*stores[r])->SchemaVersion(), kLatestSchemaVersion)
          << "replica " << r;
    }
    EXPECT_EQ(RawQueryIntAt(*url, "SELECT COUNT(*) FROM schema_migrations"),
              kLatestSchemaVersion);
    Key key = SampleKey("k-after-migration", "m");
    ASSERT_THAT((*stores[0])->InsertKey(key), IsOk());
    absl::StatusOr<Key> got = (*stores[kReplicas - 1])->LoadKey(key.id);
    ASSERT_THAT(got, IsOk());
    ExpectSameKey(*got, key);
  }
}

// A key read while another replica rotates it is the key before or after a
// rotation, never a mix (the key row of one and the versions of the other):
// a replica filling its cache must not serve a primary version it has no
// row for.
TEST_P(StoreContractTest, ReadsWhileAnotherReplicaWritesSeeWholeKeys) {
  constexpr int kWrites = 50;
  std::unique_ptr<Store> writer = Open();
  std::unique_ptr<Store> reader = Open();
  ASSERT_NE(writer, nullptr);
  ASSERT_NE(reader, nullptr);
  Key key = SampleKey("k-torn", "t");
  ASSERT_THAT(writer->InsertKey(key), IsOk());
  std::atomic<bool> done{false};
  std::vector<std::string> torn;
  int reads = 0;
  RunTogether(2, [&](int r) {
    if (r == 0) {
      for (int n = 0; n < kWrites; ++n) {
        EXPECT_THAT(writer->UpdateKey(
                        "k-torn",
                        [&](Key& k) {
                          k.versions.push_back(NewVersion(
                              static_cast<uint32_t>(k.versions.size() + 1),
                              absl::StrCat("t-", n)));
                          k.primary_version = k.versions.back().number;
                          return absl::OkStatus();
                        }),
                    IsOk());
      }
      done = true;
      return;
    }
    while (!done) {
      ++reads;
      absl::StatusOr<Key> one = reader->LoadKey("k-torn");
      if (!one.ok()) {
        torn.push_back(absl::StrCat("LoadKey: ", one.status().ToString()));
      } else if (one->primary_version != one->versions.size()) {
        torn.push_back(absl::StrCat("LoadKey: primary ", one->primary_version,
                                    " with ", one->versions.size(),
                                    " versions"));
      }
      absl::StatusOr<std::vector<Key>> all = reader->LoadAllKeys();
      if (!all.ok()) {
        torn.push_back(absl::StrCat("LoadAllKeys: ", all.status().ToString()));
      } else if (all->size() != 1 ||
                 (*all)[0].primary_version != (*all)[0].versions.size()) {
        torn.push_back("LoadAllKeys: a torn key");
      }
    }
  });
  EXPECT_THAT(torn, IsEmpty())
      << torn.size() << " of " << reads
      << " reads; first: " << (torn.empty() ? "" : torn[0]);
}

// One Store shared by several threads (the registry, the maintenance loop
// and the RPC handlers of one custosd): as the interface promises, it is
// thread-safe.
TEST_P(StoreContractTest, OneStoreIsSafeToShareBetweenThreads) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 25;
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_THAT(store->InsertKey(SampleKey("k-shared", "x")), IsOk());
  std::atomic<int> failures{0};
  RunTogether(kThreads, [&](int t) {
    for (int n = 0; n < kPerThread; ++n) {
      absl::StatusOr<Key> written = store->UpdateKey("k-shared", [&](Key& k) {
        k.versions.push_back(
            NewVersion(static_cast<uint32_t>(k.versions.size() + 1),
                       absl::StrCat("x", t, "-", n)));
        k.primary_version = k.versions.back().number;
        return absl::OkStatus();
      });
      if (!written.ok()) ++failures;
      if (!store->LoadKey("k-shared").ok()) ++failures;
      if (n % 5 == 0 && !store->LoadAllKeys().ok()) ++failures;
    }
  });
  EXPECT_EQ(failures, 0);
  absl::StatusOr<Key> got = store->LoadKey("k-shared");
  ASSERT_THAT(got, IsOk());
  EXPECT_EQ(got->versions.size(), 2u + kThreads * kPerThread);
}

}  // namespace
}  // namespace custos::kms
