// What is particular to the SQLite Store, on a real database file in a
// temporary directory: URL forms, the WAL journal, migration from a
// version-1 file, and values SQLite's loose typing lets a raw write store.
// Everything the Store interface promises is tested against SQLite and
// PostgreSQL alike in store_contract_test.cc.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "common/testing/status_matchers.h"
#include "kms/key.h"
#include "kms/store/store.h"
#include "tests/integration/store_samples.h"
#include "tests/support/test_token.h"

namespace custos::kms {
namespace {

using ::custos::kms::store_samples::kLatestSchemaVersion;
using ::custos::kms::store_samples::SampleKey;
using ::custos::testing::IsOk;
using ::custos::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

class SqliteStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::string> dir =
        ::custos::testing::MakeTempDir("custos-store");
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_ = *dir;
    path_ = dir_ + "/custos.db";
    url_ = "sqlite://" + path_;  // path_ is absolute: sqlite:///tmp/...
  }
  void TearDown() override {
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  std::unique_ptr<Store> Open() {
    absl::StatusOr<std::unique_ptr<Store>> store =
        OpenStore(url_, OpenMode::kCreate);
    EXPECT_THAT(store, IsOk());
    return store.ok() ? *std::move(store) : nullptr;
  }

  // Runs `sql` on a separate raw connection, as a DBA or an attacker with
  // file access would.
  void RawExec(const std::string& sql) {
    sqlite3* db = nullptr;
    ASSERT_EQ(
        sqlite3_open_v2(path_.c_str(), &db, SQLITE_OPEN_READWRITE, nullptr),
        SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    char* err = nullptr;
    int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err);
    EXPECT_EQ(rc, SQLITE_OK) << (err ? err : "") << "\n" << sql;
    sqlite3_free(err);
    sqlite3_close(db);
  }

  std::string dir_, path_, url_;
};

// ---- URLs ----

TEST_F(SqliteStoreTest, OpensAbsoluteUrl) {
  ASSERT_EQ(path_[0], '/');
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  EXPECT_TRUE(std::filesystem::exists(path_));
}

TEST_F(SqliteStoreTest, OpensRelativeUrlAgainstWorkingDirectory) {
  const std::filesystem::path old_cwd = std::filesystem::current_path();
  ASSERT_EQ(chdir(dir_.c_str()), 0);
  absl::StatusOr<std::unique_ptr<Store>> store =
      OpenStore("sqlite:rel.db", OpenMode::kCreate);
  std::filesystem::current_path(old_cwd);
  ASSERT_THAT(store, IsOk());
  EXPECT_TRUE(std::filesystem::exists(dir_ + "/rel.db"));
}

TEST_F(SqliteStoreTest, RefusesOtherSchemesNamingTheUrl) {
  for (const std::string url :
       {"pgsql://db.example.org/custos", "mysql://x", "/var/lib/custos.db",
        "SQLITE:///tmp/x.db", "POSTGRESQL://db/custos", ""}) {
    EXPECT_THAT(OpenStore(url, OpenMode::kCreate),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         AllOf(HasSubstr("'" + url + "'"), HasSubstr("sqlite"),
                               HasSubstr("postgresql"))))
        << url;
  }
  // Named, but without the password a mistyped URL may carry.
  EXPECT_THAT(
      OpenStore("mysql://custos:s3cret@db.example.org/custos",
                OpenMode::kCreate),
      StatusIs(absl::StatusCode::kInvalidArgument,
               AllOf(HasSubstr("db.example.org"), Not(HasSubstr("s3cret")))));
}

TEST_F(SqliteStoreTest, RefusesSqliteUrlWithoutPath) {
  for (const std::string url : {"sqlite:", "sqlite://"}) {
    EXPECT_THAT(OpenStore(url, OpenMode::kCreate),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("path")))
        << url;
  }
}

TEST_F(SqliteStoreTest, UnopenablePathIsUnavailable) {
  EXPECT_THAT(OpenStore("sqlite://" + dir_ + "/no/such/dir/custos.db",
                        OpenMode::kCreate),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("custos.db")));
}

// ---- Migrations and journal ----

// Migration 2 gives a key already pending deletion the window it was
// scheduled with (deletion time less the time of scheduling), not zero.
TEST_F(SqliteStoreTest, MigrationTwoKeepsThePendingWindow) {
  Key pending = SampleKey("k-pending", "p");
  pending.state = KeyState::kPendingDeletion;
  pending.deletion_time = pending.update_time + absl::Hours(24 * 9);
  Key enabled = SampleKey("k-enabled", "e");
  enabled.aliases.clear();
  enabled.state = KeyState::kEnabled;
  {
    std::unique_ptr<Store> store = Open();
    ASSERT_NE(store, nullptr);
    ASSERT_THAT(store->InsertKey(pending), IsOk());
    ASSERT_THAT(store->InsertKey(enabled), IsOk());
  }
  // Back to a version-1 database, as an older custosd left it.
  RawExec(
      "ALTER TABLE keys DROP COLUMN deletion_window_us;"
      "ALTER TABLE keys DROP COLUMN deletion_elapsed_us;"
      "ALTER TABLE keys DROP COLUMN destruction_started;"
      "DROP TABLE deployment; DROP TABLE material_intents;"
      "DELETE FROM schema_migrations WHERE version >= 2;");
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->SchemaVersion(), kLatestSchemaVersion);
  absl::StatusOr<Key> got = store->LoadKey("k-pending");
  ASSERT_THAT(got, IsOk());
  EXPECT_EQ(got->deletion_window, absl::Hours(24 * 9));
  EXPECT_EQ(got->deletion_elapsed, absl::ZeroDuration());
  got = store->LoadKey("k-enabled");
  ASSERT_THAT(got, IsOk());
  EXPECT_EQ(got->deletion_window, absl::ZeroDuration());
}

TEST_F(SqliteStoreTest, UsesWalAndForeignKeys) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  EXPECT_TRUE(std::filesystem::exists(path_ + "-wal"));
}

// ---- Rows the store cannot trust ----

// SQLite keeps whatever a raw write puts in an INTEGER column; PostgreSQL's
// column types refuse such a write, so this one is SQLite's alone.
TEST_F(SqliteStoreTest, NonIntegerKeyStateIsDataLoss) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_THAT(store->InsertKey(SampleKey("k-text", "t")), IsOk());
  RawExec("UPDATE keys SET state = 'ENABLED' WHERE id = 'k-text'");
  EXPECT_THAT(store->LoadKey("k-text"), StatusIs(absl::StatusCode::kDataLoss));
}

// Read-only and locked databases are not covered here: the tests run as root
// (chmod does not stop writes) and a lock held past the 5 s busy timeout
// would make the suite slow.

}  // namespace
}  // namespace custos::kms
