// Envelope encryption of streams of any size (format 1).
//
// EncryptStream asks a DataKeySource for a fresh 32-byte data key, writes a
// self-describing header (which carries the data key wrapped by the KMS), and
// then the plaintext as AES-256-GCM chunks in the STREAM construction of
// Hoang, Reyhanitabar, Rogaway and Vizár ("Online Authenticated-Encryption and
// its Nonce-Reuse Misuse-Resistance", CRYPTO 2015): every chunk's nonce holds
// its position and whether it is the last, and every chunk's associated data
// is the whole header. Truncation, reordering, dropping or duplicating chunks,
// moving chunks between files, appending bytes and editing the header are all
// detected. DecryptStream streams too: it holds at most one chunk at a time
// and writes a chunk's plaintext only after that chunk's tag has verified.
//
// Layout (all integers big-endian; docs/envelope-format.md has the details,
// the reasoning and the golden vector):
//
//   offset  size  field
//   0       8     magic "CUSTOSE\0" (43 55 53 54 4f 53 45 00)
//   8       1     format version = 0x01
//   9       4     header length H: bytes from offset 0 to the end of the
//                 nonce prefix, 33 <= H <= kMaxHeaderSize
//   13      4     KMS blob length B, 1 <= B <= 8192
//   17      B     KMS ciphertext blob (docs/ciphertext-format.md), opaque here
//   17+B    4     encryption context pair count P, P <= 64
//           ...   P pairs, keys in strictly increasing bytewise order:
//                 u32 key length (>= 1), key, u32 value length, value;
//                 keys and values total at most 8192 bytes
//   H-11    4     chunk size C, 1024 <= C <= 16 MiB
//   H-7     7     nonce prefix, random per file
//   H       ...   chunks: every chunk but the last is C bytes of ciphertext
//                 followed by its 16-byte tag; the last holds 0..C bytes of
//                 ciphertext (0 only if it is the only chunk) and its tag.
//
//   nonce(i) = nonce prefix (7) || u32 i || u8 (0x01 if chunk i is the last,
//              else 0x00), i = 0, 1, ..., at most 2^32 - 1
//   AAD(i)   = header bytes [0, H)
//
// Every function here is thread-compatible: it keeps no state between calls
// and touches only its arguments. The DataKeySource decides its own thread
// safety. Streams must not have exceptions() enabled.
#ifndef CUSTOS_CLIENTS_CPP_ENVELOPE_H_
#define CUSTOS_CLIENTS_CPP_ENVELOPE_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <istream>
#include <map>
#include <ostream>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "clients/cpp/data_key_source.h"

namespace custos::client {

// The format's constants. They are part of the file format: never change them.
inline constexpr char kEnvelopeMagic[8] = {'C', 'U', 'S', 'T',
                                           'O', 'S', 'E', '\0'};
inline constexpr uint8_t kEnvelopeFormatVersion = 1;
inline constexpr size_t kEnvelopeDefaultChunkSize = 64 * 1024;
inline constexpr size_t kEnvelopeMinChunkSize = 1024;
inline constexpr size_t kEnvelopeMaxChunkSize = 16 * 1024 * 1024;
inline constexpr size_t kEnvelopeMaxKmsBlobSize = 8192;
inline constexpr size_t kEnvelopeMaxContextPairs = 64;
inline constexpr size_t kEnvelopeMaxContextBytes = 8192;
inline constexpr size_t kEnvelopeNoncePrefixSize = 7;
inline constexpr size_t kEnvelopeNonceSize = 12;
inline constexpr size_t kEnvelopeTagSize = 16;
inline constexpr size_t kEnvelopeDataKeySize = 32;
// magic, version, header length, blob length, one blob byte, pair count,
// chunk size, nonce prefix.
inline constexpr size_t kEnvelopeMinHeaderSize = 8 + 1 + 4 + 4 + 1 + 4 + 4 + 7;
inline constexpr size_t kEnvelopeMaxHeaderSize =
    8 + 1 + 4 + 4 + kEnvelopeMaxKmsBlobSize + 4 + kEnvelopeMaxContextPairs * 8 +
    kEnvelopeMaxContextBytes + 4 + kEnvelopeNoncePrefixSize;
// Chunk counters are u32: a stream has at most 2^32 chunks.
inline constexpr uint64_t kEnvelopeMaxChunks = uint64_t{1} << 32;

struct EnvelopeOptions {
  // Plaintext bytes per chunk, kEnvelopeMinChunkSize..kEnvelopeMaxChunkSize.
  // Used by EncryptStream only; DecryptStream takes it from the header.
  size_t chunk_size = kEnvelopeDefaultChunkSize;
  // If set, called after each chunk with the plaintext bytes processed so far
  // (encrypted, or decrypted, verified and written).
  std::function<void(uint64_t processed_bytes)> progress;
  // DecryptStream only: the key (id or alias) the file's data key must be
  // wrapped under; the KMS refuses any other (DecryptRequest.expected_key).
  // Empty: any key the caller may use. Without it, a file swapped for one
  // encrypted under another key the caller can use decrypts just as well.
  std::string expected_key;
};

// What a header says, for inspection (`custos envelope inspect`).
struct EnvelopeInfo {
  uint32_t format_version;
  std::string kms_blob;
  std::map<std::string, std::string> context;
  uint32_t chunk_size;
};

// Encrypts all of `in` (until EOF) to `out` under a fresh data key from
// `kms.GenerateDataKey(key, context)`. The data key is cleansed as soon as the
// cipher is keyed. Holds at most about two chunks in memory. Errors:
// INVALID_ARGUMENT for a bad chunk size or a context over the limits (checked
// before the KMS is called), the KMS's own error, INTERNAL for a read or write
// failure or a data key that is not 32 bytes. On error, `out` holds a partial
// envelope that the caller must discard.
absl::Status EncryptStream(DataKeySource& kms, const std::string& key,
                           const std::map<std::string, std::string>& context,
                           std::istream& in, std::ostream& out,
                           const EnvelopeOptions& options = {});

// Decrypts an envelope from `in` to `out`, reading one chunk (chunk size + 16
// bytes) at a time plus one byte of lookahead. Each chunk's plaintext is
// written only after its tag verified, and every plaintext buffer is cleansed
// after use. If `expected_context` is not null, the header's context must
// equal it exactly, checked before the KMS is called. If
// `options.expected_key` is set, the data key must be wrapped under that key.
//
// Errors: INVALID_ARGUMENT "invalid envelope: <what>" for a malformed or
// tampered envelope ("invalid envelope: chunk N failed authentication" for a
// chunk whose tag does not verify, which is also how truncation, reordering
// and spliced chunks show), INVALID_ARGUMENT for a context that is not the
// expected one, INVALID_ARGUMENT "envelope is not wrapped under the
// expected key ..." when the KMS refuses the data key with an expected key
// given (another key's file, or an edited blob), the KMS's own error when the
// data key does not unwrap (INVALID_ARGUMENT "invalid ciphertext" from Custos
// for an edited blob or context), INTERNAL for a read or write failure.
//
// On any error, `out` may already hold the plaintext of the chunks before the
// failing one. Each of them verified, but together they are NOT the file's
// plaintext: a truncated or spliced file looks valid up to the point where it
// breaks. The caller must discard the output (write to a temporary file and
// rename it only on success, as the CLI does).
absl::Status DecryptStream(
    DataKeySource& kms, std::istream& in, std::ostream& out,
    const std::map<std::string, std::string>* expected_context = nullptr,
    const EnvelopeOptions& options = {});

// Reads and validates the header (leaving `in` at the first chunk) without
// calling the KMS or checking any chunk. The header is authenticated only by
// decryption: treat what this returns as a claim.
absl::StatusOr<EnvelopeInfo> ReadEnvelopeHeader(std::istream& in);

namespace envelope_internal {

// nonce prefix || u32be counter || last flag. OUT_OF_RANGE if `counter` does
// not fit in 32 bits. Exposed for tests.
absl::StatusOr<std::array<uint8_t, kEnvelopeNonceSize>> ChunkNonce(
    absl::string_view nonce_prefix, uint64_t counter, bool last);

}  // namespace envelope_internal
}  // namespace custos::client

#endif  // CUSTOS_CLIENTS_CPP_ENVELOPE_H_
