#include "clients/cpp/envelope.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/secret_bytes.h"
#include "common/status_macros.h"

namespace custos::client {
namespace {

// magic (8) + version (1) + header length (4): read before the rest.
constexpr size_t kFixedPrefixSize = 13;

struct CipherCtxDeleter {
  // EVP_CIPHER_CTX_free clears the key schedule.
  void operator()(EVP_CIPHER_CTX* ctx) const { EVP_CIPHER_CTX_free(ctx); }
};
using CipherCtxPtr = std::unique_ptr<EVP_CIPHER_CTX, CipherCtxDeleter>;

absl::Status InvalidEnvelope(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("invalid envelope: ", what));
}

void PutU32(std::string& out, uint32_t v) {
  const char bytes[4] = {static_cast<char>(v >> 24), static_cast<char>(v >> 16),
                         static_cast<char>(v >> 8), static_cast<char>(v)};
  out.append(bytes, 4);
}

uint32_t GetU32(const char* p) {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return (uint32_t{u[0]} << 24) | (uint32_t{u[1]} << 16) |
         (uint32_t{u[2]} << 8) | uint32_t{u[3]};
}

// Bounds-checked cursor over the header bytes.
class Cursor {
 public:
  explicit Cursor(absl::string_view bytes) : rest_(bytes) {}
  bool ReadU32(uint32_t* v) {
    if (rest_.size() < 4) return false;
    *v = GetU32(rest_.data());
    rest_.remove_prefix(4);
    return true;
  }
  bool ReadBytes(size_t n, absl::string_view* v) {
    if (rest_.size() < n) return false;
    *v = rest_.substr(0, n);
    rest_.remove_prefix(n);
    return true;
  }
  size_t remaining() const { return rest_.size(); }

 private:
  absl::string_view rest_;
};

// A header as read from a file: its fields, and its exact bytes (the AAD).
struct ParsedHeader {
  EnvelopeInfo info;
  std::string nonce_prefix;
  std::string bytes;
};

absl::Status ValidateChunkSize(size_t chunk_size) {
  if (chunk_size < kEnvelopeMinChunkSize ||
      chunk_size > kEnvelopeMaxChunkSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk_size must be between ", kEnvelopeMinChunkSize,
                     " and ", kEnvelopeMaxChunkSize, " bytes"));
  }
  return absl::OkStatus();
}

// The caps the parser enforces, applied before encrypting so that
// EncryptStream never writes a file DecryptStream refuses. (std::map orders
// std::string keys bytewise, unsigned, which is the canonical order.)
absl::Status ValidateContext(
    const std::map<std::string, std::string>& context) {
  if (context.size() > kEnvelopeMaxContextPairs) {
    return absl::InvalidArgumentError(absl::StrCat(
        "encryption_context: more than ", kEnvelopeMaxContextPairs, " pairs"));
  }
  size_t total = 0;
  for (const auto& [k, v] : context) {
    if (k.empty()) {
      return absl::InvalidArgumentError("encryption_context: empty key");
    }
    total += k.size() + v.size();
  }
  if (total > kEnvelopeMaxContextBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "encryption_context: more than ", kEnvelopeMaxContextBytes, " bytes"));
  }
  return absl::OkStatus();
}

std::string EncodeHeader(absl::string_view kms_blob,
                         const std::map<std::string, std::string>& context,
                         uint32_t chunk_size, absl::string_view nonce_prefix) {
  std::string body;
  PutU32(body, static_cast<uint32_t>(kms_blob.size()));
  body.append(kms_blob.data(), kms_blob.size());
  PutU32(body, static_cast<uint32_t>(context.size()));
  for (const auto& [k, v] : context) {
    PutU32(body, static_cast<uint32_t>(k.size()));
    body.append(k);
    PutU32(body, static_cast<uint32_t>(v.size()));
    body.append(v);
  }
  PutU32(body, chunk_size);
  body.append(nonce_prefix.data(), nonce_prefix.size());

  std::string header(kEnvelopeMagic, sizeof(kEnvelopeMagic));
  header.push_back(static_cast<char>(kEnvelopeFormatVersion));
  PutU32(header, static_cast<uint32_t>(kFixedPrefixSize + body.size()));
  header.append(body);
  return header;
}

// Reads exactly `n` bytes. False on a short read; INTERNAL on a stream error.
absl::StatusOr<bool> ReadExactly(std::istream& in, char* buf, size_t n) {
  in.read(buf, static_cast<std::streamsize>(n));
  if (in.bad()) return absl::InternalError("envelope: error reading input");
  return static_cast<size_t>(in.gcount()) == n;
}

absl::StatusOr<ParsedHeader> ReadHeader(std::istream& in) {
  ParsedHeader h;
  h.bytes.resize(kFixedPrefixSize);
  CUSTOS_ASSIGN_OR_RETURN(bool complete,
                          ReadExactly(in, h.bytes.data(), kFixedPrefixSize));
  if (!complete) return InvalidEnvelope("truncated header");
  if (std::memcmp(h.bytes.data(), kEnvelopeMagic, sizeof(kEnvelopeMagic)) !=
      0) {
    return InvalidEnvelope("bad magic");
  }
  const uint8_t version = static_cast<uint8_t>(h.bytes[8]);
  if (version != kEnvelopeFormatVersion) {
    return InvalidEnvelope(
        absl::StrCat("unsupported format version ", version));
  }
  const uint32_t header_size = GetU32(h.bytes.data() + 9);
  if (header_size < kEnvelopeMinHeaderSize ||
      header_size > kEnvelopeMaxHeaderSize) {
    return InvalidEnvelope("header length out of range");
  }
  h.bytes.resize(header_size);
  CUSTOS_ASSIGN_OR_RETURN(complete,
                          ReadExactly(in, h.bytes.data() + kFixedPrefixSize,
                                      header_size - kFixedPrefixSize));
  if (!complete) return InvalidEnvelope("truncated header");

  Cursor c(absl::string_view(h.bytes).substr(kFixedPrefixSize));
  h.info.format_version = version;
  uint32_t blob_size = 0;
  absl::string_view blob;
  if (!c.ReadU32(&blob_size) || blob_size == 0 ||
      blob_size > kEnvelopeMaxKmsBlobSize || !c.ReadBytes(blob_size, &blob)) {
    return InvalidEnvelope("bad KMS blob length");
  }
  h.info.kms_blob = std::string(blob);

  uint32_t pairs = 0;
  if (!c.ReadU32(&pairs) || pairs > kEnvelopeMaxContextPairs) {
    return InvalidEnvelope("bad encryption context pair count");
  }
  size_t context_bytes = 0;
  absl::string_view previous_key;
  for (uint32_t i = 0; i < pairs; ++i) {
    uint32_t key_size = 0, value_size = 0;
    absl::string_view key, value;
    if (!c.ReadU32(&key_size) || key_size > kEnvelopeMaxContextBytes ||
        !c.ReadBytes(key_size, &key) || !c.ReadU32(&value_size) ||
        value_size > kEnvelopeMaxContextBytes ||
        !c.ReadBytes(value_size, &value)) {
      return InvalidEnvelope("malformed encryption context");
    }
    context_bytes += key_size + value_size;
    if (context_bytes > kEnvelopeMaxContextBytes) {
      return InvalidEnvelope("encryption context too large");
    }
    // Strictly increasing keys: canonical order, no empty key, no duplicate.
    // (absl::string_view compares bytewise as unsigned char.)
    if (key.empty() || (i > 0 && !(previous_key < key))) {
      return InvalidEnvelope("encryption context not in canonical form");
    }
    previous_key = key;
    h.info.context.emplace(std::string(key), std::string(value));
  }

  uint32_t chunk_size = 0;
  if (!c.ReadU32(&chunk_size)) return InvalidEnvelope("truncated header");
  if (!ValidateChunkSize(chunk_size).ok()) {
    return InvalidEnvelope("chunk size out of range");
  }
  h.info.chunk_size = chunk_size;
  absl::string_view prefix;
  if (!c.ReadBytes(kEnvelopeNoncePrefixSize, &prefix)) {
    return InvalidEnvelope("truncated header");
  }
  h.nonce_prefix = std::string(prefix);
  if (c.remaining() != 0) return InvalidEnvelope("header length mismatch");
  return h;
}

absl::Status WriteBytes(std::ostream& out, const void* data, size_t n) {
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
  if (!out) return absl::InternalError("envelope: error writing output");
  return absl::OkStatus();
}

// A keyed AES-256-GCM context; each chunk re-initialises only the IV, so the
// key schedule is computed once per stream.
absl::StatusOr<CipherCtxPtr> NewGcm(const SecretBytes& key, bool encrypt) {
  if (key.size() != kEnvelopeDataKeySize) {
    return absl::InternalError("envelope: data key is not 32 bytes");
  }
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  if (ctx == nullptr ||
      EVP_CipherInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, key.data(),
                        nullptr, encrypt ? 1 : 0) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN,
                          static_cast<int>(kEnvelopeNonceSize), nullptr) != 1) {
    return absl::InternalError("envelope: cannot set up AES-256-GCM");
  }
  return ctx;
}

// Encrypts `n` bytes of `plaintext` into `out` (n + 16 bytes: ciphertext,
// tag).
absl::Status SealChunk(EVP_CIPHER_CTX* ctx, const uint8_t* nonce,
                       absl::string_view aad, const uint8_t* plaintext,
                       size_t n, uint8_t* out) {
  int len = 0;
  if (EVP_EncryptInit_ex(ctx, nullptr, nullptr, nullptr, nonce) != 1 ||
      EVP_EncryptUpdate(ctx, nullptr, &len,
                        reinterpret_cast<const uint8_t*>(aad.data()),
                        static_cast<int>(aad.size())) != 1 ||
      (n > 0 && EVP_EncryptUpdate(ctx, out, &len, plaintext,
                                  static_cast<int>(n)) != 1) ||
      EVP_EncryptFinal_ex(ctx, out + n, &len) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG,
                          static_cast<int>(kEnvelopeTagSize), out + n) != 1) {
    return absl::InternalError("envelope: AES-256-GCM encryption failed");
  }
  return absl::OkStatus();
}

// Decrypts `record` (ciphertext || tag, at least 16 bytes) into `plaintext`.
// False if the tag does not verify; `plaintext` then holds unverified bytes
// that the caller must cleanse and never release.
bool OpenChunk(EVP_CIPHER_CTX* ctx, const uint8_t* nonce, absl::string_view aad,
               uint8_t* record, size_t record_size, uint8_t* plaintext) {
  const size_t n = record_size - kEnvelopeTagSize;
  int len = 0;
  return EVP_DecryptInit_ex(ctx, nullptr, nullptr, nullptr, nonce) == 1 &&
         EVP_DecryptUpdate(ctx, nullptr, &len,
                           reinterpret_cast<const uint8_t*>(aad.data()),
                           static_cast<int>(aad.size())) == 1 &&
         (n == 0 || EVP_DecryptUpdate(ctx, plaintext, &len, record,
                                      static_cast<int>(n)) == 1) &&
         EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG,
                             static_cast<int>(kEnvelopeTagSize),
                             record + n) == 1 &&
         EVP_DecryptFinal_ex(ctx, plaintext + n, &len) == 1;
}

// True if `in` has no more bytes. One byte of lookahead, so a chunk can be
// known to be the last one before it is decrypted.
bool AtEof(std::istream& in) {
  return in.peek() == std::istream::traits_type::eof();
}

}  // namespace

namespace envelope_internal {

absl::StatusOr<std::array<uint8_t, kEnvelopeNonceSize>> ChunkNonce(
    absl::string_view nonce_prefix, uint64_t counter, bool last) {
  if (nonce_prefix.size() != kEnvelopeNoncePrefixSize) {
    return absl::InternalError("envelope: nonce prefix is not 7 bytes");
  }
  if (counter >= kEnvelopeMaxChunks) {
    return absl::OutOfRangeError("envelope: chunk counter overflow");
  }
  std::array<uint8_t, kEnvelopeNonceSize> nonce;
  std::memcpy(nonce.data(), nonce_prefix.data(), kEnvelopeNoncePrefixSize);
  nonce[7] = static_cast<uint8_t>(counter >> 24);
  nonce[8] = static_cast<uint8_t>(counter >> 16);
  nonce[9] = static_cast<uint8_t>(counter >> 8);
  nonce[10] = static_cast<uint8_t>(counter);
  nonce[11] = last ? 0x01 : 0x00;
  return nonce;
}

}  // namespace envelope_internal

absl::Status EncryptStream(DataKeySource& kms, const std::string& key,
                           const std::map<std::string, std::string>& context,
                           std::istream& in, std::ostream& out,
                           const EnvelopeOptions& options) {
  CUSTOS_RETURN_IF_ERROR(ValidateChunkSize(options.chunk_size));
  CUSTOS_RETURN_IF_ERROR(ValidateContext(context));
  const size_t chunk_size = options.chunk_size;

  CUSTOS_ASSIGN_OR_RETURN(DataKeySource::DataKey data_key,
                          kms.GenerateDataKey(key, context));
  if (data_key.blob.empty() || data_key.blob.size() > kEnvelopeMaxKmsBlobSize) {
    return absl::InternalError("envelope: KMS blob size out of range");
  }
  CUSTOS_ASSIGN_OR_RETURN(CipherCtxPtr ctx,
                          NewGcm(data_key.plaintext, /*encrypt=*/true));
  // The context holds the key schedule now; the raw key is not needed.
  data_key.plaintext = SecretBytes();

  std::string nonce_prefix(kEnvelopeNoncePrefixSize, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(nonce_prefix.data()),
                 static_cast<int>(nonce_prefix.size())) != 1) {
    return absl::InternalError("envelope: RAND_bytes failed");
  }
  const std::string header = EncodeHeader(
      data_key.blob, context, static_cast<uint32_t>(chunk_size), nonce_prefix);
  CUSTOS_RETURN_IF_ERROR(WriteBytes(out, header.data(), header.size()));

  SecretBytes plaintext(chunk_size);  // cleansed after every chunk
  std::string record(chunk_size + kEnvelopeTagSize, '\0');
  uint64_t processed = 0;
  for (uint64_t counter = 0;; ++counter) {
    absl::StatusOr<bool> full =
        ReadExactly(in, reinterpret_cast<char*>(plaintext.data()), chunk_size);
    if (!full.ok()) {
      OPENSSL_cleanse(plaintext.data(), chunk_size);
      return full.status();
    }
    const size_t n = static_cast<size_t>(in.gcount());
    // A full chunk is the last one only if the input ends right after it, so
    // a plaintext that is a multiple of the chunk size gets no empty chunk.
    const bool last = !*full || AtEof(in);
    if (in.bad()) {
      OPENSSL_cleanse(plaintext.data(), n);
      return absl::InternalError("envelope: error reading input");
    }
    absl::StatusOr<std::array<uint8_t, kEnvelopeNonceSize>> nonce =
        envelope_internal::ChunkNonce(nonce_prefix, counter, last);
    if (!nonce.ok()) {
      OPENSSL_cleanse(plaintext.data(), n);
      return absl::InvalidArgumentError(absl::StrCat(
          "input too large: at most 2^32 chunks of ", chunk_size, " bytes"));
    }
    absl::Status sealed =
        SealChunk(ctx.get(), nonce->data(), header, plaintext.data(), n,
                  reinterpret_cast<uint8_t*>(record.data()));
    OPENSSL_cleanse(plaintext.data(), n);
    CUSTOS_RETURN_IF_ERROR(sealed);
    CUSTOS_RETURN_IF_ERROR(
        WriteBytes(out, record.data(), n + kEnvelopeTagSize));
    processed += n;
    if (options.progress) options.progress(processed);
    if (last) break;
  }
  out.flush();
  if (!out) return absl::InternalError("envelope: error writing output");
  return absl::OkStatus();
}

absl::Status DecryptStream(
    DataKeySource& kms, std::istream& in, std::ostream& out,
    const std::map<std::string, std::string>* expected_context,
    const EnvelopeOptions& options) {
  CUSTOS_ASSIGN_OR_RETURN(ParsedHeader header, ReadHeader(in));
  if (expected_context != nullptr && *expected_context != header.info.context) {
    return absl::InvalidArgumentError(
        "envelope encryption context does not match the expected context");
  }
  absl::StatusOr<SecretBytes> unwrapped = kms.DecryptDataKey(
      header.info.kms_blob, header.info.context, options.expected_key);
  if (!unwrapped.ok()) {
    // The KMS answers another key's blob as an invalid one (it tells no
    // one which key a blob is under); say what was asked for.
    if (!options.expected_key.empty() &&
        absl::IsInvalidArgument(unwrapped.status())) {
      constexpr size_t kMaxKeyName = 256;
      return absl::InvalidArgumentError(absl::StrCat(
          "envelope is not wrapped under the expected key '",
          absl::string_view(options.expected_key).substr(0, kMaxKeyName),
          "' (it belongs to another key, or its wrapped data key was "
          "altered): ",
          unwrapped.status().message()));
    }
    return unwrapped.status();
  }
  SecretBytes data_key = *std::move(unwrapped);
  if (data_key.size() != kEnvelopeDataKeySize) {
    return InvalidEnvelope("data key is not 32 bytes");
  }
  CUSTOS_ASSIGN_OR_RETURN(CipherCtxPtr ctx,
                          NewGcm(data_key, /*encrypt=*/false));
  data_key = SecretBytes();

  const size_t chunk_size = header.info.chunk_size;
  const size_t record_size = chunk_size + kEnvelopeTagSize;
  std::string record(record_size, '\0');
  SecretBytes plaintext(chunk_size);  // cleansed after every chunk
  uint64_t processed = 0;
  for (uint64_t counter = 0;; ++counter) {
    CUSTOS_ASSIGN_OR_RETURN(bool full,
                            ReadExactly(in, record.data(), record_size));
    const size_t n = static_cast<size_t>(in.gcount());
    const bool last = !full || AtEof(in);
    if (in.bad()) return absl::InternalError("envelope: error reading input");
    if (n == 0) return InvalidEnvelope("no chunks");
    if (n < kEnvelopeTagSize) {
      return InvalidEnvelope(absl::StrCat("chunk ", counter, " is truncated"));
    }
    if (n == kEnvelopeTagSize && counter > 0) {
      // The encryptor puts an empty chunk only in an empty file.
      return InvalidEnvelope(absl::StrCat("chunk ", counter, " is empty"));
    }
    absl::StatusOr<std::array<uint8_t, kEnvelopeNonceSize>> nonce =
        envelope_internal::ChunkNonce(header.nonce_prefix, counter, last);
    if (!nonce.ok()) return InvalidEnvelope("too many chunks");
    const size_t plaintext_size = n - kEnvelopeTagSize;
    if (!OpenChunk(ctx.get(), nonce->data(), header.bytes,
                   reinterpret_cast<uint8_t*>(record.data()), n,
                   plaintext.data())) {
      OPENSSL_cleanse(plaintext.data(), plaintext_size);
      return InvalidEnvelope(
          absl::StrCat("chunk ", counter, " failed authentication"));
    }
    absl::Status written = WriteBytes(out, plaintext.data(), plaintext_size);
    OPENSSL_cleanse(plaintext.data(), plaintext_size);
    CUSTOS_RETURN_IF_ERROR(written);
    processed += plaintext_size;
    if (options.progress) options.progress(processed);
    if (last) break;
  }
  out.flush();
  if (!out) return absl::InternalError("envelope: error writing output");
  return absl::OkStatus();
}

absl::StatusOr<EnvelopeInfo> ReadEnvelopeHeader(std::istream& in) {
  CUSTOS_ASSIGN_OR_RETURN(ParsedHeader header, ReadHeader(in));
  return std::move(header.info);
}

}  // namespace custos::client
