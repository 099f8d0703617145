// IdentityFromPem and IdentityCache: which name a client certificate
// identifies as, and which certificates are refused (docs/security.md, threat 4).
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
#include "kms/authorizer.h"
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
              IsOkAndHolds("dns:billing.example.org"));
}

TEST_F(IdentityTest, CommonNameWhenNoSan) {
  CertSpec spec;
  spec.common_name = "billing-batch";
  EXPECT_THAT(IdentityFromPem(Issue(spec)), IsOkAndHolds("cn:billing-batch"));
}

TEST_F(IdentityTest, IpSanIsNotAnIdentity) {
  CertSpec spec;
  spec.common_name = "cn-name";
  spec.ips = {"10.0.0.1"};
  EXPECT_THAT(IdentityFromPem(Issue(spec)), IsOkAndHolds("cn:cn-name"));
}

TEST_F(IdentityTest, AcceptsClientAndServerAuthTogether) {
  CertSpec spec;
  spec.common_name = "both";
  spec.server_auth = true;
  EXPECT_THAT(IdentityFromPem(Issue(spec)), IsOkAndHolds("cn:both"));
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
    EXPECT_THAT(cache.Lookup(good).principal,
                IsOkAndHolds("spiffe://example.org/cached"));
    EXPECT_THAT(
        cache.Lookup(bad).principal,
        StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("clientAuth")));
    EXPECT_EQ(cache.Lookup(bad).fingerprint, CertificateFingerprint(bad));
    EXPECT_THAT(cache.Lookup("garbage").principal,
                StatusIs(absl::StatusCode::kUnauthenticated));
  }
}

TEST_F(IdentityTest, CacheKeepsAnsweringPastItsCapacity) {
  IdentityCache cache;
  CertSpec spec;
  spec.uris = {"spiffe://example.org/first"};
  const std::string first = Issue(spec);
  ASSERT_THAT(cache.Lookup(first).principal,
              IsOkAndHolds("spiffe://example.org/first"));
  // Fill the cache past its bound with distinct (garbage) entries.
  for (int i = 0; i < 5000; ++i) {
    ASSERT_FALSE(cache.Lookup("garbage-" + std::to_string(i)).principal.ok());
  }
  EXPECT_THAT(cache.Lookup(first).principal,
              IsOkAndHolds("spiffe://example.org/first"));
}

// The reserved prefix: custos:system is the principal of the service's own
// work, and no certificate may claim it (or any custos: name), in any
// letter case, as a CN or as a URI.
TEST_F(IdentityTest, RefusesReservedCustosNames) {
  auto cn = [](std::string value) {
    CertSpec spec;
    spec.common_name = std::move(value);
    return spec;
  };
  auto uri = [](std::string value) {
    CertSpec spec;
    spec.uris = {std::move(value)};
    return spec;
  };
  for (const CertSpec& spec :
       {cn("custos:system"), cn("CUSTOS:system"), cn("Custos:anything"),
        uri("custos:system"), uri("CUSTOS:system"), uri("custos://system")}) {
    EXPECT_THAT(
        IdentityFromPem(Issue(spec)),
        StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("reserved")))
        << spec.common_name << " " << (spec.uris.empty() ? "" : spec.uris[0]);
  }
}

// Types never collide: a URI cannot pose as a DNS name, a CN or a refused
// certificate's fingerprint.
TEST_F(IdentityTest, RefusesUrisSpelledAsAnotherType) {
  for (const char* value : {"dns:admin.example.org", "cn:admin", "CN:admin",
                            "cert-sha256:00ff", "no-scheme/admin"}) {
    CertSpec spec;
    spec.uris = {value};
    EXPECT_THAT(
        IdentityFromPem(Issue(spec)),
        StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("SAN URI")))
        << value;
  }
}

// A CN spelled like a SPIFFE URI is a CN: it gets the cn: prefix and does
// not match the URI principal, as an admin or in a key policy.
TEST_F(IdentityTest, CommonNameSpelledLikeAUriDoesNotMatchTheUri) {
  CertSpec spec;
  spec.common_name = "spiffe://example.org/admin";
  absl::StatusOr<std::string> identity = IdentityFromPem(Issue(spec));
  ASSERT_THAT(identity, IsOkAndHolds("cn:spiffe://example.org/admin"));
  const kms::Authorizer authorizer(
      kms::Roles{{"spiffe://example.org/admin", "spiffe://example.org/*"}, {}});
  EXPECT_FALSE(authorizer.IsAdmin(*identity));
  kms::Key key;
  key.id = "k-x";
  kms::PolicyBinding binding;
  binding.principals = {"spiffe://example.org/admin"};
  binding.operations = {kms::KeyOperation::kEncrypt};
  key.policy.bindings.push_back(binding);
  const kms::Caller caller{*identity, "", ""};
  const kms::EncryptionContext context;
  EXPECT_THAT(authorizer.Check(caller, kms::Rpc::kEncrypt, &key,
                               kms::KeyOperation::kEncrypt, &context, nullptr),
              StatusIs(absl::StatusCode::kPermissionDenied));
  // The control: the URI itself is allowed.
  const kms::Caller uri_caller{"spiffe://example.org/admin", "", ""};
  EXPECT_TRUE(authorizer
                  .Check(uri_caller, kms::Rpc::kEncrypt, &key,
                         kms::KeyOperation::kEncrypt, &context, nullptr)
                  .ok());
  // The same text as a DNS SAN is refused (not a host name) rather than
  // turned into something else.
  CertSpec dns;
  dns.dns_names = {"spiffe://example.org/admin"};
  EXPECT_THAT(IdentityFromPem(Issue(dns)),
              StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("DNS")));
}

TEST_F(IdentityTest, DnsNamesAreLowerCasedHostNames) {
  CertSpec spec;
  spec.dns_names = {"Billing.Example.ORG"};
  EXPECT_THAT(IdentityFromPem(Issue(spec)),
              IsOkAndHolds("dns:billing.example.org"));
  for (const char* bad : {"*.example.org", "a..b", "under_score.org"}) {
    CertSpec b;
    b.dns_names = {bad};
    EXPECT_THAT(IdentityFromPem(Issue(b)),
                StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("DNS")))
        << bad;
  }
}

TEST_F(IdentityTest, Utf8CommonNameIsKeptAsUtf8) {
  CertSpec spec;
  spec.common_name = "M\xC3\xBCller-batch";  // Müller
  EXPECT_THAT(IdentityFromPem(Issue(spec)),
              IsOkAndHolds("cn:M\xC3\xBCller-batch"));
}

TEST_F(IdentityTest, PrincipalLengthIsCappedAt512Bytes) {
  const std::string prefix = "spiffe://example.org/";
  CertSpec spec;
  spec.uris = {prefix + std::string(512 - prefix.size(), 'a')};
  EXPECT_THAT(IdentityFromPem(Issue(spec)), IsOkAndHolds(spec.uris[0]));
  spec.uris = {prefix + std::string(513 - prefix.size(), 'a')};
  EXPECT_THAT(IdentityFromPem(Issue(spec)),
              StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("512")));
}

// The authorizer refuses a reserved principal whatever the roles say, so
// that a development principal or another identity source cannot act as
// the service.
TEST_F(IdentityTest, AuthorizerRefusesReservedCallers) {
  const kms::Authorizer authorizer(kms::Roles{{"*"}, {"*"}});
  EXPECT_FALSE(authorizer.IsAdmin("custos:system"));
  EXPECT_FALSE(authorizer.IsAuditor("Custos:System"));
  const kms::Caller caller{"custos:system", "", ""};
  EXPECT_THAT(
      authorizer.Check(caller, kms::Rpc::kGenerateRandom, nullptr,
                       kms::KeyOperation{}, nullptr, nullptr),
      StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("reserved")));
}

// A refused certificate is named by the hash of its DER encoding: stable,
// distinct per certificate, and free of anything it claims.
TEST_F(IdentityTest, FingerprintIsTheCertificateHash) {
  CertSpec spec;
  spec.common_name = "custos:system";
  const std::string a = Issue(spec);
  const std::string b = Issue(spec);
  const std::string fa = CertificateFingerprint(a);
  EXPECT_EQ(fa, CertificateFingerprint(a));
  EXPECT_NE(fa, CertificateFingerprint(b));  // another serial and key
  EXPECT_EQ(fa.size(), std::string("cert-sha256:").size() + 64);
  EXPECT_EQ(fa.rfind("cert-sha256:", 0), 0u);
  EXPECT_EQ(fa.find("custos:"), std::string::npos);
  // The same certificate followed by other text: the same hash (of the
  // DER, not of the PEM bytes).
  EXPECT_EQ(CertificateFingerprint(a + "trailing text\n"), fa);
  EXPECT_EQ(CertificateFingerprint("garbage").rfind("cert-sha256:", 0), 0u);
}

}  // namespace
}  // namespace custos::server
