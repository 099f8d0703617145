// GoogleTest matchers for absl::Status and absl::StatusOr, which Debian 12's
// abseil does not ship: IsOk(), StatusIs(code[, message_matcher]) and
// IsOkAndHolds(matcher).
#ifndef CUSTOS_COMMON_TESTING_STATUS_MATCHERS_H_
#define CUSTOS_COMMON_TESTING_STATUS_MATCHERS_H_

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <ostream>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace custos::testing {
namespace internal {

inline const absl::Status& GetStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

}  // namespace internal

MATCHER(IsOk, "is OK") {
  const absl::Status& s = internal::GetStatus(arg);
  if (!s.ok()) *result_listener << "status is " << s;
  return s.ok();
}

MATCHER_P2(StatusIs, code, message_matcher,
           std::string("has code ") +
               std::string(absl::StatusCodeToString(code))) {
  const absl::Status& s = internal::GetStatus(arg);
  *result_listener << "status is " << s;
  return s.code() == code &&
         ::testing::Matches(message_matcher)(std::string(s.message()));
}

template <typename Code>
auto StatusIs(Code code) {
  return StatusIs(code, ::testing::_);
}

MATCHER_P(IsOkAndHolds, value_matcher, "is OK and holds a matching value") {
  if (!arg.ok()) {
    *result_listener << "status is " << arg.status();
    return false;
  }
  return ::testing::ExplainMatchResult(value_matcher, *arg, result_listener);
}

}  // namespace custos::testing

// Assertion helpers that print the status on failure.
#define CUSTOS_ASSERT_OK(expr) ASSERT_THAT((expr), ::custos::testing::IsOk())
#define CUSTOS_EXPECT_OK(expr) EXPECT_THAT((expr), ::custos::testing::IsOk())

// Asserts that `rexpr` (a StatusOr) is OK and moves its value into `lhs`.
#define CUSTOS_ASSERT_OK_AND_ASSIGN(lhs, rexpr) \
  CUSTOS_ASSERT_OK_AND_ASSIGN_IMPL_(            \
      CUSTOS_TEST_CONCAT_(custos_test_statusor_, __LINE__), lhs, rexpr)
#define CUSTOS_TEST_CONCAT_INNER_(a, b) a##b
#define CUSTOS_TEST_CONCAT_(a, b) CUSTOS_TEST_CONCAT_INNER_(a, b)
#define CUSTOS_ASSERT_OK_AND_ASSIGN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                      \
  ASSERT_THAT(statusor.status(), ::custos::testing::IsOk());    \
  lhs = std::move(statusor).value()

#endif  // CUSTOS_COMMON_TESTING_STATUS_MATCHERS_H_
