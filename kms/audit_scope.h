// KeyService::Audit: builds the audit record of one call and writes it when
// the call ends. Private to the kms/ implementation files.
#ifndef CUSTOS_KMS_AUDIT_SCOPE_H_
#define CUSTOS_KMS_AUDIT_SCOPE_H_

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kms/key_service.h"

namespace custos::kms {

// Not thread-safe: one per call, on the calling thread.
class KeyService::Audit {
 public:
  Audit(KeyService* service, const Caller& caller, Rpc rpc)
      : service_(service) {
    record_.time = service->options_.now();
    record_.principal = caller.principal;
    record_.operation = RpcName(rpc);
    record_.request_id = caller.request_id;
    record_.peer = caller.peer;
  }

  void SetKey(const std::string& id, uint32_t version) {
    record_.key_id = id;
    if (version != 0) record_.key_version = version;
  }
  // Records the request's encryption context if it is valid; an invalid
  // one (which the call refuses) is left out of the record, so that no
  // request can fill the log with what it is refused for.
  void SetContext(const EncryptionContext& context) {
    if (ValidateEncryptionContext(context).ok()) {
      record_.context = context;
    } else {
      record_.context.clear();
      AddDetail("encryption context not recorded: invalid");
    }
  }
  void SetJustification(const Justification* justification) {
    record_.has_justification = justification != nullptr;
    if (justification != nullptr) record_.justification = *justification;
  }
  // Records the policy the call sets (canonical JSON; see AuditRecord).
  void SetPolicy(const KeyPolicy& policy) {
    record_.policy = PolicyToCanonicalJson(policy);
  }
  void AddDetail(absl::string_view detail) {
    if (!record_.detail.empty()) record_.detail += "; ";
    record_.detail.append(std::string(detail.substr(0, 256)));
  }

  // Writes the record for a call that ended with `outcome`. Returns the
  // append's status: when it fails, the caller must release nothing.
  absl::Status Record(const absl::Status& outcome) {
    SetOutcome(outcome);
    return service_->audit_->Append(std::move(record_));
  }

  // For calls that change state: writes the success record now, inside the
  // change's transaction and before it commits, so that no change is ever
  // applied without a durable record. On failure the caller must abort the
  // transaction (return the error from its mutator).
  absl::Status RecordBeforeCommit() {
    AuditRecord copy = record_;
    copy.code = absl::StatusCode::kOk;
    copy.outcome = AuditOutcome::kAllowed;
    absl::Status s = service_->audit_->Append(std::move(copy));
    precommit_ = s.ok() ? Precommit::kWritten : Precommit::kFailed;
    if (s.ok()) return absl::OkStatus();
    return RefusedUnrecorded(s);
  }

  // Runs `body`, records its outcome, and returns its result, unless the
  // record could not be written: then UNAVAILABLE, and the result (with any
  // data key in it) is dropped and cleansed.
  template <typename T, typename F>
  absl::StatusOr<T> Run(F body) {
    return Finish(body());
  }

  // Run's asynchronous form: runs `body` now, queues the record, and hands
  // the result to `done` once the record is durable (UNAVAILABLE, and the
  // result dropped and cleansed, if it cannot be written). Calls that
  // changed state (RecordBeforeCommit) finish synchronously.
  template <typename T, typename F>
  void RunAsync(F body, KeyService::Done<T> done) {
    absl::StatusOr<T> result = body();
    if (precommit_ != Precommit::kNone) {
      std::move(done)(Finish(std::move(result)));
      return;
    }
    SetOutcome(result.status());
    service_->audit_->AppendAsync(
        std::move(record_),
        [result = std::move(result),
         done = std::move(done)](absl::Status appended) mutable {
          if (!appended.ok()) {
            std::move(done)(RefusedUnrecorded(appended));
            return;  // `result` is destroyed here, cleansing any data key
          }
          std::move(done)(std::move(result));
        });
  }

 private:
  static absl::Status RefusedUnrecorded(const absl::Status& appended) {
    return absl::UnavailableError(
        absl::StrCat("request refused because the audit log cannot record it: ",
                     appended.message()));
  }

  void SetOutcome(const absl::Status& outcome) {
    record_.code = outcome.code();
    if (outcome.ok()) {
      record_.outcome = AuditOutcome::kAllowed;
    } else if (absl::IsPermissionDenied(outcome) ||
               absl::IsUnauthenticated(outcome)) {
      record_.outcome = AuditOutcome::kDenied;
    } else {
      record_.outcome = AuditOutcome::kFailed;
      AddDetail(outcome.message());
    }
  }

  template <typename T>
  absl::StatusOr<T> Finish(absl::StatusOr<T> result) {
    if (precommit_ == Precommit::kFailed) return result;  // nothing applied
    if (precommit_ == Precommit::kWritten) {
      if (!result.ok()) {
        // The success record is durable but the change did not commit
        // after all: record that too (the log may over-report, never
        // under-report).
        AddDetail("the change recorded before this one was not applied");
        Record(result.status()).IgnoreError();
      }
      return result;
    }
    absl::Status appended = Record(result.status());
    if (!appended.ok()) return RefusedUnrecorded(appended);
    return result;
  }

  enum class Precommit { kNone, kWritten, kFailed };
  KeyService* const service_;
  AuditRecord record_;
  Precommit precommit_ = Precommit::kNone;
};

}  // namespace custos::kms

#endif  // CUSTOS_KMS_AUDIT_SCOPE_H_
