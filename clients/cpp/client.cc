#include "clients/cpp/client.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"

namespace custos::client {
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

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      s.error_message());
}

}  // namespace

absl::StatusOr<ClientOptions> ClientOptions::FromEnvironment() {
  ClientOptions o;
  struct Var {
    const char* name;
    std::string* out;
  } vars[] = {{"CUSTOS_ADDR", &o.address},
              {"CUSTOS_CA", &o.ca_file},
              {"CUSTOS_CERT", &o.cert_file},
              {"CUSTOS_KEY", &o.key_file}};
  for (const Var& v : vars) {
    const char* value = std::getenv(v.name);
    if (value == nullptr || *value == '\0') {
      return absl::InvalidArgumentError(absl::StrCat(
          v.name,
          " is not set: give the server address and TLS files with "
          "CUSTOS_ADDR, CUSTOS_CA, CUSTOS_CERT and CUSTOS_KEY (or flags)"));
    }
    *v.out = value;
  }
  return o;
}

Client::Client(ClientOptions options, std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      kms_(pb::KeyManagementService::NewStub(channel_)),
      crypto_(pb::CryptoService::NewStub(channel_)),
      audit_(pb::AuditService::NewStub(channel_)) {}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(
    const ClientOptions& options) {
  if (options.address.empty()) {
    return absl::InvalidArgumentError("address: empty; e.g. localhost:7443");
  }
  grpc::SslCredentialsOptions tls;
  absl::StatusOr<std::string> ca = ReadFile(options.ca_file, "CA file");
  if (!ca.ok()) return ca.status();
  absl::StatusOr<std::string> cert =
      ReadFile(options.cert_file, "client certificate");
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadFile(options.key_file, "client key");
  if (!key.ok()) return key.status();
  tls.pem_root_certs = *ca;
  tls.pem_cert_chain = *cert;
  tls.pem_private_key = *key;
  OPENSSL_cleanse(key->data(), key->size());
  auto channel =
      grpc::CreateChannel(options.address, grpc::SslCredentials(tls));
  return std::unique_ptr<Client>(new Client(options, std::move(channel)));
}

template <typename Call>
absl::Status Client::Invoke(bool retry, Call call) {
  const int attempts = retry ? std::max(1, options_.max_attempts) : 1;
  absl::Duration backoff = absl::Milliseconds(50);
  grpc::Status status;
  for (int attempt = 0; attempt < attempts; ++attempt) {
    if (attempt > 0) {
      unsigned char jitter = 0;
      RAND_bytes(&jitter, 1);
      absl::SleepFor(backoff + backoff * (jitter / 255.0));
      backoff *= 2;
    }
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         absl::ToChronoMilliseconds(options_.timeout));
    status = call(&context);
    if (status.error_code() != grpc::StatusCode::UNAVAILABLE) break;
  }
  return FromGrpc(status);
}

#define CUSTOS_CLIENT_CALL(Stub, Method, Request, Response, Retry)  \
  absl::StatusOr<Response> Client::Method(const Request& request) { \
    Response response;                                              \
    absl::Status s = Invoke(Retry, [&](grpc::ClientContext* ctx) {  \
      return Stub->Method(ctx, request, &response);                 \
    });                                                             \
    if (!s.ok()) return s;                                          \
    return response;                                                \
  }

// Reads and operations that are harmless to repeat are retried; changes
// that are not idempotent (create, rotate, schedule deletion, aliases) are
// not: a lost reply could otherwise make two keys or two versions.
CUSTOS_CLIENT_CALL(kms_, CreateKey, pb::CreateKeyRequest, pb::Key, false)
CUSTOS_CLIENT_CALL(kms_, GetKey, pb::GetKeyRequest, pb::Key, true)
CUSTOS_CLIENT_CALL(kms_, ListKeys, pb::ListKeysRequest, pb::ListKeysResponse,
                   true)
CUSTOS_CLIENT_CALL(kms_, UpdateKey, pb::UpdateKeyRequest, pb::Key, true)
CUSTOS_CLIENT_CALL(kms_, RotateKey, pb::RotateKeyRequest, pb::Key, false)
CUSTOS_CLIENT_CALL(kms_, EnableKey, pb::EnableKeyRequest, pb::Key, true)
CUSTOS_CLIENT_CALL(kms_, DisableKey, pb::DisableKeyRequest, pb::Key, true)
CUSTOS_CLIENT_CALL(kms_, ScheduleKeyDeletion, pb::ScheduleKeyDeletionRequest,
                   pb::Key, false)
CUSTOS_CLIENT_CALL(kms_, CancelKeyDeletion, pb::CancelKeyDeletionRequest,
                   pb::Key, false)
CUSTOS_CLIENT_CALL(kms_, CreateAlias, pb::CreateAliasRequest, pb::Alias, false)
CUSTOS_CLIENT_CALL(kms_, ListAliases, pb::ListAliasesRequest,
                   pb::ListAliasesResponse, true)
CUSTOS_CLIENT_CALL(kms_, GetKeyPolicy, pb::GetKeyPolicyRequest, pb::KeyPolicy,
                   true)
CUSTOS_CLIENT_CALL(kms_, SetKeyPolicy, pb::SetKeyPolicyRequest, pb::KeyPolicy,
                   false)
CUSTOS_CLIENT_CALL(crypto_, GenerateDataKey, pb::GenerateDataKeyRequest,
                   pb::GenerateDataKeyResponse, true)
CUSTOS_CLIENT_CALL(crypto_, GenerateDataKeyWithoutPlaintext,
                   pb::GenerateDataKeyRequest, pb::GenerateDataKeyResponse,
                   true)
CUSTOS_CLIENT_CALL(crypto_, GenerateDataKeys, pb::GenerateDataKeysRequest,
                   pb::GenerateDataKeysResponse, true)
CUSTOS_CLIENT_CALL(crypto_, Encrypt, pb::EncryptRequest, pb::EncryptResponse,
                   true)
CUSTOS_CLIENT_CALL(crypto_, Decrypt, pb::DecryptRequest, pb::DecryptResponse,
                   true)
CUSTOS_CLIENT_CALL(crypto_, ReEncrypt, pb::ReEncryptRequest,
                   pb::ReEncryptResponse, true)
CUSTOS_CLIENT_CALL(crypto_, GenerateRandom, pb::GenerateRandomRequest,
                   pb::GenerateRandomResponse, true)
CUSTOS_CLIENT_CALL(audit_, ListAuditEvents, pb::ListAuditEventsRequest,
                   pb::ListAuditEventsResponse, true)
CUSTOS_CLIENT_CALL(audit_, GetAuditPublicKey, pb::GetAuditPublicKeyRequest,
                   pb::AuditPublicKey, true)
CUSTOS_CLIENT_CALL(audit_, VerifyAuditLog, pb::VerifyAuditLogRequest,
                   pb::VerifyAuditLogResponse, true)
#undef CUSTOS_CLIENT_CALL

absl::Status Client::StreamAuditEvents(
    const pb::StreamAuditEventsRequest& request,
    const std::function<bool(const pb::AuditEvent&)>& on_event) {
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReader<pb::AuditEvent>> reader =
      audit_->StreamAuditEvents(&context, request);
  pb::AuditEvent event;
  while (reader->Read(&event)) {
    if (!on_event(event)) {
      context.TryCancel();
      break;
    }
  }
  grpc::Status s = reader->Finish();
  if (s.error_code() == grpc::StatusCode::CANCELLED) return absl::OkStatus();
  return FromGrpc(s);
}

absl::Status Client::DeleteAlias(const pb::DeleteAliasRequest& request) {
  google::protobuf::Empty response;
  return Invoke(false, [&](grpc::ClientContext* ctx) {
    return kms_->DeleteAlias(ctx, request, &response);
  });
}

absl::StatusOr<DataKeySource::DataKey> Client::GenerateDataKey(
    const std::string& key, const std::map<std::string, std::string>& context) {
  pb::GenerateDataKeyRequest request;
  request.set_key(key);
  request.set_key_spec(pb::AES_256);
  request.mutable_encryption_context()->insert(context.begin(), context.end());
  absl::StatusOr<pb::GenerateDataKeyResponse> response =
      GenerateDataKey(request);
  if (!response.ok()) return response.status();
  DataKey out;
  out.plaintext = SecretBytes::CopyOf(response->plaintext());
  out.blob = response->ciphertext_blob();
  CleanseResponse(&*response);
  return out;
}

absl::StatusOr<SecretBytes> Client::DecryptDataKey(
    const std::string& blob, const std::map<std::string, std::string>& context,
    const std::string& expected_key) {
  pb::DecryptRequest request;
  request.set_ciphertext_blob(blob);
  request.set_expected_key(expected_key);
  request.mutable_encryption_context()->insert(context.begin(), context.end());
  absl::StatusOr<pb::DecryptResponse> response = Decrypt(request);
  if (!response.ok()) return response.status();
  SecretBytes key = SecretBytes::CopyOf(response->plaintext());
  CleanseResponse(&*response);
  return key;
}

void CleanseResponse(pb::GenerateDataKeyResponse* response) {
  std::string* p = response->mutable_plaintext();
  if (!p->empty()) OPENSSL_cleanse(p->data(), p->size());
  p->clear();
}

void CleanseResponse(pb::DecryptResponse* response) {
  std::string* p = response->mutable_plaintext();
  if (!p->empty()) OPENSSL_cleanse(p->data(), p->size());
  p->clear();
}

}  // namespace custos::client
