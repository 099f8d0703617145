// AuditApi: what auditors can do, free of any transport: list and follow
// the log, fetch the checkpoint public key, verify the log on the server.
// Every call is authorized (auditors only) and itself audited. Thread-safe.
#ifndef CUSTOS_KMS_AUDIT_API_H_
#define CUSTOS_KMS_AUDIT_API_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kms/audit/audit_log.h"
#include "kms/audit/audit_reader.h"
#include "kms/audit/audit_verifier.h"
#include "kms/audit/checkpoint.h"
#include "kms/authorizer.h"

namespace custos::kms {

struct AuditPage {
  std::vector<AuditEvent> events;
  std::string next_page_token;  // empty: nothing more matches now
};

// A ListAuditEvents page holds at most this many bytes of events (each
// counted as twice its JSON line, for the line and its parsed fields),
// whatever its page_size, and always at least one event: far below gRPC's
// default 4 MiB receive limit, and no one page can be made huge by a few
// large records.
inline constexpr size_t kMaxAuditPageBytes = 1 << 20;

class AuditApi {
 public:
  // All pointers must outlive the AuditApi.
  AuditApi(
      const AuditReader* reader, AuditLog* audit, const Authorizer* authorizer,
      const AuditSigner* signer,
      std::function<absl::Time()> now = [] { return absl::Now(); })
      : reader_(reader),
        audit_(audit),
        authorizer_(authorizer),
        signer_(signer),
        now_(std::move(now)) {}

  absl::StatusOr<AuditPage> List(const Caller& caller,
                                 const AuditFilter& filter, uint32_t page_size,
                                 const std::string& page_token);
  // Authorizes and audits the start of a stream; returns where it starts
  // (at `from_seq`, or at the end of the log when 0).
  absl::StatusOr<AuditPosition> StartStream(const Caller& caller,
                                            const AuditFilter& filter,
                                            uint64_t from_seq);
  // The next events of a stream that StartStream allowed (not audited per
  // poll); reads only what was appended since the last poll.
  absl::StatusOr<std::vector<AuditEvent>> Poll(AuditPosition& position,
                                               const AuditFilter& filter);
  absl::StatusOr<std::string> PublicKeyPem(const Caller& caller);
  absl::StatusOr<AuditVerifyReport> Verify(const Caller& caller);
  // Records a call refused before it reached the API (no usable identity,
  // over the rate limit, a request the adapter could not translate).
  // Returns `refusal`, or UNAVAILABLE if the record cannot be written.
  absl::Status RecordRefusal(const Caller& caller, Rpc rpc,
                             const absl::Status& refusal);

  const std::string& node() const { return reader_->node(); }
  const std::string& fingerprint() const { return signer_->fingerprint(); }

 private:
  // Authorizes `rpc` and writes its audit record; returns the refusal or the
  // audit failure, if any.
  absl::Status Admit(const Caller& caller, Rpc rpc, absl::string_view detail);
  // Writes the record of a call that ended with `outcome`; returns
  // `outcome`, or UNAVAILABLE if the record cannot be written.
  absl::Status Record(const Caller& caller, Rpc rpc,
                      const absl::Status& outcome, absl::string_view detail);

  const AuditReader* const reader_;
  AuditLog* const audit_;
  const Authorizer* const authorizer_;
  const AuditSigner* const signer_;
  const std::function<absl::Time()> now_;
};

}  // namespace custos::kms

#endif  // CUSTOS_KMS_AUDIT_API_H_
