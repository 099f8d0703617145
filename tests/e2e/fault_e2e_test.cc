// HSM faults end to end: a real custosd over mutual TLS with the
// fault-injecting PKCS#11 module (tests/fault_pkcs11) between it and
// SoftHSM2. For each fault the test asserts a clear status code, no key
// material in the reply, one audit record for the failed call, and recovery
// without a restart once the fault clears.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "custos/v1/kms.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/support/audit_records.h"
#include "tests/support/custosd_process.h"
#include "tests/support/subprocess.h"

namespace custos {
namespace {

namespace pb = ::custos::v1;
using ::custos::testing::CustosdProcess;
using ::custos::testing::ProcessResult;
using ::custos::testing::ReadRecords;
using ::custos::testing::RunProcess;
using ::custos::testing::StringField;
using Json = nlohmann::json;
using Code = grpc::StatusCode;

constexpr char kSoftHsm[] = "/usr/lib/softhsm/libsofthsm2.so";

std::string CodeName(Code code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

class FaultE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    config_ = new std::string(std::filesystem::temp_directory_path() /
                              absl::StrCat("custos-faults-", getpid()));
    SetFaults("");
    CustosdProcess::Options options;
    options.hsm_module = CUSTOS_FAULT_MODULE;
    options.env = {{"CUSTOS_FAULT_CONFIG", *config_}};
    // A short deadline so that the hang test is quick.
    options.hsm_settings = {"call_timeout_ms: 800", "lease_timeout_ms: 3000"};
    auto server = CustosdProcess::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    key_ = new std::string(NewKey());
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
    std::remove(config_->c_str());
  }
  void TearDown() override { SetFaults(""); }

  // Replaces the fault rules atomically (the module re-reads the file).
  static void SetFaults(const std::string& rules) {
    const std::string tmp = *config_ + ".tmp";
    {
      std::ofstream out(tmp, std::ios::trunc);
      out << "module " << kSoftHsm << "\n" << rules << "\n";
    }
    std::filesystem::rename(tmp, *config_);
    // The module checks the file's identity on each call; give the
    // filesystem's timestamp a tick so that a same-size rewrite is seen.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }

  static std::string NewKey() {
    absl::StatusOr<std::string> key = server_->CreateKeyFor(
        "service-a", {pb::GENERATE_DATA_KEY, pb::ENCRYPT, pb::DECRYPT});
    EXPECT_TRUE(key.ok()) << key.status();
    return key.value_or("");
  }

  static std::unique_ptr<pb::KeyManagementService::Stub> Kms() {
    return pb::KeyManagementService::NewStub(server_->Channel("admin"));
  }
  static std::unique_ptr<pb::CryptoService::Stub> Crypto() {
    return pb::CryptoService::NewStub(server_->Channel("service-a"));
  }

  static grpc::Status DataKey(pb::GenerateDataKeyResponse* resp) {
    pb::GenerateDataKeyRequest req;
    req.set_key(*key_);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::seconds(20));
    return Crypto()->GenerateDataKey(&ctx, req, resp);
  }

  static grpc::Status Decrypt(const std::string& blob,
                              pb::DecryptResponse* resp) {
    pb::DecryptRequest req;
    req.set_ciphertext_blob(blob);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::seconds(20));
    return Crypto()->Decrypt(&ctx, req, resp);
  }

  static size_t RecordCount() {
    return ReadRecords(server_->audit_dir()).size();
  }

  // The newest audit record of `operation`.
  static Json LastRecord(const std::string& operation) {
    std::vector<Json> records = ReadRecords(server_->audit_dir());
    for (auto it = records.rbegin(); it != records.rend(); ++it) {
      if (it->value("operation", "") == operation) return *it;
    }
    return Json();
  }

  // The failed call left exactly one FAILED record with the reply's code.
  static void ExpectFailureRecorded(const std::string& operation,
                                    const grpc::Status& status,
                                    size_t records_before) {
    EXPECT_EQ(RecordCount(), records_before + 1);
    Json last = LastRecord(operation);
    EXPECT_EQ(last.value("outcome", ""), "FAILED") << last.dump();
    EXPECT_EQ(last.value("code", ""), CodeName(status.error_code()))
        << last.dump();
  }

  static CustosdProcess* server_;
  static std::string* config_;
  static std::string* key_;
};
CustosdProcess* FaultE2eTest::server_ = nullptr;
std::string* FaultE2eTest::config_ = nullptr;
std::string* FaultE2eTest::key_ = nullptr;

TEST_F(FaultE2eTest, DeviceErrorOnEncryptFailsDataKeysThenRecovers) {
  SetFaults("fail C_Encrypt rv=CKR_DEVICE_ERROR");
  const size_t before = RecordCount();
  pb::GenerateDataKeyResponse resp;
  grpc::Status s = DataKey(&resp);
  EXPECT_EQ(s.error_code(), Code::UNAVAILABLE) << s.error_message();
  EXPECT_TRUE(resp.plaintext().empty());
  EXPECT_TRUE(resp.ciphertext_blob().empty());
  ExpectFailureRecorded("GenerateDataKey", s, before);

  SetFaults("");
  pb::GenerateDataKeyResponse ok;
  ASSERT_TRUE(DataKey(&ok).ok()) << "recovers without a restart";
  pb::DecryptResponse opened;
  ASSERT_TRUE(Decrypt(ok.ciphertext_blob(), &opened).ok());
  EXPECT_EQ(opened.plaintext(), ok.plaintext());
}

TEST_F(FaultE2eTest, DeviceErrorOnDecryptFailsDecryptThenRecovers) {
  pb::GenerateDataKeyResponse dk;
  ASSERT_TRUE(DataKey(&dk).ok());
  SetFaults("fail C_Decrypt rv=CKR_DEVICE_ERROR");
  const size_t before = RecordCount();
  pb::DecryptResponse resp;
  grpc::Status s = Decrypt(dk.ciphertext_blob(), &resp);
  EXPECT_EQ(s.error_code(), Code::UNAVAILABLE) << s.error_message();
  EXPECT_TRUE(resp.plaintext().empty());
  ExpectFailureRecorded("Decrypt", s, before);
  // Device trouble is not reported as a bad ciphertext.
  EXPECT_THAT(s.error_message(),
              ::testing::Not(::testing::HasSubstr("invalid ciphertext")));

  SetFaults("");
  pb::DecryptResponse opened;
  ASSERT_TRUE(Decrypt(dk.ciphertext_blob(), &opened).ok());
  EXPECT_EQ(opened.plaintext(), dk.plaintext());
}

TEST_F(FaultE2eTest, DeviceErrorOnGenerateRandomFailsDataKeysAndRandom) {
  SetFaults("fail C_GenerateRandom rv=CKR_DEVICE_ERROR");
  size_t before = RecordCount();
  pb::GenerateDataKeyResponse resp;
  grpc::Status s = DataKey(&resp);
  EXPECT_EQ(s.error_code(), Code::UNAVAILABLE) << s.error_message();
  EXPECT_TRUE(resp.plaintext().empty());
  ExpectFailureRecorded("GenerateDataKey", s, before);

  before = RecordCount();
  pb::GenerateRandomRequest req;
  req.set_number_of_bytes(32);
  pb::GenerateRandomResponse random;
  grpc::ClientContext ctx;
  s = Crypto()->GenerateRandom(&ctx, req, &random);
  EXPECT_EQ(s.error_code(), Code::UNAVAILABLE) << s.error_message();
  EXPECT_TRUE(random.random().empty());
  ExpectFailureRecorded("GenerateRandom", s, before);

  SetFaults("");
  ASSERT_TRUE(DataKey(&resp).ok());
}

TEST_F(FaultE2eTest, DeviceErrorOnGenerateKeyLeavesNoKeyAndNoNewVersion) {
  pb::ListKeysRequest list;
  pb::ListKeysResponse keys_before;
  grpc::ClientContext c1;
  ASSERT_TRUE(Kms()->ListKeys(&c1, list, &keys_before).ok());

  SetFaults("fail C_GenerateKey rv=CKR_DEVICE_ERROR");
  size_t before = RecordCount();
  pb::CreateKeyRequest create;
  pb::Key key;
  grpc::ClientContext c2;
  grpc::Status s = Kms()->CreateKey(&c2, create, &key);
  EXPECT_EQ(s.error_code(), Code::UNAVAILABLE) << s.error_message();
  ExpectFailureRecorded("CreateKey", s, before);

  before = RecordCount();
  pb::RotateKeyRequest rotate;
  rotate.set_key(*key_);
  grpc::ClientContext c3;
  s = Kms()->RotateKey(&c3, rotate, &key);
  EXPECT_EQ(s.error_code(), Code::UNAVAILABLE) << s.error_message();
  ExpectFailureRecorded("RotateKey", s, before);

  SetFaults("");
  pb::ListKeysResponse keys_after;
  grpc::ClientContext c4;
  ASSERT_TRUE(Kms()->ListKeys(&c4, list, &keys_after).ok());
  EXPECT_EQ(keys_after.keys_size(), keys_before.keys_size())
      << "a key whose material could not be made does not exist";
  pb::GetKeyRequest get;
  get.set_key(*key_);
  pb::Key current;
  grpc::ClientContext c5;
  ASSERT_TRUE(Kms()->GetKey(&c5, get, &current).ok());
  EXPECT_EQ(current.primary_version(), 1u)
      << "the failed rotation left no version";
  // And both work again.
  grpc::ClientContext c6;
  ASSERT_TRUE(Kms()->RotateKey(&c6, rotate, &key).ok());
  EXPECT_EQ(key.primary_version(), 2u);
}

// Storms of errors that mean "this session is gone": every call either
// succeeds (the pool re-opens sessions and retries) or fails with
// UNAVAILABLE; every call is audited once; every blob returned during the
// storm opens afterwards; calls succeed again once it passes.
TEST_F(FaultE2eTest, SessionHandleInvalidStormIsSurvived) {
  const size_t before = RecordCount();
  SetFaults("fail C_Encrypt rv=CKR_SESSION_HANDLE_INVALID every=2");
  int ok = 0, unavailable = 0;
  std::vector<pb::GenerateDataKeyResponse> issued;
  for (int i = 0; i < 40; ++i) {
    pb::GenerateDataKeyResponse resp;
    grpc::Status s = DataKey(&resp);
    if (s.ok()) {
      ++ok;
      issued.push_back(resp);
    } else {
      EXPECT_EQ(s.error_code(), Code::UNAVAILABLE) << s.error_message();
      EXPECT_TRUE(resp.plaintext().empty());
      ++unavailable;
    }
  }
  EXPECT_GT(ok, 0) << "the pool re-opens sessions and retries";
  EXPECT_EQ(RecordCount(), before + 40) << "one record per call";
  SetFaults("");
  for (const auto& dk : issued) {
    pb::DecryptResponse opened;
    ASSERT_TRUE(Decrypt(dk.ciphertext_blob(), &opened).ok());
    EXPECT_EQ(opened.plaintext(), dk.plaintext());
  }
  for (int i = 0; i < 10; ++i) {
    pb::GenerateDataKeyResponse resp;
    EXPECT_TRUE(DataKey(&resp).ok());
  }
}

TEST_F(FaultE2eTest, TokenNotPresentStormFailsClosedThenRecovers) {
  const size_t before = RecordCount();
  SetFaults(
      "fail C_Encrypt rv=CKR_TOKEN_NOT_PRESENT\n"
      "fail C_GenerateRandom rv=CKR_TOKEN_NOT_PRESENT\n"
      "fail C_OpenSession rv=CKR_TOKEN_NOT_PRESENT");
  for (int i = 0; i < 10; ++i) {
    pb::GenerateDataKeyResponse resp;
    grpc::Status s = DataKey(&resp);
    EXPECT_EQ(s.error_code(), Code::UNAVAILABLE) << s.error_message();
    EXPECT_TRUE(resp.plaintext().empty());
  }
  EXPECT_EQ(RecordCount(), before + 10);
  Json last = LastRecord("GenerateDataKey");
  EXPECT_EQ(last.value("outcome", ""), "FAILED");
  SetFaults("");
  // Sessions come back (re-opened and logged in) without a restart; allow
  // the pool a moment to replace them.
  bool recovered = false;
  for (int attempt = 0; attempt < 50 && !recovered; ++attempt) {
    pb::GenerateDataKeyResponse resp;
    recovered = DataKey(&resp).ok();
    if (!recovered) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  EXPECT_TRUE(recovered);
}

TEST_F(FaultE2eTest, AHungEncryptHitsTheDeadlineWhileOthersAreServed) {
  pb::GenerateDataKeyResponse dk;
  ASSERT_TRUE(DataKey(&dk).ok());
  SetFaults("hang C_Encrypt ms=5000 times=1");
  const size_t before = RecordCount();
  std::atomic<bool> hung_done{false};
  grpc::Status hung_status;
  std::thread hung([&] {
    pb::GenerateDataKeyResponse resp;
    hung_status = DataKey(&resp);
    EXPECT_TRUE(resp.plaintext().empty());
    hung_done = true;
  });
  // While that call waits on its HSM session, decrypts are still served
  // by the other session.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  int served = 0;
  for (int i = 0; i < 5; ++i) {
    pb::DecryptResponse opened;
    if (Decrypt(dk.ciphertext_blob(), &opened).ok()) ++served;
  }
  hung.join();
  EXPECT_EQ(served, 5);
  EXPECT_EQ(hung_status.error_code(), Code::DEADLINE_EXCEEDED)
      << hung_status.error_message();
  EXPECT_EQ(RecordCount(), before + 1 + 5);
  Json last = LastRecord("GenerateDataKey");
  EXPECT_EQ(last.value("outcome", ""), "FAILED");
  EXPECT_EQ(last.value("code", ""), "DEADLINE_EXCEEDED");
  SetFaults("");
  pb::GenerateDataKeyResponse resp;
  EXPECT_TRUE(DataKey(&resp).ok()) << "the hung session was replaced";
}

// Checkpoint signing fails (C_Sign, the audit key in the HSM): custosd
// serves only up to the bound on records after the last checkpoint (twice
// audit_checkpoint_every: 10 here), then refuses every call with UNAVAILABLE
// and releases nothing, until a checkpoint can be signed again; the log then
// verifies offline with the bound enforced.
class AuditSigningFaultE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = std::filesystem::temp_directory_path() /
              absl::StrCat("custos-sign-faults-", getpid());
    SetFaults("");
    CustosdProcess::Options options;
    options.hsm_module = CUSTOS_FAULT_MODULE;
    options.env = {{"CUSTOS_FAULT_CONFIG", config_}};
    options.extra_config = "audit_checkpoint_every: 5\n";
    auto server = CustosdProcess::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
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

  grpc::Status Random(pb::GenerateRandomResponse* resp) {
    pb::GenerateRandomRequest req;
    req.set_number_of_bytes(16);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::seconds(20));
    return pb::CryptoService::NewStub(server_->Channel("service-a"))
        ->GenerateRandom(&ctx, req, resp);
  }

  size_t RecordCount() { return ReadRecords(server_->audit_dir()).size(); }

  // Records after the last checkpoint record.
  size_t UnsignedTail() {
    std::vector<Json> records = ReadRecords(server_->audit_dir());
    size_t tail = 0;
    for (auto it = records.rbegin();
         it != records.rend() && !it->contains("checkpoint"); ++it) {
      ++tail;
    }
    return tail;
  }

  std::string config_;
  std::unique_ptr<CustosdProcess> server_;
};

TEST_F(AuditSigningFaultE2eTest, ServesUpToTheTailBoundThenFailsClosed) {
  constexpr size_t kBound = 10;  // 2 x audit_checkpoint_every
  absl::StatusOr<std::string> key =
      server_->CreateKeyFor("service-a", {pb::GENERATE_DATA_KEY});
  ASSERT_TRUE(key.ok()) << key.status();
  SetFaults("fail C_Sign rv=CKR_DEVICE_ERROR");
  const size_t tail = UnsignedTail();
  ASSERT_LT(tail, 5u) << "a checkpoint was signed every 5 records so far";

  size_t served = 0;
  grpc::Status refused;
  pb::GenerateRandomResponse resp;
  for (int i = 0; i < 30 && refused.ok(); ++i) {
    resp.Clear();
    grpc::Status s = Random(&resp);
    if (s.ok()) {
      ++served;
    } else {
      refused = s;
    }
  }
  // Calls are served while the unsigned records stay within the bound (a
  // background record would take one of the places).
  EXPECT_GT(served, 0u);
  EXPECT_LE(served, kBound - tail);
  EXPECT_EQ(refused.error_code(), Code::UNAVAILABLE) << refused.error_message();
  // Callers get the generic reason; the server log has the details.
  EXPECT_THAT(refused.error_message(),
              ::testing::HasSubstr("the audit log cannot record it"));
  EXPECT_THAT(testing::ReadAll(server_->log_path()),
              ::testing::HasSubstr("no checkpoint could be signed"));
  EXPECT_TRUE(resp.random().empty());
  EXPECT_EQ(UnsignedTail(), kBound);

  // Every call is refused now, and leaves no record: nothing is released
  // that the log does not hold.
  const size_t records = RecordCount();
  pb::GenerateDataKeyRequest req;
  req.set_key(*key);
  pb::GenerateDataKeyResponse dk;
  grpc::ClientContext ctx;
  grpc::Status s = pb::CryptoService::NewStub(server_->Channel("service-a"))
                       ->GenerateDataKey(&ctx, req, &dk);
  EXPECT_EQ(s.error_code(), Code::UNAVAILABLE) << s.error_message();
  EXPECT_TRUE(dk.plaintext().empty());
  EXPECT_TRUE(dk.ciphertext_blob().empty());
  EXPECT_EQ(Random(&resp).error_code(), Code::UNAVAILABLE);
  EXPECT_EQ(RecordCount(), records);

  // Once the HSM signs again, so does custosd, first a checkpoint.
  SetFaults("");
  ASSERT_TRUE(Random(&resp).ok());
  std::vector<Json> all = ReadRecords(server_->audit_dir());
  ASSERT_GE(all.size(), 2u);
  EXPECT_TRUE(all[all.size() - 2].contains("checkpoint"))
      << all[all.size() - 2].dump();
  EXPECT_EQ(StringField(all.back(), "operation"), "GenerateRandom");

  ASSERT_TRUE(server_->Stop().ok());
  std::string pem;
  for (const auto& e :
       std::filesystem::directory_iterator(server_->audit_dir())) {
    if (e.path().extension() == ".pem") pem = e.path().string();
  }
  ASSERT_FALSE(pem.empty());
  ProcessResult verified = RunProcess(
      {::custos::testing::BinDir() + "/custos", "audit", "verify",
       "--public-key", pem, "--max-unsigned-tail", "10", server_->audit_dir()},
      ::custos::testing::EnvironmentWithout("CUSTOS_"), "/dev/null",
      server_->dir() + "/verify-signing");
  EXPECT_EQ(verified.code, 0) << verified;
}

}  // namespace
}  // namespace custos
