#include "clients/cpp/envelope.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <malloc.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <streambuf>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/secret_bytes.h"
#include "common/testing/status_matchers.h"
#include "nlohmann/json.hpp"

// The lead's target may not define it; tests/unit/../testdata otherwise.
#ifndef CUSTOS_TESTDATA_DIR
#define CUSTOS_TESTDATA_DIR ""
#endif

namespace custos::client {
namespace {

using ::custos::testing::IsOk;
using ::custos::testing::StatusIs;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::Eq;
using ::testing::HasSubstr;
using ::testing::StartsWith;

using Context = std::map<std::string, std::string>;

constexpr size_t kKiB = 1024;
constexpr size_t kMiB = 1024 * 1024;
constexpr char kKeyName[] = "k-abcdefghijklmnopqrstuvwxyz";

std::string TestDataDir() {
  std::string dir = CUSTOS_TESTDATA_DIR;
  if (!dir.empty()) return dir;
  std::string file = __FILE__;  // .../tests/unit/envelope_test.cc
  return file.substr(0, file.rfind("/unit/")) + "/testdata";
}

std::string RandomBytes(size_t n) {
  std::string out(n, '\0');
  EXPECT_EQ(RAND_bytes(reinterpret_cast<unsigned char*>(out.data()),
                       static_cast<int>(n)),
            1);
  return out;
}

std::string U32(uint32_t v) {
  return {static_cast<char>(v >> 24), static_cast<char>(v >> 16),
          static_cast<char>(v >> 8), static_cast<char>(v)};
}

uint32_t GetU32(absl::string_view s, size_t offset) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data() + offset);
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) |
         (uint32_t{p[2]} << 8) | p[3];
}

// Deterministic, non-repeating bytes (splitmix64), so moved chunks differ.
std::string Pattern(size_t n, uint64_t seed = 1) {
  std::string out(n, '\0');
  uint64_t x = seed;
  for (size_t i = 0; i < n; i += 8) {
    uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    for (size_t j = 0; j < 8 && i + j < n; ++j) {
      out[i + j] = static_cast<char>(z >> (8 * j));
    }
  }
  return out;
}

// One-shot AES-256-GCM; `nullopt` when the tag does not verify.
std::string GcmSeal(absl::string_view key, absl::string_view iv,
                    absl::string_view aad, absl::string_view plaintext) {
  std::unique_ptr<EVP_CIPHER_CTX, decltype(&EVP_CIPHER_CTX_free)> ctx(
      EVP_CIPHER_CTX_new(), EVP_CIPHER_CTX_free);
  std::string out(plaintext.size() + 16, '\0');
  auto* o = reinterpret_cast<unsigned char*>(out.data());
  int len = 0;
  EXPECT_EQ(EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, nullptr,
                               nullptr),
            1);
  EXPECT_EQ(EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN,
                                static_cast<int>(iv.size()), nullptr),
            1);
  EXPECT_EQ(
      EVP_EncryptInit_ex(ctx.get(), nullptr, nullptr,
                         reinterpret_cast<const unsigned char*>(key.data()),
                         reinterpret_cast<const unsigned char*>(iv.data())),
      1);
  EVP_EncryptUpdate(ctx.get(), nullptr, &len,
                    reinterpret_cast<const unsigned char*>(aad.data()),
                    static_cast<int>(aad.size()));
  EVP_EncryptUpdate(ctx.get(), o, &len,
                    reinterpret_cast<const unsigned char*>(plaintext.data()),
                    static_cast<int>(plaintext.size()));
  EVP_EncryptFinal_ex(ctx.get(), o + plaintext.size(), &len);
  EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, 16,
                      o + plaintext.size());
  return out;
}

std::optional<std::string> GcmOpen(absl::string_view key, absl::string_view iv,
                                   absl::string_view aad,
                                   absl::string_view sealed) {
  if (sealed.size() < 16) return std::nullopt;
  const size_t n = sealed.size() - 16;
  std::unique_ptr<EVP_CIPHER_CTX, decltype(&EVP_CIPHER_CTX_free)> ctx(
      EVP_CIPHER_CTX_new(), EVP_CIPHER_CTX_free);
  std::string out(n, '\0');
  auto* o = reinterpret_cast<unsigned char*>(out.data());
  std::string tag(sealed.substr(n));
  int len = 0;
  if (EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, nullptr,
                         nullptr) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN,
                          static_cast<int>(iv.size()), nullptr) != 1 ||
      EVP_DecryptInit_ex(ctx.get(), nullptr, nullptr,
                         reinterpret_cast<const unsigned char*>(key.data()),
                         reinterpret_cast<const unsigned char*>(iv.data())) !=
          1 ||
      EVP_DecryptUpdate(ctx.get(), nullptr, &len,
                        reinterpret_cast<const unsigned char*>(aad.data()),
                        static_cast<int>(aad.size())) != 1 ||
      EVP_DecryptUpdate(ctx.get(), o, &len,
                        reinterpret_cast<const unsigned char*>(sealed.data()),
                        static_cast<int>(n)) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, 16, tag.data()) !=
          1 ||
      EVP_DecryptFinal_ex(ctx.get(), o + n, &len) != 1) {
    return std::nullopt;
  }
  return out;
}

// u32 count, then u32 length + bytes for each key and value, in map order.
std::string CanonicalContext(const Context& context) {
  std::string out = U32(static_cast<uint32_t>(context.size()));
  for (const auto& [k, v] : context) {
    absl::StrAppend(&out, U32(static_cast<uint32_t>(k.size())), k,
                    U32(static_cast<uint32_t>(v.size())), v);
  }
  return out;
}

// A KMS stand-in: wraps data keys with AES-256-GCM under an in-memory key.
// Blob (stable: the golden vector holds one):
//   u8 L || key name (L bytes) || IV (12) || GCM(data key) || tag (16)
// AAD = blob bytes [0, 1 + L) || CanonicalContext(context), so a blob does not
// open under another context (unless set_bind_context(false), which models a
// KMS that ignores the context, to show the chunk AAD catches edits anyway).
// Any blob that does not open answers INVALID_ARGUMENT "invalid ciphertext",
// as Custos does. Not thread-safe.
class FakeDataKeySource : public DataKeySource {
 public:
  FakeDataKeySource() : FakeDataKeySource(RandomBytes(32)) {}
  explicit FakeDataKeySource(std::string wrap_key)
      : wrap_key_(std::move(wrap_key)) {}

  // Every GenerateDataKey returns this key (for golden vectors and splicing).
  void set_fixed_data_key(std::string key) { fixed_data_key_ = std::move(key); }
  void set_data_key_size(size_t n) { data_key_size_ = n; }
  void set_bind_context(bool bind) { bind_context_ = bind; }
  // The next call (either kind) fails with `status`.
  void FailNextCall(absl::Status status) { next_error_ = std::move(status); }
  int generate_calls() const { return generate_calls_; }
  int decrypt_calls() const { return decrypt_calls_; }

  absl::StatusOr<DataKey> GenerateDataKey(const std::string& key,
                                          const Context& context) override {
    ++generate_calls_;
    if (!next_error_.ok()) return std::exchange(next_error_, absl::OkStatus());
    std::string data_key = fixed_data_key_.has_value()
                               ? *fixed_data_key_
                               : RandomBytes(data_key_size_);
    std::string prefix = std::string(1, static_cast<char>(key.size())) + key;
    std::string iv = RandomBytes(12);
    std::string blob =
        prefix + iv + GcmSeal(wrap_key_, iv, Aad(prefix, context), data_key);
    DataKey out{SecretBytes::CopyOf(data_key), std::move(blob)};
    OPENSSL_cleanse(data_key.data(), data_key.size());
    return out;
  }

  absl::StatusOr<SecretBytes> DecryptDataKey(
      const std::string& blob, const Context& context,
      const std::string& expected_key) override {
    ++decrypt_calls_;
    if (!next_error_.ok()) return std::exchange(next_error_, absl::OkStatus());
    const absl::Status invalid =
        absl::InvalidArgumentError("invalid ciphertext");
    if (blob.empty()) return invalid;
    const size_t prefix_size = 1 + static_cast<uint8_t>(blob[0]);
    if (blob.size() < prefix_size + 12 + 16) return invalid;
    // As Custos does: another key's blob reads as an invalid one.
    if (!expected_key.empty() &&
        blob.substr(1, prefix_size - 1) != expected_key) {
      return invalid;
    }
    absl::string_view b(blob);
    std::optional<std::string> key = GcmOpen(
        wrap_key_, b.substr(prefix_size, 12),
        Aad(b.substr(0, prefix_size), context), b.substr(prefix_size + 12));
    if (!key.has_value()) return invalid;
    SecretBytes out = SecretBytes::CopyOf(*key);
    OPENSSL_cleanse(key->data(), key->size());
    return out;
  }

 private:
  std::string Aad(absl::string_view prefix, const Context& context) const {
    return absl::StrCat(prefix, bind_context_ ? CanonicalContext(context) : "");
  }

  std::string wrap_key_;
  std::optional<std::string> fixed_data_key_;
  size_t data_key_size_ = 32;
  bool bind_context_ = true;
  absl::Status next_error_;
  int generate_calls_ = 0;
  int decrypt_calls_ = 0;
};

const Context& TestContext() {
  static const Context* const kContext =
      new Context{{"tenant", "acme"}, {"purpose", "backup"}};
  return *kContext;
}

absl::StatusOr<std::string> Encrypt(FakeDataKeySource& kms,
                                    const std::string& plaintext,
                                    size_t chunk_size = 64 * kKiB,
                                    const Context& context = TestContext()) {
  std::istringstream in(plaintext);
  std::ostringstream out;
  EnvelopeOptions options;
  options.chunk_size = chunk_size;
  absl::Status status = EncryptStream(kms, kKeyName, context, in, out, options);
  if (!status.ok()) return status;
  return out.str();
}

struct Decrypted {
  absl::Status status;
  std::string out;  // everything written, even on failure
};

Decrypted Decrypt(FakeDataKeySource& kms, const std::string& envelope,
                  const Context* expected = nullptr) {
  std::istringstream in(envelope);
  std::ostringstream out;
  absl::Status status = DecryptStream(kms, in, out, expected);
  return {status, out.str()};
}

size_t HeaderSize(absl::string_view envelope) { return GetU32(envelope, 9); }

// The header, as the spec describes it; pairs in the order given.
std::string TestHeader(
    uint8_t version, absl::string_view blob,
    const std::vector<std::pair<std::string, std::string>>& pairs,
    uint32_t chunk_size, absl::string_view nonce_prefix,
    std::optional<uint32_t> header_size = std::nullopt) {
  std::string body = U32(static_cast<uint32_t>(blob.size())) +
                     std::string(blob) +
                     U32(static_cast<uint32_t>(pairs.size()));
  for (const auto& [k, v] : pairs) {
    absl::StrAppend(&body, U32(static_cast<uint32_t>(k.size())), k,
                    U32(static_cast<uint32_t>(v.size())), v);
  }
  absl::StrAppend(&body, U32(chunk_size), nonce_prefix);
  const uint32_t size =
      header_size.value_or(static_cast<uint32_t>(13 + body.size()));
  return absl::StrCat(absl::string_view("CUSTOSE\0", 8),
                      std::string(1, static_cast<char>(version)), U32(size),
                      body);
}

// The on-disk chunks (ciphertext || tag) after the header.
std::vector<std::string> SplitChunks(absl::string_view envelope,
                                     size_t chunk_size) {
  std::vector<std::string> chunks;
  absl::string_view rest = envelope.substr(HeaderSize(envelope));
  while (!rest.empty()) {
    size_t n = std::min(rest.size(), chunk_size + 16);
    chunks.emplace_back(rest.substr(0, n));
    rest.remove_prefix(n);
  }
  return chunks;
}

std::string Join(absl::string_view header,
                 const std::vector<std::string>& chunks) {
  std::string out(header);
  for (const std::string& c : chunks) out += c;
  return out;
}

auto IsInvalidEnvelope(const std::string& what) {
  return StatusIs(absl::StatusCode::kInvalidArgument,
                  Eq("invalid envelope: " + what));
}

auto ChunkFailed(uint64_t n) {
  return IsInvalidEnvelope(absl::StrCat("chunk ", n, " failed authentication"));
}

// Whatever was released before a failure is whole, verified chunks: a prefix
// of the plaintext, a multiple of the chunk size, and never all of it.
void ExpectOnlyVerifiedChunks(const Decrypted& d, const std::string& plaintext,
                              size_t chunk_size) {
  EXPECT_EQ(d.out.size() % chunk_size, 0u);
  EXPECT_LT(d.out.size(), std::max<size_t>(plaintext.size(), 1));
  EXPECT_TRUE(absl::StartsWith(plaintext, d.out));
}

// --- Round trips ------------------------------------------------------------

class RoundTripTest : public ::testing::TestWithParam<size_t> {};

TEST_P(RoundTripTest, DecryptsToThePlaintextAndHasTheDocumentedSize) {
  FakeDataKeySource kms;
  const std::string plaintext = Pattern(GetParam());
  absl::StatusOr<std::string> envelope = Encrypt(kms, plaintext);
  ASSERT_THAT(envelope, IsOk());
  // Header, then one tag per chunk; an empty plaintext still has one chunk.
  const size_t chunks =
      std::max<size_t>(1, (plaintext.size() + 64 * kKiB - 1) / (64 * kKiB));
  EXPECT_EQ(envelope->size(),
            HeaderSize(*envelope) + plaintext.size() + 16 * chunks);

  Decrypted d = Decrypt(kms, *envelope, &TestContext());
  CUSTOS_ASSERT_OK(d.status);
  EXPECT_TRUE(d.out == plaintext);
  EXPECT_EQ(kms.generate_calls(), 1);
  EXPECT_EQ(kms.decrypt_calls(), 1);
}

INSTANTIATE_TEST_SUITE_P(Sizes, RoundTripTest,
                         ::testing::Values(0, 1, 64 * kKiB - 1, 64 * kKiB,
                                           64 * kKiB + 1, 1 * kMiB + 17));

TEST(EnvelopeTest, SmallestChunkSizeRoundTrips) {
  FakeDataKeySource kms;
  const std::string plaintext = Pattern(10 * kKiB + 5);
  absl::StatusOr<std::string> envelope = Encrypt(kms, plaintext, 1 * kKiB);
  ASSERT_THAT(envelope, IsOk());
  EXPECT_EQ(SplitChunks(*envelope, 1 * kKiB).size(), 11u);
  Decrypted d = Decrypt(kms, *envelope);
  CUSTOS_ASSERT_OK(d.status);
  EXPECT_TRUE(d.out == plaintext);
}

TEST(EnvelopeTest, LargestChunkSizeIsAccepted) {
  FakeDataKeySource kms;
  absl::StatusOr<std::string> envelope = Encrypt(kms, "x", 16 * kMiB);
  ASSERT_THAT(envelope, IsOk());
  std::istringstream in(*envelope);
  absl::StatusOr<EnvelopeInfo> info = ReadEnvelopeHeader(in);
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->chunk_size, 16 * kMiB);
  Decrypted d = Decrypt(kms, *envelope);
  CUSTOS_ASSERT_OK(d.status);
  EXPECT_EQ(d.out, "x");
}

TEST(EnvelopeTest, ChunkSizeOutOfRangeIsRefusedBeforeTheKmsIsCalled) {
  for (size_t chunk_size : {size_t{0}, size_t{1023}, 16 * kMiB + 1}) {
    FakeDataKeySource kms;
    EXPECT_THAT(
        Encrypt(kms, "data", chunk_size),
        StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("chunk_size")));
    EXPECT_EQ(kms.generate_calls(), 0);
  }
}

TEST(EnvelopeTest, EachFileGetsAFreshDataKeyAndNoncePrefix) {
  FakeDataKeySource kms;
  absl::StatusOr<std::string> a = Encrypt(kms, "same");
  absl::StatusOr<std::string> b = Encrypt(kms, "same");
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(kms.generate_calls(), 2);
  const size_t ha = HeaderSize(*a), hb = HeaderSize(*b);
  EXPECT_NE(a->substr(ha - 7, 7), b->substr(hb - 7, 7));
  EXPECT_NE(a->substr(ha), b->substr(hb));
}

TEST(EnvelopeTest, ProgressReportsEveryChunkUpToTheTotal) {
  FakeDataKeySource kms;
  const std::string plaintext = Pattern(3 * kKiB + 100);
  std::vector<uint64_t> encrypted, decrypted;
  EnvelopeOptions options;
  options.chunk_size = 1 * kKiB;
  options.progress = [&](uint64_t n) { encrypted.push_back(n); };
  std::istringstream in(plaintext);
  std::ostringstream out;
  CUSTOS_ASSERT_OK(
      EncryptStream(kms, kKeyName, TestContext(), in, out, options));
  EXPECT_THAT(encrypted, ElementsAre(1024, 2048, 3072, 3172));

  EnvelopeOptions decrypt_options;
  decrypt_options.progress = [&](uint64_t n) { decrypted.push_back(n); };
  std::istringstream envelope(out.str());
  std::ostringstream plain;
  CUSTOS_ASSERT_OK(
      DecryptStream(kms, envelope, plain, nullptr, decrypt_options));
  EXPECT_EQ(decrypted, encrypted);
}

TEST(EnvelopeTest, EmptyInputReportsProgressOnce) {
  FakeDataKeySource kms;
  std::vector<uint64_t> calls;
  EnvelopeOptions options;
  options.progress = [&](uint64_t n) { calls.push_back(n); };
  std::istringstream in("");
  std::ostringstream out;
  CUSTOS_ASSERT_OK(
      EncryptStream(kms, kKeyName, TestContext(), in, out, options));
  EXPECT_THAT(calls, ElementsAre(0));
}

// --- Layout: the bytes are what docs/envelope-format.md says ---------------

TEST(EnvelopeLayoutTest, HeaderAndChunksFollowTheSpec) {
  FakeDataKeySource kms;
  const std::string data_key = Pattern(32, 99);
  kms.set_fixed_data_key(data_key);
  const std::string plaintext = Pattern(2 * kKiB + 7);
  absl::StatusOr<std::string> envelope = Encrypt(kms, plaintext, 1 * kKiB);
  ASSERT_THAT(envelope, IsOk());

  std::istringstream in(*envelope);
  absl::StatusOr<EnvelopeInfo> info = ReadEnvelopeHeader(in);
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->format_version, 1u);
  EXPECT_EQ(info->chunk_size, 1024u);
  EXPECT_EQ(info->context, TestContext());
  const size_t h = HeaderSize(*envelope);
  EXPECT_EQ(static_cast<size_t>(in.tellg()), h);  // left at the first chunk

  const std::string prefix = envelope->substr(h - 7, 7);
  const std::string header = envelope->substr(0, h);
  EXPECT_EQ(header, TestHeader(1, info->kms_blob,
                               {{"purpose", "backup"}, {"tenant", "acme"}},
                               1024, prefix));

  // Open each chunk by hand: nonce = prefix || u32 i || last, AAD = header.
  std::vector<std::string> chunks = SplitChunks(*envelope, 1 * kKiB);
  ASSERT_EQ(chunks.size(), 3u);
  std::string recovered;
  for (uint32_t i = 0; i < chunks.size(); ++i) {
    const bool last = i + 1 == chunks.size();
    std::string nonce = prefix + U32(i) + std::string(1, last ? 1 : 0);
    std::optional<std::string> pt = GcmOpen(data_key, nonce, header, chunks[i]);
    ASSERT_TRUE(pt.has_value()) << "chunk " << i;
    recovered += *pt;
    // The other flag value never opens.
    nonce[11] ^= 1;
    EXPECT_FALSE(GcmOpen(data_key, nonce, header, chunks[i]).has_value());
  }
  EXPECT_TRUE(recovered == plaintext);
}

TEST(EnvelopeLayoutTest, ChunkNonceIsPrefixCounterAndLastFlag) {
  const std::string prefix = "\x01\x02\x03\x04\x05\x06\x07";
  absl::StatusOr<std::array<uint8_t, 12>> nonce =
      envelope_internal::ChunkNonce(prefix, 0x0a0b0c0d, true);
  ASSERT_THAT(nonce, IsOk());
  EXPECT_THAT(*nonce,
              ElementsAre(1, 2, 3, 4, 5, 6, 7, 0x0a, 0x0b, 0x0c, 0x0d, 0x01));
  nonce = envelope_internal::ChunkNonce(prefix, 0xffffffff, false);
  ASSERT_THAT(nonce, IsOk());
  EXPECT_THAT(*nonce,
              ElementsAre(1, 2, 3, 4, 5, 6, 7, 0xff, 0xff, 0xff, 0xff, 0x00));
}

TEST(EnvelopeLayoutTest, ChunkCounterOverflowIsRefused) {
  EXPECT_THAT(envelope_internal::ChunkNonce("1234567", uint64_t{1} << 32, true),
              StatusIs(absl::StatusCode::kOutOfRange));
}

// --- Tampering --------------------------------------------------------------

// 6 chunks of 1 KiB (the last 300 bytes) under a fixed data key, so a second
// file shares the key and chunks can be spliced between them.
class EnvelopeTamperTest : public ::testing::Test {
 protected:
  static constexpr size_t kChunk = 1 * kKiB;

  void SetUp() override {
    kms_.set_fixed_data_key(Pattern(32, 7));
    plaintext_ = Pattern(5 * kChunk + 300);
    absl::StatusOr<std::string> envelope = Encrypt(kms_, plaintext_, kChunk);
    ASSERT_THAT(envelope, IsOk());
    envelope_ = *envelope;
    header_ = envelope_.substr(0, HeaderSize(envelope_));
    chunks_ = SplitChunks(envelope_, kChunk);
    ASSERT_EQ(chunks_.size(), 6u);
  }

  // Refused with `matcher`, releasing exactly the first `released` chunks.
  template <typename M>
  void ExpectRefused(const std::string& envelope, M matcher, size_t released) {
    Decrypted d = Decrypt(kms_, envelope);
    EXPECT_THAT(d.status, matcher);
    EXPECT_EQ(d.out.size(), released * kChunk);
    EXPECT_TRUE(absl::StartsWith(plaintext_, d.out));
  }

  FakeDataKeySource kms_;
  std::string plaintext_;
  std::string envelope_;
  std::string header_;
  std::vector<std::string> chunks_;
};

TEST_F(EnvelopeTamperTest, UntouchedEnvelopeDecrypts) {
  Decrypted d = Decrypt(kms_, envelope_);
  CUSTOS_ASSERT_OK(d.status);
  EXPECT_TRUE(d.out == plaintext_);
}

TEST_F(EnvelopeTamperTest, TruncationAtEveryChunkBoundaryIsDetected) {
  ExpectRefused(header_, IsInvalidEnvelope("no chunks"), 0);
  for (size_t k = 1; k < chunks_.size(); ++k) {
    // The last chunk left was sealed as "not last".
    std::vector<std::string> kept(chunks_.begin(), chunks_.begin() + k);
    SCOPED_TRACE(k);
    ExpectRefused(Join(header_, kept), ChunkFailed(k - 1), k - 1);
  }
}

TEST_F(EnvelopeTamperTest, TruncationAtEveryLengthIsDetected) {
  for (size_t len = 0; len < envelope_.size(); ++len) {
    Decrypted d = Decrypt(kms_, envelope_.substr(0, len));
    ASSERT_THAT(d.status, StatusIs(absl::StatusCode::kInvalidArgument,
                                   StartsWith("invalid envelope: ")))
        << "length " << len;
    ExpectOnlyVerifiedChunks(d, plaintext_, kChunk);
  }
}

TEST_F(EnvelopeTamperTest, TruncationInsideAChunkIsDetected) {
  for (size_t cut : {size_t{1}, size_t{15}, size_t{16}, size_t{17}, kChunk}) {
    SCOPED_TRACE(cut);
    std::string envelope = Join(header_, {chunks_[0], chunks_[1]});
    envelope.resize(envelope.size() - cut);
    ExpectRefused(envelope,
                  StatusIs(absl::StatusCode::kInvalidArgument,
                           StartsWith("invalid envelope: chunk 1")),
                  1);
  }
}

TEST_F(EnvelopeTamperTest, DroppingTheLastChunkIsDetected) {
  std::vector<std::string> kept(chunks_.begin(), chunks_.end() - 1);
  ExpectRefused(Join(header_, kept), ChunkFailed(4), 4);
}

TEST_F(EnvelopeTamperTest, DroppingAMiddleChunkIsDetected) {
  std::vector<std::string> kept = chunks_;
  kept.erase(kept.begin() + 2);
  ExpectRefused(Join(header_, kept), ChunkFailed(2), 2);
}

TEST_F(EnvelopeTamperTest, ReorderingTwoChunksIsDetected) {
  std::vector<std::string> swapped = chunks_;
  std::swap(swapped[1], swapped[2]);
  ExpectRefused(Join(header_, swapped), ChunkFailed(1), 1);
}

TEST_F(EnvelopeTamperTest, DuplicatingAChunkIsDetected) {
  std::vector<std::string> dup = chunks_;
  dup.insert(dup.begin() + 3, chunks_[2]);
  ExpectRefused(Join(header_, dup), ChunkFailed(3), 3);
}

TEST_F(EnvelopeTamperTest, AChunkFromAnotherFileWithTheSameKeyIsDetected) {
  // Same data key, same plaintext, same position: only the nonce prefix and
  // the header (AAD) differ, and that is enough.
  absl::StatusOr<std::string> other = Encrypt(kms_, plaintext_, kChunk);
  ASSERT_THAT(other, IsOk());
  std::vector<std::string> other_chunks = SplitChunks(*other, kChunk);
  for (size_t i : {size_t{0}, size_t{2}, size_t{5}}) {
    SCOPED_TRACE(i);
    std::vector<std::string> spliced = chunks_;
    spliced[i] = other_chunks[i];
    ExpectRefused(Join(header_, spliced), ChunkFailed(i), i);
  }
  // The other file's header with this file's chunks.
  ExpectRefused(Join(other->substr(0, HeaderSize(*other)), chunks_),
                ChunkFailed(0), 0);
}

TEST_F(EnvelopeTamperTest, AppendingIsDetected) {
  ExpectRefused(envelope_ + "x", ChunkFailed(5), 5);
  ExpectRefused(envelope_ + chunks_[5], ChunkFailed(5), 5);
  ExpectRefused(envelope_ + std::string(16, '\0'), ChunkFailed(5), 5);
}

TEST_F(EnvelopeTamperTest, AppendingAfterAFullLastChunkIsDetected) {
  // A full last chunk followed by anything is read as "not last".
  const std::string plaintext = Pattern(4 * kChunk);
  absl::StatusOr<std::string> envelope = Encrypt(kms_, plaintext, kChunk);
  ASSERT_THAT(envelope, IsOk());
  Decrypted d = Decrypt(kms_, *envelope + "x");
  EXPECT_THAT(d.status, ChunkFailed(3));
  EXPECT_EQ(d.out, plaintext.substr(0, 3 * kChunk));
}

TEST_F(EnvelopeTamperTest, FlippingABitInATagOrCiphertextIsDetected) {
  for (size_t i = 0; i < chunks_.size(); ++i) {
    for (size_t pos : {size_t{0}, chunks_[i].size() - 17,
                       chunks_[i].size() - 16, chunks_[i].size() - 1}) {
      SCOPED_TRACE(absl::StrCat("chunk ", i, " byte ", pos));
      std::vector<std::string> flipped = chunks_;
      flipped[i][pos] ^= 0x01;
      ExpectRefused(Join(header_, flipped), ChunkFailed(i), i);
    }
  }
}

TEST_F(EnvelopeTamperTest, FlippingAnyBitAnywhereIsDetected) {
  const size_t h = header_.size();
  for (size_t i = 0; i < envelope_.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string tampered = envelope_;
      tampered[i] ^= static_cast<char>(1 << bit);
      Decrypted d = Decrypt(kms_, tampered);
      ASSERT_THAT(d.status, StatusIs(absl::StatusCode::kInvalidArgument))
          << "byte " << i << " bit " << bit;
      ExpectOnlyVerifiedChunks(d, plaintext_, kChunk);
      if (i < h) {
        // A header edit releases nothing.
        ASSERT_TRUE(d.out.empty()) << "byte " << i << " bit " << bit;
      } else {
        const size_t chunk = (i - h) / (kChunk + 16);
        ASSERT_THAT(d.status, ChunkFailed(chunk));
        ASSERT_EQ(d.out.size(), chunk * kChunk);
      }
    }
  }
}

TEST_F(EnvelopeTamperTest, HeaderFieldEditsAreDetected) {
  const size_t h = header_.size();
  struct Edit {
    const char* name;
    size_t offset;
  };
  for (const Edit& e :
       {Edit{"magic", 0}, Edit{"version", 8}, Edit{"header length", 12},
        Edit{"blob length", 16}, Edit{"blob", 20}, Edit{"chunk size", h - 9},
        Edit{"nonce prefix", h - 1}}) {
    SCOPED_TRACE(e.name);
    std::string tampered = envelope_;
    tampered[e.offset] ^= 0x02;
    ExpectRefused(tampered, StatusIs(absl::StatusCode::kInvalidArgument), 0);
  }
}

TEST_F(EnvelopeTamperTest, ChangingTheStoredContextIsDetectedByTheKms) {
  std::string tampered = envelope_;
  const size_t at = tampered.find("acme");
  ASSERT_LT(at, header_.size());
  tampered[at + 3] = 'f';  // "acmf"
  ExpectRefused(
      tampered,
      StatusIs(absl::StatusCode::kInvalidArgument, Eq("invalid ciphertext")),
      0);
}

TEST_F(EnvelopeTamperTest, ChangingTheStoredContextIsDetectedByTheChunks) {
  // Even a KMS that ignores the context cannot be used to relabel a file:
  // the header is every chunk's AAD.
  kms_.set_bind_context(false);
  absl::StatusOr<std::string> envelope = Encrypt(kms_, plaintext_, kChunk);
  ASSERT_THAT(envelope, IsOk());
  const size_t h = HeaderSize(*envelope);
  std::istringstream in(*envelope);
  absl::StatusOr<EnvelopeInfo> info = ReadEnvelopeHeader(in);
  ASSERT_THAT(info, IsOk());
  const std::string relabelled =
      TestHeader(1, info->kms_blob, {{"purpose", "backup"}, {"tenant", "evil"}},
                 kChunk, envelope->substr(h - 7, 7)) +
      envelope->substr(h);
  ExpectRefused(relabelled, ChunkFailed(0), 0);
  const std::string extra_pair =
      TestHeader(1, info->kms_blob,
                 {{"a", "b"}, {"purpose", "backup"}, {"tenant", "acme"}},
                 kChunk, envelope->substr(h - 7, 7)) +
      envelope->substr(h);
  ExpectRefused(extra_pair, ChunkFailed(0), 0);
}

// --- Malformed headers: refused by the parser, before any KMS call ---------

struct MalformedHeaderCase {
  const char* name;
  std::string header;
  std::string error;  // after "invalid envelope: "
};

std::vector<MalformedHeaderCase> MalformedHeaders() {
  const std::string blob(80, 'b');
  const std::string prefix = "\x11\x22\x33\x44\x55\x66\x77";
  const std::vector<std::pair<std::string, std::string>> ctx = {
      {"purpose", "backup"}, {"tenant", "acme"}};
  std::string bad_magic = TestHeader(1, blob, ctx, 1024, prefix);
  bad_magic[7] = 'X';
  std::string valid = TestHeader(1, blob, ctx, 1024, prefix);
  std::vector<std::pair<std::string, std::string>> many;
  for (int i = 0; i < 65; ++i)
    many.emplace_back(absl::StrCat("k", 100 + i), "");
  return {
      {"Empty", "", "truncated header"},
      {"ShortFixedPart", valid.substr(0, 12), "truncated header"},
      {"BadMagic", bad_magic, "bad magic"},
      {"FutureVersion", TestHeader(2, blob, ctx, 1024, prefix),
       "unsupported format version 2"},
      {"ZeroVersion", TestHeader(0, blob, ctx, 1024, prefix),
       "unsupported format version 0"},
      {"HeaderLengthTooSmall", TestHeader(1, blob, ctx, 1024, prefix, 32),
       "header length out of range"},
      {"HeaderLengthHuge", TestHeader(1, blob, ctx, 1024, prefix, 0xffffffff),
       "header length out of range"},
      {"HeaderLengthBeyondData",
       TestHeader(1, blob, ctx, 1024, prefix, valid.size() + 1),
       "truncated header"},
      {"HeaderLengthTooLong",
       TestHeader(1, blob, ctx, 1024, prefix, valid.size() + 1) + "x",
       "header length mismatch"},
      {"HeaderLengthTooShort",
       TestHeader(1, blob, ctx, 1024, prefix, valid.size() - 1),
       "truncated header"},
      {"EmptyBlob", TestHeader(1, "", ctx, 1024, prefix),
       "bad KMS blob length"},
      {"BlobTooLarge", TestHeader(1, std::string(8193, 'b'), ctx, 1024, prefix),
       "bad KMS blob length"},
      {"TooManyPairs", TestHeader(1, blob, many, 1024, prefix),
       "bad encryption context pair count"},
      {"ContextTooLarge",
       TestHeader(
           1, blob,
           {{"a", std::string(4096, 'v')}, {"b", std::string(4096, 'v')}}, 1024,
           prefix),
       "encryption context too large"},
      {"UnsortedContext",
       TestHeader(1, blob, {{"tenant", "acme"}, {"purpose", "backup"}}, 1024,
                  prefix),
       "encryption context not in canonical form"},
      {"DuplicateKey",
       TestHeader(1, blob, {{"tenant", "acme"}, {"tenant", "evil"}}, 1024,
                  prefix),
       "encryption context not in canonical form"},
      {"EmptyKey", TestHeader(1, blob, {{"", "x"}}, 1024, prefix),
       "encryption context not in canonical form"},
      {"ChunkSizeTooSmall", TestHeader(1, blob, ctx, 1023, prefix),
       "chunk size out of range"},
      {"ChunkSizeTooLarge", TestHeader(1, blob, ctx, 16 * kMiB + 1, prefix),
       "chunk size out of range"},
  };
}

class MalformedHeaderTest
    : public ::testing::TestWithParam<MalformedHeaderCase> {};

TEST_P(MalformedHeaderTest, IsRefusedWithoutCallingTheKms) {
  std::istringstream in(GetParam().header);
  EXPECT_THAT(ReadEnvelopeHeader(in), IsInvalidEnvelope(GetParam().error));

  FakeDataKeySource kms;
  Decrypted d = Decrypt(kms, GetParam().header);
  EXPECT_THAT(d.status, IsInvalidEnvelope(GetParam().error));
  EXPECT_EQ(kms.decrypt_calls(), 0);
  EXPECT_TRUE(d.out.empty());
}

INSTANTIATE_TEST_SUITE_P(
    Cases, MalformedHeaderTest, ::testing::ValuesIn(MalformedHeaders()),
    [](const ::testing::TestParamInfo<MalformedHeaderCase>& param_info) {
      return std::string(param_info.param.name);
    });

TEST(EnvelopeTest, HeaderAtTheLimitsIsAccepted) {
  std::vector<std::pair<std::string, std::string>> pairs;
  for (int i = 0; i < 64; ++i) {
    pairs.emplace_back(absl::StrCat("k", 100 + i), std::string(124, 'v'));
  }  // 64 * (4 + 124) = 8192 bytes
  const std::string header =
      TestHeader(1, std::string(8192, 'b'), pairs, 16 * kMiB,
                 "\x01\x02\x03\x04\x05\x06\x07");
  EXPECT_EQ(header.size(), kEnvelopeMaxHeaderSize);
  std::istringstream in(header);
  absl::StatusOr<EnvelopeInfo> info = ReadEnvelopeHeader(in);
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->context.size(), 64u);
  EXPECT_EQ(info->chunk_size, 16 * kMiB);
}

// --- Contexts ---------------------------------------------------------------

TEST(EnvelopeTest, WrongExpectedContextIsRefusedBeforeTheKmsIsCalled) {
  FakeDataKeySource kms;
  absl::StatusOr<std::string> envelope = Encrypt(kms, "secret data");
  ASSERT_THAT(envelope, IsOk());
  const Context wrong_value = {{"tenant", "evil"}, {"purpose", "backup"}};
  const Context missing_pair = {{"tenant", "acme"}};
  const Context extra_pair = {
      {"tenant", "acme"}, {"purpose", "backup"}, {"x", "y"}};
  const Context empty;
  for (const Context* expected :
       {&wrong_value, &missing_pair, &extra_pair, &empty}) {
    Decrypted d = Decrypt(kms, *envelope, expected);
    EXPECT_THAT(d.status, StatusIs(absl::StatusCode::kInvalidArgument,
                                   HasSubstr("context does not match")));
    EXPECT_TRUE(d.out.empty());
  }
  EXPECT_EQ(kms.decrypt_calls(), 0);
  Decrypted d = Decrypt(kms, *envelope, &TestContext());
  CUSTOS_EXPECT_OK(d.status);
  EXPECT_EQ(d.out, "secret data");
}

TEST(EnvelopeTest, EmptyContextRoundTrips) {
  FakeDataKeySource kms;
  absl::StatusOr<std::string> envelope = Encrypt(kms, "x", 64 * kKiB, {});
  ASSERT_THAT(envelope, IsOk());
  const Context empty;
  Decrypted d = Decrypt(kms, *envelope, &empty);
  CUSTOS_EXPECT_OK(d.status);
  EXPECT_EQ(d.out, "x");
}

TEST(EnvelopeTest, ContextOverTheLimitsIsRefusedBeforeTheKmsIsCalled) {
  Context many;
  for (int i = 0; i < 65; ++i) many[absl::StrCat("k", i)] = "v";
  const Context too_many = many;
  const Context too_big = {{"a", std::string(8192, 'v')}};
  const Context empty_key = {{"", "v"}};
  for (const Context* context : {&too_many, &too_big, &empty_key}) {
    FakeDataKeySource kms;
    EXPECT_THAT(Encrypt(kms, "data", 64 * kKiB, *context),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         StartsWith("encryption_context: ")));
    EXPECT_EQ(kms.generate_calls(), 0);
  }
}

// --- The KMS and the streams failing ---------------------------------------

TEST(EnvelopeTest, GenerateDataKeyErrorIsReturnedAndNothingIsWritten) {
  FakeDataKeySource kms;
  kms.FailNextCall(absl::PermissionDeniedError("denied"));
  std::istringstream in("data");
  std::ostringstream out;
  EXPECT_THAT(EncryptStream(kms, kKeyName, TestContext(), in, out),
              StatusIs(absl::StatusCode::kPermissionDenied, Eq("denied")));
  EXPECT_TRUE(out.str().empty());
}

TEST(EnvelopeTest, DecryptDataKeyErrorIsReturnedAndNothingIsWritten) {
  FakeDataKeySource kms;
  absl::StatusOr<std::string> envelope = Encrypt(kms, "data");
  ASSERT_THAT(envelope, IsOk());
  kms.FailNextCall(absl::UnavailableError("audit log down"));
  Decrypted d = Decrypt(kms, *envelope);
  EXPECT_THAT(d.status, StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_TRUE(d.out.empty());
}

// Without an expected key, a file swapped for one under another key the
// caller may use would decrypt: the expected key closes that.
TEST(EnvelopeTest, ExpectedKeyRefusesAFileOfAnotherKeyAndWritesNothing) {
  FakeDataKeySource kms;
  absl::StatusOr<std::string> envelope = Encrypt(kms, "data");
  ASSERT_THAT(envelope, IsOk());
  std::istringstream in(*envelope);
  std::ostringstream out;
  EnvelopeOptions options;
  options.expected_key = "k-another";
  EXPECT_THAT(DecryptStream(kms, in, out, nullptr, options),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("not wrapped under the expected key "
                                       "'k-another'"),
                             HasSubstr("invalid ciphertext"))));
  EXPECT_TRUE(out.str().empty());
}

TEST(EnvelopeTest, ExpectedKeyOfTheFileDecrypts) {
  FakeDataKeySource kms;
  absl::StatusOr<std::string> envelope = Encrypt(kms, "data");
  ASSERT_THAT(envelope, IsOk());
  std::istringstream in(*envelope);
  std::ostringstream out;
  EnvelopeOptions options;
  options.expected_key = kKeyName;
  CUSTOS_EXPECT_OK(DecryptStream(kms, in, out, nullptr, options));
  EXPECT_EQ(out.str(), "data");
}

TEST(EnvelopeTest, DataKeyOfTheWrongSizeIsRefused) {
  FakeDataKeySource kms;
  kms.set_data_key_size(16);
  std::istringstream in("data");
  std::ostringstream out;
  EXPECT_THAT(EncryptStream(kms, kKeyName, TestContext(), in, out),
              StatusIs(absl::StatusCode::kInternal, HasSubstr("32 bytes")));
  EXPECT_TRUE(out.str().empty());

  // A blob that unwraps to 16 bytes, spliced into a real header.
  FakeDataKeySource good;
  good.set_bind_context(false);
  absl::StatusOr<std::string> envelope = Encrypt(good, "data");
  ASSERT_THAT(envelope, IsOk());
  good.set_data_key_size(16);
  absl::StatusOr<DataKeySource::DataKey> short_good =
      good.GenerateDataKey(kKeyName, TestContext());
  ASSERT_THAT(short_good, IsOk());
  const size_t h = HeaderSize(*envelope);
  const std::string spliced =
      TestHeader(1, short_good->blob,
                 {{"purpose", "backup"}, {"tenant", "acme"}}, 64 * kKiB,
                 envelope->substr(h - 7, 7)) +
      envelope->substr(h);
  Decrypted d = Decrypt(good, spliced);
  EXPECT_THAT(d.status, IsInvalidEnvelope("data key is not 32 bytes"));
  EXPECT_TRUE(d.out.empty());
}

// An input whose bytes are `data` and that then fails (badbit), as a disk
// error would.
class FailingSource : public std::streambuf {
 public:
  explicit FailingSource(std::string data) : data_(std::move(data)) {
    setg(data_.data(), data_.data(), data_.data() + data_.size());
  }

 protected:
  int_type underflow() override { throw std::runtime_error("disk on fire"); }

 private:
  std::string data_;
};

// An output that accepts `room` bytes and then fails.
class FullSink : public std::streambuf {
 public:
  explicit FullSink(size_t room) : room_(room) {}

 protected:
  std::streamsize xsputn(const char*, std::streamsize n) override {
    if (static_cast<size_t>(n) > room_) return 0;
    room_ -= n;
    return n;
  }
  int_type overflow(int_type c) override {
    if (room_ == 0) return traits_type::eof();
    --room_;
    return traits_type::not_eof(c);
  }

 private:
  size_t room_;
};

TEST(EnvelopeTest, ReadErrorsAreReportedNotTreatedAsEndOfInput) {
  FakeDataKeySource kms;
  FailingSource source(Pattern(3000));
  std::istream in(&source);
  std::ostringstream out;
  EnvelopeOptions options;
  options.chunk_size = 1 * kKiB;
  EXPECT_THAT(EncryptStream(kms, kKeyName, TestContext(), in, out, options),
              StatusIs(absl::StatusCode::kInternal, HasSubstr("reading")));

  absl::StatusOr<std::string> envelope =
      Encrypt(kms, Pattern(5 * kKiB), 1 * kKiB);
  ASSERT_THAT(envelope, IsOk());
  FailingSource truncated(envelope->substr(0, envelope->size() - 100));
  std::istream envelope_in(&truncated);
  std::ostringstream plain;
  EXPECT_THAT(DecryptStream(kms, envelope_in, plain),
              StatusIs(absl::StatusCode::kInternal, HasSubstr("reading")));
}

TEST(EnvelopeTest, WriteErrorsAreReported) {
  FakeDataKeySource kms;
  const std::string plaintext = Pattern(5 * kKiB);
  for (size_t room : {size_t{0}, size_t{10}, size_t{3000}}) {
    SCOPED_TRACE(room);
    FullSink sink(room);
    std::ostream out(&sink);
    std::istringstream in(plaintext);
    EnvelopeOptions options;
    options.chunk_size = 1 * kKiB;
    EXPECT_THAT(EncryptStream(kms, kKeyName, TestContext(), in, out, options),
                StatusIs(absl::StatusCode::kInternal, HasSubstr("writing")));
  }
  absl::StatusOr<std::string> envelope = Encrypt(kms, plaintext, 1 * kKiB);
  ASSERT_THAT(envelope, IsOk());
  FullSink sink(2000);
  std::ostream out(&sink);
  std::istringstream in(*envelope);
  EXPECT_THAT(DecryptStream(kms, in, out),
              StatusIs(absl::StatusCode::kInternal, HasSubstr("writing")));
}

// --- 50 MiB, streamed, with bounded memory ---------------------------------

// Heap bytes in use by glibc malloc (the main arena plus mmapped blocks).
// Under ASan, malloc is ASan's and this stays flat: the bound is then not
// measured, only the round trip.
size_t HeapInUse() {
  const struct mallinfo2 mi = mallinfo2();
  return mi.uordblks + mi.hblkhd;
}

class PeakHeap {
 public:
  PeakHeap() : base_(HeapInUse()), peak_(base_) {}
  void Sample() { peak_ = std::max(peak_, HeapInUse()); }
  size_t Growth() const { return peak_ > base_ ? peak_ - base_ : 0; }

 private:
  size_t base_;
  size_t peak_;
};

class Sha256 {
 public:
  Sha256() : ctx_(EVP_MD_CTX_new(), EVP_MD_CTX_free) {
    EVP_DigestInit_ex(ctx_.get(), EVP_sha256(), nullptr);
  }
  void Update(const char* p, size_t n) { EVP_DigestUpdate(ctx_.get(), p, n); }
  std::string Final() {
    unsigned char md[32];
    unsigned int len = 0;
    EVP_DigestFinal_ex(ctx_.get(), md, &len);
    return std::string(reinterpret_cast<char*>(md), len);
  }

 private:
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx_;
};

// `size` pattern bytes, produced 4 KiB at a time and hashed as they go.
class PatternSource : public std::streambuf {
 public:
  explicit PatternSource(uint64_t size) : remaining_(size) {}
  std::string Digest() { return sha_.Final(); }

 protected:
  int_type underflow() override {
    if (remaining_ == 0) return traits_type::eof();
    const size_t n =
        static_cast<size_t>(std::min<uint64_t>(remaining_, buffer_.size()));
    std::string block = Pattern(n, ++block_);
    std::memcpy(buffer_.data(), block.data(), n);
    sha_.Update(buffer_.data(), n);
    remaining_ -= n;
    setg(buffer_.data(), buffer_.data(), buffer_.data() + n);
    return traits_type::to_int_type(buffer_[0]);
  }

 private:
  uint64_t remaining_;
  uint64_t block_ = 0;
  std::array<char, 4096> buffer_;
  Sha256 sha_;
};

// Counts and hashes what is written; keeps nothing. Samples the heap.
class HashingSink : public std::streambuf {
 public:
  explicit HashingSink(PeakHeap* peak) : peak_(peak) {}
  uint64_t count() const { return count_; }
  std::string Digest() { return sha_.Final(); }

 protected:
  std::streamsize xsputn(const char* p, std::streamsize n) override {
    peak_->Sample();
    sha_.Update(p, static_cast<size_t>(n));
    count_ += static_cast<uint64_t>(n);
    return n;
  }
  int_type overflow(int_type c) override {
    if (traits_type::eq_int_type(c, traits_type::eof())) return 0;
    const char ch = traits_type::to_char_type(c);
    return xsputn(&ch, 1) == 1 ? c : traits_type::eof();
  }

 private:
  PeakHeap* peak_;
  uint64_t count_ = 0;
  Sha256 sha_;
};

TEST(EnvelopeLargeTest, FiftyMebibytesStreamWithBoundedMemory) {
  constexpr uint64_t kSize = 50 * kMiB + 3;
  FakeDataKeySource kms;
  const std::string path =
      ::testing::TempDir() + "/envelope_large_" + std::to_string(getpid());

  PatternSource source(kSize);
  std::string source_digest;
  {
    std::istream in(&source);
    std::ofstream file(path, std::ios::binary | std::ios::trunc);
    ASSERT_TRUE(file.is_open());
    PeakHeap peak;
    EnvelopeOptions options;
    options.progress = [&](uint64_t) { peak.Sample(); };
    CUSTOS_ASSERT_OK(
        EncryptStream(kms, kKeyName, TestContext(), in, file, options));
    EXPECT_LE(peak.Growth(), 4 * kEnvelopeDefaultChunkSize)
        << "encryption held " << peak.Growth() << " bytes";
    source_digest = source.Digest();
  }

  std::ifstream file(path, std::ios::binary);
  ASSERT_TRUE(file.is_open());
  PeakHeap peak;
  HashingSink sink(&peak);
  std::ostream out(&sink);
  uint64_t last_progress = 0;
  EnvelopeOptions options;
  options.progress = [&](uint64_t n) {
    peak.Sample();
    last_progress = n;
  };
  CUSTOS_ASSERT_OK(DecryptStream(kms, file, out, &TestContext(), options));
  EXPECT_LE(peak.Growth(), 4 * kEnvelopeDefaultChunkSize)
      << "decryption held " << peak.Growth() << " bytes";
  EXPECT_EQ(sink.count(), kSize);
  EXPECT_EQ(last_progress, kSize);
  EXPECT_EQ(sink.Digest(), source_digest);
  file.close();
  std::remove(path.c_str());
}

// --- Golden vector ----------------------------------------------------------

// tests/testdata/envelope_v1_vector.{bin,json}, made once by
// DISABLED_WriteGoldenVector below. Never regenerate: files written by any
// version of Custos must decrypt forever.
constexpr char kVectorKeyHex[] =
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
constexpr char kVectorDataKeyHex[] =
    "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f";
constexpr char kVectorPattern[] = "custos envelope v1 vector. ";
constexpr size_t kVectorSize = 2500;
constexpr size_t kVectorChunk = 1024;

std::string VectorPlaintext() {
  std::string out;
  while (out.size() < kVectorSize) out += kVectorPattern;
  out.resize(kVectorSize);
  return out;
}

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

TEST(EnvelopeGoldenVectorTest, DecryptsForever) {
  const std::string dir = TestDataDir();
  const std::string bin = ReadFile(dir + "/envelope_v1_vector.bin");
  ASSERT_FALSE(bin.empty()) << "missing " << dir << "/envelope_v1_vector.bin";
  const nlohmann::json doc =
      nlohmann::json::parse(ReadFile(dir + "/envelope_v1_vector.json"));
  EXPECT_EQ(doc["wrap_key_hex"], kVectorKeyHex);
  EXPECT_EQ(doc["data_key_hex"], kVectorDataKeyHex);
  EXPECT_EQ(doc["chunk_size"], kVectorChunk);
  EXPECT_EQ(doc["plaintext_size"], kVectorSize);
  EXPECT_EQ(doc["envelope_size"], bin.size());
  Context context;
  for (const auto& [k, v] : doc["encryption_context"].items()) {
    context[k] = v.get<std::string>();
  }
  EXPECT_EQ(context, TestContext());

  // Through the API, with the fake KMS under the fixed wrapping key.
  FakeDataKeySource kms(absl::HexStringToBytes(kVectorKeyHex));
  Decrypted d = Decrypt(kms, bin, &context);
  CUSTOS_ASSERT_OK(d.status);
  EXPECT_TRUE(d.out == VectorPlaintext());

  std::istringstream in(bin);
  absl::StatusOr<EnvelopeInfo> info = ReadEnvelopeHeader(in);
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->format_version, 1u);
  EXPECT_EQ(info->chunk_size, kVectorChunk);
  EXPECT_EQ(info->context, context);
  const size_t h = HeaderSize(bin);
  EXPECT_EQ(h, doc["header_size"]);
  EXPECT_EQ(absl::BytesToHexString(bin.substr(h - 7, 7)),
            doc["nonce_prefix_hex"]);

  // And by hand from the spec, with the data key: nonces, AAD, chunk sizes.
  const std::string data_key = absl::HexStringToBytes(kVectorDataKeyHex);
  std::vector<std::string> chunks = SplitChunks(bin, kVectorChunk);
  ASSERT_EQ(chunks.size(), 3u);
  std::string recovered;
  for (uint32_t i = 0; i < 3; ++i) {
    std::string nonce = bin.substr(h - 7, 7) + U32(i) +
                        std::string(1, i == 2 ? '\x01' : '\x00');
    std::optional<std::string> pt =
        GcmOpen(data_key, nonce, bin.substr(0, h), chunks[i]);
    ASSERT_TRUE(pt.has_value()) << "chunk " << i;
    recovered += *pt;
  }
  EXPECT_TRUE(recovered == VectorPlaintext());
}

// Run once, by hand, to make the vector (see docs/envelope-format.md):
//   CUSTOS_ENVELOPE_VECTOR_DIR=tests/testdata envelope_test
//     --gtest_also_run_disabled_tests --gtest_filter='*WriteGoldenVector'
TEST(EnvelopeGoldenVectorTest, DISABLED_WriteGoldenVector) {
  const char* dir = std::getenv("CUSTOS_ENVELOPE_VECTOR_DIR");
  ASSERT_NE(dir, nullptr);
  FakeDataKeySource kms(absl::HexStringToBytes(kVectorKeyHex));
  kms.set_fixed_data_key(absl::HexStringToBytes(kVectorDataKeyHex));
  absl::StatusOr<std::string> envelope =
      Encrypt(kms, VectorPlaintext(), kVectorChunk);
  ASSERT_THAT(envelope, IsOk());
  const size_t h = HeaderSize(*envelope);
  std::istringstream in(*envelope);
  absl::StatusOr<EnvelopeInfo> info = ReadEnvelopeHeader(in);
  ASSERT_THAT(info, IsOk());

  nlohmann::ordered_json doc;
  doc["format"] = "custos envelope, format 1 (docs/envelope-format.md)";
  doc["file"] = "envelope_v1_vector.bin";
  doc["notes"] = {
      "Never edit or regenerate. Made once by DISABLED_WriteGoldenVector in "
      "tests/unit/envelope_test.cc.",
      "kms_blob is from FakeDataKeySource: u8 L || key name || IV(12) || "
      "GCM(wrap key, data key) || tag(16); AAD = blob[0, 1+L) || canonical "
      "context.",
      "data_key_hex opens the chunks directly; wrap_key_hex opens kms_blob.",
      "Plaintext: plaintext_pattern (UTF-8) repeated and cut to "
      "plaintext_size bytes."};
  doc["wrap_key_hex"] = kVectorKeyHex;
  doc["data_key_hex"] = kVectorDataKeyHex;
  doc["key"] = kKeyName;
  doc["encryption_context"] = TestContext();
  doc["chunk_size"] = kVectorChunk;
  doc["plaintext_pattern"] = kVectorPattern;
  doc["plaintext_size"] = kVectorSize;
  doc["header_size"] = h;
  doc["kms_blob_hex"] = absl::BytesToHexString(info->kms_blob);
  doc["nonce_prefix_hex"] = absl::BytesToHexString(envelope->substr(h - 7, 7));
  doc["envelope_size"] = envelope->size();
  unsigned char md[32];
  SHA256(reinterpret_cast<const unsigned char*>(envelope->data()),
         envelope->size(), md);
  doc["envelope_sha256_hex"] = absl::BytesToHexString(
      absl::string_view(reinterpret_cast<char*>(md), 32));

  std::ofstream(std::string(dir) + "/envelope_v1_vector.bin", std::ios::binary)
      << *envelope;
  std::ofstream(std::string(dir) + "/envelope_v1_vector.json")
      << doc.dump(2) << "\n";
}

}  // namespace
}  // namespace custos::client
