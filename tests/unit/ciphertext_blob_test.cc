#include "kms/ciphertext_blob.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <cstdint>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/testing/status_matchers.h"
#include "kms/encryption_context.h"
#include "nlohmann/json.hpp"

#ifndef CUSTOS_TESTDATA_DIR
#error "CUSTOS_TESTDATA_DIR must name tests/testdata"
#endif

namespace custos::kms {
namespace {

using ::custos::testing::IsOk;
using ::custos::testing::IsOkAndHolds;
using ::custos::testing::StatusIs;
using ::testing::Eq;
using ::testing::HasSubstr;

constexpr absl::string_view kKeyId = "k-abcdefghijklmnopqrstuvwxyz";

// Exactly the uniform error, message and all.
auto IsInvalidCiphertext() {
  return StatusIs(absl::StatusCode::kInvalidArgument, Eq("invalid ciphertext"));
}

std::string Hex(absl::string_view bytes) {
  return absl::BytesToHexString(bytes);
}

std::string HeaderBytes(absl::string_view key_id, uint32_t version) {
  absl::StatusOr<std::string> header =
      EncodeBlobHeader({std::string(key_id), version});
  EXPECT_THAT(header, IsOk());
  return header.ok() ? *header : "";
}

// A structurally valid blob with `n` bytes of (fake) ciphertext.
std::string ValidBlob(size_t n, uint32_t version = 7) {
  std::string body(n + kBlobTagSize, '\0');
  for (size_t i = 0; i < body.size(); ++i) body[i] = static_cast<char>(i * 31);
  return AssembleBlob(HeaderBytes(kKeyId, version), std::string(12, '\x5a'),
                      body);
}

// --- Key ids ----------------------------------------------------------------

struct KeyIdCase {
  const char* name;
  std::string id;
  bool valid;
};

class KeyIdTest : public ::testing::TestWithParam<KeyIdCase> {};

TEST_P(KeyIdTest, AcceptsOnlyKPrefixAndLowercaseBase32) {
  EXPECT_EQ(IsValidKeyId(GetParam().id), GetParam().valid);
}

TEST_P(KeyIdTest, EncodeBlobHeaderAgreesWithIsValidKeyId) {
  absl::StatusOr<std::string> header = EncodeBlobHeader({GetParam().id, 1});
  if (GetParam().valid) {
    EXPECT_THAT(header, IsOk());
  } else {
    EXPECT_THAT(header, StatusIs(absl::StatusCode::kInvalidArgument,
                                 HasSubstr("key id")));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Table, KeyIdTest,
    ::testing::Values(
        KeyIdCase{"Letters", "k-abcdefghijklmnopqrstuvwxyz", true},
        KeyIdCase{"DigitsAndLetters", "k-234567abcdefghijklmnopqrst", true},
        KeyIdCase{"AllSevens", "k-77777777777777777777777777", true},
        KeyIdCase{"Empty", "", false}, KeyIdCase{"PrefixOnly", "k-", false},
        KeyIdCase{"TooShort", "k-abcdefghijklmnopqrstuvwxy", false},
        KeyIdCase{"TooLong", "k-abcdefghijklmnopqrstuvwxyza", false},
        KeyIdCase{"UppercasePrefix", "K-abcdefghijklmnopqrstuvwxyz", false},
        KeyIdCase{"UnderscorePrefix", "k_abcdefghijklmnopqrstuvwxyz", false},
        KeyIdCase{"NoPrefix", "abcdefghijklmnopqrstuvwxyzab", false},
        KeyIdCase{"Uppercase", "k-ABCDEFGHIJKLMNOPQRSTUVWXYZ", false},
        KeyIdCase{"Zero", "k-0bcdefghijklmnopqrstuvwxyz", false},
        KeyIdCase{"One", "k-abcdefghijklmnopqrstuvwxy1", false},
        KeyIdCase{"Eight", "k-abcdefghijkl8nopqrstuvwxyz", false},
        KeyIdCase{"Nine", "k-abcdefghijklm9opqrstuvwxyz", false},
        KeyIdCase{"Padding", "k-abcdefghijklmnopqrstuvwx==", false},
        KeyIdCase{"Dash", "k-abcdefghijklmn-pqrstuvwxyz", false},
        KeyIdCase{"Slash", "k-abcdefghijklmnopqrstuvw/..", false},
        KeyIdCase{"Nul", std::string("k-abcdefghijklmnopqrstuvwxy\0", 28),
                  false},
        KeyIdCase{"HighByte", "k-abcdefghijklmnopqrstuvwxy\xff", false},
        KeyIdCase{"Alias", "alias/backups", false}),
    [](const auto& test) { return std::string(test.param.name); });

TEST(NewKeyIdTest, TenThousandDrawsAreValidAndUnique) {
  std::set<std::string> seen;
  // Distinct characters seen at each random position: a stuck bit in the
  // base32 encoder would shrink one of these sets.
  std::vector<std::set<char>> per_position(kKeyIdSize);
  for (int i = 0; i < 10000; ++i) {
    const std::string id = NewKeyId();
    ASSERT_TRUE(IsValidKeyId(id)) << id;
    ASSERT_TRUE(seen.insert(id).second) << "duplicate " << id;
    for (size_t p = 2; p < id.size(); ++p) per_position[p].insert(id[p]);
  }
  for (size_t p = 2; p < kKeyIdSize; ++p) {
    EXPECT_EQ(per_position[p].size(), 32u) << "position " << p;
  }
}

// --- Header -----------------------------------------------------------------

TEST(EncodeBlobHeaderTest, LaysOutFormatLengthKeyIdAndBigEndianVersion) {
  EXPECT_THAT(
      EncodeBlobHeader({std::string(kKeyId), 0x01020304}),
      IsOkAndHolds(Eq(absl::StrCat("\x01\x1c", kKeyId, "\x01\x02\x03\x04"))));
  EXPECT_EQ(Hex(HeaderBytes(kKeyId, 1)),
            "011c6b2d6162636465666768696a6b6c6d6e6f707172737475767778797a"
            "00000001");
  EXPECT_EQ(HeaderBytes(kKeyId, 1).size(), kBlobHeaderSize);
}

TEST(EncodeBlobHeaderTest, RejectsVersionZero) {
  EXPECT_THAT(
      EncodeBlobHeader({std::string(kKeyId), 0}),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("version")));
}

TEST(BlobAadTest, IsHeaderFollowedByCanonicalContext) {
  const std::string header = HeaderBytes(kKeyId, 3);
  const EncryptionContext context = {{"tenant", "acme"}};
  EXPECT_EQ(BlobAad(header, context),
            header + CanonicalEncryptionContext(context));
  EXPECT_EQ(BlobAad(header, {}), header + std::string(4, '\0'));
}

// --- Parse ------------------------------------------------------------------

TEST(ParseBlobTest, LimitsAreTheDocumentedSizes) {
  EXPECT_EQ(kBlobHeaderSize, 34u);
  EXPECT_EQ(kMinBlobSize, 62u);
  EXPECT_EQ(kMaxBlobSize, 4158u);
}

class ParseBlobRoundTripTest : public ::testing::TestWithParam<size_t> {};

TEST_P(ParseBlobRoundTripTest, ReturnsThePartsItWasAssembledFrom) {
  const size_t n = GetParam();
  const std::string header = HeaderBytes(kKeyId, 0xfffffffe);
  const std::string iv = "0123456789ab";
  const std::string body(n + kBlobTagSize, '\xc3');
  const std::string blob = AssembleBlob(header, iv, body);
  ASSERT_EQ(blob.size(), kMinBlobSize + n);

  CUSTOS_ASSERT_OK_AND_ASSIGN(ParsedBlob parsed, ParseBlob(blob));
  EXPECT_EQ(parsed.header.key_id, kKeyId);
  EXPECT_EQ(parsed.header.version, 0xfffffffeu);
  EXPECT_EQ(parsed.header_bytes, header);
  EXPECT_EQ(parsed.iv, iv);
  EXPECT_EQ(parsed.ciphertext, body);
  EXPECT_EQ(AssembleBlob(parsed.header_bytes, parsed.iv, parsed.ciphertext),
            blob);
}

INSTANTIATE_TEST_SUITE_P(PlaintextSizes, ParseBlobRoundTripTest,
                         ::testing::Values(0, 1, 15, 16, 32, 4095,
                                           kMaxBlobPlaintext));

TEST(ParseBlobTest, RejectsTruncationAtEveryOffset) {
  // With no ciphertext bytes, every proper prefix is structurally short.
  // (Longer blobs truncated past the minimum fail the tag check instead:
  // GoldenVectorsTest covers those.)
  const std::string blob = ValidBlob(0);
  ASSERT_THAT(ParseBlob(blob), IsOk());
  for (size_t len = 0; len < blob.size(); ++len) {
    EXPECT_THAT(ParseBlob(absl::string_view(blob).substr(0, len)),
                IsInvalidCiphertext())
        << "length " << len;
  }
}

TEST(ParseBlobTest, RejectsEveryUnknownFormatByte) {
  std::string blob = ValidBlob(32);
  for (int format = 0; format < 256; ++format) {
    if (format == kBlobFormatV1) continue;
    blob[0] = static_cast<char>(format);
    EXPECT_THAT(ParseBlob(blob), IsInvalidCiphertext()) << "format " << format;
  }
}

TEST(ParseBlobTest, RejectsEveryOtherKeyIdLength) {
  std::string blob = ValidBlob(32);
  for (int length = 0; length < 256; ++length) {
    if (length == kKeyIdSize) continue;
    blob[1] = static_cast<char>(length);
    EXPECT_THAT(ParseBlob(blob), IsInvalidCiphertext()) << "length " << length;
  }
}

TEST(ParseBlobTest, RejectsANonBase32CharAtEveryKeyIdPosition) {
  const std::string valid = ValidBlob(32);
  for (size_t pos = 2; pos < 2 + kKeyIdSize; ++pos) {
    for (const char bad : std::string("0189AZ=-_/.\x00\x80\xff", 14)) {
      if (pos == 3 && bad == '-') continue;  // that is the prefix itself
      std::string blob = valid;
      blob[pos] = bad;
      EXPECT_THAT(ParseBlob(blob), IsInvalidCiphertext())
          << "position " << pos << " byte " << Hex(std::string(1, bad));
    }
  }
}

TEST(ParseBlobTest, RejectsVersionZeroAndAcceptsTheExtremes) {
  EXPECT_THAT(ParseBlob(ValidBlob(32, 1)), IsOk());
  EXPECT_THAT(ParseBlob(ValidBlob(32, 0xffffffff)), IsOk());
  std::string blob = ValidBlob(32, 0x01000000);
  blob[30] = 0;  // version bytes are [30, 34)
  EXPECT_THAT(ParseBlob(blob), IsInvalidCiphertext());
}

TEST(ParseBlobTest, RejectsATrailingByteBeyondTheMaximum) {
  const std::string blob = ValidBlob(kMaxBlobPlaintext);
  ASSERT_EQ(blob.size(), kMaxBlobSize);
  ASSERT_THAT(ParseBlob(blob), IsOk());
  EXPECT_THAT(ParseBlob(blob + '\0'), IsInvalidCiphertext());
}

TEST(ParseBlobTest, TreatsATrailingByteAsCiphertextForTheTagToReject) {
  // The format has no length field for the ciphertext, so a byte appended
  // to a shorter blob lands in ciphertext || tag; GoldenVectorsTest shows the
  // tag check then fails.
  const std::string blob = ValidBlob(32);
  CUSTOS_ASSERT_OK_AND_ASSIGN(ParsedBlob parsed, ParseBlob(blob + 'x'));
  EXPECT_EQ(parsed.ciphertext.size(), 32 + kBlobTagSize + 1);
}

TEST(ParseBlobTest, RejectsOversizedInputs) {
  EXPECT_THAT(ParseBlob(ValidBlob(kMaxBlobPlaintext + 1)),
              IsInvalidCiphertext());
  EXPECT_THAT(ParseBlob(ValidBlob(64 * 1024)), IsInvalidCiphertext());
  EXPECT_THAT(ParseBlob(std::string(1 << 20, '\x01')), IsInvalidCiphertext());
}

// --- Golden vectors ---------------------------------------------------------

struct EvpCtxDeleter {
  void operator()(EVP_CIPHER_CTX* ctx) const { EVP_CIPHER_CTX_free(ctx); }
};

// Software AES-256-GCM with a 16-byte tag, standing in for the HSM.
absl::StatusOr<std::string> GcmDecrypt(absl::string_view key,
                                       absl::string_view iv,
                                       absl::string_view aad,
                                       absl::string_view ciphertext_and_tag) {
  auto u = [](absl::string_view s) {
    return reinterpret_cast<const unsigned char*>(s.data());
  };
  if (key.size() != 32 || iv.size() != kBlobIvSize ||
      ciphertext_and_tag.size() < kBlobTagSize) {
    return absl::InvalidArgumentError("bad sizes");
  }
  const absl::string_view ct =
      ciphertext_and_tag.substr(0, ciphertext_and_tag.size() - kBlobTagSize);
  std::string tag(ciphertext_and_tag.substr(ct.size()));
  std::unique_ptr<EVP_CIPHER_CTX, EvpCtxDeleter> ctx(EVP_CIPHER_CTX_new());
  std::string out(ct.size() + 16, '\0');
  int len = 0, final_len = 0;
  if (ctx == nullptr ||
      EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, nullptr,
                         nullptr) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN,
                          static_cast<int>(iv.size()), nullptr) != 1 ||
      EVP_DecryptInit_ex(ctx.get(), nullptr, nullptr, u(key), u(iv)) != 1 ||
      EVP_DecryptUpdate(ctx.get(), nullptr, &len, u(aad),
                        static_cast<int>(aad.size())) != 1 ||
      EVP_DecryptUpdate(ctx.get(), reinterpret_cast<unsigned char*>(&out[0]),
                        &len, u(ct), static_cast<int>(ct.size())) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG,
                          static_cast<int>(tag.size()), tag.data()) != 1 ||
      EVP_DecryptFinal_ex(ctx.get(),
                          reinterpret_cast<unsigned char*>(&out[len]),
                          &final_len) != 1) {
    return absl::InvalidArgumentError("GCM open failed");
  }
  out.resize(len + final_len);
  return out;
}

// What Decrypt does with a blob, minus the key lookup: parse, rebuild the
// AAD, open; every failure is the one uniform error.
absl::StatusOr<std::string> Open(absl::string_view key, absl::string_view blob,
                                 const EncryptionContext& context) {
  absl::StatusOr<ParsedBlob> parsed = ParseBlob(blob);
  if (!parsed.ok()) return parsed.status();
  absl::StatusOr<std::string> plaintext =
      GcmDecrypt(key, parsed->iv, BlobAad(parsed->header_bytes, context),
                 parsed->ciphertext);
  if (!plaintext.ok()) return InvalidCiphertext();
  return plaintext;
}

// Lowercase hex to bytes; fails the test on anything else.
std::string Unhex(const std::string& hex) {
  const std::string bytes = absl::HexStringToBytes(hex);
  EXPECT_EQ(Hex(bytes), hex) << "not lowercase hex";
  return bytes;
}

struct GoldenVector {
  std::string description;
  std::string key_id;
  uint32_t version = 0;
  EncryptionContext context;
  std::string plaintext;
  std::string iv;
  std::string aad;
  std::string blob;
};

struct GoldenFile {
  std::string key;
  std::vector<GoldenVector> vectors;
};

GoldenFile LoadGoldenFile() {
  const std::string path =
      std::string(CUSTOS_TESTDATA_DIR) + "/ciphertext_v1_vectors.json";
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  GoldenFile file;
  const nlohmann::json doc = nlohmann::json::parse(in, nullptr, false);
  EXPECT_FALSE(doc.is_discarded()) << "malformed JSON in " << path;
  if (doc.is_discarded()) return file;
  file.key = Unhex(doc.at("key_hex").get<std::string>());
  for (const nlohmann::json& j : doc.at("vectors")) {
    GoldenVector v;
    v.description = j.at("description").get<std::string>();
    v.key_id = j.at("key_id").get<std::string>();
    v.version = j.at("version").get<uint32_t>();
    for (const auto& [k, value] : j.at("encryption_context").items()) {
      v.context[k] = value.get<std::string>();
    }
    if (j.contains("plaintext_hex")) {
      v.plaintext = Unhex(j.at("plaintext_hex").get<std::string>());
    } else {
      // A unit repeated and cut to size, to keep the file small.
      const std::string unit =
          Unhex(j.at("plaintext_pattern").get<std::string>());
      const size_t size = j.at("plaintext_size").get<size_t>();
      EXPECT_FALSE(unit.empty());
      while (!unit.empty() && v.plaintext.size() < size) v.plaintext += unit;
      v.plaintext.resize(size);
    }
    v.iv = Unhex(j.at("iv_hex").get<std::string>());
    v.aad = Unhex(j.at("aad_hex").get<std::string>());
    v.blob = Unhex(j.at("blob_hex").get<std::string>());
    file.vectors.push_back(std::move(v));
  }
  return file;
}

class GoldenVectorsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { file_ = new GoldenFile(LoadGoldenFile()); }
  static void TearDownTestSuite() {
    delete file_;
    file_ = nullptr;
  }
  static const GoldenFile& file() { return *file_; }

 private:
  static GoldenFile* file_;
};

GoldenFile* GoldenVectorsTest::file_ = nullptr;

TEST_F(GoldenVectorsTest, FileHoldsTheFixedKeyAndFourVectors) {
  std::string fixed_key;
  for (int i = 0; i < 32; ++i) fixed_key.push_back(static_cast<char>(i));
  EXPECT_EQ(file().key, fixed_key);
  ASSERT_EQ(file().vectors.size(), 4u);
  EXPECT_TRUE(file().vectors[0].context.empty());
  EXPECT_EQ(file().vectors[1].context.size(), 2u);
  EXPECT_EQ(file().vectors[2].plaintext.size(), 32u);
  EXPECT_EQ(file().vectors[3].plaintext.size(), kMaxBlobPlaintext);
}

TEST_F(GoldenVectorsTest, EveryVectorParsesAndDecrypts) {
  for (const GoldenVector& v : file().vectors) {
    SCOPED_TRACE(v.description);
    EXPECT_THAT(ValidateEncryptionContext(v.context), IsOk());
    CUSTOS_ASSERT_OK_AND_ASSIGN(ParsedBlob parsed, ParseBlob(v.blob));
    EXPECT_EQ(parsed.header.key_id, v.key_id);
    EXPECT_EQ(parsed.header.version, v.version);
    EXPECT_THAT(EncodeBlobHeader(parsed.header),
                IsOkAndHolds(Eq(parsed.header_bytes)));
    EXPECT_EQ(parsed.iv, v.iv);
    const std::string aad = BlobAad(parsed.header_bytes, v.context);
    EXPECT_EQ(Hex(aad), Hex(v.aad));
    EXPECT_THAT(GcmDecrypt(file().key, parsed.iv, aad, parsed.ciphertext),
                IsOkAndHolds(Eq(v.plaintext)));
    EXPECT_EQ(AssembleBlob(parsed.header_bytes, parsed.iv, parsed.ciphertext),
              v.blob);
  }
}

TEST_F(GoldenVectorsTest, ReorderedContextStillOpens) {
  // std::map has no order of its own to lose, but a context built in the
  // reverse order must give the same canonical bytes.
  const GoldenVector& v = file().vectors[1];
  EncryptionContext reversed;
  for (auto it = v.context.rbegin(); it != v.context.rend(); ++it) {
    reversed.emplace_hint(reversed.begin(), it->first, it->second);
  }
  EXPECT_THAT(Open(file().key, v.blob, reversed),
              IsOkAndHolds(Eq(v.plaintext)));
}

TEST_F(GoldenVectorsTest, TruncationAtEveryOffsetDoesNotOpen) {
  for (const GoldenVector& v : file().vectors) {
    SCOPED_TRACE(v.description);
    for (size_t len = 0; len < v.blob.size(); ++len) {
      ASSERT_THAT(Open(file().key, v.blob.substr(0, len), v.context),
                  IsInvalidCiphertext())
          << "length " << len;
    }
  }
}

TEST_F(GoldenVectorsTest, EverySingleBitFlipDoesNotOpen) {
  for (const GoldenVector& v : file().vectors) {
    SCOPED_TRACE(v.description);
    for (size_t i = 0; i < v.blob.size(); ++i) {
      for (int bit = 0; bit < 8; ++bit) {
        std::string blob = v.blob;
        blob[i] = static_cast<char>(blob[i] ^ (1 << bit));
        ASSERT_THAT(Open(file().key, blob, v.context), IsInvalidCiphertext())
            << "byte " << i << " bit " << bit;
      }
    }
  }
}

TEST_F(GoldenVectorsTest, TrailingByteDoesNotOpen) {
  for (const GoldenVector& v : file().vectors) {
    SCOPED_TRACE(v.description);
    EXPECT_THAT(Open(file().key, v.blob + '\0', v.context),
                IsInvalidCiphertext());
  }
}

TEST_F(GoldenVectorsTest, HeaderRewrittenToAnotherKeyOrVersionDoesNotOpen) {
  for (const GoldenVector& v : file().vectors) {
    SCOPED_TRACE(v.description);
    CUSTOS_ASSERT_OK_AND_ASSIGN(ParsedBlob parsed, ParseBlob(v.blob));
    const std::string rest = v.blob.substr(kBlobHeaderSize);
    const std::string other_key =
        HeaderBytes("k-zzzzzzzzzzzzzzzzzzzzzzzzzz", v.version);
    EXPECT_THAT(Open(file().key, other_key + rest, v.context),
                IsInvalidCiphertext());
    const uint32_t other_version = v.version == 1 ? 2 : v.version - 1;
    EXPECT_THAT(Open(file().key, HeaderBytes(v.key_id, other_version) + rest,
                     v.context),
                IsInvalidCiphertext());
  }
}

TEST_F(GoldenVectorsTest, ChangedContextDoesNotOpen) {
  const GoldenVector& v = file().vectors[1];  // {purpose, tenant}
  ASSERT_EQ(v.context.count("tenant"), 1u);
  EncryptionContext missing = v.context;
  missing.erase("tenant");
  EncryptionContext extra = v.context;
  extra["region"] = "eu";
  EncryptionContext empty_instead_of_absent = v.context;
  empty_instead_of_absent["region"] = "";
  EncryptionContext recased_key = missing;
  recased_key["Tenant"] = v.context.at("tenant");
  EncryptionContext recased_value = v.context;
  recased_value["tenant"] = "ACME";
  for (const EncryptionContext& context :
       {missing, extra, empty_instead_of_absent, recased_key, recased_value,
        EncryptionContext{}}) {
    EXPECT_THAT(Open(file().key, v.blob, context), IsInvalidCiphertext())
        << Hex(CanonicalEncryptionContext(context));
  }
  // And an empty context is not the same as a context with an empty pair.
  const GoldenVector& empty = file().vectors[0];
  EXPECT_THAT(Open(file().key, empty.blob, {{"tenant", ""}}),
              IsInvalidCiphertext());
}

}  // namespace
}  // namespace custos::kms
