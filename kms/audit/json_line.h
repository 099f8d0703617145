// A validating scanner for one line that holds one JSON object (RFC 8259),
// for the audit verifier's fast path: it decides, without allocating and
// without decoding, whether the line is JSON that every reader accepts, and
// hands back the top-level members as raw slices of the line.
//
// Accepted: optional whitespace (space, tab, CR, LF), one object, optional
// whitespace, the end of the line. Inside it, the grammar of RFC 8259 §2-7:
// strings with the escapes of §7 whose raw bytes are well-formed UTF-8
// (Unicode Table 3-7: no overlong forms, no surrogates, nothing above
// U+10FFFF) and whose \u escapes pair surrogates; numbers; true, false, null;
// objects and arrays nested at most kMaxDepth deep. This is what nlohmann::json
// accepts, less a byte order mark (nlohmann skips one) and deeper nesting.
//
// Keys are compared raw: a repeated key is found exactly when no key of the
// object holds an escape. `keys_checked` says whether that held for every
// object of the line (and the keys fitted in `members`); when it is false the
// line must be decoded to rule out repeated keys, and `members` is not to be
// used. Stateless and thread-safe; a JsonObjectLine is one caller's.
#ifndef CUSTOS_KMS_AUDIT_JSON_LINE_H_
#define CUSTOS_KMS_AUDIT_JSON_LINE_H_

#include <cstddef>

#include "absl/strings/string_view.h"

namespace custos::kms {

struct JsonObjectLine {
  static constexpr int kMaxDepth = 64;
  // Keys kept at once: the top-level ones plus those of the objects open
  // inside the current member. More makes `keys_checked` false.
  static constexpr size_t kMaxKeys = 64;

  struct Member {
    absl::string_view key;    // the raw bytes between the key's quotes
    absl::string_view value;  // the raw value: `12`, `"ab"`, `{...}`
  };

  // The top-level members in order (when `keys_checked`).
  Member members[kMaxKeys];
  size_t member_count = 0;
  // Every key held no escape and the keys fitted: repeated keys were looked
  // for, raw, in every object, and `members` is complete.
  bool keys_checked = true;
  // A key repeated within one object (found when `keys_checked`); the line
  // is still valid JSON, which readers would read differently (first value,
  // last value, or an error).
  bool repeated_key = false;
  absl::string_view first_repeated_key;  // raw

  // Why the line is not valid JSON, and the byte (0-based) where that shows,
  // when ScanJsonObjectLine returned false.
  const char* error = nullptr;
  size_t error_offset = 0;
};

// True if `line` is one valid JSON object, as described above; fills `out`
// (whose previous content is discarded).
bool ScanJsonObjectLine(absl::string_view line, JsonObjectLine* out);

}  // namespace custos::kms

#endif  // CUSTOS_KMS_AUDIT_JSON_LINE_H_
