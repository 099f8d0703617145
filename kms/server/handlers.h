// The gRPC adapters of custosd: each method authenticates the peer,
// translates the request into a kms::KeyService call, and translates the
// result back. No decision is made here; the core decides. Thread-safe.
#ifndef CUSTOS_KMS_SERVER_HANDLERS_H_
#define CUSTOS_KMS_SERVER_HANDLERS_H_

#include "custos/v1/kms.grpc.pb.h"
#include "kms/key_service.h"
#include "kms/server/rpc_support.h"

namespace custos::server {

class KeyManagementHandler final
    : public pb::KeyManagementService::CallbackService {
 public:
  KeyManagementHandler(kms::KeyService* service, CallerResolver* callers)
      : service_(service), callers_(callers) {}

  grpc::ServerUnaryReactor* CreateKey(grpc::CallbackServerContext* ctx,
                                      const pb::CreateKeyRequest* req,
                                      pb::Key* resp) override;
  grpc::ServerUnaryReactor* GetKey(grpc::CallbackServerContext* ctx,
                                   const pb::GetKeyRequest* req,
                                   pb::Key* resp) override;
  grpc::ServerUnaryReactor* ListKeys(grpc::CallbackServerContext* ctx,
                                     const pb::ListKeysRequest* req,
                                     pb::ListKeysResponse* resp) override;
  grpc::ServerUnaryReactor* UpdateKey(grpc::CallbackServerContext* ctx,
                                      const pb::UpdateKeyRequest* req,
                                      pb::Key* resp) override;
  grpc::ServerUnaryReactor* RotateKey(grpc::CallbackServerContext* ctx,
                                      const pb::RotateKeyRequest* req,
                                      pb::Key* resp) override;
  grpc::ServerUnaryReactor* EnableKey(grpc::CallbackServerContext* ctx,
                                      const pb::EnableKeyRequest* req,
                                      pb::Key* resp) override;
  grpc::ServerUnaryReactor* DisableKey(grpc::CallbackServerContext* ctx,
                                       const pb::DisableKeyRequest* req,
                                       pb::Key* resp) override;
  grpc::ServerUnaryReactor* ScheduleKeyDeletion(
      grpc::CallbackServerContext* ctx,
      const pb::ScheduleKeyDeletionRequest* req, pb::Key* resp) override;
  grpc::ServerUnaryReactor* CancelKeyDeletion(
      grpc::CallbackServerContext* ctx, const pb::CancelKeyDeletionRequest* req,
      pb::Key* resp) override;
  grpc::ServerUnaryReactor* CreateAlias(grpc::CallbackServerContext* ctx,
                                        const pb::CreateAliasRequest* req,
                                        pb::Alias* resp) override;
  grpc::ServerUnaryReactor* DeleteAlias(grpc::CallbackServerContext* ctx,
                                        const pb::DeleteAliasRequest* req,
                                        google::protobuf::Empty* resp) override;
  grpc::ServerUnaryReactor* ListAliases(grpc::CallbackServerContext* ctx,
                                        const pb::ListAliasesRequest* req,
                                        pb::ListAliasesResponse* resp) override;
  grpc::ServerUnaryReactor* GetKeyPolicy(grpc::CallbackServerContext* ctx,
                                         const pb::GetKeyPolicyRequest* req,
                                         pb::KeyPolicy* resp) override;
  grpc::ServerUnaryReactor* SetKeyPolicy(grpc::CallbackServerContext* ctx,
                                         const pb::SetKeyPolicyRequest* req,
                                         pb::KeyPolicy* resp) override;

 private:
  kms::KeyService* const service_;
  CallerResolver* const callers_;
};

class CryptoHandler final : public pb::CryptoService::CallbackService {
 public:
  CryptoHandler(kms::KeyService* service, CallerResolver* callers)
      : service_(service), callers_(callers) {}

  grpc::ServerUnaryReactor* GenerateDataKey(
      grpc::CallbackServerContext* ctx, const pb::GenerateDataKeyRequest* req,
      pb::GenerateDataKeyResponse* resp) override;
  grpc::ServerUnaryReactor* GenerateDataKeyWithoutPlaintext(
      grpc::CallbackServerContext* ctx, const pb::GenerateDataKeyRequest* req,
      pb::GenerateDataKeyResponse* resp) override;
  grpc::ServerUnaryReactor* GenerateDataKeys(
      grpc::CallbackServerContext* ctx, const pb::GenerateDataKeysRequest* req,
      pb::GenerateDataKeysResponse* resp) override;
  grpc::ServerUnaryReactor* Encrypt(grpc::CallbackServerContext* ctx,
                                    const pb::EncryptRequest* req,
                                    pb::EncryptResponse* resp) override;
  grpc::ServerUnaryReactor* Decrypt(grpc::CallbackServerContext* ctx,
                                    const pb::DecryptRequest* req,
                                    pb::DecryptResponse* resp) override;
  grpc::ServerUnaryReactor* ReEncrypt(grpc::CallbackServerContext* ctx,
                                      const pb::ReEncryptRequest* req,
                                      pb::ReEncryptResponse* resp) override;
  grpc::ServerUnaryReactor* GenerateRandom(
      grpc::CallbackServerContext* ctx, const pb::GenerateRandomRequest* req,
      pb::GenerateRandomResponse* resp) override;

 private:
  grpc::ServerUnaryReactor* DataKey(grpc::CallbackServerContext* ctx,
                                    const pb::GenerateDataKeyRequest* req,
                                    pb::GenerateDataKeyResponse* resp,
                                    bool include_plaintext);

  kms::KeyService* const service_;
  CallerResolver* const callers_;
};

}  // namespace custos::server

#endif  // CUSTOS_KMS_SERVER_HANDLERS_H_
