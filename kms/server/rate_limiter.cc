#include "kms/server/rate_limiter.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace custos::server {
namespace {

RateLimiter::Options WithDefaults(RateLimiter::Options options) {
  if (options.burst < 1) {
    options.burst = std::max(1.0, options.requests_per_second);
  }
  if (!options.monotonic_now) {
    options.monotonic_now = [] {
      return absl::FromChrono(
          std::chrono::steady_clock::now().time_since_epoch());
    };
  }
  return options;
}

}  // namespace

RateLimiter::RateLimiter(Options options)
    : options_(WithDefaults(std::move(options))) {}

absl::Status RateLimiter::Admit(absl::string_view principal) {
  const absl::Duration now = options_.monotonic_now();
  absl::MutexLock lock(&mu_);
  auto it = buckets_.find(principal);
  if (it == buckets_.end()) {
    if (buckets_.size() >= options_.max_principals) {
      // Drop the buckets that have refilled (they would start full anyway);
      // if none has, start everyone over rather than grow without bound.
      absl::erase_if(buckets_, [&](const auto& entry) {
        const Bucket& b = entry.second;
        return b.tokens + absl::ToDoubleSeconds(now - b.updated) *
                              options_.requests_per_second >=
               options_.burst;
      });
      if (buckets_.size() >= options_.max_principals) buckets_.clear();
    }
    it = buckets_.emplace(std::string(principal), Bucket{options_.burst, now})
             .first;
  }
  Bucket& bucket = it->second;
  bucket.tokens =
      std::min(options_.burst,
               bucket.tokens +
                   std::max(0.0, absl::ToDoubleSeconds(now - bucket.updated)) *
                       options_.requests_per_second);
  bucket.updated = now;
  if (bucket.tokens >= 1) {
    bucket.tokens -= 1;
    return absl::OkStatus();
  }
  return absl::ResourceExhaustedError(absl::StrFormat(
      "rate limit: this principal may make %g requests per second (bursts "
      "of %g); slow down and retry (limits.requests_per_second_per_principal "
      "in the server config)",
      options_.requests_per_second, options_.burst));
}

}  // namespace custos::server
