// Encryption context: the caller's non-secret key/value pairs that are bound
// into every ciphertext blob as part of the AES-GCM additional authenticated
// data (see docs/ciphertext-format.md). A blob opens only with the exact
// context it was made with; pair order does not matter, everything else does
// (a missing, extra or re-cased pair, or an empty value where the pair was
// absent).
//
// All functions here are pure and thread-safe.
#ifndef CUSTOS_KMS_ENCRYPTION_CONTEXT_H_
#define CUSTOS_KMS_ENCRYPTION_CONTEXT_H_

#include <cstddef>
#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace custos::kms {

// std::map orders keys bytewise: std::char_traits<char>::lt compares as
// unsigned char, so "Z" < "a" < "\xc3\xa9" regardless of the platform's char
// signedness. The canonical encoding relies on that order.
using EncryptionContext = std::map<std::string, std::string>;

inline constexpr size_t kMaxContextPairs = 64;
// Sum of the sizes of all keys and values.
inline constexpr size_t kMaxContextBytes = 8192;

// True if `bytes` is well-formed UTF-8 (Unicode 15, table 3-7): no overlong
// forms, no surrogates (U+D800..U+DFFF), nothing above U+10FFFF, no truncated
// sequences. U+0000 is well-formed; callers that forbid NUL check it apart.
bool IsValidUtf8(absl::string_view bytes);

// OK, or INVALID_ARGUMENT with a message starting "encryption_context: " that
// names the problem and the offending key (never a value; keys are echoed at
// most 64 bytes with non-printable bytes escaped). Rejects: more than
// kMaxContextPairs pairs, more than kMaxContextBytes in all, an empty key, a
// NUL byte or invalid UTF-8 in a key or value. The limits are checked first,
// so an oversized context is refused before its contents are scanned.
absl::Status ValidateEncryptionContext(const EncryptionContext& context);

// The canonical bytes bound into the GCM AAD:
//   u32be pair count, then for each pair in bytewise key order:
//   u32be key length, key bytes, u32be value length, value bytes.
// An empty context encodes as 4 zero bytes. Length prefixes make the encoding
// injective ({"ab": "c"} and {"a": "bc"} differ). Callers validate first; the
// encoding is only defined for contexts ValidateEncryptionContext accepts.
std::string CanonicalEncryptionContext(const EncryptionContext& context);

}  // namespace custos::kms

#endif  // CUSTOS_KMS_ENCRYPTION_CONTEXT_H_
