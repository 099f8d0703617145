// A wall clock stepped across a deletion window, end to end: custosd runs
// under libfaketime (Debian's libfaketime), whose offset the test changes
// while the server runs; CLOCK_MONOTONIC is left real, as an NTP or operator
// step leaves it. A key scheduled for deletion with a 7-"day" window (7 s
// with the test's short day) must not be destroyed before 7 s have really
// passed, whether the wall clock jumps two days ahead or an hour back, and
// must be destroyed once both clocks agree the window has ended.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "custos/v1/kms.grpc.pb.h"
#include "tests/support/custosd_process.h"
#include "tests/support/subprocess.h"

namespace custos {
namespace {

namespace pb = ::custos::v1;
using ::custos::testing::CustosdProcess;
using ::custos::testing::ProcessResult;
using Clock = std::chrono::steady_clock;

constexpr char kFaketime[] =
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
// The window asked for, in the test's days of one second each.
constexpr int kWindowDays = 7;
constexpr auto kWindow = std::chrono::seconds(kWindowDays);

class ClockE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(std::filesystem::exists(kFaketime))
        << kFaketime << " is missing: apt-get install libfaketime "
        << "(scripts/test installs it)";
    offset_file_ = std::filesystem::temp_directory_path() /
                   ("custos-clock-" + std::to_string(getpid()));
    SetClockOffset("+0");
    CustosdProcess::Options options;
    options.env = {{"LD_PRELOAD", kFaketime},
                   {"FAKETIME_TIMESTAMP_FILE", offset_file_},
                   {"FAKETIME_NO_CACHE", "1"},
                   {"FAKETIME_DONT_FAKE_MONOTONIC", "1"}};
    options.extra_config =
        "testing:\n  deletion_day_seconds: 1\n"
        "maintenance_interval_seconds: 0.2\n";
    auto server = CustosdProcess::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
  }
  void TearDown() override {
    server_.reset();
    std::filesystem::remove(offset_file_);
  }

  // Steps custosd's wall clock: "+2d", "-1h", "+0" (libfaketime's offsets).
  void SetClockOffset(const std::string& offset) {
    const std::string tmp = offset_file_ + ".tmp";
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << offset << "\n";
    }
    std::filesystem::rename(tmp, offset_file_);
  }

  std::unique_ptr<pb::KeyManagementService::Stub> Kms(
      const std::string& who = "admin") {
    return pb::KeyManagementService::NewStub(server_->Channel(who));
  }

  // The key's state as stored, read from the database file itself (the
  // test cannot call custosd while its clock is behind the certificates'
  // notBefore).
  int StoredState(const std::string& key_id) {
    const std::string path = server_->dir() + "/data/custos.db";
    sqlite3* db = nullptr;
    EXPECT_EQ(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr),
              SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    sqlite3_stmt* stmt = nullptr;
    EXPECT_EQ(sqlite3_prepare_v2(db, "SELECT state FROM keys WHERE id = ?", -1,
                                 &stmt, nullptr),
              SQLITE_OK)
        << sqlite3_errmsg(db);
    sqlite3_bind_text(stmt, 1, key_id.c_str(), -1, SQLITE_TRANSIENT);
    int state = -1;
    if (sqlite3_step(stmt) == SQLITE_ROW) state = sqlite3_column_int(stmt, 0);
    sqlite3_finalize(stmt);
    sqlite3_close(db);
    return state;
  }

  // Schedules the key's deletion; returns when the call returned.
  Clock::time_point Schedule(const std::string& key_id) {
    pb::ScheduleKeyDeletionRequest req;
    req.set_key(key_id);
    req.set_pending_window_days(kWindowDays);
    pb::Key pending;
    grpc::ClientContext ctx;
    const Clock::time_point before = Clock::now();
    grpc::Status s = Kms()->ScheduleKeyDeletion(&ctx, req, &pending);
    EXPECT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(pending.state(), pb::PENDING_DELETION);
    return before;
  }

  // Waits (up to `limit`) until the stored state is DESTROYED; returns when
  // it was first seen so.
  Clock::time_point WaitUntilDestroyed(const std::string& key_id,
                                       std::chrono::seconds limit) {
    const Clock::time_point give_up = Clock::now() + limit;
    while (Clock::now() < give_up) {
      if (StoredState(key_id) == static_cast<int>(pb::DESTROYED)) {
        return Clock::now();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ADD_FAILURE() << "key " << key_id << " not destroyed within "
                  << limit.count() << " s";
    return Clock::now();
  }

  void ExpectAuditChainVerifies() {
    ProcessResult r = server_->VerifyAuditLog();
    EXPECT_EQ(r.code, 0) << r;
  }

  std::string offset_file_;
  std::unique_ptr<CustosdProcess> server_;
};

TEST_F(ClockE2eTest, ClockSteppedForwardDoesNotEndTheWindowEarly) {
  auto key = server_->CreateKeyFor("service-a", {pb::GENERATE_DATA_KEY});
  ASSERT_TRUE(key.ok()) << key.status();
  const Clock::time_point scheduled = Schedule(*key);
  // Two days ahead: the wall clock is far past deletion_time at once.
  SetClockOffset("+2d");
  // Several maintenance passes (every 0.2 s) run on the stepped clock.
  std::this_thread::sleep_for(std::chrono::seconds(2));
  {
    pb::GetKeyRequest get;
    get.set_key(*key);
    pb::Key state;
    grpc::ClientContext ctx;
    grpc::Status s = Kms()->GetKey(&ctx, get, &state);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(state.state(), pb::PENDING_DELETION)
        << "destroyed after the wall clock jumped, before its window";
  }
  const Clock::time_point destroyed =
      WaitUntilDestroyed(*key, std::chrono::seconds(60));
  EXPECT_GE(destroyed - scheduled, kWindow)
      << "destroyed "
      << std::chrono::duration_cast<std::chrono::milliseconds>(destroyed -
                                                               scheduled)
             .count()
      << " ms after scheduling; the window is " << kWindow.count() << " s";
  ExpectAuditChainVerifies();
}

TEST_F(ClockE2eTest, ClockSteppedBackHoldsTheWindowUntilItReturns) {
  auto key = server_->CreateKeyFor("service-a", {pb::GENERATE_DATA_KEY});
  ASSERT_TRUE(key.ok()) << key.status();
  const Clock::time_point scheduled = Schedule(*key);
  SetClockOffset("-1h");
  // Well past the window in real time, but the wall clock is an hour short.
  std::this_thread::sleep_for(kWindow + std::chrono::seconds(2));
  EXPECT_EQ(StoredState(*key), static_cast<int>(pb::PENDING_DELETION));
  SetClockOffset("+0");
  const Clock::time_point destroyed =
      WaitUntilDestroyed(*key, std::chrono::seconds(30));
  EXPECT_GE(destroyed - scheduled, kWindow);
  ExpectAuditChainVerifies();
}

}  // namespace
}  // namespace custos
