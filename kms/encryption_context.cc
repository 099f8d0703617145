#include "kms/encryption_context.h"

#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace custos::kms {
namespace {

// Keys are caller input and end up in logs: echo a bounded, escaped prefix.
constexpr size_t kMaxEchoedKeyBytes = 64;

std::string EchoKey(absl::string_view key) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "\"";
  const absl::string_view shown = key.substr(0, kMaxEchoedKeyBytes);
  for (const char ch : shown) {
    const auto b = static_cast<uint8_t>(ch);
    if (b >= 0x20 && b < 0x7f && b != '"' && b != '\\') {
      out.push_back(ch);
    } else {
      out += "\\x";
      out.push_back(kHex[b >> 4]);
      out.push_back(kHex[b & 0xf]);
    }
  }
  out.push_back('"');
  if (key.size() > shown.size()) {
    absl::StrAppend(&out, "... (", key.size(), " bytes)");
  }
  return out;
}

absl::Status ContextError(absl::string_view problem, absl::string_view key) {
  return absl::InvalidArgumentError(
      absl::StrCat("encryption_context: ", problem, " ", EchoKey(key)));
}

void AppendU32Be(std::string& out, uint32_t v) {
  out.push_back(static_cast<char>(v >> 24));
  out.push_back(static_cast<char>(v >> 16));
  out.push_back(static_cast<char>(v >> 8));
  out.push_back(static_cast<char>(v));
}

}  // namespace

bool IsValidUtf8(absl::string_view bytes) {
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  const uint8_t* const end = p + bytes.size();
  while (p < end) {
    const uint8_t b0 = *p;
    if (b0 < 0x80) {
      ++p;
      continue;
    }
    // Sequence length and the allowed range of the second byte, which is
    // where overlongs (E0, F0), surrogates (ED) and > U+10FFFF (F4) are cut.
    size_t len;
    uint8_t lo = 0x80, hi = 0xbf;
    if (b0 >= 0xc2 && b0 <= 0xdf) {
      len = 2;
    } else if (b0 >= 0xe0 && b0 <= 0xef) {
      len = 3;
      if (b0 == 0xe0) lo = 0xa0;
      if (b0 == 0xed) hi = 0x9f;
    } else if (b0 >= 0xf0 && b0 <= 0xf4) {
      len = 4;
      if (b0 == 0xf0) lo = 0x90;
      if (b0 == 0xf4) hi = 0x8f;
    } else {
      return false;  // 80..C1 (continuation or overlong lead), F5..FF.
    }
    if (static_cast<size_t>(end - p) < len) return false;
    if (p[1] < lo || p[1] > hi) return false;
    for (size_t i = 2; i < len; ++i) {
      if (p[i] < 0x80 || p[i] > 0xbf) return false;
    }
    p += len;
  }
  return true;
}

absl::Status ValidateEncryptionContext(const EncryptionContext& context) {
  // Limits first, so a huge context costs O(pairs) before any byte scan.
  size_t index = 0;
  size_t total = 0;
  for (const auto& [key, value] : context) {
    if (index == kMaxContextPairs) {
      return ContextError(
          absl::StrCat("more than ", kMaxContextPairs, " pairs (",
                       context.size(), "); first pair over the limit has key"),
          key);
    }
    ++index;
    total += key.size() + value.size();
    if (total > kMaxContextBytes) {
      return ContextError(absl::StrCat("more than ", kMaxContextBytes,
                                       " bytes of keys and values; limit "
                                       "passed at key"),
                          key);
    }
  }
  for (const auto& [key, value] : context) {
    if (key.empty()) return ContextError("empty key", key);
    if (key.find('\0') != std::string::npos) {
      return ContextError("NUL byte in key", key);
    }
    if (!IsValidUtf8(key)) return ContextError("invalid UTF-8 in key", key);
    if (value.find('\0') != std::string::npos) {
      return ContextError("NUL byte in the value of key", key);
    }
    if (!IsValidUtf8(value)) {
      return ContextError("invalid UTF-8 in the value of key", key);
    }
  }
  return absl::OkStatus();
}

std::string CanonicalEncryptionContext(const EncryptionContext& context) {
  size_t size = 4;
  for (const auto& [key, value] : context)
    size += 8 + key.size() + value.size();
  std::string out;
  out.reserve(size);
  AppendU32Be(out, static_cast<uint32_t>(context.size()));
  for (const auto& [key, value] : context) {
    AppendU32Be(out, static_cast<uint32_t>(key.size()));
    out.append(key);
    AppendU32Be(out, static_cast<uint32_t>(value.size()));
    out.append(value);
  }
  return out;
}

}  // namespace custos::kms
