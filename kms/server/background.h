// BackgroundWork: custosd's work besides serving calls, on threads of its
// own. The maintenance thread reconciles the HSM with the database and runs
// scheduled rotations and deletions, every `interval`. With a store that
// several replicas share, it does so only while this replica holds the
// store's Leadership (one replica at a time; another takes over when the
// holder dies), reconciles every `reconcile_every` after refreshing the
// whole registry, and a second thread applies the other replicas' changes
// to the registry as the store's ChangeFeed reports them. Start and Stop
// from one thread; the work itself is thread-safe against serving.
#ifndef CUSTOS_KMS_SERVER_BACKGROUND_H_
#define CUSTOS_KMS_SERVER_BACKGROUND_H_

#include <memory>
#include <thread>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "common/steady_notification.h"
#include "kms/key_registry.h"
#include "kms/key_service.h"
#include "kms/store/store.h"

namespace custos::server {

class BackgroundWork {
 public:
  struct Options {
    absl::Duration interval = absl::Seconds(10);
    // Shared stores only: how often the leader reconciles (single-process
    // stores reconcile once, after start-up, until it succeeds).
    absl::Duration reconcile_every = absl::Minutes(5);
    // How long the change feed waits per round trip to the store (bounds
    // Stop's wait).
    absl::Duration feed_wait = absl::Milliseconds(250);
    // Shared stores only: keys are not used while the change feed has not
    // completed a round trip for this long (KeyRegistry::CheckFresh).
    absl::Duration max_staleness = absl::Seconds(1);
  };

  // All pointers must outlive this object.
  BackgroundWork(Options options, kms::KeyService* service,
                 kms::KeyRegistry* registry, kms::Store* store)
      : options_(options),
        service_(service),
        registry_(registry),
        store_(store) {}
  ~BackgroundWork() { Stop(); }

  // Starts the threads; an error if the store's feed or lease cannot be
  // made.
  absl::Status Start();
  // Stops and joins the threads. Idempotent.
  void Stop();

 private:
  void Maintain();
  void FollowChanges();

  const Options options_;
  kms::KeyService* const service_;
  kms::KeyRegistry* const registry_;
  kms::Store* const store_;
  std::unique_ptr<kms::Leadership> leadership_;  // null: always leads
  std::unique_ptr<kms::ChangeFeed> feed_;        // null: nothing to follow
  SteadyNotification stop_;
  std::thread maintenance_;
  std::thread changes_;
};

}  // namespace custos::server

#endif  // CUSTOS_KMS_SERVER_BACKGROUND_H_
