// The one authorization point of the service (docs/security.md, property 2).
//
// Every RPC, before it touches a key, asks Check(). Deny by default:
// - management RPCs (keys, aliases, policies) need the admin role;
// - cryptographic RPCs need a binding in the key's own policy; admins and
//   auditors have no implicit rights to use keys;
// - GenerateRandom needs only an authenticated caller;
// - audit RPCs need the auditor role.
// A refusal never says whether the key exists. Roles come from the server
// config and may use '*' patterns (trusted text); the caller's identity is
// always matched literally, and one with the reserved prefix "custos:" is
// refused (kms/principal.h). Thread-safe (immutable after construction).
#ifndef CUSTOS_KMS_AUTHORIZER_H_
#define CUSTOS_KMS_AUTHORIZER_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kms/encryption_context.h"
#include "kms/key.h"
#include "kms/policy.h"

namespace custos::kms {

// Every RPC the service answers.
enum class Rpc {
  kCreateKey,
  kGetKey,
  kListKeys,
  kUpdateKey,
  kRotateKey,
  kEnableKey,
  kDisableKey,
  kScheduleKeyDeletion,
  kCancelKeyDeletion,
  kCreateAlias,
  kDeleteAlias,
  kListAliases,
  kGetKeyPolicy,
  kSetKeyPolicy,
  kGenerateDataKey,
  kGenerateDataKeyWithoutPlaintext,
  kGenerateDataKeys,
  kEncrypt,
  kDecrypt,
  kReEncrypt,
  kGenerateRandom,
  kListAuditEvents,
  kStreamAuditEvents,
  kGetAuditPublicKey,
  kVerifyAuditLog,
};
inline constexpr Rpc kAllRpcs[] = {
    Rpc::kCreateKey,         Rpc::kGetKey,
    Rpc::kListKeys,          Rpc::kUpdateKey,
    Rpc::kRotateKey,         Rpc::kEnableKey,
    Rpc::kDisableKey,        Rpc::kScheduleKeyDeletion,
    Rpc::kCancelKeyDeletion, Rpc::kCreateAlias,
    Rpc::kDeleteAlias,       Rpc::kListAliases,
    Rpc::kGetKeyPolicy,      Rpc::kSetKeyPolicy,
    Rpc::kGenerateDataKey,   Rpc::kGenerateDataKeyWithoutPlaintext,
    Rpc::kGenerateDataKeys,  Rpc::kEncrypt,
    Rpc::kDecrypt,           Rpc::kReEncrypt,
    Rpc::kGenerateRandom,    Rpc::kListAuditEvents,
    Rpc::kStreamAuditEvents, Rpc::kGetAuditPublicKey,
    Rpc::kVerifyAuditLog,
};
const char* RpcName(Rpc rpc);

enum class RpcKind { kManagement, kCrypto, kRandom, kAudit };
RpcKind KindOf(Rpc rpc);

// Who is calling: the verified certificate identity, never a claim in the
// request.
struct Caller {
  std::string principal;
  std::string peer;        // transport address, for the audit log
  std::string request_id;  // for the audit log
};

struct Roles {
  std::vector<std::string> admins;    // exact names or '*' patterns
  std::vector<std::string> auditors;  // exact names or '*' patterns
};

class Authorizer {
 public:
  explicit Authorizer(Roles roles) : roles_(std::move(roles)) {}

  bool IsAdmin(absl::string_view principal) const;
  bool IsAuditor(absl::string_view principal) const;

  // Management, random and audit RPCs: `key`, `op`, `context` and
  // `justification` are ignored. Crypto RPCs: `key` may be null (not found),
  // which is refused exactly like a key whose policy does not allow the
  // caller.
  absl::Status Check(const Caller& caller, Rpc rpc, const Key* key,
                     KeyOperation op, const EncryptionContext* context,
                     const Justification* justification) const;

 private:
  const Roles roles_;
};

}  // namespace custos::kms

#endif  // CUSTOS_KMS_AUTHORIZER_H_
