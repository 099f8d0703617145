#include "kms/server/server_settings.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace custos::server {
namespace {

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
  return out;
}

std::shared_ptr<grpc::ServerCredentials> MutualTlsCredentials(
    const TlsMaterial& tls) {
  grpc::SslServerCredentialsOptions options(
      GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_root_certs = tls.client_ca;
  options.pem_key_cert_pairs.push_back({tls.key, tls.cert});
  return grpc::SslServerCredentials(options);
}

void ApplyLimits(const Config::Limits& limits, grpc::ServerBuilder* builder) {
  // Requests are bounded; replies are ours and may be larger (a
  // GenerateDataKeys reply of 1,000 keys is about 150 KiB).
  builder->SetMaxReceiveMessageSize(limits.max_message_bytes);
  builder->AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                              limits.max_concurrent_streams);
  // gRPC lets a second server bind the same port by default (SO_REUSEPORT):
  // a second custosd on one database and audit directory must fail instead.
  builder->AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
}

}  // namespace custos::server
