// ReadTlsMaterial's start-up checks of tls.cert, tls.key and tls.client_ca,
// with real certificates (tests/support/test_certs): each refusal names the
// field and the file, so that a bad renewal stops custosd at start-up
// rather than failing every handshake.
#include "kms/server/server_settings.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "common/testing/status_matchers.h"
#include "tests/support/test_certs.h"
#include "tests/support/test_token.h"

namespace custos::server {
namespace {

using ::custos::testing::IsOk;
using ::custos::testing::KeyAndCert;
using ::custos::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

class ReadTlsMaterialTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::string> dir = custos::testing::MakeTempDir("tls");
    ASSERT_THAT(dir.status(), IsOk());
    dir_ = *dir;
    absl::StatusOr<KeyAndCert> ca = custos::testing::MakeCa("CA");
    ASSERT_THAT(ca.status(), IsOk());
    ca_ = *ca;
    custos::testing::CertSpec spec;
    spec.dns_names = {"localhost"};
    spec.server_auth = true;
    absl::StatusOr<KeyAndCert> server = custos::testing::MakeCert(ca_, spec);
    ASSERT_THAT(server.status(), IsOk());
    server_ = *server;
    Write("server.pem", server_.cert_pem);
    Write("server.key", server_.key_pem);
    Write("ca.pem", ca_.cert_pem);
    tls_.cert = dir_ + "/server.pem";
    tls_.key = dir_ + "/server.key";
    tls_.client_ca = dir_ + "/ca.pem";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  void Write(const std::string& name, const std::string& contents) {
    ASSERT_THAT(
        custos::testing::WriteFileAtomically(dir_ + "/" + name, contents, 0600),
        IsOk());
  }

  std::string dir_;
  KeyAndCert ca_, server_;
  Config::Tls tls_;
};

TEST_F(ReadTlsMaterialTest, AMatchingPairAndABundleAreRead) {
  absl::StatusOr<TlsMaterial> m = ReadTlsMaterial(tls_);
  ASSERT_THAT(m.status(), IsOk());
  EXPECT_EQ(m->cert, server_.cert_pem);
  EXPECT_EQ(m->client_ca, ca_.cert_pem);
}

TEST_F(ReadTlsMaterialTest, AKeyOfAnotherCertificateIsRefusedNamingTlsKey) {
  absl::StatusOr<KeyAndCert> other = custos::testing::MakeCert(ca_, {});
  ASSERT_THAT(other.status(), IsOk());
  Write("server.key", other->key_pem);
  EXPECT_THAT(ReadTlsMaterial(tls_).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("config: tls.key"),
                             HasSubstr("is not the key of"))));
}

TEST_F(ReadTlsMaterialTest, FilesWithoutPemAreRefusedByField) {
  Write("server.pem", "not a certificate\n");
  EXPECT_THAT(ReadTlsMaterial(tls_).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("config: tls.cert")));
  Write("server.pem", server_.cert_pem);
  Write("server.key", server_.cert_pem);  // a certificate, not a key
  EXPECT_THAT(ReadTlsMaterial(tls_).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("config: tls.key")));
  Write("server.key", server_.key_pem);
  Write("ca.pem", "");
  EXPECT_THAT(ReadTlsMaterial(tls_).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("config: tls.client_ca")));
}

TEST_F(ReadTlsMaterialTest, AMissingFileIsNotFoundNamingTheField) {
  tls_.client_ca = dir_ + "/missing.pem";
  EXPECT_THAT(ReadTlsMaterial(tls_).status(),
              StatusIs(absl::StatusCode::kNotFound,
                       AllOf(HasSubstr("config: tls.client_ca"),
                             HasSubstr("missing.pem"))));
}

TEST_F(ReadTlsMaterialTest, AMissingCrlDirectoryStopsTheCredentials) {
  tls_.crl_dir = dir_ + "/crl";
  EXPECT_THAT(
      ServerTlsCredentials(tls_).status(),
      StatusIs(absl::StatusCode::kNotFound, HasSubstr("config: tls.crl_dir")));
  std::filesystem::create_directory(tls_.crl_dir);
  EXPECT_THAT(ServerTlsCredentials(tls_).status(), IsOk());
}

}  // namespace
}  // namespace custos::server
