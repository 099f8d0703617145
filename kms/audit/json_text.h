// Writes JSON text for audit records without building a document: one
// string append per value. Strings are escaped per RFC 8259 (quote,
// backslash and control characters) and made valid UTF-8: each byte that
// does not begin a well-formed sequence becomes U+FFFD, as nlohmann::json's
// error_handler_t::replace does. Stateless; thread-safe.
#ifndef CUSTOS_KMS_AUDIT_JSON_TEXT_H_
#define CUSTOS_KMS_AUDIT_JSON_TEXT_H_

#include <string>

#include "absl/strings/string_view.h"

namespace custos::kms {

// Appends `value` as a JSON string literal, quotes included.
void AppendJsonString(std::string* out, absl::string_view value);

// AppendJsonString, but the literal (quotes included) takes at most
// `max_bytes` (at least 8) of `out`: a longer value is cut at a character
// boundary and ends in "…" (U+2026). Returns true if it was cut.
bool AppendJsonStringCapped(std::string* out, absl::string_view value,
                            size_t max_bytes);

}  // namespace custos::kms

#endif  // CUSTOS_KMS_AUDIT_JSON_TEXT_H_
