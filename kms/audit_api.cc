#include "kms/audit_api.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace custos::kms {
namespace {

constexpr uint32_t kDefaultPageSize = 100;
constexpr uint32_t kMaxPageSize = 1000;

}  // namespace

absl::Status AuditApi::Admit(const Caller& caller, Rpc rpc,
                             absl::string_view detail) {
  return Record(caller, rpc,
                authorizer_->Check(caller, rpc, nullptr, KeyOperation{},
                                   nullptr, nullptr),
                detail);
}

absl::Status AuditApi::Record(const Caller& caller, Rpc rpc,
                              const absl::Status& outcome,
                              absl::string_view detail) {
  AuditRecord record;
  record.time = now_();
  record.principal = caller.principal;
  record.operation = RpcName(rpc);
  record.request_id = caller.request_id;
  record.peer = caller.peer;
  record.code = outcome.code();
  if (outcome.ok()) {
    record.outcome = AuditOutcome::kAllowed;
  } else if (absl::IsPermissionDenied(outcome) ||
             absl::IsUnauthenticated(outcome)) {
    record.outcome = AuditOutcome::kDenied;
  } else {
    record.outcome = AuditOutcome::kFailed;
  }
  record.detail = std::string(detail.substr(0, 256));
  if (!outcome.ok() && !absl::IsPermissionDenied(outcome)) {
    if (!record.detail.empty()) record.detail += "; ";
    absl::StrAppend(&record.detail, outcome.message().substr(0, 256));
  }
  absl::Status appended = audit_->Append(std::move(record));
  if (!appended.ok()) {
    return absl::UnavailableError(
        absl::StrCat("request refused because the audit log cannot record it: ",
                     appended.message()));
  }
  return outcome;
}

absl::Status AuditApi::RecordRefusal(const Caller& caller, Rpc rpc,
                                     const absl::Status& refusal) {
  if (refusal.ok()) {
    return Record(caller, rpc,
                  absl::InternalError("RecordRefusal called without a refusal"),
                  "");
  }
  return Record(caller, rpc, refusal, "");
}

absl::StatusOr<AuditPage> AuditApi::List(const Caller& caller,
                                         const AuditFilter& filter,
                                         uint32_t page_size,
                                         const std::string& page_token) {
  uint64_t from = 1;
  if (!page_token.empty() && !absl::SimpleAtoi(page_token, &from)) {
    return RecordRefusal(
        caller, Rpc::kListAuditEvents,
        absl::InvalidArgumentError(
            "page_token: not a token from a previous ListAuditEvents "
            "response"));
  }
  if (page_size > kMaxPageSize) {
    return RecordRefusal(caller, Rpc::kListAuditEvents,
                         absl::InvalidArgumentError("page_size: at most 1000"));
  }
  CUSTOS_RETURN_IF_ERROR(
      Admit(caller, Rpc::kListAuditEvents, absl::StrCat("from_seq=", from)));
  const size_t want = page_size == 0 ? kDefaultPageSize : page_size;
  AuditPosition position;
  position.next_seq = from;
  CUSTOS_ASSIGN_OR_RETURN(std::vector<AuditEvent> events,
                          reader_->Read(position, filter, want));
  AuditPage page;
  if (events.size() == want) {
    page.next_page_token = absl::StrCat(position.next_seq);
  }
  // Bound the reply by bytes: the events past the budget start the next
  // page instead (at least one event per page, so every page advances).
  size_t bytes = 0;
  for (size_t i = 0; i < events.size(); ++i) {
    const size_t cost = 2 * events[i].raw.size() + 64;
    if (i > 0 && bytes + cost > kMaxAuditPageBytes) {
      page.next_page_token = absl::StrCat(events[i].seq);
      events.resize(i);
      break;
    }
    bytes += cost;
  }
  page.events = std::move(events);
  return page;
}

absl::StatusOr<AuditPosition> AuditApi::StartStream(const Caller& caller,
                                                    const AuditFilter& filter,
                                                    uint64_t from_seq) {
  CUSTOS_RETURN_IF_ERROR(Admit(caller, Rpc::kStreamAuditEvents,
                               absl::StrCat("from_seq=", from_seq)));
  if (from_seq == 0) return reader_->End();  // only events from now on
  AuditPosition position;
  position.next_seq = from_seq;
  return position;
}

absl::StatusOr<std::vector<AuditEvent>> AuditApi::Poll(
    AuditPosition& position, const AuditFilter& filter) {
  return reader_->Read(position, filter, 1000);
}

absl::StatusOr<std::string> AuditApi::PublicKeyPem(const Caller& caller) {
  CUSTOS_RETURN_IF_ERROR(Admit(caller, Rpc::kGetAuditPublicKey, ""));
  return signer_->public_key_pem();
}

absl::StatusOr<AuditVerifyReport> AuditApi::Verify(const Caller& caller) {
  CUSTOS_RETURN_IF_ERROR(Admit(caller, Rpc::kVerifyAuditLog, ""));
  return VerifyAuditDirectory(reader_->dir(), {signer_->public_key_pem()},
                              nullptr, /*live=*/true);
}

}  // namespace custos::kms
