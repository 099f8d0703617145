// KeyService: shared machinery (audit scope, counters, rotation) and the
// cryptographic operations. Management operations: key_admin.cc;
// background work: maintenance.cc.
#include "kms/key_service.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "kms/audit_scope.h"
#include "kms/ciphertext_blob.h"

namespace custos::kms {

struct KeyService::Counter {
  absl::Mutex mu;
  uint64_t used ABSL_GUARDED_BY(mu) = 0;
  uint64_t reserved ABSL_GUARDED_BY(mu) = 0;
};

KeyService::KeyService(Options options, hsm::Hsm* hsm, KeyRegistry* registry,
                       AuditLog* audit, const Authorizer* authorizer)
    : options_(std::move(options)),
      hsm_(hsm),
      registry_(registry),
      audit_(audit),
      authorizer_(authorizer) {}

KeyService::~KeyService() = default;

KeyService::Counter& KeyService::CounterFor(const std::string& key_id,
                                            uint32_t version) {
  std::string name = absl::StrCat(key_id, "/", version);
  absl::MutexLock lock(&counters_mu_);
  std::unique_ptr<Counter>& c = counters_[name];
  if (c == nullptr) c = std::make_unique<Counter>();
  return *c;
}

absl::Status KeyService::TakeEncryption(const Key& key,
                                        const KeyVersion& version) {
  Counter& c = CounterFor(key.id, version.number);
  absl::MutexLock lock(&c.mu);
  if (c.used >= c.reserved) {
    // Claim the next block from the durable count itself (not from a cached
    // copy): this process then owns exactly [start, end), so several
    // processes sharing a database never hand out the same range, and after
    // a restart the count may run high, never low (SECURITY.md, threat 9).
    uint64_t start = 0, end = 0;
    const uint32_t number = version.number;
    CUSTOS_RETURN_IF_ERROR(
        registry_
            ->Update(key.id,
                     [&](Key& k) -> absl::Status {
                       KeyVersion* v = k.FindVersion(number);
                       if (v == nullptr) {
                         return absl::InternalError("version vanished");
                       }
                       start = v->encryptions_reserved;
                       if (start >= options_.encryption_limit) {
                         return absl::ResourceExhaustedError(
                             "version reached its encryption limit");
                       }
                       end = std::min(start + options_.counter_block,
                                      options_.encryption_limit);
                       v->encryptions_reserved = end;
                       return absl::OkStatus();
                     })
            .status());
    c.used = start;
    c.reserved = end;
  }
  ++c.used;
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const Key>> KeyService::RotateFrom(
    const std::string& key_id, uint32_t expected_primary, Audit* audit) {
  absl::MutexLock lock(&rotate_mu_);
  CUSTOS_ASSIGN_OR_RETURN(std::shared_ptr<const Key> current,
                          registry_->Find(key_id));
  if (current->primary_version != expected_primary) return current;
  if (current->state != KeyState::kEnabled) {
    return absl::FailedPreconditionError(
        absl::StrCat("key ", key_id, " is ", KeyStateName(current->state),
                     "; only ENABLED keys rotate"));
  }
  const uint32_t number = static_cast<uint32_t>(current->versions.size()) + 1;
  // Generate first, commit second: a crash in between leaves an HSM object
  // without a row, which the reconciler removes; never a row without an
  // object, and never a primary version that is not durable.
  CUSTOS_ASSIGN_OR_RETURN(std::string hsm_id,
                          hsm_->GenerateAesKey(HsmLabel(key_id, number)));
  const absl::Time now = options_.now();
  absl::StatusOr<std::shared_ptr<const Key>> updated =
      registry_->Update(key_id, [&](Key& k) -> absl::Status {
        if (k.primary_version != expected_primary ||
            k.versions.size() + 1 != number) {
          return absl::AbortedError("key changed during rotation");
        }
        KeyVersion v;
        v.number = number;
        v.state = VersionState::kEnabled;
        v.hsm_id = hsm_id;
        v.create_time = now;
        k.versions.push_back(std::move(v));
        k.primary_version = number;
        k.update_time = now;
        if (k.rotation_period > absl::ZeroDuration()) {
          k.next_rotation_time = now + k.rotation_period;
        }
        if (audit == nullptr) return absl::OkStatus();
        audit->SetKey(key_id, number);
        return audit->RecordBeforeCommit();
      });
  if (!updated.ok()) {
    // The version never became durable: its object must not linger.
    hsm_->DestroyObjects(hsm_id).IgnoreError();
  }
  return updated;
}

absl::StatusOr<KeyService::SealedData> KeyService::Seal(
    std::shared_ptr<const Key> key, absl::string_view plaintext,
    const EncryptionContext& context, Audit& audit) {
  for (int attempt = 0; attempt < 3; ++attempt) {
    const KeyVersion* version = key->FindVersion(key->primary_version);
    if (version == nullptr || version->state != VersionState::kEnabled) {
      return absl::InternalError(
          absl::StrCat("key ", key->id, " has no usable primary version"));
    }
    absl::Status taken = TakeEncryption(*key, *version);
    if (absl::IsResourceExhausted(taken)) {
      // Copy what is needed first: RotateFrom replaces the snapshot that
      // `version` points into.
      const uint32_t exhausted = version->number;
      const std::string key_id = key->id;
      // The rotation is the service's own act: it gets its own record,
      // written before the new version commits.
      Audit rotation(this, Caller{kSystemPrincipal, "", ""}, Rpc::kRotateKey);
      rotation.SetKey(key_id, 0);
      rotation.AddDetail(absl::StrCat("automatic: version ", exhausted,
                                      " reached its encryption limit"));
      CUSTOS_ASSIGN_OR_RETURN(
          key, rotation.Run<std::shared_ptr<const Key>>(
                   [&] { return RotateFrom(key_id, exhausted, &rotation); }));
      audit.AddDetail(absl::StrCat("rotated automatically: version ", exhausted,
                                   " reached its encryption limit"));
      continue;
    }
    CUSTOS_RETURN_IF_ERROR(taken);
    CUSTOS_ASSIGN_OR_RETURN(std::string header,
                            EncodeBlobHeader({key->id, version->number}));
    absl::StatusOr<hsm::GcmSealed> sealed = hsm_->EncryptAesGcm(
        version->hsm_id, BlobAad(header, context), plaintext);
    if (!sealed.ok()) {
      if (absl::IsNotFound(sealed.status())) {
        return absl::InternalError(absl::StrCat("key material of ", key->id,
                                                " version ", version->number,
                                                " is missing from the HSM"));
      }
      return sealed.status();
    }
    audit.SetKey(key->id, version->number);
    return SealedData{key->id, version->number,
                      AssembleBlob(header, sealed->iv, sealed->ciphertext)};
  }
  return absl::UnavailableError("key rotation did not settle; retry");
}

absl::StatusOr<std::shared_ptr<const Key>> KeyService::AuthorizeKeyUse(
    const Caller& caller, Rpc rpc, KeyOperation op, const std::string& name,
    const EncryptionContext& context, const Justification* justification,
    Audit& audit) {
  absl::StatusOr<std::shared_ptr<const Key>> key = registry_->Find(name);
  const Key* raw = key.ok() ? key->get() : nullptr;
  if (raw != nullptr) audit.SetKey(raw->id, 0);
  CUSTOS_RETURN_IF_ERROR(
      authorizer_->Check(caller, rpc, raw, op, &context, justification));
  if ((*key)->state != KeyState::kEnabled) {
    return absl::FailedPreconditionError(
        absl::StrCat("key ", (*key)->id, " is ", KeyStateName((*key)->state),
                     " and cannot be used"));
  }
  return key;
}

absl::StatusOr<DataKeyResult> KeyService::GenerateDataKey(
    const Caller& caller, const DataKeyParams& params) {
  Audit audit(this, caller,
              params.include_plaintext ? Rpc::kGenerateDataKey
                                       : Rpc::kGenerateDataKeyWithoutPlaintext);
  audit.SetContext(params.context);
  audit.SetJustification(params.justification.get());
  return audit.Run<DataKeyResult>([&]() -> absl::StatusOr<DataKeyResult> {
    if (params.bytes < 1 || params.bytes > kMaxDataKeyBytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "number_of_bytes: ", params.bytes,
          " is out of range; ask for 1 to 1024 bytes or a key_spec"));
    }
    CUSTOS_RETURN_IF_ERROR(ValidateEncryptionContext(params.context));
    CUSTOS_ASSIGN_OR_RETURN(
        std::shared_ptr<const Key> key,
        AuthorizeKeyUse(
            caller,
            params.include_plaintext ? Rpc::kGenerateDataKey
                                     : Rpc::kGenerateDataKeyWithoutPlaintext,
            params.include_plaintext
                ? KeyOperation::kGenerateDataKey
                : KeyOperation::kGenerateDataKeyWithoutPlaintext,
            params.key, params.context, params.justification.get(), audit));
    CUSTOS_ASSIGN_OR_RETURN(SecretBytes data_key,
                            hsm_->GenerateRandom(params.bytes));
    CUSTOS_ASSIGN_OR_RETURN(
        SealedData sealed,
        Seal(std::move(key), data_key.view(), params.context, audit));
    DataKeyResult result;
    result.key_id = std::move(sealed.key_id);
    result.version = sealed.version;
    result.blob = std::move(sealed.blob);
    if (params.include_plaintext) result.plaintext = std::move(data_key);
    return result;
  });
}

absl::StatusOr<EncryptResult> KeyService::Encrypt(const Caller& caller,
                                                  const EncryptParams& params) {
  Audit audit(this, caller, Rpc::kEncrypt);
  audit.SetContext(params.context);
  audit.SetJustification(params.justification.get());
  return audit.Run<EncryptResult>([&]() -> absl::StatusOr<EncryptResult> {
    if (params.plaintext.size() < 1 ||
        params.plaintext.size() > kMaxBlobPlaintext) {
      return absl::InvalidArgumentError(absl::StrCat(
          "plaintext: ", params.plaintext.size(),
          " bytes; Encrypt takes 1 to 4096 bytes (for larger data, encrypt "
          "it locally with a key from GenerateDataKey)"));
    }
    CUSTOS_RETURN_IF_ERROR(ValidateEncryptionContext(params.context));
    CUSTOS_ASSIGN_OR_RETURN(
        std::shared_ptr<const Key> key,
        AuthorizeKeyUse(caller, Rpc::kEncrypt, KeyOperation::kEncrypt,
                        params.key, params.context, params.justification.get(),
                        audit));
    CUSTOS_ASSIGN_OR_RETURN(
        SealedData sealed,
        Seal(std::move(key), params.plaintext.view(), params.context, audit));
    return EncryptResult{std::move(sealed.key_id), sealed.version,
                         std::move(sealed.blob)};
  });
}

absl::StatusOr<DecryptResult> KeyService::Open(
    const Caller& caller, Rpc rpc, KeyOperation op, const std::string& blob,
    const EncryptionContext& context, const std::string& expected_key,
    const Justification* justification, Audit& audit) {
  CUSTOS_RETURN_IF_ERROR(ValidateEncryptionContext(context));
  CUSTOS_ASSIGN_OR_RETURN(ParsedBlob parsed, ParseBlob(blob));
  absl::StatusOr<std::shared_ptr<const Key>> key =
      registry_->Find(parsed.header.key_id);
  const Key* raw = key.ok() ? key->get() : nullptr;
  if (raw != nullptr) audit.SetKey(raw->id, parsed.header.version);
  CUSTOS_RETURN_IF_ERROR(
      authorizer_->Check(caller, rpc, raw, op, &context, justification));
  // Only an authorized caller learns anything about `expected_key`.
  if (!expected_key.empty()) {
    absl::StatusOr<std::shared_ptr<const Key>> expected =
        registry_->Find(expected_key);
    if (!expected.ok() || (*expected)->id != raw->id) {
      return InvalidCiphertext();
    }
  }
  if (raw->state == KeyState::kDestroyed) return InvalidCiphertext();
  if (raw->state != KeyState::kEnabled) {
    return absl::FailedPreconditionError(absl::StrCat("key ", raw->id, " is ",
                                                      KeyStateName(raw->state),
                                                      " and cannot be used"));
  }
  const KeyVersion* version = raw->FindVersion(parsed.header.version);
  if (version == nullptr || version->state != VersionState::kEnabled) {
    return InvalidCiphertext();
  }
  absl::StatusOr<SecretBytes> plaintext = hsm_->DecryptAesGcm(
      version->hsm_id, parsed.iv, BlobAad(parsed.header_bytes, context),
      parsed.ciphertext);
  if (!plaintext.ok()) {
    // Authentication failures and vanished objects read alike; device
    // trouble is reported as such (it says nothing about the blob).
    if (absl::IsInvalidArgument(plaintext.status()) ||
        absl::IsNotFound(plaintext.status())) {
      return InvalidCiphertext();
    }
    return plaintext.status();
  }
  return DecryptResult{raw->id, version->number, *std::move(plaintext)};
}

absl::StatusOr<DecryptResult> KeyService::Decrypt(const Caller& caller,
                                                  const DecryptParams& params) {
  Audit audit(this, caller, Rpc::kDecrypt);
  audit.SetContext(params.context);
  audit.SetJustification(params.justification.get());
  return audit.Run<DecryptResult>([&] {
    return Open(caller, Rpc::kDecrypt, KeyOperation::kDecrypt, params.blob,
                params.context, params.expected_key, params.justification.get(),
                audit);
  });
}

absl::StatusOr<ReEncryptResult> KeyService::ReEncrypt(
    const Caller& caller, const ReEncryptParams& params) {
  Audit audit(this, caller, Rpc::kReEncrypt);
  audit.SetContext(params.destination_context);
  audit.SetJustification(params.justification.get());
  return audit.Run<ReEncryptResult>([&]() -> absl::StatusOr<ReEncryptResult> {
    CUSTOS_RETURN_IF_ERROR(
        ValidateEncryptionContext(params.destination_context));
    CUSTOS_ASSIGN_OR_RETURN(
        DecryptResult opened,
        Open(caller, Rpc::kReEncrypt, KeyOperation::kReEncryptFrom, params.blob,
             params.source_context, params.source_expected_key,
             params.justification.get(), audit));
    const std::string& destination =
        params.destination_key.empty() ? opened.key_id : params.destination_key;
    CUSTOS_ASSIGN_OR_RETURN(
        std::shared_ptr<const Key> key,
        AuthorizeKeyUse(caller, Rpc::kReEncrypt, KeyOperation::kReEncryptTo,
                        destination, params.destination_context,
                        params.justification.get(), audit));
    audit.AddDetail(
        absl::StrCat("source ", opened.key_id, " version ", opened.version));
    CUSTOS_ASSIGN_OR_RETURN(SealedData sealed,
                            Seal(std::move(key), opened.plaintext.view(),
                                 params.destination_context, audit));
    return ReEncryptResult{opened.key_id, opened.version,
                           std::move(sealed.key_id), sealed.version,
                           std::move(sealed.blob)};
  });
}

absl::StatusOr<SecretBytes> KeyService::GenerateRandom(const Caller& caller,
                                                       size_t bytes) {
  Audit audit(this, caller, Rpc::kGenerateRandom);
  return audit.Run<SecretBytes>([&]() -> absl::StatusOr<SecretBytes> {
    CUSTOS_RETURN_IF_ERROR(authorizer_->Check(caller, Rpc::kGenerateRandom,
                                              nullptr, KeyOperation{}, nullptr,
                                              nullptr));
    if (bytes < 1 || bytes > kMaxDataKeyBytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "number_of_bytes: ", bytes, " is out of range; ask for 1 to 1024"));
    }
    return hsm_->GenerateRandom(bytes);
  });
}

}  // namespace custos::kms
