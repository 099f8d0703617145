#include "kms/server/server_settings.h"

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_certificate_verifier.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <algorithm>
#include <fstream>
#include <functional>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "kms/server/revocation.h"

namespace custos::server {
namespace {

struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};

absl::StatusOr<std::string> ReadFile(const std::string& path,
                                     absl::string_view field) {
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("config: ", field, ": cannot read '", path, "'"));
  }
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::unique_ptr<BIO, BioFree> MemBio(const std::string& data) {
  return std::unique_ptr<BIO, BioFree>(
      BIO_new_mem_buf(data.data(), static_cast<int>(data.size())));
}

// The first certificate of a PEM text, or null.
std::unique_ptr<X509, X509Free> FirstCertificate(const std::string& pem) {
  auto bio = MemBio(pem);
  std::unique_ptr<X509, X509Free> cert(
      bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  ERR_clear_error();
  return cert;
}

// What gRPC would otherwise find only at the first handshake (and then
// refuse every connection): the files must hold what their fields say.
absl::Status CheckTlsMaterial(const Config::Tls& config,
                              const TlsMaterial& tls) {
  std::unique_ptr<X509, X509Free> cert = FirstCertificate(tls.cert);
  if (cert == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config: tls.cert: '", config.cert,
        "' holds no PEM certificate; give the server's certificate chain, "
        "leaf first"));
  }
  auto bio = MemBio(tls.key);
  // A callback that gives no passphrase: without one OpenSSL would prompt
  // on the terminal for an encrypted key.
  pem_password_cb* no_passphrase = [](char*, int, int, void*) { return 0; };
  std::unique_ptr<EVP_PKEY, PkeyFree> key(
      bio ? PEM_read_bio_PrivateKey(bio.get(), nullptr, no_passphrase, nullptr)
          : nullptr);
  ERR_clear_error();
  if (key == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: tls.key: '", config.key,
                     "' holds no unencrypted PEM private key"));
  }
  if (X509_check_private_key(cert.get(), key.get()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(absl::StrCat(
        "config: tls.key: '", config.key, "' is not the key of the first ",
        "certificate in tls.cert ('", config.cert,
        "'); give the pair that belongs together"));
  }
  if (FirstCertificate(tls.client_ca) == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config: tls.client_ca: '", config.client_ca,
        "' holds no PEM certificate; give the CA bundle that client "
        "certificates chain to"));
  }
  return absl::OkStatus();
}

// Refuses, after the TLS handshake, a client whose certificate (or one of
// the chain it sent) a CRL of tls.crl_dir revokes. gRPC runs it for every
// handshake, resumed sessions included. Owned by gRPC's core verifier, for
// as long as the credentials live. Thread-safe (CrlWatcher is).
class RevocationVerifier
    : public grpc::experimental::ExternalCertificateVerifier {
 public:
  explicit RevocationVerifier(std::shared_ptr<const CrlWatcher> crls)
      : crls_(std::move(crls)) {}

  bool Verify(grpc::experimental::TlsCustomVerificationCheckRequest* request,
              std::function<void(grpc::Status)> /*callback*/,
              grpc::Status* sync_status) override {
    const grpc::string_ref leaf = request->peer_cert();
    const grpc::string_ref chain = request->peer_cert_full_chain();
    std::string pems(leaf.data(), leaf.size());
    pems.append(chain.data(), chain.size());
    absl::Status s = crls_->Check(pems);
    if (s.ok()) {
      *sync_status = grpc::Status::OK;
    } else {
      const std::vector<grpc::string_ref> uris = request->uri_names();
      const grpc::string_ref who =
          uris.empty() ? request->common_name() : uris.front();
      spdlog::warn("tls: refused the client '{}': {}",
                   std::string(who.data(), std::min<size_t>(who.size(), 256)),
                   s.message());
      *sync_status = grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                                  std::string(s.message()));
    }
    return true;  // done synchronously
  }

  void Cancel(grpc::experimental::TlsCustomVerificationCheckRequest*) override {
  }

 private:
  const std::shared_ptr<const CrlWatcher> crls_;
};

}  // namespace

absl::StatusOr<TlsMaterial> ReadTlsMaterial(const Config::Tls& tls) {
  TlsMaterial out;
  absl::StatusOr<std::string> cert = ReadFile(tls.cert, "tls.cert");
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadFile(tls.key, "tls.key");
  if (!key.ok()) return key.status();
  absl::StatusOr<std::string> ca = ReadFile(tls.client_ca, "tls.client_ca");
  if (!ca.ok()) return ca.status();
  out.cert = *std::move(cert);
  out.key = *std::move(key);
  out.client_ca = *std::move(ca);
  CUSTOS_RETURN_IF_ERROR(CheckTlsMaterial(tls, out));
  return out;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerTlsCredentials(
    const Config::Tls& tls) {
  CUSTOS_RETURN_IF_ERROR(ReadTlsMaterial(tls).status());
  // The provider and the verifier may be the process's first gRPC objects:
  // gRPC stays initialised while they are made (the credentials then hold
  // it).
  grpc::GrpcLibraryCodegen grpc_library;
  // Every check that can fail comes before the options: gRPC 1.51's
  // TlsServerCredentialsOptions frees its C options only when credentials
  // are made from them, so an early return would leak them.
  std::shared_ptr<const CrlWatcher> crls;
  if (!tls.crl_dir.empty()) {
    CrlWatcher::Options watch;
    watch.dir = tls.crl_dir;
    watch.client_ca_path = tls.client_ca;
    watch.interval = absl::Seconds(tls.reload_interval_seconds);
    CUSTOS_ASSIGN_OR_RETURN(crls, CrlWatcher::Start(watch));
  }
  // The provider reads the three files now and then every interval on a
  // thread of its own; gRPC builds a new SSL context when their contents
  // change. It does not check that a new key matches the new certificate:
  // a mismatched pair (the files replaced one at a time) fails new
  // handshakes until the next read finds them consistent.
  auto provider =
      std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
          tls.key, tls.cert, tls.client_ca,
          static_cast<unsigned int>(tls.reload_interval_seconds));
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  options.set_cert_request_type(
      GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  if (crls != nullptr) {
    options.set_certificate_verifier(
        grpc::experimental::ExternalCertificateVerifier::Create<
            RevocationVerifier>(std::move(crls)));
  }
  return grpc::experimental::TlsServerCredentials(options);
}

void ApplyLimits(const Config::Limits& limits, grpc::ServerBuilder* builder) {
  // Requests are bounded; replies are ours and may be larger (a
  // GenerateDataKeys reply of 1,000 keys is about 150 KiB).
  builder->SetMaxReceiveMessageSize(limits.max_message_bytes);
  builder->AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                              limits.max_concurrent_streams);
  // A client certificate is checked once, when its connection is made: a
  // connection is closed at this age (GOAWAY, gRPC adds ±10% jitter; calls
  // in flight get the grace, then the connection is cut) so that every
  // client presents its certificate again, and a revoked one is refused.
  builder->AddChannelArgument(
      GRPC_ARG_MAX_CONNECTION_AGE_MS,
      static_cast<int>(absl::ToInt64Milliseconds(limits.max_connection_age)));
  builder->AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
                              static_cast<int>(absl::ToInt64Milliseconds(
                                  limits.max_connection_age_grace)));
  // gRPC lets a second server bind the same port by default (SO_REUSEPORT):
  // a second custosd on one database and audit directory must fail instead.
  builder->AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
}

}  // namespace custos::server
