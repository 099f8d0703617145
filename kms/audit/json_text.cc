#include "kms/audit/json_text.h"

#include <cstdint>

namespace custos::kms {
namespace {

// Length of the well-formed UTF-8 sequence at s[i] (RFC 3629: no overlong
// forms, no surrogates, nothing above U+10FFFF), or 0.
size_t Utf8SequenceLength(absl::string_view s, size_t i) {
  const auto byte = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
  const uint8_t b0 = byte(i);
  const size_t left = s.size() - i;
  const auto cont = [&](size_t k) { return (byte(i + k) & 0xC0) == 0x80; };
  if (b0 < 0x80) return 1;
  if (b0 >= 0xC2 && b0 <= 0xDF) return left >= 2 && cont(1) ? 2 : 0;
  if (b0 >= 0xE0 && b0 <= 0xEF) {
    if (left < 3 || !cont(1) || !cont(2)) return 0;
    const uint8_t b1 = byte(i + 1);
    if (b0 == 0xE0 && b1 < 0xA0) return 0;   // overlong
    if (b0 == 0xED && b1 >= 0xA0) return 0;  // surrogate
    return 3;
  }
  if (b0 >= 0xF0 && b0 <= 0xF4) {
    if (left < 4 || !cont(1) || !cont(2) || !cont(3)) return 0;
    const uint8_t b1 = byte(i + 1);
    if (b0 == 0xF0 && b1 < 0x90) return 0;   // overlong
    if (b0 == 0xF4 && b1 >= 0x90) return 0;  // above U+10FFFF
    return 4;
  }
  return 0;
}

// Appends the escaped form of the character at value[i] to `out`; returns
// the index of the next character.
size_t AppendEscapedChar(std::string* out, absl::string_view value, size_t i) {
  static constexpr char kHex[] = "0123456789abcdef";
  const auto c = static_cast<uint8_t>(value[i]);
  if (c >= 0x80) {
    const size_t n = Utf8SequenceLength(value, i);
    if (n == 0) {
      out->append("\xEF\xBF\xBD");  // U+FFFD REPLACEMENT CHARACTER
      return i + 1;
    }
    out->append(value.data() + i, n);
    return i + n;
  }
  switch (c) {
    case '"':
      out->append("\\\"");
      break;
    case '\\':
      out->append("\\\\");
      break;
    case '\b':
      out->append("\\b");
      break;
    case '\f':
      out->append("\\f");
      break;
    case '\n':
      out->append("\\n");
      break;
    case '\r':
      out->append("\\r");
      break;
    case '\t':
      out->append("\\t");
      break;
    default:
      if (c < 0x20) {
        out->append("\\u00");
        out->push_back(kHex[c >> 4]);
        out->push_back(kHex[c & 0xF]);
      } else {
        out->push_back(static_cast<char>(c));
      }
  }
  return i + 1;
}

}  // namespace

void AppendJsonString(std::string* out, absl::string_view value) {
  out->reserve(out->size() + value.size() + 2);
  out->push_back('"');
  for (size_t i = 0; i < value.size();) i = AppendEscapedChar(out, value, i);
  out->push_back('"');
}

bool AppendJsonStringCapped(std::string* out, absl::string_view value,
                            size_t max_bytes) {
  const size_t start = out->size();
  AppendJsonString(out, value);
  if (out->size() - start <= max_bytes) return false;
  // Too long: write it again, as far as it fits with the quotes and "…".
  static constexpr absl::string_view kEllipsis = "\xE2\x80\xA6";
  out->resize(start);
  out->push_back('"');
  const size_t limit =
      start + (max_bytes < 8 ? 8 : max_bytes) - 1 - kEllipsis.size();
  std::string piece;
  for (size_t i = 0; i < value.size();) {
    piece.clear();
    const size_t next = AppendEscapedChar(&piece, value, i);
    if (out->size() + piece.size() > limit) break;
    out->append(piece);
    i = next;
  }
  out->append(kEllipsis.data(), kEllipsis.size());
  out->push_back('"');
  return true;
}

}  // namespace custos::kms
