// Fuzzes the ciphertext blob parser (kms/ciphertext_blob.h) with the input as
// the blob bytes. Checks that:
//  - ParseBlob accepts exactly the blobs the v1 layout in the header allows
//    (an independent reading of that table decides), and refuses every other
//    one with exactly InvalidCiphertext(), so a client learns nothing;
//  - a parsed blob has every field in range, and re-encoding its header and
//    re-assembling it gives back the input byte for byte (nothing dropped,
//    nothing invented), which parses to the same fields;
//  - EncodeBlobHeader, fed the key id and version bytes of the input, refuses
//    what ParseBlob would refuse and otherwise round-trips.
// Seeds: the blobs of tests/testdata/ciphertext_v1_vectors.json.
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kms/ciphertext_blob.h"
#include "kms/encryption_context.h"
#include "tests/fuzz/fuzz_check.h"

namespace custos::kms {
namespace {

uint32_t U32At(absl::string_view b, size_t at) {
  return (uint32_t{static_cast<uint8_t>(b[at])} << 24) |
         (uint32_t{static_cast<uint8_t>(b[at + 1])} << 16) |
         (uint32_t{static_cast<uint8_t>(b[at + 2])} << 8) |
         uint32_t{static_cast<uint8_t>(b[at + 3])};
}

// The v1 layout of kms/ciphertext_blob.h, read independently of ParseBlob.
bool SpecAccepts(absl::string_view b) {
  if (b.size() < 62 || b.size() > 62 + 4096) return false;
  if (b[0] != 0x01 || b[1] != 28) return false;
  if (b[2] != 'k' || b[3] != '-') return false;
  for (size_t i = 4; i < 30; ++i) {
    const char c = b[i];
    const bool base32 = (c >= 'a' && c <= 'z') || (c >= '2' && c <= '7');
    if (!base32) return false;
  }
  return U32At(b, 30) != 0;
}

void CheckParse(absl::string_view blob) {
  const absl::StatusOr<ParsedBlob> parsed = ParseBlob(blob);
  CUSTOS_FUZZ_CHECK(parsed.ok() == SpecAccepts(blob),
                    "ParseBlob disagrees with the documented v1 layout");
  if (!parsed.ok()) {
    CUSTOS_FUZZ_CHECK(parsed.status() == InvalidCiphertext(),
                      "a refused blob must get the one uniform error");
    return;
  }
  const ParsedBlob& p = *parsed;
  CUSTOS_FUZZ_CHECK(blob.size() >= kMinBlobSize && blob.size() <= kMaxBlobSize,
                    "accepted a blob outside the size caps");
  CUSTOS_FUZZ_CHECK(IsValidKeyId(p.header.key_id), "key id out of charset");
  CUSTOS_FUZZ_CHECK(p.header.key_id == blob.substr(2, kKeyIdSize),
                    "key id is not the bytes at offset 2");
  CUSTOS_FUZZ_CHECK(p.header.version >= 1, "version 0 accepted");
  CUSTOS_FUZZ_CHECK(p.header.version == U32At(blob, 2 + kKeyIdSize),
                    "version is not the big-endian u32 at offset 30");
  CUSTOS_FUZZ_CHECK(p.header_bytes.size() == kBlobHeaderSize,
                    "header bytes size");
  CUSTOS_FUZZ_CHECK(p.iv.size() == kBlobIvSize, "IV size");
  CUSTOS_FUZZ_CHECK(p.ciphertext.size() >= kBlobTagSize &&
                        p.ciphertext.size() <= kMaxBlobPlaintext + kBlobTagSize,
                    "ciphertext || tag size out of range");

  // Parse -> encode -> assemble gives the input back, and parses the same.
  const absl::StatusOr<std::string> header = EncodeBlobHeader(p.header);
  CUSTOS_FUZZ_CHECK(header.ok(), "a parsed header does not re-encode");
  CUSTOS_FUZZ_CHECK(*header == p.header_bytes, "header re-encodes differently");
  const std::string again = AssembleBlob(*header, p.iv, p.ciphertext);
  CUSTOS_FUZZ_CHECK(again == blob, "re-assembled blob differs from the input");
  const absl::StatusOr<ParsedBlob> reparsed = ParseBlob(again);
  CUSTOS_FUZZ_CHECK(
      reparsed.ok() && reparsed->header.key_id == p.header.key_id &&
          reparsed->header.version == p.header.version &&
          reparsed->header_bytes == p.header_bytes && reparsed->iv == p.iv &&
          reparsed->ciphertext == p.ciphertext,
      "re-parse of the re-assembled blob differs");

  // The AAD is the header followed by the canonical context; an empty
  // context encodes as four zero bytes.
  CUSTOS_FUZZ_CHECK(
      BlobAad(p.header_bytes, {}) == p.header_bytes + std::string(4, '\0'),
      "AAD of the empty context");
}

// The key id and version taken from where a blob holds them (whatever the
// rest of the input is): the encoder must refuse exactly what the parser
// refuses, and its output must parse back.
void CheckEncode(absl::string_view input) {
  if (input.size() < kBlobHeaderSize) return;
  BlobHeader header;
  header.key_id = std::string(input.substr(2, kKeyIdSize));
  header.version = U32At(input, 2 + kKeyIdSize);
  const absl::StatusOr<std::string> encoded = EncodeBlobHeader(header);
  const bool valid = IsValidKeyId(header.key_id) && header.version != 0;
  CUSTOS_FUZZ_CHECK(encoded.ok() == valid,
                    "EncodeBlobHeader accepts what it should refuse, or the "
                    "reverse");
  if (!encoded.ok()) {
    CUSTOS_FUZZ_CHECK(
        encoded.status().code() == absl::StatusCode::kInvalidArgument,
        "EncodeBlobHeader error code");
    return;
  }
  CUSTOS_FUZZ_CHECK(encoded->size() == kBlobHeaderSize, "header size");
  const std::string blob = AssembleBlob(*encoded, std::string(kBlobIvSize, 'i'),
                                        std::string(kBlobTagSize, 't'));
  const absl::StatusOr<ParsedBlob> parsed = ParseBlob(blob);
  CUSTOS_FUZZ_CHECK(parsed.ok() && parsed->header.key_id == header.key_id &&
                        parsed->header.version == header.version,
                    "an encoded header does not parse back to itself");
}

}  // namespace
}  // namespace custos::kms

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view input(reinterpret_cast<const char*>(data), size);
  custos::kms::CheckParse(input);
  custos::kms::CheckEncode(input);
  return 0;
}
