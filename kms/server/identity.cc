#include "kms/server/identity.h"

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <memory>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "kms/principal.h"

namespace custos::server {
namespace {

struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct NamesFree {
  void operator()(GENERAL_NAMES* n) const { GENERAL_NAMES_free(n); }
};

std::string Asn1String(const ASN1_STRING* s) {
  return std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                     ASN1_STRING_length(s));
}

std::unique_ptr<X509, X509Free> ReadPem(const std::string& pem) {
  std::unique_ptr<BIO, BioFree> bio(
      BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  return std::unique_ptr<X509, X509Free>(
      bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr);
}

// The subject CN in UTF-8 (whatever ASN.1 string type holds it); `found`
// false when the subject has none.
absl::StatusOr<std::string> CommonNameUtf8(X509* cert, bool* found) {
  *found = false;
  X509_NAME* subject = X509_get_subject_name(cert);
  const int index = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
  if (index < 0) return std::string();
  *found = true;
  unsigned char* utf8 = nullptr;
  const int length = ASN1_STRING_to_UTF8(
      &utf8, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, index)));
  if (length < 0) {
    return absl::UnauthenticatedError(
        "client certificate names no usable identity: its subject CN cannot "
        "be read as text");
  }
  std::string out(reinterpret_cast<char*>(utf8), static_cast<size_t>(length));
  OPENSSL_free(utf8);
  return out;
}

}  // namespace

absl::StatusOr<std::string> IdentityFromPem(const std::string& pem) {
  std::unique_ptr<X509, X509Free> cert = ReadPem(pem);
  if (cert == nullptr) {
    return absl::UnauthenticatedError("client certificate is unreadable");
  }
  // basicConstraints CA:TRUE is refused whatever keyUsage says
  // (X509_check_ca alone would accept a CA:TRUE leaf without keyCertSign).
  // Reading the flags also caches the extensions the checks below use.
  if ((X509_get_extension_flags(cert.get()) & EXFLAG_CA) != 0 ||
      X509_check_ca(cert.get()) != 0) {
    return absl::UnauthenticatedError(
        "client certificate is a CA certificate (basicConstraints CA:TRUE); "
        "issue a leaf certificate for the client");
  }
  const uint32_t flags = X509_get_extension_flags(cert.get());
  if ((flags & EXFLAG_XKUSAGE) == 0 ||
      (X509_get_extended_key_usage(cert.get()) & XKU_SSL_CLIENT) == 0) {
    return absl::UnauthenticatedError(
        "client certificate lacks the clientAuth extended key usage");
  }
  std::unique_ptr<GENERAL_NAMES, NamesFree> names(static_cast<GENERAL_NAMES*>(
      X509_get_ext_d2i(cert.get(), NID_subject_alt_name, nullptr, nullptr)));
  const GENERAL_NAME* uri = nullptr;
  const GENERAL_NAME* dns = nullptr;
  if (names != nullptr) {
    for (int i = 0; i < sk_GENERAL_NAME_num(names.get()); ++i) {
      const GENERAL_NAME* name = sk_GENERAL_NAME_value(names.get(), i);
      if (name->type == GEN_URI && uri == nullptr) uri = name;
      if (name->type == GEN_DNS && dns == nullptr) dns = name;
    }
  }
  // The first name of the strongest kind decides; a bad one is refused
  // rather than skipped for a weaker kind.
  if (uri != nullptr) {
    return kms::UriPrincipal(Asn1String(uri->d.uniformResourceIdentifier));
  }
  if (dns != nullptr) return kms::DnsPrincipal(Asn1String(dns->d.dNSName));
  bool found = false;
  absl::StatusOr<std::string> cn = CommonNameUtf8(cert.get(), &found);
  if (!cn.ok()) return cn.status();
  if (!found) {
    return absl::UnauthenticatedError(
        "client certificate names no usable identity (no SAN URI, no SAN DNS "
        "name and no subject CN); issue it with a SAN URI such as "
        "spiffe://example.org/service");
  }
  return kms::CnPrincipal(*cn);
}

std::string CertificateFingerprint(const std::string& pem) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  std::unique_ptr<X509, X509Free> cert = ReadPem(pem);
  unsigned char* der = nullptr;
  const int length = cert == nullptr ? -1 : i2d_X509(cert.get(), &der);
  if (length > 0) {
    SHA256(der, static_cast<size_t>(length), digest);
    OPENSSL_free(der);
  } else {
    SHA256(reinterpret_cast<const unsigned char*>(pem.data()), pem.size(),
           digest);
  }
  return absl::StrCat(
      kms::kCertHashPrincipalPrefix,
      absl::BytesToHexString(absl::string_view(
          reinterpret_cast<const char*>(digest), sizeof(digest))));
}

PeerIdentity IdentityCache::Lookup(absl::string_view pem) {
  {
    absl::MutexLock lock(&mu_);
    auto it = cache_.find(pem);  // no copy of the PEM on a hit
    if (it != cache_.end()) return it->second;
  }
  const std::string text(pem);
  PeerIdentity identity{IdentityFromPem(text), ""};
  if (!identity.principal.ok()) {
    identity.fingerprint = CertificateFingerprint(text);
  }
  absl::MutexLock lock(&mu_);
  if (cache_.size() >= kMaxEntries) cache_.clear();
  cache_.emplace(text, identity);
  return identity;
}

}  // namespace custos::server
