#include "kms/authorizer.h"

#include "absl/strings/str_cat.h"
#include "kms/principal.h"

namespace custos::kms {
namespace {

bool AnyMatches(const std::vector<std::string>& patterns,
                absl::string_view principal) {
  for (const std::string& p : patterns) {
    if (GlobMatch(p, principal)) return true;
  }
  return false;
}

}  // namespace

const char* RpcName(Rpc rpc) {
  switch (rpc) {
    case Rpc::kCreateKey:
      return "CreateKey";
    case Rpc::kGetKey:
      return "GetKey";
    case Rpc::kListKeys:
      return "ListKeys";
    case Rpc::kUpdateKey:
      return "UpdateKey";
    case Rpc::kRotateKey:
      return "RotateKey";
    case Rpc::kEnableKey:
      return "EnableKey";
    case Rpc::kDisableKey:
      return "DisableKey";
    case Rpc::kScheduleKeyDeletion:
      return "ScheduleKeyDeletion";
    case Rpc::kCancelKeyDeletion:
      return "CancelKeyDeletion";
    case Rpc::kCreateAlias:
      return "CreateAlias";
    case Rpc::kDeleteAlias:
      return "DeleteAlias";
    case Rpc::kListAliases:
      return "ListAliases";
    case Rpc::kGetKeyPolicy:
      return "GetKeyPolicy";
    case Rpc::kSetKeyPolicy:
      return "SetKeyPolicy";
    case Rpc::kGenerateDataKey:
      return "GenerateDataKey";
    case Rpc::kGenerateDataKeyWithoutPlaintext:
      return "GenerateDataKeyWithoutPlaintext";
    case Rpc::kGenerateDataKeys:
      return "GenerateDataKeys";
    case Rpc::kEncrypt:
      return "Encrypt";
    case Rpc::kDecrypt:
      return "Decrypt";
    case Rpc::kReEncrypt:
      return "ReEncrypt";
    case Rpc::kGenerateRandom:
      return "GenerateRandom";
    case Rpc::kListAuditEvents:
      return "ListAuditEvents";
    case Rpc::kStreamAuditEvents:
      return "StreamAuditEvents";
    case Rpc::kGetAuditPublicKey:
      return "GetAuditPublicKey";
    case Rpc::kVerifyAuditLog:
      return "VerifyAuditLog";
  }
  return "Unknown";
}

RpcKind KindOf(Rpc rpc) {
  switch (rpc) {
    case Rpc::kGenerateDataKey:
    case Rpc::kGenerateDataKeyWithoutPlaintext:
    case Rpc::kGenerateDataKeys:
    case Rpc::kEncrypt:
    case Rpc::kDecrypt:
    case Rpc::kReEncrypt:
      return RpcKind::kCrypto;
    case Rpc::kGenerateRandom:
      return RpcKind::kRandom;
    case Rpc::kListAuditEvents:
    case Rpc::kStreamAuditEvents:
    case Rpc::kGetAuditPublicKey:
    case Rpc::kVerifyAuditLog:
      return RpcKind::kAudit;
    default:
      return RpcKind::kManagement;
  }
}

bool Authorizer::IsAdmin(absl::string_view principal) const {
  return !principal.empty() && !IsReservedPrincipal(principal) &&
         AnyMatches(roles_.admins, principal);
}

bool Authorizer::IsAuditor(absl::string_view principal) const {
  return !principal.empty() && !IsReservedPrincipal(principal) &&
         AnyMatches(roles_.auditors, principal);
}

absl::Status Authorizer::Check(const Caller& caller, Rpc rpc, const Key* key,
                               KeyOperation op,
                               const EncryptionContext* context,
                               const Justification* justification) const {
  if (caller.principal.empty()) {
    return absl::UnauthenticatedError("no verified client identity");
  }
  if (IsReservedPrincipal(caller.principal)) {
    // The service's own principal is never a caller's, whatever a
    // certificate or a development setting claims.
    return absl::UnauthenticatedError(
        "caller identity uses the reserved prefix 'custos:'");
  }
  switch (KindOf(rpc)) {
    case RpcKind::kRandom:
      return absl::OkStatus();
    case RpcKind::kManagement:
      if (IsAdmin(caller.principal)) return absl::OkStatus();
      return absl::PermissionDeniedError(absl::StrCat(
          "caller ", caller.principal, " may not call ", RpcName(rpc),
          ": only principals listed under `admins` in the server config "
          "manage keys"));
    case RpcKind::kAudit:
      if (IsAuditor(caller.principal)) return absl::OkStatus();
      return absl::PermissionDeniedError(absl::StrCat(
          "caller ", caller.principal, " may not call ", RpcName(rpc),
          ": only principals listed under `auditors` in the server config "
          "read the audit log"));
    case RpcKind::kCrypto:
      break;
  }
  if (key != nullptr) {
    AccessRequest request;
    request.principal = caller.principal;
    request.operation = op;
    request.context = context;
    request.justification = justification;
    if (PolicyAllows(key->policy, request)) return absl::OkStatus();
  }
  // Same words whether or not the key exists.
  return absl::PermissionDeniedError(absl::StrCat(
      "caller ", caller.principal, " may not ", KeyOperationName(op),
      " with this key under its policy (check the principal, the operation, "
      "the encryption context and the justification the policy requires)"));
}

}  // namespace custos::kms
