#include "kms/server/identity.h"

#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <memory>

#include "absl/strings/str_cat.h"

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

bool Printable(const std::string& s) {
  if (s.empty() || s.size() > 1024) return false;
  for (unsigned char c : s) {
    if (c < 0x21 || c == 0x7f) return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<std::string> IdentityFromPem(const std::string& pem) {
  std::unique_ptr<BIO, BioFree> bio(
      BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  std::unique_ptr<X509, X509Free> cert(
      bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr);
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
  std::string uri, dns;
  if (names != nullptr) {
    for (int i = 0; i < sk_GENERAL_NAME_num(names.get()); ++i) {
      const GENERAL_NAME* name = sk_GENERAL_NAME_value(names.get(), i);
      if (name->type == GEN_URI && uri.empty()) {
        uri = Asn1String(name->d.uniformResourceIdentifier);
      } else if (name->type == GEN_DNS && dns.empty()) {
        dns = Asn1String(name->d.dNSName);
      }
    }
  }
  std::string identity = !uri.empty() ? uri : dns;
  if (identity.empty()) {
    X509_NAME* subject = X509_get_subject_name(cert.get());
    int index = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
    if (index >= 0) {
      identity = Asn1String(
          X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, index)));
    }
  }
  if (!Printable(identity)) {
    return absl::UnauthenticatedError(
        "client certificate names no usable identity (SAN URI, DNS name or "
        "CN of printable characters)");
  }
  return identity;
}

absl::StatusOr<std::string> IdentityCache::Lookup(absl::string_view pem) {
  {
    absl::MutexLock lock(&mu_);
    auto it = cache_.find(pem);  // no copy of the PEM on a hit
    if (it != cache_.end()) return it->second;
  }
  absl::StatusOr<std::string> identity = IdentityFromPem(std::string(pem));
  absl::MutexLock lock(&mu_);
  if (cache_.size() >= kMaxEntries) cache_.clear();
  cache_.emplace(std::string(pem), identity);
  return identity;
}

}  // namespace custos::server
