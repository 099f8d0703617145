// What is particular to the PostgreSQL Store, against a real server
// (tests/support/postgres_server.h): it is a network service that can go
// away and come back. A store outlives a restart or a crash of the server
// without being reopened, reports UNAVAILABLE (never another code, never a
// hang) while the server is down, and never echoes the URL's password. And
// what only a store shared by replicas has: a feed of the other replicas'
// changes, and a lead for background work that one replica holds at a time.
// Everything the Store interface promises is tested against SQLite and
// PostgreSQL alike in store_contract_test.cc.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <libpq-fe.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/testing/status_matchers.h"
#include "kms/key.h"
#include "kms/store/store.h"
#include "tests/integration/store_samples.h"
#include "tests/support/postgres_server.h"

namespace custos::kms {
namespace {

using ::custos::kms::store_samples::ExpectSameKey;
using ::custos::kms::store_samples::SampleKey;
using ::custos::testing::IsOk;
using ::custos::testing::PostgresServer;
using ::custos::testing::StatusIs;
using ::testing::AllOf;
using ::testing::AnyOf;
using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

struct PgConnCloser {
  void operator()(PGconn* c) const { PQfinish(c); }
};
using PgConn = std::unique_ptr<PGconn, PgConnCloser>;

// Runs `sql` on `conn`; true if it succeeded.
bool RawExec(PGconn* conn, const std::string& sql) {
  PGresult* r = PQexec(conn, sql.c_str());
  const ExecStatusType status = PQresultStatus(r);
  PQclear(r);
  return status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK;
}

// One server for the suite (the tests restart and kill it), a fresh
// database per test.
class PostgresStoreTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<PostgresServer>> server =
        PostgresServer::Start();
    if (server.ok()) {
      server_ = *std::move(server);
    } else {
      server_error_ = server.status();
    }
  }
  static void TearDownTestSuite() {
    server_.reset();
    server_error_ = absl::OkStatus();
  }

  void SetUp() override {
    ASSERT_THAT(server_error_, IsOk());
    absl::StatusOr<std::string> url =
        server_->CreateDatabase(absl::StrCat("pg", next_database_++));
    ASSERT_THAT(url, IsOk());
    url_ = *url;
  }

  // Calls `load` until it succeeds, for up to 10 s; every failure before
  // must be UNAVAILABLE. Returns the number of failed calls, or -1.
  template <typename F>
  static int FailuresBeforeSuccess(F load) {
    const absl::Time deadline = absl::Now() + absl::Seconds(10);
    for (int failures = 0;; ++failures) {
      absl::Status s = load();
      if (s.ok()) return failures;
      EXPECT_THAT(s, StatusIs(absl::StatusCode::kUnavailable));
      if (absl::Now() >= deadline) {
        ADD_FAILURE() << "still failing after 10 s: " << s;
        return -1;
      }
      absl::SleepFor(absl::Milliseconds(50));
    }
  }

  std::unique_ptr<Store> Open() {
    absl::StatusOr<std::unique_ptr<Store>> store =
        OpenStore(url_, OpenMode::kCreate);
    EXPECT_THAT(store.status(), IsOk());
    return store.ok() ? *std::move(store) : nullptr;
  }

  // Waits on `feed` until it reports a change, for up to `timeout`;
  // returns the ids it reported and sets *waited to the time it took.
  static std::vector<std::string> NextChanges(ChangeFeed& feed,
                                              absl::Duration timeout,
                                              absl::Duration* waited) {
    const absl::Time start = absl::Now();
    const absl::Time deadline = start + timeout;
    std::vector<std::string> ids;
    while (ids.empty() && absl::Now() < deadline) {
      absl::StatusOr<std::vector<std::string>> changed =
          feed.Wait(deadline - absl::Now());
      EXPECT_THAT(changed.status(), IsOk());
      if (!changed.ok()) break;
      ids = *changed;
    }
    *waited = absl::Now() - start;
    return ids;
  }

  static inline std::unique_ptr<PostgresServer> server_;
  static inline absl::Status server_error_;
  static inline int next_database_ = 0;
  std::string url_;
};

TEST_F(PostgresStoreTest, ServesAgainAfterTheServerRestarts) {
  absl::StatusOr<std::unique_ptr<Store>> store =
      OpenStore(url_, OpenMode::kCreate);
  ASSERT_THAT(store.status(), IsOk());
  Key key = SampleKey("k-restart", "r");
  ASSERT_THAT((*store)->InsertKey(key), IsOk());
  ASSERT_THAT(server_->Restart(), IsOk());
  // A store may fail the first call on a dropped connection (UNAVAILABLE),
  // but reconnects by itself.
  EXPECT_GE(FailuresBeforeSuccess(
                [&] { return (*store)->LoadKey("k-restart").status(); }),
            0);
  absl::StatusOr<Key> got = (*store)->LoadKey("k-restart");
  ASSERT_THAT(got, IsOk());
  ExpectSameKey(*got, key);
  EXPECT_THAT((*store)->UpdateKey("k-restart",
                                  [](Key& k) {
                                    k.description = "after restart";
                                    return absl::OkStatus();
                                  }),
              IsOk());
}

// The postmaster killed outright (SIGKILL), as by the OOM killer: while it
// is down every call is UNAVAILABLE and returns promptly; once it is back
// (after crash recovery) the store serves again, with every change it
// committed before the crash.
TEST_F(PostgresStoreTest, ServerCrashIsUnavailableUntilItRecovers) {
  absl::StatusOr<std::unique_ptr<Store>> store =
      OpenStore(url_, OpenMode::kCreate);
  ASSERT_THAT(store.status(), IsOk());
  Key key = SampleKey("k-crash", "c");
  ASSERT_THAT((*store)->InsertKey(key), IsOk());
  ASSERT_THAT((*store)->UpdateKey("k-crash",
                                  [](Key& k) {
                                    k.versions[1].encryptions_reserved = 7000;
                                    return absl::OkStatus();
                                  }),
              IsOk());
  key.versions[1].encryptions_reserved = 7000;

  ASSERT_GT(server_->pid(), 0);
  ASSERT_EQ(kill(server_->pid(), SIGKILL), 0);
  // Its backends notice and exit; give them a moment, then expect the
  // connection to be gone.
  absl::SleepFor(absl::Milliseconds(500));
  const absl::Time start = absl::Now();
  EXPECT_THAT((*store)->LoadKey("k-crash"),
              StatusIs(absl::StatusCode::kUnavailable));
  bool mutated = false;
  EXPECT_THAT((*store)->UpdateKey("k-crash",
                                  [&](Key& k) {
                                    mutated = true;
                                    return absl::OkStatus();
                                  }),
              StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_FALSE(mutated) << "the mutator ran with no database to write to";
  EXPECT_THAT((*store)->LoadAllKeys(),
              StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));

  ASSERT_THAT(server_->Restart(), IsOk());
  EXPECT_GE(FailuresBeforeSuccess(
                [&] { return (*store)->LoadKey("k-crash").status(); }),
            0);
  absl::StatusOr<Key> got = (*store)->LoadKey("k-crash");
  ASSERT_THAT(got, IsOk());
  ExpectSameKey(*got, key);
}

TEST_F(PostgresStoreTest, UnreachableServerIsUnavailableWithoutThePassword) {
  // Port 1: nothing listens there, and nobody unprivileged can.
  const absl::Time start = absl::Now();
  EXPECT_THAT(
      OpenStore("postgresql://custos:s3cret@127.0.0.1:1/custos",
                OpenMode::kCreate),
      StatusIs(absl::StatusCode::kUnavailable,
               AllOf(HasSubstr("127.0.0.1"), Not(HasSubstr("s3cret")))));
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
}

TEST_F(PostgresStoreTest, MissingDatabaseIsRefusedNamingIt) {
  absl::Status s =
      OpenStore(absl::StrCat("postgresql://custos@127.0.0.1:", server_->port(),
                             "/no_such_database"),
                OpenMode::kCreate)
          .status();
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("no_such_database"));
}

// A replica that stalls while it holds a key's row lock (stopped, or cut
// off from the server mid-transaction, which the server may not notice for
// a long time) must not stall the others: UpdateKey gives up within
// seconds, as SQLite's busy timeout does, with a retryable code.
TEST_F(PostgresStoreTest, UpdateKeyGivesUpOnARowLockedElsewhere) {
  constexpr absl::Duration kPatience = absl::Seconds(15);
  std::unique_ptr<Store> store = Open();
  ASSERT_NE(store, nullptr);
  ASSERT_THAT(store->InsertKey(SampleKey("k-locked", "l")), IsOk());
  PgConn stalled(PQconnectdb(url_.c_str()));
  ASSERT_EQ(PQstatus(stalled.get()), CONNECTION_OK);
  ASSERT_TRUE(RawExec(stalled.get(), "BEGIN"));
  ASSERT_TRUE(RawExec(stalled.get(),
                      "SELECT 1 FROM keys WHERE id = 'k-locked' FOR UPDATE"));
  std::atomic<bool> done{false};
  absl::Status result;
  const absl::Time start = absl::Now();
  std::thread updater([&] {
    result = store
                 ->UpdateKey("k-locked",
                             [](Key& k) {
                               k.description = "changed";
                               return absl::OkStatus();
                             })
                 .status();
    done = true;
  });
  while (!done && absl::Now() - start < kPatience) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  const bool gave_up = done;
  const absl::Duration waited = absl::Now() - start;
  // Let it through either way, so that the thread ends.
  EXPECT_TRUE(RawExec(stalled.get(), "ROLLBACK"));
  updater.join();
  EXPECT_TRUE(gave_up) << "UpdateKey still waited for the row lock after "
                       << kPatience;
  if (gave_up) {
    EXPECT_THAT(result, AnyOf(StatusIs(absl::StatusCode::kUnavailable),
                              StatusIs(absl::StatusCode::kAborted),
                              StatusIs(absl::StatusCode::kDeadlineExceeded)))
        << "after " << waited;
  }
  // And the store works again once the lock is gone.
  EXPECT_THAT(store->UpdateKey("k-locked",
                               [](Key& k) {
                                 k.description = "later";
                                 return absl::OkStatus();
                               }),
              IsOk());
}

// ---- Several replicas: the change feed ----

// What one replica commits, another's feed reports within a second (a
// disabled key must stop working everywhere within one); what is rolled
// back, it never reports.
TEST_F(PostgresStoreTest, ChangeFeedReportsAnotherReplicasCommitsPromptly) {
  std::unique_ptr<Store> a = Open();
  std::unique_ptr<Store> b = Open();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_TRUE(a->Shared());
  absl::StatusOr<std::unique_ptr<ChangeFeed>> feed = b->WatchChanges();
  ASSERT_THAT(feed.status(), IsOk());
  ASSERT_NE(*feed, nullptr);
  // A new feed knows nothing yet: its first report may ask for a reload.
  absl::Duration waited;
  std::vector<std::string> changed =
      NextChanges(**feed, absl::Milliseconds(300), &waited);
  EXPECT_THAT(changed, AnyOf(IsEmpty(), ElementsAre(ChangeFeed::kEverything)));

  struct Step {
    const char* what;
    std::function<absl::Status()> change;
  };
  const Step steps[] = {
      {"InsertKey", [&] { return a->InsertKey(SampleKey("k-fed", "f")); }},
      {"UpdateKey",
       [&] {
         return a
             ->UpdateKey("k-fed",
                         [](Key& k) {
                           k.state = KeyState::kDisabled;
                           return absl::OkStatus();
                         })
             .status();
       }},
      {"CreateAlias",
       [&] {
         return a->CreateAlias({"alias/fed", "k-fed", absl::Now()});
       }},
      {"DeleteAlias", [&] { return a->DeleteAlias("alias/fed"); }},
  };
  for (const Step& step : steps) {
    SCOPED_TRACE(step.what);
    ASSERT_THAT(step.change(), IsOk());
    changed = NextChanges(**feed, absl::Seconds(5), &waited);
    EXPECT_THAT(changed, Contains("k-fed"));
    EXPECT_LT(waited, absl::Seconds(1));
  }

  // Rolled back: nothing to report.
  EXPECT_THAT(
      a->UpdateKey("k-fed",
                   [](Key&) { return absl::FailedPreconditionError("no"); }),
      StatusIs(absl::StatusCode::kFailedPrecondition));
  changed = NextChanges(**feed, absl::Milliseconds(500), &waited);
  EXPECT_THAT(changed, IsEmpty());
  EXPECT_GE(waited, absl::Milliseconds(400)) << "Wait returned early";
}

// A feed that lost its connection cannot know what it missed: once the
// server is back it reports kEverything (reload every key), and UNAVAILABLE
// before.
TEST_F(PostgresStoreTest, ChangeFeedAsksForAFullReloadAfterTheServerRestarts) {
  std::unique_ptr<Store> a = Open();
  ASSERT_NE(a, nullptr);
  absl::StatusOr<std::unique_ptr<ChangeFeed>> feed = a->WatchChanges();
  ASSERT_THAT(feed.status(), IsOk());
  ASSERT_NE(*feed, nullptr);
  ASSERT_THAT((*feed)->Wait(absl::Milliseconds(100)).status(), IsOk());
  ASSERT_THAT((*feed)->Wait(absl::Milliseconds(100)).status(), IsOk());

  ASSERT_THAT(server_->Restart(), IsOk());
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  absl::StatusOr<std::vector<std::string>> changed;
  do {
    changed = (*feed)->Wait(absl::Milliseconds(200));
    if (!changed.ok()) {
      EXPECT_THAT(changed.status(), StatusIs(absl::StatusCode::kUnavailable));
    } else if (!changed->empty()) {
      break;
    }
  } while (absl::Now() < deadline);
  ASSERT_THAT(changed.status(), IsOk());
  EXPECT_THAT(*changed, Contains(ChangeFeed::kEverything))
      << "the feed reconnected without asking for a reload";

  // And it follows changes again.
  std::unique_ptr<Store> b = Open();
  ASSERT_NE(b, nullptr);
  ASSERT_THAT(b->InsertKey(SampleKey("k-after", "a")), IsOk());
  absl::Duration waited;
  EXPECT_THAT(NextChanges(**feed, absl::Seconds(5), &waited),
              Contains("k-after"));
}

// ---- Several replicas: the lead for background work ----

TEST_F(PostgresStoreTest, OneReplicaLeadsAtATimeAndAnotherTakesOver) {
  std::unique_ptr<Store> a = Open();
  std::unique_ptr<Store> b = Open();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  absl::StatusOr<std::unique_ptr<Leadership>> lead_a = a->NewLeadership();
  absl::StatusOr<std::unique_ptr<Leadership>> lead_b = b->NewLeadership();
  ASSERT_THAT(lead_a.status(), IsOk());
  ASSERT_THAT(lead_b.status(), IsOk());
  ASSERT_NE(*lead_a, nullptr);
  ASSERT_NE(*lead_b, nullptr);
  EXPECT_TRUE((*lead_a)->Hold());
  EXPECT_FALSE((*lead_b)->Hold());
  EXPECT_TRUE((*lead_a)->Hold()) << "the leader lost the lead by confirming it";
  EXPECT_FALSE((*lead_b)->Hold());

  // The leader goes away (its process ends): another takes over.
  lead_a->reset();
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  bool took_over = false;
  while (!took_over && absl::Now() < deadline) {
    took_over = (*lead_b)->Hold();
    if (!took_over) absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_TRUE(took_over);
  absl::StatusOr<std::unique_ptr<Leadership>> lead_c = a->NewLeadership();
  ASSERT_THAT(lead_c.status(), IsOk());
  EXPECT_FALSE((*lead_c)->Hold());
  EXPECT_TRUE((*lead_b)->Hold());
}

// A leader that cannot reach the server must stop leading at once: another
// replica may take over as soon as the server notices.
TEST_F(PostgresStoreTest, LeaderThatLosesTheServerStopsLeading) {
  std::unique_ptr<Store> a = Open();
  ASSERT_NE(a, nullptr);
  absl::StatusOr<std::unique_ptr<Leadership>> lead = a->NewLeadership();
  ASSERT_THAT(lead.status(), IsOk());
  ASSERT_NE(*lead, nullptr);
  ASSERT_TRUE((*lead)->Hold());
  ASSERT_EQ(kill(server_->pid(), SIGKILL), 0);
  absl::SleepFor(absl::Milliseconds(300));
  const absl::Time start = absl::Now();
  EXPECT_FALSE((*lead)->Hold());
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  ASSERT_THAT(server_->Restart(), IsOk());
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  bool leads = false;
  while (!leads && absl::Now() < deadline) {
    leads = (*lead)->Hold();
    if (!leads) absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_TRUE(leads) << "no lead after the server came back";
}

}  // namespace
}  // namespace custos::kms
