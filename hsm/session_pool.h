// SessionPool: a fixed number of logged-in PKCS#11 sessions, each owned by a
// worker thread of its own, serving one queue of HSM operations with
// deadlines.
//
// Why threads: a PKCS#11 call cannot be cancelled, so the only way to bound
// how long a caller waits on a hung HSM is to make the call on another
// thread. Callers enqueue an operation and wait. An operation still queued
// after `lease_timeout` is withdrawn (UNAVAILABLE); one that runs longer than
// `call_timeout` answers DEADLINE_EXCEEDED, and its worker is abandoned (it
// closes its session when the call finally returns) and replaced by a fresh
// one, so a hung HSM does not exhaust the pool (up to `max_abandoned` hung
// calls at once). Under load, workers take the next operation from the queue
// without sleeping.
//
// Recovery: when an operation fails with a broken-session CK_RV
// (IsSessionBroken: handle invalid, session closed, logged out, device
// removed or failed, token not present), that session is closed and reopened
// with a fresh C_Login before its next use, and the operation is retried, at
// most `size + 1` attempts in all, all within one overall deadline of
// lease_timeout + call_timeout. The service recovers from
// C_CloseAllSessions or a token re-insertion without a restart.
//
// Metrics (when Options::metrics is set): how long operations wait for a
// session, and the pool's sessions, queue, hung calls and timeouts, read
// from stats() at scrape time.
//
// Thread-safe.
#ifndef CUSTOS_HSM_SESSION_POOL_H_
#define CUSTOS_HSM_SESSION_POOL_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "common/secret_bytes.h"
#include "hsm/session.h"

namespace custos::hsm {

class SessionPool {
 public:
  struct Options {
    int size = 4;
    // How long a caller waits for a free session before UNAVAILABLE.
    absl::Duration lease_timeout = absl::Seconds(5);
    // How long one operation may take before DEADLINE_EXCEEDED.
    absl::Duration call_timeout = absl::Seconds(10);
    // Hung calls whose sessions are replaced; beyond this the pool shrinks
    // until they return.
    int max_abandoned = 4;
    // Where the pool's metrics go (docs/operations.md); null: none. Must
    // outlive the pool.
    metrics::Registry* metrics = nullptr;
  };

  struct Stats {
    uint64_t leases = 0;          // operations submitted
    uint64_t waits = 0;           // of which found every session busy
    uint64_t lease_timeouts = 0;  // withdrawn from the queue (UNAVAILABLE)
    uint64_t evictions = 0;       // sessions closed after a broken-session rv
    uint64_t resets = 0;          // sessions replaced after a failed call
    uint64_t reopens = 0;         // sessions opened to replace others
    uint64_t retries = 0;         // operations retried on another session
    uint64_t call_timeouts = 0;   // operations that overran call_timeout
    int workers = 0;              // sessions serving the pool now
    int idle = 0;                 // of which free
    int abandoned = 0;            // hung calls still running
    int queued = 0;               // operations waiting for a session
  };

  // An operation on one session. It runs on the session's worker thread and
  // may outlive the Run() call that started it (after a timeout), so it must
  // own, not borrow, everything it touches. It may run more than once.
  using Op = absl::AnyInvocable<absl::Status(Session&)>;

  // Opens and logs in `options.size` sessions on `slot`. Fails (with the
  // CK_RV, never the PIN) if any cannot be opened.
  static absl::StatusOr<std::unique_ptr<SessionPool>> Create(
      CK_FUNCTION_LIST* fn, CK_SLOT_ID slot, SecretBytes pin, Options options);
  // Stops every worker. Waits for calls still inside the HSM to return.
  ~SessionPool();
  SessionPool(const SessionPool&) = delete;
  SessionPool& operator=(const SessionPool&) = delete;

  // Runs `op` on a free session within the deadlines; see the class comment.
  absl::Status Run(Op op);

  Stats stats() const;
  const Options& options() const { return options_; }
  // Changes whenever a session is evicted as broken. Object handles cached
  // under an older epoch may be stale (a re-login or token re-insertion can
  // renumber them) and must be found again.
  uint64_t epoch() const { return epoch_.load(std::memory_order_acquire); }

 private:
  class Worker;
  struct Job;

  SessionPool(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot, SecretBytes pin,
              Options options);
  absl::Status RunOnce(std::shared_ptr<Op> op, absl::Time deadline);
  absl::Status Submit(const std::shared_ptr<Job>& job, absl::Time deadline,
                      std::vector<std::unique_ptr<Worker>>& exited);
  // Starts a worker; `session` may be empty (opened by the worker on first
  // use).
  void AddWorkerLocked(std::unique_ptr<Session> session)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes the workers that have exited out of the pool; the caller joins
  // them (instantly: their threads have ended) after releasing mu_.
  std::vector<std::unique_ptr<Worker>> TakeExitedLocked()
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool HasWorkOrStopping() const ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    return !queue_.empty() || stopping_;
  }
  // Called by workers.
  std::shared_ptr<Job> NextJob(Worker* worker);
  // Records the result; returns false if the worker was abandoned (or the
  // pool is stopping) and must end.
  bool FinishJob(Worker* worker, Job& job, absl::Status result);
  // Called by a retired worker as the very last thing it does.
  void WorkerExited(Worker* worker);
  absl::StatusOr<Session> OpenSession();
  void CountEviction();
  void CountReset();
  absl::Status RegisterMetrics(metrics::Registry& registry);

  CK_FUNCTION_LIST* const fn_;
  const CK_SLOT_ID slot_;
  const SecretBytes pin_;
  const Options options_;

  mutable absl::Mutex mu_;
  std::deque<std::shared_ptr<Job>> queue_ ABSL_GUARDED_BY(mu_);
  std::list<std::unique_ptr<Worker>> workers_ ABSL_GUARDED_BY(mu_);
  std::vector<Worker*> finished_ ABSL_GUARDED_BY(mu_);  // to join
  int live_workers_ ABSL_GUARDED_BY(mu_) = 0;           // not abandoned
  int running_ ABSL_GUARDED_BY(mu_) = 0;  // live workers mid-operation
  int abandoned_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  Stats stats_ ABSL_GUARDED_BY(mu_);
  std::atomic<uint64_t> epoch_{0};
  // Null without metrics. Set before any worker starts.
  metrics::Histogram* wait_seconds_ = nullptr;
  // Unregistered first thing in the destructor: the callbacks read stats().
  std::vector<metrics::CallbackHandle> metric_callbacks_;
};

}  // namespace custos::hsm

#endif  // CUSTOS_HSM_SESSION_POOL_H_
