#include "hsm/ck_status.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/testing/status_matchers.h"

namespace custos::hsm {
namespace {

using ::custos::testing::StatusIs;
using ::testing::HasSubstr;

struct Case {
  CK_RV rv;
  absl::StatusCode code;
  const char* name;
  bool session_broken;
};

class CkStatusTest : public ::testing::TestWithParam<Case> {};

TEST_P(CkStatusTest, MapsCodeNameAndRecoveryClass) {
  const Case& c = GetParam();
  absl::Status s = CkStatus(c.rv, "C_Encrypt");
  EXPECT_THAT(s,
              StatusIs(c.code, HasSubstr(std::string("C_Encrypt: ") + c.name)));
  EXPECT_EQ(CkRvOf(s), c.rv);
  EXPECT_EQ(IsSessionBroken(s), c.session_broken);
  EXPECT_EQ(IsSessionBroken(c.rv), c.session_broken);
}

INSTANTIATE_TEST_SUITE_P(
    Table, CkStatusTest,
    ::testing::Values(
        Case{CKR_DEVICE_ERROR, absl::StatusCode::kUnavailable,
             "CKR_DEVICE_ERROR", true},
        Case{CKR_SESSION_HANDLE_INVALID, absl::StatusCode::kUnavailable,
             "CKR_SESSION_HANDLE_INVALID", true},
        Case{CKR_SESSION_CLOSED, absl::StatusCode::kUnavailable,
             "CKR_SESSION_CLOSED", true},
        Case{CKR_USER_NOT_LOGGED_IN, absl::StatusCode::kUnavailable,
             "CKR_USER_NOT_LOGGED_IN", true},
        Case{CKR_TOKEN_NOT_PRESENT, absl::StatusCode::kUnavailable,
             "CKR_TOKEN_NOT_PRESENT", true},
        Case{CKR_DEVICE_REMOVED, absl::StatusCode::kUnavailable,
             "CKR_DEVICE_REMOVED", true},
        Case{CKR_ATTRIBUTE_SENSITIVE, absl::StatusCode::kPermissionDenied,
             "CKR_ATTRIBUTE_SENSITIVE", false},
        Case{CKR_KEY_UNEXTRACTABLE, absl::StatusCode::kPermissionDenied,
             "CKR_KEY_UNEXTRACTABLE", false},
        Case{CKR_PIN_INCORRECT, absl::StatusCode::kPermissionDenied,
             "CKR_PIN_INCORRECT", false},
        Case{CKR_ARGUMENTS_BAD, absl::StatusCode::kInvalidArgument,
             "CKR_ARGUMENTS_BAD", false},
        Case{CKR_OBJECT_HANDLE_INVALID, absl::StatusCode::kNotFound,
             "CKR_OBJECT_HANDLE_INVALID", false},
        Case{CKR_MECHANISM_INVALID, absl::StatusCode::kUnimplemented,
             "CKR_MECHANISM_INVALID", false},
        Case{CKR_GENERAL_ERROR, absl::StatusCode::kUnavailable,
             "CKR_GENERAL_ERROR", false}));

TEST(CkStatusTest, OkIsOk) { EXPECT_TRUE(CkStatus(CKR_OK, "C_Encrypt").ok()); }

TEST(CkStatusTest, UnknownVendorCodeIsInternalWithHexName) {
  absl::Status s = CkStatus(0x80000042UL, "C_Sign");
  EXPECT_THAT(
      s, StatusIs(absl::StatusCode::kInternal, HasSubstr("CKR_0x80000042")));
  EXPECT_EQ(CkRvOf(s), 0x80000042UL);
}

TEST(CkStatusTest, PlainStatusCarriesNoRv) {
  EXPECT_EQ(CkRvOf(absl::UnavailableError("x")), std::nullopt);
  EXPECT_FALSE(IsSessionBroken(absl::UnavailableError("x")));
}

TEST(CkStatusTest, StaleHandlesAreRecognised) {
  EXPECT_TRUE(IsStaleObjectHandle(CkStatus(CKR_KEY_HANDLE_INVALID, "f")));
  EXPECT_TRUE(IsStaleObjectHandle(CkStatus(CKR_OBJECT_HANDLE_INVALID, "f")));
  EXPECT_FALSE(IsStaleObjectHandle(CkStatus(CKR_DEVICE_ERROR, "f")));
}

TEST(CkStatusTest, CkStatusAsKeepsTheRvUnderAChosenCode) {
  absl::Status s =
      CkStatusAs(absl::StatusCode::kInvalidArgument,
                 "AES-GCM authentication failed", CKR_GENERAL_ERROR);
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument,
                          "AES-GCM authentication failed"));
  EXPECT_EQ(CkRvOf(s), CKR_GENERAL_ERROR);
}

}  // namespace
}  // namespace custos::hsm
