#include "kms/policy.h"

#include <cstdint>
#include <exception>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace custos::kms {
namespace {

// Names as data: the one table each for the enums and their proto names.
struct OperationInfo {
  KeyOperation op;
  const char* name;
};
constexpr OperationInfo kOperations[] = {
    {KeyOperation::kGenerateDataKey, "GENERATE_DATA_KEY"},
    {KeyOperation::kGenerateDataKeyWithoutPlaintext,
     "GENERATE_DATA_KEY_WITHOUT_PLAINTEXT"},
    {KeyOperation::kEncrypt, "ENCRYPT"},
    {KeyOperation::kDecrypt, "DECRYPT"},
    {KeyOperation::kReEncryptFrom, "RE_ENCRYPT_FROM"},
    {KeyOperation::kReEncryptTo, "RE_ENCRYPT_TO"},
};

struct ReasonInfo {
  JustificationReason reason;
  const char* name;
};
// kUnspecified is deliberately absent: it is never a valid policy entry and
// never parses.
constexpr ReasonInfo kReasons[] = {
    {JustificationReason::kCustomerInitiatedAccess,
     "CUSTOMER_INITIATED_ACCESS"},
    {JustificationReason::kCustomerInitiatedSupport,
     "CUSTOMER_INITIATED_SUPPORT"},
    {JustificationReason::kProviderInitiatedService,
     "PROVIDER_INITIATED_SERVICE"},
    {JustificationReason::kProviderInitiatedReview,
     "PROVIDER_INITIATED_REVIEW"},
    {JustificationReason::kThirdPartyDataRequest, "THIRD_PARTY_DATA_REQUEST"},
    {JustificationReason::kSystemOperation, "SYSTEM_OPERATION"},
};

bool IsKnownOperation(KeyOperation op) {
  for (const OperationInfo& info : kOperations) {
    if (info.op == op) return true;
  }
  return false;
}

// True for a reason a policy may list (known, not kUnspecified).
bool IsKnownReason(JustificationReason r) {
  for (const ReasonInfo& info : kReasons) {
    if (info.reason == r) return true;
  }
  return false;
}

std::string OperationNameList() {
  std::vector<absl::string_view> names;
  for (const OperationInfo& info : kOperations) names.push_back(info.name);
  return absl::StrJoin(names, ", ");
}

std::string ReasonNameList() {
  std::vector<absl::string_view> names;
  for (const ReasonInfo& info : kReasons) names.push_back(info.name);
  return absl::StrJoin(names, ", ");
}

// Quotes caller-supplied text for an error message: escaped, and capped so
// that messages stay short whatever the input.
std::string Quote(absl::string_view s) {
  constexpr size_t kMaxQuoted = 64;
  const bool cut = s.size() > kMaxQuoted;
  return absl::StrCat("\"", absl::CHexEscape(s.substr(0, kMaxQuoted)),
                      cut ? "\"..." : "\"");
}

absl::Status Invalid(absl::string_view path, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", problem));
}

// What CheckText() found in a string.
struct TextFacts {
  bool valid_utf8 = true;
  bool has_nul = false;
  // C0 controls (including NUL), DEL, and C1 controls (U+0080..U+009F).
  bool has_control = false;
};

// Strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF.
TextFacts CheckText(absl::string_view s) {
  TextFacts facts;
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      if (c == 0) facts.has_nul = true;
      if (c < 0x20 || c == 0x7f) facts.has_control = true;
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp;
    uint32_t min;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2, cp = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F, min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4, cp = c & 0x07, min = 0x10000;
    } else {
      facts.valid_utf8 = false;
      return facts;
    }
    if (n - i < len) {
      facts.valid_utf8 = false;
      return facts;
    }
    for (size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) {
        facts.valid_utf8 = false;
        return facts;
      }
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      facts.valid_utf8 = false;
      return facts;
    }
    if (cp >= 0x80 && cp <= 0x9F) facts.has_control = true;
    i += len;
  }
  return facts;
}

absl::Status ValidatePrincipals(const PolicyBinding& binding,
                                absl::string_view path) {
  const std::string list_path = absl::StrCat(path, ".principals");
  if (binding.principals.empty()) {
    return Invalid(list_path,
                   "empty; name at least one principal such as "
                   "spiffe://example.org/svc or a pattern with '*'");
  }
  if (binding.principals.size() > kMaxBindingPrincipals) {
    return Invalid(list_path,
                   absl::StrCat(binding.principals.size(),
                                " principals; at most ", kMaxBindingPrincipals,
                                " per binding: split the binding or use a "
                                "pattern with '*'"));
  }
  std::set<absl::string_view> seen;
  for (size_t j = 0; j < binding.principals.size(); ++j) {
    const std::string& principal = binding.principals[j];
    const std::string p = absl::StrCat(list_path, "[", j, "]");
    if (principal.empty()) {
      return Invalid(p,
                     "empty; name a principal such as "
                     "spiffe://example.org/svc or a pattern with '*'");
    }
    if (principal.size() > kMaxPrincipalBytes) {
      return Invalid(p, absl::StrCat(principal.size(), " bytes; at most ",
                                     kMaxPrincipalBytes));
    }
    const TextFacts facts = CheckText(principal);
    if (!facts.valid_utf8) {
      return Invalid(p, absl::StrCat(Quote(principal),
                                     " is not valid UTF-8; principals are "
                                     "certificate identities in UTF-8"));
    }
    if (facts.has_control) {
      return Invalid(p, absl::StrCat(Quote(principal),
                                     " contains a control character; "
                                     "remove it"));
    }
    if (!seen.insert(principal).second) {
      return Invalid(p, absl::StrCat(Quote(principal),
                                     " is listed twice; list each principal "
                                     "once"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateOperations(const PolicyBinding& binding,
                                absl::string_view path) {
  const std::string list_path = absl::StrCat(path, ".operations");
  if (binding.operations.empty()) {
    return Invalid(list_path, absl::StrCat("empty; list at least one of ",
                                           OperationNameList()));
  }
  std::set<KeyOperation> seen;
  for (size_t j = 0; j < binding.operations.size(); ++j) {
    const KeyOperation op = binding.operations[j];
    const std::string p = absl::StrCat(list_path, "[", j, "]");
    if (!IsKnownOperation(op)) {
      return Invalid(p, absl::StrCat("unknown operation ", static_cast<int>(op),
                                     "; use one of ", OperationNameList()));
    }
    if (!seen.insert(op).second) {
      return Invalid(p, absl::StrCat(KeyOperationName(op),
                                     " is listed twice; list each operation "
                                     "once"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateRequiredContext(const PolicyBinding& binding,
                                     absl::string_view path) {
  const std::string map_path = absl::StrCat(path, ".required_context");
  if (binding.required_context.size() > kMaxRequiredContextPairs) {
    return Invalid(map_path,
                   absl::StrCat(binding.required_context.size(),
                                " pairs; at most ", kMaxRequiredContextPairs,
                                " (an encryption context holds no more)"));
  }
  size_t total = 0;
  for (const auto& [key, value] : binding.required_context) {
    const std::string p = absl::StrCat(map_path, "[", Quote(key), "]");
    if (key.empty()) {
      return Invalid(p,
                     "empty key; name the context key exactly as requests "
                     "send it, e.g. \"tenant\"");
    }
    const TextFacts key_facts = CheckText(key);
    if (!key_facts.valid_utf8 || key_facts.has_nul) {
      return Invalid(p,
                     "key is not valid UTF-8 or contains NUL; encryption "
                     "context keys are UTF-8 without NUL");
    }
    const TextFacts value_facts = CheckText(value);
    if (!value_facts.valid_utf8 || value_facts.has_nul) {
      return Invalid(p,
                     "value is not valid UTF-8 or contains NUL; encryption "
                     "context values are UTF-8 without NUL");
    }
    total += key.size() + value.size();
  }
  if (total > kMaxRequiredContextBytes) {
    return Invalid(map_path,
                   absl::StrCat(total, " bytes of keys and values; at most ",
                                kMaxRequiredContextBytes,
                                " (an encryption context holds no more)"));
  }
  return absl::OkStatus();
}

absl::Status ValidateAllowedReasons(const PolicyBinding& binding,
                                    absl::string_view path) {
  const std::string list_path = absl::StrCat(path, ".allowed_reasons");
  std::set<JustificationReason> seen;
  for (size_t j = 0; j < binding.allowed_reasons.size(); ++j) {
    const JustificationReason r = binding.allowed_reasons[j];
    const std::string p = absl::StrCat(list_path, "[", j, "]");
    if (r == JustificationReason::kUnspecified) {
      return Invalid(p, absl::StrCat("JUSTIFICATION_REASON_UNSPECIFIED is not "
                                     "a reason; use one of ",
                                     ReasonNameList(),
                                     ", or leave allowed_reasons empty"));
    }
    if (!IsKnownReason(r)) {
      return Invalid(p, absl::StrCat("unknown reason ", static_cast<int>(r),
                                     "; use one of ", ReasonNameList()));
    }
    if (!seen.insert(r).second) {
      return Invalid(p, absl::StrCat(JustificationReasonName(r),
                                     " is listed twice; list each reason "
                                     "once"));
    }
  }
  return absl::OkStatus();
}

bool ContainsOperation(const PolicyBinding& binding, KeyOperation op) {
  for (KeyOperation listed : binding.operations) {
    if (listed == op) return true;
  }
  return false;
}

bool ContainsReason(const PolicyBinding& binding, JustificationReason r) {
  for (JustificationReason listed : binding.allowed_reasons) {
    if (listed == r) return true;
  }
  return false;
}

bool PrincipalMatches(const PolicyBinding& binding,
                      absl::string_view principal) {
  for (const std::string& pattern : binding.principals) {
    // Pattern from the policy, text from the caller: never the other way.
    if (GlobMatch(pattern, principal)) return true;
  }
  return false;
}

bool ContextMatches(const PolicyBinding& binding,
                    const EncryptionContext* context) {
  if (binding.required_context.empty()) return true;
  if (context == nullptr) return false;
  for (const auto& [key, value_pattern] : binding.required_context) {
    // Keys are exact (std::map::find compares bytes, so case matters).
    const auto it = context->find(key);
    if (it == context->end()) return false;
    if (!GlobMatch(value_pattern, it->second)) return false;
  }
  return true;
}

bool JustificationMatches(const PolicyBinding& binding,
                          const Justification* justification) {
  // A reason of kUnspecified counts as no justification at all.
  const bool present =
      justification != nullptr &&
      justification->reason != JustificationReason::kUnspecified;
  if (binding.require_justification) {
    // An out-of-range number (proto enums are open) is no justification.
    if (!present || !IsKnownReason(justification->reason)) return false;
  }
  if (present && !binding.allowed_reasons.empty() &&
      !ContainsReason(binding, justification->reason)) {
    return false;
  }
  return true;
}

bool BindingAllows(const PolicyBinding& binding, const AccessRequest& request) {
  return ContainsOperation(binding, request.operation) &&
         PrincipalMatches(binding, request.principal) &&
         ContextMatches(binding, request.context) &&
         JustificationMatches(binding, request.justification);
}

// ---- JSON ----

using Json = nlohmann::json;
// Insertion-ordered, so that output fields come in the documented order.
using OrderedJson = nlohmann::ordered_json;

// The deepest nesting a valid policy needs is 4 (root, bindings, binding,
// principals); anything much deeper is refused before it is built.
constexpr int kMaxJsonDepth = 8;

std::string JoinNames(std::initializer_list<absl::string_view> names) {
  return absl::StrJoin(names, ", ");
}

// Refuses fields other than `allowed` in `object` (found at `path`).
absl::Status CheckFields(const Json& object, absl::string_view path,
                         std::initializer_list<absl::string_view> allowed) {
  for (const auto& item : object.items()) {
    bool known = false;
    for (absl::string_view name : allowed) {
      if (item.key() == name) known = true;
    }
    if (!known) {
      return Invalid(path,
                     absl::StrCat("unknown field ", Quote(item.key()),
                                  "; the fields are ", JoinNames(allowed)));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> StringArray(const Json& value,
                                                     absl::string_view path) {
  if (!value.is_array()) {
    return Invalid(path, "expected an array of strings");
  }
  std::vector<std::string> out;
  out.reserve(value.size());
  for (size_t j = 0; j < value.size(); ++j) {
    if (!value[j].is_string()) {
      return Invalid(absl::StrCat(path, "[", j, "]"), "expected a string");
    }
    out.push_back(value[j].get_ref<const std::string&>());
  }
  return out;
}

absl::StatusOr<PolicyBinding> BindingFromJson(const Json& object,
                                              absl::string_view path) {
  if (!object.is_object()) {
    return Invalid(path, "expected an object with principals and operations");
  }
  CUSTOS_RETURN_IF_ERROR(
      CheckFields(object, path,
                  {"principals", "operations", "required_context",
                   "require_justification", "allowed_reasons"}));
  PolicyBinding binding;

  const std::string principals_path = absl::StrCat(path, ".principals");
  const auto principals = object.find("principals");
  if (principals == object.end()) {
    return Invalid(principals_path,
                   "missing; name at least one principal such as "
                   "spiffe://example.org/svc or a pattern with '*'");
  }
  CUSTOS_ASSIGN_OR_RETURN(binding.principals,
                          StringArray(*principals, principals_path));

  const std::string operations_path = absl::StrCat(path, ".operations");
  const auto operations = object.find("operations");
  if (operations == object.end()) {
    return Invalid(operations_path, absl::StrCat("missing; list at least one "
                                                 "of ",
                                                 OperationNameList()));
  }
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> op_names,
                          StringArray(*operations, operations_path));
  for (size_t j = 0; j < op_names.size(); ++j) {
    KeyOperation op;
    if (!ParseKeyOperation(op_names[j], &op)) {
      return Invalid(absl::StrCat(operations_path, "[", j, "]"),
                     absl::StrCat("unknown operation ", Quote(op_names[j]),
                                  "; use one of ", OperationNameList()));
    }
    binding.operations.push_back(op);
  }

  const auto context = object.find("required_context");
  if (context != object.end()) {
    const std::string context_path = absl::StrCat(path, ".required_context");
    if (!context->is_object()) {
      return Invalid(context_path,
                     "expected an object of strings, e.g. {\"tenant\":\"*\"}");
    }
    for (const auto& item : context->items()) {
      if (!item.value().is_string()) {
        return Invalid(absl::StrCat(context_path, "[", Quote(item.key()), "]"),
                       "expected a string");
      }
      binding.required_context.emplace(
          item.key(), item.value().get_ref<const std::string&>());
    }
  }

  const auto require = object.find("require_justification");
  if (require != object.end()) {
    if (!require->is_boolean()) {
      return Invalid(absl::StrCat(path, ".require_justification"),
                     "expected true or false");
    }
    binding.require_justification = require->get<bool>();
  }

  const auto reasons = object.find("allowed_reasons");
  if (reasons != object.end()) {
    const std::string reasons_path = absl::StrCat(path, ".allowed_reasons");
    CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> reason_names,
                            StringArray(*reasons, reasons_path));
    for (size_t j = 0; j < reason_names.size(); ++j) {
      JustificationReason r;
      if (!ParseJustificationReason(reason_names[j], &r)) {
        return Invalid(absl::StrCat(reasons_path, "[", j, "]"),
                       absl::StrCat("unknown reason ", Quote(reason_names[j]),
                                    "; use one of ", ReasonNameList()));
      }
      binding.allowed_reasons.push_back(r);
    }
  }
  return binding;
}

absl::StatusOr<KeyPolicy> PolicyFromDom(const Json& root) {
  if (!root.is_object()) {
    return Invalid("policy",
                   "expected a JSON object such as "
                   "{\"version\":0,\"bindings\":[...]}");
  }
  CUSTOS_RETURN_IF_ERROR(CheckFields(root, "policy", {"version", "bindings"}));
  KeyPolicy policy;
  const auto version = root.find("version");
  if (version != root.end()) {
    if (!version->is_number_unsigned()) {
      return Invalid("policy.version", "expected a non-negative integer");
    }
    policy.version = version->get<uint64_t>();
  }
  const auto bindings = root.find("bindings");
  if (bindings == root.end()) {
    return Invalid("policy.bindings",
                   "missing; give a list of bindings ([] allows nothing)");
  }
  if (!bindings->is_array()) {
    return Invalid("policy.bindings", "expected an array of bindings");
  }
  if (bindings->size() > kMaxPolicyBindings) {
    return Invalid("policy.bindings",
                   absl::StrCat(bindings->size(), " bindings; at most ",
                                kMaxPolicyBindings));
  }
  for (size_t i = 0; i < bindings->size(); ++i) {
    CUSTOS_ASSIGN_OR_RETURN(
        PolicyBinding binding,
        BindingFromJson((*bindings)[i],
                        absl::StrCat("policy.bindings[", i, "]")));
    policy.bindings.push_back(std::move(binding));
  }
  CUSTOS_RETURN_IF_ERROR(ValidatePolicy(policy));
  return policy;
}

// Parses `text` into a DOM, refusing duplicate object keys (the parser would
// silently keep the last one, which could change what a policy allows) and
// excessive nesting.
absl::StatusOr<Json> ParseStrict(absl::string_view text) {
  std::vector<std::set<std::string>> keys_per_object;
  std::string error;
  Json::parser_callback_t callback = [&](int depth, Json::parse_event_t event,
                                         Json& parsed) -> bool {
    if (!error.empty()) return false;  // Stop building; the result is moot.
    switch (event) {
      case Json::parse_event_t::object_start:
      case Json::parse_event_t::array_start:
        if (depth >= kMaxJsonDepth) {
          error = absl::StrCat("nested deeper than ", kMaxJsonDepth,
                               " levels; a policy never needs that");
          return false;
        }
        if (event == Json::parse_event_t::object_start) {
          keys_per_object.emplace_back();
        }
        return true;
      case Json::parse_event_t::key: {
        const std::string& key = parsed.get_ref<const std::string&>();
        if (keys_per_object.empty() ||
            !keys_per_object.back().insert(key).second) {
          error = absl::StrCat("field ", Quote(key),
                               " appears twice in one object; give it once");
          return false;
        }
        return true;
      }
      case Json::parse_event_t::object_end:
        if (!keys_per_object.empty()) keys_per_object.pop_back();
        return true;
      default:
        return true;
    }
  };
  Json root;
  try {
    root = Json::parse(text.data(), text.data() + text.size(), callback,
                       /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const Json::exception& e) {
    if (!error.empty()) return Invalid("policy", error);
    constexpr size_t kMaxParserMessage = 200;
    return Invalid("policy", absl::StrCat("not valid JSON: ",
                                          absl::string_view(e.what()).substr(
                                              0, kMaxParserMessage)));
  }
  if (!error.empty()) return Invalid("policy", error);
  return root;
}

}  // namespace

const char* KeyOperationName(KeyOperation op) {
  for (const OperationInfo& info : kOperations) {
    if (info.op == op) return info.name;
  }
  return "UNKNOWN";
}

bool ParseKeyOperation(absl::string_view name, KeyOperation* op) {
  for (const OperationInfo& info : kOperations) {
    if (name == info.name) {
      *op = info.op;
      return true;
    }
  }
  return false;
}

const char* JustificationReasonName(JustificationReason r) {
  if (r == JustificationReason::kUnspecified) {
    return "JUSTIFICATION_REASON_UNSPECIFIED";
  }
  for (const ReasonInfo& info : kReasons) {
    if (info.reason == r) return info.name;
  }
  return "UNKNOWN";
}

bool ParseJustificationReason(absl::string_view name, JustificationReason* r) {
  for (const ReasonInfo& info : kReasons) {
    if (name == info.name) {
      *r = info.reason;
      return true;
    }
  }
  return false;
}

absl::Status ValidatePolicy(const KeyPolicy& policy) {
  if (policy.bindings.size() > kMaxPolicyBindings) {
    return Invalid("policy.bindings",
                   absl::StrCat(policy.bindings.size(), " bindings; at most ",
                                kMaxPolicyBindings,
                                ": merge bindings or use principal patterns"));
  }
  for (size_t i = 0; i < policy.bindings.size(); ++i) {
    const PolicyBinding& binding = policy.bindings[i];
    const std::string path = absl::StrCat("policy.bindings[", i, "]");
    CUSTOS_RETURN_IF_ERROR(ValidatePrincipals(binding, path));
    CUSTOS_RETURN_IF_ERROR(ValidateOperations(binding, path));
    CUSTOS_RETURN_IF_ERROR(ValidateRequiredContext(binding, path));
    CUSTOS_RETURN_IF_ERROR(ValidateAllowedReasons(binding, path));
  }
  return absl::OkStatus();
}

bool GlobMatch(absl::string_view pattern, absl::string_view text) {
  // Greedy two-pointer match. On a mismatch, go back to the most recent '*'
  // and let it swallow one more byte; earlier stars never need revisiting,
  // because the last star can absorb anything they could have.
  constexpr size_t kNoStar = absl::string_view::npos;
  size_t p = 0;
  size_t t = 0;
  size_t star = kNoStar;  // Position of the last '*' seen in the pattern.
  size_t star_t = 0;      // Where in the text that star's run ends.
  while (t < text.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      star_t = t;
    } else if (p < pattern.size() && pattern[p] == text[t]) {
      ++p;
      ++t;
    } else if (star != kNoStar) {
      p = star + 1;
      t = ++star_t;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

bool PolicyAllows(const KeyPolicy& policy, const AccessRequest& request) {
  // An empty identity is never a caller (the transport refuses
  // unauthenticated peers); refuse it here too rather than let "*" match it.
  if (request.principal.empty()) return false;
  for (const PolicyBinding& binding : policy.bindings) {
    if (BindingAllows(binding, request)) return true;
  }
  return false;
}

std::string PolicyToJson(const KeyPolicy& policy) {
  OrderedJson root = OrderedJson::object();
  root["version"] = policy.version;
  OrderedJson bindings = OrderedJson::array();
  for (const PolicyBinding& binding : policy.bindings) {
    OrderedJson b = OrderedJson::object();
    b["principals"] = binding.principals;
    OrderedJson operations = OrderedJson::array();
    for (KeyOperation op : binding.operations) {
      operations.push_back(KeyOperationName(op));
    }
    b["operations"] = std::move(operations);
    OrderedJson context = OrderedJson::object();
    for (const auto& [key, value] : binding.required_context) {
      context[key] = value;  // std::map: keys come sorted.
    }
    b["required_context"] = std::move(context);
    b["require_justification"] = binding.require_justification;
    OrderedJson reasons = OrderedJson::array();
    for (JustificationReason r : binding.allowed_reasons) {
      reasons.push_back(JustificationReasonName(r));
    }
    b["allowed_reasons"] = std::move(reasons);
    bindings.push_back(std::move(b));
  }
  root["bindings"] = std::move(bindings);
  // `replace` rather than the default `strict`: dump() must not throw on an
  // invalid policy's invalid UTF-8.
  return root.dump(/*indent=*/-1, /*indent_char=*/' ', /*ensure_ascii=*/false,
                   OrderedJson::error_handler_t::replace);
}

std::string PolicyToCanonicalJson(const KeyPolicy& policy) {
  // Json keeps object members in a std::map: dump() writes them sorted.
  const Json sorted =
      Json::parse(PolicyToJson(policy), nullptr, /*allow_exceptions=*/false);
  return sorted.dump(/*indent=*/-1, /*indent_char=*/' ',
                     /*ensure_ascii=*/false, Json::error_handler_t::replace);
}

absl::StatusOr<KeyPolicy> PolicyFromJson(absl::string_view json) {
  if (json.size() > kMaxPolicyJsonBytes) {
    return Invalid("policy",
                   absl::StrCat(json.size(), " bytes of JSON; at most ",
                                kMaxPolicyJsonBytes));
  }
  try {
    CUSTOS_ASSIGN_OR_RETURN(Json root, ParseStrict(json));
    return PolicyFromDom(root);
  } catch (const std::exception& e) {
    // Not expected (types are checked before every access), but no
    // exception may cross this API.
    return absl::InternalError(
        absl::StrCat("policy: JSON handling failed: ",
                     absl::string_view(e.what()).substr(0, 200)));
  }
}

}  // namespace custos::kms
