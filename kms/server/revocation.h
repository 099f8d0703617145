// Client certificate revocation: the certificates listed by the CRLs in one
// directory (`tls.crl_dir`), re-read while custosd runs.
//
// Why not gRPC's own `TlsCredentialsOptions::set_crl_directory`: in gRPC
// 1.51 it hands the directory to OpenSSL's hashed-directory lookup
// (`X509_STORE_load_locations`) of the SSL_CTX, which reads a CRL file the
// first time a handshake needs it and never again (it finds a new file with
// the next suffix, `<hash>.r1`, but not a changed one), and the SSL_CTX is
// only rebuilt when the certificate provider reports new certificates. So
// a revocation added to an existing CRL is not seen until the server
// certificate or client CA changes, files must be named by `openssl
// rehash`, and a client that resumes an earlier TLS session is not checked
// at all. (A test program against gRPC 1.51 showed the in-place change
// ignored, the `.r1` file read and the resumed session accepted; 1.51 has
// no CrlProvider.) Custos checks every handshake's peer certificates itself
// (an ExternalCertificateVerifier, see server_settings.cc) against the
// lists kept here.
#ifndef CUSTOS_KMS_SERVER_REVOCATION_H_
#define CUSTOS_KMS_SERVER_REVOCATION_H_

#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/steady_notification.h"

namespace custos::server {

// The revoked certificates named by a directory of CRLs, each CRL verified
// against the CA bundle that client certificates chain to. A certificate is
// revoked when a CRL issued by its issuer lists its serial number (any
// reason, certificateHold included). Delta and indirect CRLs are not
// supported. Immutable once loaded; thread-safe.
class RevocationList {
 public:
  struct CrlFile {
    std::string name;  // within the directory
    std::string contents;
  };

  // Reads every regular file of `dir` whose name does not start with '.'
  // (so that a file being written as ".name" and then renamed is not read
  // half-written). A file holds one or more PEM CRLs ("X509 CRL") or one
  // DER CRL. Every CRL must be signed by a certificate of `ca_bundle_pem`
  // with its issuer's name. Errors name the file and say why; nothing is
  // loaded then.
  static absl::StatusOr<std::shared_ptr<const RevocationList>> Load(
      const std::string& dir, absl::string_view ca_bundle_pem);
  // The files of a directory as Load reads them, sorted by name. An error
  // if the directory cannot be listed or a file cannot be read.
  static absl::StatusOr<std::vector<CrlFile>> ReadDir(const std::string& dir);
  // Load's parsing and verification of files already read.
  static absl::StatusOr<std::shared_ptr<const RevocationList>> Parse(
      const std::vector<CrlFile>& files, absl::string_view ca_bundle_pem);

  // The file of the CRL that revokes a certificate of `pem_chain` (PEM
  // certificates, leaf first; every one is checked), or nullopt. An
  // unreadable chain is an error.
  absl::StatusOr<std::optional<std::string>> RevokedBy(
      absl::string_view pem_chain) const;

  size_t crl_count() const { return crl_count_; }
  size_t revoked_count() const { return revoked_.size(); }

 private:
  RevocationList() = default;

  // Issuer name (DER) + serial number (DER content) -> CRL file name.
  absl::flat_hash_map<std::string, std::string> revoked_;
  size_t crl_count_ = 0;
};

// Keeps a RevocationList of `dir` current: a thread reads the directory and
// the CA bundle every `interval` and loads them again when anything in them
// changed. A load that fails (a file half-copied, a CRL signed by an
// unknown CA) is logged with the file and the reason, and the lists loaded
// before stay in force until a load succeeds. Thread-safe; the thread stops
// when the watcher is destroyed.
class CrlWatcher {
 public:
  struct Options {
    std::string dir;             // tls.crl_dir
    std::string client_ca_path;  // tls.client_ca
    absl::Duration interval = absl::Seconds(5);
  };

  // Loads once (an error names tls.crl_dir and the fix), then starts
  // watching.
  static absl::StatusOr<std::unique_ptr<CrlWatcher>> Start(Options options);
  ~CrlWatcher();
  CrlWatcher(const CrlWatcher&) = delete;
  CrlWatcher& operator=(const CrlWatcher&) = delete;

  // OK, or UNAUTHENTICATED naming the CRL file when a certificate of
  // `pem_chain` is revoked (or the chain cannot be read).
  absl::Status Check(absl::string_view pem_chain) const;

  // Reads the files now and loads them if they changed since the last
  // load; the watching thread calls it every interval.
  absl::Status ReloadIfChanged();

 private:
  explicit CrlWatcher(Options options) : options_(std::move(options)) {}
  void Watch();

  const Options options_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const RevocationList> list_ ABSL_GUARDED_BY(mu_);
  // Serialises loads. Holds a digest of the files last read (loaded or
  // not), so that a bad file is reported once and not at every poll.
  absl::Mutex reload_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  std::string last_read_digest_ ABSL_GUARDED_BY(reload_mu_);
  SteadyNotification stop_;
  std::thread thread_;
};

}  // namespace custos::server

#endif  // CUSTOS_KMS_SERVER_REVOCATION_H_
