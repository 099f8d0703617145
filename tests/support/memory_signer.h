// MemorySigner: an AuditSigner whose P-256 key lives in process memory
// (OpenSSL), standing in for the HSM in audit tests and benchmarks. It signs
// like the HSM does (raw r||s over SHA-256). Thread-safe enough for one
// writer thread; not for production.
#ifndef CUSTOS_TESTS_SUPPORT_MEMORY_SIGNER_H_
#define CUSTOS_TESTS_SUPPORT_MEMORY_SIGNER_H_

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <string>

#include "absl/status/statusor.h"
#include "kms/audit/checkpoint.h"

namespace custos::testing {

using ::custos::kms::AuditSigner;
using ::custos::kms::PublicKeyFingerprint;

class MemorySigner : public AuditSigner {
 public:
  MemorySigner() : key_(EVP_EC_gen("P-256")) {
    BIO* bio = BIO_new(BIO_s_mem());
    PEM_write_bio_PUBKEY(bio, key_);
    char* data = nullptr;
    long len = BIO_get_mem_data(bio, &data);
    pem_.assign(data, len);
    BIO_free(bio);
    fingerprint_ = PublicKeyFingerprint(pem_);
  }
  ~MemorySigner() override { EVP_PKEY_free(key_); }
  absl::StatusOr<std::string> Sign(absl::string_view message) override {
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    unsigned char der[128];
    size_t der_len = sizeof(der);
    bool ok =
        EVP_DigestSignInit(ctx, nullptr, EVP_sha256(), nullptr, key_) == 1 &&
        EVP_DigestSign(ctx, der, &der_len,
                       reinterpret_cast<const unsigned char*>(message.data()),
                       message.size()) == 1;
    EVP_MD_CTX_free(ctx);
    if (!ok) return absl::InternalError("sign failed");
    const unsigned char* p = der;
    ECDSA_SIG* sig = d2i_ECDSA_SIG(nullptr, &p, der_len);
    if (sig == nullptr) return absl::InternalError("bad DER signature");
    std::string raw(64, '\0');
    auto* out = reinterpret_cast<unsigned char*>(raw.data());
    BN_bn2binpad(ECDSA_SIG_get0_r(sig), out, 32);
    BN_bn2binpad(ECDSA_SIG_get0_s(sig), out + 32, 32);
    ECDSA_SIG_free(sig);
    return raw;
  }
  const std::string& public_key_pem() const override { return pem_; }
  const std::string& fingerprint() const override { return fingerprint_; }

 private:
  EVP_PKEY* key_;
  std::string pem_, fingerprint_;
};

}  // namespace custos::testing

#endif  // CUSTOS_TESTS_SUPPORT_MEMORY_SIGNER_H_
