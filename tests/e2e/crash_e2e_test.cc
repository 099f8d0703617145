// Crashes at each step of key creation, rotation and deletion: custosd is
// stopped inside the step (the fault module makes the next PKCS#11 call
// hang) and killed with SIGKILL, then restarted. After each restart: every
// blob issued before the kill decrypts, HSM objects whose generate-intent
// never became a version are destroyed by the reconciler (after their
// audit record), intents with no object are cleared, deletion finishes, and
// the audit chain verifies offline.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "custos/v1/kms.grpc.pb.h"
#include "tests/support/custosd_process.h"
#include "tests/support/subprocess.h"
#include "tests/support/test_token.h"

namespace custos {
namespace {

namespace pb = ::custos::v1;
using ::custos::testing::CustosdProcess;
using ::custos::testing::ProcessResult;
using Code = grpc::StatusCode;

constexpr char kSoftHsm[] = "/usr/lib/softhsm/libsofthsm2.so";

using ::custos::testing::ReadAll;

class CrashE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = std::filesystem::temp_directory_path() /
              absl::StrCat("custos-crash-faults-", getpid());
    SetFaults("");
    CustosdProcess::Options options;
    options.hsm_module = CUSTOS_FAULT_MODULE;
    options.env = {{"CUSTOS_FAULT_CONFIG", config_}};
    // Long enough that the hang, not the deadline, holds the step.
    options.hsm_settings = {"call_timeout_ms: 60000"};
    options.extra_config =
        "testing:\n  deletion_day_seconds: 0.5\n"
        "maintenance_interval_seconds: 0.2\n";
    auto server = CustosdProcess::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    WaitForReconcile(1);
  }
  void TearDown() override {
    server_.reset();
    std::remove(config_.c_str());
  }

  void SetFaults(const std::string& rules) {
    const std::string tmp = config_ + ".tmp";
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << "module " << kSoftHsm << "\n" << rules << "\n";
    }
    std::filesystem::rename(tmp, config_);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }

  // Waits until custosd has logged its n-th reconciliation summary (the
  // reconciler runs in the background after each start).
  void WaitForReconcile(int n) {
    for (int i = 0; i < 300; ++i) {
      const std::string log = ReadAll(server_->log_path());
      int seen = 0;
      for (size_t p = log.find("reconcile: "); p != std::string::npos;
           p = log.find("reconcile: ", p + 1)) {
        ++seen;
      }
      if (seen >= n) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    FAIL() << "no reconcile summary #" << n << " in the log:\n"
           << ReadAll(server_->log_path());
  }

  std::unique_ptr<pb::KeyManagementService::Stub> Kms() {
    return pb::KeyManagementService::NewStub(server_->Channel("admin"));
  }
  std::unique_ptr<pb::CryptoService::Stub> Crypto() {
    return pb::CryptoService::NewStub(server_->Channel("service-a"));
  }

  std::string NewKey() {
    absl::StatusOr<std::string> key = server_->CreateKeyFor(
        "service-a", {pb::GENERATE_DATA_KEY, pb::DECRYPT});
    EXPECT_TRUE(key.ok()) << key.status();
    return key.value_or("");
  }

  pb::GenerateDataKeyResponse DataKey(const std::string& key) {
    pb::GenerateDataKeyRequest req;
    req.set_key(key);
    pb::GenerateDataKeyResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = Crypto()->GenerateDataKey(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp;
  }

  grpc::Status Decrypt(const pb::GenerateDataKeyResponse& dk) {
    pb::DecryptRequest req;
    req.set_ciphertext_blob(dk.ciphertext_blob());
    pb::DecryptResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = Crypto()->Decrypt(&ctx, req, &resp);
    if (s.ok() && resp.plaintext() != dk.plaintext()) {
      return grpc::Status(Code::INTERNAL, "decrypted to something else");
    }
    return s;
  }

  // Key objects on the token (custos-hsmtool list), one line each.
  std::vector<std::string> HsmObjects() {
    std::vector<std::string> env = testing::EnvironmentWithout("SOFTHSM2_");
    env.push_back("SOFTHSM2_CONF=" + server_->softhsm_conf());
    ProcessResult r = testing::RunProcess(
        {testing::BinDir() + "/custos-hsmtool", "--token", "custos",
         "--pin-file", server_->pin_file(), "list"},
        env, "/dev/null", server_->dir() + "/hsmtool");
    EXPECT_EQ(r.code, 0) << r;
    std::vector<std::string> lines;
    for (absl::string_view line : absl::StrSplit(r.out, '\n')) {
      if (absl::StrContains(line, "custos:k-")) lines.emplace_back(line);
    }
    return lines;
  }

  // Starts `call` on a thread, lets it reach the hang, kills custosd with
  // SIGKILL, and restarts it without faults.
  template <typename Call>
  void CrashInside(const std::string& hang_rule, Call call) {
    SetFaults(hang_rule);
    std::thread caller(call);
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    server_->Kill(SIGKILL);
    caller.join();
    SetFaults("");
    ASSERT_TRUE(server_->Restart().ok());
  }

  // Every audit record written so far, as text.
  std::string AuditText() {
    std::string all;
    for (const auto& entry :
         std::filesystem::directory_iterator(server_->audit_dir())) {
      if (entry.path().extension() == ".jsonl") {
        all += ReadAll(entry.path().string());
      }
    }
    return all;
  }

  // Generate-intents left in the database, unsettled (not claimed).
  int Intents() {
    testing::CommandResult r = testing::RunCommand(
        "sqlite3 " + server_->database_path() +
        " 'SELECT COUNT(*) FROM material_intents WHERE claimed = 0'");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return std::atoi(r.output.c_str());
  }

  void ExpectAuditChainVerifies() {
    ProcessResult r = server_->VerifyAuditLog();
    EXPECT_EQ(r.code, 0) << r;
  }

  std::string config_;
  std::unique_ptr<CustosdProcess> server_;
};

TEST_F(CrashE2eTest, KilledBetweenGeneratingAndCommittingAKey) {
  const std::string key = NewKey();
  pb::GenerateDataKeyResponse before = DataKey(key);
  const size_t objects = HsmObjects().size();
  pb::ListKeysResponse listed;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(Kms()->ListKeys(&ctx, pb::ListKeysRequest(), &listed).ok());
  }
  // After C_GenerateKey, the new object's attributes are verified before
  // its row is written: stop there.
  CrashInside("hang C_GetAttributeValue ms=60000 times=1", [&] {
    pb::CreateKeyRequest req;
    pb::Key made;
    grpc::ClientContext ctx;
    EXPECT_FALSE(Kms()->CreateKey(&ctx, req, &made).ok());
  });
  WaitForReconcile(1);
  EXPECT_EQ(HsmObjects().size(), objects)
      << "the orphan object was destroyed by the reconciler";
  EXPECT_THAT(ReadAll(server_->log_path()),
              ::testing::HasSubstr("(1 from interrupted creates)"));
  EXPECT_THAT(AuditText(),
              ::testing::HasSubstr("its generate-intent was never committed"));
  EXPECT_EQ(Intents(), 0);
  pb::ListKeysResponse after;
  grpc::ClientContext ctx;
  ASSERT_TRUE(Kms()->ListKeys(&ctx, pb::ListKeysRequest(), &after).ok());
  EXPECT_EQ(after.keys_size(), listed.keys_size());
  EXPECT_TRUE(Decrypt(before).ok());
  ExpectAuditChainVerifies();
}

TEST_F(CrashE2eTest, KilledBetweenTheIntentAndTheGenerate) {
  const std::string key = NewKey();
  pb::GenerateDataKeyResponse before = DataKey(key);
  const size_t objects = HsmObjects().size();
  // The intent is committed; C_GenerateKey never returns.
  CrashInside("hang C_GenerateKey ms=60000 times=1", [&] {
    pb::CreateKeyRequest req;
    pb::Key made;
    grpc::ClientContext ctx;
    EXPECT_FALSE(Kms()->CreateKey(&ctx, req, &made).ok());
  });
  WaitForReconcile(1);
  EXPECT_EQ(HsmObjects().size(), objects);
  EXPECT_EQ(Intents(), 0) << "the intent with no object was not cleared";
  EXPECT_THAT(AuditText(),
              ::testing::Not(::testing::HasSubstr("\"DestroyHsmObject\"")));
  EXPECT_TRUE(Decrypt(before).ok());
  ExpectAuditChainVerifies();
}

TEST_F(CrashE2eTest, KilledInTheMiddleOfARotation) {
  const std::string key = NewKey();
  pb::GenerateDataKeyResponse before = DataKey(key);
  const size_t objects = HsmObjects().size();
  CrashInside("hang C_GetAttributeValue ms=60000 times=1", [&] {
    pb::RotateKeyRequest req;
    req.set_key(key);
    pb::Key rotated;
    grpc::ClientContext ctx;
    EXPECT_FALSE(Kms()->RotateKey(&ctx, req, &rotated).ok());
  });
  WaitForReconcile(1);
  EXPECT_EQ(HsmObjects().size(), objects);
  pb::GetKeyRequest get;
  get.set_key(key);
  pb::Key current;
  grpc::ClientContext ctx;
  ASSERT_TRUE(Kms()->GetKey(&ctx, get, &current).ok());
  EXPECT_EQ(current.primary_version(), 1u);
  EXPECT_TRUE(Decrypt(before).ok());
  // The key still rotates and serves.
  grpc::ClientContext ctx2;
  pb::RotateKeyRequest rotate;
  rotate.set_key(key);
  ASSERT_TRUE(Kms()->RotateKey(&ctx2, rotate, &current).ok());
  EXPECT_EQ(current.primary_version(), 2u);
  EXPECT_TRUE(Decrypt(DataKey(key)).ok());
  ExpectAuditChainVerifies();
}

TEST_F(CrashE2eTest, KilledWhileTheDeletionExecutorDestroysAKey) {
  const std::string doomed = NewKey();
  const std::string kept = NewKey();
  pb::GenerateDataKeyResponse doomed_blob = DataKey(doomed);
  pb::GenerateDataKeyResponse kept_blob = DataKey(kept);
  // Stop inside the executor's C_DestroyObject, after the window ended.
  SetFaults("hang C_DestroyObject ms=60000 times=1");
  pb::ScheduleKeyDeletionRequest schedule;
  schedule.set_key(doomed);
  schedule.set_pending_window_days(7);  // 3.5 s with the test's short day
  pb::Key pending;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(Kms()->ScheduleKeyDeletion(&ctx, schedule, &pending).ok());
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(5000));
  server_->Kill(SIGKILL);
  SetFaults("");
  ASSERT_TRUE(server_->Restart().ok());
  // The executor finishes the job after the restart.
  pb::Key state;
  for (int i = 0; i < 100; ++i) {
    pb::GetKeyRequest get;
    get.set_key(doomed);
    grpc::ClientContext ctx;
    ASSERT_TRUE(Kms()->GetKey(&ctx, get, &state).ok());
    if (state.state() == pb::DESTROYED) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(state.state(), pb::DESTROYED);
  for (const std::string& line : HsmObjects()) {
    EXPECT_FALSE(absl::StrContains(line, doomed)) << line;
  }
  EXPECT_EQ(Decrypt(doomed_blob).error_code(), Code::INVALID_ARGUMENT);
  EXPECT_TRUE(Decrypt(kept_blob).ok());
  ExpectAuditChainVerifies();
}

}  // namespace
}  // namespace custos
