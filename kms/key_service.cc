// KeyService: shared machinery (audit scope, counters, rotation) and the
// cryptographic operations. Management operations: key_admin.cc;
// background work: maintenance.cc.
#include "kms/key_service.h"

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
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

namespace {

// The options with `now` kept to whole microseconds, as the store keeps
// times: a key read back inside a store transaction then compares equal to
// the registry's copy of it.
KeyService::Options WithStoredPrecision(KeyService::Options options) {
  options.now = [now = std::move(options.now)] {
    return absl::FromUnixMicros(absl::ToUnixMicros(now()));
  };
  return options;
}

}  // namespace

KeyService::KeyService(Options options, hsm::Hsm* hsm, KeyRegistry* registry,
                       AuditLog* audit, const Authorizer* authorizer)
    : options_(WithStoredPrecision(std::move(options))),
      hsm_(hsm),
      registry_(registry),
      audit_(audit),
      authorizer_(authorizer) {}

KeyService::~KeyService() = default;

KeyService::Counter& KeyService::CounterFor(const std::string& key_id,
                                            uint32_t version) {
  // Built in a per-thread buffer: no allocation per encryption once warm.
  thread_local std::string name;
  name.assign(key_id).push_back('/');
  absl::StrAppend(&name, version);
  absl::MutexLock lock(&counters_mu_);
  auto it = counters_.find(name);
  if (it == counters_.end()) {
    it = counters_.emplace(name, std::make_unique<Counter>()).first;
  }
  return *it->second;
}

absl::Status KeyService::TakeEncryptions(const Key& key,
                                         const KeyVersion& version,
                                         uint64_t n) {
  Counter& c = CounterFor(key.id, version.number);
  absl::MutexLock lock(&c.mu);
  if (c.reserved - c.used < n) {
    // Claim the next block from the durable count itself (not from a cached
    // copy): this process then owns exactly [start, end), so several
    // processes sharing a database never hand out the same range, and after
    // a restart the count may run high, never low (docs/security.md, threat 9).
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
                       if (start >= options_.encryption_limit ||
                           options_.encryption_limit - start < n) {
                         return absl::ResourceExhaustedError(
                             "version reached its encryption limit");
                       }
                       end = std::min(start + std::max<uint64_t>(
                                                  options_.counter_block, n),
                                      options_.encryption_limit);
                       v->encryptions_reserved = end;
                       return absl::OkStatus();
                     })
            .status());
    // What was left of the previous block is skipped: over-counting is safe.
    c.used = start;
    c.reserved = end;
  }
  c.used += n;
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
  // Intent, generate, commit: a crash in between leaves an HSM object that
  // the database names as an uncommitted intent, which the reconciler
  // removes; never a row without an object, and never a primary version
  // that is not durable. A reconcile running meanwhile waits for the
  // commit (material_mu_).
  absl::ReaderMutexLock material(&material_mu_);
  CUSTOS_ASSIGN_OR_RETURN(std::string hsm_id,
                          GenerateVersionMaterial(key_id, number));
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
    // The version did not become durable: its object must not linger.
    DiscardUncommitted(key_id, number, hsm_id);
    if (absl::IsAborted(updated.status())) {
      // Another replica rotated first, this cache not yet knowing it: that
      // rotation is this one's result, as when two calls race here.
      CUSTOS_RETURN_IF_ERROR(registry_->Refresh(key_id));
      CUSTOS_ASSIGN_OR_RETURN(current, registry_->Find(key_id));
      if (current->primary_version != expected_primary) return current;
    }
  }
  return updated;
}

absl::StatusOr<KeyService::SealedBatch> KeyService::SealMany(
    std::shared_ptr<const Key> key, const SealInput& input,
    const EncryptionContext& context, Audit& audit) {
  const size_t n = input.generate_count > 0 ? input.generate_count : 1;
  if (n > options_.encryption_limit) {
    // No version could hold them: refuse rather than rotate in vain.
    return absl::InvalidArgumentError(absl::StrCat(
        "count: ", n, " is more than one key version may encrypt (",
        options_.encryption_limit, ")"));
  }
  for (int attempt = 0; attempt < 3; ++attempt) {
    const KeyVersion* version = key->FindVersion(key->primary_version);
    if (version == nullptr || version->state != VersionState::kEnabled) {
      return absl::InternalError(
          absl::StrCat("key ", key->id, " has no usable primary version"));
    }
    absl::Status taken = TakeEncryptions(*key, *version, n);
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
    const std::string aad = BlobAad(header, context);
    SealedBatch out;
    std::vector<hsm::GcmSealed> sealed;
    absl::Status hsm_status;
    if (input.generate_count > 0) {
      absl::StatusOr<std::vector<hsm::SealedSecret>> made =
          hsm_->GenerateAndSealAesGcm(version->hsm_id, aad,
                                      input.generate_bytes, n);
      hsm_status = made.status();
      if (made.ok()) {
        for (hsm::SealedSecret& secret : *made) {
          out.generated.push_back(std::move(secret.plaintext));
          sealed.push_back(std::move(secret.sealed));
        }
      }
    } else {
      absl::StatusOr<hsm::GcmSealed> one =
          hsm_->EncryptAesGcm(version->hsm_id, aad, input.plaintext);
      hsm_status = one.status();
      if (one.ok()) sealed.push_back(*std::move(one));
    }
    if (!hsm_status.ok()) {
      if (absl::IsNotFound(hsm_status)) {
        return absl::InternalError(absl::StrCat("key material of ", key->id,
                                                " version ", version->number,
                                                " is missing from the HSM"));
      }
      return hsm_status;
    }
    audit.SetKey(key->id, version->number);
    out.key_id = key->id;
    out.version = version->number;
    out.blobs.reserve(sealed.size());
    for (const hsm::GcmSealed& s : sealed) {
      out.blobs.push_back(AssembleBlob(header, s.iv, s.ciphertext));
    }
    return out;
  }
  return absl::UnavailableError("key rotation did not settle; retry");
}

absl::StatusOr<KeyService::SealedData> KeyService::Seal(
    std::shared_ptr<const Key> key, absl::string_view plaintext,
    const EncryptionContext& context, Audit& audit) {
  SealInput input;
  input.plaintext = plaintext;
  CUSTOS_ASSIGN_OR_RETURN(SealedBatch batch,
                          SealMany(std::move(key), input, context, audit));
  return SealedData{std::move(batch.key_id), batch.version,
                    std::move(batch.blobs[0])};
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
  CUSTOS_RETURN_IF_ERROR(registry_->CheckFresh());
  if ((*key)->state != KeyState::kEnabled) {
    return absl::FailedPreconditionError(
        absl::StrCat("key ", (*key)->id, " is ", KeyStateName((*key)->state),
                     " and cannot be used"));
  }
  return key;
}

namespace {

// Waits for an asynchronous operation: the synchronous forms.
template <typename T, typename Start>
absl::StatusOr<T> AwaitResult(Start start) {
  absl::Notification finished;
  std::optional<absl::StatusOr<T>> out;
  start([&](absl::StatusOr<T> result) {
    out.emplace(std::move(result));
    finished.Notify();
  });
  finished.WaitForNotification();
  return *std::move(out);
}

Rpc DataKeyRpc(bool include_plaintext) {
  return include_plaintext ? Rpc::kGenerateDataKey
                           : Rpc::kGenerateDataKeyWithoutPlaintext;
}

KeyOperation DataKeyOperation(bool include_plaintext) {
  return include_plaintext ? KeyOperation::kGenerateDataKey
                           : KeyOperation::kGenerateDataKeyWithoutPlaintext;
}

}  // namespace

absl::StatusOr<KeyService::SealedBatch> KeyService::MakeDataKeys(
    const Caller& caller, Rpc rpc, const DataKeyParams& params, size_t count,
    Audit& audit) {
  CUSTOS_RETURN_IF_ERROR(params.request_error);
  CUSTOS_RETURN_IF_ERROR(params.justification.error);
  if (params.bytes < 1 || params.bytes > kMaxDataKeyBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "number_of_bytes: ", params.bytes,
        " is out of range; ask for 1 to 1024 bytes or a key_spec"));
  }
  CUSTOS_RETURN_IF_ERROR(ValidateEncryptionContext(params.context));
  CUSTOS_ASSIGN_OR_RETURN(
      std::shared_ptr<const Key> key,
      AuthorizeKeyUse(caller, rpc, DataKeyOperation(params.include_plaintext),
                      params.key, params.context, params.justification.get(),
                      audit));
  SealInput input;
  input.generate_count = count;
  input.generate_bytes = params.bytes;
  return SealMany(std::move(key), input, params.context, audit);
}

void KeyService::GenerateDataKey(const Caller& caller,
                                 const DataKeyParams& params,
                                 Done<DataKeyResult> done) {
  const Rpc rpc = DataKeyRpc(params.include_plaintext);
  Audit audit(this, caller, rpc);
  audit.SetContext(params.context);
  audit.SetJustification(params.justification.get());
  audit.RunAsync<DataKeyResult>(
      [&]() -> absl::StatusOr<DataKeyResult> {
        CUSTOS_ASSIGN_OR_RETURN(SealedBatch batch,
                                MakeDataKeys(caller, rpc, params, 1, audit));
        DataKeyResult result;
        result.key_id = std::move(batch.key_id);
        result.version = batch.version;
        result.blob = std::move(batch.blobs[0]);
        if (params.include_plaintext) {
          result.plaintext = std::move(batch.generated[0]);
        }
        return result;
      },
      std::move(done));
}

absl::StatusOr<DataKeyResult> KeyService::GenerateDataKey(
    const Caller& caller, const DataKeyParams& params) {
  return AwaitResult<DataKeyResult>([&](Done<DataKeyResult> done) {
    GenerateDataKey(caller, params, std::move(done));
  });
}

void KeyService::GenerateDataKeys(const Caller& caller,
                                  const DataKeysParams& params,
                                  Done<DataKeysResult> done) {
  Audit audit(this, caller, Rpc::kGenerateDataKeys);
  audit.SetContext(params.data_key.context);
  audit.SetJustification(params.data_key.justification.get());
  audit.AddDetail(absl::StrCat(
      "count=", params.count,
      params.data_key.include_plaintext ? "" : " without plaintext"));
  audit.RunAsync<DataKeysResult>(
      [&]() -> absl::StatusOr<DataKeysResult> {
        if (params.count < 1 || params.count > kMaxDataKeysPerCall) {
          return absl::InvalidArgumentError(absl::StrCat(
              "count: ", params.count, " is out of range; ask for 1 to ",
              kMaxDataKeysPerCall, " data keys per call"));
        }
        CUSTOS_ASSIGN_OR_RETURN(
            SealedBatch batch,
            MakeDataKeys(caller, Rpc::kGenerateDataKeys, params.data_key,
                         params.count, audit));
        DataKeysResult result;
        result.key_id = std::move(batch.key_id);
        result.version = batch.version;
        result.keys.resize(batch.blobs.size());
        for (size_t i = 0; i < batch.blobs.size(); ++i) {
          result.keys[i].blob = std::move(batch.blobs[i]);
          if (params.data_key.include_plaintext) {
            result.keys[i].plaintext = std::move(batch.generated[i]);
          }
        }
        return result;
      },
      std::move(done));
}

absl::StatusOr<DataKeysResult> KeyService::GenerateDataKeys(
    const Caller& caller, const DataKeysParams& params) {
  return AwaitResult<DataKeysResult>([&](Done<DataKeysResult> done) {
    GenerateDataKeys(caller, params, std::move(done));
  });
}

absl::StatusOr<EncryptResult> KeyService::Encrypt(const Caller& caller,
                                                  const EncryptParams& params) {
  return AwaitResult<EncryptResult>([&](Done<EncryptResult> done) {
    Encrypt(caller, params, std::move(done));
  });
}

void KeyService::Encrypt(const Caller& caller, const EncryptParams& params,
                         Done<EncryptResult> done) {
  Audit audit(this, caller, Rpc::kEncrypt);
  audit.SetContext(params.context);
  audit.SetJustification(params.justification.get());
  audit.RunAsync<EncryptResult>(
      [&]() -> absl::StatusOr<EncryptResult> {
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
                            params.key, params.context,
                            params.justification.get(), audit));
        CUSTOS_ASSIGN_OR_RETURN(SealedData sealed,
                                Seal(std::move(key), params.plaintext.view(),
                                     params.context, audit));
        return EncryptResult{std::move(sealed.key_id), sealed.version,
                             std::move(sealed.blob)};
      },
      std::move(done));
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
  CUSTOS_RETURN_IF_ERROR(registry_->CheckFresh());
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
  return AwaitResult<DecryptResult>([&](Done<DecryptResult> done) {
    Decrypt(caller, params, std::move(done));
  });
}

void KeyService::Decrypt(const Caller& caller, const DecryptParams& params,
                         Done<DecryptResult> done) {
  Audit audit(this, caller, Rpc::kDecrypt);
  audit.SetContext(params.context);
  audit.SetJustification(params.justification.get());
  audit.RunAsync<DecryptResult>(
      [&]() -> absl::StatusOr<DecryptResult> {
        CUSTOS_RETURN_IF_ERROR(params.justification.error);
        return Open(caller, Rpc::kDecrypt, KeyOperation::kDecrypt, params.blob,
                    params.context, params.expected_key,
                    params.justification.get(), audit);
      },
      std::move(done));
}

absl::StatusOr<ReEncryptResult> KeyService::ReEncrypt(
    const Caller& caller, const ReEncryptParams& params) {
  return AwaitResult<ReEncryptResult>([&](Done<ReEncryptResult> done) {
    ReEncrypt(caller, params, std::move(done));
  });
}

void KeyService::ReEncrypt(const Caller& caller, const ReEncryptParams& params,
                           Done<ReEncryptResult> done) {
  Audit audit(this, caller, Rpc::kReEncrypt);
  audit.SetContext(params.destination_context);
  audit.SetJustification(params.justification.get());
  audit.RunAsync<ReEncryptResult>(
      [&]() -> absl::StatusOr<ReEncryptResult> {
        CUSTOS_RETURN_IF_ERROR(
            ValidateEncryptionContext(params.destination_context));
        CUSTOS_ASSIGN_OR_RETURN(
            DecryptResult opened,
            Open(caller, Rpc::kReEncrypt, KeyOperation::kReEncryptFrom,
                 params.blob, params.source_context, params.source_expected_key,
                 params.justification.get(), audit));
        const std::string& destination = params.destination_key.empty()
                                             ? opened.key_id
                                             : params.destination_key;
        CUSTOS_ASSIGN_OR_RETURN(
            std::shared_ptr<const Key> key,
            AuthorizeKeyUse(caller, Rpc::kReEncrypt, KeyOperation::kReEncryptTo,
                            destination, params.destination_context,
                            params.justification.get(), audit));
        audit.AddDetail(absl::StrCat("source ", opened.key_id, " version ",
                                     opened.version));
        CUSTOS_ASSIGN_OR_RETURN(SealedData sealed,
                                Seal(std::move(key), opened.plaintext.view(),
                                     params.destination_context, audit));
        return ReEncryptResult{opened.key_id, opened.version,
                               std::move(sealed.key_id), sealed.version,
                               std::move(sealed.blob)};
      },
      std::move(done));
}

void KeyService::RecordRefusal(const Caller& caller, Rpc rpc,
                               absl::Status refusal,
                               absl::AnyInvocable<void(absl::Status) &&> done) {
  if (refusal.ok()) {
    refusal = absl::InternalError("RecordRefusal called without a refusal");
  }
  Audit audit(this, caller, rpc);
  if (absl::IsUnauthenticated(refusal) || absl::IsPermissionDenied(refusal)) {
    // A denial's record says why (a failure's does already).
    audit.AddDetail(refusal.message());
  }
  audit.RunAsync<bool>(
      [&]() -> absl::StatusOr<bool> { return refusal; },
      [done = std::move(done)](absl::StatusOr<bool> result) mutable {
        std::move(done)(result.status());
      });
}

absl::Status KeyService::RecordRefusal(const Caller& caller, Rpc rpc,
                                       const absl::Status& refusal) {
  absl::StatusOr<bool> result = AwaitResult<bool>([&](Done<bool> done) {
    RecordRefusal(caller, rpc, refusal,
                  [done = std::move(done)](absl::Status s) mutable {
                    std::move(done)(absl::StatusOr<bool>(std::move(s)));
                  });
  });
  return result.status();
}

absl::StatusOr<SecretBytes> KeyService::GenerateRandom(const Caller& caller,
                                                       size_t bytes) {
  return AwaitResult<SecretBytes>([&](Done<SecretBytes> done) {
    GenerateRandom(caller, bytes, std::move(done));
  });
}

void KeyService::GenerateRandom(const Caller& caller, size_t bytes,
                                Done<SecretBytes> done) {
  Audit audit(this, caller, Rpc::kGenerateRandom);
  audit.RunAsync<SecretBytes>(
      [&]() -> absl::StatusOr<SecretBytes> {
        CUSTOS_RETURN_IF_ERROR(authorizer_->Check(caller, Rpc::kGenerateRandom,
                                                  nullptr, KeyOperation{},
                                                  nullptr, nullptr));
        if (bytes < 1 || bytes > kMaxDataKeyBytes) {
          return absl::InvalidArgumentError(
              absl::StrCat("number_of_bytes: ", bytes,
                           " is out of range; ask for 1 to 1024"));
        }
        return hsm_->GenerateRandom(bytes);
      },
      std::move(done));
}

}  // namespace custos::kms
