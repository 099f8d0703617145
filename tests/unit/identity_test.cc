// IdentityFromPem and IdentityCache: which name a client certificate
// identifies as, and which certificates are refused (SECURITY.md, threat 4).
// Chain and validity checks are gRPC's job and are not tested here.
#include "kms/server/identity.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "common/testing/status_matchers.h"
#include "tests/support/test_certs.h"

namespace custos::server {
namespace {

using ::custos::testing::CertSpec;
using ::custos::testing::IsOkAndHolds;
using ::custos::testing::KeyAndCert;
using ::custos::testing::MakeCa;
using ::custos::testing::MakeCert;
using ::custos::testing::MakeSelfSigned;
using ::custos::testing::StatusIs;
using ::testing::HasSubstr;

class IdentityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<KeyAndCert> ca = MakeCa("Custos Test Client CA");
    ASSERT_TRUE(ca.ok()) << ca.status();
    ca_ = new KeyAndCert(*std::move(ca));
  }
  static void TearDownTestSuite() {
    delete ca_;
    ca_ = nullptr;
  }

  // The PEM certificate of a leaf issued by the test CA.
  static std::string Issue(const CertSpec& spec) {
    absl::StatusOr<KeyAndCert> cert = MakeCert(*ca_, spec);
    EXPECT_TRUE(cert.ok()) << cert.status();
    return cert.ok() ? cert->cert_pem : std::string();
  }

  static KeyAndCert* ca_;
};

KeyAndCert* IdentityTest::ca_ = nullptr;

TEST_F(IdentityTest, SanUriWinsOverDnsAndCommonName) {
  CertSpec spec;
  spec.common_name = "cn-name";
  spec.dns_names = {"dns.example.org"};
  spec.uris = {"spiffe://example.org/ns/prod/sa/billing",
               "spiffe://example.org/second"};
  EXPECT_THAT(IdentityFromPem(Issue(spec)),
              IsOkAndHolds("spiffe://example.org/ns/prod/sa/billing"));
}

TEST_F(IdentityTest, FirstDnsNameWhenNoUri) {
  CertSpec spec;
  spec.common_name = "cn-name";
  spec.dns_names = {"billing.example.org", "other.example.org"};
  EXPECT_THAT(IdentityFromPem(Issue(spec)),
              IsOkAndHolds("billing.example.org"));
}

TEST_F(IdentityTest, CommonNameWhenNoSan) {
  CertSpec spec;
  spec.common_name = "billing-batch";
  EXPECT_THAT(IdentityFromPem(Issue(spec)), IsOkAndHolds("billing-batch"));
}

TEST_F(IdentityTest, IpSanIsNotAnIdentity) {
  CertSpec spec;
  spec.common_name = "cn-name";
  spec.ips = {"10.0.0.1"};
  EXPECT_THAT(IdentityFromPem(Issue(spec)), IsOkAndHolds("cn-name"));
}

TEST_F(IdentityTest, AcceptsClientAndServerAuthTogether) {
  CertSpec spec;
  spec.common_name = "both";
  spec.server_auth = true;
  EXPECT_THAT(IdentityFromPem(Issue(spec)), IsOkAndHolds("both"));
}

TEST_F(IdentityTest, RefusesCaCertificateAsClient) {
  CertSpec spec;
  spec.uris = {"spiffe://example.org/admin"};
  spec.is_ca = true;
  EXPECT_THAT(IdentityFromPem(Issue(spec)),
              StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("CA")));
}

TEST_F(IdentityTest, RefusesTheIssuingCaItself) {
  EXPECT_THAT(IdentityFromPem(ca_->cert_pem),
              StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("CA")));
}

// A leaf marked CA:TRUE must be refused whatever its keyUsage says: OpenSSL's
// X509_check_ca() answers 0 ("not a CA") when keyUsage lacks keyCertSign, even
// with basicConstraints CA:TRUE, so it alone does not implement this rule.
TEST_F(IdentityTest, RefusesCaTrueLeafWithoutKeyCertSign) {
  CertSpec spec;
  spec.uris = {"spiffe://example.org/admin"};
  const std::string leaf_pem = Issue(spec);
  ASSERT_FALSE(leaf_pem.empty());

  // Re-issue the leaf with basicConstraints CA:TRUE, keeping
  // keyUsage=digitalSignature and EKU clientAuth, signed by the real CA.
  auto read_cert = [](const std::string& pem) {
    std::unique_ptr<BIO, decltype(&BIO_free)> bio(
        BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())), BIO_free);
    return std::unique_ptr<X509, decltype(&X509_free)>(
        PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr), X509_free);
  };
  auto leaf = read_cert(leaf_pem);
  ASSERT_NE(leaf, nullptr);
  std::unique_ptr<BIO, decltype(&BIO_free)> key_bio(
      BIO_new_mem_buf(ca_->key_pem.data(),
                      static_cast<int>(ca_->key_pem.size())),
      BIO_free);
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> ca_key(
      PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr),
      EVP_PKEY_free);
  ASSERT_NE(ca_key, nullptr);
  std::unique_ptr<BASIC_CONSTRAINTS, decltype(&BASIC_CONSTRAINTS_free)> bc(
      BASIC_CONSTRAINTS_new(), BASIC_CONSTRAINTS_free);
  bc->ca = 0xff;
  ASSERT_EQ(X509_add1_ext_i2d(leaf.get(), NID_basic_constraints, bc.get(),
                              /*crit=*/1, X509V3_ADD_REPLACE),
            1);
  ASSERT_GT(X509_sign(leaf.get(), ca_key.get(), EVP_sha256()), 0);
  std::unique_ptr<BIO, decltype(&BIO_free)> out(BIO_new(BIO_s_mem()), BIO_free);
  ASSERT_EQ(PEM_write_bio_X509(out.get(), leaf.get()), 1);
  char* data = nullptr;
  long len = BIO_get_mem_data(out.get(), &data);
  const std::string ca_leaf_pem(data, static_cast<size_t>(len));

  EXPECT_THAT(IdentityFromPem(ca_leaf_pem),
              StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("CA")));
}

TEST_F(IdentityTest, RefusesCertificateWithoutEku) {
  CertSpec spec;
  spec.uris = {"spiffe://example.org/a"};
  spec.include_eku = false;
  EXPECT_THAT(
      IdentityFromPem(Issue(spec)),
      StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("clientAuth")));
}

TEST_F(IdentityTest, RefusesServerAuthOnlyCertificate) {
  CertSpec spec;
  spec.uris = {"spiffe://example.org/a"};
  spec.client_auth = false;
  spec.server_auth = true;
  EXPECT_THAT(
      IdentityFromPem(Issue(spec)),
      StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("clientAuth")));
}

TEST_F(IdentityTest, RefusesEkuWithNeitherClientNorServerAuth) {
  CertSpec spec;
  spec.uris = {"spiffe://example.org/a"};
  spec.client_auth = false;
  spec.server_auth = false;  // the factory then writes emailProtection
  EXPECT_THAT(
      IdentityFromPem(Issue(spec)),
      StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("clientAuth")));
}

TEST_F(IdentityTest, RefusesGarbage) {
  for (const std::string& pem :
       {std::string(), std::string("not a certificate"),
        std::string("-----BEGIN CERTIFICATE-----\nAAAA\n"
                    "-----END CERTIFICATE-----\n"),
        std::string("\0\0\0", 3)}) {
    EXPECT_THAT(
        IdentityFromPem(pem),
        StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("unreadable")))
        << pem;
  }
}

TEST_F(IdentityTest, RefusesTruncatedPem) {
  CertSpec spec;
  const std::string pem = Issue(spec);
  ASSERT_GT(pem.size(), 100u);
  EXPECT_THAT(IdentityFromPem(pem.substr(0, pem.size() / 2)),
              StatusIs(absl::StatusCode::kUnauthenticated));
}

TEST_F(IdentityTest, RefusesPrivateKeyInsteadOfCertificate) {
  absl::StatusOr<KeyAndCert> cert = MakeCert(*ca_, CertSpec());
  ASSERT_TRUE(cert.ok()) << cert.status();
  EXPECT_THAT(IdentityFromPem(cert->key_pem),
              StatusIs(absl::StatusCode::kUnauthenticated));
}

TEST_F(IdentityTest, RefusesIdentityWithControlCharacters) {
  struct Case {
    const char* what;
    CertSpec spec;
  };
  auto uri = [](std::string value) {
    CertSpec spec;
    spec.uris = {std::move(value)};
    return spec;
  };
  auto dns = [](std::string value) {
    CertSpec spec;
    spec.dns_names = {std::move(value)};
    return spec;
  };
  auto cn = [](std::string value) {
    CertSpec spec;
    spec.common_name = std::move(value);
    return spec;
  };
  const Case cases[] = {
      {"newline in URI", uri("spiffe://example.org/a\nadmin")},
      {"NUL in URI", uri(std::string("spiffe://example.org/a\0b", 24))},
      {"DEL in URI", uri("spiffe://example.org/a\x7f")},
      {"escape in DNS", dns("a\x1b[31m.example.org")},
      {"tab in CN", cn("client\tadmin")},
      {"space in CN", cn("client admin")},
      {"CR in CN", cn("client\r")},
  };
  for (const Case& c : cases) {
    EXPECT_THAT(
        IdentityFromPem(Issue(c.spec)),
        StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("identity")))
        << c.what;
  }
}

TEST_F(IdentityTest, RefusesCertificateWithNoName) {
  CertSpec spec;
  spec.common_name = "";
  EXPECT_THAT(
      IdentityFromPem(Issue(spec)),
      StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("identity")));
}

TEST_F(IdentityTest, RefusesOverlongIdentity) {
  CertSpec spec;
  spec.uris = {"spiffe://example.org/" + std::string(2000, 'a')};
  EXPECT_THAT(IdentityFromPem(Issue(spec)),
              StatusIs(absl::StatusCode::kUnauthenticated));
}

// A self-signed look-alike is still parsed (whether its issuer is trusted is
// decided by the TLS handshake); what matters here is that it gains nothing
// from IdentityFromPem beyond its claimed name, and that a CA:TRUE
// look-alike is refused.
TEST_F(IdentityTest, SelfSignedLookAlikeReportsOnlyItsClaim) {
  CertSpec spec;
  spec.uris = {"spiffe://example.org/admin"};
  absl::StatusOr<KeyAndCert> fake = MakeSelfSigned(spec);
  ASSERT_TRUE(fake.ok()) << fake.status();
  EXPECT_THAT(IdentityFromPem(fake->cert_pem),
              IsOkAndHolds("spiffe://example.org/admin"));
  spec.is_ca = true;
  fake = MakeSelfSigned(spec);
  ASSERT_TRUE(fake.ok()) << fake.status();
  EXPECT_THAT(IdentityFromPem(fake->cert_pem),
              StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("CA")));
}

TEST_F(IdentityTest, CacheReturnsTheSameAnswer) {
  CertSpec good_spec;
  good_spec.uris = {"spiffe://example.org/cached"};
  const std::string good = Issue(good_spec);
  CertSpec bad_spec;
  bad_spec.include_eku = false;
  const std::string bad = Issue(bad_spec);

  IdentityCache cache;
  for (int i = 0; i < 3; ++i) {
    EXPECT_THAT(cache.Lookup(good),
                IsOkAndHolds("spiffe://example.org/cached"));
    EXPECT_THAT(cache.Lookup(bad), StatusIs(absl::StatusCode::kUnauthenticated,
                                            HasSubstr("clientAuth")));
    EXPECT_THAT(cache.Lookup("garbage"),
                StatusIs(absl::StatusCode::kUnauthenticated));
  }
}

TEST_F(IdentityTest, CacheKeepsAnsweringPastItsCapacity) {
  IdentityCache cache;
  CertSpec spec;
  spec.uris = {"spiffe://example.org/first"};
  const std::string first = Issue(spec);
  ASSERT_THAT(cache.Lookup(first), IsOkAndHolds("spiffe://example.org/first"));
  // Fill the cache past its bound with distinct (garbage) entries.
  for (int i = 0; i < 5000; ++i) {
    ASSERT_FALSE(cache.Lookup("garbage-" + std::to_string(i)).ok());
  }
  EXPECT_THAT(cache.Lookup(first), IsOkAndHolds("spiffe://example.org/first"));
}

}  // namespace
}  // namespace custos::server
