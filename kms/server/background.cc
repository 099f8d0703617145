#include "kms/server/background.h"

#include <chrono>
#include <string>
#include <vector>

#include "common/logging.h"
#include "common/status_macros.h"

namespace custos::server {

absl::Status BackgroundWork::Start() {
  CUSTOS_ASSIGN_OR_RETURN(leadership_, store_->NewLeadership());
  CUSTOS_ASSIGN_OR_RETURN(feed_, store_->WatchChanges());
  if (feed_ != nullptr) {
    // The feed must first connect and load everything.
    registry_->RequireFreshness(options_.max_staleness);
    registry_->MarkFresh();
  }
  maintenance_ = std::thread([this] { Maintain(); });
  if (feed_ != nullptr) changes_ = std::thread([this] { FollowChanges(); });
  return absl::OkStatus();
}

void BackgroundWork::Stop() {
  stop_.Notify();
  if (maintenance_.joinable()) maintenance_.join();
  if (changes_.joinable()) changes_.join();
}

void BackgroundWork::Maintain() {
  const bool shared = leadership_ != nullptr;
  bool leading = false;
  bool reconciled = false;
  auto last_reconcile = std::chrono::steady_clock::time_point::min();
  for (bool first = true;
       first || !stop_.WaitForNotificationWithTimeout(options_.interval);
       first = false) {
    const bool lead = !shared || leadership_->Hold();
    if (lead != leading) {
      // Time another replica counted toward a deletion window must not be
      // counted again here, nor ours there.
      service_->ForgetDeletionProgress();
      leading = lead;
      reconciled = false;
      if (shared) {
        spdlog::info(lead ? "leading background work for the replicas"
                          : "another replica leads background work");
      }
    }
    if (!leading) continue;
    const auto now = std::chrono::steady_clock::now();
    if (!reconciled ||
        (shared && now - last_reconcile >=
                       absl::ToChronoNanoseconds(options_.reconcile_every))) {
      absl::Status s = absl::OkStatus();
      // A replica's cache may lag the store; the reconciler judges what
      // is an orphan by the cache.
      if (shared) s = registry_->Refresh(kms::ChangeFeed::kEverything);
      if (s.ok()) s = service_->Reconcile().status();
      reconciled = s.ok();
      last_reconcile = now;
      if (!s.ok()) {
        spdlog::error("reconcile failed, retried at the next pass: {}",
                      s.message());
      }
    }
    // Nothing scheduled runs before a reconciliation has judged the token
    // against the database (a restored older database must not destroy
    // what a newer one keeps).
    if (!reconciled) continue;
    kms::MaintenanceReport r = service_->RunScheduledWork();
    if (r.rotated || r.destroyed_keys || r.failures) {
      spdlog::info("maintenance: rotated {}, destroyed {} keys, {} failures",
                   r.rotated, r.destroyed_keys, r.failures);
    }
  }
}

void BackgroundWork::FollowChanges() {
  bool failing = false;
  bool reload_all = false;
  while (!stop_.WaitForNotificationWithTimeout(absl::ZeroDuration())) {
    absl::StatusOr<std::vector<std::string>> changed =
        feed_->Wait(options_.feed_wait);
    if (!changed.ok()) {
      if (!failing) {
        spdlog::error(
            "change feed: {}; other replicas' changes are not "
            "seen until it reconnects",
            changed.status().message());
      }
      failing = true;
      stop_.WaitForNotificationWithTimeout(absl::Seconds(1));
      continue;
    }
    if (failing) spdlog::info("change feed: connected again");
    failing = false;
    // A change that could not be read is read with everything else later.
    if (reload_all) changed->push_back(kms::ChangeFeed::kEverything);
    reload_all = false;
    for (const std::string& id : *changed) {
      absl::Status s = registry_->Refresh(id);
      if (!s.ok()) {
        reload_all = true;
        spdlog::error("refreshing key {} from the store: {}", id, s.message());
      }
    }
    // Every change committed before this round trip is in the cache.
    if (!reload_all) registry_->MarkFresh();
  }
}

}  // namespace custos::server
