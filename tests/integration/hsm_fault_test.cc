// The hsm/ layer against SoftHSM2 behind the fault-injecting module
// (tests/fault_pkcs11): device errors, broken sessions and hanging calls.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/testing/status_matchers.h"
#include "hsm/hsm.h"
#include "hsm/module.h"
#include "tests/support/test_token.h"

namespace custos::hsm {
namespace {

using ::custos::testing::IsOk;
using ::custos::testing::StatusIs;
using ::testing::HasSubstr;

class HsmFaultTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto token = custos::testing::TestToken::Create("fault-token");
    ASSERT_TRUE(token.ok()) << token.status();
    token_ = token->release();
    config_ = token_->dir() + "/faults.conf";
    SetFaults("");
    setenv("CUSTOS_FAULT_CONFIG", config_.c_str(), 1);
    auto module = Module::Load(CUSTOS_FAULT_MODULE);
    ASSERT_TRUE(module.ok()) << module.status();
    module_ = module->release();
    Hsm::Options options;
    options.token_label = token_->label();
    options.pin_file = token_->pin_file();
    options.pool.size = 3;
    options.pool.call_timeout = absl::Milliseconds(400);
    options.pool.lease_timeout = absl::Milliseconds(400);
    options.pool.max_abandoned = 2;
    auto hsm = Hsm::Open(*module_, options);
    ASSERT_TRUE(hsm.ok()) << hsm.status();
    hsm_ = hsm->release();
    auto key = hsm_->GenerateAesKey("fault-key");
    ASSERT_TRUE(key.ok()) << key.status();
    key_id_ = new std::string(*key);
  }
  static void TearDownTestSuite() {
    SetFaults("");
    delete hsm_;
    delete module_;
    delete token_;
    delete key_id_;
  }
  void TearDown() override {
    SetFaults("");
    // Let hung calls of the test finish before the next test counts.
    for (int i = 0; i < 100 && hsm_->pool_stats().abandoned > 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

  static void SetFaults(const std::string& rules) {
    ASSERT_TRUE(
        custos::testing::WriteFileAtomically(
            config_, absl::StrCat("module ", custos::testing::kSoftHsmModule,
                                  "\n", rules))
            .ok());
  }

  static custos::testing::TestToken* token_;
  static Module* module_;
  static Hsm* hsm_;
  static std::string config_;
  static std::string* key_id_;
};
custos::testing::TestToken* HsmFaultTest::token_ = nullptr;
Module* HsmFaultTest::module_ = nullptr;
Hsm* HsmFaultTest::hsm_ = nullptr;
std::string HsmFaultTest::config_;
std::string* HsmFaultTest::key_id_ = nullptr;

TEST_F(HsmFaultTest, DeviceErrorOnEncryptIsUnavailableWithNoOutput) {
  const std::string& id = *key_id_;
  SetFaults("fail C_Encrypt rv=CKR_DEVICE_ERROR\n");
  auto before = hsm_->pool_stats();
  absl::StatusOr<GcmSealed> sealed = hsm_->EncryptAesGcm(id, "", "secret");
  EXPECT_THAT(sealed, StatusIs(absl::StatusCode::kUnavailable,
                               HasSubstr("C_Encrypt: CKR_DEVICE_ERROR")));
  EXPECT_FALSE(sealed.ok());  // no output of any kind
  auto after = hsm_->pool_stats();
  EXPECT_GE(after.evictions - before.evictions, 1u);
  // The device recovers: the next good call works without a restart.
  SetFaults("");
  auto ok = hsm_->EncryptAesGcm(id, "", "secret");
  ASSERT_THAT(ok, IsOk());
  auto opened = hsm_->DecryptAesGcm(id, ok->iv, "", ok->ciphertext);
  ASSERT_THAT(opened, IsOk());
  EXPECT_TRUE(opened->Equals("secret"));
  EXPECT_EQ(hsm_->pool_stats().workers, 3);
}

TEST_F(HsmFaultTest, DeviceErrorOnDecryptReleasesNothing) {
  const std::string& id = *key_id_;
  auto sealed = hsm_->EncryptAesGcm(id, "", "datakey");
  ASSERT_THAT(sealed, IsOk());
  SetFaults("fail C_Decrypt rv=CKR_DEVICE_ERROR\n");
  EXPECT_THAT(hsm_->DecryptAesGcm(id, sealed->iv, "", sealed->ciphertext),
              StatusIs(absl::StatusCode::kUnavailable));
  SetFaults("");
  EXPECT_THAT(hsm_->DecryptAesGcm(id, sealed->iv, "", sealed->ciphertext),
              IsOk());
}

TEST_F(HsmFaultTest, OccasionalBrokenSessionsAreRetriedTransparently) {
  SetFaults("fail C_GenerateRandom rv=CKR_SESSION_HANDLE_INVALID every=3\n");
  auto before = hsm_->pool_stats();
  for (int i = 0; i < 30; ++i) {
    EXPECT_THAT(hsm_->GenerateRandom(32), IsOk()) << "call " << i;
  }
  auto after = hsm_->pool_stats();
  EXPECT_GE(after.evictions - before.evictions, 9u);
  EXPECT_GE(after.retries - before.retries, 9u);
  EXPECT_EQ(after.workers, 3);
}

TEST_F(HsmFaultTest, TokenNotPresentStormEndsAndServiceRecovers) {
  const std::string& id = *key_id_;
  SetFaults("fail C_Encrypt rv=CKR_TOKEN_NOT_PRESENT times=40\n");
  int failed = 0;
  for (int i = 0; i < 40; ++i) {
    auto r = hsm_->EncryptAesGcm(id, "", "x");
    if (!r.ok()) {
      ++failed;
      EXPECT_THAT(r, StatusIs(absl::StatusCode::kUnavailable,
                              HasSubstr("CKR_TOKEN_NOT_PRESENT")));
    }
  }
  EXPECT_GT(failed, 0);
  // The storm is over (40 faults spent); every call works again.
  for (int i = 0; i < 10; ++i) {
    EXPECT_THAT(hsm_->EncryptAesGcm(id, "", "x"), IsOk());
  }
}

TEST_F(HsmFaultTest, HangingCallHitsTheDeadlineAndOthersAreStillServed) {
  const std::string& id = *key_id_;
  SetFaults("hang C_Encrypt ms=2000 times=1\n");
  auto start = std::chrono::steady_clock::now();
  auto hung = hsm_->EncryptAesGcm(id, "", "x");
  auto waited = std::chrono::steady_clock::now() - start;
  EXPECT_THAT(hung, StatusIs(absl::StatusCode::kDeadlineExceeded,
                             HasSubstr("did not return within")));
  // The caller was released by the deadline, not by the hang ending. (An
  // ordering check, not a performance threshold: 400 ms deadline vs 2 s.)
  EXPECT_LT(waited, std::chrono::milliseconds(1900));
  auto stats = hsm_->pool_stats();
  EXPECT_EQ(stats.abandoned, 1);
  EXPECT_EQ(stats.workers, 3);  // the hung session was replaced
  for (int i = 0; i < 10; ++i) {
    EXPECT_THAT(hsm_->EncryptAesGcm(id, "", "y"), IsOk());
  }
  // When the hung call returns, its session is retired and the pool is whole.
  for (int i = 0; i < 100 && hsm_->pool_stats().abandoned > 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(hsm_->pool_stats().abandoned, 0);
  EXPECT_EQ(hsm_->pool_stats().workers, 3);
  EXPECT_THAT(hsm_->GenerateRandom(16), IsOk());
}

TEST_F(HsmFaultTest, MoreHungCallsThanSparesGiveUnavailableNotAHang) {
  // Every C_GenerateRandom hangs. Three hang (two are replaced, then the
  // pool shrinks), and later callers get UNAVAILABLE within the lease
  // timeout instead of queueing forever.
  SetFaults("hang C_GenerateRandom ms=1500\n");
  std::vector<std::thread> callers;
  std::vector<absl::Status> results(6);
  for (int i = 0; i < 6; ++i) {
    callers.emplace_back(
        [&, i] { results[i] = hsm_->GenerateRandom(8).status(); });
  }
  for (auto& t : callers) t.join();
  int deadline = 0, unavailable = 0;
  for (const auto& s : results) {
    if (s.code() == absl::StatusCode::kDeadlineExceeded) ++deadline;
    if (s.code() == absl::StatusCode::kUnavailable) ++unavailable;
  }
  EXPECT_EQ(deadline + unavailable, 6);
  EXPECT_GE(deadline, 3);
  EXPECT_GE(unavailable, 1);
  SetFaults("");
  for (int i = 0; i < 100 && hsm_->pool_stats().abandoned > 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(hsm_->pool_stats().workers, 3);
  EXPECT_THAT(hsm_->GenerateRandom(8), IsOk());
}

TEST_F(HsmFaultTest, KeyThatCannotBeVerifiedIsDestroyedNotKept) {
  auto before = hsm_->ListKeyObjects();
  ASSERT_THAT(before, IsOk());
  // C_GenerateKey succeeds; the attribute check right after it fails, so
  // the new object must be destroyed rather than left behind.
  SetFaults("fail C_GetAttributeValue rv=CKR_FUNCTION_FAILED times=1\n");
  EXPECT_THAT(
      hsm_->GenerateAesKey("never"),
      StatusIs(absl::StatusCode::kInternal, HasSubstr("C_GetAttributeValue")));
  SetFaults("");
  auto after = hsm_->ListKeyObjects();
  ASSERT_THAT(after, IsOk());
  EXPECT_EQ(after->size(), before->size());
}

TEST_F(HsmFaultTest, ConcurrentLoadAndRecoveryLeakNoSession) {
  // The fault module counts the sessions open on the real module.
  void* fault_module = dlopen(CUSTOS_FAULT_MODULE, RTLD_NOW | RTLD_NOLOAD);
  ASSERT_NE(fault_module, nullptr);
  auto open_sessions = reinterpret_cast<long (*)()>(
      dlsym(fault_module, "custos_fault_open_sessions"));
  ASSERT_NE(open_sessions, nullptr) << dlerror();
  const std::string& id = *key_id_;
  SetFaults("fail C_Encrypt rv=CKR_SESSION_HANDLE_INVALID every=50\n");
  std::vector<std::thread> threads;
  std::atomic<int> errors{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 1000; ++i) {
        if (!hsm_->EncryptAesGcm(id, "", "x").ok()) ++errors;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_GE(hsm_->pool_stats().evictions, 100u);
  EXPECT_EQ(hsm_->pool_stats().workers, 3);
  // Evicted sessions were closed (and reopened lazily): never more than the
  // pool's three are open on the token.
  EXPECT_LE(open_sessions(), 3);
  SetFaults("");
  for (int i = 0; i < 20; ++i) EXPECT_THAT(hsm_->GenerateRandom(8), IsOk());
  EXPECT_LE(open_sessions(), 3);
  EXPECT_GE(open_sessions(), 1);
  dlclose(fault_module);
}

}  // namespace
}  // namespace custos::hsm
