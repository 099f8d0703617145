// KeyService against a real SoftHSM2 token, a real SQLite file and a real
// FileAuditLog, all in temporary directories. The clock is fake (a
// test-controlled absl::Time), so deletion windows and rotation periods pass
// instantly.
//
// One hsm::Module per process at a time: each test suite creates its own
// token and Hsm in SetUpTestSuite and removes them in TearDownTestSuite.
// Every test gets its own database and audit directory.
#include "kms/key_service.h"

#include <fcntl.h>
#include <sys/mount.h>
#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/status_macros.h"
#include "common/testing/status_matchers.h"
#include "hsm/hsm.h"
#include "hsm/key_templates.h"
#include "hsm/module.h"
#include "kms/audit/audit_log.h"
#include "kms/authorizer.h"
#include "kms/ciphertext_blob.h"
#include "kms/key_registry.h"
#include "kms/policy.h"
#include "kms/store/store.h"
#include "nlohmann/json.hpp"
#include "tests/support/test_token.h"

namespace custos::kms {
namespace {

using ::custos::testing::StatusIs;
using ::testing::Eq;
using ::testing::HasSubstr;

constexpr char kAdmin[] = "spiffe://t/admin";
constexpr char kAuditor[] = "spiffe://t/auditor";
constexpr char kSvcA[] = "spiffe://t/svc-a";  // named in key policies
constexpr char kSvcB[] = "spiffe://t/svc-b";  // never named
// A well-formed key id that no test ever creates.
constexpr char kUnknownKeyId[] = "k-aaaaaaaaaaaaaaaaaaaaaaaaaa";
constexpr char kInvalidCiphertext[] = "invalid ciphertext";

constexpr size_t kKeyIdOffset = 2;

Caller As(const std::string& principal) {
  return Caller{principal, "10.0.0.1:4000", "req-test"};
}

constexpr KeyOperation kAllOperations[] = {
    KeyOperation::kGenerateDataKey,
    KeyOperation::kGenerateDataKeyWithoutPlaintext,
    KeyOperation::kEncrypt,
    KeyOperation::kDecrypt,
    KeyOperation::kReEncryptFrom,
    KeyOperation::kReEncryptTo,
};

// svc-a may do everything with the key; nobody else may do anything.
KeyPolicy SvcAPolicy() {
  PolicyBinding binding;
  binding.principals = {kSvcA};
  binding.operations.assign(std::begin(kAllOperations),
                            std::end(kAllOperations));
  KeyPolicy policy;
  policy.bindings.push_back(std::move(binding));
  return policy;
}

CreateKeyParams KeyParams(KeyPolicy policy = SvcAPolicy()) {
  CreateKeyParams params;
  params.description = "test key";
  params.policy = std::move(policy);
  return params;
}

const EncryptionContext kContext = {{"tenant", "acme"}, {"purpose", "backup"}};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> ReadLines(const std::string& path) {
  std::vector<std::string> lines;
  std::ifstream in(path, std::ios::binary);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// Every audit line's seq follows the one before without a gap, and its
// "prev" is the hash of the line before (genesis for the first).
void ExpectChainIsWhole(const std::vector<std::string>& lines) {
  std::string prev = kAuditGenesisHash;
  for (size_t i = 0; i < lines.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("audit line ", i + 1, ": ", lines[i]));
    nlohmann::json j = nlohmann::json::parse(lines[i], nullptr, false);
    ASSERT_FALSE(j.is_discarded());
    EXPECT_EQ(j.value("seq", uint64_t{0}), i + 1);
    EXPECT_EQ(j.value("prev", std::string()), prev);
    prev = AuditLineHash(lines[i]);
  }
}

// The blob with its key id bytes replaced by `key_id`.
std::string WithKeyId(std::string blob, const std::string& key_id) {
  blob.replace(kKeyIdOffset, kKeyIdSize, key_id);
  return blob;
}

std::vector<std::string> HsmIds(const std::vector<hsm::HsmObject>& objects) {
  std::vector<std::string> ids;
  for (const hsm::HsmObject& o : objects) ids.push_back(o.id);
  return ids;
}

// A clock the test moves by hand. A hook can run inside the n-th call to
// Now(), to make something happen at an exact point of a service call.
class FakeClock {
 public:
  absl::Time Now() {
    std::function<void()> hook;
    {
      absl::MutexLock lock(&mu_);
      if (hook_ && --hook_countdown_ == 0) hook = std::exchange(hook_, {});
    }
    if (hook) hook();
    absl::MutexLock lock(&mu_);
    return now_;
  }
  // The monotonic clock: moved only by Advance.
  absl::Duration Monotonic() {
    absl::MutexLock lock(&mu_);
    return monotonic_;
  }
  // Moves both clocks, as time passing does.
  void Advance(absl::Duration d) {
    absl::MutexLock lock(&mu_);
    now_ += d;
    monotonic_ += d;
  }
  // Steps the wall clock only, as an operator or NTP does.
  void Set(absl::Time t) {
    absl::MutexLock lock(&mu_);
    now_ = t;
  }
  void RunInsideCall(int n, std::function<void()> hook) {
    absl::MutexLock lock(&mu_);
    hook_countdown_ = n;
    hook_ = std::move(hook);
  }

 private:
  absl::Mutex mu_;
  absl::Time now_ = absl::FromUnixSeconds(1700000000);
  absl::Duration monotonic_ = absl::Hours(1);
  int hook_countdown_ = 0;
  std::function<void()> hook_;
};

// One service with its own database and audit log.
struct Stack {
  std::string dir;
  std::string db_path;
  std::unique_ptr<Store> store;
  std::unique_ptr<KeyRegistry> registry;
  std::unique_ptr<FileAuditLog> audit;
  std::unique_ptr<KeyService> service;
};

class KeyServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto token = custos::testing::TestToken::Create();
    ASSERT_TRUE(token.ok()) << token.status();
    token_ = token->release();
    auto module = hsm::Module::Load(custos::testing::kSoftHsmModule);
    ASSERT_TRUE(module.ok()) << module.status();
    module_ = module->release();
    hsm::Hsm::Options options;
    options.token_label = token_->label();
    options.pin_file = token_->pin_file();
    options.pool.size = 4;
    auto opened = hsm::Hsm::Open(*module_, options);
    ASSERT_TRUE(opened.ok()) << opened.status();
    hsm_ = opened->release();
  }
  static void TearDownTestSuite() {
    delete hsm_;
    hsm_ = nullptr;
    delete module_;
    module_ = nullptr;
    delete token_;
    token_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(hsm_, nullptr) << "the suite's HSM did not open";
    auto dir = custos::testing::MakeTempDir("custos-ks");
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_ = *dir;
    auto stack = OpenStack(dir_ + "/main", Options());
    ASSERT_TRUE(stack.ok()) << stack.status();
    stack_ = *std::move(stack);
  }
  void TearDown() override {
    stack_.reset();
    std::error_code ec;
    if (!dir_.empty()) std::filesystem::remove_all(dir_, ec);
  }

  KeyService::Options Options() {
    KeyService::Options options;
    options.min_rotation_period = absl::Hours(1);
    options.now = [this] { return clock_.Now(); };
    options.monotonic_now = [this] { return clock_.Monotonic(); };
    return options;
  }

  // A service over the database and audit directory in `dir` (created if
  // needed); `audit_dir` overrides where the audit segments go.
  absl::StatusOr<std::unique_ptr<Stack>> OpenStack(
      const std::string& dir, KeyService::Options options,
      const std::string& audit_dir = "") {
    std::filesystem::create_directories(dir);
    auto stack = std::make_unique<Stack>();
    stack->dir = dir;
    stack->db_path = dir + "/custos.db";
    CUSTOS_ASSIGN_OR_RETURN(
        stack->store,
        OpenStore("sqlite://" + stack->db_path, OpenMode::kCreate));
    CUSTOS_ASSIGN_OR_RETURN(stack->registry,
                            KeyRegistry::Load(stack->store.get()));
    FileAuditLog::Options audit_options;
    audit_options.dir = audit_dir.empty() ? dir + "/audit" : audit_dir;
    audit_options.node_id = "custos-test";
    CUSTOS_ASSIGN_OR_RETURN(stack->audit, FileAuditLog::Open(audit_options));
    stack->service = std::make_unique<KeyService>(
        std::move(options), hsm_, stack->registry.get(), stack->audit.get(),
        &authorizer_);
    return stack;
  }

  KeyService& service() { return *stack_->service; }
  uint64_t AuditRecords() { return stack_->audit->stats().records; }
  std::vector<std::string> AuditLines() {
    return ReadLines(stack_->audit->segment_path());
  }

  absl::StatusOr<std::shared_ptr<const Key>> NewKey(
      KeyPolicy policy = SvcAPolicy()) {
    return service().CreateKey(As(kAdmin), KeyParams(std::move(policy)));
  }
  absl::StatusOr<DataKeyResult> DataKey(const std::string& key,
                                        const EncryptionContext& context,
                                        size_t bytes = 32,
                                        const std::string& who = kSvcA) {
    DataKeyParams params;
    params.key = key;
    params.bytes = bytes;
    params.context = context;
    return service().GenerateDataKey(As(who), params);
  }
  absl::StatusOr<DecryptResult> Open(const std::string& blob,
                                     const EncryptionContext& context,
                                     const std::string& who = kSvcA,
                                     const std::string& expected_key = "") {
    DecryptParams params;
    params.blob = blob;
    params.context = context;
    params.expected_key = expected_key;
    return service().Decrypt(As(who), params);
  }
  absl::StatusOr<EncryptResult> Seal(const std::string& key,
                                     absl::string_view plaintext,
                                     const EncryptionContext& context = {},
                                     const std::string& who = kSvcA) {
    EncryptParams params;
    params.key = key;
    params.plaintext = SecretBytes::CopyOf(plaintext);
    params.context = context;
    return service().Encrypt(As(who), params);
  }

  static custos::testing::TestToken* token_;
  static hsm::Module* module_;
  static hsm::Hsm* hsm_;

  const Authorizer authorizer_{Roles{{kAdmin}, {kAuditor}}};
  FakeClock clock_;
  std::string dir_;
  std::unique_ptr<Stack> stack_;
};
custos::testing::TestToken* KeyServiceTest::token_ = nullptr;
hsm::Module* KeyServiceTest::module_ = nullptr;
hsm::Hsm* KeyServiceTest::hsm_ = nullptr;

// ---------------------------------------------------------------------------
// 1. Authorization: every RPC x every role x every key state.

using Code = absl::StatusCode;
constexpr Code kOk = Code::kOk;
constexpr Code kDenied = Code::kPermissionDenied;
constexpr Code kPrecondition = Code::kFailedPrecondition;

enum StateIndex { kEnabledKey, kDisabledKey, kPendingKey, kNumStates };
constexpr const char* kStateNames[] = {"ENABLED", "DISABLED",
                                       "PENDING_DELETION"};

// What an admin gets from each management RPC on a key in each state.
const std::map<Rpc, std::array<Code, kNumStates>>& AdminManagementCodes() {
  static const auto* codes = new std::map<Rpc, std::array<Code, kNumStates>>{
      {Rpc::kCreateKey, {kOk, kOk, kOk}},
      {Rpc::kGetKey, {kOk, kOk, kOk}},
      {Rpc::kListKeys, {kOk, kOk, kOk}},
      {Rpc::kUpdateKey, {kOk, kOk, kOk}},
      {Rpc::kRotateKey, {kOk, kPrecondition, kPrecondition}},
      {Rpc::kEnableKey, {kOk, kOk, kPrecondition}},
      {Rpc::kDisableKey, {kOk, kOk, kPrecondition}},
      {Rpc::kScheduleKeyDeletion, {kOk, kOk, kPrecondition}},
      {Rpc::kCancelKeyDeletion, {kPrecondition, kPrecondition, kOk}},
      {Rpc::kCreateAlias, {kOk, kOk, kOk}},
      {Rpc::kDeleteAlias, {kOk, kOk, kOk}},
      {Rpc::kListAliases, {kOk, kOk, kOk}},
      {Rpc::kGetKeyPolicy, {kOk, kOk, kOk}},
      {Rpc::kSetKeyPolicy, {kOk, kOk, kOk}},
  };
  return *codes;
}

Code ExpectedCode(Rpc rpc, const std::string& caller, StateIndex state) {
  switch (KindOf(rpc)) {
    case RpcKind::kManagement:
      return caller == kAdmin ? AdminManagementCodes().at(rpc)[state] : kDenied;
    case RpcKind::kCrypto:
      if (caller != kSvcA) return kDenied;
      return state == kEnabledKey ? kOk : kPrecondition;
    case RpcKind::kRandom:
      return kOk;
    case RpcKind::kAudit:
      break;
  }
  ADD_FAILURE() << "no expectation for " << RpcName(rpc);
  return Code::kUnknown;
}

// What an RPC is aimed at.
struct Target {
  std::string key;    // id
  std::string blob;   // a blob under the key, made while it was ENABLED
  std::string alias;  // an alias of the key
};

class KeyServiceAuthorizationTest : public KeyServiceTest {
 protected:
  absl::Status Invoke(Rpc rpc, const std::string& who, const Target& t) {
    KeyService& s = service();
    const Caller caller = As(who);
    switch (rpc) {
      case Rpc::kCreateKey:
        return s.CreateKey(caller, KeyParams()).status();
      case Rpc::kGetKey:
        return s.GetKey(caller, t.key).status();
      case Rpc::kListKeys:
        return s.ListKeys(caller, ListKeysParams()).status();
      case Rpc::kUpdateKey: {
        UpdateKeyParams params;
        params.key = t.key;
        params.set_description = true;
        params.description = "updated";
        return s.UpdateKey(caller, params).status();
      }
      case Rpc::kRotateKey:
        return s.RotateKey(caller, t.key).status();
      case Rpc::kEnableKey:
        return s.EnableKey(caller, t.key).status();
      case Rpc::kDisableKey:
        return s.DisableKey(caller, t.key).status();
      case Rpc::kScheduleKeyDeletion:
        return s.ScheduleKeyDeletion(caller, t.key, 7).status();
      case Rpc::kCancelKeyDeletion:
        return s.CancelKeyDeletion(caller, t.key).status();
      case Rpc::kCreateAlias:
        return s
            .CreateAlias(caller, absl::StrCat("alias/new-", ++aliases_), t.key)
            .status();
      case Rpc::kDeleteAlias:
        return s.DeleteAlias(caller, t.alias);
      case Rpc::kListAliases:
        return s.ListAliases(caller, t.key).status();
      case Rpc::kGetKeyPolicy:
        return s.GetKeyPolicy(caller, t.key).status();
      case Rpc::kSetKeyPolicy:
        return s.SetKeyPolicy(caller, t.key, SvcAPolicy(), 0).status();
      case Rpc::kGenerateDataKey:
      case Rpc::kGenerateDataKeyWithoutPlaintext: {
        DataKeyParams params;
        params.key = t.key;
        params.context = kContext;
        params.include_plaintext = rpc == Rpc::kGenerateDataKey;
        return s.GenerateDataKey(caller, params).status();
      }
      case Rpc::kGenerateDataKeys: {
        DataKeysParams params;
        params.data_key.key = t.key;
        params.data_key.context = kContext;
        params.count = 3;
        return s.GenerateDataKeys(caller, params).status();
      }
      case Rpc::kEncrypt: {
        EncryptParams params;
        params.key = t.key;
        params.plaintext = SecretBytes::CopyOf("hello");
        return s.Encrypt(caller, params).status();
      }
      case Rpc::kDecrypt: {
        DecryptParams params;
        params.blob = t.blob;
        params.context = kContext;
        return s.Decrypt(caller, params).status();
      }
      case Rpc::kReEncrypt: {
        ReEncryptParams params;
        params.blob = t.blob;
        params.source_context = kContext;
        params.destination_context = kContext;
        return s.ReEncrypt(caller, params).status();
      }
      case Rpc::kGenerateRandom:
        return s.GenerateRandom(caller, 16).status();
      case Rpc::kListAuditEvents:
      case Rpc::kStreamAuditEvents:
      case Rpc::kGetAuditPublicKey:
      case Rpc::kVerifyAuditLog:
        break;
    }
    return absl::UnimplementedError(RpcName(rpc));
  }

  // A key in `state` with a blob made while it was enabled and an alias.
  absl::StatusOr<Target> MakeTarget(StateIndex state) {
    CUSTOS_ASSIGN_OR_RETURN(std::shared_ptr<const Key> key, NewKey());
    Target t;
    t.key = key->id;
    CUSTOS_ASSIGN_OR_RETURN(DataKeyResult dk, DataKey(key->id, kContext));
    t.blob = dk.blob;
    t.alias = absl::StrCat("alias/target-", ++aliases_);
    CUSTOS_RETURN_IF_ERROR(
        service().CreateAlias(As(kAdmin), t.alias, key->id).status());
    if (state == kDisabledKey) {
      CUSTOS_RETURN_IF_ERROR(service().DisableKey(As(kAdmin), t.key).status());
    } else if (state == kPendingKey) {
      CUSTOS_RETURN_IF_ERROR(
          service().ScheduleKeyDeletion(As(kAdmin), t.key, 7).status());
    }
    return t;
  }

  int aliases_ = 0;
};

TEST_F(KeyServiceAuthorizationTest,
       EveryRpcAnswersEveryCallerInEveryKeyStateAsTheTableSays) {
  const std::string callers[] = {kAdmin, kAuditor, kSvcA, kSvcB};
  // Keys the refused callers aim at; admins get a fresh key per call since
  // their calls change it.
  std::vector<Target> shared;
  for (int state = 0; state < kNumStates; ++state) {
    CUSTOS_ASSERT_OK_AND_ASSIGN(Target t,
                                MakeTarget(static_cast<StateIndex>(state)));
    shared.push_back(std::move(t));
  }
  const Target unknown{kUnknownKeyId, WithKeyId(shared[0].blob, kUnknownKeyId),
                       "alias/never-made"};

  size_t cells = 0;
  for (Rpc rpc : kAllRpcs) {
    if (KindOf(rpc) == RpcKind::kAudit) continue;  // not KeyService's
    if (KindOf(rpc) == RpcKind::kManagement) {
      ASSERT_EQ(AdminManagementCodes().count(rpc), 1u)
          << "add " << RpcName(rpc) << " to the table";
    }
    for (const std::string& who : callers) {
      for (int s = 0; s < kNumStates; ++s) {
        const StateIndex state = static_cast<StateIndex>(s);
        SCOPED_TRACE(absl::StrCat(RpcName(rpc), " by ", who, " on a ",
                                  kStateNames[state], " key"));
        Target target = shared[state];
        if (who == kAdmin && KindOf(rpc) == RpcKind::kManagement) {
          CUSTOS_ASSERT_OK_AND_ASSIGN(target, MakeTarget(state));
        }
        const Code expected = ExpectedCode(rpc, who, state);
        const uint64_t before = AuditRecords();
        absl::Status status = Invoke(rpc, who, target);
        ++cells;
        EXPECT_THAT(status, StatusIs(expected));
        // Exactly one audit record, with the matching outcome.
        EXPECT_EQ(AuditRecords(), before + 1);
        std::vector<std::string> lines = AuditLines();
        ASSERT_FALSE(lines.empty());
        nlohmann::json last = nlohmann::json::parse(lines.back());
        EXPECT_EQ(last["operation"], RpcName(rpc));
        EXPECT_EQ(last["principal"], who);
        EXPECT_EQ(last["outcome"], status.ok() ? "ALLOWED"
                                   : absl::IsPermissionDenied(status)
                                       ? "DENIED"
                                       : "FAILED");
        // No existence oracle: a refusal reads the same for a key that does
        // not exist.
        if (expected == kDenied) {
          absl::Status for_unknown = Invoke(rpc, who, unknown);
          EXPECT_EQ(for_unknown, status)
              << "refusal differs for an unknown key";
        }
      }
    }
  }
  EXPECT_EQ(cells, (std::size(kAllRpcs) - 4) * 4 * kNumStates);
}

TEST_F(KeyServiceAuthorizationTest, UnauthenticatedCallerIsRefusedEverywhere) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(Target t, MakeTarget(kEnabledKey));
  for (Rpc rpc : kAllRpcs) {
    if (KindOf(rpc) == RpcKind::kAudit) continue;
    SCOPED_TRACE(RpcName(rpc));
    EXPECT_THAT(Invoke(rpc, "", t), StatusIs(Code::kUnauthenticated));
  }
}

// BUG (kms/key_service.cc, KeyService::Open): expected_key is resolved and
// compared before the caller is authorized, so a caller with no rights at
// all learns whether a key id exists: a blob naming an existing key gets
// PERMISSION_DENIED, one naming an unknown key "invalid ciphertext".
TEST_F(KeyServiceAuthorizationTest,
       DecryptWithExpectedKeyRefusesUnknownAndExistingKeysAlike) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(Target t, MakeTarget(kEnabledKey));
  const std::string forged = WithKeyId(t.blob, kUnknownKeyId);
  for (const std::string who : {kSvcB, kAuditor, kAdmin}) {
    SCOPED_TRACE(who);
    absl::Status existing = Open(t.blob, kContext, who, t.key).status();
    absl::Status unknown = Open(forged, kContext, who, kUnknownKeyId).status();
    EXPECT_THAT(existing, StatusIs(kDenied));
    EXPECT_EQ(unknown, existing) << "existence oracle through expected_key";
  }
}

// ---------------------------------------------------------------------------
// 2 and 3. The audit log: one record per call, a whole hash chain, and no
// secret anywhere on disk.

class KeyServiceAuditTest : public KeyServiceTest {};

TEST_F(KeyServiceAuditTest, EveryCallAppendsOneChainedRecord) {
  struct Expected {
    std::string principal, operation, outcome;
    std::optional<std::string> key_id;  // nullopt: must be absent
  };
  std::vector<Expected> expected;

  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  expected.push_back({kAdmin, "CreateKey", "ALLOWED", key->id});
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(key->id, kContext));
  expected.push_back({kSvcA, "GenerateDataKey", "ALLOWED", key->id});
  EXPECT_THAT(DataKey(key->id, kContext, 32, kSvcB), StatusIs(kDenied));
  expected.push_back({kSvcB, "GenerateDataKey", "DENIED", key->id});
  EXPECT_THAT(DataKey(kUnknownKeyId, kContext, 32, kSvcB), StatusIs(kDenied));
  expected.push_back({kSvcB, "GenerateDataKey", "DENIED", std::nullopt});
  CUSTOS_EXPECT_OK(Open(dk.blob, kContext));
  expected.push_back({kSvcA, "Decrypt", "ALLOWED", key->id});
  EXPECT_THAT(Open(dk.blob, {}), StatusIs(Code::kInvalidArgument));
  expected.push_back({kSvcA, "Decrypt", "FAILED", key->id});
  EXPECT_THAT(Open(dk.blob, kContext, kAdmin), StatusIs(kDenied));
  expected.push_back({kAdmin, "Decrypt", "DENIED", key->id});
  CUSTOS_EXPECT_OK(service().GenerateRandom(As(kAuditor), 8));
  expected.push_back({kAuditor, "GenerateRandom", "ALLOWED", std::nullopt});
  CUSTOS_EXPECT_OK(service().DisableKey(As(kAdmin), key->id));
  expected.push_back({kAdmin, "DisableKey", "ALLOWED", key->id});
  EXPECT_THAT(Seal(key->id, "x"), StatusIs(kPrecondition));
  expected.push_back({kSvcA, "Encrypt", "FAILED", key->id});
  EXPECT_THAT(service().EnableKey(As(kSvcB), key->id), StatusIs(kDenied));
  expected.push_back({kSvcB, "EnableKey", "DENIED", std::nullopt});
  CUSTOS_EXPECT_OK(service().ScheduleKeyDeletion(As(kAdmin), key->id, 7));
  expected.push_back({kAdmin, "ScheduleKeyDeletion", "ALLOWED", key->id});
  clock_.Advance(absl::Hours(24 * 7 + 1));
  EXPECT_EQ(service().RunScheduledWork().destroyed_keys, 1);
  // The executor records each version's destruction before destroying it,
  // then the key's.
  expected.push_back(
      {kSystemPrincipal, "DestroyHsmObject", "ALLOWED", key->id});
  expected.push_back(
      {kSystemPrincipal, "ScheduleKeyDeletion", "ALLOWED", key->id});

  std::vector<std::string> lines = AuditLines();
  ASSERT_EQ(lines.size(), expected.size());
  ExpectChainIsWhole(lines);
  for (size_t i = 0; i < lines.size(); ++i) {
    SCOPED_TRACE(lines[i]);
    nlohmann::json j = nlohmann::json::parse(lines[i]);
    EXPECT_EQ(j["principal"], expected[i].principal);
    EXPECT_EQ(j["operation"], expected[i].operation);
    EXPECT_EQ(j["outcome"], expected[i].outcome);
    if (expected[i].key_id.has_value()) {
      EXPECT_EQ(j.value("key_id", std::string()), *expected[i].key_id);
    } else {
      EXPECT_FALSE(j.contains("key_id"));
    }
  }
}

// Who may use a key is decided by its policy, so the log keeps each policy
// a call set (canonical JSON), not only its version: an auditor can see
// what access was granted, and when.
TEST_F(KeyServiceAuditTest, PolicyChangesRecordTheNewPolicyItself) {
  KeyPolicy first = SvcAPolicy();
  first.bindings[0].required_context = {{"tenant", "*"}};
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey(first));
  KeyPolicy next = SvcAPolicy();
  next.bindings[0].principals.push_back(kSvcB);
  CUSTOS_ASSERT_OK(service().SetKeyPolicy(As(kAdmin), key->id, next, 1));
  EXPECT_THAT(service().SetKeyPolicy(As(kAdmin), key->id, SvcAPolicy(), 1),
              StatusIs(Code::kAborted));

  std::vector<nlohmann::json> records;
  for (const std::string& line : AuditLines()) {
    records.push_back(nlohmann::json::parse(line));
  }
  ASSERT_EQ(records.size(), 3u);
  first.version = 1;
  next.version = 2;
  const struct {
    const char* operation;
    const KeyPolicy* policy;
  } expected[] = {{"CreateKey", &first}, {"SetKeyPolicy", &next}};
  for (size_t i = 0; i < 2; ++i) {
    SCOPED_TRACE(records[i].dump());
    EXPECT_EQ(records[i]["operation"], expected[i].operation);
    const std::string canonical = PolicyToCanonicalJson(*expected[i].policy);
    ASSERT_TRUE(records[i].contains("policy"));
    EXPECT_EQ(records[i]["policy"].dump(), canonical);
    EXPECT_EQ(records[i]["policy_sha256"], AuditLineHash(canonical));
  }
  EXPECT_EQ(records[0]["policy"]["bindings"][0]["required_context"]["tenant"],
            "*");
  EXPECT_EQ(records[1]["policy"]["bindings"][0]["principals"].size(), 2u);
  // The refused change set nothing, and records no policy.
  EXPECT_EQ(records[2]["code"], "ABORTED");
  EXPECT_FALSE(records[2].contains("policy"));
}

TEST_F(KeyServiceAuditTest, NoDataKeyOrPlaintextReachesAnyFile) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> a, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> b, NewKey());
  std::vector<std::string> secrets;
  for (size_t bytes : {16, 32, 64, 1024}) {
    CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk,
                                DataKey(a->id, kContext, bytes));
    secrets.emplace_back(dk.plaintext.view());
    CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult opened, Open(dk.blob, kContext));
    EXPECT_TRUE(opened.plaintext.Equals(dk.plaintext.view()));
    ReEncryptParams re;
    re.blob = dk.blob;
    re.source_context = kContext;
    re.destination_key = b->id;
    CUSTOS_ASSERT_OK_AND_ASSIGN(ReEncryptResult moved,
                                service().ReEncrypt(As(kSvcA), re));
    // Failed and refused calls write records too; none may carry secrets.
    EXPECT_THAT(Open(moved.blob, kContext), StatusIs(Code::kInvalidArgument));
    EXPECT_THAT(Open(moved.blob, {}, kSvcB), StatusIs(kDenied));
  }
  CUSTOS_ASSERT_OK_AND_ASSIGN(SecretBytes random, hsm_->GenerateRandom(24));
  const std::string canary =
      absl::StrCat("canary-plaintext-", absl::BytesToHexString(random.view()));
  secrets.push_back(canary);
  CUSTOS_ASSERT_OK_AND_ASSIGN(EncryptResult sealed,
                              Seal(a->id, canary, kContext));
  CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult back, Open(sealed.blob, kContext));
  EXPECT_TRUE(back.plaintext.Equals(canary));
  EXPECT_THAT(Seal(a->id, canary, {{"bad\xff", "x"}}),
              StatusIs(Code::kInvalidArgument));
  EXPECT_THAT(Seal(a->id, canary, kContext, kSvcB), StatusIs(kDenied));

  std::vector<std::string> needles;
  for (const std::string& s : secrets) {
    needles.push_back(s);
    needles.push_back(absl::BytesToHexString(s));
    needles.push_back(absl::AsciiStrToUpper(absl::BytesToHexString(s)));
    needles.push_back(absl::Base64Escape(s));
    needles.push_back(absl::WebSafeBase64Escape(s));
  }
  int files = 0;
  for (const std::string& root : {stack_->dir, token_->dir()}) {
    for (const auto& entry :
         std::filesystem::recursive_directory_iterator(root)) {
      if (!entry.is_regular_file()) continue;
      ++files;
      const std::string contents = ReadFile(entry.path());
      for (size_t i = 0; i < needles.size(); ++i) {
        EXPECT_EQ(contents.find(needles[i]), std::string::npos)
            << "secret " << i / 5 << " (form " << i % 5 << ") found in "
            << entry.path();
      }
    }
  }
  EXPECT_GE(files, 3);  // at least the database, its WAL and the segment
  EXPECT_TRUE(std::filesystem::exists(stack_->db_path));
  EXPECT_TRUE(std::filesystem::exists(stack_->audit->segment_path()));
}

// ---------------------------------------------------------------------------
// 4. Blobs: binding, tampering, sizes and bad contexts.

class KeyServiceBlobTest : public KeyServiceTest {};

TEST_F(KeyServiceBlobTest, DataKeyRoundTripsWithItsContextInAnyOrder) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(key->id, kContext));
  EXPECT_EQ(dk.key_id, key->id);
  EXPECT_EQ(dk.version, 1u);
  EXPECT_EQ(dk.plaintext.size(), 32u);
  EXPECT_EQ(dk.blob.size(), kMinBlobSize + 32);
  // The same pairs inserted in the other order: the same map.
  EncryptionContext reordered;
  reordered.emplace("tenant", "acme");
  reordered.emplace("purpose", "backup");
  CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult opened, Open(dk.blob, reordered));
  EXPECT_EQ(opened.key_id, key->id);
  EXPECT_EQ(opened.version, 1u);
  EXPECT_TRUE(opened.plaintext.Equals(dk.plaintext.view()));
  // By alias as the expected key.
  CUSTOS_ASSERT_OK(service().CreateAlias(As(kAdmin), "alias/rt", key->id));
  CUSTOS_EXPECT_OK(Open(dk.blob, kContext, kSvcA, "alias/rt"));
  CUSTOS_EXPECT_OK(Open(dk.blob, kContext, kSvcA, key->id));
}

TEST_F(KeyServiceBlobTest, DataKeyWithoutPlaintextReturnsOnlyTheBlob) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  DataKeyParams params;
  params.key = key->id;
  params.include_plaintext = false;
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk,
                              service().GenerateDataKey(As(kSvcA), params));
  EXPECT_TRUE(dk.plaintext.empty());
  CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult opened, Open(dk.blob, {}));
  EXPECT_EQ(opened.plaintext.size(), 32u);
}

TEST_F(KeyServiceBlobTest, GenerateDataKeysMakesDistinctKeysThatEachOpen) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  const size_t lines_before = AuditLines().size();
  DataKeysParams params;
  params.data_key.key = key->id;
  params.data_key.context = kContext;
  params.count = 50;
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeysResult batch,
                              service().GenerateDataKeys(As(kSvcA), params));
  EXPECT_EQ(batch.key_id, key->id);
  EXPECT_EQ(batch.version, 1u);
  ASSERT_EQ(batch.keys.size(), 50u);
  // One record for the whole call, naming the count.
  std::vector<std::string> lines = AuditLines();
  ASSERT_EQ(lines.size(), lines_before + 1);
  nlohmann::json record = nlohmann::json::parse(lines.back());
  EXPECT_EQ(record["operation"], "GenerateDataKeys");
  EXPECT_EQ(record["outcome"], "ALLOWED");
  EXPECT_EQ(record["key_version"], 1);
  EXPECT_THAT(record.value("detail", std::string()),
              ::testing::HasSubstr("count=50"));
  std::set<std::string> plaintexts, ivs;
  for (const DataKeysResult::Entry& entry : batch.keys) {
    ASSERT_EQ(entry.plaintext.size(), 32u);
    plaintexts.emplace(entry.plaintext.view());
    CUSTOS_ASSERT_OK_AND_ASSIGN(ParsedBlob parsed, ParseBlob(entry.blob));
    ivs.emplace(parsed.iv);
    CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult opened,
                                Open(entry.blob, kContext));
    EXPECT_TRUE(opened.plaintext.Equals(entry.plaintext.view()));
  }
  EXPECT_EQ(plaintexts.size(), 50u) << "every data key is fresh";
  EXPECT_EQ(ivs.size(), 50u) << "every blob has its own IV";

  params.data_key.include_plaintext = false;
  params.data_key.bytes = 16;
  params.count = 3;
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeysResult wrapped,
                              service().GenerateDataKeys(As(kSvcA), params));
  ASSERT_EQ(wrapped.keys.size(), 3u);
  for (const DataKeysResult::Entry& entry : wrapped.keys) {
    EXPECT_TRUE(entry.plaintext.empty());
    CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult opened,
                                Open(entry.blob, kContext));
    EXPECT_EQ(opened.plaintext.size(), 16u);
  }
}

TEST_F(KeyServiceBlobTest, GenerateDataKeysCountOutside1To1000IsRefused) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  for (uint32_t count : {0u, 1001u, 4000000000u}) {
    SCOPED_TRACE(count);
    const size_t lines_before = AuditLines().size();
    DataKeysParams params;
    params.data_key.key = key->id;
    params.count = count;
    absl::StatusOr<DataKeysResult> refused =
        service().GenerateDataKeys(As(kSvcA), params);
    EXPECT_THAT(refused, StatusIs(Code::kInvalidArgument));
    EXPECT_THAT(std::string(refused.status().message()),
                ::testing::HasSubstr("count"));
    // Refusals are audited too.
    std::vector<std::string> lines = AuditLines();
    ASSERT_EQ(lines.size(), lines_before + 1);
    EXPECT_EQ(nlohmann::json::parse(lines.back())["outcome"], "FAILED");
  }
  // A caller the policy does not name gets nothing, whatever the count.
  DataKeysParams params;
  params.data_key.key = key->id;
  params.count = 10;
  EXPECT_THAT(service().GenerateDataKeys(As(kSvcB), params), StatusIs(kDenied));
}

TEST_F(KeyServiceBlobTest, AnyOtherContextGivesInvalidCiphertext) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(key->id, kContext));
  const struct {
    const char* name;
    EncryptionContext context;
  } cases[] = {
      {"empty", {}},
      {"pair missing", {{"tenant", "acme"}}},
      {"pair extra",
       {{"tenant", "acme"}, {"purpose", "backup"}, {"extra", "1"}}},
      {"key re-cased", {{"Tenant", "acme"}, {"purpose", "backup"}}},
      {"value changed", {{"tenant", "acme2"}, {"purpose", "backup"}}},
      {"value re-cased", {{"tenant", "ACME"}, {"purpose", "backup"}}},
      {"empty value for absent pair",
       {{"tenant", "acme"}, {"purpose", "backup"}, {"note", ""}}},
      {"key and value swapped", {{"acme", "tenant"}, {"purpose", "backup"}}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    EXPECT_THAT(Open(dk.blob, c.context),
                StatusIs(Code::kInvalidArgument, Eq(kInvalidCiphertext)));
  }
  // An empty value where the blob had none is not "absent".
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult with_empty,
                              DataKey(key->id, {{"note", ""}}));
  EXPECT_THAT(Open(with_empty.blob, {}),
              StatusIs(Code::kInvalidArgument, Eq(kInvalidCiphertext)));
  CUSTOS_EXPECT_OK(Open(with_empty.blob, {{"note", ""}}));
}

TEST_F(KeyServiceBlobTest, EveryTruncationGivesInvalidCiphertext) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(key->id, kContext));
  for (size_t n = 0; n < dk.blob.size(); ++n) {
    SCOPED_TRACE(absl::StrCat("truncated to ", n, " bytes"));
    EXPECT_THAT(Open(dk.blob.substr(0, n), kContext),
                StatusIs(Code::kInvalidArgument, Eq(kInvalidCiphertext)));
  }
  for (const std::string& tail :
       {std::string(1, '\0'), std::string("x"), std::string(16, 'y')}) {
    SCOPED_TRACE(absl::StrCat("with ", tail.size(), " trailing bytes"));
    EXPECT_THAT(Open(dk.blob + tail, kContext),
                StatusIs(Code::kInvalidArgument, Eq(kInvalidCiphertext)));
  }
  EXPECT_THAT(Open(std::string(kMaxBlobSize + 1, '\x01'), kContext),
              StatusIs(Code::kInvalidArgument, Eq(kInvalidCiphertext)));
  CUSTOS_EXPECT_OK(Open(dk.blob, kContext));
}

TEST_F(KeyServiceBlobTest, EveryBitFlipIsRefusedAndNeverOpens) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(key->id, kContext));
  // What a blob naming a key the caller cannot use gets.
  const absl::Status unusable =
      Open(WithKeyId(dk.blob, kUnknownKeyId), kContext).status();
  ASSERT_THAT(unusable, StatusIs(kDenied));
  int denied = 0;
  for (size_t i = 0; i < dk.blob.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string flipped = dk.blob;
      flipped[i] = static_cast<char>(flipped[i] ^ (1 << bit));
      SCOPED_TRACE(absl::StrCat("byte ", i, " bit ", bit));
      absl::Status status = Open(flipped, kContext).status();
      const bool other_valid_id =
          i >= kKeyIdOffset && i < kKeyIdOffset + kKeyIdSize &&
          IsValidKeyId(
              absl::string_view(flipped).substr(kKeyIdOffset, kKeyIdSize));
      if (other_valid_id) {
        // Another well-formed key id: refused like any key the caller
        // cannot use, in the same words.
        EXPECT_EQ(status, unusable);
        ++denied;
      } else {
        EXPECT_THAT(status,
                    StatusIs(Code::kInvalidArgument, Eq(kInvalidCiphertext)));
      }
    }
  }
  EXPECT_GT(denied, 0);
  CUSTOS_EXPECT_OK(Open(dk.blob, kContext));
}

TEST_F(KeyServiceBlobTest, ExpectedKeyMismatchGivesInvalidCiphertext) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> a, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> b, NewKey());
  CUSTOS_ASSERT_OK(service().CreateAlias(As(kAdmin), "alias/b", b->id));
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(a->id, kContext));
  for (const std::string& expected :
       {b->id, std::string("alias/b"), std::string(kUnknownKeyId)}) {
    SCOPED_TRACE(expected);
    EXPECT_THAT(Open(dk.blob, kContext, kSvcA, expected),
                StatusIs(Code::kInvalidArgument, Eq(kInvalidCiphertext)));
  }
}

TEST_F(KeyServiceBlobTest, ReEncryptMovesABlobToAnotherKey) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> a, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> b, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(a->id, kContext));
  const EncryptionContext new_context = {{"tenant", "acme"}, {"moved", "1"}};
  ReEncryptParams params;
  params.blob = dk.blob;
  params.source_context = kContext;
  params.destination_key = b->id;
  params.destination_context = new_context;
  CUSTOS_ASSERT_OK_AND_ASSIGN(ReEncryptResult moved,
                              service().ReEncrypt(As(kSvcA), params));
  EXPECT_EQ(moved.source_key_id, a->id);
  EXPECT_EQ(moved.source_version, 1u);
  EXPECT_EQ(moved.key_id, b->id);
  EXPECT_EQ(moved.version, 1u);
  CUSTOS_ASSERT_OK_AND_ASSIGN(ParsedBlob parsed, ParseBlob(moved.blob));
  EXPECT_EQ(parsed.header.key_id, b->id);
  CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult opened,
                              Open(moved.blob, new_context));
  EXPECT_EQ(opened.key_id, b->id);
  EXPECT_TRUE(opened.plaintext.Equals(dk.plaintext.view()));
  EXPECT_THAT(Open(moved.blob, kContext),
              StatusIs(Code::kInvalidArgument, Eq(kInvalidCiphertext)));
  // The wrong source context opens nothing.
  params.source_context = new_context;
  EXPECT_THAT(service().ReEncrypt(As(kSvcA), params),
              StatusIs(Code::kInvalidArgument, Eq(kInvalidCiphertext)));
}

TEST_F(KeyServiceBlobTest, ReEncryptToTheSameKeyUsesItsPrimaryVersion) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(key->id, kContext));
  CUSTOS_ASSERT_OK(service().RotateKey(As(kAdmin), key->id));
  ReEncryptParams params;
  params.blob = dk.blob;
  params.source_context = kContext;
  params.destination_context = kContext;
  CUSTOS_ASSERT_OK_AND_ASSIGN(ReEncryptResult moved,
                              service().ReEncrypt(As(kSvcA), params));
  EXPECT_EQ(moved.source_version, 1u);
  EXPECT_EQ(moved.key_id, key->id);
  EXPECT_EQ(moved.version, 2u);
  CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult opened, Open(moved.blob, kContext));
  EXPECT_EQ(opened.version, 2u);
  EXPECT_TRUE(opened.plaintext.Equals(dk.plaintext.view()));
}

TEST_F(KeyServiceBlobTest, EncryptTakesOneTo4096Bytes) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  const std::string largest(4096, 'p');
  CUSTOS_ASSERT_OK_AND_ASSIGN(EncryptResult sealed, Seal(key->id, largest));
  EXPECT_EQ(sealed.blob.size(), kMaxBlobSize);
  CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult opened, Open(sealed.blob, {}));
  EXPECT_TRUE(opened.plaintext.Equals(largest));
  EXPECT_THAT(Seal(key->id, std::string(4097, 'p')),
              StatusIs(Code::kInvalidArgument, HasSubstr("plaintext")));
  EXPECT_THAT(Seal(key->id, ""),
              StatusIs(Code::kInvalidArgument, HasSubstr("plaintext")));
  CUSTOS_EXPECT_OK(Seal(key->id, "p"));
}

TEST_F(KeyServiceBlobTest, DataKeySizesOutside1To1024AreRefused) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  for (size_t bytes : {size_t{0}, size_t{1025}, size_t{1} << 40}) {
    SCOPED_TRACE(bytes);
    EXPECT_THAT(DataKey(key->id, kContext, bytes),
                StatusIs(Code::kInvalidArgument, HasSubstr("number_of_bytes")));
  }
  for (size_t bytes : {size_t{1}, size_t{1024}}) {
    SCOPED_TRACE(bytes);
    CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk,
                                DataKey(key->id, kContext, bytes));
    EXPECT_EQ(dk.plaintext.size(), bytes);
    CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult opened, Open(dk.blob, kContext));
    EXPECT_TRUE(opened.plaintext.Equals(dk.plaintext.view()));
  }
}

TEST_F(KeyServiceBlobTest, MalformedContextsAreRefusedByEveryCryptoCall) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(key->id, {}));
  EncryptionContext too_many;
  for (int i = 0; i < 65; ++i) too_many[absl::StrCat("k", i)] = "v";
  const struct {
    const char* name;
    EncryptionContext context;
  } cases[] = {
      {"invalid UTF-8 value", {{"tenant", "\xc3\x28"}}},
      {"invalid UTF-8 key", {{"\xff", "acme"}}},
      {"NUL in value", {{"tenant", std::string("ac\0me", 5)}}},
      {"NUL in key", {{std::string("ten\0ant", 7), "acme"}}},
      {"64 KiB value", {{"tenant", std::string(64 * 1024, 'v')}}},
      {"65 pairs", too_many},
      {"empty key", {{"", "acme"}}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    EXPECT_THAT(DataKey(key->id, c.context),
                StatusIs(Code::kInvalidArgument, HasSubstr("context")));
    EXPECT_THAT(Seal(key->id, "x", c.context),
                StatusIs(Code::kInvalidArgument, HasSubstr("context")));
    EXPECT_THAT(Open(dk.blob, c.context), StatusIs(Code::kInvalidArgument));
    ReEncryptParams re;
    re.blob = dk.blob;
    re.destination_context = c.context;
    EXPECT_THAT(service().ReEncrypt(As(kSvcA), re),
                StatusIs(Code::kInvalidArgument));
  }
}

// ---------------------------------------------------------------------------
// 5. Rotation and the durable encryption counter.

class KeyServiceRotationTest : public KeyServiceTest {};

TEST_F(KeyServiceRotationTest, RotateKeyMakesANewPrimaryAndOldBlobsStillOpen) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult old_dk, DataKey(key->id, kContext));
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> rotated,
                              service().RotateKey(As(kAdmin), key->id));
  EXPECT_EQ(rotated->primary_version, 2u);
  ASSERT_EQ(rotated->versions.size(), 2u);
  EXPECT_NE(rotated->versions[0].hsm_id, rotated->versions[1].hsm_id);

  CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult opened,
                              Open(old_dk.blob, kContext));
  EXPECT_EQ(opened.version, 1u);
  EXPECT_TRUE(opened.plaintext.Equals(old_dk.plaintext.view()));

  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult new_dk, DataKey(key->id, kContext));
  EXPECT_EQ(new_dk.version, 2u);
  CUSTOS_ASSERT_OK_AND_ASSIGN(ParsedBlob parsed, ParseBlob(new_dk.blob));
  EXPECT_EQ(parsed.header.version, 2u);
  CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult reopened,
                              Open(new_dk.blob, kContext));
  EXPECT_EQ(reopened.version, 2u);
}

TEST_F(KeyServiceRotationTest, EncryptionLimitRotatesAutomatically) {
  KeyService::Options options = Options();
  options.encryption_limit = 100;
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Stack> limited,
                              OpenStack(dir_ + "/limited", options));
  KeyService& s = *limited->service;
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key,
                              s.CreateKey(As(kAdmin), KeyParams()));
  std::vector<std::string> blobs;
  std::map<uint32_t, int> per_version;
  for (int i = 0; i < 150; ++i) {
    EncryptParams params;
    params.key = key->id;
    params.plaintext = SecretBytes::CopyOf(absl::StrCat("message ", i));
    CUSTOS_ASSERT_OK_AND_ASSIGN(EncryptResult sealed,
                                s.Encrypt(As(kSvcA), params));
    ++per_version[sealed.version];
    blobs.push_back(sealed.blob);
  }
  EXPECT_EQ(per_version, (std::map<uint32_t, int>{{1, 100}, {2, 50}}));
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> now,
                              limited->registry->Find(key->id));
  EXPECT_EQ(now->primary_version, 2u);
  EXPECT_EQ(now->versions.size(), 2u);
  for (int i = 0; i < 150; ++i) {
    DecryptParams params;
    params.blob = blobs[i];
    CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult opened,
                                s.Decrypt(As(kSvcA), params));
    EXPECT_TRUE(opened.plaintext.Equals(absl::StrCat("message ", i)));
  }
}

TEST_F(KeyServiceRotationTest, ABatchThatWouldPassTheLimitRotatesFirst) {
  KeyService::Options options = Options();
  options.encryption_limit = 100;
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Stack> limited,
                              OpenStack(dir_ + "/batch-limit", options));
  KeyService& s = *limited->service;
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key,
                              s.CreateKey(As(kAdmin), KeyParams()));
  DataKeysParams params;
  params.data_key.key = key->id;
  params.count = 60;
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeysResult first,
                              s.GenerateDataKeys(As(kSvcA), params));
  EXPECT_EQ(first.version, 1u);
  // 60 more would make 120 under version 1: the batch moves to version 2
  // whole, and no version ever exceeds its budget.
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeysResult second,
                              s.GenerateDataKeys(As(kSvcA), params));
  EXPECT_EQ(second.version, 2u);
  params.count = 40;
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeysResult third,
                              s.GenerateDataKeys(As(kSvcA), params));
  EXPECT_EQ(third.version, 2u);
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> now,
                              limited->registry->Find(key->id));
  for (const KeyVersion& v : now->versions) {
    EXPECT_LE(v.encryptions_reserved, 100u) << "version " << v.number;
  }
  for (const DataKeysResult* batch : {&first, &second, &third}) {
    for (const DataKeysResult::Entry& entry : batch->keys) {
      DecryptParams open;
      open.blob = entry.blob;
      CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult opened,
                                  s.Decrypt(As(kSvcA), open));
      EXPECT_TRUE(opened.plaintext.Equals(entry.plaintext.view()));
    }
  }
  // More than a version can ever hold is refused, not rotated forever.
  params.count = 101;
  EXPECT_THAT(s.GenerateDataKeys(As(kSvcA), params),
              StatusIs(Code::kInvalidArgument));
  CUSTOS_ASSERT_OK_AND_ASSIGN(now, limited->registry->Find(key->id));
  EXPECT_EQ(now->versions.size(), 2u);
}

TEST_F(KeyServiceRotationTest, ConcurrentEncryptionsPastTheLimitRotateOnce) {
  KeyService::Options options = Options();
  options.encryption_limit = 100;
  options.counter_block = 7;
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Stack> limited,
                              OpenStack(dir_ + "/limited", options));
  KeyService& s = *limited->service;
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key,
                              s.CreateKey(As(kAdmin), KeyParams()));
  std::atomic<int> v1{0}, v2{0}, other{0}, failed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 25; ++i) {
        EncryptParams params;
        params.key = key->id;
        params.plaintext = SecretBytes::CopyOf("x");
        auto sealed = s.Encrypt(As(kSvcA), params);
        if (!sealed.ok()) {
          ++failed;
        } else if (sealed->version == 1) {
          ++v1;
        } else if (sealed->version == 2) {
          ++v2;
        } else {
          ++other;
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failed, 0);
  EXPECT_EQ(v1, 100);
  EXPECT_EQ(v2, 50);
  EXPECT_EQ(other, 0);
}

TEST_F(KeyServiceRotationTest, EncryptionCounterSurvivesARestart) {
  KeyService::Options options = Options();
  options.encryption_limit = 100;
  options.counter_block = 10;
  const std::string dir = dir_ + "/durable";
  auto encrypt = [](KeyService& s, const std::string& key) {
    EncryptParams params;
    params.key = key;
    params.plaintext = SecretBytes::CopyOf("x");
    return s.Encrypt(As(kSvcA), params);
  };
  std::string key_id;
  {
    CUSTOS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Stack> first,
                                OpenStack(dir, options));
    CUSTOS_ASSERT_OK_AND_ASSIGN(
        std::shared_ptr<const Key> key,
        first->service->CreateKey(As(kAdmin), KeyParams()));
    key_id = key->id;
    for (int i = 0; i < 25; ++i) {
      CUSTOS_ASSERT_OK_AND_ASSIGN(EncryptResult r,
                                  encrypt(*first->service, key_id));
      ASSERT_EQ(r.version, 1u);
    }
  }
  // What the database holds, read by a fresh store: at least what was used.
  {
    CUSTOS_ASSERT_OK_AND_ASSIGN(
        std::unique_ptr<Store> store,
        OpenStore("sqlite://" + dir + "/custos.db", OpenMode::kCreate));
    CUSTOS_ASSERT_OK_AND_ASSIGN(Key stored, store->LoadKey(key_id));
    ASSERT_EQ(stored.versions.size(), 1u);
    EXPECT_GE(stored.versions[0].encryptions_reserved, 25u);
    EXPECT_LE(stored.versions[0].encryptions_reserved, 25u + 10u);
  }
  // A fresh registry and service on the same file carry on from the
  // reservation: version 1 never exceeds the limit in true encryptions.
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Stack> second,
                              OpenStack(dir, options));
  int more_under_v1 = 0;
  for (int i = 0; i < 100; ++i) {
    CUSTOS_ASSERT_OK_AND_ASSIGN(EncryptResult r,
                                encrypt(*second->service, key_id));
    if (r.version != 1) break;
    ++more_under_v1;
  }
  EXPECT_LE(25 + more_under_v1, 100) << "version 1 was over-used";
  EXPECT_EQ(more_under_v1, 100 - 30)
      << "expected the restart to count the 30 reserved encryptions as used";
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> after,
                              second->registry->Find(key_id));
  EXPECT_EQ(after->primary_version, 2u);
  EXPECT_GE(after->versions[0].encryptions_reserved,
            static_cast<uint64_t>(25 + more_under_v1));
  EXPECT_GE(after->versions[1].encryptions_reserved, 1u);
}

// The asynchronous forms, called from several threads while an admin
// rotates the key: every `done` runs exactly once (on the audit log's
// thread), with a result that opens to what it says. GenerateDataKey(s) go
// through Hsm::GenerateAndSealAesGcm, Encrypt through the durable counter,
// and RotateKey races both. (scripts/test runs this under ThreadSanitizer.)
class KeyServiceAsyncTest : public KeyServiceTest {};

TEST_F(KeyServiceAsyncTest, CallsRacingRotationsEachCompleteOnceAndOpen) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  constexpr int kThreads = 4;
  constexpr int kRounds = 12;
  constexpr int kCallsPerRound = 3;
  constexpr int kRotations = 4;
  constexpr int kCalls = kThreads * kRounds * kCallsPerRound;
  struct Sealed {
    std::string blob;
    std::string plaintext;
    uint32_t version;
  };
  absl::Mutex mu;
  std::map<int, int> runs;  // call number -> times its `done` ran
  std::vector<Sealed> sealed;
  std::vector<std::string> errors;
  // Each `done` reports here; quick, as the audit log asks.
  auto finish = [&](int call, const absl::Status& status,
                    std::vector<Sealed> out) {
    absl::MutexLock lock(&mu);
    ++runs[call];
    if (!status.ok()) errors.push_back(status.ToString());
    for (Sealed& s : out) sealed.push_back(std::move(s));
  };
  std::atomic<int> next_call{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kRounds; ++i) {
        DataKeyParams one;
        one.key = key->id;
        one.context = kContext;
        const int a = next_call++;
        service().GenerateDataKey(
            As(kSvcA), one, [&, a](absl::StatusOr<DataKeyResult> r) {
              if (!r.ok()) return finish(a, r.status(), {});
              finish(a, absl::OkStatus(),
                     {{r->blob, std::string(r->plaintext.view()), r->version}});
            });
        DataKeysParams many;
        many.data_key = one;
        many.count = 3;
        const int b = next_call++;
        service().GenerateDataKeys(
            As(kSvcA), many, [&, b](absl::StatusOr<DataKeysResult> r) {
              if (!r.ok()) return finish(b, r.status(), {});
              std::vector<Sealed> out;
              for (const DataKeysResult::Entry& e : r->keys) {
                out.push_back(
                    {e.blob, std::string(e.plaintext.view()), r->version});
              }
              finish(b, absl::OkStatus(), std::move(out));
            });
        EncryptParams enc;
        enc.key = key->id;
        enc.context = kContext;
        const std::string text = absl::StrCat("thread ", t, " round ", i);
        enc.plaintext = SecretBytes::CopyOf(text);
        const int c = next_call++;
        service().Encrypt(
            As(kSvcA), enc, [&, c, text](absl::StatusOr<EncryptResult> r) {
              if (!r.ok()) return finish(c, r.status(), {});
              finish(c, absl::OkStatus(), {{r->blob, text, r->version}});
            });
      }
    });
  }
  std::thread rotator([&] {
    for (int i = 0; i < kRotations; ++i) {
      CUSTOS_EXPECT_OK(service().RotateKey(As(kAdmin), key->id));
      absl::SleepFor(absl::Milliseconds(5));
    }
  });
  for (std::thread& th : threads) th.join();
  rotator.join();
  {
    absl::MutexLock lock(&mu);
    auto all_done = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
      return runs.size() == static_cast<size_t>(kCalls);
    };
    ASSERT_TRUE(
        mu.AwaitWithTimeout(absl::Condition(&all_done), absl::Seconds(60)))
        << runs.size() << " of " << kCalls << " calls completed";
  }
  // Nothing runs a `done` now: every call has completed once.
  for (const auto& [call, n] : runs) EXPECT_EQ(n, 1) << "call " << call;
  EXPECT_THAT(errors, ::testing::IsEmpty());
  EXPECT_EQ(sealed.size(), static_cast<size_t>(kThreads * kRounds * 5));
  for (const Sealed& s : sealed) {
    CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult opened, Open(s.blob, kContext));
    EXPECT_EQ(opened.version, s.version);
    EXPECT_TRUE(opened.plaintext.Equals(s.plaintext));
  }
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> after,
                              service().GetKey(As(kAdmin), key->id));
  EXPECT_EQ(after->primary_version, 1u + kRotations);
}

// ---------------------------------------------------------------------------
// 6 and 7. Scheduled work: deletion and rotation.

class KeyServiceMaintenanceTest : public KeyServiceTest {};

TEST_F(KeyServiceMaintenanceTest, DeletionWindowIsSevenToThirtyDays) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  for (uint32_t days : {1u, 6u, 31u, 365u}) {
    SCOPED_TRACE(days);
    EXPECT_THAT(service().ScheduleKeyDeletion(As(kAdmin), key->id, days),
                StatusIs(Code::kInvalidArgument, HasSubstr("7 to 30")));
  }
  const absl::Time start = clock_.Now();
  CUSTOS_ASSERT_OK_AND_ASSIGN(
      std::shared_ptr<const Key> pending,
      service().ScheduleKeyDeletion(As(kAdmin), key->id, 7));
  EXPECT_EQ(pending->state, KeyState::kPendingDeletion);
  EXPECT_EQ(pending->deletion_time, start + absl::Hours(24 * 7));
}

TEST_F(KeyServiceMaintenanceTest, DeletionWaitsItsWindowThenDestroysTheKey) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult v1_blob,
                              DataKey(key->id, kContext));
  CUSTOS_ASSERT_OK(service().RotateKey(As(kAdmin), key->id));
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult v2_blob,
                              DataKey(key->id, kContext));
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> two_versions,
                              service().GetKey(As(kAdmin), key->id));
  std::vector<std::string> hsm_ids;
  for (const KeyVersion& v : two_versions->versions) {
    hsm_ids.push_back(v.hsm_id);
  }
  ASSERT_EQ(hsm_ids.size(), 2u);

  CUSTOS_ASSERT_OK(service().ScheduleKeyDeletion(As(kAdmin), key->id, 7));
  // Every crypto call is refused while the key waits.
  EXPECT_THAT(DataKey(key->id, kContext), StatusIs(kPrecondition));
  EXPECT_THAT(Seal(key->id, "x"), StatusIs(kPrecondition));
  EXPECT_THAT(Open(v1_blob.blob, kContext), StatusIs(kPrecondition));
  // Cancelling brings it back disabled; enabling makes it usable again.
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> cancelled,
                              service().CancelKeyDeletion(As(kAdmin), key->id));
  EXPECT_EQ(cancelled->state, KeyState::kDisabled);
  EXPECT_THAT(Open(v1_blob.blob, kContext), StatusIs(kPrecondition));
  CUSTOS_ASSERT_OK(service().EnableKey(As(kAdmin), key->id));
  CUSTOS_EXPECT_OK(Open(v1_blob.blob, kContext));

  CUSTOS_ASSERT_OK(service().ScheduleKeyDeletion(As(kAdmin), key->id, 7));
  clock_.Advance(absl::Hours(24 * 7) - absl::Seconds(1));
  MaintenanceReport early = service().RunScheduledWork();
  EXPECT_EQ(early.destroyed_keys, 0);
  EXPECT_EQ(early.destroyed_objects, 0);
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::vector<hsm::HsmObject> objects,
                              hsm_->ListKeyObjects());
  for (const std::string& id : hsm_ids) {
    EXPECT_THAT(HsmIds(objects), ::testing::Contains(id));
  }

  clock_.Advance(absl::Seconds(2));
  MaintenanceReport done = service().RunScheduledWork();
  EXPECT_EQ(done.destroyed_keys, 1);
  EXPECT_EQ(done.destroyed_objects, 2);
  EXPECT_EQ(done.failures, 0);
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> destroyed,
                              service().GetKey(As(kAdmin), key->id));
  EXPECT_EQ(destroyed->state, KeyState::kDestroyed);
  CUSTOS_ASSERT_OK_AND_ASSIGN(objects, hsm_->ListKeyObjects());
  for (const std::string& id : hsm_ids) {
    EXPECT_THAT(HsmIds(objects), ::testing::Not(::testing::Contains(id)));
  }
  EXPECT_THAT(Open(v1_blob.blob, kContext),
              StatusIs(Code::kInvalidArgument, Eq(kInvalidCiphertext)));
  EXPECT_THAT(Open(v2_blob.blob, kContext),
              StatusIs(Code::kInvalidArgument, Eq(kInvalidCiphertext)));
  EXPECT_THAT(DataKey(key->id, kContext), StatusIs(kPrecondition));
  EXPECT_THAT(service().EnableKey(As(kAdmin), key->id),
              StatusIs(kPrecondition));
  EXPECT_THAT(service().CancelKeyDeletion(As(kAdmin), key->id),
              StatusIs(kPrecondition));
  // A second pass finds nothing left to do.
  EXPECT_EQ(service().RunScheduledWork().destroyed_keys, 0);
}

TEST_F(KeyServiceMaintenanceTest, ClockSteppedBackNeverDestroysEarly) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(key->id, kContext));
  const absl::Time start = clock_.Now();
  CUSTOS_ASSERT_OK(service().ScheduleKeyDeletion(As(kAdmin), key->id, 7));
  clock_.Set(start - absl::Hours(24 * 365));
  EXPECT_EQ(service().RunScheduledWork().destroyed_keys, 0);
  clock_.Set(start + absl::Hours(24 * 6));
  EXPECT_EQ(service().RunScheduledWork().destroyed_keys, 0);
  clock_.Set(start - absl::Hours(1));
  EXPECT_EQ(service().RunScheduledWork().destroyed_keys, 0);
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> still,
                              service().GetKey(As(kAdmin), key->id));
  EXPECT_EQ(still->state, KeyState::kPendingDeletion);
  CUSTOS_ASSERT_OK(service().CancelKeyDeletion(As(kAdmin), key->id));
  CUSTOS_ASSERT_OK(service().EnableKey(As(kAdmin), key->id));
  CUSTOS_EXPECT_OK(Open(dk.blob, kContext));
}

// The wall clock stepped a year forward must not end a 7-day window: the
// window is also counted on the monotonic clock, pass by pass.
TEST_F(KeyServiceMaintenanceTest, ClockSteppedForwardNeverDestroysEarly) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(key->id, kContext));
  // A clock with nanoseconds, as the real one has: the store keeps
  // microseconds, and the window must still be counted.
  clock_.Advance(absl::Nanoseconds(1234));
  const absl::Time start = clock_.Now();
  CUSTOS_ASSERT_OK(service().ScheduleKeyDeletion(As(kAdmin), key->id, 7));
  clock_.Set(start + absl::Hours(24 * 365));
  EXPECT_EQ(service().RunScheduledWork().destroyed_keys, 0);
  for (int day = 1; day < 7; ++day) {
    clock_.Advance(absl::Hours(24));
    MaintenanceReport pass = service().RunScheduledWork();
    EXPECT_EQ(pass.destroyed_keys, 0) << "after " << day << " days";
    EXPECT_EQ(pass.failures, 0);
  }
  clock_.Advance(absl::Hours(24) - absl::Seconds(1));
  EXPECT_EQ(service().RunScheduledWork().destroyed_keys, 0);
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> still,
                              service().GetKey(As(kAdmin), key->id));
  EXPECT_EQ(still->state, KeyState::kPendingDeletion);
  EXPECT_EQ(still->deletion_elapsed, absl::Hours(24 * 7) - absl::Seconds(1));
  clock_.Advance(absl::Seconds(2));
  EXPECT_EQ(service().RunScheduledWork().destroyed_keys, 1);
  EXPECT_THAT(Open(dk.blob, kContext),
              StatusIs(Code::kInvalidArgument, Eq(kInvalidCiphertext)));
}

// What a pass counted is in the database: a restart keeps it, and time
// while no custosd ran does not count (the window can only grow longer).
TEST_F(KeyServiceMaintenanceTest, DeletionWindowCountSurvivesARestart) {
  const std::string dir = dir_ + "/restart";
  std::string key_id;
  {
    CUSTOS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Stack> first,
                                OpenStack(dir, Options()));
    CUSTOS_ASSERT_OK_AND_ASSIGN(
        std::shared_ptr<const Key> key,
        first->service->CreateKey(As(kAdmin), KeyParams()));
    key_id = key->id;
    CUSTOS_ASSERT_OK(
        first->service->ScheduleKeyDeletion(As(kAdmin), key_id, 7));
    clock_.Advance(absl::Hours(24 * 4));
    EXPECT_EQ(first->service->RunScheduledWork().destroyed_keys, 0);
  }
  // Down for 10 days: the wall clock passes deletion_time meanwhile.
  clock_.Advance(absl::Hours(24 * 10));
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Stack> second,
                              OpenStack(dir, Options()));
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> stored,
                              second->service->GetKey(As(kAdmin), key_id));
  EXPECT_EQ(stored->deletion_elapsed, absl::Hours(24 * 4));
  EXPECT_EQ(stored->deletion_window, absl::Hours(24 * 7));
  EXPECT_EQ(second->service->RunScheduledWork().destroyed_keys, 0);
  clock_.Advance(absl::Hours(24 * 3) - absl::Seconds(1));
  EXPECT_EQ(second->service->RunScheduledWork().destroyed_keys, 0);
  clock_.Advance(absl::Seconds(2));
  EXPECT_EQ(second->service->RunScheduledWork().destroyed_keys, 1);
}

// A cancelled and rescheduled deletion counts its new window from zero.
TEST_F(KeyServiceMaintenanceTest, RescheduledDeletionCountsFromZero) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  CUSTOS_ASSERT_OK(service().ScheduleKeyDeletion(As(kAdmin), key->id, 7));
  clock_.Advance(absl::Hours(24 * 6));
  EXPECT_EQ(service().RunScheduledWork().destroyed_keys, 0);
  CUSTOS_ASSERT_OK(service().CancelKeyDeletion(As(kAdmin), key->id));
  CUSTOS_ASSERT_OK(service().ScheduleKeyDeletion(As(kAdmin), key->id, 7));
  clock_.Advance(absl::Hours(24 * 6));
  EXPECT_EQ(service().RunScheduledWork().destroyed_keys, 0);
  clock_.Advance(absl::Hours(24) + absl::Seconds(1));
  EXPECT_EQ(service().RunScheduledWork().destroyed_keys, 1);
}

// Once the executor has committed that destruction begins (another
// replica's executor, say, that then crashed), no cancel may bring the key
// back: its material may be half gone. The next pass finishes the job,
// whatever the clocks say.
TEST_F(KeyServiceMaintenanceTest, DestructionOnceBegunCannotBeCancelled) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  CUSTOS_ASSERT_OK(service().ScheduleKeyDeletion(As(kAdmin), key->id, 7));
  const absl::Time start = clock_.Now();
  clock_.Advance(absl::Hours(24 * 7 + 1));
  // Written to the database behind this service's cache, as another
  // replica would.
  CUSTOS_ASSERT_OK(stack_->store->UpdateKey(key->id, [](Key& k) {
    k.destruction_started = true;
    return absl::OkStatus();
  }));
  EXPECT_THAT(service().CancelKeyDeletion(As(kAdmin), key->id),
              StatusIs(kPrecondition, HasSubstr("being destroyed")));
  // The change feed would bring the change to this replica's cache.
  CUSTOS_ASSERT_OK(stack_->registry->Refresh(key->id));
  // Even with the wall clock stepped back before the deletion time.
  clock_.Set(start);
  MaintenanceReport pass = service().RunScheduledWork();
  EXPECT_EQ(pass.destroyed_keys, 1);
  EXPECT_EQ(pass.failures, 0);
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> after,
                              service().GetKey(As(kAdmin), key->id));
  EXPECT_EQ(after->state, KeyState::kDestroyed);
}

// BUG (kms/maintenance.cc, KeyService::DestroyKeyMaterial): the executor
// decides from the snapshot RunScheduledWork took at the start of its pass
// and then destroys the HSM objects without checking that the key is still
// PENDING_DELETION. A CancelKeyDeletion that lands in between succeeds, the
// key comes back DISABLED, and its material is gone: every blob under it is
// lost although the admin rescued it in time.
TEST_F(KeyServiceMaintenanceTest, CancelDuringTheDeletionPassKeepsTheMaterial) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(key->id, kContext));
  CUSTOS_ASSERT_OK(service().ScheduleKeyDeletion(As(kAdmin), key->id, 7));
  clock_.Advance(absl::Hours(24 * 7 + 1));
  // The cancel arrives inside the pass: at its second reading of the clock,
  // after the pass chose the key and before the key is destroyed.
  absl::Status cancelled = absl::UnknownError("cancel never ran");
  clock_.RunInsideCall(2, [&] {
    cancelled = service().CancelKeyDeletion(As(kAdmin), key->id).status();
  });
  service().RunScheduledWork();
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> after,
                              service().GetKey(As(kAdmin), key->id));
  if (cancelled.ok()) {
    // The cancel won: the key must be whole.
    EXPECT_EQ(after->state, KeyState::kDisabled);
    CUSTOS_ASSERT_OK(service().EnableKey(As(kAdmin), key->id));
    CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult opened, Open(dk.blob, kContext));
    EXPECT_TRUE(opened.plaintext.Equals(dk.plaintext.view()));
    CUSTOS_ASSERT_OK_AND_ASSIGN(MaintenanceReport reconciled,
                                service().Reconcile());
    EXPECT_EQ(reconciled.missing_objects, 0);
  } else {
    // The deletion won: the cancel must have been refused.
    EXPECT_THAT(cancelled, StatusIs(kPrecondition));
    EXPECT_EQ(after->state, KeyState::kDestroyed);
  }
}

TEST_F(KeyServiceMaintenanceTest, ScheduledRotationRunsOncePerPeriod) {
  CreateKeyParams params = KeyParams();
  params.rotation_period = absl::Minutes(59);
  EXPECT_THAT(service().CreateKey(As(kAdmin), params),
              StatusIs(Code::kInvalidArgument, HasSubstr("rotation_period")));
  params.rotation_period = Options().min_rotation_period;
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key,
                              service().CreateKey(As(kAdmin), params));
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(key->id, kContext));
  clock_.Advance(absl::Minutes(59));
  EXPECT_EQ(service().RunScheduledWork().rotated, 0);
  clock_.Advance(absl::Minutes(2));
  MaintenanceReport report = service().RunScheduledWork();
  EXPECT_EQ(report.rotated, 1);
  EXPECT_EQ(report.failures, 0);
  EXPECT_EQ(service().RunScheduledWork().rotated, 0);
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> rotated,
                              service().GetKey(As(kAdmin), key->id));
  EXPECT_EQ(rotated->primary_version, 2u);
  EXPECT_EQ(rotated->versions.size(), 2u);
  EXPECT_EQ(rotated->next_rotation_time, clock_.Now() + absl::Hours(1));
  CUSTOS_EXPECT_OK(Open(dk.blob, kContext));
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult fresh, DataKey(key->id, kContext));
  EXPECT_EQ(fresh.version, 2u);
  nlohmann::json rotation;
  for (const std::string& line : AuditLines()) {
    nlohmann::json j = nlohmann::json::parse(line);
    if (j["principal"] == kSystemPrincipal) rotation = j;
  }
  EXPECT_EQ(rotation["operation"], "RotateKey");
  EXPECT_EQ(rotation["outcome"], "ALLOWED");
  EXPECT_EQ(rotation["key_id"], key->id);
}

// ---------------------------------------------------------------------------
// 8. Reconcile.

// Refuses every record: a full or unwritable audit disk.
class FailingAuditLog : public AuditLog {
 public:
  void AppendAsync(AuditRecord record, AppendDone done) override {
    std::move(done)(absl::UnavailableError("audit directory is full"));
  }
};

class KeyServiceReconcileTest : public KeyServiceTest {
 protected:
  // The suite shares one token: destroys the Custos objects that this
  // test's database does not own (other tests' keys), which the reconciler
  // itself would only quarantine.
  void ClearOtherTestsObjects() {
    absl::StatusOr<std::vector<hsm::HsmObject>> objects =
        hsm_->ListKeyObjects();
    ASSERT_TRUE(objects.ok()) << objects.status();
    std::set<std::string> ours;
    for (const auto& key : stack_->registry->All()) {
      for (const KeyVersion& v : key->versions) ours.insert(v.hsm_id);
    }
    for (const hsm::HsmObject& o : *objects) {
      if (o.object_class == CKO_SECRET_KEY &&
          o.label.rfind(kHsmLabelPrefix, 0) == 0 && ours.count(o.id) == 0) {
        CUSTOS_ASSERT_OK(hsm_->DestroyObjects(o.id).status());
      }
    }
  }
  // An object generated as an interrupted create leaves it: its intent
  // committed, no version.
  std::string InterruptedCreate(const std::string& key_id, Store* store) {
    absl::StatusOr<std::string> id = hsm_->NewObjectId();
    EXPECT_TRUE(id.ok());
    EXPECT_TRUE(store->InsertIntent({*id, key_id, 1, clock_.Now()}).ok());
    EXPECT_TRUE(hsm_->GenerateAesKey(*id, HsmLabel(key_id, 1)).ok());
    return *id;
  }
  std::string AuditText() {
    std::string all;
    for (const auto& line : AuditLines()) all += line + "\n";
    return all;
  }
};

// Runs KeyService::Reconcile on a thread of its own, started on
// construction and joined on destruction.
class BackgroundReconcile {
 public:
  explicit BackgroundReconcile(KeyService* service)
      : thread_([this, service] {
          result_ = service->Reconcile();
          done_.Notify();
        }) {}
  ~BackgroundReconcile() { thread_.join(); }

  bool FinishesWithin(absl::Duration timeout) {
    return done_.WaitForNotificationWithTimeout(timeout);
  }
  absl::StatusOr<MaintenanceReport> Result() {
    done_.WaitForNotification();
    return result_;
  }

 private:
  absl::Notification done_;
  absl::StatusOr<MaintenanceReport> result_ =
      absl::UnknownError("reconcile never ran");
  std::thread thread_;  // last: it uses the members above
};

// Passes records on to another log, and runs a hook (once) on the thread
// of the first call that appends a given operation's success record
// before committing, e.g. CreateKey's: after it generated its HSM object,
// before its row commits.
class HookedAuditLog : public AuditLog {
 public:
  HookedAuditLog(AuditLog* next, std::string operation,
                 std::function<void()> hook)
      : next_(next), operation_(std::move(operation)), hook_(std::move(hook)) {}

  void AppendAsync(AuditRecord record, AppendDone done) override {
    if (hook_ && record.operation == operation_ &&
        record.outcome == AuditOutcome::kAllowed) {
      std::exchange(hook_, {})();
    }
    next_->AppendAsync(std::move(record), std::move(done));
  }

 private:
  AuditLog* const next_;
  const std::string operation_;
  std::function<void()> hook_;
};

// How long a reconcile that does not wait for a creation in progress needs
// to list this token and destroy what it takes for an orphan (a few ms).
constexpr absl::Duration kReconcileRunsFreely = absl::Seconds(1);

// Passes every call on to another store, and runs a hook (once) on the
// thread of the first InsertKey, before passing it on: CreateKey's commit,
// after its HSM object was generated.
class HookedStore : public Store {
 public:
  HookedStore(Store* next, std::function<void()> hook)
      : next_(next), hook_(std::move(hook)) {}
  absl::StatusOr<std::vector<Key>> LoadAllKeys() override {
    return next_->LoadAllKeys();
  }
  absl::StatusOr<Key> LoadKey(absl::string_view id) override {
    return next_->LoadKey(id);
  }
  absl::Status InsertKey(const Key& key) override {
    if (hook_) std::exchange(hook_, nullptr)();
    if (!fail_before_.ok()) return fail_before_;
    absl::Status s = next_->InsertKey(key);
    if (s.ok() && !fail_after_.ok()) return fail_after_;
    return s;
  }
  // InsertKey fails without writing (a commit known to have failed).
  void FailBefore(absl::Status s) { fail_before_ = std::move(s); }
  // InsertKey writes, then reports `s` (a connection lost after COMMIT).
  void FailAfter(absl::Status s) { fail_after_ = std::move(s); }
  absl::StatusOr<Key> UpdateKey(absl::string_view id, Mutator mutate) override {
    return next_->UpdateKey(id, mutate);
  }
  absl::Status CreateAlias(const AliasRecord& alias) override {
    return next_->CreateAlias(alias);
  }
  absl::Status DeleteAlias(absl::string_view alias) override {
    return next_->DeleteAlias(alias);
  }
  absl::StatusOr<std::vector<AliasRecord>> ListAliases() override {
    return next_->ListAliases();
  }
  absl::StatusOr<std::optional<Deployment>> LoadDeployment() override {
    return next_->LoadDeployment();
  }
  absl::Status InsertDeployment(const Deployment& deployment) override {
    return next_->InsertDeployment(deployment);
  }
  absl::Status InsertIntent(const MaterialIntent& intent) override {
    return next_->InsertIntent(intent);
  }
  absl::StatusOr<std::vector<MaterialIntent>> ListIntents() override {
    return next_->ListIntents();
  }
  absl::Status DeleteIntent(absl::string_view hsm_id) override {
    return next_->DeleteIntent(hsm_id);
  }
  absl::StatusOr<bool> ClaimIntent(absl::string_view hsm_id) override {
    return next_->ClaimIntent(hsm_id);
  }
  int SchemaVersion() const override { return next_->SchemaVersion(); }

 private:
  Store* const next_;
  std::function<void()> hook_;
  absl::Status fail_before_, fail_after_;
};

// A create whose commit fails: its object is destroyed (recorded first) only
// when the database shows that no version owns it. One whose commit landed
// although the caller was told it failed keeps its material.
TEST_F(KeyServiceReconcileTest,
       FailedCommitDiscardsOnlyWhatTheDatabaseDisowns) {
  ClearOtherTestsObjects();
  HookedStore store(stack_->store.get(), nullptr);
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KeyRegistry> registry,
                              KeyRegistry::Load(&store));
  KeyService service(Options(), hsm_, registry.get(), stack_->audit.get(),
                     &authorizer_);
  auto custos_objects = [&]() -> std::set<std::string> {
    std::set<std::string> ids;
    absl::StatusOr<std::vector<hsm::HsmObject>> objects =
        hsm_->ListKeyObjects();
    EXPECT_TRUE(objects.ok());
    for (const auto& o : *objects) {
      if (o.label.rfind(kHsmLabelPrefix, 0) == 0 &&
          o.object_class == CKO_SECRET_KEY) {
        ids.insert(o.id);
      }
    }
    return ids;
  };
  const std::set<std::string> before = custos_objects();

  store.FailBefore(absl::UnavailableError("database is locked"));
  EXPECT_THAT(service.CreateKey(As(kAdmin), KeyParams()),
              StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ(custos_objects(), before) << "the uncommitted object remains";
  EXPECT_THAT(AuditText(), HasSubstr("its version was never committed"));

  store.FailBefore(absl::OkStatus());
  store.FailAfter(absl::UnavailableError("connection lost after COMMIT"));
  EXPECT_THAT(service.CreateKey(As(kAdmin), KeyParams()),
              StatusIs(absl::StatusCode::kUnavailable));
  const std::set<std::string> after = custos_objects();
  ASSERT_EQ(after.size(), before.size() + 1)
      << "the committed version's material was destroyed";
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::vector<Key> keys,
                              stack_->store->LoadAllKeys());
  std::set<std::string> named;
  for (const Key& k : keys) {
    for (const KeyVersion& v : k.versions) named.insert(v.hsm_id);
  }
  for (const std::string& id : after) {
    EXPECT_EQ(named.count(id), 1u) << hsm::ObjectIdHex(id);
  }
}

TEST_F(KeyServiceReconcileTest, KeyCreatedDuringAReconcileKeepsItsMaterial) {
  ClearOtherTestsObjects();
  // A service whose CreateKey starts a reconcile after generating the new
  // key's object and before committing its row, and gives that reconcile
  // every chance to finish first.
  std::unique_ptr<BackgroundReconcile> reconcile;
  bool finished_before_commit = false;
  KeyService* hooked_service = nullptr;
  HookedStore hooked_store(stack_->store.get(), [&] {
    reconcile = std::make_unique<BackgroundReconcile>(hooked_service);
    finished_before_commit = reconcile->FinishesWithin(kReconcileRunsFreely);
  });
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<KeyRegistry> registry,
                              KeyRegistry::Load(&hooked_store));
  KeyService hooked(Options(), hsm_, registry.get(), stack_->audit.get(),
                    &authorizer_);
  hooked_service = &hooked;

  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key,
                              hooked.CreateKey(As(kAdmin), KeyParams()));
  ASSERT_NE(reconcile, nullptr) << "the hook never ran";
  CUSTOS_ASSERT_OK_AND_ASSIGN(MaintenanceReport report, reconcile->Result());
  EXPECT_FALSE(finished_before_commit)
      << "the reconcile did not wait for the key's row to commit";
  EXPECT_EQ(report.orphans_destroyed, 0);
  EXPECT_EQ(report.destroyed_objects, 0);
  EXPECT_EQ(report.quarantined, 0);
  EXPECT_EQ(report.missing_objects, 0);
  CUSTOS_ASSERT_OK(stack_->registry->Refresh(key->id));  // made elsewhere
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(key->id, kContext));
  CUSTOS_EXPECT_OK(Open(dk.blob, kContext));
}

TEST_F(KeyServiceReconcileTest,
       VersionRotatedDuringAReconcileKeepsItsMaterial) {
  ClearOtherTestsObjects();
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult v1, DataKey(key->id, kContext));
  // RotateKey reads the clock when its audit record starts, then in
  // RotateFrom for the generate-intent, and again after generating the new
  // version's object and before committing its row: the reconcile starts
  // there.
  std::unique_ptr<BackgroundReconcile> reconcile;
  bool finished_before_commit = false;
  clock_.RunInsideCall(3, [&] {
    reconcile = std::make_unique<BackgroundReconcile>(&service());
    finished_before_commit = reconcile->FinishesWithin(kReconcileRunsFreely);
  });
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> rotated,
                              service().RotateKey(As(kAdmin), key->id));
  ASSERT_NE(reconcile, nullptr) << "the hook never ran";
  CUSTOS_ASSERT_OK_AND_ASSIGN(MaintenanceReport report, reconcile->Result());
  EXPECT_FALSE(finished_before_commit)
      << "the reconcile did not wait for the version's row to commit";
  EXPECT_EQ(report.orphans_destroyed, 0);
  EXPECT_EQ(report.destroyed_objects, 0);
  EXPECT_EQ(report.missing_objects, 0);
  ASSERT_EQ(rotated->primary_version, 2u);
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult v2, DataKey(key->id, kContext));
  EXPECT_EQ(v2.version, 2u);
  CUSTOS_EXPECT_OK(Open(v2.blob, kContext));
  CUSTOS_EXPECT_OK(Open(v1.blob, kContext));
}

TEST_F(KeyServiceReconcileTest,
       DestroysUncommittedIntentsAndQuarantinesObjectsNoRowNames) {
  ClearOtherTestsObjects();
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> other, NewKey());
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(key->id, kContext));
  const std::string garbage =
      InterruptedCreate("k-orphanaaaaaaaaaaaaaaaaaaa", stack_->store.get());
  CUSTOS_ASSERT_OK_AND_ASSIGN(
      std::string unnamed,
      hsm_->GenerateAesKey(HsmLabel("k-unnamedaaaaaaaaaaaaaaaaaa", 1)));
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string foreign,
                              hsm_->GenerateAesKey("another-app:key"));

  // With an object no row names, even the garbage waits: the database
  // might be an older backup whose intent a newer one committed.
  CUSTOS_ASSERT_OK_AND_ASSIGN(MaintenanceReport report, service().Reconcile());
  EXPECT_EQ(report.orphans_destroyed, 0);
  EXPECT_EQ(report.orphans_waiting, 1);
  EXPECT_EQ(report.quarantined, 1);
  EXPECT_FALSE(report.refused);
  EXPECT_EQ(report.missing_objects, 0);
  EXPECT_EQ(report.failures, 0);
  EXPECT_EQ(service().quarantined_objects(), 1);
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::vector<hsm::HsmObject> objects,
                              hsm_->ListKeyObjects());
  EXPECT_THAT(HsmIds(objects), ::testing::Contains(garbage));
  EXPECT_THAT(HsmIds(objects), ::testing::Contains(unnamed));
  EXPECT_THAT(AuditText(), HasSubstr("\"QuarantineHsmObjects\""));
  EXPECT_THAT(AuditText(), HasSubstr(hsm::ObjectIdHex(unnamed)));

  // The operator settles the quarantine; then the garbage goes.
  CUSTOS_ASSERT_OK(hsm_->DestroyObjects(unnamed).status());
  CUSTOS_ASSERT_OK_AND_ASSIGN(report, service().Reconcile());
  EXPECT_EQ(report.orphans_destroyed, 1);
  EXPECT_EQ(report.destroyed_objects, 1);
  EXPECT_EQ(report.quarantined, 0);
  EXPECT_EQ(service().quarantined_objects(), 0);
  CUSTOS_ASSERT_OK_AND_ASSIGN(objects, hsm_->ListKeyObjects());
  EXPECT_THAT(HsmIds(objects), ::testing::Not(::testing::Contains(garbage)));
  EXPECT_THAT(HsmIds(objects), ::testing::Contains(foreign));
  EXPECT_THAT(HsmIds(objects), ::testing::Contains(key->versions[0].hsm_id));
  CUSTOS_EXPECT_OK(Open(dk.blob, kContext));
  // The destruction and the quarantine are both in the audit log, and the
  // garbage's intent is gone.
  const std::string audit = AuditText();
  EXPECT_THAT(audit, HasSubstr("\"DestroyHsmObject\""));
  EXPECT_THAT(audit, HasSubstr(hsm::ObjectIdHex(garbage)));
  // The garbage's intent stays claimed, a tombstone no commit can name.
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::vector<MaterialIntent> intents,
                              stack_->store->ListIntents());
  ASSERT_EQ(intents.size(), 1u);
  EXPECT_TRUE(intents[0].claimed);
  // Running it again destroys nothing more.
  CUSTOS_ASSERT_OK_AND_ASSIGN(MaintenanceReport again, service().Reconcile());
  EXPECT_EQ(again.destroyed_objects, 0);
  CUSTOS_EXPECT_OK(hsm_->DestroyObjects(foreign).status());
}

// When most Custos objects on the token are named by no row (the wrong
// database, an older backup), nothing at all is destroyed, not even what
// the database calls garbage.
TEST_F(KeyServiceReconcileTest, RefusesToActWhenMostObjectsAreUnnamed) {
  ClearOtherTestsObjects();
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  const std::string garbage =
      InterruptedCreate("k-orphancccccccccccccccccccc", stack_->store.get());
  std::vector<std::string> unnamed;
  for (int i = 0; i < 3; ++i) {
    CUSTOS_ASSERT_OK_AND_ASSIGN(
        std::string id,
        hsm_->GenerateAesKey(HsmLabel("k-unnamedbbbbbbbbbbbbbbbbbb", i + 1)));
    unnamed.push_back(id);
  }
  CUSTOS_ASSERT_OK_AND_ASSIGN(MaintenanceReport report, service().Reconcile());
  EXPECT_TRUE(report.refused);
  EXPECT_EQ(report.quarantined, 3);
  EXPECT_EQ(report.destroyed_objects, 0);
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::vector<hsm::HsmObject> objects,
                              hsm_->ListKeyObjects());
  EXPECT_THAT(HsmIds(objects), ::testing::Contains(garbage));
  EXPECT_THAT(AuditText(), ::testing::Not(HasSubstr("\"DestroyHsmObject\"")));
  for (const std::string& id : unnamed) {
    CUSTOS_EXPECT_OK(hsm_->DestroyObjects(id).status());
  }
  // With the pairing sane again, the garbage goes.
  CUSTOS_ASSERT_OK_AND_ASSIGN(MaintenanceReport after, service().Reconcile());
  EXPECT_FALSE(after.refused);
  EXPECT_EQ(after.orphans_destroyed, 1);
}

// An audit log that cannot record the destruction stops it: the object
// stays (and is destroyed by a later pass that can record it).
TEST_F(KeyServiceReconcileTest, NoDestructionWithoutItsAuditRecord) {
  ClearOtherTestsObjects();
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  const std::string garbage =
      InterruptedCreate("k-orphandddddddddddddddddddd", stack_->store.get());
  FailingAuditLog failing;
  KeyService refusing(Options(), hsm_, stack_->registry.get(), &failing,
                      &authorizer_);
  CUSTOS_ASSERT_OK_AND_ASSIGN(MaintenanceReport report, refusing.Reconcile());
  EXPECT_EQ(report.destroyed_objects, 0);
  EXPECT_EQ(report.failures, 1);
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::vector<hsm::HsmObject> objects,
                              hsm_->ListKeyObjects());
  EXPECT_THAT(HsmIds(objects), ::testing::Contains(garbage));
  CUSTOS_ASSERT_OK_AND_ASSIGN(MaintenanceReport later, service().Reconcile());
  EXPECT_EQ(later.orphans_destroyed, 1);
}

// With replicas (orphan_grace > 0), the object of an intent with no version
// is destroyed only once the intent is that old: another replica may have
// generated it and be about to commit its row.
TEST_F(KeyServiceReconcileTest, OrphanGraceWaitsBeforeDestroying) {
  ClearOtherTestsObjects();
  KeyService::Options options = Options();
  options.orphan_grace = absl::Minutes(10);
  const std::string shared = dir_ + "/shared";
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Stack> a,
                              OpenStack(shared, options, dir_ + "/audit-a"));
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Stack> b,
                              OpenStack(shared, options, dir_ + "/audit-b"));
  const std::string orphan =
      InterruptedCreate("k-orphanbbbbbbbbbbbbbbbbbbb", a->store.get());
  // Replica b makes a key that a's cache has not seen yet.
  CUSTOS_ASSERT_OK_AND_ASSIGN(
      std::shared_ptr<const Key> key,
      b->service->CreateKey(As(kAdmin), KeyParams(SvcAPolicy())));

  // b's object is neither waiting nor quarantined: a asks the database,
  // not its stale cache, whether a version owns it.
  CUSTOS_ASSERT_OK_AND_ASSIGN(MaintenanceReport first, a->service->Reconcile());
  EXPECT_EQ(first.orphans_waiting, 1);
  EXPECT_EQ(first.quarantined, 0);
  EXPECT_EQ(first.destroyed_objects, 0);
  clock_.Advance(absl::Minutes(9));
  CUSTOS_ASSERT_OK_AND_ASSIGN(MaintenanceReport early, a->service->Reconcile());
  EXPECT_EQ(early.orphans_waiting, 1);
  EXPECT_EQ(early.destroyed_objects, 0);

  // Past the grace, with a's cache still not knowing b's key.
  clock_.Advance(absl::Minutes(2));
  CUSTOS_ASSERT_OK_AND_ASSIGN(MaintenanceReport late, a->service->Reconcile());
  EXPECT_EQ(late.orphans_waiting, 0);
  EXPECT_EQ(late.quarantined, 0);
  EXPECT_EQ(late.orphans_destroyed, 1);
  CUSTOS_ASSERT_OK(a->registry->Refresh(key->id));
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::vector<hsm::HsmObject> objects,
                              hsm_->ListKeyObjects());
  EXPECT_THAT(HsmIds(objects), ::testing::Not(::testing::Contains(orphan)));
  EXPECT_THAT(HsmIds(objects), ::testing::Contains(key->versions[0].hsm_id));
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> seen,
                              a->service->GetKey(As(kAdmin), key->id));
  EXPECT_EQ(seen->versions.size(), 1u);
}

TEST_F(KeyServiceReconcileTest, ReportsAVersionWhoseObjectIsMissing) {
  ClearOtherTestsObjects();
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  CUSTOS_ASSERT_OK(hsm_->DestroyObjects(key->versions[0].hsm_id));
  CUSTOS_ASSERT_OK_AND_ASSIGN(MaintenanceReport report, service().Reconcile());
  EXPECT_EQ(report.missing_objects, 1);
  EXPECT_EQ(report.orphans_destroyed, 0);
}

// ---------------------------------------------------------------------------
// 9. Fail closed when the audit log cannot write.

class KeyServiceFailClosedTest : public KeyServiceTest {
 protected:
  void TearDown() override {
    full_.reset();
    if (!mount_point_.empty()) umount2(mount_point_.c_str(), MNT_DETACH);
    KeyServiceTest::TearDown();
  }

  // A second service over the main registry whose audit log lives on a
  // 64 KiB tmpfs, then filled so that the next record cannot be written.
  void OpenServiceWithFullAuditDisk() {
    mount_point_ = dir_ + "/tiny";
    std::filesystem::create_directories(mount_point_);
    if (mount("tmpfs", mount_point_.c_str(), "tmpfs", 0, "size=64k") != 0) {
      const std::string why = std::strerror(errno);
      mount_point_.clear();
      GTEST_SKIP() << "cannot mount a tmpfs to fill (" << why
                   << "); needs root with CAP_SYS_ADMIN";
    }
    FileAuditLog::Options options;
    options.dir = mount_point_ + "/audit";
    options.node_id = "custos-test";
    auto audit = FileAuditLog::Open(options);
    ASSERT_TRUE(audit.ok()) << audit.status();
    full_audit_ = *std::move(audit);
    full_ =
        std::make_unique<KeyService>(Options(), hsm_, stack_->registry.get(),
                                     full_audit_.get(), &authorizer_);
    filler_ = mount_point_ + "/filler";
    int fd = open(filler_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ASSERT_GE(fd, 0);
    const std::string block(4096, 'f');
    while (write(fd, block.data(), block.size()) > 0) {
    }
    const std::string byte(1, 'f');
    while (write(fd, byte.data(), 1) > 0) {
    }
    EXPECT_EQ(errno, ENOSPC);
    close(fd);
  }
  void FreeAuditDisk() { ASSERT_EQ(unlink(filler_.c_str()), 0); }

  std::string mount_point_, filler_;
  std::unique_ptr<FileAuditLog> full_audit_;
  std::unique_ptr<KeyService> full_;
};

TEST_F(KeyServiceFailClosedTest, FullAuditDiskRefusesDataKeysUntilFreed) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  OpenServiceWithFullAuditDisk();
  if (IsSkipped() || HasFatalFailure()) return;
  DataKeyParams params;
  params.key = key->id;
  params.context = kContext;
  absl::StatusOr<DataKeyResult> refused =
      full_->GenerateDataKey(As(kSvcA), params);
  EXPECT_THAT(refused, StatusIs(Code::kUnavailable, HasSubstr("audit")));
  EXPECT_FALSE(refused.ok());  // no data key comes back
  EXPECT_THAT(full_->GenerateRandom(As(kSvcA), 16),
              StatusIs(Code::kUnavailable));
  DecryptParams decrypt;
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(key->id, kContext));
  decrypt.blob = dk.blob;
  decrypt.context = kContext;
  EXPECT_THAT(full_->Decrypt(As(kSvcA), decrypt), StatusIs(Code::kUnavailable));

  FreeAuditDisk();
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult granted,
                              full_->GenerateDataKey(As(kSvcA), params));
  EXPECT_EQ(granted.plaintext.size(), 32u);
  CUSTOS_ASSERT_OK_AND_ASSIGN(DecryptResult opened,
                              full_->Decrypt(As(kSvcA), decrypt));
  EXPECT_TRUE(opened.plaintext.Equals(dk.plaintext.view()));
  // Only the calls that were answered are on record, in one whole chain.
  std::vector<std::string> lines = ReadLines(full_audit_->segment_path());
  ASSERT_EQ(lines.size(), 2u);
  ExpectChainIsWhole(lines);
  EXPECT_EQ(nlohmann::json::parse(lines[0])["operation"], "GenerateDataKey");
  EXPECT_EQ(nlohmann::json::parse(lines[1])["operation"], "Decrypt");
}

// BUG (kms/audit_scope.h, KeyService::Audit::Run, with every mutating RPC
// in kms/key_admin.cc): the change is committed first and audited after, so
// when the record cannot be written the caller hears UNAVAILABLE but the
// change stands, with no record of it. A malicious admin who fills the
// audit disk can rewrite a key policy (grant itself DECRYPT) unaudited.
TEST_F(KeyServiceFailClosedTest, RefusedAdminChangeIsNotApplied) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  OpenServiceWithFullAuditDisk();
  if (IsSkipped() || HasFatalFailure()) return;
  KeyPolicy grab = SvcAPolicy();
  grab.bindings[0].principals.push_back(kAdmin);
  EXPECT_THAT(full_->SetKeyPolicy(As(kAdmin), key->id, grab, 1),
              StatusIs(Code::kUnavailable));
  EXPECT_THAT(full_->ScheduleKeyDeletion(As(kAdmin), key->id, 7),
              StatusIs(Code::kUnavailable));
  FreeAuditDisk();
  CUSTOS_ASSERT_OK_AND_ASSIGN(KeyPolicy policy,
                              service().GetKeyPolicy(As(kAdmin), key->id));
  EXPECT_EQ(policy.version, 1u) << "an unaudited policy change took effect";
  EXPECT_THAT(DataKey(key->id, kContext, 32, kAdmin).status(),
              StatusIs(kDenied))
      << "the admin granted itself use of the key, unaudited";
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> after,
                              service().GetKey(As(kAdmin), key->id));
  EXPECT_EQ(after->state, KeyState::kEnabled)
      << "an unaudited deletion was scheduled";
}

// ---------------------------------------------------------------------------
// 10. Key policies.

class KeyServicePolicyTest : public KeyServiceTest {
 protected:
  static KeyPolicy PolicyWith(PolicyBinding binding) {
    if (binding.operations.empty()) {
      binding.operations.assign(std::begin(kAllOperations),
                                std::end(kAllOperations));
    }
    KeyPolicy policy;
    policy.bindings.push_back(std::move(binding));
    return policy;
  }
};

TEST_F(KeyServicePolicyTest, StaleExpectedVersionIsAborted) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key, NewKey());
  EXPECT_EQ(key->policy.version, 1u);
  KeyPolicy next = SvcAPolicy();
  next.bindings[0].principals.push_back(kSvcB);
  CUSTOS_ASSERT_OK_AND_ASSIGN(
      KeyPolicy set, service().SetKeyPolicy(As(kAdmin), key->id, next, 1));
  EXPECT_EQ(set.version, 2u);
  EXPECT_THAT(service().SetKeyPolicy(As(kAdmin), key->id, SvcAPolicy(), 1),
              StatusIs(Code::kAborted));
  CUSTOS_ASSERT_OK_AND_ASSIGN(KeyPolicy now,
                              service().GetKeyPolicy(As(kAdmin), key->id));
  EXPECT_EQ(now.version, 2u);
  EXPECT_EQ(now.bindings, next.bindings);
  CUSTOS_EXPECT_OK(DataKey(key->id, kContext, 32, kSvcB));
}

TEST_F(KeyServicePolicyTest, GlobPrincipalAllowsEveryMatchingService) {
  PolicyBinding binding;
  binding.principals = {"spiffe://t/svc-*"};
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key,
                              NewKey(PolicyWith(binding)));
  CUSTOS_EXPECT_OK(DataKey(key->id, kContext, 32, kSvcA));
  CUSTOS_EXPECT_OK(DataKey(key->id, kContext, 32, kSvcB));
  for (const std::string& who :
       {std::string(kAdmin), std::string(kAuditor),
        std::string("spiffe://t/svc"), std::string("spiffe://u/svc-a")}) {
    SCOPED_TRACE(who);
    EXPECT_THAT(DataKey(key->id, kContext, 32, who), StatusIs(kDenied));
  }
}

TEST_F(KeyServicePolicyTest, RequiredContextIsEnforced) {
  PolicyBinding binding;
  binding.principals = {kSvcA};
  binding.required_context = {{"tenant", "acme"}, {"env", "prod-*"}};
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key,
                              NewKey(PolicyWith(binding)));
  const EncryptionContext good = {
      {"tenant", "acme"}, {"env", "prod-eu"}, {"extra", "fine"}};
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk, DataKey(key->id, good));
  CUSTOS_EXPECT_OK(Open(dk.blob, good));
  const struct {
    const char* name;
    EncryptionContext context;
  } refused[] = {
      {"none", {}},
      {"one missing", {{"tenant", "acme"}}},
      {"wrong value", {{"tenant", "evil"}, {"env", "prod-eu"}}},
      {"pattern miss", {{"tenant", "acme"}, {"env", "staging"}}},
      {"re-cased key", {{"Tenant", "acme"}, {"env", "prod-eu"}}},
      {"caller's star is literal", {{"tenant", "*"}, {"env", "prod-eu"}}},
  };
  for (const auto& c : refused) {
    SCOPED_TRACE(c.name);
    EXPECT_THAT(DataKey(key->id, c.context), StatusIs(kDenied));
    EXPECT_THAT(Seal(key->id, "x", c.context), StatusIs(kDenied));
  }
}

TEST_F(KeyServicePolicyTest, RequiredJustificationIsEnforced) {
  PolicyBinding binding;
  binding.principals = {kSvcA};
  binding.require_justification = true;
  binding.allowed_reasons = {JustificationReason::kCustomerInitiatedAccess};
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Key> key,
                              NewKey(PolicyWith(binding)));
  DataKeyParams params;
  params.key = key->id;
  EXPECT_THAT(service().GenerateDataKey(As(kSvcA), params), StatusIs(kDenied));
  params.justification.present = true;
  params.justification.value.reason = JustificationReason::kUnspecified;
  EXPECT_THAT(service().GenerateDataKey(As(kSvcA), params), StatusIs(kDenied));
  params.justification.value.reason =
      JustificationReason::kProviderInitiatedReview;
  EXPECT_THAT(service().GenerateDataKey(As(kSvcA), params), StatusIs(kDenied));
  params.justification.value.reason =
      JustificationReason::kCustomerInitiatedAccess;
  params.justification.value.detail = "ticket 42";
  CUSTOS_ASSERT_OK_AND_ASSIGN(DataKeyResult dk,
                              service().GenerateDataKey(As(kSvcA), params));
  DecryptParams decrypt;
  decrypt.blob = dk.blob;
  EXPECT_THAT(service().Decrypt(As(kSvcA), decrypt), StatusIs(kDenied));
  decrypt.justification = params.justification;
  CUSTOS_EXPECT_OK(service().Decrypt(As(kSvcA), decrypt));
  // The justification is on record.
  nlohmann::json last = nlohmann::json::parse(AuditLines().back());
  EXPECT_EQ(last["justification"]["reason"], "CUSTOMER_INITIATED_ACCESS");
}

}  // namespace
}  // namespace custos::kms
