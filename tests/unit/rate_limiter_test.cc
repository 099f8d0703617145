// RateLimiter: a token bucket per principal, on a clock the test moves by
// hand (no test here depends on how fast the machine is).
#include "kms/server/rate_limiter.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/testing/status_matchers.h"

namespace custos::server {
namespace {

using ::custos::testing::IsOk;
using ::custos::testing::StatusIs;
using ::testing::HasSubstr;

class RateLimiterTest : public ::testing::Test {
 protected:
  RateLimiter::Options Options(double rate, double burst) {
    RateLimiter::Options options;
    options.requests_per_second = rate;
    options.burst = burst;
    options.monotonic_now = [this] { return now_; };
    return options;
  }
  absl::Duration now_ = absl::Seconds(1000);
};

TEST_F(RateLimiterTest, BurstThenRefusedThenRefilled) {
  RateLimiter limiter(Options(2, 3));
  for (int i = 0; i < 3; ++i) EXPECT_THAT(limiter.Admit("cn:a"), IsOk()) << i;
  EXPECT_THAT(limiter.Admit("cn:a"),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       HasSubstr("requests_per_second_per_principal")));
  now_ += absl::Milliseconds(499);  // 0.998 tokens: not yet
  EXPECT_THAT(limiter.Admit("cn:a"),
              StatusIs(absl::StatusCode::kResourceExhausted));
  now_ += absl::Milliseconds(2);
  EXPECT_THAT(limiter.Admit("cn:a"), IsOk());
  // Refill stops at the burst.
  now_ += absl::Hours(1);
  for (int i = 0; i < 3; ++i) EXPECT_THAT(limiter.Admit("cn:a"), IsOk()) << i;
  EXPECT_FALSE(limiter.Admit("cn:a").ok());
}

TEST_F(RateLimiterTest, EachPrincipalHasItsOwnBucket) {
  RateLimiter limiter(Options(1, 1));
  EXPECT_THAT(limiter.Admit("spiffe://example.org/a"), IsOk());
  EXPECT_FALSE(limiter.Admit("spiffe://example.org/a").ok());
  EXPECT_THAT(limiter.Admit("spiffe://example.org/b"), IsOk());
}

TEST_F(RateLimiterTest, DefaultBurstIsOneSecondsWorth) {
  RateLimiter limiter(Options(5, 0));
  for (int i = 0; i < 5; ++i) EXPECT_THAT(limiter.Admit("cn:a"), IsOk()) << i;
  EXPECT_FALSE(limiter.Admit("cn:a").ok());
  RateLimiter slow(Options(0.1, 0));
  EXPECT_THAT(slow.Admit("cn:a"), IsOk());  // at least one
  EXPECT_FALSE(slow.Admit("cn:a").ok());
}

// Many principals cannot grow the table without bound, and a principal that
// spent its bucket keeps it empty while others come and go.
TEST_F(RateLimiterTest, TableIsBounded) {
  RateLimiter::Options options = Options(1, 1);
  options.max_principals = 10;
  RateLimiter limiter(options);
  EXPECT_THAT(limiter.Admit("cn:busy"), IsOk());
  for (int i = 0; i < 5; ++i) {
    EXPECT_THAT(limiter.Admit(absl::StrCat("cn:other-", i)), IsOk());
  }
  EXPECT_FALSE(limiter.Admit("cn:busy").ok());
  for (int i = 0; i < 1000; ++i) {
    limiter.Admit(absl::StrCat("cn:flood-", i)).IgnoreError();
  }
  // The table was cleared at some point (no bucket had refilled): a fresh
  // bucket, never a wrong refusal of another principal.
  EXPECT_THAT(limiter.Admit("cn:newcomer"), IsOk());
}

}  // namespace
}  // namespace custos::server
