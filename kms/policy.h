// Key policies: who may use a key, for which operations, under which
// conditions. The one authorization decision for key use is PolicyAllows();
// it denies by default, and nothing outside a key's policy (being an admin or
// an auditor, say) grants use of the key. See docs/policies.md.
//
// Threat model (docs/security.md, threat 3): patterns come only from the
// policy, which an admin wrote; the strings a caller sends (its identity, its
// encryption context) are always matched literally, never expanded.
#ifndef CUSTOS_KMS_POLICY_H_
#define CUSTOS_KMS_POLICY_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kms/encryption_context.h"

namespace custos::kms {

// An operation a policy binding can allow. The numbers equal the proto enum
// custos.v1.KeyOperation and are stored; never renumber.
enum class KeyOperation {
  kGenerateDataKey = 1,
  kGenerateDataKeyWithoutPlaintext = 2,
  kEncrypt = 3,
  kDecrypt = 4,
  // ReEncrypt needs kReEncryptFrom on the source key's policy and
  // kReEncryptTo on the destination key's policy.
  kReEncryptFrom = 5,
  kReEncryptTo = 6,
};

// Why a request needs a key. The numbers equal the proto enum
// custos.v1.JustificationReason; never renumber. kUnspecified means "no
// justification" and is never a valid entry in a policy.
enum class JustificationReason {
  kUnspecified = 0,
  kCustomerInitiatedAccess = 1,
  kCustomerInitiatedSupport = 2,
  kProviderInitiatedService = 3,
  kProviderInitiatedReview = 4,
  kThirdPartyDataRequest = 5,
  kSystemOperation = 6,
};

// The proto name of `op` ("DECRYPT"), or "UNKNOWN" for a value outside the
// enum.
const char* KeyOperationName(KeyOperation op);
// Parses an exact, case-sensitive proto name. Returns false (leaving `*op`
// untouched) for anything else.
bool ParseKeyOperation(absl::string_view name, KeyOperation* op);

// The proto name of `r` ("CUSTOMER_INITIATED_ACCESS"); kUnspecified is
// "JUSTIFICATION_REASON_UNSPECIFIED"; "UNKNOWN" for a value outside the enum.
const char* JustificationReasonName(JustificationReason r);
// Parses an exact, case-sensitive proto name of a reason other than
// kUnspecified. Returns false (leaving `*r` untouched) for anything else.
bool ParseJustificationReason(absl::string_view name, JustificationReason* r);

// An access justification sent with a request. `detail` is free text for
// the audit log; policies never look at it. A value type.
struct Justification {
  JustificationReason reason = JustificationReason::kUnspecified;
  std::string detail;
};

// One rule of a key policy: any of `principals` may perform any of
// `operations` when every condition holds. Bindings only allow; there is no
// deny rule, so no broader binding can bypass one. A value type.
struct PolicyBinding {
  // Patterns over the caller's verified identity; '*' matches any run of
  // characters, nothing else is special (GlobMatch).
  std::vector<std::string> principals;
  std::vector<KeyOperation> operations;
  // Key (exact) -> value pattern ('*' globs) that the request's encryption
  // context must contain.
  std::map<std::string, std::string> required_context;
  // The request must carry a justification with a reason.
  bool require_justification = false;
  // When non-empty, a justification that is sent must have one of these
  // reasons.
  std::vector<JustificationReason> allowed_reasons;

  friend bool operator==(const PolicyBinding&, const PolicyBinding&) = default;
};

// A key's whole policy. An empty policy allows nothing. `version` increases
// with every change (optimistic concurrency); it plays no part in decisions.
// A value type.
struct KeyPolicy {
  std::vector<PolicyBinding> bindings;
  uint64_t version = 0;

  friend bool operator==(const KeyPolicy&, const KeyPolicy&) = default;
};

// Limits that ValidatePolicy() enforces.
inline constexpr size_t kMaxPolicyBindings = 100;
inline constexpr size_t kMaxBindingPrincipals = 100;
inline constexpr size_t kMaxPrincipalBytes = 512;
// The encryption context itself allows 64 pairs and 8 KiB in all; a policy
// condition larger than that could never be met.
inline constexpr size_t kMaxRequiredContextPairs = kMaxContextPairs;
inline constexpr size_t kMaxRequiredContextBytes = kMaxContextBytes;
// Upper bound on the JSON text PolicyFromJson() accepts.
inline constexpr size_t kMaxPolicyJsonBytes = 8 * 1024 * 1024;

// OK if `policy` is well formed; otherwise INVALID_ARGUMENT whose message
// names the field path and how to fix it, e.g.
// "policy.bindings[2].principals[0]: empty; name a principal such as ...".
// Checks: at most kMaxPolicyBindings bindings; each binding has 1 to
// kMaxBindingPrincipals principals, each 1 to kMaxPrincipalBytes bytes of
// valid UTF-8 without control characters; at least one operation, each
// known; at most kMaxRequiredContextPairs required_context pairs with
// non-empty keys, valid UTF-8 without NUL, at most kMaxRequiredContextBytes
// in all; allowed_reasons are known reasons other than kUnspecified. No
// principal, operation or reason may be listed twice in one binding (a
// duplicate is usually a copy-paste slip worth a second look).
absl::Status ValidatePolicy(const KeyPolicy& policy);

// True if `text` matches `pattern` as a whole. In the pattern, '*' matches
// any run of bytes (including none, and including '/'); every other byte is
// literal. `text` is never interpreted: a '*' in it is an ordinary
// character. Iterative, no recursion or regex; O(|pattern| * |text|) in the
// worst case and linear for the usual patterns.
bool GlobMatch(absl::string_view pattern, absl::string_view text);

// One request for a key, as the authorization point sees it. Borrows
// everything; the pointees must outlive the PolicyAllows() call.
struct AccessRequest {
  // The verified client-certificate identity. Matched literally.
  absl::string_view principal;
  KeyOperation operation = KeyOperation::kDecrypt;
  // The request's encryption context; null is treated as empty.
  const EncryptionContext* context = nullptr;
  // Null when the request carried no justification.
  const Justification* justification = nullptr;
};

// The authorization decision for using a key: deny by default. True only if
// some binding of `policy` matches on every count:
//  - `request.principal` (non-empty) matches one of its principal patterns;
//  - `request.operation` is listed;
//  - every required_context pair is in the request's context, with the exact
//    key and a value that matches the pattern (extra pairs are fine);
//  - if require_justification, a justification with a known reason other
//    than kUnspecified is present;
//  - if allowed_reasons is non-empty and a justification with a reason is
//    present, that reason is listed.
// A justification whose reason is kUnspecified counts as none. Pure and
// thread-safe; callers answer a denial with PERMISSION_DENIED that does not
// say whether the key exists.
bool PolicyAllows(const KeyPolicy& policy, const AccessRequest& request);

// The stable JSON form used for storage and CLI policy files, e.g.
// {"version":3,"bindings":[{"principals":["spiffe://example.org/a"],
//  "operations":["DECRYPT"],"required_context":{"tenant":"*"},
//  "require_justification":true,
//  "allowed_reasons":["CUSTOMER_INITIATED_ACCESS"]}]}
// Fields are always written, in this order; required_context keys sorted.
// Never throws. A policy that fails ValidatePolicy() still serialises, but
// invalid UTF-8 is replaced by U+FFFD.
std::string PolicyToJson(const KeyPolicy& policy);

// Parses the JSON form. "version" may be absent (0) and so may
// required_context, require_justification and allowed_reasons (their
// defaults); "bindings", "principals" and "operations" are required. Unknown
// fields, duplicate object keys, wrong types and unknown operation or reason
// names are INVALID_ARGUMENT naming the field path, so that a typo can never
// silently widen or narrow access. The result also passes ValidatePolicy().
// Never throws.
absl::StatusOr<KeyPolicy> PolicyFromJson(absl::string_view json);

// PolicyToJson's document in canonical form: object keys sorted bytewise,
// no whitespace, so that equal policies give equal bytes (the audit log
// records policies this way). Never throws.
std::string PolicyToCanonicalJson(const KeyPolicy& policy);

}  // namespace custos::kms

#endif  // CUSTOS_KMS_POLICY_H_
