// Fuzzes the key policy parser and the authorization decision
// (kms/policy.h), with the input as policy JSON. Checks that:
//  - PolicyFromJson never throws, refuses with INVALID_ARGUMENT only (an
//    INTERNAL would mean a type check was missed) and a capped message;
//  - a policy it accepts passes ValidatePolicy, serialises with
//    PolicyToJson, parses back to an equal policy and serialises to the
//    same text again;
//  - PolicyAllows, for a grid of callers (fixed ones, and ones made from the
//    policy's own patterns), operations (including out-of-range values),
//    encryption contexts and justifications, decides exactly as a
//    straightforward reading of the rules in kms/policy.h does: deny by
//    default, an empty identity never allowed, conditions never combined
//    across bindings, '*' in a caller's identity never special; and extra
//    context pairs never turn an allow into a deny;
//  - GlobMatch agrees with a dynamic-programming matcher (for every pattern
//    used above, and for the input's first line split at a tab).
// Seeds: the policies in docs/policies.md and tests/unit/policy_test.cc.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/string_view.h"
#include "kms/encryption_context.h"
#include "kms/policy.h"
#include "tests/fuzz/fuzz_check.h"

namespace custos::kms {
namespace {

// The DP keeps the reference matcher obviously right; inputs are capped so
// that its O(|pattern| * |text|) stays cheap.
constexpr size_t kMaxReferenceGlobCells = 1 << 16;

// Whole-string match where '*' in `pattern` matches any run of bytes.
bool ReferenceGlob(absl::string_view pattern, absl::string_view text) {
  std::vector<char> row(text.size() + 1, 0), next(text.size() + 1, 0);
  row[0] = 1;
  for (const char pc : pattern) {
    if (pc == '*') {
      char any = 0;
      for (size_t j = 0; j <= text.size(); ++j) {
        any = any || row[j];
        next[j] = any;
      }
    } else {
      next[0] = 0;
      for (size_t j = 1; j <= text.size(); ++j) {
        next[j] = row[j - 1] && text[j - 1] == pc;
      }
    }
    row.swap(next);
  }
  return row[text.size()];
}

bool Glob(absl::string_view pattern, absl::string_view text) {
  const bool got = GlobMatch(pattern, text);
  if ((pattern.size() + 1) * (text.size() + 1) <= kMaxReferenceGlobCells) {
    CUSTOS_FUZZ_CHECK(got == ReferenceGlob(pattern, text),
                      "GlobMatch disagrees with the reference matcher");
  }
  return got;
}

bool IsListedReason(JustificationReason r) {
  const int n = static_cast<int>(r);
  return n >= 1 && n <= 6;
}

// The rules of PolicyAllows() as its header states them.
bool ReferenceBindingAllows(const PolicyBinding& b, const AccessRequest& r) {
  if (std::find(b.operations.begin(), b.operations.end(), r.operation) ==
      b.operations.end()) {
    return false;
  }
  bool principal = false;
  for (const std::string& pattern : b.principals) {
    principal = principal || Glob(pattern, r.principal);
  }
  if (!principal) return false;
  for (const auto& [key, pattern] : b.required_context) {
    if (r.context == nullptr) return false;
    const auto it = r.context->find(key);
    if (it == r.context->end() || !Glob(pattern, it->second)) return false;
  }
  const bool present =
      r.justification != nullptr &&
      r.justification->reason != JustificationReason::kUnspecified;
  if (b.require_justification &&
      !(present && IsListedReason(r.justification->reason))) {
    return false;
  }
  if (present && !b.allowed_reasons.empty() &&
      std::find(b.allowed_reasons.begin(), b.allowed_reasons.end(),
                r.justification->reason) == b.allowed_reasons.end()) {
    return false;
  }
  return true;
}

bool ReferenceAllows(const KeyPolicy& policy, const AccessRequest& r) {
  if (r.principal.empty()) return false;
  for (const PolicyBinding& b : policy.bindings) {
    if (ReferenceBindingAllows(b, r)) return true;
  }
  return false;
}

std::string WithoutStars(absl::string_view pattern) {
  return absl::StrReplaceAll(pattern, {{"*", ""}});
}

void CheckDecisions(const KeyPolicy& policy) {
  std::vector<std::string> callers = {
      "",
      "*",
      "spiffe://example.org/photos/uploader",
      "spiffe://example.org/billing/reader",
      "spiffe://example.org/*",
      "spiffe://custos.test/admin",
  };
  // Each pattern's literal text, and the text its stars can match as empty:
  // the latter always matches the pattern.
  size_t derived = 0;
  for (const PolicyBinding& b : policy.bindings) {
    for (const std::string& p : b.principals) {
      if (derived == 3) break;
      ++derived;
      callers.push_back(p);
      callers.push_back(WithoutStars(p));
      CUSTOS_FUZZ_CHECK(Glob(p, callers.back()),
                        "a pattern does not match itself without its stars");
    }
  }

  const std::vector<KeyOperation> operations = {
      KeyOperation::kGenerateDataKey,
      KeyOperation::kGenerateDataKeyWithoutPlaintext,
      KeyOperation::kEncrypt,
      KeyOperation::kDecrypt,
      KeyOperation::kReEncryptFrom,
      KeyOperation::kReEncryptTo,
      static_cast<KeyOperation>(0),
      static_cast<KeyOperation>(99),
  };

  std::vector<EncryptionContext> contexts = {
      {}, {{"tenant", "acme"}}, {{"Tenant", "acme"}}};
  for (size_t i = 0; i < policy.bindings.size() && i < 3; ++i) {
    EncryptionContext satisfying;
    for (const auto& [key, pattern] : policy.bindings[i].required_context) {
      satisfying.emplace(key, WithoutStars(pattern));
    }
    contexts.push_back(std::move(satisfying));
  }

  std::vector<Justification> justifications;
  for (int r = 0; r <= 6; ++r) {
    justifications.push_back({static_cast<JustificationReason>(r), "ticket"});
  }
  justifications.push_back({static_cast<JustificationReason>(99), ""});

  const KeyPolicy empty;
  size_t n = 0;
  for (const std::string& caller : callers) {
    for (const KeyOperation op : operations) {
      // A null context and no justification, then each context with a
      // justification (or none) picked in turn, to keep the grid small.
      for (size_t k = 0; k <= contexts.size(); ++k, ++n) {
        const size_t j = n % (justifications.size() + 1);
        AccessRequest request;
        request.principal = caller;
        request.operation = op;
        request.context = k == 0 ? nullptr : &contexts[k - 1];
        request.justification =
            j == justifications.size() ? nullptr : &justifications[j];
        const bool allowed = PolicyAllows(policy, request);
        CUSTOS_FUZZ_CHECK(allowed == ReferenceAllows(policy, request),
                          "PolicyAllows disagrees with the documented rules");
        CUSTOS_FUZZ_CHECK(!PolicyAllows(empty, request),
                          "the empty policy allowed a request");
        if (!allowed) continue;
        CUSTOS_FUZZ_CHECK(!caller.empty(), "an empty identity was allowed");
        CUSTOS_FUZZ_CHECK(
            static_cast<int>(op) >= 1 && static_cast<int>(op) <= 6,
            "an unknown operation was allowed");
        // Extra pairs in the request's context are fine.
        EncryptionContext more =
            request.context == nullptr ? EncryptionContext() : *request.context;
        more.emplace("zz-extra-key", "extra value");
        request.context = &more;
        CUSTOS_FUZZ_CHECK(PolicyAllows(policy, request),
                          "an extra context pair turned allow into deny");
      }
    }
  }
}

void CheckParsed(const KeyPolicy& policy) {
  CUSTOS_FUZZ_CHECK(ValidatePolicy(policy).ok(),
                    "PolicyFromJson returned a policy ValidatePolicy refuses");
  CUSTOS_FUZZ_CHECK(policy.bindings.size() <= kMaxPolicyBindings, "bindings");
  for (const PolicyBinding& b : policy.bindings) {
    CUSTOS_FUZZ_CHECK(
        !b.principals.empty() && b.principals.size() <= kMaxBindingPrincipals,
        "principal count");
    CUSTOS_FUZZ_CHECK(!b.operations.empty(), "no operations");
    for (const std::string& p : b.principals) {
      CUSTOS_FUZZ_CHECK(!p.empty() && p.size() <= kMaxPrincipalBytes,
                        "principal size");
    }
  }

  // Serialise, re-parse: the same policy, and the same text again.
  const std::string json = PolicyToJson(policy);
  const absl::StatusOr<KeyPolicy> again = PolicyFromJson(json);
  CUSTOS_FUZZ_CHECK(again.ok(), "PolicyToJson output does not parse");
  CUSTOS_FUZZ_CHECK(*again == policy, "JSON round trip changed the policy");
  CUSTOS_FUZZ_CHECK(PolicyToJson(*again) == json,
                    "PolicyToJson is not stable across a round trip");

  CheckDecisions(policy);
}

void FuzzOne(absl::string_view input) {
  const absl::StatusOr<KeyPolicy> policy = PolicyFromJson(input);
  if (policy.ok()) {
    CheckParsed(*policy);
  } else {
    CUSTOS_FUZZ_CHECK(
        policy.status().code() == absl::StatusCode::kInvalidArgument,
        "PolicyFromJson failed with something other than INVALID_ARGUMENT");
    CUSTOS_FUZZ_CHECK(absl::StartsWith(policy.status().message(), "policy"),
                      "error message does not name the field path");
    CUSTOS_FUZZ_CHECK(policy.status().message().size() <= 1024,
                      "error message not length-capped");
  }

  // The glob matcher alone: "pattern<TAB>text" on the first line.
  const absl::string_view line = input.substr(0, input.find('\n'));
  const size_t tab = line.find('\t');
  if (tab != absl::string_view::npos) {
    Glob(line.substr(0, tab), line.substr(tab + 1));
  }
}

}  // namespace
}  // namespace custos::kms

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  custos::kms::FuzzOne(
      absl::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}
