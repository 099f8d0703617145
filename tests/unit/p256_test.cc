#include "common/p256.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>

#include <memory>

#include "absl/strings/escaping.h"
#include "common/testing/status_matchers.h"

namespace custos {
namespace {

using ::custos::testing::IsOk;
using ::custos::testing::StatusIs;

// A P-256 key made with OpenSSL, playing the HSM's part: its public point as
// PKCS#11 reports it (DER OCTET STRING) and raw r||s signatures.
class P256Test : public ::testing::Test {
 protected:
  void SetUp() override {
    key_ = EVP_EC_gen("P-256");
    ASSERT_NE(key_, nullptr);
    unsigned char point[65];
    size_t len = 0;
    ASSERT_EQ(EVP_PKEY_get_octet_string_param(key_, "encoded-pub-key", point,
                                              sizeof(point), &len),
              1);
    ASSERT_EQ(len, 65u);
    ec_point_ = std::string("\x04\x41", 2) +
                std::string(reinterpret_cast<char*>(point), len);
  }
  void TearDown() override { EVP_PKEY_free(key_); }

  std::string SignRaw(const std::string& message) {
    EVP_MD_CTX* md = EVP_MD_CTX_new();
    size_t der_len = 0;
    EXPECT_EQ(EVP_DigestSignInit(md, nullptr, EVP_sha256(), nullptr, key_), 1);
    EVP_DigestSign(md, nullptr, &der_len,
                   reinterpret_cast<const unsigned char*>(message.data()),
                   message.size());
    std::string der(der_len, '\0');
    EXPECT_EQ(EVP_DigestSign(
                  md, reinterpret_cast<unsigned char*>(der.data()), &der_len,
                  reinterpret_cast<const unsigned char*>(message.data()),
                  message.size()),
              1);
    EVP_MD_CTX_free(md);
    const unsigned char* p = reinterpret_cast<unsigned char*>(der.data());
    ECDSA_SIG* sig = d2i_ECDSA_SIG(nullptr, &p, der_len);
    std::string raw(64, '\0');
    BN_bn2binpad(ECDSA_SIG_get0_r(sig),
                 reinterpret_cast<unsigned char*>(raw.data()), 32);
    BN_bn2binpad(ECDSA_SIG_get0_s(sig),
                 reinterpret_cast<unsigned char*>(raw.data()) + 32, 32);
    ECDSA_SIG_free(sig);
    return raw;
  }

  EVP_PKEY* key_ = nullptr;
  std::string ec_point_;
};

TEST_F(P256Test, PemFromEcPointVerifiesSignatures) {
  auto pem = P256PublicKeyPemFromEcPoint(ec_point_);
  ASSERT_THAT(pem, IsOk());
  EXPECT_THAT(*pem, ::testing::StartsWith("-----BEGIN PUBLIC KEY-----"));
  std::string sig = SignRaw("checkpoint 42");
  EXPECT_THAT(VerifyP256Signature(*pem, "checkpoint 42", sig), IsOk());
}

TEST_F(P256Test, AlteredMessageOrSignatureFails) {
  auto pem = P256PublicKeyPemFromEcPoint(ec_point_);
  ASSERT_THAT(pem, IsOk());
  std::string sig = SignRaw("checkpoint 42");
  EXPECT_THAT(VerifyP256Signature(*pem, "checkpoint 43", sig),
              StatusIs(absl::StatusCode::kInvalidArgument));
  for (size_t i = 0; i < sig.size(); i += 7) {
    std::string bad = sig;
    bad[i] ^= 0x01;
    EXPECT_THAT(VerifyP256Signature(*pem, "checkpoint 42", bad),
                StatusIs(absl::StatusCode::kInvalidArgument))
        << "byte " << i;
  }
  EXPECT_THAT(VerifyP256Signature(*pem, "checkpoint 42", sig.substr(1)),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(P256Test, MalformedPointsAndKeysAreRefused) {
  EXPECT_THAT(P256PublicKeyPemFromEcPoint(ec_point_.substr(0, 30)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  std::string not_on_curve = ec_point_;
  not_on_curve[40] ^= 0x55;
  EXPECT_THAT(P256PublicKeyPemFromEcPoint(not_on_curve),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(VerifyP256Signature("not a pem", "m", std::string(64, 'x')),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(Sha256Test, KnownVector) {
  EXPECT_EQ(absl::BytesToHexString(Sha256("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

}  // namespace
}  // namespace custos
