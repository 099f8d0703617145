#include "hsm/session_pool.h"

#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/status_macros.h"
#include "hsm/ck_status.h"

namespace custos::hsm {

struct SessionPool::Job {
  std::shared_ptr<Op> op;
  absl::Status result;
  absl::Notification done;
};

// One session and the thread that alone uses it. Jobs are handed over one at
// a time; a worker whose caller gave up waiting (abandoned) closes its
// session and ends once its call returns.
class SessionPool::Worker {
 public:
  Worker(SessionPool* pool, std::unique_ptr<Session> session)
      : pool_(pool), session_(std::move(session)) {
    thread_ = std::thread([this] { Loop(); });
  }
  ~Worker() {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
    }
    thread_.join();
  }

  void Post(std::shared_ptr<Job> job) {
    absl::MutexLock lock(&mu_);
    job_ = std::move(job);
  }

  // Marks this worker abandoned unless `job` has already finished. The check
  // and the job's completion happen under the same lock, so exactly one side
  // owns what follows.
  bool AbandonIfBusy(const Job& job) {
    absl::MutexLock lock(&mu_);
    if (job.done.HasBeenNotified()) return false;
    abandoned_ = true;
    return true;
  }

 private:
  bool HasWorkOrStop() const ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    return job_ != nullptr || stop_;
  }

  void Loop() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        absl::MutexLock lock(&mu_);
        mu_.Await(absl::Condition(this, &Worker::HasWorkOrStop));
        if (job_ == nullptr) return;  // stopping
        job = std::move(job_);
      }
      Execute(*job);
      bool abandoned;
      {
        absl::MutexLock lock(&mu_);
        abandoned = abandoned_;
        job->done.Notify();
      }
      if (abandoned) {
        session_.reset();
        pool_->OnAbandonedWorkerDone(this);
        return;
      }
    }
  }

  void Execute(Job& job) {
    if (session_ == nullptr) {
      absl::StatusOr<Session> session = pool_->OpenSession();
      if (!session.ok()) {
        job.result = session.status();
        return;
      }
      session_ = std::make_unique<Session>(*std::move(session));
    }
    job.result = (*job.op)(*session_);
    if (IsSessionBroken(job.result)) {
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
  absl::Mutex mu_;
  std::shared_ptr<Job> job_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool abandoned_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

SessionPool::SessionPool(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot,
                         SecretBytes pin, Options options)
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
  absl::MutexLock lock(&pool->mu_);
  for (auto& session : sessions) pool->AddWorkerLocked(std::move(session));
  return pool;
}

SessionPool::~SessionPool() {
  std::list<std::unique_ptr<Worker>> workers;
  {
    absl::MutexLock lock(&mu_);
    workers.swap(workers_);
    idle_.clear();
    finished_.clear();
  }
  workers.clear();  // joins each worker, waiting for calls still running
}

void SessionPool::AddWorkerLocked(std::unique_ptr<Session> session) {
  workers_.push_back(std::make_unique<Worker>(this, std::move(session)));
  idle_.push_back(workers_.back().get());
  ++live_workers_;
}

void SessionPool::ReapLocked() {
  for (Worker* done : finished_) {
    workers_.remove_if(
        [done](const std::unique_ptr<Worker>& w) { return w.get() == done; });
  }
  finished_.clear();
}

absl::StatusOr<SessionPool::Worker*> SessionPool::Acquire() {
  absl::MutexLock lock(&mu_);
  ReapLocked();
  ++stats_.leases;
  if (idle_.empty()) {
    ++stats_.waits;
    auto has_idle = [](std::vector<Worker*>* idle) { return !idle->empty(); };
    if (!mu_.AwaitWithTimeout(
            absl::Condition(+has_idle, &idle_), options_.lease_timeout)) {
      ++stats_.lease_timeouts;
      return absl::UnavailableError(absl::StrCat(
          "no HSM session became free within ",
          absl::FormatDuration(options_.lease_timeout), " (pool of ",
          live_workers_, ", ", abandoned_,
          " hung calls): the HSM is overloaded or not answering"));
    }
  }
  Worker* worker = idle_.back();
  idle_.pop_back();
  return worker;
}

void SessionPool::Release(Worker* worker) {
  absl::MutexLock lock(&mu_);
  idle_.push_back(worker);
}

absl::Status SessionPool::Run(Op op) {
  auto shared = std::make_shared<Op>(std::move(op));
  absl::Status status;
  for (int attempt = 0; attempt <= options_.size; ++attempt) {
    if (attempt > 0) {
      absl::MutexLock lock(&mu_);
      ++stats_.retries;
    }
    status = RunOnce(shared);
    if (!IsSessionBroken(status)) return status;
  }
  return status;
}

absl::Status SessionPool::RunOnce(std::shared_ptr<Op> op) {
  CUSTOS_ASSIGN_OR_RETURN(Worker * worker, Acquire());
  auto job = std::make_shared<Job>();
  job->op = std::move(op);
  worker->Post(job);
  if (job->done.WaitForNotificationWithTimeout(options_.call_timeout) ||
      !worker->AbandonIfBusy(*job)) {
    absl::Status result = job->result;
    Release(worker);
    return result;
  }
  absl::MutexLock lock(&mu_);
  ++stats_.call_timeouts;
  --live_workers_;
  ++abandoned_;
  // Replace the hung session so that callers keep being served.
  if (abandoned_ <= options_.max_abandoned) AddWorkerLocked(nullptr);
  return absl::DeadlineExceededError(
      absl::StrCat("HSM call did not return within ",
                   absl::FormatDuration(options_.call_timeout)));
}

void SessionPool::OnAbandonedWorkerDone(Worker* worker) {
  absl::MutexLock lock(&mu_);
  --abandoned_;
  finished_.push_back(worker);
  if (live_workers_ < options_.size && !workers_.empty()) {
    AddWorkerLocked(nullptr);
  }
}

absl::StatusOr<Session> SessionPool::OpenSession() {
  CUSTOS_ASSIGN_OR_RETURN(Session session, Session::Open(fn_, slot_));
  CUSTOS_RETURN_IF_ERROR(session.Login(pin_));
  absl::MutexLock lock(&mu_);
  ++stats_.reopens;
  return session;
}

void SessionPool::CountEviction() {
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
  s.idle = static_cast<int>(idle_.size());
  s.abandoned = abandoned_;
  return s;
}

}  // namespace custos::hsm
