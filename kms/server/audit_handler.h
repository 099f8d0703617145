// The gRPC adapter of AuditService (auditors only; see kms/audit_api.h).
// It uses gRPC's synchronous API: auditors are few, and StreamAuditEvents
// is a long poll that holds its own thread. Thread-safe.
#ifndef CUSTOS_KMS_SERVER_AUDIT_HANDLER_H_
#define CUSTOS_KMS_SERVER_AUDIT_HANDLER_H_

#include <atomic>

#include "custos/v1/audit.grpc.pb.h"
#include "kms/audit_api.h"
#include "kms/server/rpc_support.h"

namespace custos::server {

class AuditHandler final : public pb::AuditService::Service {
 public:
  AuditHandler(kms::AuditApi* api, CallerResolver* callers)
      : api_(api), callers_(callers) {}

  grpc::Status ListAuditEvents(grpc::ServerContext* ctx,
                               const pb::ListAuditEventsRequest* req,
                               pb::ListAuditEventsResponse* resp) override;
  grpc::Status StreamAuditEvents(
      grpc::ServerContext* ctx, const pb::StreamAuditEventsRequest* req,
      grpc::ServerWriter<pb::AuditEvent>* writer) override;
  grpc::Status GetAuditPublicKey(grpc::ServerContext* ctx,
                                 const pb::GetAuditPublicKeyRequest* req,
                                 pb::AuditPublicKey* resp) override;
  grpc::Status VerifyAuditLog(grpc::ServerContext* ctx,
                              const pb::VerifyAuditLogRequest* req,
                              pb::VerifyAuditLogResponse* resp) override;

  // Ends open streams (at shutdown).
  void Stop() { stopping_ = true; }

 private:
  // The call's caller, or its refusal (no usable identity, over the rate
  // limit), recorded in the audit log.
  absl::StatusOr<kms::Caller> Admit(grpc::ServerContext* ctx, kms::Rpc rpc);

  kms::AuditApi* const api_;
  CallerResolver* const callers_;
  std::atomic<bool> stopping_{false};
};

}  // namespace custos::server

#endif  // CUSTOS_KMS_SERVER_AUDIT_HANDLER_H_
