#include "kms/principal.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "kms/encryption_context.h"
#include "kms/policy.h"

namespace custos::kms {
namespace {

// Schemes a URI principal may not have: each would let a URI pose as a
// principal of another type.
constexpr absl::string_view kReservedSchemes[] = {"custos", "dns", "cn",
                                                  "cert-sha256"};

// What is wrong with `text` as a principal, or "" if nothing: 1 to
// kMaxPrincipalBytes bytes of UTF-8 without spaces or control characters
// (C0, DEL, C1).
std::string TextProblem(absl::string_view text) {
  if (text.empty()) return "is empty";
  if (text.size() > kMaxPrincipalBytes) {
    return absl::StrCat("is ", text.size(), " bytes; at most ",
                        kMaxPrincipalBytes);
  }
  if (!IsValidUtf8(text)) return "is not valid UTF-8";
  for (size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c <= 0x20 || c == 0x7f) return "contains a space or control character";
    // U+0080..U+009F: C2 80..C2 9F.
    if (c == 0xC2 && i + 1 < text.size() &&
        static_cast<unsigned char>(text[i + 1]) <= 0x9F) {
      return "contains a control character";
    }
  }
  return "";
}

// The scheme of `text` ("spiffe" of "spiffe://..."), or "" if it does not
// start with one (RFC 3986: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) ":").
absl::string_view SchemeOf(absl::string_view text) {
  const size_t colon = text.find(':');
  if (colon == absl::string_view::npos || colon == 0) return "";
  if (!absl::ascii_isalpha(static_cast<unsigned char>(text[0]))) return "";
  for (size_t i = 1; i < colon; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (!absl::ascii_isalnum(c) && c != '+' && c != '-' && c != '.') return "";
  }
  return text.substr(0, colon);
}

bool ReservedScheme(absl::string_view scheme) {
  for (absl::string_view reserved : kReservedSchemes) {
    if (absl::EqualsIgnoreCase(scheme, reserved)) return true;
  }
  return false;
}

absl::Status Unusable(absl::string_view what, absl::string_view problem) {
  return absl::UnauthenticatedError(
      absl::StrCat("client certificate names no usable identity: its ", what,
                   " ", problem, " (docs/policies.md, Principals)"));
}

}  // namespace

bool IsReservedPrincipal(absl::string_view name) {
  return absl::StartsWithIgnoreCase(name, kReservedPrincipalPrefix);
}

absl::StatusOr<std::string> UriPrincipal(absl::string_view uri) {
  if (std::string problem = TextProblem(uri); !problem.empty()) {
    return Unusable("SAN URI", problem);
  }
  const absl::string_view scheme = SchemeOf(uri);
  if (scheme.empty()) {
    return Unusable("SAN URI", "has no scheme (such as spiffe://)");
  }
  if (ReservedScheme(scheme)) {
    return Unusable("SAN URI", absl::StrCat("has the reserved scheme '",
                                            scheme.substr(0, 16), ":'"));
  }
  return std::string(uri);
}

absl::StatusOr<std::string> DnsPrincipal(absl::string_view dns_name) {
  // A host name: dot-separated labels of letters, digits and '-' (RFC 1123),
  // compared without regard to case. Wildcards name no single client.
  if (dns_name.empty() || dns_name.size() > 253) {
    return Unusable("SAN DNS name", "is not 1 to 253 characters");
  }
  size_t label = 0;
  for (size_t i = 0; i <= dns_name.size(); ++i) {
    if (i == dns_name.size() || dns_name[i] == '.') {
      if (label == 0 || label > 63) {
        return Unusable("SAN DNS name", "has an empty or overlong label");
      }
      label = 0;
      continue;
    }
    const auto c = static_cast<unsigned char>(dns_name[i]);
    if (!absl::ascii_isalnum(c) && c != '-') {
      return Unusable("SAN DNS name",
                      "is not a host name (letters, digits, '-' and '.')");
    }
    ++label;
  }
  return absl::StrCat(kDnsPrincipalPrefix, absl::AsciiStrToLower(dns_name));
}

absl::StatusOr<std::string> CnPrincipal(absl::string_view common_name) {
  if (IsReservedPrincipal(common_name)) {
    return Unusable("subject CN", "starts with the reserved prefix 'custos:'");
  }
  std::string principal = absl::StrCat(kCnPrincipalPrefix, common_name);
  if (std::string problem = TextProblem(common_name); !problem.empty()) {
    return Unusable("subject CN", problem);
  }
  if (principal.size() > kMaxPrincipalBytes) {
    return Unusable(
        "subject CN",
        absl::StrCat("is longer than ", kMaxPrincipalBytes - 3, " bytes"));
  }
  return principal;
}

absl::Status ValidateConfiguredPrincipal(absl::string_view principal,
                                         absl::string_view field,
                                         bool allow_patterns) {
  const auto invalid = [&](absl::string_view problem) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: ", field, ": ", problem));
  };
  if (std::string problem = TextProblem(principal); !problem.empty()) {
    return invalid(absl::StrCat(problem, "; principals are 1 to ",
                                kMaxPrincipalBytes,
                                " bytes of UTF-8 without spaces or control "
                                "characters"));
  }
  if (IsReservedPrincipal(principal)) {
    return invalid(
        "the prefix 'custos:' is reserved for the service's own work; name a "
        "client certificate's identity");
  }
  if (!allow_patterns && absl::StrContains(principal, '*')) {
    return invalid("must be one exact principal, not a pattern with '*'");
  }
  if (absl::StartsWith(principal, "*")) return absl::OkStatus();
  const absl::string_view scheme = SchemeOf(principal);
  if (scheme.empty()) {
    return invalid(absl::StrCat(
        "'", principal.substr(0, 64),
        "' has no type; spell a SAN URI as it is (spiffe://...), a DNS name "
        "as dns:HOST and a subject CN as cn:NAME (docs/policies.md)"));
  }
  if (absl::EqualsIgnoreCase(scheme, "cert-sha256")) {
    return invalid(
        "cert-sha256: names callers that were refused; it never matches an "
        "identity");
  }
  if (absl::EqualsIgnoreCase(scheme, "dns") && scheme != "dns") {
    return invalid("write the type prefix in lower case: dns:");
  }
  if (absl::EqualsIgnoreCase(scheme, "cn") && scheme != "cn") {
    return invalid("write the type prefix in lower case: cn:");
  }
  return absl::OkStatus();
}

}  // namespace custos::kms
