// Two custosd replicas sharing one PostgreSQL database (a real server the
// test starts in a temporary directory) and one SoftHSM2 token directory,
// each with its own node id and audit chain. A key created on one is used
// on the other; a rotation or a disable on one is seen by the other; two
// rotations at once make one version; killing one replica mid-load leaves
// the other serving, and it takes over the background work.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <libpq-fe.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "custos/v1/kms.grpc.pb.h"
#include "tests/support/custosd_process.h"
#include "tests/support/postgres_server.h"
#include "tests/support/subprocess.h"

namespace custos {
namespace {

namespace pb = ::custos::v1;
using ::custos::testing::CustosdProcess;
using ::custos::testing::PostgresServer;
using ::custos::testing::ProcessResult;
using Clock = std::chrono::steady_clock;
using Code = grpc::StatusCode;

using ::custos::testing::ReadAll;

class ReplicasE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto pg = PostgresServer::Start();
    ASSERT_TRUE(pg.ok()) << pg.status();
    pg_ = pg->release();
  }
  static void TearDownTestSuite() {
    delete pg_;
    pg_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(pg_, nullptr);
    const ::testing::TestInfo* test =
        ::testing::UnitTest::GetInstance()->current_test_info();
    auto url = pg_->CreateDatabase(absl::StrCat("t", ++databases_));
    ASSERT_TRUE(url.ok()) << url.status() << " (" << test->name() << ")";
    url_ = *url;
    CustosdProcess::Options first;
    first.storage_url = url_;
    first.node_id = "replica-1";
    first.extra_config = "maintenance_interval_seconds: 0.2\n";
    auto one = CustosdProcess::Start(first);
    ASSERT_TRUE(one.ok()) << one.status();
    one_ = *std::move(one);
    CustosdProcess::Options second;
    second.node_id = "replica-2";
    auto two = CustosdProcess::StartReplica(*one_, second);
    ASSERT_TRUE(two.ok()) << two.status();
    two_ = *std::move(two);
  }
  void TearDown() override {
    two_.reset();  // shares one_'s directory, which one_ removes
    one_.reset();
  }

  static std::unique_ptr<pb::KeyManagementService::Stub> Kms(
      const CustosdProcess& p) {
    return pb::KeyManagementService::NewStub(p.Channel("admin"));
  }
  static std::unique_ptr<pb::CryptoService::Stub> Crypto(
      const CustosdProcess& p) {
    return pb::CryptoService::NewStub(p.Channel("service-a"));
  }

  std::string NewKey() {
    auto key = one_->CreateKeyFor(
        "service-a", {pb::GENERATE_DATA_KEY, pb::DECRYPT, pb::ENCRYPT});
    EXPECT_TRUE(key.ok()) << key.status();
    return key.ok() ? *key : "";
  }

  static grpc::Status DataKey(const CustosdProcess& p, const std::string& key,
                              pb::GenerateDataKeyResponse* out) {
    pb::GenerateDataKeyRequest req;
    req.set_key(key);
    req.set_number_of_bytes(32);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::seconds(10));
    return Crypto(p)->GenerateDataKey(&ctx, req, out);
  }

  static grpc::Status Decrypt(const CustosdProcess& p, const std::string& blob,
                              pb::DecryptResponse* out) {
    pb::DecryptRequest req;
    req.set_ciphertext_blob(blob);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::seconds(10));
    return Crypto(p)->Decrypt(&ctx, req, out);
  }

  static pb::Key GetKey(const CustosdProcess& p, const std::string& key) {
    pb::GetKeyRequest req;
    req.set_key(key);
    pb::Key out;
    grpc::ClientContext ctx;
    grpc::Status s = Kms(p)->GetKey(&ctx, req, &out);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return out;
  }

  static grpc::Status Rotate(const CustosdProcess& p, const std::string& key,
                             pb::Key* out) {
    pb::RotateKeyRequest req;
    req.set_key(key);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::seconds(30));
    return Kms(p)->RotateKey(&ctx, req, out);
  }

  static void ExpectChainVerifies(const CustosdProcess& p) {
    ProcessResult r = p.VerifyAuditLog();
    EXPECT_EQ(r.code, 0) << p.audit_dir() << ": " << r;
  }

  // Waits up to `limit` for `text` in the log of `p`.
  static bool LogShows(const CustosdProcess& p, const std::string& text,
                       std::chrono::seconds limit) {
    const auto give_up = Clock::now() + limit;
    while (Clock::now() < give_up) {
      if (ReadAll(p.log_path()).find(text) != std::string::npos) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }

  static PostgresServer* pg_;
  static int databases_;
  std::string url_;
  std::unique_ptr<CustosdProcess> one_, two_;
};
PostgresServer* ReplicasE2eTest::pg_ = nullptr;
int ReplicasE2eTest::databases_ = 0;

TEST_F(ReplicasE2eTest, KeyCreatedOnOneIsUsedOnTheOther) {
  const std::string key = NewKey();
  pb::GenerateDataKeyResponse dk;
  grpc::Status s = DataKey(*two_, key, &dk);
  ASSERT_TRUE(s.ok()) << s.error_message();
  pb::DecryptResponse plain;
  s = Decrypt(*one_, dk.ciphertext_blob(), &plain);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(plain.plaintext(), dk.plaintext());
  ExpectChainVerifies(*one_);
  ExpectChainVerifies(*two_);
  // An auditor copies both replicas' segments into one directory and checks
  // both chains and their signatures in one run, one key per node. The
  // replicas stop first, each signing a checkpoint over its records: with
  // keys, the verifier requires every node's log to hold one.
  absl::Status stopped = two_->Stop();
  ASSERT_TRUE(stopped.ok()) << stopped;
  stopped = one_->Stop();
  ASSERT_TRUE(stopped.ok()) << stopped;
  const std::string combined = one_->dir() + "/combined";
  std::filesystem::create_directories(combined);
  std::vector<std::string> argv = {testing::BinDir() + "/custos", "--json",
                                   "audit", "verify", combined};
  for (const CustosdProcess* p : {one_.get(), two_.get()}) {
    for (const auto& entry :
         std::filesystem::directory_iterator(p->audit_dir())) {
      const std::string name = entry.path().filename().string();
      if (name.rfind("audit-public-key-", 0) == 0) {
        argv.push_back("--public-key");
        argv.push_back(entry.path().string());
      } else if (name.rfind("audit-", 0) == 0) {
        std::filesystem::copy_file(entry.path(), combined + "/" + name);
      }
    }
  }
  ProcessResult r =
      testing::RunProcess(argv, testing::EnvironmentWithout("CUSTOS_"),
                          "/dev/null", one_->dir() + "/combined");
  EXPECT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, ::testing::HasSubstr("\"signatures_checked\": true"));
  EXPECT_THAT(r.out, ::testing::HasSubstr("\"node\": \"replica-1\""));
  EXPECT_THAT(r.out, ::testing::HasSubstr("\"node\": \"replica-2\""));
}

TEST_F(ReplicasE2eTest, RotationOnOneIsSeenByTheOther) {
  const std::string key = NewKey();
  EXPECT_EQ(GetKey(*two_, key).primary_version(), 1u);
  pb::Key rotated;
  grpc::Status s = Rotate(*two_, key, &rotated);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(rotated.primary_version(), 2u);
  // Replica one hears of it through the change feed (within milliseconds;
  // up to 5 s allowed here).
  pb::Key seen;
  for (int i = 0; i < 100; ++i) {
    seen = GetKey(*one_, key);
    if (seen.primary_version() == 2u) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(seen.primary_version(), 2u);
  pb::GenerateDataKeyResponse dk;
  s = DataKey(*one_, key, &dk);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(dk.key_version(), 2u);
}

// The bound: a key disabled on one replica stops working on every
// replica within 1 second. By design either the change feed has applied the
// disable (FAILED_PRECONDITION) or the replica has gone a second without
// hearing from the database and refuses every key (UNAVAILABLE); a call
// made a second after the disable returned is refused either way.
TEST_F(ReplicasE2eTest, DisabledOnOneStopsOnTheOtherWithinASecond) {
  const std::string key = NewKey();
  pb::GenerateDataKeyResponse dk;
  ASSERT_TRUE(DataKey(*two_, key, &dk).ok());
  pb::DisableKeyRequest req;
  req.set_key(key);
  pb::Key disabled;
  grpc::ClientContext ctx;
  ASSERT_TRUE(Kms(*one_)->DisableKey(&ctx, req, &disabled).ok());
  const auto done = Clock::now();
  auto refused_at = Clock::time_point::max();
  while (Clock::now() < done + std::chrono::seconds(1)) {
    if (!DataKey(*two_, key, &dk).ok()) {
      refused_at = Clock::now();
      break;
    }
  }
  std::this_thread::sleep_until(done + std::chrono::seconds(1));
  pb::GenerateDataKeyResponse refused;
  grpc::Status late = DataKey(*two_, key, &refused);
  EXPECT_FALSE(late.ok()) << "still usable on replica 2 a second later";
  EXPECT_THAT(late.error_code(),
              ::testing::AnyOf(Code::FAILED_PRECONDITION, Code::UNAVAILABLE));
  EXPECT_TRUE(refused.plaintext().empty());
  ASSERT_NE(refused_at, Clock::time_point::max());
  std::printf(
      "replica 2 refused the disabled key %lld ms after the disable "
      "returned\n",
      static_cast<long long>(
          std::chrono::duration_cast<std::chrono::milliseconds>(refused_at -
                                                                done)
              .count()));
}

// Two rotations that meet at the key's row lock make one version: the
// second finds the primary changed and returns the first one's result.
// The test holds the row lock itself until both replicas wait on it.
TEST_F(ReplicasE2eTest, TwoRotationsAtOnceMakeOneVersion) {
  const std::string key = NewKey();
  PGconn* db = PQconnectdb(url_.c_str());
  ASSERT_EQ(PQstatus(db), CONNECTION_OK) << PQerrorMessage(db);
  PQclear(PQexec(db, "BEGIN"));
  const std::string lock =
      absl::StrCat("SELECT 1 FROM keys WHERE id = '", key, "' FOR UPDATE");
  PGresult* locked = PQexec(db, lock.c_str());
  ASSERT_EQ(PQresultStatus(locked), PGRES_TUPLES_OK);
  ASSERT_EQ(PQntuples(locked), 1);
  PQclear(locked);

  // Waits until `n` transactions wait for a lock.
  auto wait_for_waiters = [&](int n) {
    int waiting = 0;
    for (int i = 0; i < 200 && waiting < n; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      PGresult* r = PQexec(db,
                           "SELECT count(*) FROM pg_stat_activity WHERE "
                           "wait_event_type = 'Lock'");
      waiting = std::atoi(PQgetvalue(r, 0, 0));
      PQclear(r);
    }
    EXPECT_EQ(waiting, n);
  };
  grpc::Status s1, s2;
  pb::Key k1, k2;
  // One after the other up to the row lock: SoftHSM2 shared by two
  // processes can lose sight of an object the other makes at the very same
  // moment (its token generation counter; see hsm::Hsm::GenerateAesKey), a
  // limit of the test HSM that a network HSM does not have.
  std::thread r1([&] { s1 = Rotate(*one_, key, &k1); });
  wait_for_waiters(1);
  std::thread r2([&] { s2 = Rotate(*two_, key, &k2); });
  // Both generated their version and wait for the row.
  wait_for_waiters(2);
  PQclear(PQexec(db, "COMMIT"));
  r1.join();
  r2.join();
  PQfinish(db);
  ASSERT_TRUE(s1.ok()) << s1.error_message();
  ASSERT_TRUE(s2.ok()) << s2.error_message();
  EXPECT_EQ(k1.primary_version(), 2u);
  EXPECT_EQ(k2.primary_version(), 2u);
  pb::Key final_one = GetKey(*one_, key);
  pb::Key final_two = GetKey(*two_, key);
  EXPECT_EQ(final_one.versions_size(), 2);
  EXPECT_EQ(final_two.versions_size(), 2);
  // The loser's HSM object was destroyed: data keys open on both.
  for (const CustosdProcess* maker : {one_.get(), two_.get()}) {
    pb::GenerateDataKeyResponse dk;
    grpc::Status s = DataKey(*maker, key, &dk);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(dk.key_version(), 2u);
    for (const CustosdProcess* opener : {one_.get(), two_.get()}) {
      pb::DecryptResponse plain;
      s = Decrypt(*opener, dk.ciphertext_blob(), &plain);
      ASSERT_TRUE(s.ok()) << s.error_message();
      EXPECT_EQ(plain.plaintext(), dk.plaintext());
    }
  }
}

TEST_F(ReplicasE2eTest, KilledReplicaLeavesTheOtherServing) {
  const std::string key = NewKey();
  ASSERT_TRUE(
      LogShows(*one_, "leading background work", std::chrono::seconds(10)) ||
      LogShows(*two_, "leading background work", std::chrono::seconds(1)));
  const bool one_led =
      ReadAll(one_->log_path()).find("leading background work") !=
      std::string::npos;
  CustosdProcess& victim = one_led ? *one_ : *two_;
  CustosdProcess& survivor = one_led ? *two_ : *one_;

  std::atomic<bool> stop{false};
  std::atomic<int> served{0}, failed{0};
  std::vector<std::string> blobs;
  std::mutex blobs_mu;
  std::thread load([&] {
    while (!stop.load()) {
      pb::GenerateDataKeyResponse dk;
      grpc::Status s = DataKey(survivor, key, &dk);
      if (s.ok()) {
        ++served;
        std::lock_guard<std::mutex> lock(blobs_mu);
        blobs.push_back(dk.ciphertext_blob());
      } else {
        ++failed;
        ADD_FAILURE() << "survivor refused: " << s.error_message();
      }
    }
  });
  std::thread victim_load([&] {
    while (!stop.load()) {
      pb::GenerateDataKeyResponse dk;
      DataKey(victim, key, &dk).ok();  // fails once it is killed
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  victim.Kill(SIGKILL);
  const int served_at_kill = served.load();
  // The survivor leads the background work now.
  EXPECT_TRUE(
      LogShows(survivor, "leading background work", std::chrono::seconds(15)));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  stop = true;
  load.join();
  victim_load.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_GT(served.load(), served_at_kill);
  // Every data key the survivor issued opens on it.
  for (const std::string& blob : blobs) {
    pb::DecryptResponse plain;
    ASSERT_TRUE(Decrypt(survivor, blob, &plain).ok());
  }
  // The killed replica's chain verifies too, up to its last full line.
  ExpectChainVerifies(survivor);
  ExpectChainVerifies(victim);
}

}  // namespace
}  // namespace custos
