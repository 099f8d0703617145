// The hsm/ layer against a real SoftHSM2 token in a temporary directory.
#include "hsm/hsm.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/p256.h"
#include "common/status_macros.h"
#include "common/testing/status_matchers.h"
#include "hsm/attribute_template.h"
#include "hsm/ck_status.h"
#include "hsm/key_templates.h"
#include "hsm/module.h"
#include "hsm/session.h"
#include "tests/support/test_token.h"

namespace custos::hsm {
namespace {

using ::custos::testing::IsOk;
using ::custos::testing::StatusIs;
using ::testing::HasSubstr;

class HsmTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto token = custos::testing::TestToken::Create();
    ASSERT_TRUE(token.ok()) << token.status();
    token_ = token->release();
    auto module = Module::Load(custos::testing::kSoftHsmModule);
    ASSERT_TRUE(module.ok()) << module.status();
    module_ = module->release();
    Hsm::Options options;
    options.token_label = token_->label();
    options.pin_file = token_->pin_file();
    options.pool.size = 4;
    auto hsm = Hsm::Open(*module_, options);
    ASSERT_TRUE(hsm.ok()) << hsm.status();
    hsm_ = hsm->release();
  }
  static void TearDownTestSuite() {
    delete hsm_;
    delete module_;
    delete token_;
  }

  // A raw session of the test's own, for calls Custos itself never makes.
  static Session RawSession() {
    auto slot = module_->FindSlotByTokenLabel(token_->label());
    EXPECT_TRUE(slot.ok());
    auto session = Session::Open(module_->fn(), *slot);
    EXPECT_TRUE(session.ok());
    EXPECT_TRUE(session->Login(SecretBytes::CopyOf(token_->user_pin())).ok());
    return *std::move(session);
  }
  static CK_OBJECT_HANDLE Find(Session& s, const std::string& id,
                               CK_OBJECT_CLASS cls = CKO_SECRET_KEY) {
    AttributeTemplate query;
    query.Ulong(CKA_CLASS, cls).Bytes(CKA_ID, id);
    auto found = s.FindObjects(query, 2);
    EXPECT_TRUE(found.ok());
    EXPECT_EQ(found->size(), 1u);
    return found->empty() ? CK_INVALID_HANDLE : found->front();
  }

  static custos::testing::TestToken* token_;
  static Module* module_;
  static Hsm* hsm_;
};
custos::testing::TestToken* HsmTest::token_ = nullptr;
Module* HsmTest::module_ = nullptr;
Hsm* HsmTest::hsm_ = nullptr;

TEST_F(HsmTest, GeneratedKeyPassesVerificationAndHasA16ByteId) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string id,
                              hsm_->GenerateAesKey("k-test/v1"));
  EXPECT_EQ(id.size(), kObjectIdSize);
  EXPECT_THAT(hsm_->VerifyAesKey(id), IsOk());
}

TEST_F(HsmTest, CmkValueCannotBeRead) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string id, hsm_->GenerateAesKey("read"));
  Session s = RawSession();
  CK_OBJECT_HANDLE key = Find(s, id);
  unsigned char value[64];
  CK_ATTRIBUTE attr = {CKA_VALUE, value, sizeof(value)};
  EXPECT_EQ(s.fn()->C_GetAttributeValue(s.handle(), key, &attr, 1),
            CKR_ATTRIBUTE_SENSITIVE);
  EXPECT_EQ(attr.ulValueLen, CK_UNAVAILABLE_INFORMATION);
}

TEST_F(HsmTest, CmkCannotBeWrappedUnderAnyKey) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string id, hsm_->GenerateAesKey("wrap"));
  Session s = RawSession();
  CK_OBJECT_HANDLE cmk = Find(s, id);
  // A wrapping key the attacker controls (session object, WRAP allowed).
  AttributeTemplate wrapper;
  wrapper.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_AES)
      .Ulong(CKA_VALUE_LEN, 32)
      .Bool(CKA_TOKEN, false)
      .Bool(CKA_WRAP, true)
      .Bool(CKA_EXTRACTABLE, true);
  CUSTOS_ASSERT_OK_AND_ASSIGN(CK_OBJECT_HANDLE wrapping_key,
                              s.GenerateKey(CKM_AES_KEY_GEN, wrapper));
  // The two wrapping mechanisms SoftHSM supports (docs/hsm.md, "SoftHSM2's
  // behaviour the code depends on") refuse the CMK because it is not
  // extractable.
  for (CK_MECHANISM_TYPE mech : {CKM_AES_KEY_WRAP, CKM_AES_KEY_WRAP_PAD}) {
    CK_MECHANISM m = {mech, nullptr, 0};
    unsigned char out[256];
    CK_ULONG out_len = sizeof(out);
    EXPECT_EQ(
        s.fn()->C_WrapKey(s.handle(), &m, wrapping_key, cmk, out, &out_len),
        CKR_KEY_UNEXTRACTABLE)
        << "mechanism 0x" << std::hex << mech;
  }
  // And the CMK cannot wrap anything itself (it has no CKA_WRAP).
  CK_MECHANISM m = {CKM_AES_KEY_WRAP_PAD, nullptr, 0};
  unsigned char out[256];
  CK_ULONG out_len = sizeof(out);
  EXPECT_EQ(s.fn()->C_WrapKey(s.handle(), &m, cmk, wrapping_key, out, &out_len),
            CKR_KEY_FUNCTION_NOT_PERMITTED);
}

TEST_F(HsmTest, CmkAttributesCannotBeWeakened) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string id, hsm_->GenerateAesKey("mod"));
  Session s = RawSession();
  CK_OBJECT_HANDLE key = Find(s, id);
  CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
  CK_ATTRIBUTE extractable = {CKA_EXTRACTABLE, &yes, sizeof(yes)};
  CK_ATTRIBUTE sensitive = {CKA_SENSITIVE, &no, sizeof(no)};
  EXPECT_NE(s.fn()->C_SetAttributeValue(s.handle(), key, &extractable, 1),
            CKR_OK);
  EXPECT_NE(s.fn()->C_SetAttributeValue(s.handle(), key, &sensitive, 1),
            CKR_OK);
  EXPECT_THAT(hsm_->VerifyAesKey(id), IsOk());
}

TEST_F(HsmTest, PkcsToolListsTheCmkWithItsFlags) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string id,
                              hsm_->GenerateAesKey("pkcs11-tool-check"));
  auto result = custos::testing::RunCommand(absl::StrCat(
      "pkcs11-tool --module ", custos::testing::kSoftHsmModule,
      " --token-label ", token_->label(), " --login --pin ", token_->user_pin(),
      " --list-objects --type secrkey --id ", absl::BytesToHexString(id)));
  ASSERT_EQ(result.exit_code, 0) << result.output;
  // pkcs11-tool lists every secret key; take the block of ours.
  size_t at = result.output.find("label:      pkcs11-tool-check");
  ASSERT_NE(at, std::string::npos) << result.output;
  size_t begin = result.output.rfind("Secret Key Object", at);
  size_t end = result.output.find("Secret Key Object", at);
  std::string block = result.output.substr(begin, end - begin);
  EXPECT_THAT(block, HasSubstr("AES length 32"));
  EXPECT_THAT(block, HasSubstr(absl::StrCat("ID:         ",
                                            absl::BytesToHexString(id))));
  EXPECT_THAT(block, HasSubstr("Usage:      encrypt, decrypt\n"));
  EXPECT_THAT(block, HasSubstr("Access:     sensitive, always sensitive, never "
                               "extractable, local"));
}

// Keys made outside Custos with a weaker template must never be used.
struct WeakCase {
  const char* name;
  CK_ATTRIBUTE_TYPE attr;
  bool value;
  const char* expected;
};

class WeakKeyTest : public HsmTest,
                    public ::testing::WithParamInterface<WeakCase> {};

TEST_P(WeakKeyTest, KeyWithWeakerTemplateIsRefused) {
  const WeakCase& c = GetParam();
  Session s = RawSession();
  std::string id = absl::StrCat("weak-", c.name);
  AttributeTemplate t;
  t.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_AES)
      .Ulong(CKA_VALUE_LEN, 32)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_ENCRYPT, true)
      .Bool(CKA_DECRYPT, true)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, false)
      .Bool(CKA_WRAP, false)
      .Bool(CKA_UNWRAP, false)
      .Bool(CKA_DERIVE, false)
      .Bool(CKA_MODIFIABLE, false)
      .Bool(c.attr, c.value)  // later duplicate: the weakened attribute
      .Bytes(CKA_ID, id);
  // Drop the earlier entry of the same type so the template is consistent.
  AttributeTemplate clean;
  for (CK_ULONG i = 0; i < t.size(); ++i) {
    const CK_ATTRIBUTE& a = t.data()[i];
    bool last_of_type = true;
    for (CK_ULONG j = i + 1; j < t.size(); ++j) {
      if (t.data()[j].type == a.type) last_of_type = false;
    }
    if (!last_of_type) continue;
    if (a.ulValueLen == sizeof(CK_BBOOL)) {
      clean.Bool(a.type, *static_cast<CK_BBOOL*>(a.pValue));
    } else if (a.type == CKA_ID) {
      clean.Bytes(a.type, id);
    } else {
      clean.Ulong(a.type, *static_cast<CK_ULONG*>(a.pValue));
    }
  }
  CUSTOS_ASSERT_OK_AND_ASSIGN(CK_OBJECT_HANDLE key,
                              s.GenerateKey(CKM_AES_KEY_GEN, clean));
  (void)key;
  EXPECT_THAT(
      hsm_->VerifyAesKey(id),
      StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr(c.expected)));
  EXPECT_THAT(hsm_->EncryptAesGcm(id, "", "data"),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

INSTANTIATE_TEST_SUITE_P(
    Table, WeakKeyTest,
    ::testing::Values(
        WeakCase{"extractable", CKA_EXTRACTABLE, true,
                 "CKA_EXTRACTABLE is true (must be false)"},
        WeakCase{"not_sensitive", CKA_SENSITIVE, false,
                 "CKA_SENSITIVE is false (must be true)"},
        WeakCase{"wrap", CKA_WRAP, true, "CKA_WRAP is true (must be false)"},
        WeakCase{"unwrap", CKA_UNWRAP, true,
                 "CKA_UNWRAP is true (must be false)"},
        WeakCase{"derive", CKA_DERIVE, true,
                 "CKA_DERIVE is true (must be false)"},
        WeakCase{"sign", CKA_SIGN, true, "CKA_SIGN is true (must be false)"},
        WeakCase{"modifiable", CKA_MODIFIABLE, true,
                 "CKA_MODIFIABLE is true (must be false)"}),
    [](const auto& p) { return std::string(p.param.name); });

TEST_F(HsmTest, ImportedKeyIsNotLocalAndIsRefused) {
  Session s = RawSession();
  std::string value(32, '\x42');
  AttributeTemplate t;
  t.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_AES)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, false)
      .Bool(CKA_ENCRYPT, true)
      .Bool(CKA_DECRYPT, true)
      .Bool(CKA_MODIFIABLE, false)
      .Bytes(CKA_VALUE, value)
      .Bytes(CKA_ID, "imported");
  CK_OBJECT_HANDLE h;
  ASSERT_EQ(s.fn()->C_CreateObject(s.handle(), t.data(), t.size(), &h), CKR_OK);
  EXPECT_THAT(hsm_->VerifyAesKey("imported"),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("CKA_LOCAL is false (must be true)")));
}

TEST_F(HsmTest, GcmRoundTripAndFreshIvs) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string id, hsm_->GenerateAesKey("gcm"));
  std::string data_key(32, '\x07');
  CUSTOS_ASSERT_OK_AND_ASSIGN(GcmSealed a,
                              hsm_->EncryptAesGcm(id, "aad", data_key));
  CUSTOS_ASSERT_OK_AND_ASSIGN(GcmSealed b,
                              hsm_->EncryptAesGcm(id, "aad", data_key));
  EXPECT_EQ(a.iv.size(), kGcmIvSize);
  EXPECT_EQ(a.ciphertext.size(), 32 + kGcmTagSize);
  EXPECT_NE(a.iv, b.iv);
  EXPECT_NE(a.ciphertext, b.ciphertext);
  CUSTOS_ASSERT_OK_AND_ASSIGN(
      SecretBytes opened, hsm_->DecryptAesGcm(id, a.iv, "aad", a.ciphertext));
  EXPECT_TRUE(opened.Equals(data_key));
  // Empty AAD and empty plaintext work too.
  CUSTOS_ASSERT_OK_AND_ASSIGN(GcmSealed c, hsm_->EncryptAesGcm(id, "", ""));
  CUSTOS_ASSERT_OK_AND_ASSIGN(SecretBytes empty,
                              hsm_->DecryptAesGcm(id, c.iv, "", c.ciphertext));
  EXPECT_EQ(empty.size(), 0u);
}

TEST_F(HsmTest, EveryFlippedBitInCiphertextTagIvOrAadFails) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string id, hsm_->GenerateAesKey("flip"));
  const std::string aad = "key=k-1;v=1";
  CUSTOS_ASSERT_OK_AND_ASSIGN(
      GcmSealed sealed, hsm_->EncryptAesGcm(id, aad, std::string(32, 'k')));
  auto refused = [&](const std::string& iv, const std::string& a,
                     const std::string& ct) {
    return !hsm_->DecryptAesGcm(id, iv, a, ct).ok();
  };
  int tried = 0;
  for (size_t bit = 0; bit < sealed.ciphertext.size() * 8; ++bit) {
    std::string ct = sealed.ciphertext;
    ct[bit / 8] ^= static_cast<char>(1 << (bit % 8));
    EXPECT_TRUE(refused(sealed.iv, aad, ct)) << "ciphertext/tag bit " << bit;
    ++tried;
  }
  for (size_t bit = 0; bit < sealed.iv.size() * 8; ++bit) {
    std::string iv = sealed.iv;
    iv[bit / 8] ^= static_cast<char>(1 << (bit % 8));
    EXPECT_TRUE(refused(iv, aad, sealed.ciphertext)) << "iv bit " << bit;
    ++tried;
  }
  for (size_t bit = 0; bit < aad.size() * 8; ++bit) {
    std::string a = aad;
    a[bit / 8] ^= static_cast<char>(1 << (bit % 8));
    EXPECT_TRUE(refused(sealed.iv, a, sealed.ciphertext)) << "aad bit " << bit;
    ++tried;
  }
  EXPECT_EQ(tried, (48 + 12 + 11) * 8);
  // Failed tag checks do not cost sessions, and the pool still opens blobs.
  EXPECT_EQ(hsm_->pool_stats().resets, 0u);
  CUSTOS_ASSERT_OK_AND_ASSIGN(
      SecretBytes opened,
      hsm_->DecryptAesGcm(id, sealed.iv, aad, sealed.ciphertext));
  EXPECT_TRUE(opened.Equals(std::string(32, 'k')));
  // The refusal is the authentication failure, not a device fault.
  std::string ct = sealed.ciphertext;
  ct.back() ^= 1;
  EXPECT_THAT(hsm_->DecryptAesGcm(id, sealed.iv, aad, ct),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "AES-GCM authentication failed"));
  // Truncated tag, wrong IV length, other key.
  EXPECT_THAT(
      hsm_->DecryptAesGcm(id, sealed.iv, aad, sealed.ciphertext.substr(0, 40)),
      StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(
      hsm_->DecryptAesGcm(id, sealed.iv.substr(0, 8), aad, sealed.ciphertext),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("IV")));
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string other, hsm_->GenerateAesKey("other"));
  EXPECT_THAT(hsm_->DecryptAesGcm(other, sealed.iv, aad, sealed.ciphertext),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(HsmTest, UnknownKeyIdIsNotFound) {
  EXPECT_THAT(hsm_->EncryptAesGcm(std::string(16, '\0'), "", "x"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("CKA_ID")));
}

TEST_F(HsmTest, GenerateRandomGivesDistinctBytesOfTheAskedSize) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(SecretBytes a, hsm_->GenerateRandom(32));
  CUSTOS_ASSERT_OK_AND_ASSIGN(SecretBytes b, hsm_->GenerateRandom(32));
  EXPECT_EQ(a.size(), 32u);
  EXPECT_FALSE(a.Equals(b.view()));
  CUSTOS_ASSERT_OK_AND_ASSIGN(SecretBytes big, hsm_->GenerateRandom(1024));
  EXPECT_EQ(big.size(), 1024u);
}

TEST_F(HsmTest, DestroyRemovesTheKeyAndIsIdempotent) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string id, hsm_->GenerateAesKey("doomed"));
  CUSTOS_ASSERT_OK_AND_ASSIGN(GcmSealed sealed,
                              hsm_->EncryptAesGcm(id, "", "x"));
  EXPECT_THAT(hsm_->DestroyObjects(id), ::custos::testing::IsOkAndHolds(1));
  EXPECT_THAT(hsm_->DecryptAesGcm(id, sealed.iv, "", sealed.ciphertext),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(hsm_->DestroyObjects(id), ::custos::testing::IsOkAndHolds(0));
}

TEST_F(HsmTest, ListKeyObjectsShowsGeneratedKeys) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string id, hsm_->GenerateAesKey("listed"));
  CUSTOS_ASSERT_OK_AND_ASSIGN(auto objects, hsm_->ListKeyObjects());
  bool seen = false;
  for (const auto& o : objects) {
    if (o.id == id) {
      seen = true;
      EXPECT_EQ(o.label, "listed");
      EXPECT_EQ(o.object_class, CKO_SECRET_KEY);
    }
  }
  EXPECT_TRUE(seen);
}

// ListKeyObjects reads CKA_ID and CKA_LABEL in one call with a first guess
// of their sizes; a longer label takes the size-then-value path.
TEST_F(HsmTest, ListKeyObjectsReadsLabelsLongerThanItsFirstGuess) {
  const std::string long_label(300, 'L');
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string id, hsm_->GenerateAesKey(long_label));
  CUSTOS_ASSERT_OK_AND_ASSIGN(auto objects, hsm_->ListKeyObjects());
  int seen = 0;
  for (const auto& o : objects) {
    if (o.id != id) continue;
    ++seen;
    EXPECT_EQ(o.label, long_label);
    EXPECT_EQ(o.object_class, CKO_SECRET_KEY);
  }
  EXPECT_EQ(seen, 1);
  CUSTOS_EXPECT_OK(hsm_->DestroyObjects(id));
}

TEST_F(HsmTest, FindKeyIdsByLabelMatchesClassAndExactLabelOnly) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string signer,
                              hsm_->GenerateSigningKey("find:signer"));
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string twin1,
                              hsm_->GenerateAesKey("find:twin"));
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string twin2,
                              hsm_->GenerateAesKey("find:twin"));
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string longer,
                              hsm_->GenerateAesKey("find:twin:longer"));

  EXPECT_THAT(hsm_->FindKeyIdsByLabel(CKO_PRIVATE_KEY, "find:signer"),
              ::custos::testing::IsOkAndHolds(::testing::ElementsAre(signer)));
  // The public half has the same label but another class.
  EXPECT_THAT(hsm_->FindKeyIdsByLabel(CKO_SECRET_KEY, "find:signer"),
              ::custos::testing::IsOkAndHolds(::testing::IsEmpty()));
  // Every object with the label, and no object whose label only starts so.
  EXPECT_THAT(hsm_->FindKeyIdsByLabel(CKO_SECRET_KEY, "find:twin"),
              ::custos::testing::IsOkAndHolds(
                  ::testing::UnorderedElementsAre(twin1, twin2)));
  EXPECT_THAT(hsm_->FindKeyIdsByLabel(CKO_SECRET_KEY, "find"),
              ::custos::testing::IsOkAndHolds(::testing::IsEmpty()));
  EXPECT_THAT(hsm_->FindKeyIdsByLabel(CKO_PRIVATE_KEY, "find:nobody"),
              ::custos::testing::IsOkAndHolds(::testing::IsEmpty()));
  // Destroyed objects are no longer found.
  CUSTOS_ASSERT_OK(hsm_->DestroyObjects(twin1));
  EXPECT_THAT(hsm_->FindKeyIdsByLabel(CKO_SECRET_KEY, "find:twin"),
              ::custos::testing::IsOkAndHolds(::testing::ElementsAre(twin2)));
  for (const std::string& id : {signer, twin2, longer}) {
    CUSTOS_EXPECT_OK(hsm_->DestroyObjects(id));
  }
}

TEST_F(HsmTest, SigningKeySignsAndItsPemVerifies) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string id,
                              hsm_->GenerateSigningKey("audit-signing"));
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string pem, hsm_->SigningPublicKeyPem(id));
  EXPECT_THAT(pem, ::testing::StartsWith("-----BEGIN PUBLIC KEY-----"));
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string sig,
                              hsm_->SignP256(id, "chain head 1234"));
  EXPECT_EQ(sig.size(), kP256RawSignatureSize);
  EXPECT_THAT(VerifyP256Signature(pem, "chain head 1234", sig), IsOk());
  EXPECT_THAT(VerifyP256Signature(pem, "chain head 1235", sig),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // The private half cannot be read.
  Session s = RawSession();
  CK_OBJECT_HANDLE priv = Find(s, id, CKO_PRIVATE_KEY);
  unsigned char value[128];
  CK_ATTRIBUTE attr = {CKA_VALUE, value, sizeof(value)};
  EXPECT_EQ(s.fn()->C_GetAttributeValue(s.handle(), priv, &attr, 1),
            CKR_ATTRIBUTE_SENSITIVE);
}

TEST_F(HsmTest, EightThreadsTenThousandOperationsEachLeakNoSession) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string id, hsm_->GenerateAesKey("stress"));
  SessionPool::Stats before = hsm_->pool_stats();
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  constexpr int kThreads = 8, kOps = 10000;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::string data(32, static_cast<char>(t));
      for (int i = 0; i < kOps; ++i) {
        absl::Status s;
        if (i % 4 == 3) {
          s = hsm_->GenerateRandom(32).status();
        } else {
          auto sealed = hsm_->EncryptAesGcm(id, "aad", data);
          s = sealed.status();
          if (s.ok() && i % 2 == 0) {
            auto opened =
                hsm_->DecryptAesGcm(id, sealed->iv, "aad", sealed->ciphertext);
            s = opened.status();
            if (s.ok() && !opened->Equals(data)) s = absl::DataLossError("!=");
          }
        }
        if (!s.ok()) {
          if (errors.fetch_add(1) < 5) ADD_FAILURE() << s;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  SessionPool::Stats after = hsm_->pool_stats();
  EXPECT_EQ(after.workers, 4);
  EXPECT_EQ(after.idle, 4);
  EXPECT_EQ(after.abandoned, 0);
  EXPECT_EQ(after.evictions, before.evictions);
  EXPECT_GE(after.leases - before.leases,
            static_cast<uint64_t>(kThreads) * kOps);
  EXPECT_GT(after.waits, before.waits);  // 8 callers on 4 sessions
  // (SoftHSM does not report open sessions; hsm_fault_test counts them
  // through the fault module.)
}

TEST_F(HsmTest, RecoversAfterAllSessionsAreClosedBehindThePoolsBack) {
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string id, hsm_->GenerateAesKey("closeall"));
  CUSTOS_ASSERT_OK_AND_ASSIGN(GcmSealed sealed,
                              hsm_->EncryptAesGcm(id, "", "before"));
  SessionPool::Stats before = hsm_->pool_stats();
  auto slot = module_->FindSlotByTokenLabel(token_->label());
  ASSERT_TRUE(slot.ok());
  ASSERT_EQ(module_->fn()->C_CloseAllSessions(*slot), CKR_OK);
  // The next operations succeed after the pool replaces its sessions.
  for (int i = 0; i < 8; ++i) {
    CUSTOS_ASSERT_OK_AND_ASSIGN(
        SecretBytes opened,
        hsm_->DecryptAesGcm(id, sealed.iv, "", sealed.ciphertext));
    EXPECT_TRUE(opened.Equals("before"));
  }
  SessionPool::Stats after = hsm_->pool_stats();
  EXPECT_GE(after.evictions - before.evictions, 1u);
  EXPECT_GE(after.reopens - before.reopens, 1u);
  EXPECT_EQ(after.workers, 4);
}

TEST_F(HsmTest, KeyFromAnotherProcessIsFoundByCkaId) {
  std::string tool = std::string(CUSTOS_BIN_DIR) + "/custos-hsmtool";
  auto generated = custos::testing::RunCommand(absl::StrCat(
      tool, " --token ", token_->label(), " --pin-file ", token_->pin_file(),
      " generate-key --label from-another-process"));
  ASSERT_EQ(generated.exit_code, 0) << generated.output;
  std::string hex = generated.output.substr(0, generated.output.find('\n'));
  ASSERT_EQ(hex.size(), 32u) << generated.output;
  std::string id = absl::HexStringToBytes(hex);
  EXPECT_THAT(hsm_->VerifyAesKey(id), IsOk());
  CUSTOS_ASSERT_OK_AND_ASSIGN(GcmSealed sealed,
                              hsm_->EncryptAesGcm(id, "x", "shared"));
  // And the other way: a key made here is used by another process.
  CUSTOS_ASSERT_OK_AND_ASSIGN(std::string mine, hsm_->GenerateAesKey("mine"));
  auto used = custos::testing::RunCommand(absl::StrCat(
      tool, " --token ", token_->label(), " --pin-file ", token_->pin_file(),
      " roundtrip --id ", absl::BytesToHexString(mine)));
  EXPECT_EQ(used.exit_code, 0) << used.output;
  EXPECT_THAT(used.output, HasSubstr("identical to the original"));
}

TEST(HsmOpenTest, WrongTokenLabelNamesTheLabelsPresent) {
  auto token = custos::testing::TestToken::Create("present-token");
  ASSERT_TRUE(token.ok()) << token.status();
  // The suite's module is loaded only inside HsmTest; load one here.
  auto module = Module::Load(custos::testing::kSoftHsmModule);
  ASSERT_TRUE(module.ok()) << module.status();
  Hsm::Options options;
  options.token_label = "no-such-token";
  options.pin_file = (*token)->pin_file();
  EXPECT_THAT(Hsm::Open(**module, options),
              StatusIs(absl::StatusCode::kNotFound,
                       ::testing::AllOf(HasSubstr("no-such-token"),
                                        HasSubstr("present-token"))));
}

TEST(HsmOpenTest, WrongPinIsRefusedWithoutEchoingIt) {
  auto token = custos::testing::TestToken::Create("pin-token");
  ASSERT_TRUE(token.ok()) << token.status();
  std::string bad_pin_file = (*token)->dir() + "/bad.pin";
  ASSERT_TRUE(
      custos::testing::WriteFileAtomically(bad_pin_file, "wrong-pin-9876", 0400)
          .ok());
  auto module = Module::Load(custos::testing::kSoftHsmModule);
  ASSERT_TRUE(module.ok());
  Hsm::Options options;
  options.token_label = "pin-token";
  options.pin_file = bad_pin_file;
  auto hsm = Hsm::Open(**module, options);
  EXPECT_THAT(hsm, StatusIs(absl::StatusCode::kPermissionDenied,
                            HasSubstr("CKR_PIN_INCORRECT")));
  EXPECT_THAT(std::string(hsm.status().message()),
              ::testing::Not(HasSubstr("wrong-pin-9876")));
}

TEST(HsmMetricsTest, OperationsRecordLatencyOutcomesAndPoolUse) {
  auto token = custos::testing::TestToken::Create("metrics-token");
  ASSERT_TRUE(token.ok()) << token.status();
  auto module = Module::Load(custos::testing::kSoftHsmModule);
  ASSERT_TRUE(module.ok());
  metrics::Registry registry;  // outlives the Hsm
  Hsm::Options options;
  options.token_label = "metrics-token";
  options.pin_file = (*token)->pin_file();
  options.pool.size = 3;
  options.metrics = &registry;
  auto hsm = Hsm::Open(**module, options);
  ASSERT_TRUE(hsm.ok()) << hsm.status();

  auto id = (*hsm)->GenerateAesKey("metrics");
  ASSERT_TRUE(id.ok()) << id.status();
  for (int i = 0; i < 2; ++i) {
    ASSERT_THAT((*hsm)->EncryptAesGcm(*id, "aad", "secret").status(), IsOk());
  }
  EXPECT_THAT((*hsm)->DecryptAesGcm(*id, std::string(12, 'i'), "aad",
                                    std::string(32, 'x')),
              StatusIs(absl::StatusCode::kInvalidArgument));

  const std::string text = registry.Render();
  EXPECT_THAT(text, HasSubstr("custos_hsm_operations_total{operation="
                              "\"EncryptAesGcm\",code=\"OK\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("custos_hsm_operations_total{operation="
                              "\"DecryptAesGcm\",code=\"INVALID_ARGUMENT\"} "
                              "1\n"));
  EXPECT_THAT(text, HasSubstr("custos_hsm_operation_duration_seconds_count{"
                              "operation=\"EncryptAesGcm\"} 2\n"));
  // Operations never run have no series.
  EXPECT_THAT(text, ::testing::Not(HasSubstr("operation=\"SignP256\"")));
  EXPECT_THAT(text, HasSubstr("\ncustos_hsm_pool_sessions 3\n"));
  EXPECT_THAT(text, HasSubstr("\ncustos_hsm_pool_sessions_in_use 0\n"));
  EXPECT_THAT(text, HasSubstr("\ncustos_hsm_pool_queued_operations 0\n"));
  // GenerateAesKey (and, before it, the random CKA_ID it is given), two
  // encrypts and the decrypt each waited for a session.
  EXPECT_THAT(text, HasSubstr("\ncustos_hsm_pool_wait_seconds_count 5\n"));
  ASSERT_THAT((*hsm)->DestroyObjects(*id).status(), IsOk());

  // Once the Hsm is gone, its pool's callbacks are too.
  hsm->reset();
  EXPECT_THAT(registry.Render(),
              ::testing::Not(HasSubstr("\ncustos_hsm_pool_sessions 3")));
}

TEST(HsmOpenTest, LoadingANonModuleFailsClearly) {
  EXPECT_THAT(Module::Load("/nonexistent/libpkcs11.so"),
              StatusIs(absl::StatusCode::kNotFound,
                       HasSubstr("/nonexistent/libpkcs11.so")));
  EXPECT_THAT(Module::Load("libc.so.6"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("not a PKCS#11 module")));
}

}  // namespace
}  // namespace custos::hsm
