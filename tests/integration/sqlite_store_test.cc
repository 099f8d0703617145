// The SQLite Store on a real database file in a temporary directory: URL
// forms, migrations, round trips of every field, transactional updates,
// alias rules, and refusal of rows it cannot trust (SECURITY.md: an unknown
// state is never treated as enabled).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/testing/status_matchers.h"
#include "kms/key.h"
#include "kms/policy.h"
#include "kms/store/store.h"
#include "tests/support/test_token.h"

namespace custos::kms {
namespace {

using ::custos::testing::IsOk;
using ::custos::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// A fixed instant with a non-zero microsecond part.
const absl::Time kT0 = absl::FromUnixMicros(1700000000123456);

KeyPolicy SamplePolicy() {
  KeyPolicy policy;
  policy.version = 7;
  PolicyBinding use;
  use.principals = {"spiffe://example.org/billing", "spiffe://example.org/*"};
  use.operations = {KeyOperation::kEncrypt, KeyOperation::kDecrypt};
  use.required_context = {{"tenant", "acme-*"}, {"env", "prod"}};
  use.require_justification = true;
  use.allowed_reasons = {JustificationReason::kCustomerInitiatedAccess};
  PolicyBinding gen;
  gen.principals = {"spiffe://example.org/batch"};
  gen.operations = {KeyOperation::kGenerateDataKey};
  policy.bindings = {use, gen};
  return policy;
}

// A key with every field set to something other than its default.
Key SampleKey(const std::string& id, const std::string& hsm_prefix) {
  Key key;
  key.id = id;
  key.description = "billing records; 'quoted' \"and\" unicode \xc3\xa9";
  key.labels = {{"team", "billing"}, {"cost-center", "42"}, {"empty", ""}};
  key.purpose = KeyPurpose::kEncryptDecrypt;
  key.state = KeyState::kDisabled;
  key.rotation_period = absl::Hours(24 * 90);
  key.next_rotation_time = kT0 + absl::Hours(24 * 90) + absl::Microseconds(1);
  key.primary_version = 2;
  key.create_time = kT0;
  key.update_time = kT0 + absl::Microseconds(999999);
  key.deletion_time = absl::InfinitePast();
  key.policy = SamplePolicy();
  KeyVersion v1;
  v1.number = 1;
  v1.state = VersionState::kDisabled;
  v1.hsm_id = hsm_prefix + std::string("\x00\x01\x00\xff", 4);
  v1.create_time = kT0 + absl::Microseconds(1);
  v1.encryptions_reserved = (uint64_t{1} << 40) + 3;
  KeyVersion v2;
  v2.number = 2;
  v2.state = VersionState::kEnabled;
  v2.hsm_id = hsm_prefix + std::string("\x00\x00\x02", 3);
  v2.create_time = kT0 + absl::Seconds(5) + absl::Microseconds(7);
  v2.encryptions_reserved = 0;
  key.versions = {v1, v2};
  key.aliases = {"alias/a-billing", "alias/b/billing"};  // sorted
  return key;
}

void ExpectSameKey(const Key& got, const Key& want) {
  EXPECT_EQ(got.id, want.id);
  EXPECT_EQ(got.description, want.description);
  EXPECT_EQ(got.labels, want.labels);
  EXPECT_EQ(got.purpose, want.purpose);
  EXPECT_EQ(got.state, want.state);
  EXPECT_EQ(got.rotation_period, want.rotation_period);
  EXPECT_EQ(got.next_rotation_time, want.next_rotation_time);
  EXPECT_EQ(got.primary_version, want.primary_version);
  EXPECT_EQ(got.create_time, want.create_time);
  EXPECT_EQ(got.update_time, want.update_time);
  EXPECT_EQ(got.deletion_time, want.deletion_time);
  EXPECT_EQ(got.deletion_window, want.deletion_window);
  EXPECT_EQ(got.deletion_elapsed, want.deletion_elapsed);
  EXPECT_TRUE(got.policy == want.policy)
      << "got " << PolicyToJson(got.policy) << "\nwant "
      << PolicyToJson(want.policy);
  ASSERT_EQ(got.versions.size(), want.versions.size());
  for (size_t i = 0; i < want.versions.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("version index ", i));
    EXPECT_EQ(got.versions[i].number, want.versions[i].number);
    EXPECT_EQ(got.versions[i].state, want.versions[i].state);
    EXPECT_EQ(got.versions[i].hsm_id, want.versions[i].hsm_id);
    EXPECT_EQ(got.versions[i].create_time, want.versions[i].create_time);
    EXPECT_EQ(got.versions[i].encryptions_reserved,
              want.versions[i].encryptions_reserved);
  }
  EXPECT_EQ(got.aliases, want.aliases);
}

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
    absl::StatusOr<std::unique_ptr<Store>> store = OpenStore(url_);
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

  // The single integer result of `sql` on a raw connection.
  int64_t RawQueryInt(const std::string& sql) {
    sqlite3* db = nullptr;
    EXPECT_EQ(
        sqlite3_open_v2(path_.c_str(), &db, SQLITE_OPEN_READONLY, nullptr),
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
  absl::StatusOr<std::unique_ptr<Store>> store = OpenStore("sqlite:rel.db");
  std::filesystem::current_path(old_cwd);
  ASSERT_THAT(store, IsOk());
  EXPECT_TRUE(std::filesystem::exists(dir_ + "/rel.db"));
}

TEST_F(SqliteStoreTest, RefusesOtherSchemesNamingTheUrl) {
  for (const std::string url :
       {"postgres://db.example.org/custos", "mysql://x", "/var/lib/custos.db",
        "SQLITE:///tmp/x.db", ""}) {
    EXPECT_THAT(OpenStore(url), StatusIs(absl::StatusCode::kInvalidArgument,
                                         AllOf(HasSubstr("'" + url + "'"),
                                               HasSubstr("sqlite"))))
        << url;
  }
}

TEST_F(SqliteStoreTest, RefusesSqliteUrlWithoutPath) {
  for (const std::string url : {"sqlite:", "sqlite://"}) {
    EXPECT_THAT(OpenStore(url),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("path")))
        << url;
  }
}

TEST_F(SqliteStoreTest, UnopenablePathIsUnavailable) {
  EXPECT_THAT(OpenStore("sqlite://" + dir_ + "/no/such/dir/custos.db"),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("custos.db")));
}

// ---- Migrations ----

TEST_F(SqliteStoreTest, MigrationsAreIdempotent) {
  {
    std::unique_ptr<Store> store = Open();
    ASSERT_NE(store, nullptr);
    EXPECT_EQ(store->SchemaVersion(), 2);
  }
  {
    std::unique_ptr<Store> store = Open();
    ASSERT_NE(store, nullptr);
    EXPECT_EQ(store->SchemaVersion(), 2);
  }
  EXPECT_EQ(RawQueryInt("SELECT COUNT(*) FROM schema_migrations"), 2);
  EXPECT_EQ(RawQueryInt("SELECT MAX(version) FROM schema_migrations"), 2);
}

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
      "DELETE FROM schema_migrations WHERE version = 2;");
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->SchemaVersion(), 2);
  absl::StatusOr<Key> got = store->LoadKey("k-pending");
  ASSERT_THAT(got, IsOk());
  EXPECT_EQ(got->deletion_window, absl::Hours(24 * 9));
  EXPECT_EQ(got->deletion_elapsed, absl::ZeroDuration());
  got = store->LoadKey("k-enabled");
  ASSERT_THAT(got, IsOk());
  EXPECT_EQ(got->deletion_window, absl::ZeroDuration());
}

TEST_F(SqliteStoreTest, RefusesSchemaNewerThanItKnows) {
  { ASSERT_NE(Open(), nullptr); }
  RawExec("INSERT INTO schema_migrations(version, applied_us) VALUES (3, 0)");
  EXPECT_THAT(OpenStore(url_), StatusIs(absl::StatusCode::kFailedPrecondition,
                                        HasSubstr("newer")));
}

TEST_F(SqliteStoreTest, UsesWalAndForeignKeys) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  EXPECT_TRUE(std::filesystem::exists(path_ + "-wal"));
}

// ---- Round trips ----

TEST_F(SqliteStoreTest, InsertThenLoadRoundTripsEveryField) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  Key key = SampleKey("k-roundtrip", "a");
  ASSERT_THAT(store->InsertKey(key), IsOk());
  absl::StatusOr<Key> loaded = store->LoadKey(key.id);
  ASSERT_THAT(loaded, IsOk());
  ExpectSameKey(*loaded, key);
}

TEST_F(SqliteStoreTest, RoundTripsSetOptionalTimesAndUnsetOnes) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  Key with = SampleKey("k-with", "w");
  with.state = KeyState::kPendingDeletion;
  with.deletion_time = kT0 + absl::Hours(24 * 7) + absl::Microseconds(3);
  with.deletion_window = absl::Hours(24 * 7);
  with.deletion_elapsed = absl::Hours(26) + absl::Microseconds(5);
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

TEST_F(SqliteStoreTest, LoadAllKeysReturnsEveryKeyInCreationOrder) {
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
TEST_F(SqliteStoreTest, LoadAllKeysJoinsEachKeyWithItsOwnRows) {
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

TEST_F(SqliteStoreTest, EmptyStoreLoadsNothing) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  EXPECT_THAT(store->LoadAllKeys(), ::custos::testing::IsOkAndHolds(IsEmpty()));
  EXPECT_THAT(store->ListAliases(), ::custos::testing::IsOkAndHolds(IsEmpty()));
  EXPECT_THAT(store->LoadKey("k-missing"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("k-missing")));
}

TEST_F(SqliteStoreTest, HostileIdsAreDataNotSql) {
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

TEST_F(SqliteStoreTest, DuplicateKeyIdIsAlreadyExists) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_THAT(store->InsertKey(SampleKey("k-dup", "1")), IsOk());
  Key again = SampleKey("k-dup", "2");
  again.aliases.clear();
  EXPECT_THAT(store->InsertKey(again),
              StatusIs(absl::StatusCode::kAlreadyExists));
}

TEST_F(SqliteStoreTest, InsertWithTakenAliasInsertsNothing) {
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

TEST_F(SqliteStoreTest, UpdateKeyWritesTheMutation) {
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

TEST_F(SqliteStoreTest, UpdateKeyWhoseMutatorFailsChangesNothing) {
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
TEST_F(SqliteStoreTest, UpdateKeyRollsBackWhenAVersionWriteFails) {
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

TEST_F(SqliteStoreTest, UpdateKeyCannotChangeTheId) {
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

TEST_F(SqliteStoreTest, UpdateMissingKeyIsNotFound) {
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

TEST_F(SqliteStoreTest, AliasLifecycle) {
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

TEST_F(SqliteStoreTest, DuplicateAliasIsAlreadyExists) {
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

TEST_F(SqliteStoreTest, AliasOnMissingKeyIsNotFound) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  EXPECT_THAT(store->CreateAlias({"alias/orphan", "k-missing", kT0}),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("k-missing")));
  EXPECT_THAT(store->ListAliases(), ::custos::testing::IsOkAndHolds(IsEmpty()));
}

TEST_F(SqliteStoreTest, DeleteMissingAliasIsNotFound) {
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

TEST_F(SqliteStoreTest, UnknownKeyStateIsDataLossNeverEnabled) {
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

TEST_F(SqliteStoreTest, NonIntegerKeyStateIsDataLoss) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_THAT(store->InsertKey(SampleKey("k-text", "t")), IsOk());
  RawExec("UPDATE keys SET state = 'ENABLED' WHERE id = 'k-text'");
  EXPECT_THAT(store->LoadKey("k-text"), StatusIs(absl::StatusCode::kDataLoss));
}

TEST_F(SqliteStoreTest, UnknownVersionStateIsDataLoss) {
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
TEST_F(SqliteStoreTest, UnknownPurposeIsDataLoss) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_THAT(store->InsertKey(SampleKey("k-purpose", "p")), IsOk());
  RawExec("UPDATE keys SET purpose = 77 WHERE id = 'k-purpose'");
  EXPECT_THAT(store->LoadKey("k-purpose"),
              StatusIs(absl::StatusCode::kDataLoss));
}

TEST_F(SqliteStoreTest, CorruptLabelsOrPolicyIsDataLoss) {
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

TEST_F(SqliteStoreTest, GapInVersionNumbersIsDataLoss) {
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_THAT(store->InsertKey(SampleKey("k-gap", "g")), IsOk());
  RawExec("DELETE FROM key_versions WHERE key_id = 'k-gap' AND number = 1");
  EXPECT_THAT(store->LoadKey("k-gap"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("gap")));
}

// LoadKey and LoadAllKeys share their row checks: a row one refuses, the
// other refuses too, even with sound keys around it.
TEST_F(SqliteStoreTest, EveryRowCheckRefusesLoadAllKeysAsLoadKey) {
  struct Case {
    const char* what;
    const char* sql;  // corrupts key 'k-bad'
    const char* message;
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
       "INSERT INTO key_versions (key_id, number, state, hsm_id, create_us) "
       "VALUES ('k-bad', 4, 1, x'0401', 0)",
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

TEST_F(SqliteStoreTest, DataSurvivesReopen) {
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
  EXPECT_EQ(store->SchemaVersion(), 2);
  absl::StatusOr<Key> loaded = store->LoadKey("k-durable");
  ASSERT_THAT(loaded, IsOk());
  ExpectSameKey(*loaded, key);
}

// Read-only and locked databases are not covered here: the tests run as root
// (chmod does not stop writes) and a lock held past the 5 s busy timeout
// would make the suite slow.

}  // namespace
}  // namespace custos::kms
