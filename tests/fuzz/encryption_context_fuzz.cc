// Fuzzes the encryption-context checks and canonical encoding
// (kms/encryption_context.h). The input is a list of pairs, one per line
// ('\n'), each split into key and value at its first '=' (a line without
// '=' is a key with an empty value); a key given twice keeps its first
// value. Checks that:
//  - ValidateEncryptionContext accepts exactly the contexts the header
//    describes (an independent UTF-8 decoder and reading of the limits
//    decide), and its errors are INVALID_ARGUMENT, start with
//    "encryption_context: ", are length-capped and printable ASCII (keys
//    are echoed escaped, values never);
//  - IsValidUtf8 agrees with the independent decoder on every key, value
//    and on the whole input;
//  - the canonical encoding does not depend on the order the pairs were
//    given in, is deterministic, and decodes back to exactly the context
//    (count, lengths, keys strictly increasing bytewise, no trailing bytes):
//    so it is injective.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "kms/encryption_context.h"
#include "tests/fuzz/fuzz_check.h"

namespace custos::kms {
namespace {

using Pairs = std::vector<std::pair<std::string, std::string>>;

// Strict UTF-8 by decoding code points: shortest form only, no surrogates,
// nothing above U+10FFFF. Written apart from IsValidUtf8 (which checks byte
// ranges) to cross-check it.
bool ReferenceUtf8(absl::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto b = static_cast<uint8_t>(s[i]);
    size_t len;
    uint32_t cp;
    if (b < 0x80) {
      ++i;
      continue;
    } else if ((b & 0xe0) == 0xc0) {
      len = 2, cp = b & 0x1f;
    } else if ((b & 0xf0) == 0xe0) {
      len = 3, cp = b & 0x0f;
    } else if ((b & 0xf8) == 0xf0) {
      len = 4, cp = b & 0x07;
    } else {
      return false;
    }
    if (s.size() - i < len) return false;
    for (size_t k = 1; k < len; ++k) {
      const auto c = static_cast<uint8_t>(s[i + k]);
      if ((c & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (c & 0x3f);
    }
    static constexpr uint32_t kMinForLength[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMinForLength[len] || cp > 0x10ffff ||
        (cp >= 0xd800 && cp <= 0xdfff)) {
      return false;
    }
    i += len;
  }
  return true;
}

bool ReferenceValid(const EncryptionContext& context) {
  if (context.size() > kMaxContextPairs) return false;
  size_t total = 0;
  for (const auto& [key, value] : context) total += key.size() + value.size();
  if (total > kMaxContextBytes) return false;
  for (const auto& [key, value] : context) {
    if (key.empty() || absl::StrContains(key, '\0') ||
        absl::StrContains(value, '\0') || !ReferenceUtf8(key) ||
        !ReferenceUtf8(value)) {
      return false;
    }
  }
  return true;
}

Pairs SplitPairs(absl::string_view input) {
  Pairs pairs;
  std::set<std::string> seen;
  while (!input.empty()) {
    const size_t nl = input.find('\n');
    const absl::string_view line = input.substr(0, nl);
    input = nl == absl::string_view::npos ? absl::string_view()
                                          : input.substr(nl + 1);
    const size_t eq = line.find('=');
    std::string key(line.substr(0, eq));
    std::string value(eq == absl::string_view::npos ? absl::string_view()
                                                    : line.substr(eq + 1));
    if (seen.insert(key).second) {
      pairs.emplace_back(std::move(key), std::move(value));
    }
  }
  return pairs;
}

EncryptionContext ToContext(const Pairs& pairs) {
  EncryptionContext context;
  for (const auto& [key, value] : pairs) context.emplace(key, value);
  return context;
}

uint32_t ReadU32(absl::string_view* in) {
  const auto* p = reinterpret_cast<const uint8_t*>(in->data());
  const uint32_t v = (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) |
                     (uint32_t{p[2]} << 8) | uint32_t{p[3]};
  in->remove_prefix(4);
  return v;
}

// Decodes the canonical form documented in the header; false if it is not
// exactly one well-formed encoding.
bool DecodeCanonical(absl::string_view in, EncryptionContext* out) {
  if (in.size() < 4) return false;
  const uint32_t count = ReadU32(&in);
  std::string previous;
  for (uint32_t i = 0; i < count; ++i) {
    if (in.size() < 4) return false;
    const uint32_t key_size = ReadU32(&in);
    if (in.size() < key_size) return false;
    std::string key(in.substr(0, key_size));
    in.remove_prefix(key_size);
    if (in.size() < 4) return false;
    const uint32_t value_size = ReadU32(&in);
    if (in.size() < value_size) return false;
    std::string value(in.substr(0, value_size));
    in.remove_prefix(value_size);
    // Bytewise order (unsigned), strictly increasing: no duplicates.
    if (i > 0 && !(absl::string_view(previous) < absl::string_view(key))) {
      return false;
    }
    previous = key;
    out->emplace(std::move(key), std::move(value));
  }
  return in.empty();
}

void CheckValidate(const EncryptionContext& context) {
  const absl::Status status = ValidateEncryptionContext(context);
  CUSTOS_FUZZ_CHECK(status.ok() == ReferenceValid(context),
                    "ValidateEncryptionContext disagrees with the documented "
                    "rules");
  if (status.ok()) return;
  CUSTOS_FUZZ_CHECK(status.code() == absl::StatusCode::kInvalidArgument,
                    "error code");
  const absl::string_view message = status.message();
  CUSTOS_FUZZ_CHECK(absl::StartsWith(message, "encryption_context: "),
                    "error message prefix");
  // The problem (< 120 bytes) and a key echoed as at most 64 bytes, each
  // escaped to at most 4, plus its length.
  CUSTOS_FUZZ_CHECK(message.size() <= 512, "error message not length-capped");
  // Keys are echoed escaped and values never, so nothing but printable
  // ASCII reaches the message (and so the logs).
  for (const char c : message) {
    CUSTOS_FUZZ_CHECK(c >= 0x20 && c < 0x7f,
                      "an error message carries an unescaped byte");
  }
}

void CheckCanonical(const Pairs& pairs, const EncryptionContext& context) {
  const std::string canonical = CanonicalEncryptionContext(context);
  CUSTOS_FUZZ_CHECK(canonical == CanonicalEncryptionContext(context),
                    "canonical encoding is not deterministic");
  size_t expected_size = 4;
  for (const auto& [key, value] : context) {
    expected_size += 8 + key.size() + value.size();
  }
  CUSTOS_FUZZ_CHECK(canonical.size() == expected_size, "canonical size");
  EncryptionContext decoded;
  CUSTOS_FUZZ_CHECK(DecodeCanonical(canonical, &decoded) && decoded == context,
                    "canonical encoding does not decode to the context");

  // Whatever order the pairs come in, the encoding is the same.
  Pairs reordered(pairs.rbegin(), pairs.rend());
  CUSTOS_FUZZ_CHECK(
      CanonicalEncryptionContext(ToContext(reordered)) == canonical,
      "canonical encoding depends on pair order (reversed)");
  std::sort(reordered.begin(), reordered.end(),
            [](const auto& a, const auto& b) { return a.second < b.second; });
  CUSTOS_FUZZ_CHECK(
      CanonicalEncryptionContext(ToContext(reordered)) == canonical,
      "canonical encoding depends on pair order (by value)");
  if (!context.empty()) {
    // Dropping a pair changes the encoding (it is injective).
    EncryptionContext smaller = context;
    smaller.erase(smaller.begin());
    CUSTOS_FUZZ_CHECK(CanonicalEncryptionContext(smaller) != canonical,
                      "two contexts share an encoding");
  }
}

void FuzzOne(absl::string_view input) {
  CUSTOS_FUZZ_CHECK(IsValidUtf8(input) == ReferenceUtf8(input),
                    "IsValidUtf8 disagrees with a code point decoder");
  const Pairs pairs = SplitPairs(input);
  const EncryptionContext context = ToContext(pairs);
  for (const auto& [key, value] : context) {
    CUSTOS_FUZZ_CHECK(IsValidUtf8(key) == ReferenceUtf8(key), "IsValidUtf8");
    CUSTOS_FUZZ_CHECK(IsValidUtf8(value) == ReferenceUtf8(value),
                      "IsValidUtf8");
  }
  CheckValidate(context);
  CheckCanonical(pairs, context);
}

}  // namespace
}  // namespace custos::kms

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  custos::kms::FuzzOne(
      absl::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}
