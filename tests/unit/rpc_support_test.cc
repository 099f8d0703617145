// ForCaller and ToGrpc: what a caller sees of a failure. File paths and
// database or HSM errors stay in the server's log; the code and the part
// that failed reach the caller.
#include "kms/server/rpc_support.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

#include "absl/status/status.h"
#include "common/testing/status_matchers.h"

namespace custos::server {
namespace {

using ::custos::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

TEST(ForCallerTest, ServerSideFailuresAreGeneric) {
  struct Case {
    absl::Status status;
    const char* part;    // what the caller is told failed
    const char* hidden;  // what must not reach the caller
  };
  const Case cases[] = {
      {absl::UnavailableError(
           "request refused because the audit log cannot record it: audit "
           "log unavailable: write /var/lib/custos/audit/audit-n-1.jsonl: No "
           "space left on device"),
       "audit log", "/var/lib/custos"},
      {absl::UnavailableError("database UpdateKey: database is locked"),
       "key database", "is locked"},
      {absl::UnavailableError(
           "storage: lost the connection to postgresql://custos:***@db/x: "
           "server closed the connection"),
       "key database", "db/x"},
      {absl::InternalError("database LoadKey: no such column: secret_col"),
       "key database", "secret_col"},
      {absl::UnavailableError("C_Encrypt: CKR_DEVICE_ERROR (0x30)"), "HSM",
       "CKR_DEVICE_ERROR"},
      {absl::InternalError("key material of k-abc version 2 is missing"),
       "failed", "k-abc"},
      {absl::DataLossError("audit: the last record of /a/b is not valid"),
       "audit log", "/a/b"},
  };
  for (const Case& c : cases) {
    const absl::Status shown = ForCaller(c.status);
    EXPECT_THAT(shown,
                StatusIs(c.status.code(),
                         AllOf(HasSubstr(c.part), Not(HasSubstr(c.hidden)))))
        << c.status;
    const grpc::Status wire = ToGrpc(c.status);
    EXPECT_EQ(static_cast<int>(wire.error_code()),
              static_cast<int>(c.status.code()));
    EXPECT_THAT(wire.error_message(), Not(HasSubstr(c.hidden)));
  }
  EXPECT_THAT(ForCaller(absl::UnavailableError("x")),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("retry")));
}

TEST(ForCallerTest, RequestErrorsKeepTheirWords) {
  for (const absl::Status& s :
       {absl::InvalidArgumentError("encryption_context: 65 pairs; at most 64"),
        absl::PermissionDeniedError("caller cn:x may not ENCRYPT"),
        absl::FailedPreconditionError("key k-1 is DISABLED"),
        absl::ResourceExhaustedError("rate limit: slow down"),
        absl::UnauthenticatedError("client certificate lacks clientAuth")}) {
    EXPECT_EQ(ForCaller(s), s);
    EXPECT_EQ(ToGrpc(s).error_message(), std::string(s.message()));
  }
}

}  // namespace
}  // namespace custos::server
