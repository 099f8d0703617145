// Fuzzes the envelope (STREAM) file reader (clients/cpp/envelope.h), with the
// input as the envelope file. The KMS is a fake that hands out one fixed data
// key: the one of the golden vector tests/testdata/envelope_v1_vector.bin,
// so that seeds made from it decrypt and the fuzzer works on the chunk layer
// too, not only on the header. Checks that:
//  - DecryptStream fails exactly when ReadEnvelopeHeader fails, with the same
//    error, before asking the KMS; else it asks the KMS once, for exactly
//    the header's blob and context;
//  - a header that parses has every field in range, and is canonical:
//    EncryptStream with the same blob, context and chunk size writes the same
//    header bytes (all but the random nonce prefix), which read back the same;
//  - on success, the file is exactly header + plaintext + one tag per chunk,
//    progress rises to the plaintext size, and re-encrypting the plaintext
//    gives a file of the same size that decrypts to it again;
//  - on failure, what was written is whole chunks only, each verified;
//  - an expected context that differs from the header's is refused before
//    the KMS is asked, and the header's own context changes nothing.
#include <cstddef>
#include <cstdint>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "clients/cpp/data_key_source.h"
#include "clients/cpp/envelope.h"
#include "common/secret_bytes.h"
#include "tests/fuzz/fuzz_check.h"

namespace custos::client {
namespace {

using Context = std::map<std::string, std::string>;

// data_key_hex of tests/testdata/envelope_v1_vector.json: 0x40, 0x41, ...
std::string GoldenDataKey() {
  std::string key(kEnvelopeDataKeySize, '\0');
  for (size_t i = 0; i < key.size(); ++i) key[i] = static_cast<char>(0x40 + i);
  return key;
}

const Context& GoldenContext() {
  static const Context* const kContext =
      new Context{{"purpose", "backup"}, {"tenant", "acme"}};
  return *kContext;
}

// A KMS stand-in: every blob "unwraps" to the golden data key, except blobs
// starting with 0xff (refused, as Custos refuses a blob that does not open)
// and 0xfe (a 16-byte key, which the reader must refuse). Records what it
// was asked. Not thread-safe.
class FixedKeySource final : public DataKeySource {
 public:
  explicit FixedKeySource(std::string blob = "") : blob_(std::move(blob)) {}

  absl::StatusOr<DataKey> GenerateDataKey(const std::string& key,
                                          const Context& context) override {
    return DataKey{SecretBytes::CopyOf(GoldenDataKey()), blob_};
  }
  absl::StatusOr<SecretBytes> DecryptDataKey(
      const std::string& blob, const Context& context,
      const std::string& /*expected_key*/) override {
    ++decrypt_calls_;
    last_blob_ = blob;
    last_context_ = context;
    if (!blob.empty() && blob[0] == '\xff') {
      return absl::InvalidArgumentError("invalid ciphertext");
    }
    const std::string key = GoldenDataKey();
    if (!blob.empty() && blob[0] == '\xfe') {
      return SecretBytes::CopyOf(absl::string_view(key).substr(0, 16));
    }
    return SecretBytes::CopyOf(key);
  }

  int decrypt_calls() const { return decrypt_calls_; }
  const std::string& last_blob() const { return last_blob_; }
  const Context& last_context() const { return last_context_; }

 private:
  const std::string blob_;
  int decrypt_calls_ = 0;
  std::string last_blob_;
  Context last_context_;
};

uint32_t U32At(absl::string_view b, size_t at) {
  return (uint32_t{static_cast<uint8_t>(b[at])} << 24) |
         (uint32_t{static_cast<uint8_t>(b[at + 1])} << 16) |
         (uint32_t{static_cast<uint8_t>(b[at + 2])} << 8) |
         uint32_t{static_cast<uint8_t>(b[at + 3])};
}

struct Decrypted {
  absl::Status status;
  std::string output;
  std::vector<uint64_t> progress;
  // What the KMS was asked.
  int decrypt_calls = 0;
  std::string kms_blob;
  Context kms_context;
};

Decrypted Decrypt(absl::string_view envelope, const Context* expected) {
  FixedKeySource kms;
  std::istringstream in{std::string(envelope)};
  std::ostringstream out;
  Decrypted d;
  EnvelopeOptions options;
  options.progress = [&d](uint64_t n) { d.progress.push_back(n); };
  d.status = DecryptStream(kms, in, out, expected, options);
  d.output = out.str();
  d.decrypt_calls = kms.decrypt_calls();
  d.kms_blob = kms.last_blob();
  d.kms_context = kms.last_context();
  return d;
}

absl::StatusOr<std::string> Encrypt(const EnvelopeInfo& info,
                                    const std::string& plaintext) {
  FixedKeySource kms(info.kms_blob);
  std::istringstream in(plaintext);
  std::ostringstream out;
  EnvelopeOptions options;
  options.chunk_size = info.chunk_size;
  absl::Status status = EncryptStream(kms, "k-abcdefghijklmnopqrstuvwxyz",
                                      info.context, in, out, options);
  if (!status.ok()) return status;
  return out.str();
}

void CheckHeader(absl::string_view input, const EnvelopeInfo& info) {
  CUSTOS_FUZZ_CHECK(info.format_version == kEnvelopeFormatVersion, "version");
  CUSTOS_FUZZ_CHECK(
      !info.kms_blob.empty() && info.kms_blob.size() <= kEnvelopeMaxKmsBlobSize,
      "KMS blob size out of range");
  CUSTOS_FUZZ_CHECK(info.context.size() <= kEnvelopeMaxContextPairs,
                    "too many context pairs");
  size_t context_bytes = 0;
  for (const auto& [key, value] : info.context) {
    CUSTOS_FUZZ_CHECK(!key.empty(), "empty context key");
    context_bytes += key.size() + value.size();
  }
  CUSTOS_FUZZ_CHECK(context_bytes <= kEnvelopeMaxContextBytes,
                    "context too large");
  CUSTOS_FUZZ_CHECK(info.chunk_size >= kEnvelopeMinChunkSize &&
                        info.chunk_size <= kEnvelopeMaxChunkSize,
                    "chunk size out of range");
  const uint32_t header_size = U32At(input, 9);
  CUSTOS_FUZZ_CHECK(header_size >= kEnvelopeMinHeaderSize &&
                        header_size <= kEnvelopeMaxHeaderSize &&
                        header_size <= input.size(),
                    "header length out of range");

  // Canonical: the writer, given the same fields, writes the same bytes (the
  // nonce prefix, the header's last 7 bytes, is random per file).
  const absl::StatusOr<std::string> written = Encrypt(info, "");
  CUSTOS_FUZZ_CHECK(written.ok(), "a header that parses cannot be written");
  const size_t fixed = header_size - kEnvelopeNoncePrefixSize;
  CUSTOS_FUZZ_CHECK(written->size() >= header_size &&
                        U32At(*written, 9) == header_size &&
                        written->compare(0, fixed, input.data(), fixed) == 0,
                    "the header is not the canonical encoding of its fields");
  std::istringstream in(*written);
  const absl::StatusOr<EnvelopeInfo> reread = ReadEnvelopeHeader(in);
  CUSTOS_FUZZ_CHECK(reread.ok() && reread->kms_blob == info.kms_blob &&
                        reread->context == info.context &&
                        reread->chunk_size == info.chunk_size &&
                        reread->format_version == info.format_version,
                    "a re-written header reads back differently");
}

void CheckDecrypted(absl::string_view input, const EnvelopeInfo& info,
                    const Decrypted& d) {
  const std::string& plaintext = d.output;
  const size_t header_size = U32At(input, 9);
  const size_t chunk = info.chunk_size;
  const size_t chunks =
      plaintext.empty() ? 1 : (plaintext.size() + chunk - 1) / chunk;
  CUSTOS_FUZZ_CHECK(input.size() == header_size + plaintext.size() +
                                        chunks * kEnvelopeTagSize,
                    "file size is not header + plaintext + one tag per chunk");
  CUSTOS_FUZZ_CHECK(
      d.progress.size() == chunks && d.progress.back() == plaintext.size(),
      "progress does not end at the plaintext size");
  for (size_t i = 1; i < d.progress.size(); ++i) {
    CUSTOS_FUZZ_CHECK(d.progress[i] > d.progress[i - 1],
                      "progress does not rise");
  }
  const absl::StatusOr<std::string> again = Encrypt(info, plaintext);
  CUSTOS_FUZZ_CHECK(again.ok() && again->size() == input.size(),
                    "re-encryption changes the file size");
  const Decrypted round_trip = Decrypt(*again, nullptr);
  CUSTOS_FUZZ_CHECK(round_trip.status.ok() && round_trip.output == plaintext,
                    "re-encrypted plaintext does not decrypt to itself");
}

void FuzzOne(absl::string_view input) {
  std::istringstream header_in{std::string(input)};
  const absl::StatusOr<EnvelopeInfo> info = ReadEnvelopeHeader(header_in);
  const Decrypted d = Decrypt(input, nullptr);

  if (!info.ok()) {
    CUSTOS_FUZZ_CHECK(
        info.status().code() == absl::StatusCode::kInvalidArgument,
        "header errors are INVALID_ARGUMENT");
    CUSTOS_FUZZ_CHECK(
        absl::StartsWith(info.status().message(), "invalid envelope: "),
        "header error wording");
    CUSTOS_FUZZ_CHECK(d.status == info.status(),
                      "DecryptStream and ReadEnvelopeHeader disagree");
    CUSTOS_FUZZ_CHECK(d.decrypt_calls == 0 && d.output.empty(),
                      "the KMS was asked about a malformed header");
    return;
  }

  CheckHeader(input, *info);
  CUSTOS_FUZZ_CHECK(d.decrypt_calls == 1, "one KMS call per envelope");
  CUSTOS_FUZZ_CHECK(
      d.kms_blob == info->kms_blob && d.kms_context == info->context,
      "the KMS was asked for another blob or context than the header's");

  if (d.status.ok()) {
    CheckDecrypted(input, *info, d);
  } else {
    CUSTOS_FUZZ_CHECK(d.status.code() == absl::StatusCode::kInvalidArgument,
                      "decryption errors are INVALID_ARGUMENT");
    CUSTOS_FUZZ_CHECK(d.output.size() % info->chunk_size == 0,
                      "a failed decryption wrote part of a chunk");
  }

  // The expected-context check comes before the KMS, and is exact.
  const Decrypted expecting = Decrypt(input, &GoldenContext());
  if (info->context != GoldenContext()) {
    CUSTOS_FUZZ_CHECK(!expecting.status.ok() && expecting.decrypt_calls == 0 &&
                          expecting.output.empty(),
                      "an unexpected context got past the check");
  } else {
    CUSTOS_FUZZ_CHECK(
        expecting.status == d.status && expecting.output == d.output,
        "the expected context changed the outcome");
  }
}

}  // namespace
}  // namespace custos::client

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  custos::client::FuzzOne(
      absl::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}
