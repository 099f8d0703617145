#include "kms/audit/json_line.h"

#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// The scanner is one function whose state lives in locals (registers), with
// the per-string work inlined into it: the verifier runs it on every line,
// and a class whose members were read and written through `this` was a third
// slower. Rare paths (escapes, non-ASCII) are out of line.
#define CUSTOS_JSON_INLINE inline __attribute__((always_inline))

namespace custos::kms {
namespace {

constexpr bool IsWhitespace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}
constexpr bool IsDigit(char c) { return c >= '0' && c <= '9'; }

CUSTOS_JSON_INLINE const char* SkipWhitespace(const char* p, const char* end) {
  // The writer writes none: one compare rules it out.
  while (p < end && static_cast<unsigned char>(*p) <= ' ' && IsWhitespace(*p)) {
    ++p;
  }
  return p;
}

// 0 to 63, from a key's length and its first and last bytes: enough to tell
// apart the keys of one object, almost always.
CUSTOS_JSON_INLINE int KeyHash(const char* key, size_t size) {
  if (size == 0) return 0;
  const uint32_t x = static_cast<uint32_t>(size) |
                     uint32_t{static_cast<unsigned char>(key[0])} << 8 |
                     uint32_t{static_cast<unsigned char>(key[size - 1])} << 16;
  return static_cast<int>((x * 0x9e3779b1u) >> 26);
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The 4 hex digits at `at`, or -1.
int Hex4(const char* at, const char* end) {
  if (end - at < 4) return -1;
  int value = 0;
  for (int i = 0; i < 4; ++i) {
    const int digit = HexValue(at[i]);
    if (digit < 0) return -1;
    value = value * 16 + digit;
  }
  return value;
}

// At '\\' in a string (RFC 8259 §7): past the escape, or null and `*error`.
const char* ScanEscape(const char* p, const char* end, const char** error) {
  if (end - p < 2) {
    *error = "a string is not closed";
    return nullptr;
  }
  switch (p[1]) {
    case '"':
    case '\\':
    case '/':
    case 'b':
    case 'f':
    case 'n':
    case 'r':
    case 't':
      return p + 2;
    case 'u':
      break;
    default:
      *error = "an invalid escape in a string";
      return nullptr;
  }
  const int unit = Hex4(p + 2, end);
  if (unit < 0) {
    *error = "\\u not followed by 4 hex digits";
    return nullptr;
  }
  if (unit >= 0xdc00 && unit <= 0xdfff) {
    *error = "a \\u escape of a low surrogate without a high one";
    return nullptr;
  }
  if (unit < 0xd800 || unit > 0xdbff) return p + 6;
  // A high surrogate: the low one must follow.
  const char* low = p + 6;
  int low_unit = -1;
  if (end - low >= 2 && low[0] == '\\' && low[1] == 'u') {
    low_unit = Hex4(low + 2, end);
  }
  if (low_unit < 0xdc00 || low_unit > 0xdfff) {
    *error = "a \\u escape of a high surrogate without a low one";
    return nullptr;
  }
  return p + 12;
}

// At a byte >= 0x80 in a string: past one well-formed UTF-8 sequence
// (Unicode Table 3-7), or null and `*error`.
const char* ScanUtf8(const char* p, const char* end, const char** error) {
  const auto* s = reinterpret_cast<const unsigned char*>(p);
  const size_t avail = static_cast<size_t>(end - p);
  const unsigned char lead = s[0];
  size_t size = 0;
  unsigned char lo = 0x80, hi = 0xbf;  // the range of the second byte
  if (lead >= 0xc2 && lead <= 0xdf) {
    size = 2;
  } else if (lead >= 0xe0 && lead <= 0xef) {
    size = 3;
    if (lead == 0xe0) lo = 0xa0;  // overlong
    if (lead == 0xed) hi = 0x9f;  // surrogates
  } else if (lead >= 0xf0 && lead <= 0xf4) {
    size = 4;
    if (lead == 0xf0) lo = 0x90;  // overlong
    if (lead == 0xf4) hi = 0x8f;  // above U+10FFFF
  }
  bool ok = size != 0 && avail >= size && s[1] >= lo && s[1] <= hi;
  for (size_t i = 2; ok && i < size; ++i) ok = (s[i] & 0xc0) == 0x80;
  if (!ok) {
    *error = "invalid UTF-8 in a string";
    return nullptr;
  }
  return p + size;
}

// One bit per byte of the 64 at `at`, set for '"', '\\', control characters
// and non-ASCII bytes: what ends a run of plain string bytes.
CUSTOS_JSON_INLINE uint64_t Mask64(const char* at) {
#if defined(__SSE2__)
  const __m128i quote = _mm_set1_epi8('"');
  const __m128i backslash = _mm_set1_epi8('\\');
  const __m128i space = _mm_set1_epi8(0x20);
  uint64_t mask = 0;
  for (int i = 0; i < 4; ++i) {
    const __m128i v =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(at + 16 * i));
    // Signed: 0x80-0xff are below 0x20 too.
    const __m128i special = _mm_or_si128(
        _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)),
        _mm_cmplt_epi8(v, space));
    mask |=
        static_cast<uint64_t>(static_cast<uint16_t>(_mm_movemask_epi8(special)))
        << (16 * i);
  }
  return mask;
#else
  uint64_t mask = 0;
  for (int i = 0; i < 64; ++i) {
    const unsigned char c = static_cast<unsigned char>(at[i]);
    if (c == '"' || c == '\\' || c < 0x20 || c >= 0x80) {
      mask |= uint64_t{1} << i;
    }
  }
  return mask;
#endif
}

// Mask64() of the line's block at `offset` (a multiple of 64, below `size`),
// with the bits past the line's end set. Never reads outside the line.
uint64_t BlockMask(const char* line, size_t size, size_t offset) {
  const size_t avail = size - offset;
  if (avail >= 64) return Mask64(line + offset);
  if (size >= 64) {
    // The line's last 64 bytes, shifted down to the block's start.
    return Mask64(line + size - 64) >> (64 - avail) | ~uint64_t{0} << avail;
  }
  char copy[64];
  std::memcpy(copy, line + offset, avail);
  std::memset(copy + avail, '"', 64 - avail);
  return Mask64(copy);
}

// The line, classified 64 bytes at a time as strings are read (each block
// once: strings only move forward).
struct Blocks {
  const char* begin;
  size_t size;
  size_t block = ~size_t{0};  // the offset of the block in `mask`
  uint64_t mask = 0;
};

// From just past a string's opening quote: past its closing quote, or null
// with `*error` and `*error_at`. Sets `*escaped` if the string holds an
// escape.
CUSTOS_JSON_INLINE const char* ScanString(const char* p, Blocks& blocks,
                                          bool* escaped, const char** error,
                                          const char** error_at) {
  const char* const end = blocks.begin + blocks.size;
  for (;;) {
    // The next '"', '\\', control or non-ASCII byte.
    size_t offset = static_cast<size_t>(p - blocks.begin);
    for (;;) {
      const size_t block = offset & ~size_t{63};
      if (block >= blocks.size) {
        offset = blocks.size;
        break;
      }
      if (block != blocks.block) {
        blocks.block = block;
        blocks.mask = BlockMask(blocks.begin, blocks.size, block);
      }
      const uint64_t rest = blocks.mask >> (offset & 63);
      if (rest != 0) {
        offset += static_cast<size_t>(__builtin_ctzll(rest));
        break;
      }
      offset = block + 64;
    }
    if (offset >= blocks.size) {
      *error = "a string is not closed";
      *error_at = end;
      return nullptr;
    }
    p = blocks.begin + offset;
    const unsigned char c = static_cast<unsigned char>(*p);
    if (c == '"') return p + 1;
    const char* next;
    if (c == '\\') {
      *escaped = true;
      next = ScanEscape(p, end, error);
    } else if (c < 0x20) {
      *error = "a control character in a string (must be escaped)";
      next = nullptr;
    } else {
      next = ScanUtf8(p, end, error);
    }
    if (next == nullptr) {
      *error_at = p;
      return nullptr;
    }
    p = next;
  }
}

// -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?  (RFC 8259 §6): past the
// number at `p`, or null with `*error` and `*error_at`.
CUSTOS_JSON_INLINE const char* ScanNumber(const char* p, const char* end,
                                          const char** error,
                                          const char** error_at) {
  if (*p == '-') ++p;
  if (p == end || !IsDigit(*p)) {
    *error = "expected a value";
    *error_at = p;
    return nullptr;
  }
  if (*p == '0') {
    ++p;
  } else {
    while (p < end && IsDigit(*p)) ++p;
  }
  if (p < end && (*p == '.' || *p == 'e' || *p == 'E')) {
    if (*p == '.') {
      ++p;
      if (p == end || !IsDigit(*p)) {
        *error = "a digit must follow '.'";
        *error_at = p;
        return nullptr;
      }
      while (p < end && IsDigit(*p)) ++p;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
      ++p;
      if (p < end && (*p == '+' || *p == '-')) ++p;
      if (p == end || !IsDigit(*p)) {
        *error = "a digit must follow 'e'";
        *error_at = p;
        return nullptr;
      }
      while (p < end && IsDigit(*p)) ++p;
    }
  }
  return p;
}

}  // namespace

// One pass, without recursion: the open containers are bits of `is_object`
// (bit d: the container at depth d + 1 is an object); the keys of the open
// objects are a stack in out->members whose bottom is the top-level
// object's, each object's keys starting at key_base[depth - 1].
bool ScanJsonObjectLine(absl::string_view line, JsonObjectLine* out) {
  const char* const begin = line.data();
  const char* const end = begin + line.size();
  JsonObjectLine::Member* const members = out->members;
  Blocks blocks{begin, line.size()};
  const char* p = SkipWhitespace(begin, end);
  const char* error = nullptr;
  const char* error_at = nullptr;
  int depth = 0;
  uint64_t is_object = 0;
  size_t count = 0;  // keys on the stack
  bool keys_checked = true;
  bool repeated = false;
  absl::string_view first_repeated;
  const char* value_begin = nullptr;  // of the current top-level member
  size_t key_base[JsonObjectLine::kMaxDepth];
  uint64_t key_filter[JsonObjectLine::kMaxDepth];  // a bit per key hash
  auto in_object = [&] { return ((is_object >> (depth - 1)) & 1) != 0; };

  if (p == end || *p != '{') {
    error = "the line is not a JSON object";
    error_at = p;
    goto failed;
  }

value:  // at a value, whitespace skipped
  if (p == end) {
    error = "a value is missing";
    error_at = p;
    goto failed;
  }
  if (depth == 1) value_begin = p;
  if (*p == '"') {  // the most common value first
    bool escaped = false;
    p = ScanString(p + 1, blocks, &escaped, &error, &error_at);
    if (p == nullptr) goto failed;
    goto after_value;
  }
  switch (*p) {
    case '{':
    case '[': {
      if (depth == JsonObjectLine::kMaxDepth) {
        error = "nested too deeply";
        error_at = p;
        goto failed;
      }
      const bool object = *p == '{';
      ++p;
      ++depth;
      const uint64_t bit = uint64_t{1} << (depth - 1);
      is_object = object ? is_object | bit : is_object & ~bit;
      if (object) {
        key_base[depth - 1] = count;
        key_filter[depth - 1] = 0;
      }
      p = SkipWhitespace(p, end);
      if (p < end && *p == (object ? '}' : ']')) {
        ++p;
        goto closed;
      }
      if (object) goto key;
      goto value;
    }
    case 't':
    case 'f':
    case 'n': {
      const absl::string_view word =
          *p == 't' ? "true" : (*p == 'f' ? "false" : "null");
      if (static_cast<size_t>(end - p) < word.size() ||
          std::memcmp(p, word.data(), word.size()) != 0) {
        error = "expected a value";
        error_at = p;
        goto failed;
      }
      p += word.size();
      break;
    }
    default:
      p = ScanNumber(p, end, &error, &error_at);
      if (p == nullptr) goto failed;
      break;
  }

after_value:  // just past a value at `depth` >= 1
  if (depth == 1 && keys_checked) {
    members[count - 1].value =
        absl::string_view(value_begin, static_cast<size_t>(p - value_begin));
  }
  p = SkipWhitespace(p, end);
  if (p == end) {
    error =
        in_object() ? "the object is not closed" : "the array is not closed";
    error_at = p;
    goto failed;
  }
  if (*p == ',') {
    p = SkipWhitespace(p + 1, end);
    if (in_object()) goto key;
    goto value;
  }
  if (*p != (in_object() ? '}' : ']')) {
    error = in_object() ? "expected ',' or '}'" : "expected ',' or ']'";
    error_at = p;
    goto failed;
  }
  ++p;

closed:  // just past the closing bracket of the container at `depth`
  if (in_object() && keys_checked && depth > 1) count = key_base[depth - 1];
  --depth;
  if (depth > 0) goto after_value;
  p = SkipWhitespace(p, end);
  if (p != end) {
    error = "more after the object";
    error_at = p;
    goto failed;
  }
  out->member_count = count;
  out->keys_checked = keys_checked;
  out->repeated_key = repeated;
  out->first_repeated_key = first_repeated;
  out->error = nullptr;
  out->error_offset = 0;
  return true;

key:  // at a key, whitespace skipped
  if (p == end || *p != '"') {
    error = "expected a key";
    error_at = p;
    goto failed;
  }
  {
    const char* const key = p + 1;
    bool escaped = false;
    p = ScanString(key, blocks, &escaped, &error, &error_at);
    if (p == nullptr) goto failed;
    const size_t size = static_cast<size_t>(p - 1 - key);
    if (escaped || count == JsonObjectLine::kMaxKeys) keys_checked = false;
    if (keys_checked) {
      // Compared with the object's other keys only when the object's
      // filter has this key's hash.
      const uint64_t bit = uint64_t{1} << KeyHash(key, size);
      if ((key_filter[depth - 1] & bit) != 0 && !repeated) {
        for (size_t i = key_base[depth - 1]; i < count; ++i) {
          if (members[i].key.size() == size &&
              std::memcmp(members[i].key.data(), key, size) == 0) {
            repeated = true;
            first_repeated = absl::string_view(key, size);
            break;
          }
        }
      }
      key_filter[depth - 1] |= bit;
      members[count++].key = absl::string_view(key, size);
    }
  }
  p = SkipWhitespace(p, end);
  if (p == end || *p != ':') {
    error = "expected ':' after a key";
    error_at = p;
    goto failed;
  }
  p = SkipWhitespace(p + 1, end);
  goto value;

failed:
  out->member_count = keys_checked ? count : 0;
  out->keys_checked = keys_checked;
  out->repeated_key = repeated;
  out->first_repeated_key = first_repeated;
  out->error = error;
  out->error_offset = static_cast<size_t>(error_at - begin);
  return false;
}

}  // namespace custos::kms
