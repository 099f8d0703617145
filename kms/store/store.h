// Store: where key metadata and policies live (SQL). One interface, two
// implementations: SQLite (one file, the default) and PostgreSQL (several
// replicas; later). Every state change is one transaction. No key material
// is ever stored: a version row holds only the HSM object's CKA_ID.
//
// Implementations are thread-safe.
#ifndef CUSTOS_KMS_STORE_STORE_H_
#define CUSTOS_KMS_STORE_STORE_H_

#include <memory>
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

  // The schema version after migrations.
  virtual int SchemaVersion() const = 0;
};

// Opens the store named by `url`: "sqlite:///abs/path.db" or
// "sqlite:relative/path.db". Creates the database if needed and applies
// pending migrations. INVALID_ARGUMENT names the url and the forms accepted.
absl::StatusOr<std::unique_ptr<Store>> OpenStore(const std::string& url);

}  // namespace custos::kms

#endif  // CUSTOS_KMS_STORE_STORE_H_
