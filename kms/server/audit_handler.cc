#include "kms/server/audit_handler.h"

#include <chrono>
#include <thread>

namespace custos::server {
namespace {

absl::StatusOr<kms::AuditFilter> FromProto(const pb::AuditFilter& f) {
  kms::AuditFilter out;
  if (f.has_start_time()) {
    out.start = absl::FromUnixSeconds(f.start_time().seconds()) +
                absl::Nanoseconds(f.start_time().nanos());
  }
  if (f.has_end_time()) {
    out.end = absl::FromUnixSeconds(f.end_time().seconds()) +
              absl::Nanoseconds(f.end_time().nanos());
  }
  out.principal = f.principal();
  out.key_id = f.key_id();
  out.operation = f.operation();
  out.outcome = f.outcome();
  if (!out.outcome.empty() && out.outcome != "ALLOWED" &&
      out.outcome != "DENIED" && out.outcome != "FAILED") {
    return absl::InvalidArgumentError(
        "filter.outcome: one of ALLOWED, DENIED, FAILED");
  }
  return out;
}

void ToProto(const kms::AuditEvent& e, pb::AuditEvent* out) {
  out->set_seq(e.seq);
  const int64_t us = absl::ToUnixMicros(e.time);
  out->mutable_time()->set_seconds(us / 1000000);
  out->mutable_time()->set_nanos(static_cast<int32_t>((us % 1000000) * 1000));
  out->set_node(e.node);
  out->set_principal(e.principal);
  out->set_operation(e.operation);
  out->set_key_id(e.key_id);
  out->set_key_version(e.key_version);
  out->mutable_encryption_context()->insert(e.context.begin(), e.context.end());
  if (e.has_justification) {
    pb::JustificationReason reason;
    if (pb::JustificationReason_Parse(e.justification_reason, &reason)) {
      out->mutable_justification()->set_reason(reason);
    }
    out->mutable_justification()->set_detail(e.justification_detail);
  }
  out->set_outcome(e.outcome);
  out->set_code(e.code);
  out->set_request_id(e.request_id);
  out->set_peer(e.peer);
  out->set_detail(e.detail);
  out->set_checkpoint(e.checkpoint);
  out->set_raw(e.raw);
}

}  // namespace

absl::StatusOr<kms::Caller> AuditHandler::Admit(grpc::ServerContext* ctx,
                                                kms::Rpc rpc) {
  ResolvedCaller resolved = callers_->Resolve(ctx);
  if (resolved.refusal.ok()) return std::move(resolved.caller);
  return api_->RecordRefusal(resolved.caller, rpc, resolved.refusal);
}

grpc::Status AuditHandler::ListAuditEvents(
    grpc::ServerContext* ctx, const pb::ListAuditEventsRequest* req,
    pb::ListAuditEventsResponse* resp) {
  absl::StatusOr<kms::Caller> caller = Admit(ctx, kms::Rpc::kListAuditEvents);
  if (!caller.ok()) return ToGrpc(caller.status());
  absl::StatusOr<kms::AuditFilter> filter = FromProto(req->filter());
  if (!filter.ok()) {
    return ToGrpc(api_->RecordRefusal(*caller, kms::Rpc::kListAuditEvents,
                                      filter.status()));
  }
  absl::StatusOr<kms::AuditPage> page =
      api_->List(*caller, *filter, req->page_size(), req->page_token());
  if (!page.ok()) return ToGrpc(page.status());
  for (const kms::AuditEvent& e : page->events) ToProto(e, resp->add_events());
  resp->set_next_page_token(page->next_page_token);
  return grpc::Status::OK;
}

grpc::Status AuditHandler::StreamAuditEvents(
    grpc::ServerContext* ctx, const pb::StreamAuditEventsRequest* req,
    grpc::ServerWriter<pb::AuditEvent>* writer) {
  absl::StatusOr<kms::Caller> caller = Admit(ctx, kms::Rpc::kStreamAuditEvents);
  if (!caller.ok()) return ToGrpc(caller.status());
  absl::StatusOr<kms::AuditFilter> filter = FromProto(req->filter());
  if (!filter.ok()) {
    return ToGrpc(api_->RecordRefusal(*caller, kms::Rpc::kStreamAuditEvents,
                                      filter.status()));
  }
  absl::StatusOr<kms::AuditPosition> position =
      api_->StartStream(*caller, *filter, req->from_seq());
  if (!position.ok()) return ToGrpc(position.status());
  while (!ctx->IsCancelled() && !stopping_) {
    absl::StatusOr<std::vector<kms::AuditEvent>> events =
        api_->Poll(*position, *filter);
    if (!events.ok()) return ToGrpc(events.status());
    for (const kms::AuditEvent& e : *events) {
      pb::AuditEvent out;
      ToProto(e, &out);
      if (!writer->Write(out)) return grpc::Status::CANCELLED;
    }
    if (events->empty()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }
  return grpc::Status::OK;
}

grpc::Status AuditHandler::GetAuditPublicKey(
    grpc::ServerContext* ctx, const pb::GetAuditPublicKeyRequest*,
    pb::AuditPublicKey* resp) {
  absl::StatusOr<kms::Caller> caller = Admit(ctx, kms::Rpc::kGetAuditPublicKey);
  if (!caller.ok()) return ToGrpc(caller.status());
  absl::StatusOr<std::string> pem = api_->PublicKeyPem(*caller);
  if (!pem.ok()) return ToGrpc(pem.status());
  resp->set_node(api_->node());
  resp->set_public_key_pem(*pem);
  resp->set_fingerprint(api_->fingerprint());
  return grpc::Status::OK;
}

grpc::Status AuditHandler::VerifyAuditLog(grpc::ServerContext* ctx,
                                          const pb::VerifyAuditLogRequest*,
                                          pb::VerifyAuditLogResponse* resp) {
  absl::StatusOr<kms::Caller> caller = Admit(ctx, kms::Rpc::kVerifyAuditLog);
  if (!caller.ok()) return ToGrpc(caller.status());
  absl::StatusOr<kms::AuditVerifyReport> report = api_->Verify(*caller);
  if (!report.ok()) return ToGrpc(report.status());
  resp->set_ok(report->ok);
  resp->set_records(report->records);
  resp->set_first_break(report->first_break);
  for (const auto& node : report->nodes) {
    resp->set_checkpoints(resp->checkpoints() + node.checkpoints);
    resp->set_unsigned_tail(resp->unsigned_tail() + node.unsigned_tail);
  }
  return grpc::Status::OK;
}

}  // namespace custos::server
