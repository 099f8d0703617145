// PostgresStore: the Store in PostgreSQL, for several custosd replicas that
// share one database. Same schema versions as SQLite, applied under an
// advisory lock so that replicas starting together migrate once. Every
// UpdateKey locks the key's row (SELECT ... FOR UPDATE) before reading it,
// so two replicas changing one key take turns: two rotations at once make
// exactly one version each, in order, never a lost write. A transaction that
// fails before the mutator runs (serialization failure, deadlock, a dropped
// connection) is retried; after the mutator has run, the status is
// returned, because the mutator may have recorded an audit record.
//
// Every committed change sends NOTIFY custos_keys with the key's id, so the
// other replicas can refresh their caches (see WatchChanges). Background
// work is led by one replica at a time through a session advisory lock (see
// NewLeadership).
//
// One connection, serialised by a mutex: writes are rare (admin operations,
// counter reservations) and reads come from the registry's cache. A broken
// connection is re-established at the next call. Thread-safe.
#ifndef CUSTOS_KMS_STORE_POSTGRES_STORE_H_
#define CUSTOS_KMS_STORE_POSTGRES_STORE_H_

#include <libpq-fe.h>

#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "kms/store/store.h"

namespace custos::kms {

namespace pg {
class Result;
}  // namespace pg

class PostgresStore : public Store {
 public:
  // Connects to `url` (a libpq URI: postgresql://user@host:port/db?...) and
  // migrates the schema. UNAVAILABLE if the server cannot be reached; the
  // message never holds the password.
  // With OpenMode::kExisting a database without the Custos schema is
  // FAILED_PRECONDITION (see OpenMode).
  static absl::StatusOr<std::unique_ptr<PostgresStore>> Open(
      const std::string& url, OpenMode mode);
  ~PostgresStore() override;

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

  bool Shared() const override { return true; }
  absl::StatusOr<std::unique_ptr<ChangeFeed>> WatchChanges() override;
  absl::StatusOr<std::unique_ptr<Leadership>> NewLeadership() override;

 private:
  PostgresStore(PGconn* conn, std::string url)
      : conn_(conn), url_(std::move(url)) {}
  absl::Status Migrate(OpenMode mode) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Re-establishes a broken connection; UNAVAILABLE if it stays broken.
  absl::Status EnsureConnected() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Key> LoadKeyLocked(absl::string_view id, bool for_update)
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
  // Sends NOTIFY custos_keys, id (delivered when the transaction commits).
  absl::Status NotifyLocked(absl::string_view key_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  PGconn* const conn_ ABSL_PT_GUARDED_BY(mu_);
  const std::string url_;
  int schema_version_ = 0;
};

}  // namespace custos::kms

#endif  // CUSTOS_KMS_STORE_POSTGRES_STORE_H_
