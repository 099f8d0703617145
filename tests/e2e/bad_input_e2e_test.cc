// docs/security.md's bad inputs, table-driven, against a real custosd over
// mutual TLS. Each case asserts a clear typed error, exactly one audit
// record for the call (when the call reaches custosd: transport-level
// refusals such as oversized messages are gRPC's), and that nothing is lost
// (the server keeps serving and earlier blobs still open). Blob truncation,
// bit flips and the certificate cases are in custosd_e2e_test.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "custos/v1/kms.grpc.pb.h"
#include "kms/ciphertext_blob.h"
#include "tests/support/audit_records.h"
#include "tests/support/custosd_process.h"

namespace custos {
namespace {

namespace pb = ::custos::v1;
using ::custos::testing::CustosdProcess;
using Code = grpc::StatusCode;
using Context = std::map<std::string, std::string>;

class BadInputTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto server = CustosdProcess::Start({});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    key_ = new std::string(NewKey());
    other_key_ = new std::string(NewKey());
    pb::GenerateDataKeyResponse dk;
    ASSERT_TRUE(DataKey(*key_, kContext(), &dk).ok());
    blob_ = new std::string(dk.ciphertext_blob());
    plaintext_ = new std::string(dk.plaintext());
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  static Context kContext() { return {{"tenant", "acme"}, {"app", "photos"}}; }

  static std::string NewKey() {
    absl::StatusOr<std::string> key = server_->CreateKeyFor(
        "service-a", {pb::GENERATE_DATA_KEY, pb::ENCRYPT, pb::DECRYPT});
    EXPECT_TRUE(key.ok()) << key.status();
    return key.value_or("");
  }

  static grpc::Status DataKey(const std::string& key, const Context& context,
                              pb::GenerateDataKeyResponse* resp,
                              uint32_t bytes = 0) {
    pb::GenerateDataKeyRequest req;
    req.set_key(key);
    req.set_number_of_bytes(bytes);
    req.mutable_encryption_context()->insert(context.begin(), context.end());
    grpc::ClientContext ctx;
    return pb::CryptoService::NewStub(server_->Channel("service-a"))
        ->GenerateDataKey(&ctx, req, resp);
  }

  static grpc::Status Decrypt(const std::string& blob, const Context& context,
                              pb::DecryptResponse* resp) {
    pb::DecryptRequest req;
    req.set_ciphertext_blob(blob);
    req.mutable_encryption_context()->insert(context.begin(), context.end());
    grpc::ClientContext ctx;
    return pb::CryptoService::NewStub(server_->Channel("service-a"))
        ->Decrypt(&ctx, req, resp);
  }

  static size_t Records() {
    return testing::ReadRecords(server_->audit_dir()).size();
  }

  // After each case: the server still serves and the first blob opens.
  static void ExpectNothingLost() {
    pb::DecryptResponse opened;
    ASSERT_TRUE(Decrypt(*blob_, kContext(), &opened).ok());
    EXPECT_EQ(opened.plaintext(), *plaintext_);
  }

  static CustosdProcess* server_;
  static std::string *key_, *other_key_, *blob_, *plaintext_;
};
CustosdProcess* BadInputTest::server_ = nullptr;
std::string* BadInputTest::key_ = nullptr;
std::string* BadInputTest::other_key_ = nullptr;
std::string* BadInputTest::blob_ = nullptr;
std::string* BadInputTest::plaintext_ = nullptr;

TEST_F(BadInputTest, MalformedBlobsAreOneUniformInvalidCiphertext) {
  std::string other_version = *blob_;
  other_version[kms::kBlobHeaderSize - 1] ^= 0x01;  // version 1 -> 0 or 3
  std::string other_key = *blob_;
  other_key.replace(2, kms::kKeyIdSize, *other_key_);  // a real, usable key
  std::string unknown_format = *blob_;
  unknown_format[0] = 0x7f;
  std::string bad_id_length = *blob_;
  bad_id_length[1] = static_cast<char>(0xff);  // oversized length field
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"key id rewritten to another valid key", other_key},
      {"version changed", other_version},
      {"unknown format byte", unknown_format},
      {"oversized key id length", bad_id_length},
      {"trailing bytes", *blob_ + "x"},
      {"IV and tag cut short", blob_->substr(0, kms::kMinBlobSize - 1)},
      {"empty", ""},
      {"far too long", std::string(kms::kMaxBlobSize + 1, '\x01')},
  };
  for (const auto& [name, blob] : cases) {
    SCOPED_TRACE(name);
    const size_t before = Records();
    pb::DecryptResponse resp;
    grpc::Status s = Decrypt(blob, kContext(), &resp);
    EXPECT_EQ(s.error_code(), Code::INVALID_ARGUMENT) << s.error_message();
    EXPECT_EQ(s.error_message(), "invalid ciphertext");
    EXPECT_TRUE(resp.plaintext().empty());
    EXPECT_EQ(Records(), before + 1);
  }
  ExpectNothingLost();
}

TEST_F(BadInputTest, AnyContextButTheExactOneFailsAndOrderDoesNot) {
  const std::vector<std::pair<std::string, Context>> cases = {
      {"pair missing", {{"tenant", "acme"}}},
      {"pair extra", {{"tenant", "acme"}, {"app", "photos"}, {"x", "y"}}},
      {"key re-cased", {{"Tenant", "acme"}, {"app", "photos"}}},
      {"value re-cased", {{"tenant", "ACME"}, {"app", "photos"}}},
      {"empty value instead of absent",
       {{"tenant", "acme"}, {"app", "photos"}, {"v", ""}}},
      {"no context", {}},
  };
  for (const auto& [name, context] : cases) {
    SCOPED_TRACE(name);
    const size_t before = Records();
    pb::DecryptResponse resp;
    grpc::Status s = Decrypt(*blob_, context, &resp);
    EXPECT_EQ(s.error_code(), Code::INVALID_ARGUMENT);
    EXPECT_EQ(s.error_message(), "invalid ciphertext");
    EXPECT_EQ(Records(), before + 1);
  }
  // The same pairs in the other order (protobuf maps carry no order).
  Context reordered;
  reordered.emplace("app", "photos");
  reordered.emplace("tenant", "acme");
  pb::DecryptResponse resp;
  EXPECT_TRUE(Decrypt(*blob_, reordered, &resp).ok());
}

TEST_F(BadInputTest, MalformedContextsNameTheField) {
  Context too_many;
  for (int i = 0; i < 65; ++i) too_many[absl::StrCat("k", i)] = "v";
  const std::vector<std::pair<std::string, Context>> cases = {
      {"NUL in a value", {{"tenant", std::string("a\0b", 3)}}},
      {"NUL in a key", {{std::string("t\0", 2), "acme"}}},
      {"65 pairs", too_many},
      {"empty key", {{"", "acme"}}},
  };
  for (const auto& [name, context] : cases) {
    SCOPED_TRACE(name);
    const size_t before = Records();
    pb::GenerateDataKeyResponse resp;
    grpc::Status s = DataKey(*key_, context, &resp);
    EXPECT_EQ(s.error_code(), Code::INVALID_ARGUMENT) << s.error_message();
    EXPECT_THAT(s.error_message(), ::testing::HasSubstr("context"));
    EXPECT_TRUE(resp.plaintext().empty());
    EXPECT_EQ(Records(), before + 1);
  }
  // A 64 KiB value exceeds the request limit: gRPC refuses it before
  // custosd sees it.
  pb::GenerateDataKeyResponse resp;
  grpc::Status s =
      DataKey(*key_, {{"big", std::string(64 * 1024, 'v')}}, &resp);
  EXPECT_EQ(s.error_code(), Code::RESOURCE_EXHAUSTED);
  ExpectNothingLost();
}

TEST_F(BadInputTest, HostileKeyNamesAreRefusedWithoutAnExistenceOracle) {
  const std::vector<std::string> names = {
      "",
      std::string(10 * 1024, 'k'),
      "../",
      "../../etc/passwd",
      "*",
      "alias/*",
      "'; DROP TABLE keys;--",
      "k-aaaaaaaaaaaaaaaaaaaaaaaaaa",  // well formed, unknown
      "alias/never-made"};
  for (const std::string& name : names) {
    SCOPED_TRACE(name.substr(0, 40));
    const size_t before = Records();
    pb::GenerateDataKeyResponse resp;
    grpc::Status s = DataKey(name, kContext(), &resp);
    // The same answer whether the name is malformed or merely unknown.
    EXPECT_EQ(s.error_code(), Code::PERMISSION_DENIED) << s.error_message();
    EXPECT_TRUE(resp.plaintext().empty());
    EXPECT_EQ(Records(), before + 1);
    // An admin learns it is not found (or malformed), nothing more.
    pb::GetKeyRequest get;
    get.set_key(name);
    pb::Key key;
    grpc::ClientContext ctx;
    s = pb::KeyManagementService::NewStub(server_->Channel("admin"))
            ->GetKey(&ctx, get, &key);
    EXPECT_THAT(s.error_code(),
                ::testing::AnyOf(Code::NOT_FOUND, Code::INVALID_ARGUMENT))
        << s.error_message();
    EXPECT_EQ(Records(), before + 2);
  }
  ExpectNothingLost();
}

// Key names are proto3 strings: protobuf refuses invalid UTF-8 in them when
// it parses the request, so such a call never reaches custosd (and so has
// no audit record of custosd's); it must still fail and release nothing.
TEST_F(BadInputTest, NonUtf8KeyNamesNeverReachTheService) {
  for (const std::string name : {"k-\xff\xfe", "alias/\xc3\x28"}) {
    const size_t before = Records();
    pb::GenerateDataKeyResponse resp;
    grpc::Status s = DataKey(name, kContext(), &resp);
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.error_code(), Code::UNKNOWN) << s.error_message();
    EXPECT_TRUE(resp.plaintext().empty());
    EXPECT_EQ(Records(), before) << "refused by protobuf, not by custosd";
  }
  ExpectNothingLost();
}

TEST_F(BadInputTest, DataKeySizesOutsideTheRangeAreRefused) {
  for (uint32_t bytes : {1025u, 1u << 20, 0xffffffffu}) {
    SCOPED_TRACE(bytes);
    const size_t before = Records();
    pb::GenerateDataKeyResponse resp;
    grpc::Status s = DataKey(*key_, kContext(), &resp, bytes);
    EXPECT_EQ(s.error_code(), Code::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), ::testing::HasSubstr("number_of_bytes"));
    EXPECT_EQ(Records(), before + 1);
  }
  // A spec and a size together, and an unknown spec: refused by name, and
  // audited like every refusal.
  for (int spec : {static_cast<int>(pb::AES_128), 77}) {
    SCOPED_TRACE(spec);
    pb::GenerateDataKeyRequest req;
    req.set_key(*key_);
    req.set_key_spec(static_cast<pb::DataKeySpec>(spec));
    if (spec == pb::AES_128) req.set_number_of_bytes(16);
    const size_t before = Records();
    pb::GenerateDataKeyResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = pb::CryptoService::NewStub(server_->Channel("service-a"))
                         ->GenerateDataKey(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), Code::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), ::testing::HasSubstr("key_spec"));
    EXPECT_EQ(Records(), before + 1);
  }
  // 0 means "not set": the default AES-256 key.
  pb::GenerateDataKeyResponse resp;
  ASSERT_TRUE(DataKey(*key_, kContext(), &resp, 0).ok());
  EXPECT_EQ(resp.plaintext().size(), 32u);
  ExpectNothingLost();
}

}  // namespace
}  // namespace custos
