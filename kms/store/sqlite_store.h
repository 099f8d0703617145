// SqliteStore: the Store in one SQLite file, for a single custosd.
// WAL journal, synchronous=FULL (a committed change survives power loss),
// foreign keys on, a busy timeout. One connection, serialised by a mutex:
// writes are rare (admin operations, counter reservations) and reads are
// served from the registry's cache. Thread-safe.
#ifndef CUSTOS_KMS_STORE_SQLITE_STORE_H_
#define CUSTOS_KMS_STORE_SQLITE_STORE_H_

#include <sqlite3.h>

#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "kms/store/store.h"

namespace custos::kms {

class SqliteStore : public Store {
 public:
  // Opens the database at `path` (creating it, mode 0600, only with
  // OpenMode::kCreate) and migrates it.
  static absl::StatusOr<std::unique_ptr<SqliteStore>> Open(
      const std::string& path, OpenMode mode);
  ~SqliteStore() override;

  absl::StatusOr<std::vector<Key>> LoadAllKeys() override;
  absl::StatusOr<Key> LoadKey(absl::string_view id) override;
  absl::Status InsertKey(const Key& key) override;
  absl::StatusOr<Key> UpdateKey(absl::string_view id, Mutator mutate) override;
  absl::Status CreateAlias(const AliasRecord& alias) override;
  absl::Status DeleteAlias(absl::string_view alias) override;
  absl::StatusOr<std::vector<AliasRecord>> ListAliases() override;
  absl::StatusOr<std::optional<Deployment>> LoadDeployment() override;
  absl::Status InsertDeployment(const Deployment& deployment) override;
  absl::Status InsertIntent(const MaterialIntent& intent) override;
  absl::StatusOr<std::vector<MaterialIntent>> ListIntents() override;
  absl::Status DeleteIntent(absl::string_view hsm_id) override;
  absl::StatusOr<bool> ClaimIntent(absl::string_view hsm_id) override;
  int SchemaVersion() const override { return schema_version_; }

 private:
  explicit SqliteStore(sqlite3* db, std::string path)
      : db_(db), path_(std::move(path)) {}
  absl::Status Migrate() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<int> ReadSchemaVersion() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether the database holds the Custos schema (schema_migrations).
  absl::StatusOr<bool> HasSchema() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Exec(const char* sql) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Key> LoadKeyLocked(absl::string_view id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Writes the key row and its versions; versions numbered from
  // `first_new_version` on are new, and their intents are settled (see
  // MaterialIntent).
  absl::Status WriteKeyLocked(const Key& key, bool insert,
                              uint32_t first_new_version)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Deletes the intent of a new version's object; ABORTED if it was
  // claimed as garbage.
  absl::Status SettleIntentLocked(const KeyVersion& version)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  sqlite3* const db_ ABSL_PT_GUARDED_BY(mu_);
  const std::string path_;
  int schema_version_ = 0;
};

}  // namespace custos::kms

#endif  // CUSTOS_KMS_STORE_SQLITE_STORE_H_
