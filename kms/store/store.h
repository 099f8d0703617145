// Store: where key metadata and policies live (SQL). One interface, two
// implementations: SQLite (one file, the default) and PostgreSQL (several
// replicas). Every state change is one transaction. No key material
// is ever stored: a version row holds only the HSM object's CKA_ID.
//
// Implementations are thread-safe.
#ifndef CUSTOS_KMS_STORE_STORE_H_
#define CUSTOS_KMS_STORE_STORE_H_

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "kms/key.h"

namespace custos::kms {

struct AliasRecord {
  std::string name;  // "alias/..."
  std::string key_id;
  absl::Time create_time;
};

// The deployment a database belongs to, and the HSM token it is bound to.
// Written once, by `custosd --init`; custosd refuses to start when the token
// it opens is not this one (see docs/operations.md, "Initialising").
struct Deployment {
  std::string id;  // the marker object's id (its CKA_VALUE on the token)
  std::string token_label;
  std::string token_serial;
  absl::Time create_time;
};

// A generate-intent: the CKA_ID that a key version's material is about to
// get, committed before the HSM generates it. The commit of the version
// deletes its intent in the same transaction, and fails (ABORTED) if the
// intent was claimed as garbage meanwhile. Claiming (Store::ClaimIntent)
// marks an intent that no version names as garbage, for good: its object
// may then be destroyed, and no commit can ever name it. An HSM object
// that neither an intent nor a version names was never made by this
// database and is never destroyed by it.
struct MaterialIntent {
  std::string hsm_id;  // raw CKA_ID
  std::string key_id;
  uint32_t version = 0;
  absl::Time create_time;
  bool claimed = false;  // garbage, for good (a tombstone)
};

// Changes that other processes sharing the store have committed. Not
// thread-safe: one thread waits on it.
class ChangeFeed {
 public:
  virtual ~ChangeFeed() = default;
  // Waits up to `timeout` for changes and returns the ids of the keys that
  // changed (empty on timeout). kEverything among them means changes may
  // have been missed (the feed reconnected): reload every key. UNAVAILABLE
  // while the store cannot be reached.
  virtual absl::StatusOr<std::vector<std::string>> Wait(
      absl::Duration timeout) = 0;
  static constexpr char kEverything[] = "*";
};

// The right to run background work (scheduled rotation and deletion, the
// reconciler) among processes sharing the store: held by one at a time,
// released when its holder dies. Not thread-safe: one thread holds it.
class Leadership {
 public:
  virtual ~Leadership() = default;
  // Takes the lead if no one holds it, or confirms this process still holds
  // it. False while another process leads or the store is unreachable (a
  // lost connection loses the lead).
  virtual bool Hold() = 0;
};

class Store {
 public:
  virtual ~Store() = default;

  // Every key with its versions, policy and aliases (to fill the cache).
  virtual absl::StatusOr<std::vector<Key>> LoadAllKeys() = 0;
  // One key; NOT_FOUND if absent.
  virtual absl::StatusOr<Key> LoadKey(absl::string_view id) = 0;
  // Inserts a new key with its versions and aliases, atomically.
  // ALREADY_EXISTS if the id or one of the aliases is taken.
  virtual absl::Status InsertKey(const Key& key) = 0;

  // In one transaction: reads the key, lets `mutate` change it, and writes
  // back the key row and its versions (aliases are not touched). If `mutate`
  // fails, nothing changes and its status is returned. Returns the key as
  // written.
  using Mutator = absl::FunctionRef<absl::Status(Key&)>;
  virtual absl::StatusOr<Key> UpdateKey(absl::string_view id,
                                        Mutator mutate) = 0;

  // ALREADY_EXISTS if the alias is taken; NOT_FOUND if the key is absent.
  virtual absl::Status CreateAlias(const AliasRecord& alias) = 0;
  // NOT_FOUND if absent.
  virtual absl::Status DeleteAlias(absl::string_view alias) = 0;
  virtual absl::StatusOr<std::vector<AliasRecord>> ListAliases() = 0;

  // The deployment this database belongs to; nullopt before `--init`.
  virtual absl::StatusOr<std::optional<Deployment>> LoadDeployment() = 0;
  // Records the deployment; ALREADY_EXISTS if one is recorded.
  virtual absl::Status InsertDeployment(const Deployment& deployment) = 0;

  // Generate-intents (see MaterialIntent). Recording one twice is an
  // error (ALREADY_EXISTS); deleting an absent one is not. InsertKey and
  // UpdateKey settle the intents of the versions they add (see
  // MaterialIntent).
  virtual absl::Status InsertIntent(const MaterialIntent& intent) = 0;
  virtual absl::StatusOr<std::vector<MaterialIntent>> ListIntents() = 0;
  virtual absl::Status DeleteIntent(absl::string_view hsm_id) = 0;
  // In one transaction: claims the intent for `hsm_id` as garbage unless a
  // version names that object. True if the intent is claimed now (by this
  // call or an earlier one); false if there is no such intent (its version
  // committed, or it never existed) or a version names the object.
  virtual absl::StatusOr<bool> ClaimIntent(absl::string_view hsm_id) = 0;

  // The schema version after migrations.
  virtual int SchemaVersion() const = 0;

  // Whether several processes may share this store (replicas).
  virtual bool Shared() const { return false; }
  // For stores several processes share: a feed of the others' changes, and
  // the lead for background work. A store for one process returns nullptr
  // from both (nothing changes behind its back; it always leads).
  virtual absl::StatusOr<std::unique_ptr<ChangeFeed>> WatchChanges() {
    return nullptr;
  }
  virtual absl::StatusOr<std::unique_ptr<Leadership>> NewLeadership() {
    return nullptr;
  }
};

// `url` fit for logs and errors: every password in it is replaced by "***"
// (the URL's userinfo, a password= or sslpassword= query parameter, and
// password=... in a key=value connection string, quoted or not).
std::string RedactStorageUrl(absl::string_view url);

// How OpenStore treats a database that does not exist yet.
enum class OpenMode {
  // custosd: the database must exist and hold the Custos schema. A missing
  // file, an empty file or an empty PostgreSQL database is
  // FAILED_PRECONDITION: a database moved away, a typo in the path or an
  // unmounted volume must never look like a new, empty deployment.
  kExisting,
  // `custosd --init` and tests: creates the SQLite file (mode 0600) and the
  // schema if they are missing.
  kCreate,
};

// Opens the store named by `url`: "sqlite:///abs/path.db",
// "sqlite:relative/path.db", or a libpq URI "postgresql://user@host:port/db"
// (also "postgres://"), and applies pending migrations to a database that
// has the schema. INVALID_ARGUMENT names the url and the forms accepted.
absl::StatusOr<std::unique_ptr<Store>> OpenStore(const std::string& url,
                                                 OpenMode mode);

// The message for a database without the Custos schema, naming the fix.
absl::Status NotInitialisedError(absl::string_view what);

}  // namespace custos::kms

#endif  // CUSTOS_KMS_STORE_STORE_H_
