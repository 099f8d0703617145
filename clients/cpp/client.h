// custos::client::Client: the C++ client of Custos. One method per RPC, each
// with a deadline; calls that are safe to repeat are retried on UNAVAILABLE
// with exponential backoff and jitter; admin calls that change state are
// never retried blindly. Errors are absl::Status with the server's code and
// message. Thread-safe (gRPC stubs are).
//
//   auto client = Client::Connect(ClientOptions::FromEnvironment().value());
//   auto dk = (*client)->GenerateDataKey(request);
#ifndef CUSTOS_CLIENTS_CPP_CLIENT_H_
#define CUSTOS_CLIENTS_CPP_CLIENT_H_

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "clients/cpp/data_key_source.h"
#include "custos/v1/audit.grpc.pb.h"
#include "custos/v1/kms.grpc.pb.h"

namespace custos::client {

namespace pb = ::custos::v1;

struct ClientOptions {
  std::string address;    // host:port
  std::string ca_file;    // CA that signed the server's certificate
  std::string cert_file;  // this client's certificate (PEM)
  std::string key_file;   // its private key (PEM)
  absl::Duration timeout = absl::Seconds(10);  // per attempt
  int max_attempts = 3;  // for calls that are safe to retry
  // Reads CUSTOS_ADDR, CUSTOS_CA, CUSTOS_CERT, CUSTOS_KEY; names the
  // variable that is missing.
  static absl::StatusOr<ClientOptions> FromEnvironment();
};

class Client : public DataKeySource {
 public:
  // Reads the TLS files and makes a channel (connection is lazy).
  static absl::StatusOr<std::unique_ptr<Client>> Connect(
      const ClientOptions& options);

  // KeyManagementService.
  absl::StatusOr<pb::Key> CreateKey(const pb::CreateKeyRequest& request);
  absl::StatusOr<pb::Key> GetKey(const pb::GetKeyRequest& request);
  absl::StatusOr<pb::ListKeysResponse> ListKeys(
      const pb::ListKeysRequest& request);
  absl::StatusOr<pb::Key> UpdateKey(const pb::UpdateKeyRequest& request);
  absl::StatusOr<pb::Key> RotateKey(const pb::RotateKeyRequest& request);
  absl::StatusOr<pb::Key> EnableKey(const pb::EnableKeyRequest& request);
  absl::StatusOr<pb::Key> DisableKey(const pb::DisableKeyRequest& request);
  absl::StatusOr<pb::Key> ScheduleKeyDeletion(
      const pb::ScheduleKeyDeletionRequest& request);
  absl::StatusOr<pb::Key> CancelKeyDeletion(
      const pb::CancelKeyDeletionRequest& request);
  absl::StatusOr<pb::Alias> CreateAlias(const pb::CreateAliasRequest& request);
  absl::Status DeleteAlias(const pb::DeleteAliasRequest& request);
  absl::StatusOr<pb::ListAliasesResponse> ListAliases(
      const pb::ListAliasesRequest& request);
  absl::StatusOr<pb::KeyPolicy> GetKeyPolicy(
      const pb::GetKeyPolicyRequest& request);
  absl::StatusOr<pb::KeyPolicy> SetKeyPolicy(
      const pb::SetKeyPolicyRequest& request);

  // CryptoService. Responses holding plaintext should be cleansed by the
  // caller after use (see CleanseResponse).
  absl::StatusOr<pb::GenerateDataKeyResponse> GenerateDataKey(
      const pb::GenerateDataKeyRequest& request);
  absl::StatusOr<pb::GenerateDataKeyResponse> GenerateDataKeyWithoutPlaintext(
      const pb::GenerateDataKeyRequest& request);
  // Up to 1,000 data keys in one call (for services that pre-fetch keys).
  absl::StatusOr<pb::GenerateDataKeysResponse> GenerateDataKeys(
      const pb::GenerateDataKeysRequest& request);
  absl::StatusOr<pb::EncryptResponse> Encrypt(
      const pb::EncryptRequest& request);
  absl::StatusOr<pb::DecryptResponse> Decrypt(
      const pb::DecryptRequest& request);
  absl::StatusOr<pb::ReEncryptResponse> ReEncrypt(
      const pb::ReEncryptRequest& request);
  absl::StatusOr<pb::GenerateRandomResponse> GenerateRandom(
      const pb::GenerateRandomRequest& request);

  // AuditService (auditors).
  absl::StatusOr<pb::ListAuditEventsResponse> ListAuditEvents(
      const pb::ListAuditEventsRequest& request);
  absl::StatusOr<pb::AuditPublicKey> GetAuditPublicKey(
      const pb::GetAuditPublicKeyRequest& request);
  absl::StatusOr<pb::VerifyAuditLogResponse> VerifyAuditLog(
      const pb::VerifyAuditLogRequest& request);
  // Follows the log, calling `on_event` for each event until it returns
  // false or the stream ends. No deadline: it runs until stopped.
  absl::Status StreamAuditEvents(
      const pb::StreamAuditEventsRequest& request,
      const std::function<bool(const pb::AuditEvent&)>& on_event);

  // DataKeySource, for Envelope encryption: AES-256 data keys.
  absl::StatusOr<DataKey> GenerateDataKey(
      const std::string& key,
      const std::map<std::string, std::string>& context) override;
  absl::StatusOr<SecretBytes> DecryptDataKey(
      const std::string& blob,
      const std::map<std::string, std::string>& context,
      const std::string& expected_key) override;

 private:
  Client(ClientOptions options, std::shared_ptr<grpc::Channel> channel);
  // Runs `call(context)` with a deadline, retrying UNAVAILABLE when
  // `retry` is set.
  template <typename Call>
  absl::Status Invoke(bool retry, Call call);

  const ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<pb::KeyManagementService::Stub> kms_;
  std::unique_ptr<pb::CryptoService::Stub> crypto_;
  std::unique_ptr<pb::AuditService::Stub> audit_;
};

// Overwrites the plaintext fields of a response before it is freed.
void CleanseResponse(pb::GenerateDataKeyResponse* response);
void CleanseResponse(pb::DecryptResponse* response);

}  // namespace custos::client

#endif  // CUSTOS_CLIENTS_CPP_CLIENT_H_
