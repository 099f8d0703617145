// KeyRegistry's read-through on a shared store, over a hand-written
// in-memory store that counts lookups and can hold one in flight: unknown
// ids are remembered (and forgotten when the key appears), and a lookup in
// flight holds no lock that other callers or writers need.
#include "kms/key_registry.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <optional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/testing/status_matchers.h"
#include "kms/ciphertext_blob.h"
#include "kms/store/store.h"

namespace custos::kms {
namespace {

using ::custos::testing::IsOk;
using ::custos::testing::StatusIs;

// A shared store in memory. LoadKey of `hold_id` blocks until Release().
// Thread-safe.
class FakeSharedStore : public Store {
 public:
  absl::StatusOr<std::vector<Key>> LoadAllKeys() override {
    absl::MutexLock lock(&mu_);
    std::vector<Key> out;
    for (const auto& [id, key] : keys_) out.push_back(key);
    return out;
  }
  absl::StatusOr<Key> LoadKey(absl::string_view id) override {
    ++lookups_;
    if (id == hold_id_) {
      if (!held_once_.exchange(true)) held_.Notify();
      release_.WaitForNotification();
    }
    absl::MutexLock lock(&mu_);
    auto it = keys_.find(std::string(id));
    if (it == keys_.end()) return absl::NotFoundError("no such key");
    return it->second;
  }
  absl::Status InsertKey(const Key& key) override {
    absl::MutexLock lock(&mu_);
    if (!keys_.emplace(key.id, key).second) {
      return absl::AlreadyExistsError("taken");
    }
    return absl::OkStatus();
  }
  absl::StatusOr<Key> UpdateKey(absl::string_view id, Mutator mutate) override {
    absl::MutexLock lock(&mu_);
    auto it = keys_.find(std::string(id));
    if (it == keys_.end()) return absl::NotFoundError("no such key");
    Key copy = it->second;
    absl::Status s = mutate(copy);
    if (!s.ok()) return s;
    it->second = copy;
    return copy;
  }
  absl::Status CreateAlias(const AliasRecord&) override {
    return absl::UnimplementedError("not needed here");
  }
  absl::Status DeleteAlias(absl::string_view) override {
    return absl::UnimplementedError("not needed here");
  }
  absl::StatusOr<std::vector<AliasRecord>> ListAliases() override {
    return std::vector<AliasRecord>();
  }
  // The registry never touches the deployment or generate-intents.
  absl::StatusOr<std::optional<Deployment>> LoadDeployment() override {
    return absl::UnimplementedError("not needed here");
  }
  absl::Status InsertDeployment(const Deployment&) override {
    return absl::UnimplementedError("not needed here");
  }
  absl::Status InsertIntent(const MaterialIntent&) override {
    return absl::UnimplementedError("not needed here");
  }
  absl::StatusOr<std::vector<MaterialIntent>> ListIntents() override {
    return absl::UnimplementedError("not needed here");
  }
  absl::Status DeleteIntent(absl::string_view) override {
    return absl::UnimplementedError("not needed here");
  }
  absl::StatusOr<bool> ClaimIntent(absl::string_view) override {
    return absl::UnimplementedError("not needed here");
  }
  int SchemaVersion() const override { return 1; }
  bool Shared() const override { return true; }

  // Another replica's commit: in the store, not yet in the registry.
  void AddBehindTheRegistry(const Key& key) {
    absl::MutexLock lock(&mu_);
    keys_[key.id] = key;
  }
  void Hold(const std::string& id) { hold_id_ = id; }
  void WaitUntilHeld() { held_.WaitForNotification(); }
  void Release() {
    if (!release_.HasBeenNotified()) release_.Notify();
  }
  int lookups() const { return lookups_.load(); }

 private:
  absl::Mutex mu_;
  std::map<std::string, Key> keys_ ABSL_GUARDED_BY(mu_);
  std::atomic<int> lookups_{0};
  std::string hold_id_;  // set before any lookup
  std::atomic<bool> held_once_{false};
  absl::Notification held_, release_;
};

Key NewKey() {
  Key key;
  key.id = NewKeyId();
  key.state = KeyState::kEnabled;
  return key;
}

TEST(KeyRegistryTest, UnknownIdsCostOneStoreLookup) {
  FakeSharedStore store;
  auto registry = KeyRegistry::Load(&store);
  ASSERT_THAT(registry, IsOk());
  const std::string id = NewKeyId();
  for (int i = 0; i < 5; ++i) {
    EXPECT_THAT((*registry)->Find(id), StatusIs(absl::StatusCode::kNotFound));
  }
  EXPECT_EQ(store.lookups(), 1);
  // Malformed ids and aliases never reach the store.
  EXPECT_FALSE((*registry)->Find("k-short").ok());
  EXPECT_FALSE((*registry)->Find("alias/none").ok());
  EXPECT_EQ(store.lookups(), 1);
}

TEST(KeyRegistryTest, RememberedMissIsForgottenWhenTheKeyAppears) {
  FakeSharedStore store;
  auto registry = KeyRegistry::Load(&store);
  ASSERT_THAT(registry, IsOk());
  // Another replica creates the key after this one looked for it; the
  // change feed then refreshes it.
  Key key = NewKey();
  EXPECT_FALSE((*registry)->Find(key.id).ok());
  store.AddBehindTheRegistry(key);
  ASSERT_THAT((*registry)->Refresh(key.id), IsOk());
  EXPECT_THAT((*registry)->Find(key.id), IsOk());
  // This process's own create.
  Key mine = NewKey();
  EXPECT_FALSE((*registry)->Find(mine.id).ok());
  ASSERT_THAT((*registry)->Insert(mine), IsOk());
  EXPECT_THAT((*registry)->Find(mine.id), IsOk());
  // A feed that reconnected (kEverything) forgets every miss.
  Key third = NewKey();
  EXPECT_FALSE((*registry)->Find(third.id).ok());
  store.AddBehindTheRegistry(third);
  ASSERT_THAT((*registry)->Refresh(ChangeFeed::kEverything), IsOk());
  EXPECT_THAT((*registry)->Find(third.id), IsOk());
}

// While one unknown id's lookup is stuck in the store (a slow database, a
// flood), other callers find their keys, writers write, and more unknown
// ids are looked up. Before the fix the lookup held the registry's write
// lock across the round trip, and this test hung.
TEST(KeyRegistryTest, LookupInFlightStallsNoOne) {
  FakeSharedStore store;
  Key known = NewKey();
  store.AddBehindTheRegistry(known);
  auto registry = KeyRegistry::Load(&store);
  ASSERT_THAT(registry, IsOk());
  const std::string stuck = NewKeyId();
  store.Hold(stuck);
  std::thread flood([&] { (*registry)->Find(stuck).IgnoreError(); });
  store.WaitUntilHeld();
  EXPECT_THAT((*registry)->Find(known.id), IsOk());
  EXPECT_THAT((*registry)->Update(known.id,
                                  [](Key& k) {
                                    k.description = "changed";
                                    return absl::OkStatus();
                                  }),
              IsOk());
  EXPECT_FALSE((*registry)->Find(NewKeyId()).ok());
  Key created = NewKey();
  EXPECT_THAT((*registry)->Insert(created), IsOk());
  store.Release();
  flood.join();
}

// Concurrent lookups of unknown ids are bounded: past kMaxStoreLookups in
// flight, an unknown id is answered from memory.
TEST(KeyRegistryTest, ConcurrentStoreLookupsAreBounded) {
  FakeSharedStore store;
  auto registry = KeyRegistry::Load(&store);
  ASSERT_THAT(registry, IsOk());
  const std::string stuck = NewKeyId();
  store.Hold(stuck);
  std::vector<std::thread> threads;
  // All of these block on the same held id (it is never remembered while
  // in flight).
  for (int i = 0; i < KeyRegistry::kMaxStoreLookups; ++i) {
    threads.emplace_back([&] { (*registry)->Find(stuck).IgnoreError(); });
  }
  while (store.lookups() < KeyRegistry::kMaxStoreLookups) {
    std::this_thread::yield();
  }
  const int before = store.lookups();
  EXPECT_THAT((*registry)->Find(NewKeyId()),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(store.lookups(), before);  // no round trip for it
  store.Release();
  for (std::thread& t : threads) t.join();
}

}  // namespace
}  // namespace custos::kms
