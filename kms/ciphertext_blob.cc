#include "kms/ciphertext_blob.h"

#include <openssl/rand.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace custos::kms {
namespace {

constexpr absl::string_view kKeyIdPrefix = "k-";
constexpr size_t kKeyIdRandomChars = kKeyIdSize - kKeyIdPrefix.size();  // 26
constexpr char kBase32[] = "abcdefghijklmnopqrstuvwxyz234567";  // RFC 4648
constexpr size_t kVersionOffset = 2 + kKeyIdSize;
constexpr size_t kIvOffset = kBlobHeaderSize;
constexpr size_t kCiphertextOffset = kIvOffset + kBlobIvSize;

static_assert(kKeyIdRandomChars == 26);
static_assert(kMinBlobSize == 18 + 28 + 16);
static_assert(kMaxBlobSize == 18 + 28 + 4096 + 16);

bool IsBase32Char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= '2' && c <= '7');
}

uint32_t ReadU32Be(absl::string_view b) {
  return (uint32_t{static_cast<uint8_t>(b[0])} << 24) |
         (uint32_t{static_cast<uint8_t>(b[1])} << 16) |
         (uint32_t{static_cast<uint8_t>(b[2])} << 8) |
         uint32_t{static_cast<uint8_t>(b[3])};
}

}  // namespace

absl::Status InvalidCiphertext() {
  return absl::InvalidArgumentError("invalid ciphertext");
}

bool IsValidKeyId(absl::string_view id) {
  if (id.size() != kKeyIdSize || id.substr(0, 2) != kKeyIdPrefix) return false;
  for (const char c : id.substr(kKeyIdPrefix.size())) {
    if (!IsBase32Char(c)) return false;
  }
  return true;
}

std::string NewKeyId() {
  // 26 characters x 5 bits = 130 bits, drawn from 17 random bytes.
  uint8_t random[17];
  if (RAND_bytes(random, sizeof(random)) != 1) {
    std::fputs("custos: RAND_bytes failed drawing a key id\n", stderr);
    std::abort();
  }
  std::string id(kKeyIdPrefix);
  id.reserve(kKeyIdSize);
  uint32_t acc = 0;
  int bits = 0;
  size_t next = 0;
  for (size_t i = 0; i < kKeyIdRandomChars; ++i) {
    if (bits < 5) {
      acc = (acc << 8) | random[next++];
      bits += 8;
    }
    bits -= 5;
    id.push_back(kBase32[(acc >> bits) & 0x1f]);
  }
  return id;
}

absl::StatusOr<std::string> EncodeBlobHeader(const BlobHeader& header) {
  if (!IsValidKeyId(header.key_id)) {
    return absl::InvalidArgumentError(
        "blob header: key id is not \"k-\" + 26 lowercase base32 characters");
  }
  if (header.version == 0) {
    return absl::InvalidArgumentError("blob header: key version must be >= 1");
  }
  std::string out;
  out.reserve(kBlobHeaderSize);
  out.push_back(static_cast<char>(kBlobFormatV1));
  out.push_back(static_cast<char>(kKeyIdSize));
  out.append(header.key_id);
  out.push_back(static_cast<char>(header.version >> 24));
  out.push_back(static_cast<char>(header.version >> 16));
  out.push_back(static_cast<char>(header.version >> 8));
  out.push_back(static_cast<char>(header.version));
  return out;
}

std::string BlobAad(absl::string_view header_bytes,
                    const EncryptionContext& context) {
  return absl::StrCat(header_bytes, CanonicalEncryptionContext(context));
}

std::string AssembleBlob(absl::string_view header_bytes, absl::string_view iv,
                         absl::string_view ciphertext_and_tag) {
  return absl::StrCat(header_bytes, iv, ciphertext_and_tag);
}

absl::StatusOr<ParsedBlob> ParseBlob(absl::string_view blob) {
  // The size caps come first, so every later read is in bounds.
  if (blob.size() < kMinBlobSize || blob.size() > kMaxBlobSize) {
    return InvalidCiphertext();
  }
  if (static_cast<uint8_t>(blob[0]) != kBlobFormatV1) {
    return InvalidCiphertext();
  }
  if (static_cast<uint8_t>(blob[1]) != kKeyIdSize) return InvalidCiphertext();
  const absl::string_view key_id = blob.substr(2, kKeyIdSize);
  if (!IsValidKeyId(key_id)) return InvalidCiphertext();
  const uint32_t version = ReadU32Be(blob.substr(kVersionOffset, 4));
  if (version == 0) return InvalidCiphertext();

  ParsedBlob parsed;
  parsed.header.key_id = std::string(key_id);
  parsed.header.version = version;
  parsed.header_bytes = std::string(blob.substr(0, kBlobHeaderSize));
  parsed.iv = std::string(blob.substr(kIvOffset, kBlobIvSize));
  parsed.ciphertext = std::string(blob.substr(kCiphertextOffset));
  return parsed;
}

}  // namespace custos::kms
