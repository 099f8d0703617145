// End to end: a real custosd process (mutual TLS, SoftHSM2, SQLite, audit
// files) driven over gRPC with the dev-env identities.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "custos/v1/audit.grpc.pb.h"
#include "custos/v1/kms.grpc.pb.h"
#include "tests/support/custosd_process.h"
#include "tests/support/subprocess.h"
#include "tests/support/test_certs.h"
#include "tests/support/test_token.h"

namespace custos {
namespace {

namespace pb = ::custos::v1;
using ::custos::testing::CustosdProcess;
using ::testing::HasSubstr;

using ::custos::testing::ReadAll;

// Every regular file under `dir`, concatenated (for leak checks).
std::string ReadTree(const std::string& dir) {
  std::string all;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file()) all += ReadAll(entry.path().string());
  }
  return all;
}

class E2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    CustosdProcess::Options options;
    options.extra_config =
        "testing:\n  deletion_day_seconds: 0.5\n"
        "maintenance_interval_seconds: 0.2\n";
    auto server = CustosdProcess::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }

  // One channel per identity, reused (a TLS handshake per call would
  // dominate the run time). Reset when the server restarts.
  static std::shared_ptr<grpc::Channel> ChannelOf(const std::string& who) {
    std::shared_ptr<grpc::Channel>& c = (*channels_)[who];
    if (c == nullptr) c = server_->Channel(who);
    return c;
  }
  static std::unique_ptr<pb::KeyManagementService::Stub> Kms(
      const std::string& who) {
    return pb::KeyManagementService::NewStub(ChannelOf(who));
  }
  static std::unique_ptr<pb::CryptoService::Stub> Crypto(
      const std::string& who) {
    return pb::CryptoService::NewStub(ChannelOf(who));
  }

  // Creates a key whose policy lets service-a use every operation.
  static pb::Key NewKey(const std::string& alias = "") {
    pb::CreateKeyRequest req;
    req.set_description("e2e");
    req.set_alias(alias);
    pb::PolicyBinding* b = req.mutable_policy()->add_bindings();
    b->add_principals(CustosdProcess::Principal("service-a"));
    for (int op = 1; op <= 6; ++op) {
      b->add_operations(static_cast<pb::KeyOperation>(op));
    }
    pb::Key key;
    grpc::ClientContext ctx;
    grpc::Status s = Kms("admin")->CreateKey(&ctx, req, &key);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return key;
  }

  static pb::GenerateDataKeyResponse DataKey(
      const std::string& key,
      const std::map<std::string, std::string>& ctx_pairs,
      grpc::Status* status = nullptr) {
    pb::GenerateDataKeyRequest req;
    req.set_key(key);
    for (const auto& [k, v] : ctx_pairs)
      (*req.mutable_encryption_context())[k] = v;
    pb::GenerateDataKeyResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = Crypto("service-a")->GenerateDataKey(&ctx, req, &resp);
    if (status) *status = s;
    return resp;
  }

  static grpc::Status Decrypt(const std::string& blob,
                              const std::map<std::string, std::string>& pairs,
                              pb::DecryptResponse* resp,
                              const std::string& who = "service-a") {
    pb::DecryptRequest req;
    req.set_ciphertext_blob(blob);
    for (const auto& [k, v] : pairs) (*req.mutable_encryption_context())[k] = v;
    grpc::ClientContext ctx;
    return Crypto(who)->Decrypt(&ctx, req, resp);
  }

  static CustosdProcess* server_;
  static std::map<std::string, std::shared_ptr<grpc::Channel>>* channels_;
};
CustosdProcess* E2eTest::server_ = nullptr;
std::map<std::string, std::shared_ptr<grpc::Channel>>* E2eTest::channels_ =
    new std::map<std::string, std::shared_ptr<grpc::Channel>>();

TEST_F(E2eTest, EveryRpcHasAWorkingHappyPath) {
  auto kms = Kms("admin");
  pb::Key key = NewKey("alias/e2e-happy");
  ASSERT_FALSE(key.key_id().empty());
  EXPECT_EQ(key.state(), pb::ENABLED);
  EXPECT_EQ(key.primary_version(), 1u);
  {
    pb::GetKeyRequest req;
    req.set_key("alias/e2e-happy");
    pb::Key got;
    grpc::ClientContext ctx;
    ASSERT_TRUE(kms->GetKey(&ctx, req, &got).ok());
    EXPECT_EQ(got.key_id(), key.key_id());
    EXPECT_EQ(got.versions_size(), 1);
  }
  {
    pb::ListKeysRequest req;
    pb::ListKeysResponse resp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(kms->ListKeys(&ctx, req, &resp).ok());
    EXPECT_GE(resp.keys_size(), 1);
  }
  {
    pb::UpdateKeyRequest req;
    req.set_key(key.key_id());
    req.add_update_mask("description");
    req.add_update_mask("labels");
    req.set_description("photos of tenant 7");
    (*req.mutable_labels())["team"] = "photos";
    pb::Key updated;
    grpc::ClientContext ctx;
    ASSERT_TRUE(kms->UpdateKey(&ctx, req, &updated).ok());
    EXPECT_EQ(updated.description(), "photos of tenant 7");
    EXPECT_EQ(updated.labels().at("team"), "photos");
  }
  {
    pb::ListKeysRequest req;
    req.set_label("team=photos");
    pb::ListKeysResponse resp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(kms->ListKeys(&ctx, req, &resp).ok());
    ASSERT_EQ(resp.keys_size(), 1);
    EXPECT_EQ(resp.keys(0).key_id(), key.key_id());
  }
  // Data keys, Encrypt, Decrypt, ReEncrypt, random.
  grpc::Status s;
  pb::GenerateDataKeyResponse dk =
      DataKey("alias/e2e-happy", {{"tenant", "7"}}, &s);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(dk.plaintext().size(), 32u);
  EXPECT_EQ(dk.key_id(), key.key_id());
  pb::DecryptResponse opened;
  ASSERT_TRUE(Decrypt(dk.ciphertext_blob(), {{"tenant", "7"}}, &opened).ok());
  EXPECT_EQ(opened.plaintext(), dk.plaintext());
  auto crypto = Crypto("service-a");
  {
    pb::GenerateDataKeyRequest req;
    req.set_key(key.key_id());
    req.set_key_spec(pb::AES_128);
    pb::GenerateDataKeyResponse resp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(crypto->GenerateDataKeyWithoutPlaintext(&ctx, req, &resp).ok());
    EXPECT_TRUE(resp.plaintext().empty());
    pb::DecryptResponse later;
    ASSERT_TRUE(Decrypt(resp.ciphertext_blob(), {}, &later).ok());
    EXPECT_EQ(later.plaintext().size(), 16u);
  }
  {
    pb::EncryptRequest req;
    req.set_key(key.key_id());
    req.set_plaintext("a small secret");
    pb::EncryptResponse resp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(crypto->Encrypt(&ctx, req, &resp).ok());
    pb::DecryptResponse back;
    ASSERT_TRUE(Decrypt(resp.ciphertext_blob(), {}, &back).ok());
    EXPECT_EQ(back.plaintext(), "a small secret");
  }
  pb::Key other = NewKey();
  {
    pb::ReEncryptRequest req;
    req.set_ciphertext_blob(dk.ciphertext_blob());
    (*req.mutable_source_encryption_context())["tenant"] = "7";
    req.set_destination_key(other.key_id());
    (*req.mutable_destination_encryption_context())["tenant"] = "8";
    pb::ReEncryptResponse resp;
    grpc::ClientContext ctx;
    grpc::Status re = crypto->ReEncrypt(&ctx, req, &resp);
    ASSERT_TRUE(re.ok()) << re.error_message();
    EXPECT_EQ(resp.source_key_id(), key.key_id());
    EXPECT_EQ(resp.key_id(), other.key_id());
    pb::DecryptResponse moved;
    ASSERT_TRUE(
        Decrypt(resp.ciphertext_blob(), {{"tenant", "8"}}, &moved).ok());
    EXPECT_EQ(moved.plaintext(), dk.plaintext());
  }
  {
    pb::GenerateRandomRequest req;
    req.set_number_of_bytes(64);
    pb::GenerateRandomResponse resp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(Crypto("auditor")->GenerateRandom(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.random().size(), 64u);
  }
  // Aliases and policies.
  {
    pb::CreateAliasRequest req;
    req.set_alias("alias/e2e-second");
    req.set_key(key.key_id());
    pb::Alias alias;
    grpc::ClientContext ctx;
    ASSERT_TRUE(kms->CreateAlias(&ctx, req, &alias).ok());
    pb::ListAliasesRequest list;
    list.set_key(key.key_id());
    pb::ListAliasesResponse aliases;
    grpc::ClientContext ctx2;
    ASSERT_TRUE(kms->ListAliases(&ctx2, list, &aliases).ok());
    EXPECT_EQ(aliases.aliases_size(), 2);
    pb::DeleteAliasRequest del;
    del.set_alias("alias/e2e-second");
    google::protobuf::Empty empty;
    grpc::ClientContext ctx3;
    ASSERT_TRUE(kms->DeleteAlias(&ctx3, del, &empty).ok());
  }
  {
    pb::GetKeyPolicyRequest req;
    req.set_key(key.key_id());
    pb::KeyPolicy policy;
    grpc::ClientContext ctx;
    ASSERT_TRUE(kms->GetKeyPolicy(&ctx, req, &policy).ok());
    EXPECT_EQ(policy.bindings_size(), 1);
    pb::SetKeyPolicyRequest set;
    set.set_key(key.key_id());
    *set.mutable_policy() = policy;
    set.mutable_policy()->mutable_bindings(0)->add_principals(
        CustosdProcess::Principal("service-b"));
    set.set_expected_version(policy.version());
    pb::KeyPolicy after;
    grpc::ClientContext ctx2;
    ASSERT_TRUE(kms->SetKeyPolicy(&ctx2, set, &after).ok());
    EXPECT_EQ(after.version(), policy.version() + 1);
    grpc::ClientContext ctx3;
    set.set_expected_version(policy.version());  // stale now
    EXPECT_EQ(kms->SetKeyPolicy(&ctx3, set, &after).error_code(),
              grpc::StatusCode::ABORTED);
  }
  // Lifecycle: rotate, disable, enable, schedule and cancel deletion.
  {
    pb::RotateKeyRequest req;
    req.set_key(key.key_id());
    pb::Key rotated;
    grpc::ClientContext ctx;
    ASSERT_TRUE(kms->RotateKey(&ctx, req, &rotated).ok());
    EXPECT_EQ(rotated.primary_version(), 2u);
    pb::DisableKeyRequest dis;
    dis.set_key(key.key_id());
    pb::Key disabled;
    grpc::ClientContext ctx2;
    ASSERT_TRUE(kms->DisableKey(&ctx2, dis, &disabled).ok());
    EXPECT_EQ(disabled.state(), pb::DISABLED);
    pb::EnableKeyRequest en;
    en.set_key(key.key_id());
    pb::Key enabled;
    grpc::ClientContext ctx3;
    ASSERT_TRUE(kms->EnableKey(&ctx3, en, &enabled).ok());
    EXPECT_EQ(enabled.state(), pb::ENABLED);
    pb::ScheduleKeyDeletionRequest sched;
    sched.set_key(key.key_id());
    sched.set_pending_window_days(30);
    pb::Key pending;
    grpc::ClientContext ctx4;
    ASSERT_TRUE(kms->ScheduleKeyDeletion(&ctx4, sched, &pending).ok());
    EXPECT_EQ(pending.state(), pb::PENDING_DELETION);
    EXPECT_TRUE(pending.has_deletion_time());
    pb::CancelKeyDeletionRequest cancel;
    cancel.set_key(key.key_id());
    pb::Key rescued;
    grpc::ClientContext ctx5;
    ASSERT_TRUE(kms->CancelKeyDeletion(&ctx5, cancel, &rescued).ok());
    EXPECT_EQ(rescued.state(), pb::DISABLED);
  }
}

TEST_F(E2eTest, RolesAreSeparated) {
  pb::Key key = NewKey();
  // Admins manage keys but cannot use them; services use keys but cannot
  // manage them; the auditor can do neither.
  grpc::Status s;
  pb::GenerateDataKeyRequest req;
  req.set_key(key.key_id());
  for (const char* who : {"admin", "auditor", "service-b"}) {
    pb::GenerateDataKeyResponse resp;
    grpc::ClientContext ctx;
    s = Crypto(who)->GenerateDataKey(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << who;
    EXPECT_TRUE(resp.plaintext().empty());
  }
  for (const char* who : {"auditor", "service-a", "service-b"}) {
    pb::CreateKeyRequest create;
    pb::Key out;
    grpc::ClientContext ctx;
    s = Kms(who)->CreateKey(&ctx, create, &out);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED) << who;
  }
  // An unknown key and a forbidden key read the same.
  pb::GenerateDataKeyRequest unknown;
  unknown.set_key("k-aaaaaaaaaaaaaaaaaaaaaaaaaa");
  pb::GenerateDataKeyResponse r1, r2;
  grpc::ClientContext c1, c2;
  grpc::Status s1 = Crypto("service-b")->GenerateDataKey(&c1, unknown, &r1);
  grpc::Status s2 = Crypto("service-b")->GenerateDataKey(&c2, req, &r2);
  EXPECT_EQ(s1.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(s1.error_message(), s2.error_message());
}

TEST_F(E2eTest, BlobsBindKeyVersionAndContext) {
  pb::Key key = NewKey();
  grpc::Status s;
  pb::GenerateDataKeyResponse dk =
      DataKey(key.key_id(), {{"bucket", "b1"}, {"object", "o/1"}}, &s);
  ASSERT_TRUE(s.ok());
  const std::string blob = dk.ciphertext_blob();
  pb::DecryptResponse resp;
  // Reordered pairs are the same map: fine.
  ASSERT_TRUE(Decrypt(blob, {{"object", "o/1"}, {"bucket", "b1"}}, &resp).ok());
  // Every changed context fails with the one uniform error.
  const std::vector<std::map<std::string, std::string>> wrong = {
      {},
      {{"bucket", "b1"}},
      {{"bucket", "b1"}, {"object", "o/1"}, {"extra", "x"}},
      {{"Bucket", "b1"}, {"object", "o/1"}},
      {{"bucket", "b1"}, {"object", "o/2"}},
      {{"bucket", "b1"}, {"object", ""}},
  };
  for (const auto& ctx_pairs : wrong) {
    pb::DecryptResponse refused;
    grpc::Status bad = Decrypt(blob, ctx_pairs, &refused);
    EXPECT_TRUE(refused.plaintext().empty());
    EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(bad.error_message(), "invalid ciphertext");
  }
  const std::map<std::string, std::string> ctx_ok = {{"bucket", "b1"},
                                                     {"object", "o/1"}};
  // Truncation at every offset.
  for (size_t n = 0; n < blob.size(); ++n) {
    pb::DecryptResponse refused;
    grpc::Status bad = Decrypt(blob.substr(0, n), ctx_ok, &refused);
    EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << n;
    EXPECT_EQ(bad.error_message(), "invalid ciphertext") << n;
    EXPECT_TRUE(refused.plaintext().empty());
  }
  // Every single-bit flip: invalid, or (when the flip turns the key id into
  // another well-formed id) refused like any key the caller may not use.
  for (size_t bit = 0; bit < blob.size() * 8; ++bit) {
    std::string flipped = blob;
    flipped[bit / 8] ^= static_cast<char>(1 << (bit % 8));
    pb::DecryptResponse refused;
    grpc::Status bad = Decrypt(flipped, ctx_ok, &refused);
    EXPECT_TRUE(refused.plaintext().empty());
    EXPECT_TRUE(bad.error_code() == grpc::StatusCode::INVALID_ARGUMENT ||
                bad.error_code() == grpc::StatusCode::PERMISSION_DENIED)
        << "bit " << bit << ": " << bad.error_message();
  }
  // Trailing bytes.
  EXPECT_EQ(Decrypt(blob + "x", ctx_ok, &resp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  ASSERT_TRUE(Decrypt(blob, ctx_ok, &resp).ok());
}

TEST_F(E2eTest, DisabledAndPendingDeletionKeysRefuseCrypto) {
  pb::Key key = NewKey();
  grpc::Status s;
  pb::GenerateDataKeyResponse dk = DataKey(key.key_id(), {}, &s);
  ASSERT_TRUE(s.ok());
  auto kms = Kms("admin");
  pb::DisableKeyRequest dis;
  dis.set_key(key.key_id());
  pb::Key out;
  grpc::ClientContext c1;
  ASSERT_TRUE(kms->DisableKey(&c1, dis, &out).ok());
  DataKey(key.key_id(), {}, &s);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("DISABLED"));
  pb::DecryptResponse resp;
  EXPECT_EQ(Decrypt(dk.ciphertext_blob(), {}, &resp).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(resp.plaintext().empty());
  pb::ScheduleKeyDeletionRequest sched;
  sched.set_key(key.key_id());
  grpc::ClientContext c2;
  ASSERT_TRUE(kms->ScheduleKeyDeletion(&c2, sched, &out).ok());
  DataKey(key.key_id(), {}, &s);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("PENDING_DELETION"));
  EXPECT_TRUE(resp.plaintext().empty());
}

TEST_F(E2eTest, RotationKeepsOldBlobsDecryptable) {
  pb::Key key = NewKey();
  grpc::Status s;
  pb::GenerateDataKeyResponse before = DataKey(key.key_id(), {}, &s);
  ASSERT_TRUE(s.ok());
  pb::RotateKeyRequest rot;
  rot.set_key(key.key_id());
  pb::Key rotated;
  grpc::ClientContext ctx;
  ASSERT_TRUE(Kms("admin")->RotateKey(&ctx, rot, &rotated).ok());
  pb::GenerateDataKeyResponse after = DataKey(key.key_id(), {}, &s);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(before.key_version(), 1u);
  EXPECT_EQ(after.key_version(), 2u);
  pb::DecryptResponse r1, r2;
  ASSERT_TRUE(Decrypt(before.ciphertext_blob(), {}, &r1).ok());
  ASSERT_TRUE(Decrypt(after.ciphertext_blob(), {}, &r2).ok());
  EXPECT_EQ(r1.plaintext(), before.plaintext());
  EXPECT_EQ(r1.key_version(), 1u);
  EXPECT_EQ(r2.key_version(), 2u);
}

TEST_F(E2eTest, DeletionDestroysHsmObjectsAndOldBlobsFail) {
  pb::Key key = NewKey();
  grpc::Status s;
  pb::GenerateDataKeyResponse dk = DataKey(key.key_id(), {}, &s);
  ASSERT_TRUE(s.ok());
  auto hsm_objects = [&] {
    return testing::RunCommand(
               absl::StrCat("SOFTHSM2_CONF=", server_->softhsm_conf(), " ",
                            testing::BinDir(),
                            "/custos-hsmtool --token custos --pin-file ",
                            server_->pin_file(), " list"))
        .output;
  };
  const std::string label = absl::StrCat("custos:", key.key_id(), ":v1");
  EXPECT_THAT(hsm_objects(), HasSubstr(label));
  pb::ScheduleKeyDeletionRequest sched;
  sched.set_key(key.key_id());
  sched.set_pending_window_days(7);  // 7 x 0.5 s in this test's config
  pb::Key pending;
  grpc::ClientContext ctx;
  ASSERT_TRUE(Kms("admin")->ScheduleKeyDeletion(&ctx, sched, &pending).ok());
  pb::Key now;
  for (int i = 0; i < 100; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    pb::GetKeyRequest get;
    get.set_key(key.key_id());
    grpc::ClientContext c;
    ASSERT_TRUE(Kms("admin")->GetKey(&c, get, &now).ok());
    if (now.state() == pb::DESTROYED) break;
  }
  ASSERT_EQ(now.state(), pb::DESTROYED);
  EXPECT_EQ(now.versions(0).state(), pb::KEY_VERSION_DESTROYED);
  EXPECT_THAT(hsm_objects(), ::testing::Not(HasSubstr(label)));
  pb::DecryptResponse resp;
  grpc::Status gone = Decrypt(dk.ciphertext_blob(), {}, &resp);
  EXPECT_EQ(gone.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(gone.error_message(), "invalid ciphertext");
}

TEST_F(E2eTest, UnauthenticatedCallersAreRefusedAtTheTlsLayer) {
  // No client certificate at all.
  auto anonymous = server_->ChannelWith("", "");
  auto stub = pb::CryptoService::NewStub(anonymous);
  pb::GenerateRandomRequest req;
  req.set_number_of_bytes(8);
  pb::GenerateRandomResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::Status s = stub->GenerateRandom(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_TRUE(resp.random().empty());
  // The server certificate's key is not a client identity (no clientAuth).
  auto server_cert = server_->ChannelWith(server_->ReadPki("server.key"),
                                          server_->ReadPki("server.pem"));
  grpc::ClientContext ctx2;
  ctx2.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  s = pb::CryptoService::NewStub(server_cert)
          ->GenerateRandom(&ctx2, req, &resp);
  EXPECT_NE(s.error_code(), grpc::StatusCode::OK);
}

// Client certificates that must not get in, made by the test with OpenSSL.
// The good one (same CA, same identity) proves the harness itself works.
struct CertCase {
  const char* name;
  bool expect_ok;
  std::function<absl::StatusOr<testing::KeyAndCert>(
      const testing::KeyAndCert& dev_ca)>
      make;
};

TEST_F(E2eTest, BadClientCertificatesAreRefused) {
  const testing::KeyAndCert dev_ca{server_->ReadPki("ca.key"),
                                   server_->ReadPki("ca.pem")};
  auto spec = [] {
    testing::CertSpec s;
    s.common_name = "service-a";
    s.uris = {CustosdProcess::Principal("service-a")};
    return s;
  };
  const std::vector<CertCase> cases = {
      {"good (control)", true,
       [&](const auto& ca) { return testing::MakeCert(ca, spec()); }},
      {"expired", false,
       [&](const auto& ca) {
         auto s = spec();
         s.not_before = -absl::Hours(48);
         s.not_after = -absl::Hours(24);
         return testing::MakeCert(ca, s);
       }},
      {"not yet valid", false,
       [&](const auto& ca) {
         auto s = spec();
         s.not_before = absl::Hours(24);
         s.not_after = absl::Hours(48);
         return testing::MakeCert(ca, s);
       }},
      {"unknown CA", false,
       [&](const auto&) -> absl::StatusOr<testing::KeyAndCert> {
         auto other = testing::MakeCa("Custos Dev CA");  // same name!
         if (!other.ok()) return other.status();
         return testing::MakeCert(*other, spec());
       }},
      {"self-signed look-alike", false,
       [&](const auto&) { return testing::MakeSelfSigned(spec()); }},
      {"no clientAuth EKU", false,
       [&](const auto& ca) {
         auto s = spec();
         s.client_auth = false;
         s.server_auth = true;
         return testing::MakeCert(ca, s);
       }},
      {"no EKU at all", false,
       [&](const auto& ca) {
         auto s = spec();
         s.include_eku = false;
         return testing::MakeCert(ca, s);
       }},
      {"CA:TRUE leaf", false,
       [&](const auto& ca) {
         auto s = spec();
         s.is_ca = true;
         return testing::MakeCert(ca, s);
       }},
  };
  for (const CertCase& c : cases) {
    absl::StatusOr<testing::KeyAndCert> cert = c.make(dev_ca);
    ASSERT_TRUE(cert.ok()) << c.name << ": " << cert.status();
    auto stub = pb::CryptoService::NewStub(
        server_->ChannelWith(cert->key_pem, cert->cert_pem));
    pb::GenerateRandomRequest req;
    req.set_number_of_bytes(8);
    pb::GenerateRandomResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::seconds(5));
    grpc::Status s = stub->GenerateRandom(&ctx, req, &resp);
    if (c.expect_ok) {
      EXPECT_TRUE(s.ok()) << c.name << ": " << s.error_message();
    } else {
      // Refused in the handshake (UNAVAILABLE) or, for certificates that
      // chain but are not client identities, before the core
      // (UNAUTHENTICATED). Never served.
      EXPECT_TRUE(s.error_code() == grpc::StatusCode::UNAVAILABLE ||
                  s.error_code() == grpc::StatusCode::UNAUTHENTICATED)
          << c.name << ": " << s.error_code() << " " << s.error_message();
      EXPECT_TRUE(resp.random().empty()) << c.name;
    }
  }
}

TEST_F(E2eTest, OversizedMessagesAreRefusedByTheTransport) {
  pb::Key key = NewKey();
  pb::EncryptRequest req;
  req.set_key(key.key_id());
  req.set_plaintext(std::string(100 * 1024, 'x'));  // limit: 64 KiB
  pb::EncryptResponse resp;
  grpc::ClientContext ctx;
  EXPECT_EQ(Crypto("service-a")->Encrypt(&ctx, req, &resp).error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
  // Under the transport limit but over Encrypt's 4,096 bytes: the service
  // names the field.
  req.set_plaintext(std::string(4097, 'x'));
  grpc::ClientContext ctx2;
  grpc::Status s = Crypto("service-a")->Encrypt(&ctx2, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("plaintext"));
}

TEST_F(E2eTest, ASecondServerOnTheSameAuditLogRefusesToStart) {
  // It would fork the audit chain (and gRPC would even let it share the
  // port with SO_REUSEPORT): it must stop before touching the log.
  std::vector<std::string> env = testing::EnvironmentWithout("SOFTHSM2_CONF=");
  env.push_back("SOFTHSM2_CONF=" + server_->softhsm_conf());
  testing::ProcessResult second = testing::RunProcess(
      {"/usr/bin/timeout", "20", testing::BinDir() + "/custosd-test",
       "--config", server_->dir() + "/custos.yaml"},
      env, "/dev/null", server_->dir() + "/second-custosd");
  EXPECT_EQ(second.code, 1) << second;
  EXPECT_THAT(second.err, HasSubstr("in use by another custosd"));
  grpc::Status s;
  DataKey(NewKey().key_id(), {}, &s);
  EXPECT_TRUE(s.ok()) << "the first server still serves";
  // And its audit chain is whole.
  pb::VerifyAuditLogResponse verified;
  grpc::ClientContext ctx;
  ASSERT_TRUE(pb::AuditService::NewStub(server_->Channel("auditor"))
                  ->VerifyAuditLog(&ctx, pb::VerifyAuditLogRequest(), &verified)
                  .ok());
  EXPECT_TRUE(verified.ok()) << verified.first_break();
}

TEST_F(E2eTest, GenerateDataKeysReturnsAThousandKeysInOneReply) {
  pb::Key key = NewKey();
  pb::GenerateDataKeysRequest req;
  req.set_key(key.key_id());
  req.set_count(1000);
  (*req.mutable_encryption_context())["tenant"] = "acme";
  pb::GenerateDataKeysResponse resp;
  grpc::ClientContext ctx;
  grpc::Status s = Crypto("service-a")->GenerateDataKeys(&ctx, req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  // Larger than the 64 KiB request limit: replies are not held to it.
  EXPECT_GT(resp.ByteSizeLong(), 64u * 1024);
  EXPECT_EQ(resp.key_id(), key.key_id());
  ASSERT_EQ(resp.data_keys_size(), 1000);
  std::set<std::string> distinct;
  for (int i : {0, 1, 499, 998, 999}) {
    const pb::DataKey& dk = resp.data_keys(i);
    ASSERT_EQ(dk.plaintext().size(), 32u);
    pb::DecryptResponse opened;
    ASSERT_TRUE(
        Decrypt(dk.ciphertext_blob(), {{"tenant", "acme"}}, &opened).ok());
    EXPECT_EQ(opened.plaintext(), dk.plaintext());
  }
  for (const pb::DataKey& dk : resp.data_keys())
    distinct.insert(dk.plaintext());
  EXPECT_EQ(distinct.size(), 1000u);

  // The count is checked by the service and named in the error.
  req.set_count(1001);
  grpc::ClientContext ctx2;
  s = Crypto("service-a")->GenerateDataKeys(&ctx2, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("count"));
  // Without plaintext, and refused to a caller the policy does not name.
  req.set_count(2);
  req.set_without_plaintext(true);
  grpc::ClientContext ctx3;
  pb::GenerateDataKeysResponse wrapped;
  ASSERT_TRUE(Crypto("service-a")->GenerateDataKeys(&ctx3, req, &wrapped).ok());
  ASSERT_EQ(wrapped.data_keys_size(), 2);
  EXPECT_TRUE(wrapped.data_keys(0).plaintext().empty());
  grpc::ClientContext ctx4;
  EXPECT_EQ(
      Crypto("service-b")->GenerateDataKeys(&ctx4, req, &wrapped).error_code(),
      grpc::StatusCode::PERMISSION_DENIED);
}

TEST_F(E2eTest, AuditServiceServesAuditorsOnly) {
  pb::Key key = NewKey();
  grpc::Status s;
  DataKey(key.key_id(), {{"case", "audit-api"}}, &s);
  ASSERT_TRUE(s.ok());
  // Only the auditor may read the log; the refusals are audited too.
  for (const char* who : {"admin", "service-a", "service-b"}) {
    pb::ListAuditEventsRequest req;
    pb::ListAuditEventsResponse resp;
    grpc::ClientContext ctx;
    EXPECT_EQ(pb::AuditService::NewStub(ChannelOf(who))
                  ->ListAuditEvents(&ctx, req, &resp)
                  .error_code(),
              grpc::StatusCode::PERMISSION_DENIED)
        << who;
  }
  auto audit = pb::AuditService::NewStub(ChannelOf("auditor"));
  pb::ListAuditEventsRequest req;
  req.mutable_filter()->set_key_id(key.key_id());
  req.mutable_filter()->set_operation("GenerateDataKey");
  pb::ListAuditEventsResponse resp;
  grpc::ClientContext ctx;
  ASSERT_TRUE(audit->ListAuditEvents(&ctx, req, &resp).ok());
  ASSERT_EQ(resp.events_size(), 1);
  EXPECT_EQ(resp.events(0).principal(), CustosdProcess::Principal("service-a"));
  EXPECT_EQ(resp.events(0).encryption_context().at("case"), "audit-api");
  EXPECT_EQ(resp.events(0).outcome(), "ALLOWED");
  pb::ListAuditEventsRequest denied;
  denied.mutable_filter()->set_outcome("DENIED");
  denied.mutable_filter()->set_principal(CustosdProcess::Principal("admin"));
  pb::ListAuditEventsResponse refusals;
  grpc::ClientContext ctx2;
  ASSERT_TRUE(audit->ListAuditEvents(&ctx2, denied, &refusals).ok());
  EXPECT_GE(refusals.events_size(), 1);
  // The public key, and the server's own verification.
  pb::AuditPublicKey key_pem;
  grpc::ClientContext ctx3;
  ASSERT_TRUE(
      audit->GetAuditPublicKey(&ctx3, pb::GetAuditPublicKeyRequest(), &key_pem)
          .ok());
  EXPECT_THAT(key_pem.public_key_pem(), HasSubstr("BEGIN PUBLIC KEY"));
  pb::VerifyAuditLogResponse verified;
  grpc::ClientContext ctx4;
  ASSERT_TRUE(
      audit->VerifyAuditLog(&ctx4, pb::VerifyAuditLogRequest(), &verified)
          .ok());
  EXPECT_TRUE(verified.ok()) << verified.first_break();
  EXPECT_GT(verified.records(), 0u);
  // Follow from the start: the first events arrive, then we cancel.
  pb::StreamAuditEventsRequest stream_req;
  stream_req.set_from_seq(1);
  grpc::ClientContext ctx5;
  auto reader = audit->StreamAuditEvents(&ctx5, stream_req);
  pb::AuditEvent event;
  uint64_t expected_seq = 1;
  for (int i = 0; i < 5 && reader->Read(&event); ++i) {
    EXPECT_EQ(event.seq(), expected_seq++);
  }
  EXPECT_EQ(expected_seq, 6u);
  ctx5.TryCancel();
  reader->Finish();
}

TEST_F(E2eTest, DataKeysNeverAppearInLogsOrAuditFiles) {
  pb::Key key = NewKey();
  std::vector<std::string> secrets;
  for (int i = 0; i < 20; ++i) {
    grpc::Status s;
    pb::GenerateDataKeyResponse dk =
        DataKey(key.key_id(), {{"i", std::to_string(i)}}, &s);
    ASSERT_TRUE(s.ok());
    pb::DecryptResponse resp;
    ASSERT_TRUE(
        Decrypt(dk.ciphertext_blob(), {{"i", std::to_string(i)}}, &resp).ok());
    secrets.push_back(dk.plaintext());
  }
  pb::EncryptRequest enc;
  enc.set_key(key.key_id());
  enc.set_plaintext("PLAINTEXT-MARKER-0123456789");
  pb::EncryptResponse out;
  grpc::ClientContext ctx;
  ASSERT_TRUE(Crypto("service-a")->Encrypt(&ctx, enc, &out).ok());
  const std::string files =
      ReadTree(server_->dir() + "/data") + ReadAll(server_->log_path());
  ASSERT_FALSE(files.empty());
  for (const std::string& secret : secrets) {
    EXPECT_EQ(files.find(secret), std::string::npos);
    EXPECT_EQ(files.find(absl::BytesToHexString(secret)), std::string::npos);
    EXPECT_EQ(files.find(absl::Base64Escape(secret)), std::string::npos);
  }
  EXPECT_EQ(files.find("PLAINTEXT-MARKER"), std::string::npos);
  // But the audit log does record the requests.
  EXPECT_THAT(ReadTree(server_->audit_dir()), HasSubstr("GenerateDataKey"));
}

// Runs last-ish (it restarts the server): a kill -9 in the middle of a
// burst loses no blob that was handed out.
TEST_F(E2eTest, ZKillNineDuringABurstLosesNoReturnedBlob) {
  pb::Key key = NewKey();
  std::mutex mu;
  std::vector<std::pair<std::string, std::string>> issued;  // blob, key
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      auto crypto = Crypto("service-a");
      while (!stop) {
        pb::GenerateDataKeyRequest req;
        req.set_key(key.key_id());
        pb::GenerateDataKeyResponse resp;
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::seconds(2));
        if (crypto->GenerateDataKey(&ctx, req, &resp).ok()) {
          std::lock_guard<std::mutex> lock(mu);
          issued.emplace_back(resp.ciphertext_blob(), resp.plaintext());
        }
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  server_->Kill(SIGKILL);
  stop = true;
  for (auto& th : threads) th.join();
  ASSERT_GT(issued.size(), 10u);
  channels_->clear();
  ASSERT_TRUE(server_->Restart().ok());
  for (const auto& [blob, plaintext] : issued) {
    pb::DecryptResponse resp;
    grpc::Status s = Decrypt(blob, {}, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(resp.plaintext(), plaintext);
  }
  // And SIGTERM is a clean, drained shutdown (exit status 0).
  channels_->clear();
  EXPECT_TRUE(server_->Stop().ok());
}

}  // namespace
}  // namespace custos
