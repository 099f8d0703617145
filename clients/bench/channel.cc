#include "clients/bench/channel.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace custos::bench {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path,
                                     absl::string_view what) {
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat(what, ": cannot read '", path, "'"));
  }
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::Channel>> ConnectChannel(
    const std::string& address, const TlsFiles& tls, int index) {
  grpc::SslCredentialsOptions options;
  absl::StatusOr<std::string> ca = ReadFile(tls.ca, "--ca");
  if (!ca.ok()) return ca.status();
  absl::StatusOr<std::string> cert = ReadFile(tls.cert, "--cert");
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadFile(tls.key, "--key-file");
  if (!key.ok()) return key.status();
  options.pem_root_certs = *ca;
  options.pem_cert_chain = *cert;
  options.pem_private_key = *key;
  grpc::ChannelArguments args;
  args.SetInt("custos.bench.channel", index);
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(address, grpc::SslCredentials(options), args);
  if (!channel->WaitForConnected(std::chrono::system_clock::now() +
                                 std::chrono::seconds(10))) {
    return absl::UnavailableError(absl::StrCat(
        "cannot connect to ", address,
        " within 10 s (is the server running, and do --ca, --cert and "
        "--key-file match its PKI?)"));
  }
  return channel;
}

}  // namespace custos::bench
