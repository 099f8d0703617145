#include "tests/support/test_certs.h"

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <cstdint>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace custos::testing {
namespace {

struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct BnFree {
  void operator()(BIGNUM* b) const { BN_free(b); }
};
struct NamesFree {
  void operator()(GENERAL_NAMES* n) const { GENERAL_NAMES_free(n); }
};
struct ExtFree {
  void operator()(X509_EXTENSION* e) const { X509_EXTENSION_free(e); }
};
struct CrlFree {
  void operator()(X509_CRL* c) const { X509_CRL_free(c); }
};
struct TimeFree {
  void operator()(ASN1_TIME* t) const { ASN1_TIME_free(t); }
};
using X509Ptr = std::unique_ptr<X509, X509Free>;
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyFree>;
using BioPtr = std::unique_ptr<BIO, BioFree>;

// The OpenSSL error queue as text, emptied.
absl::Status OpensslError(absl::string_view what) {
  std::string detail;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    absl::StrAppend(&detail, detail.empty() ? "" : "; ", buf);
  }
  return absl::InternalError(absl::StrCat("test_certs: ", what, ": ",
                                          detail.empty() ? "failed" : detail));
}

absl::StatusOr<PkeyPtr> NewP256Key() {
  PkeyPtr key(EVP_EC_gen("P-256"));
  if (key == nullptr) return OpensslError("EVP_EC_gen(P-256)");
  return key;
}

absl::StatusOr<PkeyPtr> ReadKey(const std::string& pem) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  PkeyPtr key(
      bio ? PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr)
          : nullptr);
  if (key == nullptr) return OpensslError("read issuer key");
  return key;
}

absl::StatusOr<X509Ptr> ReadCert(const std::string& pem) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  X509Ptr cert(bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)
                   : nullptr);
  if (cert == nullptr) return OpensslError("read issuer certificate");
  return cert;
}

// Sets `t` to now + `offset`, split into days and seconds so that offsets of
// many years do not overflow a long on any platform.
absl::Status SetTime(ASN1_TIME* t, absl::Duration offset) {
  const int64_t total = absl::ToInt64Seconds(offset);
  const int64_t days = total / 86400;
  const int64_t secs = total % 86400;
  if (X509_time_adj_ex(t, static_cast<int>(days), static_cast<long>(secs),
                       nullptr) == nullptr) {
    return OpensslError("X509_time_adj_ex");
  }
  return absl::OkStatus();
}

// Adds an extension given in OpenSSL's configuration syntax.
absl::Status AddConfExt(X509* cert, X509V3_CTX* ctx, int nid,
                        const std::string& value) {
  std::unique_ptr<X509_EXTENSION, ExtFree> ext(
      X509V3_EXT_conf_nid(nullptr, ctx, nid, value.c_str()));
  if (ext == nullptr || X509_add_ext(cert, ext.get(), -1) != 1) {
    return OpensslError(
        absl::StrCat("extension ", OBJ_nid2sn(nid), "=", value));
  }
  return absl::OkStatus();
}

// Builds the subjectAltName by hand rather than from configuration text, so
// that any bytes (commas, control characters) reach the certificate as given.
absl::Status AddSan(X509* cert, const CertSpec& spec) {
  if (spec.uris.empty() && spec.dns_names.empty() && spec.ips.empty()) {
    return absl::OkStatus();
  }
  std::unique_ptr<GENERAL_NAMES, NamesFree> names(sk_GENERAL_NAME_new_null());
  if (names == nullptr) return OpensslError("sk_GENERAL_NAME_new_null");
  auto add_ia5 = [&](int type, const std::string& value) -> absl::Status {
    ASN1_IA5STRING* s = ASN1_IA5STRING_new();
    if (s == nullptr ||
        ASN1_STRING_set(s, value.data(), static_cast<int>(value.size())) != 1) {
      ASN1_IA5STRING_free(s);
      return OpensslError("ASN1_STRING_set");
    }
    GENERAL_NAME* name = GENERAL_NAME_new();
    if (name == nullptr) {
      ASN1_IA5STRING_free(s);
      return OpensslError("GENERAL_NAME_new");
    }
    GENERAL_NAME_set0_value(name, type, s);
    if (sk_GENERAL_NAME_push(names.get(), name) == 0) {
      GENERAL_NAME_free(name);
      return OpensslError("sk_GENERAL_NAME_push");
    }
    return absl::OkStatus();
  };
  for (const std::string& uri : spec.uris) {
    absl::Status s = add_ia5(GEN_URI, uri);
    if (!s.ok()) return s;
  }
  for (const std::string& dns : spec.dns_names) {
    absl::Status s = add_ia5(GEN_DNS, dns);
    if (!s.ok()) return s;
  }
  for (const std::string& ip : spec.ips) {
    ASN1_OCTET_STRING* bytes = a2i_IPADDRESS(ip.c_str());
    if (bytes == nullptr) {
      return OpensslError(absl::StrCat("not an IP address: ", ip));
    }
    GENERAL_NAME* name = GENERAL_NAME_new();
    if (name == nullptr) {
      ASN1_OCTET_STRING_free(bytes);
      return OpensslError("GENERAL_NAME_new");
    }
    GENERAL_NAME_set0_value(name, GEN_IPADD, bytes);
    if (sk_GENERAL_NAME_push(names.get(), name) == 0) {
      GENERAL_NAME_free(name);
      return OpensslError("sk_GENERAL_NAME_push");
    }
  }
  if (X509_add1_ext_i2d(cert, NID_subject_alt_name, names.get(),
                        /*crit=*/0, X509V3_ADD_DEFAULT) != 1) {
    return OpensslError("add subjectAltName");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> KeyPem(EVP_PKEY* key) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr ||
      PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr,
                               nullptr) != 1) {
    return OpensslError("PEM_write_bio_PrivateKey");
  }
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(len));
}

absl::StatusOr<std::string> CertPem(X509* cert) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr || PEM_write_bio_X509(bio.get(), cert) != 1) {
    return OpensslError("PEM_write_bio_X509");
  }
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(len));
}

// Builds and signs a certificate for a fresh key. `issuer_cert` and
// `issuer_key` null: self-signed.
absl::StatusOr<KeyAndCert> Build(const CertSpec& spec, X509* issuer_cert,
                                 EVP_PKEY* issuer_key) {
  absl::StatusOr<PkeyPtr> key = NewP256Key();
  if (!key.ok()) return key.status();
  X509Ptr cert(X509_new());
  if (cert == nullptr) return OpensslError("X509_new");
  if (X509_set_version(cert.get(), X509_VERSION_3) != 1) {
    return OpensslError("X509_set_version");
  }
  // A random positive serial (RFC 5280 4.1.2.2: at most 20 octets).
  std::unique_ptr<BIGNUM, BnFree> serial(BN_new());
  if (serial == nullptr ||
      BN_rand(serial.get(), 127, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) != 1 ||
      BN_to_ASN1_INTEGER(serial.get(), X509_get_serialNumber(cert.get())) ==
          nullptr) {
    return OpensslError("serial");
  }
  absl::Status s = SetTime(X509_getm_notBefore(cert.get()), spec.not_before);
  if (!s.ok()) return s;
  s = SetTime(X509_getm_notAfter(cert.get()), spec.not_after);
  if (!s.ok()) return s;

  X509_NAME* subject = X509_get_subject_name(cert.get());
  if (!spec.common_name.empty() &&
      X509_NAME_add_entry_by_NID(
          subject, NID_commonName, MBSTRING_UTF8,
          reinterpret_cast<const unsigned char*>(spec.common_name.data()),
          static_cast<int>(spec.common_name.size()), -1, 0) != 1) {
    return OpensslError("subject CN");
  }
  X509* signer_cert = issuer_cert != nullptr ? issuer_cert : cert.get();
  EVP_PKEY* signer_key = issuer_key != nullptr ? issuer_key : key->get();
  if (X509_set_issuer_name(cert.get(), X509_get_subject_name(signer_cert)) !=
          1 ||
      X509_set_pubkey(cert.get(), key->get()) != 1) {
    return OpensslError("issuer name / public key");
  }

  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, signer_cert, cert.get(), nullptr, nullptr, 0);
  s = AddConfExt(cert.get(), &ctx, NID_basic_constraints,
                 spec.is_ca ? "critical,CA:TRUE" : "critical,CA:FALSE");
  if (!s.ok()) return s;
  s = AddConfExt(cert.get(), &ctx, NID_key_usage,
                 spec.is_ca ? "critical,keyCertSign,cRLSign"
                            : "critical,digitalSignature");
  if (!s.ok()) return s;
  if (spec.include_eku) {
    std::vector<std::string> usages;
    if (spec.client_auth) usages.push_back("clientAuth");
    if (spec.server_auth) usages.push_back("serverAuth");
    // An EKU extension must name at least one purpose: one that is neither.
    if (usages.empty()) usages.push_back("emailProtection");
    s = AddConfExt(cert.get(), &ctx, NID_ext_key_usage,
                   absl::StrJoin(usages, ","));
    if (!s.ok()) return s;
  }
  s = AddConfExt(cert.get(), &ctx, NID_subject_key_identifier, "hash");
  if (!s.ok()) return s;
  s = AddConfExt(cert.get(), &ctx, NID_authority_key_identifier,
                 "keyid:always");
  if (!s.ok()) return s;
  s = AddSan(cert.get(), spec);
  if (!s.ok()) return s;

  if (X509_sign(cert.get(), signer_key, EVP_sha256()) == 0) {
    return OpensslError("X509_sign");
  }
  KeyAndCert out;
  absl::StatusOr<std::string> key_pem = KeyPem(key->get());
  if (!key_pem.ok()) return key_pem.status();
  absl::StatusOr<std::string> cert_pem = CertPem(cert.get());
  if (!cert_pem.ok()) return cert_pem.status();
  out.key_pem = *std::move(key_pem);
  out.cert_pem = *std::move(cert_pem);
  return out;
}

}  // namespace

absl::StatusOr<KeyAndCert> MakeCa(const std::string& common_name) {
  CertSpec spec;
  spec.common_name = common_name;
  spec.is_ca = true;
  spec.include_eku = false;
  spec.not_after = absl::Hours(24 * 3650);
  return Build(spec, nullptr, nullptr);
}

absl::StatusOr<KeyAndCert> MakeCert(const KeyAndCert& issuer,
                                    const CertSpec& spec) {
  absl::StatusOr<PkeyPtr> key = ReadKey(issuer.key_pem);
  if (!key.ok()) return key.status();
  absl::StatusOr<X509Ptr> cert = ReadCert(issuer.cert_pem);
  if (!cert.ok()) return cert.status();
  return Build(spec, cert->get(), key->get());
}

absl::StatusOr<KeyAndCert> MakeSelfSigned(const CertSpec& spec) {
  return Build(spec, nullptr, nullptr);
}

absl::StatusOr<std::string> MakeCrl(
    const KeyAndCert& issuer, const std::vector<std::string>& revoked_cert_pems,
    absl::Duration next_update) {
  absl::StatusOr<PkeyPtr> key = ReadKey(issuer.key_pem);
  if (!key.ok()) return key.status();
  absl::StatusOr<X509Ptr> ca = ReadCert(issuer.cert_pem);
  if (!ca.ok()) return ca.status();
  std::unique_ptr<X509_CRL, CrlFree> crl(X509_CRL_new());
  std::unique_ptr<ASN1_TIME, TimeFree> last(ASN1_TIME_new());
  std::unique_ptr<ASN1_TIME, TimeFree> next(ASN1_TIME_new());
  if (crl == nullptr || last == nullptr || next == nullptr ||
      X509_CRL_set_version(crl.get(), X509_CRL_VERSION_2) != 1 ||
      X509_CRL_set_issuer_name(crl.get(), X509_get_subject_name(ca->get())) !=
          1) {
    return OpensslError("X509_CRL_new");
  }
  absl::Status s = SetTime(last.get(), -absl::Hours(1));
  if (!s.ok()) return s;
  s = SetTime(next.get(), next_update);
  if (!s.ok()) return s;
  if (X509_CRL_set1_lastUpdate(crl.get(), last.get()) != 1 ||
      X509_CRL_set1_nextUpdate(crl.get(), next.get()) != 1) {
    return OpensslError("CRL times");
  }
  for (const std::string& pem : revoked_cert_pems) {
    absl::StatusOr<X509Ptr> cert = ReadCert(pem);
    if (!cert.ok()) return cert.status();
    X509_REVOKED* entry = X509_REVOKED_new();
    if (entry == nullptr ||
        X509_REVOKED_set_serialNumber(
            entry, X509_get_serialNumber(cert->get())) != 1 ||
        X509_REVOKED_set_revocationDate(entry, last.get()) != 1 ||
        X509_CRL_add0_revoked(crl.get(), entry) != 1) {
      X509_REVOKED_free(entry);
      return OpensslError("CRL entry");
    }
  }
  if (X509_CRL_sort(crl.get()) != 1 ||
      X509_CRL_sign(crl.get(), key->get(), EVP_sha256()) == 0) {
    return OpensslError("X509_CRL_sign");
  }
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr || PEM_write_bio_X509_CRL(bio.get(), crl.get()) != 1) {
    return OpensslError("PEM_write_bio_X509_CRL");
  }
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(len));
}

absl::StatusOr<std::string> CrlPemToDer(const std::string& crl_pem) {
  BioPtr bio(BIO_new_mem_buf(crl_pem.data(), static_cast<int>(crl_pem.size())));
  std::unique_ptr<X509_CRL, CrlFree> crl(
      bio ? PEM_read_bio_X509_CRL(bio.get(), nullptr, nullptr, nullptr)
          : nullptr);
  if (crl == nullptr) return OpensslError("read CRL");
  unsigned char* der = nullptr;
  const int len = i2d_X509_CRL(crl.get(), &der);
  if (len <= 0) return OpensslError("i2d_X509_CRL");
  std::string out(reinterpret_cast<char*>(der), static_cast<size_t>(len));
  OPENSSL_free(der);
  return out;
}

absl::StatusOr<std::string> SerialHex(const std::string& cert_pem) {
  absl::StatusOr<X509Ptr> cert = ReadCert(cert_pem);
  if (!cert.ok()) return cert.status();
  std::unique_ptr<BIGNUM, BnFree> bn(
      ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert->get()), nullptr));
  if (bn == nullptr) return OpensslError("ASN1_INTEGER_to_BN");
  char* hex = BN_bn2hex(bn.get());
  if (hex == nullptr) return OpensslError("BN_bn2hex");
  std::string out(hex);
  OPENSSL_free(hex);
  return out;
}

}  // namespace custos::testing
