// SteadyNotification: a one-shot "stop" signal whose timed wait runs on the
// monotonic clock. abseil's timed waits (absl::Notification,
// Mutex::AwaitWithTimeout) in Debian 12's abseil turn the timeout into an
// absolute wall-clock deadline, so a wall clock stepped back stretches the
// wait by the size of the step; periodic work (maintenance passes) must not
// stall because an operator or NTP moved the clock. Thread-safe.
#ifndef CUSTOS_COMMON_STEADY_NOTIFICATION_H_
#define CUSTOS_COMMON_STEADY_NOTIFICATION_H_

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "absl/time/time.h"

namespace custos {

class SteadyNotification {
 public:
  void Notify() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      notified_ = true;
    }
    cv_.notify_all();
  }

  // Waits up to `timeout` of steady time; true once notified.
  bool WaitForNotificationWithTimeout(absl::Duration timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                        [this] { return notified_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;  // wait_for uses std::chrono::steady_clock
  bool notified_ = false;
};

}  // namespace custos

#endif  // CUSTOS_COMMON_STEADY_NOTIFICATION_H_
