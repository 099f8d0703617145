#include "common/p256.h"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/sha.h>

#include <memory>

#include "absl/strings/str_cat.h"

namespace custos {
namespace {

template <auto Fn>
struct Deleter {
  template <typename T>
  void operator()(T* p) const {
    Fn(p);
  }
};
using BioPtr = std::unique_ptr<BIO, Deleter<BIO_free_all>>;
using PkeyPtr = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY_free>>;
using PkeyCtxPtr = std::unique_ptr<EVP_PKEY_CTX, Deleter<EVP_PKEY_CTX_free>>;
using ParamBldPtr =
    std::unique_ptr<OSSL_PARAM_BLD, Deleter<OSSL_PARAM_BLD_free>>;
using ParamPtr = std::unique_ptr<OSSL_PARAM, Deleter<OSSL_PARAM_free>>;
using OctetPtr =
    std::unique_ptr<ASN1_OCTET_STRING, Deleter<ASN1_OCTET_STRING_free>>;
using SigPtr = std::unique_ptr<ECDSA_SIG, Deleter<ECDSA_SIG_free>>;
using MdCtxPtr = std::unique_ptr<EVP_MD_CTX, Deleter<EVP_MD_CTX_free>>;

struct OpensslFree {
  void operator()(unsigned char* p) const { OPENSSL_free(p); }
};

constexpr size_t kUncompressedPointSize = 65;

}  // namespace

std::string Sha256(absl::string_view data) {
  std::string out(SHA256_DIGEST_LENGTH, '\0');
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(),
         reinterpret_cast<unsigned char*>(out.data()));
  return out;
}

absl::StatusOr<std::string> P256PublicKeyPemFromEcPoint(
    absl::string_view ec_point_der) {
  const unsigned char* p =
      reinterpret_cast<const unsigned char*>(ec_point_der.data());
  OctetPtr octets(d2i_ASN1_OCTET_STRING(nullptr, &p, ec_point_der.size()));
  if (octets == nullptr ||
      p != reinterpret_cast<const unsigned char*>(ec_point_der.data()) +
               ec_point_der.size() ||
      ASN1_STRING_length(octets.get()) != kUncompressedPointSize ||
      ASN1_STRING_get0_data(octets.get())[0] != 0x04) {
    return absl::InvalidArgumentError(
        "EC point: expected a DER OCTET STRING holding an uncompressed P-256 "
        "point");
  }
  ParamBldPtr bld(OSSL_PARAM_BLD_new());
  if (bld == nullptr ||
      !OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME,
                                       "prime256v1", 0) ||
      !OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY,
                                        ASN1_STRING_get0_data(octets.get()),
                                        kUncompressedPointSize)) {
    return absl::InternalError("EC point: OpenSSL parameter build failed");
  }
  ParamPtr params(OSSL_PARAM_BLD_to_param(bld.get()));
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
  EVP_PKEY* raw = nullptr;
  if (params == nullptr || ctx == nullptr ||
      EVP_PKEY_fromdata_init(ctx.get()) <= 0 ||
      EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params.get()) <=
          0) {
    return absl::InvalidArgumentError("EC point: not a valid P-256 point");
  }
  PkeyPtr pkey(raw);
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr || PEM_write_bio_PUBKEY(bio.get(), pkey.get()) != 1) {
    return absl::InternalError("EC point: PEM encoding failed");
  }
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, len);
}

absl::Status VerifyP256Signature(absl::string_view public_key_pem,
                                 absl::string_view message,
                                 absl::string_view raw_signature) {
  if (raw_signature.size() != kP256RawSignatureSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("signature: expected ", kP256RawSignatureSize,
                     " bytes (r||s), got ", raw_signature.size()));
  }
  BioPtr bio(BIO_new_mem_buf(public_key_pem.data(),
                             static_cast<int>(public_key_pem.size())));
  PkeyPtr pkey(bio ? PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr)
                   : nullptr);
  if (pkey == nullptr || !EVP_PKEY_is_a(pkey.get(), "EC")) {
    return absl::InvalidArgumentError(
        "public key: not a PEM EC public key (expected 'BEGIN PUBLIC KEY')");
  }
  char group[64] = {0};
  size_t group_len = 0;
  if (!EVP_PKEY_get_utf8_string_param(pkey.get(), OSSL_PKEY_PARAM_GROUP_NAME,
                                      group, sizeof(group), &group_len) ||
      absl::string_view(group, group_len) != "prime256v1") {
    return absl::InvalidArgumentError("public key: curve is not P-256");
  }
  const auto* sig_bytes =
      reinterpret_cast<const unsigned char*>(raw_signature.data());
  SigPtr sig(ECDSA_SIG_new());
  BIGNUM* r = BN_bin2bn(sig_bytes, 32, nullptr);
  BIGNUM* s = BN_bin2bn(sig_bytes + 32, 32, nullptr);
  if (sig == nullptr || r == nullptr || s == nullptr ||
      ECDSA_SIG_set0(sig.get(), r, s) != 1) {
    BN_free(r);
    BN_free(s);
    return absl::InternalError("signature: OpenSSL allocation failed");
  }
  unsigned char* der = nullptr;
  int der_len = i2d_ECDSA_SIG(sig.get(), &der);
  if (der_len <= 0) return absl::InternalError("signature: encoding failed");
  std::unique_ptr<unsigned char, OpensslFree> der_owner(der);
  MdCtxPtr md(EVP_MD_CTX_new());
  if (md == nullptr || EVP_DigestVerifyInit(md.get(), nullptr, EVP_sha256(),
                                            nullptr, pkey.get()) != 1) {
    return absl::InternalError("signature: OpenSSL verify init failed");
  }
  if (EVP_DigestVerify(md.get(), der, der_len,
                       reinterpret_cast<const unsigned char*>(message.data()),
                       message.size()) != 1) {
    return absl::InvalidArgumentError("signature: does not verify");
  }
  return absl::OkStatus();
}

}  // namespace custos
