// Certificate rotation and revocation on a running custosd, end to end: a
// real custosd (tls.crl_dir set, files re-read every second) and real
// clients over mutual TLS. The shell commands and ca.cnf of
// docs/operations.md ("Certificate rotation and revocation") are read from
// the document and run as they stand: `openssl ca` revokes service-a and
// writes the CRL, `mv` installs it and renews the server certificate. Every
// check polls with a generous bound (30 s) and asserts behaviour; the
// process id proves that nothing restarted.
#include <gmock/gmock.h>
#include <grpc/grpc_security.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
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
using ::custos::testing::KeyAndCert;
using ::custos::testing::ProcessResult;
using ::testing::HasSubstr;

constexpr char kServiceA[] = "spiffe://custos.test/photos/uploader";

// The fenced block that follows "<!-- tls_reload_e2e_test:NAME -->" in
// docs/operations.md, without its fences; empty if there is none.
std::string DocBlock(const std::string& name) {
  const std::string doc = custos::testing::ReadAll(
      custos::testing::SourceDir() + "/docs/operations.md");
  const std::string marker = "<!-- tls_reload_e2e_test:" + name + " -->\n";
  const size_t at = doc.find(marker);
  if (at == std::string::npos) return "";
  const size_t open = doc.find("```", at + marker.size());
  const size_t body = doc.find('\n', open);
  const size_t close = doc.find("\n```", body);
  if (open != at + marker.size() || body == std::string::npos ||
      close == std::string::npos) {
    return "";
  }
  return doc.substr(body + 1, close - body);
}

// Polls `probe` every 200 ms until it holds, for up to 30 s.
bool Eventually(const std::function<bool()>& probe) {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (true) {
    if (probe()) return true;
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

// One call that any authenticated client may make.
grpc::Status Call(const std::shared_ptr<grpc::Channel>& channel,
                  grpc::ClientContext* context = nullptr) {
  grpc::ClientContext own;
  if (context == nullptr) context = &own;
  context->set_deadline(std::chrono::system_clock::now() +
                        std::chrono::seconds(5));
  pb::GenerateRandomRequest request;
  request.set_number_of_bytes(16);
  pb::GenerateRandomResponse response;
  return pb::CryptoService::NewStub(channel)->GenerateRandom(context, request,
                                                             &response);
}

class TlsReloadE2eTest : public ::testing::Test {
 protected:
  // Starts custosd with tls.crl_dir (empty) and `extra_config`. The CRL
  // directory is made before custosd starts (it must exist) and linked as
  // DIR/pki/crl, so that the documented commands, run in DIR/pki (the dev
  // CA's files and the server's, as in /etc/custos/tls), find it as crl/.
  void StartServer(const std::string& extra_config = "") {
    absl::StatusOr<std::string> outside =
        custos::testing::MakeTempDir("custos-crl");
    ASSERT_TRUE(outside.ok()) << outside.status();
    outside_ = *outside;
    const std::string crl_dir = outside_ + "/crl";
    std::filesystem::create_directory(crl_dir);
    CustosdProcess::Options options;
    options.tls_settings = {"crl_dir: " + crl_dir,
                            "reload_interval_seconds: 1"};
    options.extra_config = extra_config;
    auto server = CustosdProcess::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    pki_ = server_->dir() + "/pki";
    std::filesystem::create_directory_symlink(crl_dir, pki_ + "/crl");
    pid_ = server_->pid();
  }
  void TearDown() override {
    server_.reset();
    if (!outside_.empty()) std::filesystem::remove_all(outside_);
  }

  // Runs a shell block of docs/operations.md in DIR/pki with bash.
  void RunDocBlock(const std::string& name) {
    const std::string block = DocBlock(name);
    ASSERT_FALSE(block.empty()) << "no block " << name << " in operations.md";
    ProcessResult r = custos::testing::RunProcess(
        {"/bin/bash", "-c",
         absl::StrCat("set -euo pipefail\ncd '", pki_, "'\n", block)},
        custos::testing::EnvironmentWithout("CUSTOS_"), "/dev/null",
        absl::StrCat(server_->dir(), "/doc-", name));
    ASSERT_EQ(r.code, 0) << name << ":\n" << block << r;
  }

  // Revokes service-a exactly as the document says.
  void RevokeServiceAAsDocumented() {
    const std::string ca_cnf = DocBlock("ca.cnf");
    ASSERT_FALSE(ca_cnf.empty());
    ASSERT_TRUE(
        custos::testing::WriteFileAtomically(pki_ + "/ca.cnf", ca_cnf, 0644)
            .ok());
    RunDocBlock("ca-setup");
    RunDocBlock("revoke");
    RunDocBlock("install-crl");
  }

  KeyAndCert DevCa() const {
    return {server_->ReadPki("ca.key"), server_->ReadPki("ca.pem")};
  }

  // The serial number of the certificate custosd presents to a new
  // connection.
  std::string ServedSerial() {
    grpc::ClientContext context;
    grpc::Status s = Call(server_->Channel("admin"), &context);
    if (!s.ok()) return "call failed: " + s.error_message();
    std::vector<grpc::string_ref> pems =
        context.auth_context()->FindPropertyValues("x509_pem_cert");
    if (pems.empty()) return "no x509_pem_cert";
    absl::StatusOr<std::string> serial =
        custos::testing::SerialHex(std::string(pems[0].data(), pems[0].size()));
    return serial.ok() ? *serial : serial.status().ToString();
  }

  void ExpectSameProcess() {
    EXPECT_TRUE(server_->running());
    EXPECT_EQ(server_->pid(), pid_);
    EXPECT_EQ(kill(pid_, 0), 0) << "custosd is gone";
  }

  std::unique_ptr<CustosdProcess> server_;
  std::string outside_;
  std::string pki_;
  pid_t pid_ = -1;
};

TEST_F(TlsReloadE2eTest, RevokedClientIsRefusedOnNewConnectionsWithoutRestart) {
  ASSERT_NO_FATAL_FAILURE(StartServer());
  std::shared_ptr<grpc::Channel> open_before = server_->Channel("service-a");
  ASSERT_TRUE(Call(open_before).ok());
  ASSERT_TRUE(Call(server_->Channel("service-a")).ok());

  ASSERT_NO_FATAL_FAILURE(RevokeServiceAAsDocumented());

  grpc::Status refused;
  EXPECT_TRUE(Eventually([&] {
    refused = Call(server_->Channel("service-a"));  // a new connection
    return !refused.ok();
  })) << "service-a still accepted 30 s after its CRL was installed";
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE)
      << refused.error_message();
  // Stays refused, and only service-a is.
  EXPECT_FALSE(Call(server_->Channel("service-a")).ok());
  EXPECT_TRUE(Call(server_->Channel("service-b")).ok());
  EXPECT_TRUE(Call(server_->Channel("admin")).ok());
  // A connection is checked when it is made: the one opened before the
  // revocation lasts until limits.max_connection_age_seconds (300 s here;
  // see MaxConnectionAgeEndsARevokedClientsOpenConnection).
  EXPECT_TRUE(Call(open_before).ok());
  const std::string log = custos::testing::ReadAll(server_->log_path());
  EXPECT_THAT(log,
              HasSubstr("tls.crl_dir: 1 CRL(s) from 1 file(s), 1 revoked"));
  EXPECT_THAT(log,
              HasSubstr(absl::StrCat("tls: refused the client '", kServiceA,
                                     "': client certificate revoked")));
  EXPECT_THAT(log, HasSubstr("custos-ca.crl"));
  ExpectSameProcess();
}

TEST_F(TlsReloadE2eTest, RenewedServerCertificateIsServedWithoutRestart) {
  ASSERT_NO_FATAL_FAILURE(StartServer());
  absl::StatusOr<std::string> old_serial =
      custos::testing::SerialHex(server_->ReadPki("server.pem"));
  ASSERT_TRUE(old_serial.ok()) << old_serial.status();
  ASSERT_EQ(ServedSerial(), *old_serial);

  custos::testing::CertSpec spec;
  spec.common_name = "localhost";
  spec.dns_names = {"localhost"};
  spec.ips = {"127.0.0.1", "::1"};
  spec.client_auth = false;
  spec.server_auth = true;
  spec.not_after = absl::Hours(24 * 397);
  absl::StatusOr<KeyAndCert> renewed = custos::testing::MakeCert(DevCa(), spec);
  ASSERT_TRUE(renewed.ok()) << renewed.status();
  absl::StatusOr<std::string> new_serial =
      custos::testing::SerialHex(renewed->cert_pem);
  ASSERT_TRUE(new_serial.ok());
  ASSERT_NE(*new_serial, *old_serial);
  ASSERT_TRUE(custos::testing::WriteFileAtomically(pki_ + "/server-new.pem",
                                                   renewed->cert_pem, 0644)
                  .ok());
  ASSERT_TRUE(custos::testing::WriteFileAtomically(pki_ + "/server-new.key",
                                                   renewed->key_pem, 0600)
                  .ok());

  ASSERT_NO_FATAL_FAILURE(RunDocBlock("renew"));

  std::string served;
  EXPECT_TRUE(Eventually([&] {
    served = ServedSerial();
    return served == *new_serial;
  })) << "still serving "
      << served << ", not the renewed " << *new_serial;
  EXPECT_TRUE(Call(server_->Channel("service-a")).ok());
  ExpectSameProcess();
}

TEST(TlsReloadDocTest, DocumentedKeyCheckRefusesAPairThatDoesNotBelong) {
  // The renew block's first line must stop a wrong pair before any mv.
  const std::string block = DocBlock("renew");
  ASSERT_FALSE(block.empty());
  const std::string check = block.substr(0, block.find('\n') + 1);
  ASSERT_THAT(check, HasSubstr("cmp"));
  absl::StatusOr<std::string> dir = custos::testing::MakeTempDir("renew");
  ASSERT_TRUE(dir.ok());
  absl::StatusOr<KeyAndCert> ca = custos::testing::MakeCa("CA");
  ASSERT_TRUE(ca.ok());
  absl::StatusOr<KeyAndCert> server = custos::testing::MakeCert(*ca, {});
  absl::StatusOr<KeyAndCert> other = custos::testing::MakeCert(*ca, {});
  ASSERT_TRUE(server.ok() && other.ok());
  auto run_check = [&](const std::string& key_pem) {
    EXPECT_TRUE(custos::testing::WriteFileAtomically(*dir + "/server-new.pem",
                                                     server->cert_pem, 0644)
                    .ok());
    EXPECT_TRUE(custos::testing::WriteFileAtomically(*dir + "/server-new.key",
                                                     key_pem, 0600)
                    .ok());
    return custos::testing::RunProcess(
        {"/bin/bash", "-c",
         absl::StrCat("set -euo pipefail\ncd '", *dir, "'\n", check)},
        custos::testing::EnvironmentWithout("CUSTOS_"), "/dev/null",
        *dir + "/check");
  };
  EXPECT_EQ(run_check(server->key_pem).code, 0);
  EXPECT_NE(run_check(other->key_pem).code, 0);
  std::filesystem::remove_all(*dir);
}

TEST_F(TlsReloadE2eTest, ClientCaAddedToTheBundleIsTrustedWithoutRestart) {
  ASSERT_NO_FATAL_FAILURE(StartServer());
  absl::StatusOr<KeyAndCert> second_ca = custos::testing::MakeCa("Second CA");
  ASSERT_TRUE(second_ca.ok());
  custos::testing::CertSpec spec;
  spec.uris = {"spiffe://custos.test/newcomer"};
  absl::StatusOr<KeyAndCert> newcomer =
      custos::testing::MakeCert(*second_ca, spec);
  ASSERT_TRUE(newcomer.ok());
  auto channel = [&] {
    return server_->ChannelWith(newcomer->key_pem, newcomer->cert_pem);
  };
  EXPECT_EQ(Call(channel()).error_code(), grpc::StatusCode::UNAVAILABLE);

  // tls.client_ca is DIR/pki/ca.pem: the dev CA and now the second one.
  ASSERT_TRUE(custos::testing::WriteFileAtomically(
                  pki_ + "/ca.pem",
                  server_->ReadPki("ca.pem") + second_ca->cert_pem, 0644)
                  .ok());
  EXPECT_TRUE(Eventually([&] { return Call(channel()).ok(); }))
      << "a client of the added CA is still refused after 30 s";
  EXPECT_TRUE(Call(server_->Channel("service-a")).ok());
  ExpectSameProcess();
}

TEST_F(TlsReloadE2eTest, RevokedClientCannotResumeAnEarlierTlsSession) {
  // OpenSSL does not verify a certificate again when a client resumes a
  // session, so gRPC 1.51's own CRL check (set_crl_directory) lets a
  // resumed session of a revoked client through (seen with a test program
  // against gRPC 1.51). custosd's check runs for every handshake.
  ASSERT_NO_FATAL_FAILURE(StartServer());
  grpc_ssl_session_cache* cache = grpc_ssl_session_cache_create_lru(8);
  auto resuming_channel = [&] {
    grpc::SslCredentialsOptions tls;
    tls.pem_root_certs = server_->ReadPki("ca.pem");
    tls.pem_private_key = server_->ReadPki("service-a.key");
    tls.pem_cert_chain = server_->ReadPki("service-a.pem");
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    grpc_arg arg = grpc_ssl_session_cache_create_channel_arg(cache);
    args.SetPointerWithVtable(arg.key, arg.value.pointer.p,
                              arg.value.pointer.vtable);
    return grpc::CreateCustomChannel(server_->address(),
                                     grpc::SslCredentials(tls), args);
  };
  auto reused = [](grpc::ClientContext* context) {
    std::vector<grpc::string_ref> v =
        context->auth_context()->FindPropertyValues("ssl_session_reused");
    return v.empty() ? std::string("none")
                     : std::string(v[0].data(), v[0].size());
  };
  {
    grpc::ClientContext first;
    ASSERT_TRUE(Call(resuming_channel(), &first).ok());
    grpc::ClientContext second;
    ASSERT_TRUE(Call(resuming_channel(), &second).ok());
    // The second connection did resume the first one's session.
    EXPECT_EQ(reused(&second), "true");
  }

  absl::StatusOr<std::string> crl =
      custos::testing::MakeCrl(DevCa(), {server_->ReadPki("service-a.pem")});
  ASSERT_TRUE(crl.ok()) << crl.status();
  ASSERT_TRUE(
      custos::testing::WriteFileAtomically(pki_ + "/crl/dev-ca.crl", *crl, 0644)
          .ok());
  grpc::Status refused;
  EXPECT_TRUE(Eventually([&] {
    refused = Call(resuming_channel());
    return !refused.ok();
  })) << "service-a still resumes its session 30 s after its revocation";
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(Call(server_->Channel("service-b")).ok());
  grpc_ssl_session_cache_destroy(cache);
  ExpectSameProcess();
}

TEST_F(TlsReloadE2eTest, MaxConnectionAgeEndsARevokedClientsOpenConnection) {
  ASSERT_NO_FATAL_FAILURE(
      StartServer("limits:\n"
                  "  max_connection_age_seconds: 2\n"
                  "  max_connection_age_grace_seconds: 1\n"));
  std::shared_ptr<grpc::Channel> a = server_->Channel("service-a");
  std::shared_ptr<grpc::Channel> b = server_->Channel("service-b");
  ASSERT_TRUE(Call(a).ok());
  ASSERT_TRUE(Call(b).ok());
  // An audit stream lasts no longer than its connection (as
  // docs/operations.md warns): it ends with UNAVAILABLE.
  grpc::ClientContext stream_context;
  stream_context.set_deadline(std::chrono::system_clock::now() +
                              std::chrono::seconds(30));
  auto stream =
      pb::AuditService::NewStub(server_->Channel("auditor"))
          ->StreamAuditEvents(&stream_context, pb::StreamAuditEventsRequest());

  absl::StatusOr<std::string> crl =
      custos::testing::MakeCrl(DevCa(), {server_->ReadPki("service-a.pem")});
  ASSERT_TRUE(crl.ok()) << crl.status();
  ASSERT_TRUE(
      custos::testing::WriteFileAtomically(pki_ + "/crl/dev-ca.crl", *crl, 0644)
          .ok());

  // The channel made before the revocation stops working once its
  // connection reaches its maximum age.
  grpc::Status ended;
  EXPECT_TRUE(Eventually([&] {
    ended = Call(a);
    return !ended.ok();
  })) << "service-a's open channel still works 30 s after its revocation";
  EXPECT_EQ(ended.error_code(), grpc::StatusCode::UNAVAILABLE)
      << ended.error_message();
  // service-b's channel, as old, has been through the same ends of
  // connections and keeps working: gRPC reconnects it.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(4);
  while (std::chrono::steady_clock::now() < until) {
    grpc::Status s = Call(b);
    ASSERT_TRUE(s.ok()) << s.error_message();
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  EXPECT_FALSE(Call(a).ok());
  pb::AuditEvent event;
  while (stream->Read(&event)) {
  }
  grpc::Status stream_end = stream->Finish();
  EXPECT_EQ(stream_end.error_code(), grpc::StatusCode::UNAVAILABLE)
      << stream_end.error_message();
  ExpectSameProcess();
}

}  // namespace
}  // namespace custos
