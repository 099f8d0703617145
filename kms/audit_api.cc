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
  absl::Status allowed = authorizer_->Check(caller, rpc, nullptr,
                                            KeyOperation{}, nullptr, nullptr);
  AuditRecord record;
  record.time = now_();
  record.principal = caller.principal;
  record.operation = RpcName(rpc);
  record.request_id = caller.request_id;
  record.peer = caller.peer;
  record.code = allowed.code();
  record.outcome =
      allowed.ok() ? AuditOutcome::kAllowed : AuditOutcome::kDenied;
  record.detail = std::string(detail.substr(0, 256));
  absl::Status appended = audit_->Append(std::move(record));
  if (!appended.ok()) {
    return absl::UnavailableError(
        absl::StrCat("request refused because the audit log cannot record it: ",
                     appended.message()));
  }
  return allowed;
}

absl::StatusOr<AuditPage> AuditApi::List(const Caller& caller,
                                         const AuditFilter& filter,
                                         uint32_t page_size,
                                         const std::string& page_token) {
  uint64_t from = 1;
  if (!page_token.empty() && !absl::SimpleAtoi(page_token, &from)) {
    return absl::InvalidArgumentError(
        "page_token: not a token from a previous ListAuditEvents response");
  }
  if (page_size > kMaxPageSize) {
    return absl::InvalidArgumentError("page_size: at most 1000");
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
