#include "kms/server/handlers.h"

#include "absl/strings/str_cat.h"

namespace custos::server {
namespace {

// Resolves the caller; if the call is refused there (no usable identity,
// over the rate limit), records the refusal and finishes the call with it.
// Returns true when the call may go on.
bool Admit(grpc::CallbackServerContext* ctx, kms::KeyService* service,
           CallerResolver* callers, kms::Rpc rpc,
           grpc::ServerUnaryReactor* reactor, kms::Caller* caller) {
  ResolvedCaller resolved = callers->Resolve(ctx);
  if (resolved.refusal.ok()) {
    *caller = std::move(resolved.caller);
    return true;
  }
  service->RecordRefusal(
      resolved.caller, rpc, std::move(resolved.refusal),
      [reactor](absl::Status s) { reactor->Finish(ToGrpc(s)); });
  return false;
}

// Admits the call, runs `body(caller) -> absl::Status`, finishes the call.
// `reactor` defaults to the context's; crypto calls pass a cleansing one.
template <typename F>
grpc::ServerUnaryReactor* Serve(grpc::CallbackServerContext* ctx,
                                kms::KeyService* service,
                                CallerResolver* callers, kms::Rpc rpc, F body,
                                grpc::ServerUnaryReactor* reactor = nullptr) {
  if (reactor == nullptr) reactor = ctx->DefaultReactor();
  kms::Caller caller;
  if (!Admit(ctx, service, callers, rpc, reactor, &caller)) return reactor;
  reactor->Finish(ToGrpc(body(caller)));
  return reactor;
}

// Serve's form for operations that complete asynchronously (once their audit
// record is durable, on the audit log's thread): `start(caller, done)`
// begins the operation and `fill(result)` writes the reply; the reactor
// finishes from `done`. No gRPC thread waits for the audit log's fsync.
template <typename T, typename Start, typename Fill>
grpc::ServerUnaryReactor* ServeAsync(grpc::CallbackServerContext* ctx,
                                     kms::KeyService* service,
                                     CallerResolver* callers, kms::Rpc rpc,
                                     grpc::ServerUnaryReactor* reactor,
                                     Start start, Fill fill) {
  kms::Caller caller;
  if (!Admit(ctx, service, callers, rpc, reactor, &caller)) return reactor;
  start(caller,
        [reactor, fill = std::move(fill)](absl::StatusOr<T> result) mutable {
          if (!result.ok()) {
            reactor->Finish(ToGrpc(result.status()));
            return;
          }
          fill(*result);
          reactor->Finish(grpc::Status::OK);
        });
  return reactor;
}

// The data key settings shared by GenerateDataKey(s).
absl::Status DataKeyFromProto(
    pb::DataKeySpec spec, uint32_t number_of_bytes,
    const google::protobuf::Map<std::string, std::string>& context,
    const pb::AccessJustification& justification, bool has_justification,
    kms::DataKeyParams& params) {
  if (spec != pb::DATA_KEY_SPEC_UNSPECIFIED && number_of_bytes != 0) {
    return absl::InvalidArgumentError(
        "key_spec and number_of_bytes: set one, not both");
  }
  switch (spec) {
    case pb::DATA_KEY_SPEC_UNSPECIFIED:
      params.bytes = number_of_bytes == 0 ? 32 : number_of_bytes;
      break;
    case pb::AES_256:
      params.bytes = 32;
      break;
    case pb::AES_128:
      params.bytes = 16;
      break;
    default:
      return absl::InvalidArgumentError("key_spec: unknown value");
  }
  params.context = FromProto(context);
  absl::StatusOr<kms::JustificationParam> parsed =
      FromProto(justification, has_justification);
  if (!parsed.ok()) return parsed.status();
  params.justification = *std::move(parsed);
  return absl::OkStatus();
}

// The request's justification, or its parse error for the core to refuse
// the call with (audited).
kms::JustificationParam JustificationOrError(
    const pb::AccessJustification& justification, bool present) {
  absl::StatusOr<kms::JustificationParam> parsed =
      FromProto(justification, present);
  if (parsed.ok()) return *std::move(parsed);
  kms::JustificationParam param;
  param.error = parsed.status();
  return param;
}

// Fills `resp` from a key result.
absl::Status KeyReply(
    const absl::StatusOr<std::shared_ptr<const kms::Key>>& key, pb::Key* resp) {
  if (!key.ok()) return key.status();
  ToProto(**key, /*with_versions=*/true, resp);
  return absl::OkStatus();
}

}  // namespace

// ---- KeyManagementService ----------------------------------------------

grpc::ServerUnaryReactor* KeyManagementHandler::CreateKey(
    grpc::CallbackServerContext* ctx, const pb::CreateKeyRequest* req,
    pb::Key* resp) {
  return Serve(
      ctx, service_, callers_, kms::Rpc::kCreateKey,
      [&](const kms::Caller& caller) -> absl::Status {
        const auto refuse = [&](const kms::Caller& c, const absl::Status& s) {
          return service_->RecordRefusal(c, kms::Rpc::kCreateKey, s);
        };
        if (req->purpose() != pb::KEY_PURPOSE_UNSPECIFIED &&
            req->purpose() != pb::ENCRYPT_DECRYPT) {
          return refuse(caller,
                        absl::InvalidArgumentError(
                            "purpose: only ENCRYPT_DECRYPT keys exist so far"));
        }
        kms::CreateKeyParams params;
        params.description = req->description();
        params.labels.insert(req->labels().begin(), req->labels().end());
        if (req->has_rotation_period()) {
          absl::StatusOr<absl::Duration> period =
              FromProto(req->rotation_period(), "rotation_period");
          if (!period.ok()) return refuse(caller, period.status());
          params.rotation_period = *period;
        }
        absl::StatusOr<kms::KeyPolicy> policy = FromProto(req->policy());
        if (!policy.ok()) return refuse(caller, policy.status());
        params.policy = *std::move(policy);
        params.alias = req->alias();
        return KeyReply(service_->CreateKey(caller, params), resp);
      });
}

grpc::ServerUnaryReactor* KeyManagementHandler::GetKey(
    grpc::CallbackServerContext* ctx, const pb::GetKeyRequest* req,
    pb::Key* resp) {
  return Serve(ctx, service_, callers_, kms::Rpc::kGetKey,
               [&](const kms::Caller& caller) {
                 return KeyReply(service_->GetKey(caller, req->key()), resp);
               });
}

grpc::ServerUnaryReactor* KeyManagementHandler::ListKeys(
    grpc::CallbackServerContext* ctx, const pb::ListKeysRequest* req,
    pb::ListKeysResponse* resp) {
  return Serve(
      ctx, service_, callers_, kms::Rpc::kListKeys,
      [&](const kms::Caller& caller) -> absl::Status {
        kms::ListKeysParams params;
        params.page_size = req->page_size();
        params.page_token = req->page_token();
        if (req->state() != pb::KEY_STATE_UNSPECIFIED) {
          if (req->state() < pb::ENABLED || req->state() > pb::DESTROYED) {
            return service_->RecordRefusal(
                caller, kms::Rpc::kListKeys,
                absl::InvalidArgumentError(
                    "state: unknown value; use ENABLED, DISABLED, "
                    "PENDING_DELETION or DESTROYED"));
          }
          params.filter_state = true;
          params.state = static_cast<kms::KeyState>(req->state());
        }
        params.label = req->label();
        absl::StatusOr<kms::ListKeysResult> result =
            service_->ListKeys(caller, params);
        if (!result.ok()) return result.status();
        for (const auto& key : result->keys) {
          ToProto(*key, /*with_versions=*/false, resp->add_keys());
        }
        resp->set_next_page_token(result->next_page_token);
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* KeyManagementHandler::UpdateKey(
    grpc::CallbackServerContext* ctx, const pb::UpdateKeyRequest* req,
    pb::Key* resp) {
  return Serve(
      ctx, service_, callers_, kms::Rpc::kUpdateKey,
      [&](const kms::Caller& caller) -> absl::Status {
        const auto refuse = [&](const kms::Caller& c, const absl::Status& s) {
          return service_->RecordRefusal(c, kms::Rpc::kUpdateKey, s);
        };
        kms::UpdateKeyParams params;
        params.key = req->key();
        for (const std::string& field : req->update_mask()) {
          if (field == "description") {
            params.set_description = true;
            params.description = req->description();
          } else if (field == "labels") {
            params.set_labels = true;
            params.labels.insert(req->labels().begin(), req->labels().end());
          } else if (field == "rotation_period") {
            params.set_rotation_period = true;
            absl::StatusOr<absl::Duration> period =
                FromProto(req->rotation_period(), "rotation_period");
            if (!period.ok()) return refuse(caller, period.status());
            params.rotation_period = *period;
          } else {
            return refuse(
                caller, absl::InvalidArgumentError(absl::StrCat(
                            "update_mask: unknown field '", field.substr(0, 64),
                            "'; use description, labels or "
                            "rotation_period")));
          }
        }
        return KeyReply(service_->UpdateKey(caller, params), resp);
      });
}

grpc::ServerUnaryReactor* KeyManagementHandler::RotateKey(
    grpc::CallbackServerContext* ctx, const pb::RotateKeyRequest* req,
    pb::Key* resp) {
  return Serve(ctx, service_, callers_, kms::Rpc::kRotateKey,
               [&](const kms::Caller& caller) {
                 return KeyReply(service_->RotateKey(caller, req->key()), resp);
               });
}

grpc::ServerUnaryReactor* KeyManagementHandler::EnableKey(
    grpc::CallbackServerContext* ctx, const pb::EnableKeyRequest* req,
    pb::Key* resp) {
  return Serve(ctx, service_, callers_, kms::Rpc::kEnableKey,
               [&](const kms::Caller& caller) {
                 return KeyReply(service_->EnableKey(caller, req->key()), resp);
               });
}

grpc::ServerUnaryReactor* KeyManagementHandler::DisableKey(
    grpc::CallbackServerContext* ctx, const pb::DisableKeyRequest* req,
    pb::Key* resp) {
  return Serve(ctx, service_, callers_, kms::Rpc::kDisableKey,
               [&](const kms::Caller& caller) {
                 return KeyReply(service_->DisableKey(caller, req->key()),
                                 resp);
               });
}

grpc::ServerUnaryReactor* KeyManagementHandler::ScheduleKeyDeletion(
    grpc::CallbackServerContext* ctx, const pb::ScheduleKeyDeletionRequest* req,
    pb::Key* resp) {
  return Serve(ctx, service_, callers_, kms::Rpc::kScheduleKeyDeletion,
               [&](const kms::Caller& caller) {
                 return KeyReply(
                     service_->ScheduleKeyDeletion(caller, req->key(),
                                                   req->pending_window_days()),
                     resp);
               });
}

grpc::ServerUnaryReactor* KeyManagementHandler::CancelKeyDeletion(
    grpc::CallbackServerContext* ctx, const pb::CancelKeyDeletionRequest* req,
    pb::Key* resp) {
  return Serve(ctx, service_, callers_, kms::Rpc::kCancelKeyDeletion,
               [&](const kms::Caller& caller) {
                 return KeyReply(
                     service_->CancelKeyDeletion(caller, req->key()), resp);
               });
}

grpc::ServerUnaryReactor* KeyManagementHandler::CreateAlias(
    grpc::CallbackServerContext* ctx, const pb::CreateAliasRequest* req,
    pb::Alias* resp) {
  return Serve(ctx, service_, callers_, kms::Rpc::kCreateAlias,
               [&](const kms::Caller& caller) -> absl::Status {
                 absl::StatusOr<kms::AliasRecord> alias =
                     service_->CreateAlias(caller, req->alias(), req->key());
                 if (!alias.ok()) return alias.status();
                 ToProto(*alias, resp);
                 return absl::OkStatus();
               });
}

grpc::ServerUnaryReactor* KeyManagementHandler::DeleteAlias(
    grpc::CallbackServerContext* ctx, const pb::DeleteAliasRequest* req,
    google::protobuf::Empty*) {
  return Serve(ctx, service_, callers_, kms::Rpc::kDeleteAlias,
               [&](const kms::Caller& caller) {
                 return service_->DeleteAlias(caller, req->alias());
               });
}

grpc::ServerUnaryReactor* KeyManagementHandler::ListAliases(
    grpc::CallbackServerContext* ctx, const pb::ListAliasesRequest* req,
    pb::ListAliasesResponse* resp) {
  return Serve(ctx, service_, callers_, kms::Rpc::kListAliases,
               [&](const kms::Caller& caller) -> absl::Status {
                 absl::StatusOr<std::vector<kms::AliasRecord>> aliases =
                     service_->ListAliases(caller, req->key());
                 if (!aliases.ok()) return aliases.status();
                 for (const auto& alias : *aliases)
                   ToProto(alias, resp->add_aliases());
                 return absl::OkStatus();
               });
}

grpc::ServerUnaryReactor* KeyManagementHandler::GetKeyPolicy(
    grpc::CallbackServerContext* ctx, const pb::GetKeyPolicyRequest* req,
    pb::KeyPolicy* resp) {
  return Serve(ctx, service_, callers_, kms::Rpc::kGetKeyPolicy,
               [&](const kms::Caller& caller) -> absl::Status {
                 absl::StatusOr<kms::KeyPolicy> policy =
                     service_->GetKeyPolicy(caller, req->key());
                 if (!policy.ok()) return policy.status();
                 ToProto(*policy, resp);
                 return absl::OkStatus();
               });
}

grpc::ServerUnaryReactor* KeyManagementHandler::SetKeyPolicy(
    grpc::CallbackServerContext* ctx, const pb::SetKeyPolicyRequest* req,
    pb::KeyPolicy* resp) {
  return Serve(ctx, service_, callers_, kms::Rpc::kSetKeyPolicy,
               [&](const kms::Caller& caller) -> absl::Status {
                 absl::StatusOr<kms::KeyPolicy> policy =
                     FromProto(req->policy());
                 if (!policy.ok()) {
                   return service_->RecordRefusal(
                       caller, kms::Rpc::kSetKeyPolicy, policy.status());
                 }
                 absl::StatusOr<kms::KeyPolicy> set = service_->SetKeyPolicy(
                     caller, req->key(), *policy, req->expected_version());
                 if (!set.ok()) return set.status();
                 ToProto(*set, resp);
                 return absl::OkStatus();
               });
}

// ---- CryptoService -------------------------------------------------------

grpc::ServerUnaryReactor* CryptoHandler::DataKey(
    grpc::CallbackServerContext* ctx, const pb::GenerateDataKeyRequest* req,
    pb::GenerateDataKeyResponse* resp, bool include_plaintext) {
  auto* reactor =
      new CleansingReactor([resp] { CleanseBytes(resp->mutable_plaintext()); });
  return ServeAsync<kms::DataKeyResult>(
      ctx, service_, callers_,
      include_plaintext ? kms::Rpc::kGenerateDataKey
                        : kms::Rpc::kGenerateDataKeyWithoutPlaintext,
      reactor,
      [&](const kms::Caller& caller,
          kms::KeyService::Done<kms::DataKeyResult> done) {
        kms::DataKeyParams params;
        params.key = req->key();
        params.include_plaintext = include_plaintext;
        // A malformed request is refused by the core, so it is audited.
        params.request_error = DataKeyFromProto(
            req->key_spec(), req->number_of_bytes(), req->encryption_context(),
            req->justification(), req->has_justification(), params);
        service_->GenerateDataKey(caller, params, std::move(done));
      },
      [resp, include_plaintext](kms::DataKeyResult& result) {
        resp->set_key_id(result.key_id);
        resp->set_key_version(result.version);
        if (include_plaintext) {
          resp->set_plaintext(result.plaintext.data(), result.plaintext.size());
        }
        resp->set_ciphertext_blob(std::move(result.blob));
      });
}

grpc::ServerUnaryReactor* CryptoHandler::GenerateDataKey(
    grpc::CallbackServerContext* ctx, const pb::GenerateDataKeyRequest* req,
    pb::GenerateDataKeyResponse* resp) {
  return DataKey(ctx, req, resp, /*include_plaintext=*/true);
}

grpc::ServerUnaryReactor* CryptoHandler::GenerateDataKeyWithoutPlaintext(
    grpc::CallbackServerContext* ctx, const pb::GenerateDataKeyRequest* req,
    pb::GenerateDataKeyResponse* resp) {
  return DataKey(ctx, req, resp, /*include_plaintext=*/false);
}

grpc::ServerUnaryReactor* CryptoHandler::GenerateDataKeys(
    grpc::CallbackServerContext* ctx, const pb::GenerateDataKeysRequest* req,
    pb::GenerateDataKeysResponse* resp) {
  auto* reactor = new CleansingReactor([resp] {
    for (pb::DataKey& key : *resp->mutable_data_keys()) {
      CleanseBytes(key.mutable_plaintext());
    }
  });
  return ServeAsync<kms::DataKeysResult>(
      ctx, service_, callers_, kms::Rpc::kGenerateDataKeys, reactor,
      [&](const kms::Caller& caller,
          kms::KeyService::Done<kms::DataKeysResult> done) {
        kms::DataKeysParams params;
        params.data_key.key = req->key();
        params.data_key.include_plaintext = !req->without_plaintext();
        params.count = req->count();
        params.data_key.request_error = DataKeyFromProto(
            req->key_spec(), req->number_of_bytes(), req->encryption_context(),
            req->justification(), req->has_justification(), params.data_key);
        service_->GenerateDataKeys(caller, params, std::move(done));
      },
      [resp](kms::DataKeysResult& result) {
        resp->set_key_id(result.key_id);
        resp->set_key_version(result.version);
        resp->mutable_data_keys()->Reserve(result.keys.size());
        for (kms::DataKeysResult::Entry& entry : result.keys) {
          pb::DataKey* key = resp->add_data_keys();
          if (!entry.plaintext.empty()) {
            key->set_plaintext(entry.plaintext.data(), entry.plaintext.size());
          }
          key->set_ciphertext_blob(std::move(entry.blob));
        }
      });
}

grpc::ServerUnaryReactor* CryptoHandler::Encrypt(
    grpc::CallbackServerContext* ctx, const pb::EncryptRequest* req,
    pb::EncryptResponse* resp) {
  auto* reactor = new CleansingReactor([req] {
    CleanseBytes(const_cast<pb::EncryptRequest*>(req)->mutable_plaintext());
  });
  return ServeAsync<kms::EncryptResult>(
      ctx, service_, callers_, kms::Rpc::kEncrypt, reactor,
      [&](const kms::Caller& caller,
          kms::KeyService::Done<kms::EncryptResult> done) {
        kms::EncryptParams params;
        params.key = req->key();
        params.plaintext = SecretBytes::CopyOf(req->plaintext());
        params.context = FromProto(req->encryption_context());
        params.justification = JustificationOrError(req->justification(),
                                                    req->has_justification());
        service_->Encrypt(caller, params, std::move(done));
      },
      [resp](kms::EncryptResult& result) {
        resp->set_key_id(result.key_id);
        resp->set_key_version(result.version);
        resp->set_ciphertext_blob(std::move(result.blob));
      });
}

grpc::ServerUnaryReactor* CryptoHandler::Decrypt(
    grpc::CallbackServerContext* ctx, const pb::DecryptRequest* req,
    pb::DecryptResponse* resp) {
  auto* reactor =
      new CleansingReactor([resp] { CleanseBytes(resp->mutable_plaintext()); });
  return ServeAsync<kms::DecryptResult>(
      ctx, service_, callers_, kms::Rpc::kDecrypt, reactor,
      [&](const kms::Caller& caller,
          kms::KeyService::Done<kms::DecryptResult> done) {
        kms::DecryptParams params;
        params.blob = req->ciphertext_blob();
        params.context = FromProto(req->encryption_context());
        params.expected_key = req->expected_key();
        params.justification = JustificationOrError(req->justification(),
                                                    req->has_justification());
        service_->Decrypt(caller, params, std::move(done));
      },
      [resp](kms::DecryptResult& result) {
        resp->set_key_id(result.key_id);
        resp->set_key_version(result.version);
        resp->set_plaintext(result.plaintext.data(), result.plaintext.size());
      });
}

grpc::ServerUnaryReactor* CryptoHandler::ReEncrypt(
    grpc::CallbackServerContext* ctx, const pb::ReEncryptRequest* req,
    pb::ReEncryptResponse* resp) {
  return ServeAsync<kms::ReEncryptResult>(
      ctx, service_, callers_, kms::Rpc::kReEncrypt, ctx->DefaultReactor(),
      [&](const kms::Caller& caller,
          kms::KeyService::Done<kms::ReEncryptResult> done) {
        kms::ReEncryptParams params;
        params.blob = req->ciphertext_blob();
        params.source_context = FromProto(req->source_encryption_context());
        params.source_expected_key = req->source_expected_key();
        params.destination_key = req->destination_key();
        params.destination_context =
            FromProto(req->destination_encryption_context());
        params.justification = JustificationOrError(req->justification(),
                                                    req->has_justification());
        service_->ReEncrypt(caller, params, std::move(done));
      },
      [resp](kms::ReEncryptResult& result) {
        resp->set_source_key_id(result.source_key_id);
        resp->set_source_key_version(result.source_version);
        resp->set_key_id(result.key_id);
        resp->set_key_version(result.version);
        resp->set_ciphertext_blob(std::move(result.blob));
      });
}

grpc::ServerUnaryReactor* CryptoHandler::GenerateRandom(
    grpc::CallbackServerContext* ctx, const pb::GenerateRandomRequest* req,
    pb::GenerateRandomResponse* resp) {
  // Random bytes are often used as keys: cleanse them like data keys.
  auto* reactor =
      new CleansingReactor([resp] { CleanseBytes(resp->mutable_random()); });
  return ServeAsync<SecretBytes>(
      ctx, service_, callers_, kms::Rpc::kGenerateRandom, reactor,
      [&](const kms::Caller& caller, kms::KeyService::Done<SecretBytes> done) {
        service_->GenerateRandom(caller, req->number_of_bytes(),
                                 std::move(done));
      },
      [resp](SecretBytes& random) {
        resp->set_random(random.data(), random.size());
      });
}

}  // namespace custos::server
