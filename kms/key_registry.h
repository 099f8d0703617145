// KeyRegistry: every key's metadata in memory, in front of the Store. Reads
// (the hot path: every data-key request) come from immutable snapshots;
// writes go to the Store in one transaction and then replace the snapshot.
//
// With a shared store, a well-formed key id not in memory is read from the
// store (another replica may have just created it). Such lookups hold no
// lock across the round trip, at most kMaxStoreLookups run at once (beyond
// that the id is answered NOT_FOUND from memory), and an id the store does
// not have is remembered for kNegativeTtl (up to kMaxNegativeEntries ids),
// or until this process inserts it or the change feed refreshes it: a
// flood of unknown ids costs one round trip each at most, and never stalls
// other callers or writers. Thread-safe.
#ifndef CUSTOS_KMS_KEY_REGISTRY_H_
#define CUSTOS_KMS_KEY_REGISTRY_H_

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "kms/key.h"
#include "kms/store/store.h"

namespace custos::kms {

class KeyRegistry {
 public:
  static constexpr size_t kMaxNegativeEntries = 16384;
  static constexpr absl::Duration kNegativeTtl = absl::Seconds(30);
  static constexpr int kMaxStoreLookups = 8;

  // Loads every key from `store`, which must outlive the registry.
  static absl::StatusOr<std::unique_ptr<KeyRegistry>> Load(Store* store);
  // The store behind the cache, for what the cache does not hold
  // (generate-intents, the deployment).
  Store* store() const { return store_; }

  // The key named by id ("k-...") or alias ("alias/..."); NOT_FOUND if none.
  // With a shared store, a key id not in the cache is looked up in the
  // store (another replica may have created it a moment ago), as the class
  // comment says.
  absl::StatusOr<std::shared_ptr<const Key>> Find(absl::string_view name);
  // Every key, newest first.
  std::vector<std::shared_ptr<const Key>> All() const;
  size_t size() const;
  // How many keys are in each state (every state listed, zeros too).
  std::map<KeyState, size_t> CountByState() const;
  // Exports CountByState() as the gauge custos_keys{state="ENABLED",...},
  // read at each scrape. Drop the handle before the registry.
  absl::StatusOr<metrics::CallbackHandle> ExportMetrics(
      metrics::Registry& registry) const;

  absl::Status Insert(Key key);
  absl::StatusOr<std::shared_ptr<const Key>> Update(absl::string_view id,
                                                    Store::Mutator mutate);
  absl::Status CreateAlias(const AliasRecord& alias);
  absl::Status DeleteAlias(absl::string_view alias);
  // Re-reads from the store a key that another process sharing it changed
  // (with its aliases), or every key when `id` is ChangeFeed::kEverything.
  // Ordered with this process's own writes: the cache never goes back to
  // an older state.
  absl::Status Refresh(absl::string_view id);

  // Freshness, for replicas: once RequireFreshness(limit) is called,
  // CheckFresh() is UNAVAILABLE unless MarkFresh() was called within
  // `limit` (the change feed calls it after each round trip to the store
  // whose changes it applied). A replica that cannot hear of other
  // replicas' changes stops using keys rather than honour a key that was
  // disabled elsewhere.
  void RequireFreshness(absl::Duration limit);
  void MarkFresh();
  absl::Status CheckFresh() const;
  // Aliases (of one key when `key_id` is not empty), sorted by name.
  std::vector<AliasRecord> Aliases(absl::string_view key_id) const;

 private:
  explicit KeyRegistry(Store* store) : store_(store) {}
  absl::StatusOr<std::shared_ptr<const Key>> FindCached(
      absl::string_view name) const;
  void PutLocked(std::shared_ptr<const Key> key)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Find's read-through for an id missing from memory (shared store).
  absl::StatusOr<std::shared_ptr<const Key>> FindInStore(
      absl::string_view id, absl::Status not_found);
  // Forgets that the store lacked `id` (or every id, for kEverything).
  void ForgetMissing(absl::string_view id);

  Store* const store_;
  // Steady-clock nanoseconds; zero limit: freshness is not required.
  std::atomic<int64_t> fresh_limit_ns_{0};
  std::atomic<int64_t> fresh_at_ns_{0};
  // Serialises writers so the cache applies store changes in order.
  absl::Mutex write_mu_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<const Key>> keys_
      ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, AliasRecord> aliases_ ABSL_GUARDED_BY(mu_);

  // The negative cache: ids the store did not have, with when (steady
  // clock) it said so. `missing_epoch_` counts invalidations: a lookup
  // that raced one does not record its answer.
  absl::Mutex missing_mu_;
  absl::flat_hash_map<std::string, int64_t> missing_  // steady nanoseconds
      ABSL_GUARDED_BY(missing_mu_);
  uint64_t missing_epoch_ ABSL_GUARDED_BY(missing_mu_) = 0;
  int lookups_in_flight_ ABSL_GUARDED_BY(missing_mu_) = 0;
};

}  // namespace custos::kms

#endif  // CUSTOS_KMS_KEY_REGISTRY_H_
