#include "kms/key_registry.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kms/ciphertext_blob.h"

namespace custos::kms {

namespace {
int64_t SteadyNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

absl::StatusOr<std::unique_ptr<KeyRegistry>> KeyRegistry::Load(Store* store) {
  std::unique_ptr<KeyRegistry> registry(new KeyRegistry(store));
  CUSTOS_ASSIGN_OR_RETURN(std::vector<Key> keys, store->LoadAllKeys());
  CUSTOS_ASSIGN_OR_RETURN(std::vector<AliasRecord> aliases,
                          store->ListAliases());
  absl::MutexLock lock(&registry->mu_);
  for (Key& key : keys) {
    registry->PutLocked(std::make_shared<const Key>(std::move(key)));
  }
  for (AliasRecord& alias : aliases) {
    registry->aliases_[alias.name] = std::move(alias);
  }
  return registry;
}

void KeyRegistry::PutLocked(std::shared_ptr<const Key> key) {
  std::string id = key->id;
  keys_[id] = std::move(key);
}

absl::StatusOr<std::shared_ptr<const Key>> KeyRegistry::Find(
    absl::string_view name) {
  absl::StatusOr<std::shared_ptr<const Key>> key = FindCached(name);
  if (!absl::IsNotFound(key.status()) || !store_->Shared() ||
      !IsValidKeyId(name)) {
    return key;
  }
  // Another replica's new key reaches this cache through the change feed
  // within milliseconds; a call naming it sooner reads it from the store.
  return FindInStore(name, key.status());
}

absl::StatusOr<std::shared_ptr<const Key>> KeyRegistry::FindInStore(
    absl::string_view id, absl::Status not_found) {
  const std::string name(id);
  uint64_t epoch;
  {
    absl::MutexLock lock(&missing_mu_);
    auto it = missing_.find(name);
    if (it != missing_.end()) {
      if (SteadyNanos() - it->second < absl::ToInt64Nanoseconds(kNegativeTtl)) {
        return not_found;
      }
      missing_.erase(it);
    }
    // A flood of unknown ids must not take every thread into the store.
    if (lookups_in_flight_ >= kMaxStoreLookups) return not_found;
    ++lookups_in_flight_;
    epoch = missing_epoch_;
  }
  // No lock is held across the round trip.
  absl::StatusOr<Key> stored = store_->LoadKey(id);
  {
    absl::MutexLock lock(&missing_mu_);
    --lookups_in_flight_;
    if (absl::IsNotFound(stored.status()) && epoch == missing_epoch_) {
      if (missing_.size() >= kMaxNegativeEntries) missing_.clear();
      missing_.emplace(name, SteadyNanos());
    }
  }
  if (!stored.ok()) return not_found;
  // Found: bring it (with its aliases) into memory, in order with this
  // process's writes.
  if (!Refresh(id).ok()) return not_found;
  return FindCached(id);
}

void KeyRegistry::ForgetMissing(absl::string_view id) {
  absl::MutexLock lock(&missing_mu_);
  ++missing_epoch_;
  if (id == ChangeFeed::kEverything) {
    missing_.clear();
  } else {
    missing_.erase(std::string(id));
  }
}

absl::StatusOr<std::shared_ptr<const Key>> KeyRegistry::FindCached(
    absl::string_view name) const {
  absl::ReaderMutexLock lock(&mu_);
  std::string id(name);
  if (absl::StartsWith(name, "alias/")) {
    auto alias = aliases_.find(id);
    if (alias == aliases_.end()) {
      return absl::NotFoundError(absl::StrCat("alias ", name, " not found"));
    }
    id = alias->second.key_id;
  }
  auto it = keys_.find(id);
  if (it == keys_.end()) {
    return absl::NotFoundError(absl::StrCat("key ", name, " not found"));
  }
  return it->second;
}

std::vector<std::shared_ptr<const Key>> KeyRegistry::All() const {
  std::vector<std::shared_ptr<const Key>> out;
  {
    absl::ReaderMutexLock lock(&mu_);
    out.reserve(keys_.size());
    for (const auto& [id, key] : keys_) out.push_back(key);
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    if (a->create_time != b->create_time) {
      return a->create_time > b->create_time;
    }
    return a->id < b->id;
  });
  return out;
}

size_t KeyRegistry::size() const {
  absl::ReaderMutexLock lock(&mu_);
  return keys_.size();
}

std::map<KeyState, size_t> KeyRegistry::CountByState() const {
  std::map<KeyState, size_t> counts = {{KeyState::kEnabled, 0},
                                       {KeyState::kDisabled, 0},
                                       {KeyState::kPendingDeletion, 0},
                                       {KeyState::kDestroyed, 0}};
  absl::ReaderMutexLock lock(&mu_);
  for (const auto& [id, key] : keys_) ++counts[key->state];
  return counts;
}

absl::StatusOr<metrics::CallbackHandle> KeyRegistry::ExportMetrics(
    metrics::Registry& registry) const {
  return registry.AddCallback(
      "custos_keys", "Keys by state.", metrics::Registry::Type::kGauge,
      {"state"}, [this] {
        std::vector<metrics::Sample> samples;
        for (const auto& [state, count] : CountByState()) {
          samples.push_back(
              {{KeyStateName(state)}, static_cast<double>(count)});
        }
        return samples;
      });
}

absl::Status KeyRegistry::Insert(Key key) {
  absl::MutexLock write(&write_mu_);
  CUSTOS_RETURN_IF_ERROR(store_->InsertKey(key));
  ForgetMissing(key.id);
  absl::MutexLock lock(&mu_);
  for (const std::string& alias : key.aliases) {
    aliases_[alias] = AliasRecord{alias, key.id, key.create_time};
  }
  PutLocked(std::make_shared<const Key>(std::move(key)));
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const Key>> KeyRegistry::Update(
    absl::string_view id, Store::Mutator mutate) {
  absl::MutexLock write(&write_mu_);
  CUSTOS_ASSIGN_OR_RETURN(Key key, store_->UpdateKey(id, mutate));
  auto snapshot = std::make_shared<const Key>(std::move(key));
  absl::MutexLock lock(&mu_);
  PutLocked(snapshot);
  return snapshot;
}

absl::Status KeyRegistry::CreateAlias(const AliasRecord& alias) {
  absl::MutexLock write(&write_mu_);
  CUSTOS_RETURN_IF_ERROR(store_->CreateAlias(alias));
  // Committed: the cache follows in memory, as DeleteAlias's does (a
  // failed re-read must not report a committed alias as not made). A key
  // not cached here (another replica's) arrives with the change feed.
  absl::MutexLock lock(&mu_);
  aliases_[alias.name] = alias;
  auto it = keys_.find(alias.key_id);
  if (it != keys_.end()) {
    Key copy = *it->second;
    copy.aliases.insert(
        std::upper_bound(copy.aliases.begin(), copy.aliases.end(), alias.name),
        alias.name);
    PutLocked(std::make_shared<const Key>(std::move(copy)));
  }
  return absl::OkStatus();
}

absl::Status KeyRegistry::DeleteAlias(absl::string_view alias) {
  absl::MutexLock write(&write_mu_);
  std::string key_id;
  {
    absl::ReaderMutexLock lock(&mu_);
    auto it = aliases_.find(std::string(alias));
    if (it != aliases_.end()) key_id = it->second.key_id;
  }
  CUSTOS_RETURN_IF_ERROR(store_->DeleteAlias(alias));
  absl::MutexLock lock(&mu_);
  aliases_.erase(std::string(alias));
  auto it = keys_.find(key_id);
  if (it != keys_.end()) {
    Key copy = *it->second;
    copy.aliases.erase(
        std::remove(copy.aliases.begin(), copy.aliases.end(), alias),
        copy.aliases.end());
    PutLocked(std::make_shared<const Key>(std::move(copy)));
  }
  return absl::OkStatus();
}

absl::Status KeyRegistry::Refresh(absl::string_view id) {
  // Under write_mu_, no write of this process is half way: what the store
  // returns is at least as new as the cache.
  absl::MutexLock write(&write_mu_);
  ForgetMissing(id);
  if (id == ChangeFeed::kEverything) {
    CUSTOS_ASSIGN_OR_RETURN(std::vector<Key> keys, store_->LoadAllKeys());
    CUSTOS_ASSIGN_OR_RETURN(std::vector<AliasRecord> aliases,
                            store_->ListAliases());
    absl::MutexLock lock(&mu_);
    keys_.clear();
    aliases_.clear();
    for (Key& key : keys)
      PutLocked(std::make_shared<const Key>(std::move(key)));
    for (AliasRecord& alias : aliases) {
      aliases_[alias.name] = std::move(alias);
    }
    return absl::OkStatus();
  }
  absl::StatusOr<Key> key = store_->LoadKey(id);
  if (!key.ok() && !absl::IsNotFound(key.status())) return key.status();
  std::vector<AliasRecord> aliases;
  if (key.ok() && !key->aliases.empty()) {
    CUSTOS_ASSIGN_OR_RETURN(std::vector<AliasRecord> all,
                            store_->ListAliases());
    for (AliasRecord& alias : all) {
      if (alias.key_id == id) aliases.push_back(std::move(alias));
    }
  }
  absl::MutexLock lock(&mu_);
  for (auto it = aliases_.begin(); it != aliases_.end();) {
    if (it->second.key_id == id) {
      aliases_.erase(it++);
    } else {
      ++it;
    }
  }
  if (!key.ok()) {
    keys_.erase(std::string(id));
    return absl::OkStatus();
  }
  for (AliasRecord& alias : aliases) aliases_[alias.name] = std::move(alias);
  PutLocked(std::make_shared<const Key>(*std::move(key)));
  return absl::OkStatus();
}

void KeyRegistry::RequireFreshness(absl::Duration limit) {
  fresh_at_ns_.store(SteadyNanos());
  fresh_limit_ns_.store(absl::ToInt64Nanoseconds(limit));
}

void KeyRegistry::MarkFresh() { fresh_at_ns_.store(SteadyNanos()); }

absl::Status KeyRegistry::CheckFresh() const {
  const int64_t limit = fresh_limit_ns_.load(std::memory_order_relaxed);
  if (limit == 0) return absl::OkStatus();
  const int64_t age =
      SteadyNanos() - fresh_at_ns_.load(std::memory_order_relaxed);
  if (age <= limit) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      "this replica has not heard from the key database for ",
      absl::FormatDuration(absl::Nanoseconds(age)),
      "; keys are not used until it has (a key disabled on another replica "
      "must not stay usable); retry, or use another replica"));
}

std::vector<AliasRecord> KeyRegistry::Aliases(absl::string_view key_id) const {
  std::vector<AliasRecord> out;
  {
    absl::ReaderMutexLock lock(&mu_);
    for (const auto& [name, alias] : aliases_) {
      if (key_id.empty() || alias.key_id == key_id) out.push_back(alias);
    }
  }
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return a.name < b.name; });
  return out;
}

}  // namespace custos::kms
