// The ciphertext blob: the versioned, self-describing wire format of every
// Custos ciphertext (wrapped data keys from GenerateDataKey, and Encrypt of
// small payloads). It names the key and version that opened it, so Decrypt
// needs no key id. Specified with test vectors in docs/ciphertext-format.md;
// tests/testdata/ciphertext_v1_vectors.json pins it and must decrypt forever.
//
// Format v1, all integers big-endian (L = kKeyIdSize = 28, n = ciphertext
// size, 0 <= n <= kMaxBlobPlaintext):
//
//   offset  size  field
//   0       1     format = 0x01 (kBlobFormatV1)
//   1       1     key id length L (must be 28)
//   2       L     key id, ASCII: "k-" + 26 chars of lowercase RFC 4648
//                 base32 (a-z, 2-7)
//   2+L     4     key version, u32 big-endian, >= 1
//   6+L     12    IV (96-bit, from the HSM RNG)
//   18+L    n     AES-256-GCM ciphertext
//   18+L+n  16    GCM tag
//
// The header is bytes [0, 6+L). The GCM AAD is
//   header bytes || CanonicalEncryptionContext(context)
// so a blob cannot be moved to another key, version or context.
//
// Blob size is therefore between kMinBlobSize (62) and kMaxBlobSize (4158).
// A trailing byte cannot be told apart from a longer ciphertext, so it fails
// the tag check (or the size cap); it is never silently ignored.
//
// Errors: ParseBlob answers every malformed blob with exactly
// InvalidCiphertext(), and callers answer a failed tag check the same way, so
// a client learns nothing about why a blob did not open (no oracle).
//
// All functions here are thread-safe. This layer does no cryptography beyond
// drawing key ids; the AES-GCM calls happen in the HSM.
#ifndef CUSTOS_KMS_CIPHERTEXT_BLOB_H_
#define CUSTOS_KMS_CIPHERTEXT_BLOB_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kms/encryption_context.h"

namespace custos::kms {

inline constexpr uint8_t kBlobFormatV1 = 0x01;
inline constexpr size_t kKeyIdSize = 28;
inline constexpr size_t kBlobIvSize = 12, kBlobTagSize = 16;
inline constexpr size_t kMaxBlobPlaintext = 4096;
// Format byte, key id length byte, key id, version.
inline constexpr size_t kBlobHeaderSize = 1 + 1 + kKeyIdSize + 4;
inline constexpr size_t kMinBlobSize =
    kBlobHeaderSize + kBlobIvSize + kBlobTagSize;
inline constexpr size_t kMaxBlobSize = kMinBlobSize + kMaxBlobPlaintext;

struct BlobHeader {
  std::string key_id;
  uint32_t version = 0;
};

// A structurally valid blob, split into its parts. Nothing here is
// authenticated until the GCM tag has been checked with BlobAad().
struct ParsedBlob {
  BlobHeader header;
  std::string header_bytes;  // bytes [0, kBlobHeaderSize) of the blob
  std::string iv;            // kBlobIvSize bytes
  std::string ciphertext;    // ciphertext || tag, at least kBlobTagSize bytes
};

// The one error for every blob that does not open:
// INVALID_ARGUMENT "invalid ciphertext".
absl::Status InvalidCiphertext();

// True if `id` is "k-" followed by 26 characters of lowercase base32 (a-z,
// 2-7): exactly kKeyIdSize bytes.
bool IsValidKeyId(absl::string_view id);

// A fresh key id: "k-" + 26 base32 characters, 130 bits from OpenSSL's
// RAND_bytes. Aborts the process if the RNG fails: there is no safe fallback.
std::string NewKeyId();

// The kBlobHeaderSize header bytes. INVALID_ARGUMENT on a malformed key id or
// version 0.
absl::StatusOr<std::string> EncodeBlobHeader(const BlobHeader& header);

// The GCM AAD: `header_bytes` followed by the canonical encoding of `context`.
std::string BlobAad(absl::string_view header_bytes,
                    const EncryptionContext& context);

// header_bytes || iv || ciphertext_and_tag. The caller passes parts it
// produced (EncodeBlobHeader, a 12-byte IV, the HSM's output); no checks.
std::string AssembleBlob(absl::string_view header_bytes, absl::string_view iv,
                         absl::string_view ciphertext_and_tag);

// Splits a blob after checking its size caps, format byte, key id length and
// charset, and version. Every failure is exactly InvalidCiphertext().
absl::StatusOr<ParsedBlob> ParseBlob(absl::string_view blob);

}  // namespace custos::kms

#endif  // CUSTOS_KMS_CIPHERTEXT_BLOB_H_
