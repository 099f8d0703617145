#include "kms/server/revocation.h"

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status_macros.h"

namespace custos::server {
namespace {

struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct CrlFree {
  void operator()(X509_CRL* c) const { X509_CRL_free(c); }
};
struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
using X509Ptr = std::unique_ptr<X509, X509Free>;
using CrlPtr = std::unique_ptr<X509_CRL, CrlFree>;
using BioPtr = std::unique_ptr<BIO, BioFree>;

constexpr char kPemCrlBegin[] = "-----BEGIN X509 CRL-----";

BioPtr MemBio(absl::string_view data) {
  return BioPtr(BIO_new_mem_buf(data.data(), static_cast<int>(data.size())));
}

// The PEM certificates of `pem`, in order; stops at the first that does not
// parse (the rest of a bundle is not silently half-read: the caller compares
// counts where it matters).
std::vector<X509Ptr> ReadCertificates(absl::string_view pem) {
  std::vector<X509Ptr> out;
  BioPtr bio = MemBio(pem);
  while (bio != nullptr) {
    X509Ptr cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    if (cert == nullptr) break;
    out.push_back(std::move(cert));
  }
  ERR_clear_error();  // the end of the input reads as an error
  return out;
}

std::string NameText(const X509_NAME* name) {
  char buf[256];
  X509_NAME_oneline(name, buf, sizeof(buf));
  return buf;
}

std::string Der(const X509_NAME* name) {
  unsigned char* der = nullptr;
  const int len = i2d_X509_NAME(name, &der);
  if (len <= 0) return "";
  std::string out(reinterpret_cast<char*>(der), static_cast<size_t>(len));
  OPENSSL_free(der);
  return out;
}

std::string Der(const ASN1_INTEGER* serial) {
  unsigned char* der = nullptr;
  const int len = i2d_ASN1_INTEGER(serial, &der);
  if (len <= 0) return "";
  std::string out(reinterpret_cast<char*>(der), static_cast<size_t>(len));
  OPENSSL_free(der);
  return out;
}

std::string EntryKey(const X509_NAME* issuer, const ASN1_INTEGER* serial) {
  std::string issuer_der = Der(issuer);
  return absl::StrCat(issuer_der.size(), ":", issuer_der, Der(serial));
}

// The CRLs of one file: PEM ("X509 CRL" blocks; every one must parse) or a
// single DER CRL.
absl::StatusOr<std::vector<CrlPtr>> ReadCrls(const RevocationList::CrlFile& f) {
  std::vector<CrlPtr> out;
  if (absl::StrContains(f.contents, kPemCrlBegin)) {
    size_t blocks = 0;
    for (size_t at = f.contents.find(kPemCrlBegin); at != std::string::npos;
         at = f.contents.find(kPemCrlBegin, at + 1)) {
      ++blocks;
    }
    BioPtr bio = MemBio(f.contents);
    while (bio != nullptr) {
      CrlPtr crl(PEM_read_bio_X509_CRL(bio.get(), nullptr, nullptr, nullptr));
      if (crl == nullptr) break;
      out.push_back(std::move(crl));
    }
    ERR_clear_error();
    if (out.size() != blocks) {
      return absl::InvalidArgumentError(absl::StrCat(
          "file '", f.name, "': ", blocks - out.size(), " of its ", blocks,
          " PEM CRLs cannot be read (truncated or corrupt?)"));
    }
    return out;
  }
  const unsigned char* p =
      reinterpret_cast<const unsigned char*>(f.contents.data());
  CrlPtr crl(d2i_X509_CRL(nullptr, &p, static_cast<long>(f.contents.size())));
  ERR_clear_error();
  if (crl == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("file '", f.name,
                     "' is not a CRL (PEM \"X509 CRL\" or DER expected); "
                     "move other files out of the directory"));
  }
  out.push_back(std::move(crl));
  return out;
}

// A digest of the CA bundle and every file (names and contents).
std::string Digest(const std::vector<RevocationList::CrlFile>& files,
                   absl::string_view ca_bundle_pem) {
  std::string all = absl::StrCat(ca_bundle_pem.size(), ":", ca_bundle_pem);
  for (const RevocationList::CrlFile& f : files) {
    absl::StrAppend(&all, f.name.size(), ":", f.name, f.contents.size(), ":",
                    f.contents);
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(all.data(), all.size(), md, &len, EVP_sha256(), nullptr);
  return std::string(reinterpret_cast<char*>(md), len);
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read '", path, "'"));
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) {
    return absl::UnavailableError(absl::StrCat("cannot read '", path, "'"));
  }
  return text.str();
}

}  // namespace

absl::StatusOr<std::vector<RevocationList::CrlFile>> RevocationList::ReadDir(
    const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::directory_iterator it(dir, ec);
  if (ec) {
    return absl::NotFoundError(
        absl::StrCat("cannot list directory '", dir, "': ", ec.message()));
  }
  std::vector<CrlFile> files;
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    if (ec) break;
    const std::string name = it->path().filename().string();
    if (name.empty() || name[0] == '.') continue;
    std::error_code type_ec;
    if (!fs::is_regular_file(it->path(), type_ec)) continue;  // follows links
    CUSTOS_ASSIGN_OR_RETURN(std::string contents,
                            ReadFile(it->path().string()));
    files.push_back({name, std::move(contents)});
  }
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot list directory '", dir, "': ", ec.message()));
  }
  std::sort(files.begin(), files.end(),
            [](const CrlFile& a, const CrlFile& b) { return a.name < b.name; });
  return files;
}

absl::StatusOr<std::shared_ptr<const RevocationList>> RevocationList::Parse(
    const std::vector<CrlFile>& files, absl::string_view ca_bundle_pem) {
  const std::vector<X509Ptr> cas = ReadCertificates(ca_bundle_pem);
  std::shared_ptr<RevocationList> list(new RevocationList());
  for (const CrlFile& file : files) {
    CUSTOS_ASSIGN_OR_RETURN(std::vector<CrlPtr> crls, ReadCrls(file));
    for (const CrlPtr& crl : crls) {
      const X509_NAME* issuer = X509_CRL_get_issuer(crl.get());
      bool named = false;
      bool verified = false;
      for (const X509Ptr& ca : cas) {
        if (X509_NAME_cmp(X509_get_subject_name(ca.get()), issuer) != 0) {
          continue;
        }
        named = true;
        EVP_PKEY* key = X509_get0_pubkey(ca.get());
        if (key != nullptr && X509_CRL_verify(crl.get(), key) == 1) {
          verified = true;
          break;
        }
      }
      ERR_clear_error();
      if (!verified) {
        return absl::InvalidArgumentError(absl::StrCat(
            "file '", file.name, "': a CRL issued by ", NameText(issuer),
            named ? " has a signature that no certificate of that name in "
                    "tls.client_ca verifies"
                  : ", which is not a CA of tls.client_ca; only CRLs of the "
                    "client CAs belong here"));
      }
      const ASN1_TIME* next = X509_CRL_get0_nextUpdate(crl.get());
      if (next != nullptr && X509_cmp_current_time(next) < 0) {
        // Still enforced: an overdue list is stale, not void, and refusing
        // every client of the CA would turn a late CRL into an outage.
        spdlog::warn(
            "tls.crl_dir: the CRL of {} in '{}' is past its nextUpdate; its "
            "revocations still apply; issue a new CRL",
            NameText(issuer), file.name);
      }
      STACK_OF(X509_REVOKED)* revoked = X509_CRL_get_REVOKED(crl.get());
      for (int i = 0; i < sk_X509_REVOKED_num(revoked); ++i) {
        const X509_REVOKED* entry = sk_X509_REVOKED_value(revoked, i);
        list->revoked_.emplace(
            EntryKey(issuer, X509_REVOKED_get0_serialNumber(entry)), file.name);
      }
      ++list->crl_count_;
    }
  }
  return list;
}

absl::StatusOr<std::shared_ptr<const RevocationList>> RevocationList::Load(
    const std::string& dir, absl::string_view ca_bundle_pem) {
  CUSTOS_ASSIGN_OR_RETURN(std::vector<CrlFile> files, ReadDir(dir));
  return Parse(files, ca_bundle_pem);
}

absl::StatusOr<std::optional<std::string>> RevocationList::RevokedBy(
    absl::string_view pem_chain) const {
  const std::vector<X509Ptr> chain = ReadCertificates(pem_chain);
  if (chain.empty()) {
    return absl::InvalidArgumentError("no readable certificate");
  }
  for (const X509Ptr& cert : chain) {
    auto it = revoked_.find(EntryKey(X509_get_issuer_name(cert.get()),
                                     X509_get0_serialNumber(cert.get())));
    if (it != revoked_.end()) return it->second;
  }
  return std::nullopt;
}

absl::StatusOr<std::unique_ptr<CrlWatcher>> CrlWatcher::Start(Options options) {
  std::unique_ptr<CrlWatcher> watcher(new CrlWatcher(std::move(options)));
  absl::Status loaded = watcher->ReloadIfChanged();
  if (!loaded.ok()) {
    return absl::Status(
        loaded.code(),
        absl::StrCat("config: tls.crl_dir: ", loaded.message(),
                     ". Fix or remove the file, or leave tls.crl_dir out "
                     "(an empty directory revokes nothing)"));
  }
  watcher->thread_ = std::thread([w = watcher.get()] { w->Watch(); });
  return watcher;
}

CrlWatcher::~CrlWatcher() {
  stop_.Notify();
  if (thread_.joinable()) thread_.join();
}

absl::Status CrlWatcher::Check(absl::string_view pem_chain) const {
  std::shared_ptr<const RevocationList> list;
  {
    absl::MutexLock lock(&mu_);
    list = list_;
  }
  if (list == nullptr) return absl::OkStatus();
  absl::StatusOr<std::optional<std::string>> by = list->RevokedBy(pem_chain);
  if (!by.ok()) {
    return absl::UnauthenticatedError(
        absl::StrCat("client certificate unreadable for the revocation "
                     "check: ",
                     by.status().message()));
  }
  if (by->has_value()) {
    return absl::UnauthenticatedError(
        absl::StrCat("client certificate revoked (by the CRL in '",
                     options_.dir, "/", **by, "')"));
  }
  return absl::OkStatus();
}

absl::Status CrlWatcher::ReloadIfChanged() {
  absl::MutexLock reload(&reload_mu_);
  absl::StatusOr<std::string> ca = ReadFile(options_.client_ca_path);
  if (!ca.ok()) {
    return absl::Status(ca.status().code(),
                        absl::StrCat("tls.client_ca: ", ca.status().message(),
                                     " (its CAs verify the CRLs)"));
  }
  absl::StatusOr<std::vector<RevocationList::CrlFile>> files =
      RevocationList::ReadDir(options_.dir);
  if (!files.ok()) return files.status();
  const std::string digest = Digest(*files, *ca);
  if (digest == last_read_digest_) return absl::OkStatus();
  last_read_digest_ = digest;
  absl::StatusOr<std::shared_ptr<const RevocationList>> list =
      RevocationList::Parse(*files, *ca);
  if (!list.ok()) return list.status();
  spdlog::info("tls.crl_dir: {} CRL(s) from {} file(s), {} revoked",
               (*list)->crl_count(), files->size(), (*list)->revoked_count());
  absl::MutexLock lock(&mu_);
  list_ = *std::move(list);
  return absl::OkStatus();
}

void CrlWatcher::Watch() {
  while (!stop_.WaitForNotificationWithTimeout(options_.interval)) {
    absl::Status s = ReloadIfChanged();
    if (!s.ok()) {
      spdlog::error(
          "tls.crl_dir: {}; the revocations loaded before stay in force "
          "until the directory reads cleanly",
          s.message());
    }
  }
}

}  // namespace custos::server
