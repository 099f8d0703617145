// RateLimiter: a token bucket per principal (docs/security.md, threat 11). Each
// principal's bucket holds up to `burst` requests and refills at
// `requests_per_second`; a request that finds its bucket empty is refused
// with RESOURCE_EXHAUSTED (the handlers audit the refusal). Buckets are kept
// for at most `max_principals` principals: when that many exist, the full
// (idle) ones are dropped first, which loses nothing, since a new bucket
// starts full. Thread-safe.
#ifndef CUSTOS_KMS_SERVER_RATE_LIMITER_H_
#define CUSTOS_KMS_SERVER_RATE_LIMITER_H_

#include <functional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace custos::server {

class RateLimiter {
 public:
  struct Options {
    double requests_per_second = 0;  // > 0
    double burst = 0;                // < 1: one second's worth (at least 1)
    size_t max_principals = 65536;
    // A clock that only moves forward; tests pass their own.
    std::function<absl::Duration()> monotonic_now;
  };

  explicit RateLimiter(Options options);

  // Takes one token from `principal`'s bucket: OK, or RESOURCE_EXHAUSTED
  // saying how to get more.
  absl::Status Admit(absl::string_view principal);

 private:
  struct Bucket {
    double tokens;
    absl::Duration updated;
  };

  const Options options_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, Bucket> buckets_ ABSL_GUARDED_BY(mu_);
};

}  // namespace custos::server

#endif  // CUSTOS_KMS_SERVER_RATE_LIMITER_H_
