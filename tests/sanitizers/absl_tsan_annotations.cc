// ThreadSanitizer annotations for Debian's abseil, linked into every test
// executable of a -DCUSTOS_SANITIZE=thread build (tests/CMakeLists.txt).
//
// Why: Debian 12's libabsl_synchronization.so is not built with TSan, so
// TSan sees none of absl::Mutex's locking (its fast path is an atomic
// compare-and-swap inside the library, its slow path a futex) and reports
// every member guarded by an absl::Mutex as a data race. Abseil built with
// TSan annotates itself (absl/synchronization/mutex.cc,
// ABSL_TSAN_MUTEX_PRE_LOCK and friends); this file adds the same
// annotations from outside. It defines the public entry points of
// absl::Mutex, absl::CondVar and absl::Notification in the executable, which
// interposes them on the shared library's (the library's own calls go
// through its PLT too); each one tells TSan what it does with
// __tsan_mutex_* and calls the library's definition, found with
// dlsym(RTLD_NEXT). TSan then treats an absl::Mutex like a pthread mutex:
// lock-order (deadlock) reports included. absl::Status's reference count,
// decremented inside libabsl_status.so, is the other blind spot; it is
// redefined here (Status::UnrefNonInlined, at the end).
//
// Conditions (Await, LockWhen) are evaluated inside the library's lock and
// unlock paths, where these annotations make TSan ignore memory accesses,
// as abseil's own annotations do for all but the waiter's final check.
//
// Thread-safe: the only state is each function's resolved pointer (a
// function-local static) and a per-thread nesting depth, so that a call the
// library makes to itself from inside an annotated call (e.g.
// Notification::Notify locking its own mutex) passes through unannotated.
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/base/options.h"
#include "absl/status/internal/status_internal.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

namespace {

#define CUSTOS_STR2(x) #x
#define CUSTOS_STR(x) CUSTOS_STR2(x)

// The library's definition of `absl::<inline namespace>::<suffix>`, given as
// the rest of its Itanium-mangled name; `prefix` is "_ZN" ("_ZNK" for const
// member functions).
void* Real(const char* prefix, const char* suffix) {
  const char* ns = CUSTOS_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  const std::string name = std::string(prefix) + "4absl" +
                           std::to_string(std::strlen(ns)) + ns + suffix;
  void* f = dlsym(RTLD_NEXT, name.c_str());
  if (f == nullptr) {
    std::fprintf(stderr,
                 "absl_tsan_annotations: %s not found in abseil (%s); update "
                 "tests/sanitizers/absl_tsan_annotations.cc\n",
                 name.c_str(), dlerror());
    std::abort();
  }
  return f;
}

#define CUSTOS_REAL(type, prefix, suffix) \
  static const auto real = reinterpret_cast<type>(Real(prefix, suffix))

thread_local int depth = 0;

// Marks the current thread as inside an annotated call; nested calls into
// the library pass straight through.
class Scope {
 public:
  Scope() : outer_(depth++ == 0) {}
  ~Scope() { --depth; }
  bool outer() const { return outer_; }

 private:
  const bool outer_;
};

// absl::Mutex's word: its writer bit says whether the caller of Await or
// CondVar::Wait holds the lock exclusively or shared (absl/synchronization/
// mutex.cc, kMuWriter).
constexpr intptr_t kMuWriter = 0x0008;
unsigned HeldFlags(const absl::Mutex* mu) {
  static_assert(sizeof(absl::Mutex) == sizeof(intptr_t));
  const intptr_t word =
      reinterpret_cast<const std::atomic<intptr_t>*>(mu)->load(
          std::memory_order_relaxed);
  return (word & kMuWriter) != 0 ? 0 : __tsan_mutex_read_lock;
}

// What a wait that releases and reacquires `mu` looks like to TSan.
template <typename F>
auto AsUnlockThenLock(absl::Mutex* mu, F wait) {
  const unsigned flags = HeldFlags(mu);
  __tsan_mutex_pre_unlock(mu, flags);
  __tsan_mutex_post_unlock(mu, flags);
  __tsan_mutex_pre_lock(mu, flags);
  auto result = wait();
  __tsan_mutex_post_lock(mu, flags, 0);
  return result;
}

// The address Notify releases and the waits acquire: the notified flag,
// which the inline HasBeenNotified() reads with an (instrumented) acquire
// load, so that it synchronises too.
void* NotifiedFlag(const absl::Notification* n) {
  static_assert(sizeof(absl::Notification) == 2 * sizeof(absl::Mutex));
  return const_cast<char*>(reinterpret_cast<const char*>(n) +
                           sizeof(absl::Mutex));
}

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

Mutex::~Mutex() {
  CUSTOS_REAL(void (*)(Mutex*), "_ZN", "5MutexD2Ev");
  if (depth == 0) __tsan_mutex_destroy(this, 0);
  real(this);
}

void Mutex::Lock() {
  CUSTOS_REAL(void (*)(Mutex*), "_ZN", "5Mutex4LockEv");
  Scope scope;
  if (!scope.outer()) return real(this);
  __tsan_mutex_pre_lock(this, 0);
  real(this);
  __tsan_mutex_post_lock(this, 0, 0);
}

void Mutex::ReaderLock() {
  CUSTOS_REAL(void (*)(Mutex*), "_ZN", "5Mutex10ReaderLockEv");
  Scope scope;
  if (!scope.outer()) return real(this);
  __tsan_mutex_pre_lock(this, __tsan_mutex_read_lock);
  real(this);
  __tsan_mutex_post_lock(this, __tsan_mutex_read_lock, 0);
}

bool Mutex::TryLock() {
  CUSTOS_REAL(bool (*)(Mutex*), "_ZN", "5Mutex7TryLockEv");
  Scope scope;
  if (!scope.outer()) return real(this);
  __tsan_mutex_pre_lock(this, __tsan_mutex_try_lock);
  const bool locked = real(this);
  __tsan_mutex_post_lock(
      this, __tsan_mutex_try_lock | (locked ? 0 : __tsan_mutex_try_lock_failed),
      0);
  return locked;
}

bool Mutex::ReaderTryLock() {
  CUSTOS_REAL(bool (*)(Mutex*), "_ZN", "5Mutex13ReaderTryLockEv");
  Scope scope;
  if (!scope.outer()) return real(this);
  __tsan_mutex_pre_lock(this, __tsan_mutex_try_read_lock);
  const bool locked = real(this);
  __tsan_mutex_post_lock(
      this,
      locked ? __tsan_mutex_try_read_lock : __tsan_mutex_try_read_lock_failed,
      0);
  return locked;
}

void Mutex::Unlock() {
  CUSTOS_REAL(void (*)(Mutex*), "_ZN", "5Mutex6UnlockEv");
  Scope scope;
  if (!scope.outer()) return real(this);
  __tsan_mutex_pre_unlock(this, 0);
  real(this);
  __tsan_mutex_post_unlock(this, 0);
}

void Mutex::ReaderUnlock() {
  CUSTOS_REAL(void (*)(Mutex*), "_ZN", "5Mutex12ReaderUnlockEv");
  Scope scope;
  if (!scope.outer()) return real(this);
  __tsan_mutex_pre_unlock(this, __tsan_mutex_read_lock);
  real(this);
  __tsan_mutex_post_unlock(this, __tsan_mutex_read_lock);
}

// LockWhen and friends: a lock (the condition is evaluated inside it).
void Mutex::LockWhen(const Condition& cond) {
  CUSTOS_REAL(void (*)(Mutex*, const Condition&), "_ZN",
              "5Mutex8LockWhenERKNS0_9ConditionE");
  Scope scope;
  if (!scope.outer()) return real(this, cond);
  __tsan_mutex_pre_lock(this, 0);
  real(this, cond);
  __tsan_mutex_post_lock(this, 0, 0);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  CUSTOS_REAL(void (*)(Mutex*, const Condition&), "_ZN",
              "5Mutex14ReaderLockWhenERKNS0_9ConditionE");
  Scope scope;
  if (!scope.outer()) return real(this, cond);
  __tsan_mutex_pre_lock(this, __tsan_mutex_read_lock);
  real(this, cond);
  __tsan_mutex_post_lock(this, __tsan_mutex_read_lock, 0);
}

// The timed forms hold the lock on return whatever they return.
template <typename Arg>
bool TimedLockWhen(Mutex* mu, const Condition& cond, Arg arg, unsigned flags,
                   bool (*real)(Mutex*, const Condition&, Arg)) {
  Scope scope;
  if (!scope.outer()) return real(mu, cond, arg);
  __tsan_mutex_pre_lock(mu, flags);
  const bool result = real(mu, cond, arg);
  __tsan_mutex_post_lock(mu, flags, 0);
  return result;
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, Duration timeout) {
  CUSTOS_REAL(bool (*)(Mutex*, const Condition&, Duration), "_ZN",
              "5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  return TimedLockWhen(this, cond, timeout, 0, real);
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, Time deadline) {
  CUSTOS_REAL(bool (*)(Mutex*, const Condition&, Time), "_ZN",
              "5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  return TimedLockWhen(this, cond, deadline, 0, real);
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, Duration timeout) {
  CUSTOS_REAL(
      bool (*)(Mutex*, const Condition&, Duration), "_ZN",
      "5Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  return TimedLockWhen(this, cond, timeout, __tsan_mutex_read_lock, real);
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, Time deadline) {
  CUSTOS_REAL(bool (*)(Mutex*, const Condition&, Time), "_ZN",
              "5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  return TimedLockWhen(this, cond, deadline, __tsan_mutex_read_lock, real);
}

// Await and CondVar::Wait release the lock while they wait: an unlock then
// a lock.
void Mutex::Await(const Condition& cond) {
  CUSTOS_REAL(void (*)(Mutex*, const Condition&), "_ZN",
              "5Mutex5AwaitERKNS0_9ConditionE");
  Scope scope;
  if (!scope.outer()) return real(this, cond);
  AsUnlockThenLock(this, [&] {
    real(this, cond);
    return true;
  });
}

bool Mutex::AwaitWithTimeout(const Condition& cond, Duration timeout) {
  CUSTOS_REAL(bool (*)(Mutex*, const Condition&, Duration), "_ZN",
              "5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Scope scope;
  if (!scope.outer()) return real(this, cond, timeout);
  return AsUnlockThenLock(this, [&] { return real(this, cond, timeout); });
}

bool Mutex::AwaitWithDeadline(const Condition& cond, Time deadline) {
  CUSTOS_REAL(bool (*)(Mutex*, const Condition&, Time), "_ZN",
              "5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Scope scope;
  if (!scope.outer()) return real(this, cond, deadline);
  return AsUnlockThenLock(this, [&] { return real(this, cond, deadline); });
}

void CondVar::Wait(Mutex* mu) {
  CUSTOS_REAL(void (*)(CondVar*, Mutex*), "_ZN", "7CondVar4WaitEPNS0_5MutexE");
  Scope scope;
  if (!scope.outer()) return real(this, mu);
  AsUnlockThenLock(mu, [&] {
    real(this, mu);
    return true;
  });
}

bool CondVar::WaitWithTimeout(Mutex* mu, Duration timeout) {
  CUSTOS_REAL(bool (*)(CondVar*, Mutex*, Duration), "_ZN",
              "7CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  Scope scope;
  if (!scope.outer()) return real(this, mu, timeout);
  return AsUnlockThenLock(mu, [&] { return real(this, mu, timeout); });
}

bool CondVar::WaitWithDeadline(Mutex* mu, Time deadline) {
  CUSTOS_REAL(bool (*)(CondVar*, Mutex*, Time), "_ZN",
              "7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  Scope scope;
  if (!scope.outer()) return real(this, mu, deadline);
  return AsUnlockThenLock(mu, [&] { return real(this, mu, deadline); });
}

// Notification: Notify releases, a wait that saw the notification
// acquires. (Its own mutex is locked inside these calls, unannotated.)
void Notification::Notify() {
  CUSTOS_REAL(void (*)(Notification*), "_ZN", "12Notification6NotifyEv");
  Scope scope;
  if (scope.outer()) __tsan_release(NotifiedFlag(this));
  real(this);
}

void Notification::WaitForNotification() const {
  CUSTOS_REAL(void (*)(const Notification*), "_ZNK",
              "12Notification19WaitForNotificationEv");
  Scope scope;
  real(this);
  if (scope.outer()) __tsan_acquire(NotifiedFlag(this));
}

bool Notification::WaitForNotificationWithTimeout(Duration timeout) const {
  CUSTOS_REAL(bool (*)(const Notification*, Duration), "_ZNK",
              "12Notification30WaitForNotificationWithTimeoutENS0_8DurationE");
  Scope scope;
  const bool notified = real(this, timeout);
  if (notified && scope.outer()) __tsan_acquire(NotifiedFlag(this));
  return notified;
}

bool Notification::WaitForNotificationWithDeadline(Time deadline) const {
  CUSTOS_REAL(bool (*)(const Notification*, Time), "_ZNK",
              "12Notification31WaitForNotificationWithDeadlineENS0_4TimeE");
  Scope scope;
  const bool notified = real(this, deadline);
  if (notified && scope.outer()) __tsan_acquire(NotifiedFlag(this));
  return notified;
}

// absl::Status: copies share one heap representation, counted with an
// atomic that libabsl_status.so decrements out of TSan's sight, so TSan
// takes the delete by the last copy's owner for a race with other threads'
// earlier reads of the message or payloads (e.g. a status handed from a
// SessionPool worker to its caller). These are abseil's own lines
// (absl/status/status.cc), compiled here with TSan so that the decrement
// orders those reads before the delete. (Increments are inline: already
// compiled with TSan.)
void Status::UnrefNonInlined(uintptr_t rep) {
  status_internal::StatusRep* r = RepToPointer(rep);
  // Fast path: the only reference, which no other thread can be touching.
  if (r->ref.load(std::memory_order_acquire) == 1 ||
      r->ref.fetch_sub(1, std::memory_order_acq_rel) - 1 == 0) {
    delete r;
  }
}

ABSL_NAMESPACE_END
}  // namespace absl
