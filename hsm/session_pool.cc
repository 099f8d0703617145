#include "hsm/session_pool.h"

#include <algorithm>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "hsm/ck_status.h"

namespace custos::hsm {

// One operation on its way through the pool. State and result are guarded
// by the pool's mutex.
struct SessionPool::Job {
  enum class State { kQueued, kRunning, kDone };
  std::shared_ptr<Op> op;
  State state = State::kQueued;
  Worker* worker = nullptr;  // while running
  absl::Status result;
  std::chrono::steady_clock::time_point enqueued;  // with metrics only

  static bool Started(Job* job) { return job->state != State::kQueued; }
  static bool Done(Job* job) { return job->state == State::kDone; }
};

// One session and the thread that alone uses it.
class SessionPool::Worker {
 public:
  Worker(SessionPool* pool, std::unique_ptr<Session> session)
      : pool_(pool), session_(std::move(session)) {
    thread_ = std::thread([this] { Loop(); });
  }
  ~Worker() { thread_.join(); }

  bool abandoned = false;  // guarded by pool_->mu_

 private:
  void Loop() {
    while (std::shared_ptr<Job> job = pool_->NextJob(this)) {
      absl::Status result = Execute(*job->op);
      bool broken = IsSessionBroken(result);
      if (!pool_->FinishJob(this, *job, std::move(result))) break;
      Maintain(broken);
    }
    // Retired (abandoned after a hang, or stopping): close the session here,
    // on this thread, so that nobody waits on a slow C_CloseSession.
    session_.reset();
    pool_->WorkerExited(this);
  }

  absl::Status Execute(Op& op) {
    if (session_ == nullptr) {
      absl::StatusOr<Session> session = pool_->OpenSession();
      if (!session.ok()) return session.status();
      session_ = std::make_unique<Session>(*std::move(session));
    }
    return op(*session_);
  }

  // Between jobs: drop a broken session (reopened on next use) or replace
  // one left in an unknown state.
  void Maintain(bool broken) {
    if (session_ == nullptr) return;
    if (broken) {
      session_.reset();
      pool_->CountEviction();
    } else if (session_->needs_reset()) {
      // Open the replacement before closing the old session: the token's
      // login state lasts while any session is open, so no C_Login is paid.
      absl::StatusOr<Session> fresh = pool_->OpenSession();
      if (fresh.ok()) {
        *session_ = *std::move(fresh);
      } else {
        session_.reset();
      }
      pool_->CountReset();
    }
  }

  SessionPool* const pool_;
  std::unique_ptr<Session> session_;  // used by thread_ only
  std::thread thread_;
};

SessionPool::SessionPool(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot, SecretBytes pin,
                         Options options)
    : fn_(fn), slot_(slot), pin_(std::move(pin)), options_(options) {}

absl::StatusOr<std::unique_ptr<SessionPool>> SessionPool::Create(
    CK_FUNCTION_LIST* fn, CK_SLOT_ID slot, SecretBytes pin, Options options) {
  if (options.size < 1) {
    return absl::InvalidArgumentError("HSM session pool size must be >= 1");
  }
  if (options.call_timeout <= absl::ZeroDuration() ||
      options.lease_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "HSM call and lease timeouts must be positive");
  }
  std::vector<std::unique_ptr<Session>> sessions;
  for (int i = 0; i < options.size; ++i) {
    CUSTOS_ASSIGN_OR_RETURN(Session session, Session::Open(fn, slot));
    CUSTOS_RETURN_IF_ERROR(session.Login(pin));
    sessions.push_back(std::make_unique<Session>(std::move(session)));
  }
  std::unique_ptr<SessionPool> pool(
      new SessionPool(fn, slot, std::move(pin), options));
  if (options.metrics != nullptr) {
    CUSTOS_RETURN_IF_ERROR(pool->RegisterMetrics(*options.metrics));
  }
  absl::MutexLock lock(&pool->mu_);
  for (auto& session : sessions) pool->AddWorkerLocked(std::move(session));
  return pool;
}

absl::Status SessionPool::RegisterMetrics(metrics::Registry& registry) {
  CUSTOS_ASSIGN_OR_RETURN(
      auto* wait,
      registry.AddHistogram(
          "custos_hsm_pool_wait_seconds",
          "Time HSM operations waited in the queue for a free session.", {},
          metrics::LatencyBuckets()));
  wait_seconds_ = &wait->WithLabels({});
  using Type = metrics::Registry::Type;
  struct Reading {
    const char* name;
    const char* help;
    Type type;
    double (*read)(const Stats&);
  };
  const Reading readings[] = {
      {"custos_hsm_pool_sessions",
       "Sessions serving the pool (hung ones not counted).", Type::kGauge,
       [](const Stats& s) -> double { return s.workers; }},
      {"custos_hsm_pool_sessions_in_use",
       "Sessions running an HSM operation now.", Type::kGauge,
       [](const Stats& s) -> double { return s.workers - s.idle; }},
      {"custos_hsm_pool_queued_operations",
       "HSM operations waiting for a free session.", Type::kGauge,
       [](const Stats& s) -> double { return s.queued; }},
      {"custos_hsm_pool_hung_calls",
       "HSM calls abandoned after the call timeout that have not returned.",
       Type::kGauge, [](const Stats& s) -> double { return s.abandoned; }},
      {"custos_hsm_pool_lease_timeouts_total",
       "HSM operations that found no free session within the lease timeout "
       "(UNAVAILABLE).",
       Type::kCounter,
       [](const Stats& s) -> double { return s.lease_timeouts; }},
      {"custos_hsm_pool_call_timeouts_total",
       "HSM calls that overran the call timeout (DEADLINE_EXCEEDED).",
       Type::kCounter,
       [](const Stats& s) -> double { return s.call_timeouts; }},
      {"custos_hsm_pool_session_evictions_total",
       "Sessions closed after a broken-session error (reopened on next use).",
       Type::kCounter, [](const Stats& s) -> double { return s.evictions; }},
      {"custos_hsm_pool_retries_total",
       "HSM operations retried on another session after a broken session.",
       Type::kCounter, [](const Stats& s) -> double { return s.retries; }},
  };
  for (const Reading& r : readings) {
    CUSTOS_ASSIGN_OR_RETURN(
        metrics::CallbackHandle handle,
        registry.AddCallback(r.name, r.help, r.type,
                             [this, read = r.read] { return read(stats()); }));
    metric_callbacks_.push_back(std::move(handle));
  }
  return absl::OkStatus();
}

SessionPool::~SessionPool() {
  metric_callbacks_.clear();  // no scrape reads the pool from here on
  std::list<std::unique_ptr<Worker>> workers;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    workers.swap(workers_);
    finished_.clear();
  }
  // Joins each worker, waiting for calls still inside the HSM. Workers that
  // exit meanwhile call WorkerExited, which only records them.
  workers.clear();
}

void SessionPool::AddWorkerLocked(std::unique_ptr<Session> session) {
  workers_.push_back(std::make_unique<Worker>(this, std::move(session)));
  ++live_workers_;
}

std::vector<std::unique_ptr<SessionPool::Worker>>
SessionPool::TakeExitedLocked() {
  std::vector<std::unique_ptr<Worker>> exited;
  for (Worker* done : finished_) {
    for (auto it = workers_.begin(); it != workers_.end(); ++it) {
      if (it->get() == done) {
        exited.push_back(std::move(*it));
        workers_.erase(it);
        break;
      }
    }
  }
  finished_.clear();
  return exited;
}

void SessionPool::WorkerExited(Worker* worker) {
  absl::MutexLock lock(&mu_);
  if (!stopping_) finished_.push_back(worker);
}

std::shared_ptr<SessionPool::Job> SessionPool::NextJob(Worker* worker) {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(this, &SessionPool::HasWorkOrStopping));
  if (stopping_) return nullptr;
  std::shared_ptr<Job> job = std::move(queue_.front());
  queue_.pop_front();
  if (wait_seconds_ != nullptr) {
    wait_seconds_->Observe(std::chrono::duration<double>(
                               std::chrono::steady_clock::now() - job->enqueued)
                               .count());
  }
  job->state = Job::State::kRunning;
  job->worker = worker;
  ++running_;
  return job;
}

bool SessionPool::FinishJob(Worker* worker, Job& job, absl::Status result) {
  absl::MutexLock lock(&mu_);
  job.result = std::move(result);
  job.state = Job::State::kDone;
  if (!worker->abandoned) {
    --running_;
    return !stopping_;
  }
  // The caller gave up on this call long ago: retire the worker (it exits and
  // is reaped), and refill the pool if the hang left it short.
  --abandoned_;
  if (live_workers_ < options_.size && !stopping_) AddWorkerLocked(nullptr);
  return false;
}

absl::Status SessionPool::Run(Op op) {
  auto shared = std::make_shared<Op>(std::move(op));
  const absl::Time deadline =
      absl::Now() + options_.lease_timeout + options_.call_timeout;
  absl::Status status;
  for (int attempt = 0; attempt <= options_.size; ++attempt) {
    if (attempt > 0) {
      if (absl::Now() >= deadline) break;
      absl::MutexLock lock(&mu_);
      ++stats_.retries;
    }
    status = RunOnce(shared, deadline);
    if (!IsSessionBroken(status)) return status;
  }
  return status;
}

absl::Status SessionPool::RunOnce(std::shared_ptr<Op> op, absl::Time deadline) {
  auto job = std::make_shared<Job>();
  job->op = std::move(op);
  std::vector<std::unique_ptr<Worker>> exited;
  absl::Status result = Submit(job, deadline, exited);
  exited.clear();  // joins retired workers outside the lock
  return result;
}

absl::Status SessionPool::Submit(const std::shared_ptr<Job>& job,
                                 absl::Time deadline,
                                 std::vector<std::unique_ptr<Worker>>& exited) {
  absl::MutexLock lock(&mu_);
  exited = TakeExitedLocked();
  ++stats_.leases;
  if (running_ + static_cast<int>(queue_.size()) >= live_workers_) {
    ++stats_.waits;
  }
  if (wait_seconds_ != nullptr) {
    job->enqueued = std::chrono::steady_clock::now();
  }
  queue_.push_back(job);
  const absl::Time now = absl::Now();
  if (!mu_.AwaitWithDeadline(
          absl::Condition(&Job::Started, job.get()),
          std::min(deadline, now + options_.lease_timeout))) {
    queue_.erase(std::find(queue_.begin(), queue_.end(), job));
    ++stats_.lease_timeouts;
    return absl::UnavailableError(
        absl::StrCat("no HSM session became free within ",
                     absl::FormatDuration(options_.lease_timeout), " (pool of ",
                     live_workers_, ", ", abandoned_,
                     " hung calls): the HSM is overloaded or not answering"));
  }
  if (mu_.AwaitWithDeadline(
          absl::Condition(&Job::Done, job.get()),
          std::min(deadline, absl::Now() + options_.call_timeout))) {
    return job->result;
  }
  // The call is stuck inside the HSM. Abandon its worker and replace it so
  // that other callers keep being served.
  job->worker->abandoned = true;
  --running_;
  --live_workers_;
  ++abandoned_;
  ++stats_.call_timeouts;
  if (abandoned_ <= options_.max_abandoned) AddWorkerLocked(nullptr);
  return absl::DeadlineExceededError(
      absl::StrCat("HSM call did not return within ",
                   absl::FormatDuration(options_.call_timeout)));
}

absl::StatusOr<Session> SessionPool::OpenSession() {
  CUSTOS_ASSIGN_OR_RETURN(Session session, Session::Open(fn_, slot_));
  CUSTOS_RETURN_IF_ERROR(session.Login(pin_));
  absl::MutexLock lock(&mu_);
  ++stats_.reopens;
  return session;
}

void SessionPool::CountEviction() {
  epoch_.fetch_add(1, std::memory_order_acq_rel);
  absl::MutexLock lock(&mu_);
  ++stats_.evictions;
}

void SessionPool::CountReset() {
  absl::MutexLock lock(&mu_);
  ++stats_.resets;
}

SessionPool::Stats SessionPool::stats() const {
  absl::MutexLock lock(&mu_);
  Stats s = stats_;
  s.workers = live_workers_;
  s.idle = live_workers_ - running_;
  s.abandoned = abandoned_;
  s.queued = static_cast<int>(queue_.size());
  return s;
}

}  // namespace custos::hsm
