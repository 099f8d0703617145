// Hsm: the HSM as the rest of Custos sees it. Keys are named by their CKA_ID
// (random, 16 bytes); every operation runs on a pooled session within the
// pool's deadlines; object handles are cached per CKA_ID, each key verified
// against its template before first use, and found again by CKA_ID when a
// handle goes stale (after C_CloseAllSessions or a re-login).
//
// With Options::metrics, each kind of operation records its latency on the
// HSM and its outcomes by status code (docs/operations.md), and the pool
// its own metrics.
//
// It knows nothing of key ids, policies, SQL or gRPC. Thread-safe.
#ifndef CUSTOS_HSM_HSM_H_
#define CUSTOS_HSM_HSM_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "common/metrics.h"
#include "common/secret_bytes.h"
#include "hsm/module.h"
#include "hsm/session_pool.h"

namespace custos::hsm {

// The output of EncryptAesGcm: a fresh 12-byte IV from the HSM's RNG and the
// ciphertext with its 16-byte tag appended.
struct GcmSealed {
  std::string iv;
  std::string ciphertext;  // ciphertext || tag
};

// A secret made by the HSM's RNG, and its seal (see EncryptAesGcm).
struct SealedSecret {
  SecretBytes plaintext;
  GcmSealed sealed;
};

// One Custos object on the token, for inventory and reconciliation.
struct HsmObject {
  CK_OBJECT_CLASS object_class;
  std::string id;     // CKA_ID, raw bytes
  std::string label;  // CKA_LABEL
};

class Hsm {
 public:
  struct Options {
    std::string token_label;
    std::string pin_file;  // read once, mode-checked (see ReadPinFile)
    SessionPool::Options pool;
    // Where the HSM's and its pool's metrics go; null: none. Must outlive
    // the Hsm.
    metrics::Registry* metrics = nullptr;
    // Other processes write to this token too (custosd replicas). With
    // SoftHSM2, a process that writes to a token without having searched
    // it since another process's write never sees that write (its token
    // generation counter adopts the other's bump), so GenerateAesKey then
    // searches first; and an object not found is looked for again for up
    // to 0.6 s (another process's may still be appearing). The search
    // reads every object (about 0.8 s with 10,000 keys on SoftHSM2), so a
    // single process does without both.
    bool shared_token = false;
  };

  // Finds the token by label, reads the PIN file and logs in the pool's
  // sessions. `module` must outlive the Hsm.
  static absl::StatusOr<std::unique_ptr<Hsm>> Open(const Module& module,
                                                   const Options& options);
  ~Hsm();

  // A fresh random CKA_ID (kObjectIdSize bytes from the HSM's RNG), for a
  // caller that records which object it is about to make before making it.
  absl::StatusOr<std::string> NewObjectId();
  // Generates an AES-256 CMK version in the HSM (template: key_templates.h)
  // with CKA_ID `id`, verifies it, and returns `id`.
  absl::StatusOr<std::string> GenerateAesKey(absl::string_view id,
                                             absl::string_view label);
  // The same with a new random CKA_ID.
  absl::StatusOr<std::string> GenerateAesKey(absl::string_view label);
  // Finds the key by CKA_ID and checks its attributes: NOT_FOUND if absent,
  // FAILED_PRECONDITION if it fails the template (then it is never used).
  absl::Status VerifyAesKey(absl::string_view id);

  // AES-256-GCM inside the HSM under key `id`, with a fresh random 96-bit IV
  // and a 128-bit tag.
  absl::StatusOr<GcmSealed> EncryptAesGcm(absl::string_view id,
                                          absl::string_view aad,
                                          absl::string_view plaintext);
  // Makes `count` random secrets of `bytes` each with C_GenerateRandom and
  // seals each under key `id`, all in one session: data keys.
  absl::StatusOr<std::vector<SealedSecret>> GenerateAndSealAesGcm(
      absl::string_view id, absl::string_view aad, size_t bytes, size_t count);
  // INVALID_ARGUMENT "AES-GCM authentication failed" when the tag does not
  // verify (wrong key, IV, AAD, or altered ciphertext).
  absl::StatusOr<SecretBytes> DecryptAesGcm(absl::string_view id,
                                            absl::string_view iv,
                                            absl::string_view aad,
                                            absl::string_view ciphertext);

  absl::StatusOr<SecretBytes> GenerateRandom(size_t size);

  // Generates an ECDSA P-256 key pair (private half non-extractable) and
  // returns its CKA_ID.
  absl::StatusOr<std::string> GenerateSigningKey(absl::string_view label);
  // Raw r||s ECDSA signature over SHA-256(message).
  absl::StatusOr<std::string> SignP256(absl::string_view id,
                                       absl::string_view message);
  // The public half as a SubjectPublicKeyInfo PEM.
  absl::StatusOr<std::string> SigningPublicKeyPem(absl::string_view id);

  // Creates a token data object (CKO_DATA: private, not modifiable) with
  // this CKA_LABEL whose CKA_VALUE is `id`: a marker that a deployment
  // binds itself to. It holds no secret.
  absl::Status CreateMarker(absl::string_view id, absl::string_view label);
  // The ids (values) of the markers labelled `label`.
  absl::StatusOr<std::vector<std::string>> FindMarkers(absl::string_view label);
  // Destroys the marker labelled `label` with id `id`, if present.
  absl::Status DestroyMarker(absl::string_view id, absl::string_view label);
  // The token this Hsm uses, as C_GetTokenInfo described it at Open.
  const TokenSummary& token() const { return token_; }

  // Destroys every object with this CKA_ID; returns how many there were
  // (0 is not an error: destruction is idempotent).
  absl::StatusOr<int> DestroyObjects(absl::string_view id);
  // Every secret and private key object on the token.
  absl::StatusOr<std::vector<HsmObject>> ListKeyObjects();
  // The CKA_IDs of the objects of class `cls` labelled exactly `label`, in
  // one C_FindObjects search (PKCS#11 v2.40 section 5.10) with no attribute
  // read per object: cheaper than ListKeyObjects to find one key by name.
  absl::StatusOr<std::vector<std::string>> FindKeyIdsByLabel(
      CK_OBJECT_CLASS cls, absl::string_view label);

  SessionPool::Stats pool_stats() const { return pool_->stats(); }

 private:
  // Every operation, as the metrics name it (hsm.cc, kOperationNames).
  enum class Operation {
    kGenerateAesKey,
    kVerifyAesKey,
    kEncryptAesGcm,
    kGenerateAndSealAesGcm,
    kDecryptAesGcm,
    kGenerateRandom,
    kGenerateSigningKey,
    kSignP256,
    kSigningPublicKeyPem,
    kDestroyObjects,
    kListKeyObjects,
    kFindKeyIdsByLabel,
    kCreateMarker,
    kFindMarkers,
    kCount,
  };
  class Metrics;  // hsm.cc

  Hsm(std::unique_ptr<Metrics> metrics, std::unique_ptr<SessionPool> pool,
      bool shared_token, TokenSummary token);

  // Runs `f(Session&) -> StatusOr<T>` on the pool and returns its value,
  // recording the operation's metrics.
  template <typename T, typename F>
  absl::StatusOr<T> Call(Operation operation, F f);

  // The verified handle of the object (class `cls`) with CKA_ID `id`, from
  // the cache or found and verified now. Called on a worker's session.
  absl::StatusOr<CK_OBJECT_HANDLE> Resolve(Session& session,
                                           const std::string& id,
                                           CK_OBJECT_CLASS cls);
  // Runs `use` with the object's handle; on a stale handle, forgets it,
  // finds it again and retries once.
  template <typename T, typename F>
  absl::StatusOr<T> WithObject(Session& session, const std::string& id,
                               CK_OBJECT_CLASS cls, F use);
  void Forget(const std::string& id, CK_OBJECT_CLASS cls);

  const bool shared_token_;
  const TokenSummary token_;
  // Null without metrics. Declared before pool_, so that it outlives the
  // pool's workers (an operation that timed out may still be running).
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<SessionPool> pool_;
  absl::Mutex mu_;
  // (class, CKA_ID) -> verified handle.
  absl::flat_hash_map<std::pair<CK_OBJECT_CLASS, std::string>, CK_OBJECT_HANDLE>
      handles_ ABSL_GUARDED_BY(mu_);
  uint64_t handles_epoch_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace custos::hsm

#endif  // CUSTOS_HSM_HSM_H_
