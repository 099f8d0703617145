// Status propagation macros. Debian 12's abseil has none, and protobuf 3.21
// ships unprefixed ones of its own, so ours carry a CUSTOS_ prefix.
#ifndef CUSTOS_COMMON_STATUS_MACROS_H_
#define CUSTOS_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define CUSTOS_STATUS_CONCAT_INNER_(a, b) a##b
#define CUSTOS_STATUS_CONCAT_(a, b) CUSTOS_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define CUSTOS_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    ::absl::Status custos_status_ = (expr);          \
    if (!custos_status_.ok()) return custos_status_; \
  } while (0)

// Evaluates `rexpr` (an absl::StatusOr<T>); on error returns its status,
// otherwise moves the value into `lhs` (which may be a declaration).
#define CUSTOS_ASSIGN_OR_RETURN(lhs, rexpr) \
  CUSTOS_ASSIGN_OR_RETURN_IMPL_(            \
      CUSTOS_STATUS_CONCAT_(custos_statusor_, __LINE__), lhs, rexpr)

#define CUSTOS_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                  \
  if (!statusor.ok()) return std::move(statusor).status();  \
  lhs = std::move(statusor).value()

#endif  // CUSTOS_COMMON_STATUS_MACROS_H_
