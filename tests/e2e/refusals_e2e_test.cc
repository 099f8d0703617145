// Refusals that happen before a request reaches an operation, end to end
// against real custosd processes over mutual TLS: each one is audited like
// any other refusal, by a name the caller cannot choose, and no request can
// bloat the log.
//
// - A certificate that chains but names no usable identity (the reserved
//   custos: prefix, a URI spelled as another principal type) is refused with
//   UNAUTHENTICATED and recorded as cert-sha256:<hash of its DER>, never by
//   the name it claims; on every kind of handler (asynchronous crypto,
//   synchronous management, the audit service).
// - Requests the gRPC adapters cannot translate are refused and recorded.
// - A refused request with a 60 KB encryption context of control bytes
//   leaves a record of a few KiB; a valid 8 KiB one is cut in the record
//   only, not in the ciphertext.
// - A caller over its rate limit gets RESOURCE_EXHAUSTED, audited; another
//   caller is unaffected.
// - The shipped custosd refuses the config's testing: section.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/x509.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "custos/v1/audit.grpc.pb.h"
#include "custos/v1/kms.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/support/audit_records.h"
#include "tests/support/custosd_process.h"
#include "tests/support/subprocess.h"
#include "tests/support/test_certs.h"
#include "tests/support/test_token.h"

namespace custos {
namespace {

namespace pb = ::custos::v1;
using ::custos::testing::CustosdProcess;
using ::custos::testing::StringField;
using ::testing::HasSubstr;
using ::testing::Not;
using Code = grpc::StatusCode;
using Json = nlohmann::json;

// "cert-sha256:" and the SHA-256 (hex) of the PEM certificate's DER.
std::string CertHash(const std::string& pem) {
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  X509* cert = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  if (cert == nullptr) return "";
  unsigned char* der = nullptr;
  const int length = i2d_X509(cert, &der);
  X509_free(cert);
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(der, static_cast<size_t>(length), digest);
  OPENSSL_free(der);
  return "cert-sha256:" +
         absl::BytesToHexString(absl::string_view(
             reinterpret_cast<const char*>(digest), sizeof(digest)));
}

// Every line of the audit directory, as written.
std::vector<std::string> RawLines(const std::string& dir) {
  std::vector<std::string> lines;
  for (const std::string& path : testing::SegmentFiles(dir)) {
    for (absl::string_view line :
         absl::StrSplit(testing::ReadAll(path), '\n', absl::SkipEmpty())) {
      lines.emplace_back(line);
    }
  }
  return lines;
}

class RefusalsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto server = CustosdProcess::Start({});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }

  // The request lines (no checkpoints) written since `before` lines.
  static std::vector<std::string> NewRequestLines(size_t before) {
    std::vector<std::string> all = RawLines(server_->audit_dir());
    std::vector<std::string> out;
    for (size_t i = before; i < all.size(); ++i) {
      if (StringField(Json::parse(all[i]), "operation") != "Checkpoint") {
        out.push_back(all[i]);
      }
    }
    return out;
  }
  static size_t LineCount() { return RawLines(server_->audit_dir()).size(); }

  // Expects exactly one new record: `rpc`, with `code` and `principal`.
  static Json ExpectOneRecord(size_t before, const std::string& rpc,
                              const std::string& code,
                              const std::string& principal) {
    std::vector<std::string> lines = NewRequestLines(before);
    EXPECT_EQ(lines.size(), 1u) << rpc;
    if (lines.empty()) return Json();
    Json record = Json::parse(lines.back());
    EXPECT_EQ(StringField(record, "operation"), rpc) << lines.back();
    EXPECT_EQ(StringField(record, "code"), code) << lines.back();
    EXPECT_EQ(StringField(record, "principal"), principal) << lines.back();
    return record;
  }

  static testing::KeyAndCert DevCa() {
    return {server_->ReadPki("ca.key"), server_->ReadPki("ca.pem")};
  }

  static CustosdProcess* server_;
};
CustosdProcess* RefusalsTest::server_ = nullptr;

TEST_F(RefusalsTest, UnidentifiedCallersAreAuditedByCertificateHash) {
  struct Case {
    const char* name;
    const char* claimed;
    testing::CertSpec spec;
  };
  auto cn = [](const char* name) {
    testing::CertSpec s;
    s.common_name = name;
    return s;
  };
  auto uri = [](const char* name) {
    testing::CertSpec s;
    s.common_name = "";
    s.uris = {name};
    return s;
  };
  const Case cases[] = {
      {"CN custos:system", "custos:system", cn("custos:system")},
      {"URI custos:system", "custos:system", uri("custos:system")},
      {"URI spelled as a DNS principal", "dns:admin.custos.test",
       uri("dns:admin.custos.test")},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    absl::StatusOr<testing::KeyAndCert> cert =
        testing::MakeCert(DevCa(), c.spec);
    ASSERT_TRUE(cert.ok()) << cert.status();
    const std::string principal = CertHash(cert->cert_pem);
    ASSERT_FALSE(principal.empty());
    auto channel = server_->ChannelWith(cert->key_pem, cert->cert_pem);

    // The asynchronous (crypto) path.
    size_t before = LineCount();
    pb::GenerateRandomRequest random;
    random.set_number_of_bytes(16);
    pb::GenerateRandomResponse random_resp;
    grpc::ClientContext ctx1;
    grpc::Status s = pb::CryptoService::NewStub(channel)->GenerateRandom(
        &ctx1, random, &random_resp);
    EXPECT_EQ(s.error_code(), Code::UNAUTHENTICATED) << s.error_message();
    EXPECT_TRUE(random_resp.random().empty());
    Json record =
        ExpectOneRecord(before, "GenerateRandom", "UNAUTHENTICATED", principal);
    EXPECT_EQ(StringField(record, "outcome"), "DENIED");
    EXPECT_THAT(record.dump(), Not(HasSubstr(c.claimed)));

    // The synchronous (management) path.
    before = LineCount();
    pb::ListKeysResponse keys;
    grpc::ClientContext ctx2;
    s = pb::KeyManagementService::NewStub(channel)->ListKeys(
        &ctx2, pb::ListKeysRequest(), &keys);
    EXPECT_EQ(s.error_code(), Code::UNAUTHENTICATED) << s.error_message();
    ExpectOneRecord(before, "ListKeys", "UNAUTHENTICATED", principal);

    // The audit service.
    before = LineCount();
    pb::AuditPublicKey key;
    grpc::ClientContext ctx3;
    s = pb::AuditService::NewStub(channel)->GetAuditPublicKey(
        &ctx3, pb::GetAuditPublicKeyRequest(), &key);
    EXPECT_EQ(s.error_code(), Code::UNAUTHENTICATED) << s.error_message();
    ExpectOneRecord(before, "GetAuditPublicKey", "UNAUTHENTICATED", principal);
  }
}

// A certificate without the clientAuth EKU: refused in the TLS handshake
// (nothing reaches custosd's handlers, so nothing can be recorded) or, if
// the handshake lets it through, refused and recorded by its hash.
TEST_F(RefusalsTest, CertificateWithoutClientAuthIsRefusedAndAudited) {
  testing::CertSpec spec;
  spec.uris = {CustosdProcess::Principal("service-a")};
  spec.client_auth = false;
  spec.server_auth = true;
  absl::StatusOr<testing::KeyAndCert> cert = testing::MakeCert(DevCa(), spec);
  ASSERT_TRUE(cert.ok()) << cert.status();
  const size_t before = LineCount();
  pb::GenerateRandomRequest random;
  random.set_number_of_bytes(16);
  pb::GenerateRandomResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::Status s = pb::CryptoService::NewStub(
                       server_->ChannelWith(cert->key_pem, cert->cert_pem))
                       ->GenerateRandom(&ctx, random, &resp);
  ASSERT_NE(s.error_code(), Code::OK);
  EXPECT_TRUE(resp.random().empty());
  if (s.error_code() == Code::UNAUTHENTICATED) {
    Json record = ExpectOneRecord(before, "GenerateRandom", "UNAUTHENTICATED",
                                  CertHash(cert->cert_pem));
    EXPECT_THAT(StringField(record, "detail"), HasSubstr("clientAuth"));
    EXPECT_THAT(record.dump(), Not(HasSubstr("photos/uploader")));
  } else {
    EXPECT_EQ(s.error_code(), Code::UNAVAILABLE) << s.error_message();
    EXPECT_TRUE(NewRequestLines(before).empty());
  }
}

TEST_F(RefusalsTest, UntranslatableRequestsAreAudited) {
  const std::string admin = CustosdProcess::Principal("admin");
  auto kms = pb::KeyManagementService::NewStub(server_->Channel("admin"));
  absl::StatusOr<std::string> key =
      server_->CreateKeyFor("service-a", {pb::ENCRYPT});
  ASSERT_TRUE(key.ok()) << key.status();
  struct Case {
    const char* rpc;
    std::function<grpc::Status()> call;
    const char* field;  // the error names it
  };
  const std::vector<Case> cases = {
      {"CreateKey",
       [&] {
         pb::CreateKeyRequest req;
         req.set_purpose(static_cast<pb::KeyPurpose>(99));
         pb::Key resp;
         grpc::ClientContext ctx;
         return kms->CreateKey(&ctx, req, &resp);
       },
       "purpose"},
      {"CreateKey",
       [&] {
         pb::CreateKeyRequest req;
         req.mutable_rotation_period()->set_seconds(-5);
         pb::Key resp;
         grpc::ClientContext ctx;
         return kms->CreateKey(&ctx, req, &resp);
       },
       "rotation_period"},
      {"UpdateKey",
       [&] {
         pb::UpdateKeyRequest req;
         req.set_key(*key);
         req.add_update_mask("owner");
         pb::Key resp;
         grpc::ClientContext ctx;
         return kms->UpdateKey(&ctx, req, &resp);
       },
       "update_mask"},
      {"ListKeys",
       [&] {
         pb::ListKeysRequest req;
         req.set_state(static_cast<pb::KeyState>(99));
         pb::ListKeysResponse resp;
         grpc::ClientContext ctx;
         return kms->ListKeys(&ctx, req, &resp);
       },
       "state"},
      {"SetKeyPolicy",
       [&] {
         pb::SetKeyPolicyRequest req;
         req.set_key(*key);
         pb::PolicyBinding* b = req.mutable_policy()->add_bindings();
         b->add_principals("spiffe://custos.test/x");
         b->add_operations(static_cast<pb::KeyOperation>(42));
         pb::KeyPolicy resp;
         grpc::ClientContext ctx;
         return kms->SetKeyPolicy(&ctx, req, &resp);
       },
       "operations"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(c.rpc) + " " + c.field);
    const size_t before = LineCount();
    grpc::Status s = c.call();
    EXPECT_EQ(s.error_code(), Code::INVALID_ARGUMENT) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(c.field));
    Json record = ExpectOneRecord(before, c.rpc, "INVALID_ARGUMENT", admin);
    EXPECT_EQ(StringField(record, "outcome"), "FAILED");
    EXPECT_THAT(StringField(record, "detail"), HasSubstr(c.field));
  }
  // The audit service's own request checks.
  auto audit = pb::AuditService::NewStub(server_->Channel("auditor"));
  const std::string auditor = CustosdProcess::Principal("auditor");
  {
    const size_t before = LineCount();
    pb::ListAuditEventsRequest req;
    req.set_page_token("not-a-token");
    pb::ListAuditEventsResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = audit->ListAuditEvents(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), Code::INVALID_ARGUMENT);
    ExpectOneRecord(before, "ListAuditEvents", "INVALID_ARGUMENT", auditor);
  }
  {
    const size_t before = LineCount();
    pb::ListAuditEventsRequest req;
    req.mutable_filter()->set_outcome("MAYBE");
    pb::ListAuditEventsResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = audit->ListAuditEvents(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), Code::INVALID_ARGUMENT);
    ExpectOneRecord(before, "ListAuditEvents", "INVALID_ARGUMENT", auditor);
  }
}

TEST_F(RefusalsTest, ContextsOfControlBytesDoNotBloatTheLog) {
  absl::StatusOr<std::string> key =
      server_->CreateKeyFor("service-a", {pb::ENCRYPT, pb::DECRYPT});
  ASSERT_TRUE(key.ok()) << key.status();
  auto crypto = pb::CryptoService::NewStub(server_->Channel("service-a"));
  const std::string service_a = CustosdProcess::Principal("service-a");

  // Refused (over the 8 KiB context limit): no context in the record.
  size_t before = LineCount();
  pb::EncryptRequest req;
  req.set_key(*key);
  req.set_plaintext("secret");
  (*req.mutable_encryption_context())["k"] = std::string(60 * 1024, '\x01');
  pb::EncryptResponse resp;
  grpc::ClientContext ctx;
  grpc::Status s = crypto->Encrypt(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), Code::INVALID_ARGUMENT) << s.error_message();
  std::vector<std::string> lines = NewRequestLines(before);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_LE(lines[0].size(), 8192u);
  Json record = Json::parse(lines[0]);
  EXPECT_FALSE(record.contains("context")) << lines[0].substr(0, 300);
  EXPECT_THAT(StringField(record, "detail"), HasSubstr("not recorded"));

  // Allowed (a valid 8 KiB context of control bytes): the record is capped,
  // the ciphertext binds the whole context.
  req.mutable_encryption_context()->clear();
  (*req.mutable_encryption_context())["k"] = std::string(8000, '\x01');
  before = LineCount();
  grpc::ClientContext ctx2;
  s = crypto->Encrypt(&ctx2, req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  lines = NewRequestLines(before);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_LE(lines[0].size(), 8192u);
  record = Json::parse(lines[0]);
  EXPECT_EQ(StringField(record, "outcome"), "ALLOWED");
  EXPECT_TRUE(record["context"].contains("k"));
  pb::DecryptRequest open;
  open.set_ciphertext_blob(resp.ciphertext_blob());
  *open.mutable_encryption_context() = req.encryption_context();
  pb::DecryptResponse opened;
  grpc::ClientContext ctx3;
  ASSERT_TRUE(crypto->Decrypt(&ctx3, open, &opened).ok());
  EXPECT_EQ(opened.plaintext(), "secret");
  (*open.mutable_encryption_context())["k"].pop_back();
  grpc::ClientContext ctx4;
  EXPECT_EQ(crypto->Decrypt(&ctx4, open, &opened).error_code(),
            Code::INVALID_ARGUMENT);
  EXPECT_EQ(server_->VerifyAuditLog().code, 0);
}

TEST_F(RefusalsTest, ShippedCustosdRefusesTheTestingSection) {
  const std::string config = server_->dir() + "/shipped.yaml";
  ASSERT_TRUE(testing::WriteFileAtomically(
                  config,
                  testing::ReadAll(server_->config_path()) +
                      "\ntesting:\n  deletion_day_seconds: 1\n",
                  0600)
                  .ok());
  testing::ProcessResult shipped =
      testing::RunProcess({testing::BinDir() + "/custosd", "--config", config},
                          testing::EnvironmentWithout("CUSTOS_"), "/dev/null",
                          server_->dir() + "/shipped");
  EXPECT_EQ(shipped.code, 1) << shipped;
  EXPECT_THAT(shipped.err, HasSubstr("testing"));
  EXPECT_THAT(shipped.err, HasSubstr("custosd-test"));
}

// Its own server: every principal (admin included) gets 3 requests, and
// the bucket refills one request in 1000 s, so no test timing matters.
TEST(RateLimitTest, OverTheLimitIsResourceExhaustedAndAudited) {
  CustosdProcess::Options options;
  options.extra_config =
      "limits:\n  requests_per_second_per_principal: 0.001\n"
      "  burst_per_principal: 3\n";
  auto server = CustosdProcess::Start(options);
  ASSERT_TRUE(server.ok()) << server.status();
  auto random = [&](const std::string& who) {
    pb::GenerateRandomRequest req;
    req.set_number_of_bytes(8);
    pb::GenerateRandomResponse resp;
    grpc::ClientContext ctx;
    return pb::CryptoService::NewStub((*server)->Channel(who))
        ->GenerateRandom(&ctx, req, &resp);
  };
  for (int i = 0; i < 3; ++i) {
    grpc::Status s = random("service-a");
    EXPECT_TRUE(s.ok()) << i << ": " << s.error_message();
  }
  grpc::Status limited = random("service-a");
  EXPECT_EQ(limited.error_code(), Code::RESOURCE_EXHAUSTED)
      << limited.error_message();
  EXPECT_THAT(limited.error_message(), HasSubstr("rate limit"));
  EXPECT_TRUE(random("service-b").ok()) << "another principal is unaffected";
  std::vector<Json> records = testing::ReadRecords((*server)->audit_dir());
  int refused = 0;
  for (const Json& r : records) {
    if (StringField(r, "code") != "RESOURCE_EXHAUSTED") continue;
    ++refused;
    EXPECT_EQ(StringField(r, "principal"),
              CustosdProcess::Principal("service-a"));
    EXPECT_EQ(StringField(r, "operation"), "GenerateRandom");
  }
  EXPECT_EQ(refused, 1);
}

}  // namespace
}  // namespace custos
