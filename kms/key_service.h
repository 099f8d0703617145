// KeyService: the operations of Custos, free of any transport. The gRPC
// handlers (kms/server/) and the tests call it alike.
//
// Every call is authorized at one point (Authorizer) and audited: one record
// per call, allowed, refused or failed, durable before the call returns. If
// the record cannot be written the call fails with UNAVAILABLE and releases
// nothing (fail closed). Data keys are returned in SecretBytes, which
// cleanse themselves.
//
// The cryptographic operations also come in an asynchronous form: the work
// runs on the calling thread, and `done` receives the result once the
// call's audit record is durable, on the audit log's thread. A server thread
// then never sleeps through an fsync, and one fsync releases many calls.
//
// Thread-safe.
#ifndef CUSTOS_KMS_KEY_SERVICE_H_
#define CUSTOS_KMS_KEY_SERVICE_H_

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/secret_bytes.h"
#include "hsm/hsm.h"
#include "kms/audit/audit_log.h"
#include "kms/authorizer.h"
#include "kms/encryption_context.h"
#include "kms/key.h"
#include "kms/key_registry.h"
#include "kms/policy.h"

namespace custos::kms {

inline constexpr size_t kMaxDataKeyBytes = 1024;
inline constexpr size_t kMaxDescriptionBytes = 8192;

struct CreateKeyParams {
  std::string description;
  std::map<std::string, std::string> labels;
  absl::Duration rotation_period = absl::ZeroDuration();
  KeyPolicy policy;
  std::string alias;  // optional
};

struct ListKeysParams {
  uint32_t page_size = 0;  // 0: default 100
  std::string page_token;
  bool filter_state = false;
  KeyState state = KeyState::kEnabled;
  std::string label;  // "name" or "name=value"
};

struct ListKeysResult {
  std::vector<std::shared_ptr<const Key>> keys;
  std::string next_page_token;
};

struct UpdateKeyParams {
  std::string key;
  bool set_description = false;
  std::string description;
  bool set_labels = false;
  std::map<std::string, std::string> labels;
  bool set_rotation_period = false;
  absl::Duration rotation_period = absl::ZeroDuration();
};

// Optional justification carried by data operations.
struct JustificationParam {
  bool present = false;
  Justification value;
  // Set when the request's justification could not be read: the call then
  // fails with it, audited like any other refusal.
  absl::Status error;
  const Justification* get() const { return present ? &value : nullptr; }
};

struct DataKeyParams {
  std::string key;
  // Set when the adapter could not read the request's key spec: the call
  // then fails with it, audited.
  absl::Status request_error;
  size_t bytes = 32;
  EncryptionContext context;
  JustificationParam justification;
  bool include_plaintext = true;
};

struct DataKeyResult {
  std::string key_id;
  uint32_t version = 0;
  SecretBytes plaintext;  // empty when include_plaintext was false
  std::string blob;
};

inline constexpr uint32_t kMaxDataKeysPerCall = 1000;

// GenerateDataKeys: `count` data keys with the settings of `data_key`.
struct DataKeysParams {
  DataKeyParams data_key;
  uint32_t count = 0;  // 1 to kMaxDataKeysPerCall
};

struct DataKeysResult {
  std::string key_id;
  uint32_t version = 0;
  struct Entry {
    SecretBytes plaintext;  // empty when include_plaintext was false
    std::string blob;
  };
  std::vector<Entry> keys;
};

struct EncryptParams {
  std::string key;
  SecretBytes plaintext;
  EncryptionContext context;
  JustificationParam justification;
};

struct EncryptResult {
  std::string key_id;
  uint32_t version = 0;
  std::string blob;
};

struct DecryptParams {
  std::string blob;
  EncryptionContext context;
  std::string expected_key;  // optional id or alias
  JustificationParam justification;
};

struct DecryptResult {
  std::string key_id;
  uint32_t version = 0;
  SecretBytes plaintext;
};

struct ReEncryptParams {
  std::string blob;
  EncryptionContext source_context;
  std::string source_expected_key;
  std::string destination_key;  // empty: the source key
  EncryptionContext destination_context;
  JustificationParam justification;
};

struct ReEncryptResult {
  std::string source_key_id;
  uint32_t source_version = 0;
  std::string key_id;
  uint32_t version = 0;
  std::string blob;
};

// What the background tasks did in one pass.
struct MaintenanceReport {
  int rotated = 0;
  int destroyed_keys = 0;
  int destroyed_objects = 0;
  // Objects of interrupted creates and rotations (an intent never
  // committed as a version), destroyed.
  int orphans_destroyed = 0;
  int orphans_waiting = 0;  // such objects within orphan_grace
  // Objects no row names (no intent, no version): reported, never
  // destroyed.
  int quarantined = 0;
  // Most Custos objects on the token were quarantined, so nothing was
  // destroyed at all (the wrong database?).
  bool refused = false;
  int missing_objects = 0;
  int failures = 0;
};

class KeyService {
 public:
  struct Options {
    // Encryptions per version before automatic rotation (NIST SP 800-38D
    // keeps random 96-bit IVs far below 2^32 per key).
    uint64_t encryption_limit = uint64_t{1} << 30;
    // Durable counter reservations are made this many at a time; a crash
    // can only over-count, never under-count.
    uint64_t counter_block = 4096;
    // How long a "day" of ScheduleKeyDeletion lasts. Tests shorten it.
    absl::Duration deletion_day = absl::Hours(24);
    // Shortest rotation period accepted. Tests shorten it.
    absl::Duration min_rotation_period = absl::Hours(24);
    std::function<absl::Time()> now = [] { return absl::Now(); };
    // How old a generate-intent must be before Reconcile takes its object
    // (with no version) for the garbage of an interrupted create. Zero is
    // right when this process makes every key (material_mu_ orders its own
    // creates); with replicas, another may be between its generate and its
    // commit.
    absl::Duration orphan_grace = absl::ZeroDuration();
    // A clock that only moves forward (steady, not stepped with the wall
    // clock): deletion windows are counted on it.
    std::function<absl::Duration()> monotonic_now = [] {
      return absl::FromChrono(
          std::chrono::steady_clock::now().time_since_epoch());
    };
  };

  // All pointers must outlive the service.
  KeyService(Options options, hsm::Hsm* hsm, KeyRegistry* registry,
             AuditLog* audit, const Authorizer* authorizer);
  ~KeyService();

  // Key management (admins).
  absl::StatusOr<std::shared_ptr<const Key>> CreateKey(
      const Caller& caller, const CreateKeyParams& params);
  absl::StatusOr<std::shared_ptr<const Key>> GetKey(const Caller& caller,
                                                    const std::string& key);
  absl::StatusOr<ListKeysResult> ListKeys(const Caller& caller,
                                          const ListKeysParams& params);
  absl::StatusOr<std::shared_ptr<const Key>> UpdateKey(
      const Caller& caller, const UpdateKeyParams& params);
  absl::StatusOr<std::shared_ptr<const Key>> RotateKey(const Caller& caller,
                                                       const std::string& key);
  absl::StatusOr<std::shared_ptr<const Key>> EnableKey(const Caller& caller,
                                                       const std::string& key);
  absl::StatusOr<std::shared_ptr<const Key>> DisableKey(const Caller& caller,
                                                        const std::string& key);
  // `days` 0 means 30; otherwise 7–30.
  absl::StatusOr<std::shared_ptr<const Key>> ScheduleKeyDeletion(
      const Caller& caller, const std::string& key, uint32_t days);
  absl::StatusOr<std::shared_ptr<const Key>> CancelKeyDeletion(
      const Caller& caller, const std::string& key);
  absl::StatusOr<AliasRecord> CreateAlias(const Caller& caller,
                                          const std::string& alias,
                                          const std::string& key);
  absl::Status DeleteAlias(const Caller& caller, const std::string& alias);
  absl::StatusOr<std::vector<AliasRecord>> ListAliases(const Caller& caller,
                                                       const std::string& key);
  absl::StatusOr<KeyPolicy> GetKeyPolicy(const Caller& caller,
                                         const std::string& key);
  absl::StatusOr<KeyPolicy> SetKeyPolicy(const Caller& caller,
                                         const std::string& key,
                                         const KeyPolicy& policy,
                                         uint64_t expected_version);

  // Receives an asynchronous operation's result (see the file comment).
  template <typename T>
  using Done = absl::AnyInvocable<void(absl::StatusOr<T>) &&>;

  // Cryptographic operations (services, as key policies allow).
  absl::StatusOr<DataKeyResult> GenerateDataKey(const Caller& caller,
                                                const DataKeyParams& params);
  // All data keys under one version, each with its own HSM IV; one
  // authorization and one audit record (detail "count=N").
  absl::StatusOr<DataKeysResult> GenerateDataKeys(const Caller& caller,
                                                  const DataKeysParams& params);
  absl::StatusOr<EncryptResult> Encrypt(const Caller& caller,
                                        const EncryptParams& params);
  absl::StatusOr<DecryptResult> Decrypt(const Caller& caller,
                                        const DecryptParams& params);
  absl::StatusOr<ReEncryptResult> ReEncrypt(const Caller& caller,
                                            const ReEncryptParams& params);
  absl::StatusOr<SecretBytes> GenerateRandom(const Caller& caller,
                                             size_t bytes);
  // The asynchronous forms of the operations above.
  void GenerateDataKey(const Caller& caller, const DataKeyParams& params,
                       Done<DataKeyResult> done);
  void GenerateDataKeys(const Caller& caller, const DataKeysParams& params,
                        Done<DataKeysResult> done);
  void Encrypt(const Caller& caller, const EncryptParams& params,
               Done<EncryptResult> done);
  void Decrypt(const Caller& caller, const DecryptParams& params,
               Done<DecryptResult> done);
  void ReEncrypt(const Caller& caller, const ReEncryptParams& params,
                 Done<ReEncryptResult> done);
  void GenerateRandom(const Caller& caller, size_t bytes,
                      Done<SecretBytes> done);

  // Records a call that was refused before it reached an operation: the
  // caller has no usable identity (Caller::principal then names its
  // certificate by fingerprint), is over its rate limit, or sent a request
  // the adapter could not translate. `done` receives `refusal`, or
  // UNAVAILABLE if the record cannot be written; it runs on the audit log's
  // thread or on the calling one.
  void RecordRefusal(const Caller& caller, Rpc rpc, absl::Status refusal,
                     absl::AnyInvocable<void(absl::Status) &&> done);
  // The synchronous form: returns what `done` would receive.
  absl::Status RecordRefusal(const Caller& caller, Rpc rpc,
                             const absl::Status& refusal);

  // Background work: scheduled rotations and deletions whose time has
  // come. Idempotent; safe to rerun after a crash at any step. Each pass
  // also adds the monotonic time since the previous pass to every pending
  // key's deletion_elapsed: run it on one process at a time, every few
  // seconds.
  MaintenanceReport RunScheduledWork();
  // Forgets where each pending key's window was last counted. Call it when
  // this process starts or stops running RunScheduledWork while others may
  // (leadership changed), so that time another process counted is never
  // counted twice.
  void ForgetDeletionProgress();
  // Reconciliation of the HSM with the database, once after start-up
  // (key_material.cc): destroys only what the database positively calls
  // garbage (objects of destroyed versions, and of generate-intents never
  // committed as a version, left by a crash), each after its audit record;
  // quarantines Custos objects that no row names (reported in the log, the
  // audit log and quarantined_objects(), never destroyed); refuses to
  // destroy anything when most objects are quarantined; reports version
  // rows whose object is missing. Safe while calls are served: an object
  // that a CreateKey or a rotation is about to commit is never taken for
  // garbage (see material_mu_).
  absl::StatusOr<MaintenanceReport> Reconcile();
  // How many objects the last Reconcile quarantined (a metric).
  int quarantined_objects() const { return quarantined_objects_.load(); }

  const Options& options() const { return options_; }

 private:
  class Audit;
  struct Counter;
  struct SealedData {
    std::string key_id;
    uint32_t version;
    std::string blob;
  };

  // Resolves `name` and authorizes `op` on it for the caller. Refusals and
  // unknown keys both give PERMISSION_DENIED.
  absl::StatusOr<std::shared_ptr<const Key>> AuthorizeKeyUse(
      const Caller& caller, Rpc rpc, KeyOperation op, const std::string& name,
      const EncryptionContext& context, const Justification* justification,
      Audit& audit);
  // Management RPCs on an existing key.
  absl::StatusOr<std::shared_ptr<const Key>> AdminKey(const Caller& caller,
                                                      Rpc rpc,
                                                      const std::string& name,
                                                      Audit& audit);
  // Encrypts `plaintext` under the key's primary version (rotating first if
  // the version reached its encryption limit).
  absl::StatusOr<SealedData> Seal(std::shared_ptr<const Key> key,
                                  absl::string_view plaintext,
                                  const EncryptionContext& context,
                                  Audit& audit);
  // Opens a blob for a caller allowed `op` on its key. Every failure to open
  // is INVALID_ARGUMENT "invalid ciphertext".
  absl::StatusOr<DecryptResult> Open(const Caller& caller, Rpc rpc,
                                     KeyOperation op, const std::string& blob,
                                     const EncryptionContext& context,
                                     const std::string& expected_key,
                                     const Justification* justification,
                                     Audit& audit);
  // What SealMany seals: one given plaintext (Encrypt, ReEncrypt), or
  // `generate_count` fresh random data keys of `generate_bytes` each, made
  // by the HSM (GenerateDataKey(s)).
  struct SealInput {
    absl::string_view plaintext;
    size_t generate_count = 0;
    size_t generate_bytes = 0;
  };
  struct SealedBatch {
    std::string key_id;
    uint32_t version = 0;
    std::vector<std::string> blobs;
    std::vector<SecretBytes> generated;  // the data keys, when generated
  };
  // Validates, authorizes and makes `count` sealed data keys for
  // GenerateDataKey(s).
  absl::StatusOr<SealedBatch> MakeDataKeys(const Caller& caller, Rpc rpc,
                                           const DataKeyParams& params,
                                           size_t count, Audit& audit);
  // Seals `input` under the key's primary version: one budget claim and one
  // HSM hand-off for all of it, rotating first if the version's budget is
  // spent.
  absl::StatusOr<SealedBatch> SealMany(std::shared_ptr<const Key> key,
                                       const SealInput& input,
                                       const EncryptionContext& context,
                                       Audit& audit);
  // Takes `n` encryptions from the version's durable budget. Returns
  // RESOURCE_EXHAUSTED when the version has fewer than `n` left.
  absl::Status TakeEncryptions(const Key& key, const KeyVersion& version,
                               uint64_t n);
  // Adds a version generated in the HSM and makes it primary, unless the
  // primary is no longer `expected_primary` (someone else rotated).
  // `audit`, when given, records the rotation before it commits.
  absl::StatusOr<std::shared_ptr<const Key>> RotateFrom(
      const std::string& key_id, uint32_t expected_primary, Audit* audit);
  absl::Status ValidateLabels(const std::map<std::string, std::string>& labels);
  absl::Status ValidateRotationPeriod(absl::Duration period);
  // Destroys a PENDING_DELETION key whose window has ended: HSM objects
  // first, then the rows (recorded in `audit` before commit). ABORTED if the
  // deletion was cancelled or rescheduled.
  absl::Status DestroyKeyMaterial(const std::string& key_id,
                                  MaintenanceReport& report, Audit& audit);
  // Adds the monotonic time since the last pass to each pending key's
  // deletion_elapsed (persisted). A key seen pending for the first time in
  // this process starts counting now.
  void CountDeletionWindows(MaintenanceReport& report);
  Counter& CounterFor(const std::string& key_id, uint32_t version);

  // Key material (key_material.cc). Callers of the first two hold
  // material_mu_ shared until the version commits or is discarded.
  //
  // Commits a generate-intent for (key_id, version), then generates the
  // version's AES key in the HSM under the intent's CKA_ID.
  absl::StatusOr<std::string> GenerateVersionMaterial(const std::string& key_id,
                                                      uint32_t version);
  // After a commit that failed: destroys the object if the database shows
  // that no version owns it; otherwise (or if the database cannot say)
  // leaves it to Reconcile.
  void DiscardUncommitted(const std::string& key_id, uint32_t version,
                          const std::string& hsm_id);
  // Records (durably), destroys, and clears the intent of, an object the
  // database calls garbage.
  absl::Status DestroyGarbage(const std::string& key_id, uint32_t version,
                              const std::string& hsm_id, absl::string_view why);
  // Whether the database (not this cache) has a version owning `object`.
  bool NamedByStoredVersion(const hsm::HsmObject& object);
  // Writes a record of work on HSM material by the service itself.
  absl::Status RecordMaterialEvent(const std::string& key_id, uint32_t version,
                                   const std::string& operation,
                                   const std::string& detail);
  // The CKA_IDs of the versions in a registry snapshot: those whose
  // material must exist, and those whose material must be gone.
  struct VersionIds {
    std::set<std::string> live;
    // CKA_ID -> (key id, version number)
    std::map<std::string, std::pair<std::string, uint32_t>> dead;
  };
  static VersionIds LiveAndDeadIds(
      const std::vector<std::shared_ptr<const Key>>& keys);

  const Options options_;
  hsm::Hsm* const hsm_;
  KeyRegistry* const registry_;
  AuditLog* const audit_;
  const Authorizer* const authorizer_;

  absl::Mutex rotate_mu_;  // one rotation at a time
  // Orders the making of key material against Reconcile. CreateKey and
  // RotateFrom hold it shared from recording a version's generate-intent
  // until its row is committed (and the registry updated) or the object is
  // discarded. Reconcile lists the HSM without it, then holds it
  // exclusively while it re-checks each object no version owned and
  // destroys the orphans: by then every object it listed is either owned by
  // a committed row or gone. Lock order: rotate_mu_, material_mu_,
  // lifecycle_mu_.
  absl::Mutex material_mu_;
  // Held by the deletion executor while it destroys a key, and by
  // CancelKeyDeletion: a cancel never races the destruction.
  absl::Mutex lifecycle_mu_;
  // Where CountDeletionWindows last counted each pending key: the monotonic
  // reading, and the deletion_time it counted toward (a cancel and a new
  // schedule start over).
  struct WindowMark {
    absl::Time deletion_time;
    absl::Duration counted_at;
  };
  absl::Mutex window_mu_;
  absl::flat_hash_map<std::string, WindowMark> window_marks_
      ABSL_GUARDED_BY(window_mu_);
  std::atomic<int> quarantined_objects_{0};
  // False while the last Reconcile found objects no row names: the
  // deletion executor then destroys nothing (a restored older database may
  // hold a deletion that a newer one cancelled).
  std::atomic<bool> destruction_allowed_{true};
  absl::Mutex counters_mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<Counter>> counters_
      ABSL_GUARDED_BY(counters_mu_);
};

// The principal recorded for work the service does by itself.
inline constexpr char kSystemPrincipal[] = "custos:system";

}  // namespace custos::kms

#endif  // CUSTOS_KMS_KEY_SERVICE_H_
