// RevocationList and CrlWatcher over real certificates and CRLs made with
// OpenSSL (tests/support/test_certs): which certificates a directory of
// CRLs revokes, which files it refuses and why, and how the watcher picks
// up a changed directory and keeps the old lists when a change is bad.
#include "kms/server/revocation.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/testing/status_matchers.h"
#include "tests/support/test_certs.h"
#include "tests/support/test_token.h"

namespace custos::server {
namespace {

using ::custos::testing::IsOk;
using ::custos::testing::IsOkAndHolds;
using ::custos::testing::KeyAndCert;
using ::custos::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Optional;

class RevocationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::string> dir = custos::testing::MakeTempDir("crl");
    ASSERT_THAT(dir.status(), IsOk());
    dir_ = *dir;
    crl_dir_ = dir_ + "/crl";
    std::filesystem::create_directory(crl_dir_);
    ca_ = Must(custos::testing::MakeCa("Clients CA"));
    other_ca_ = Must(custos::testing::MakeCa("Other CA"));
    alice_ = Must(custos::testing::MakeCert(ca_, {}));
    bob_ = Must(custos::testing::MakeCert(ca_, {}));
    Write("ca.pem", ca_.cert_pem, dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  template <typename T>
  static T Must(absl::StatusOr<T> v) {
    EXPECT_THAT(v.status(), IsOk());
    return v.ok() ? *std::move(v) : T{};
  }
  void Write(const std::string& name, const std::string& contents,
             const std::string& dir = "") {
    ASSERT_THAT(
        custos::testing::WriteFileAtomically(
            (dir.empty() ? crl_dir_ : dir) + "/" + name, contents, 0644),
        IsOk());
  }
  std::shared_ptr<const RevocationList> Load(const std::string& bundle) {
    absl::StatusOr<std::shared_ptr<const RevocationList>> list =
        RevocationList::Load(crl_dir_, bundle);
    EXPECT_THAT(list.status(), IsOk());
    return list.ok() ? *list : nullptr;
  }
  std::unique_ptr<CrlWatcher> StartWatcher() {
    CrlWatcher::Options options;
    options.dir = crl_dir_;
    options.client_ca_path = dir_ + "/ca.pem";
    options.interval = absl::Hours(1);  // the test reloads by hand
    absl::StatusOr<std::unique_ptr<CrlWatcher>> watcher =
        CrlWatcher::Start(options);
    EXPECT_THAT(watcher.status(), IsOk());
    return watcher.ok() ? *std::move(watcher) : nullptr;
  }

  std::string dir_, crl_dir_;
  KeyAndCert ca_, other_ca_, alice_, bob_;
};

TEST_F(RevocationTest, AListedCertificateIsRevokedByItsFile) {
  Write("clients.crl", Must(custos::testing::MakeCrl(ca_, {alice_.cert_pem})));
  std::shared_ptr<const RevocationList> list = Load(ca_.cert_pem);
  ASSERT_NE(list, nullptr);
  EXPECT_EQ(list->crl_count(), 1u);
  EXPECT_EQ(list->revoked_count(), 1u);
  EXPECT_THAT(list->RevokedBy(alice_.cert_pem),
              IsOkAndHolds(Optional(std::string("clients.crl"))));
  EXPECT_THAT(list->RevokedBy(bob_.cert_pem),
              IsOkAndHolds(std::optional<std::string>()));
}

TEST_F(RevocationTest, EveryCertificateOfTheChainIsChecked) {
  Write("clients.crl", Must(custos::testing::MakeCrl(ca_, {alice_.cert_pem})));
  std::shared_ptr<const RevocationList> list = Load(ca_.cert_pem);
  ASSERT_NE(list, nullptr);
  EXPECT_THAT(list->RevokedBy(bob_.cert_pem + alice_.cert_pem),
              IsOkAndHolds(Optional(std::string("clients.crl"))));
}

TEST_F(RevocationTest, TheSameSerialFromAnotherIssuerIsNotRevoked) {
  // A CRL names (issuer, serial): another CA's CRL with alice's serial in
  // it does not revoke alice.
  Write("ca.pem", ca_.cert_pem + other_ca_.cert_pem, dir_);
  std::string crl =
      Must(custos::testing::MakeCrl(other_ca_, {alice_.cert_pem}));
  Write("other.crl", crl);
  std::shared_ptr<const RevocationList> list =
      Load(ca_.cert_pem + other_ca_.cert_pem);
  ASSERT_NE(list, nullptr);
  EXPECT_EQ(list->revoked_count(), 1u);
  EXPECT_THAT(list->RevokedBy(alice_.cert_pem),
              IsOkAndHolds(std::optional<std::string>()));
}

TEST_F(RevocationTest, DerAndSeveralPemCrlsInOneFileAreRead) {
  const std::string crl =
      Must(custos::testing::MakeCrl(ca_, {alice_.cert_pem}));
  Write("alice.der", Must(custos::testing::CrlPemToDer(crl)));
  Write("both.pem", Must(custos::testing::MakeCrl(ca_, {})) +
                        Must(custos::testing::MakeCrl(ca_, {bob_.cert_pem})));
  std::shared_ptr<const RevocationList> list = Load(ca_.cert_pem);
  ASSERT_NE(list, nullptr);
  EXPECT_EQ(list->crl_count(), 3u);
  EXPECT_THAT(list->RevokedBy(alice_.cert_pem),
              IsOkAndHolds(Optional(std::string("alice.der"))));
  EXPECT_THAT(list->RevokedBy(bob_.cert_pem),
              IsOkAndHolds(Optional(std::string("both.pem"))));
}

TEST_F(RevocationTest, AnEmptyDirectoryRevokesNothing) {
  std::shared_ptr<const RevocationList> list = Load(ca_.cert_pem);
  ASSERT_NE(list, nullptr);
  EXPECT_EQ(list->crl_count(), 0u);
  EXPECT_THAT(list->RevokedBy(alice_.cert_pem),
              IsOkAndHolds(std::optional<std::string>()));
}

TEST_F(RevocationTest, DotFilesAreSkipped) {
  Write(".clients.crl.partial", "-----BEGIN X509 CRL-----\ntrunc");
  std::shared_ptr<const RevocationList> list = Load(ca_.cert_pem);
  ASSERT_NE(list, nullptr);
  EXPECT_EQ(list->crl_count(), 0u);
}

TEST_F(RevocationTest, ACrlOfACaNotInTheBundleIsRefusedByName) {
  Write("other.crl", Must(custos::testing::MakeCrl(other_ca_, {})));
  EXPECT_THAT(RevocationList::Load(crl_dir_, ca_.cert_pem).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("other.crl"), HasSubstr("Other CA"),
                             HasSubstr("not a CA of tls.client_ca"))));
}

TEST_F(RevocationTest, ACrlWithABadSignatureIsRefused) {
  // Same issuer name as the bundle's CA, another key.
  KeyAndCert impostor = Must(custos::testing::MakeCa("Clients CA"));
  Write("forged.crl",
        Must(custos::testing::MakeCrl(impostor, {bob_.cert_pem})));
  EXPECT_THAT(RevocationList::Load(crl_dir_, ca_.cert_pem).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("forged.crl"), HasSubstr("signature"))));
}

TEST_F(RevocationTest, ATruncatedOrForeignFileIsRefusedByName) {
  const std::string crl = Must(custos::testing::MakeCrl(ca_, {}));
  Write("cut.crl",
        crl.substr(0, crl.size() / 2) + "\n-----END X509 CRL-----\n");
  EXPECT_THAT(
      RevocationList::Load(crl_dir_, ca_.cert_pem).status(),
      StatusIs(absl::StatusCode::kInvalidArgument,
               AllOf(HasSubstr("cut.crl"), HasSubstr("cannot be read"))));
  std::filesystem::remove(crl_dir_ + "/cut.crl");
  Write("README", "these are our CRLs\n");
  EXPECT_THAT(RevocationList::Load(crl_dir_, ca_.cert_pem).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("README"), HasSubstr("is not a CRL"))));
}

TEST_F(RevocationTest, AnOverdueCrlStillRevokes) {
  Write("old.crl", Must(custos::testing::MakeCrl(ca_, {alice_.cert_pem},
                                                 -absl::Hours(1))));
  std::shared_ptr<const RevocationList> list = Load(ca_.cert_pem);
  ASSERT_NE(list, nullptr);
  EXPECT_THAT(list->RevokedBy(alice_.cert_pem),
              IsOkAndHolds(Optional(std::string("old.crl"))));
}

TEST_F(RevocationTest, AnUnreadableChainIsAnError) {
  std::shared_ptr<const RevocationList> list = Load(ca_.cert_pem);
  ASSERT_NE(list, nullptr);
  EXPECT_THAT(list->RevokedBy("not a certificate").status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(RevocationTest, WatcherStartFailsNamingTheFieldForAMissingDirectory) {
  CrlWatcher::Options options;
  options.dir = dir_ + "/missing";
  options.client_ca_path = dir_ + "/ca.pem";
  EXPECT_THAT(
      CrlWatcher::Start(options).status(),
      StatusIs(absl::StatusCode::kNotFound,
               AllOf(HasSubstr("config: tls.crl_dir"), HasSubstr("missing"))));
}

TEST_F(RevocationTest, WatcherStartFailsNamingTheFieldForABadFile) {
  Write("other.crl", Must(custos::testing::MakeCrl(other_ca_, {})));
  CrlWatcher::Options options;
  options.dir = crl_dir_;
  options.client_ca_path = dir_ + "/ca.pem";
  EXPECT_THAT(CrlWatcher::Start(options).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("config: tls.crl_dir"),
                             HasSubstr("other.crl"))));
}

TEST_F(RevocationTest, WatcherSeesANewRevocationAfterAReload) {
  Write("clients.crl", Must(custos::testing::MakeCrl(ca_, {})));
  std::unique_ptr<CrlWatcher> watcher = StartWatcher();
  ASSERT_NE(watcher, nullptr);
  EXPECT_THAT(watcher->Check(alice_.cert_pem), IsOk());
  // The same file name, new contents: what OpenSSL's hashed directory
  // lookup (gRPC's set_crl_directory) would never read again.
  Write("clients.crl", Must(custos::testing::MakeCrl(ca_, {alice_.cert_pem})));
  EXPECT_THAT(watcher->ReloadIfChanged(), IsOk());
  EXPECT_THAT(watcher->Check(alice_.cert_pem),
              StatusIs(absl::StatusCode::kUnauthenticated,
                       AllOf(HasSubstr("revoked"), HasSubstr("clients.crl"))));
  EXPECT_THAT(watcher->Check(bob_.cert_pem), IsOk());
}

TEST_F(RevocationTest, WatcherKeepsTheOldListsWhileAChangeIsBad) {
  Write("clients.crl", Must(custos::testing::MakeCrl(ca_, {alice_.cert_pem})));
  std::unique_ptr<CrlWatcher> watcher = StartWatcher();
  ASSERT_NE(watcher, nullptr);
  Write("clients.crl", "-----BEGIN X509 CRL-----\nhalf a file");
  EXPECT_THAT(
      watcher->ReloadIfChanged(),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("clients.crl")));
  // Still revoked, and the bad file is reported once, not at every poll.
  EXPECT_THAT(watcher->Check(alice_.cert_pem),
              StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT(watcher->ReloadIfChanged(), IsOk());
  // Fixed: bob revoked, alice no longer.
  Write("clients.crl", Must(custos::testing::MakeCrl(ca_, {bob_.cert_pem})));
  EXPECT_THAT(watcher->ReloadIfChanged(), IsOk());
  EXPECT_THAT(watcher->Check(alice_.cert_pem), IsOk());
  EXPECT_THAT(watcher->Check(bob_.cert_pem),
              StatusIs(absl::StatusCode::kUnauthenticated));
}

TEST_F(RevocationTest, WatcherReadsTheCaBundleAgain) {
  // A CRL of a CA not yet in the bundle is refused, then accepted once the
  // bundle names the CA (the client CA rotated in).
  std::unique_ptr<CrlWatcher> watcher = StartWatcher();
  ASSERT_NE(watcher, nullptr);
  KeyAndCert carol = Must(custos::testing::MakeCert(other_ca_, {}));
  Write("other.crl",
        Must(custos::testing::MakeCrl(other_ca_, {carol.cert_pem})));
  EXPECT_THAT(watcher->ReloadIfChanged(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  Write("ca.pem", ca_.cert_pem + other_ca_.cert_pem, dir_);
  EXPECT_THAT(watcher->ReloadIfChanged(), IsOk());
  EXPECT_THAT(watcher->Check(carol.cert_pem),
              StatusIs(absl::StatusCode::kUnauthenticated));
}

}  // namespace
}  // namespace custos::server
