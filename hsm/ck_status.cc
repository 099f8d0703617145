#include "hsm/ck_status.h"

#include <cstdio>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace custos::hsm {
namespace {

constexpr char kCkRvPayloadUrl[] = "type.custos.dev/custos.hsm.CkRv";

struct RvInfo {
  CK_RV rv;
  const char* name;
  absl::StatusCode code;
};

// Return values Custos can meet, with the status code each maps to. Values are
// from PKCS#11 v2.40 section 11.1.
constexpr RvInfo kRvTable[] = {
    {CKR_OK, "CKR_OK", absl::StatusCode::kOk},
    {CKR_CANCEL, "CKR_CANCEL", absl::StatusCode::kCancelled},
    {CKR_HOST_MEMORY, "CKR_HOST_MEMORY", absl::StatusCode::kResourceExhausted},
    {CKR_SLOT_ID_INVALID, "CKR_SLOT_ID_INVALID", absl::StatusCode::kNotFound},
    // SoftHSM2 returns it now and then under load (the soak saw one
    // C_GenerateKey in 150,000 calls), and a retry succeeds: UNAVAILABLE
    // tells the client to retry. Not a broken session: SoftHSM also
    // answers it for a failed GCM tag, which Session::DecryptAesGcm turns
    // into INVALID_ARGUMENT on a session that stays usable.
    {CKR_GENERAL_ERROR, "CKR_GENERAL_ERROR", absl::StatusCode::kUnavailable},
    {CKR_FUNCTION_FAILED, "CKR_FUNCTION_FAILED", absl::StatusCode::kInternal},
    {CKR_ARGUMENTS_BAD, "CKR_ARGUMENTS_BAD",
     absl::StatusCode::kInvalidArgument},
    {CKR_ATTRIBUTE_READ_ONLY, "CKR_ATTRIBUTE_READ_ONLY",
     absl::StatusCode::kFailedPrecondition},
    {CKR_ATTRIBUTE_SENSITIVE, "CKR_ATTRIBUTE_SENSITIVE",
     absl::StatusCode::kPermissionDenied},
    {CKR_ATTRIBUTE_TYPE_INVALID, "CKR_ATTRIBUTE_TYPE_INVALID",
     absl::StatusCode::kInvalidArgument},
    {CKR_ATTRIBUTE_VALUE_INVALID, "CKR_ATTRIBUTE_VALUE_INVALID",
     absl::StatusCode::kInvalidArgument},
    {CKR_DATA_INVALID, "CKR_DATA_INVALID", absl::StatusCode::kInvalidArgument},
    {CKR_DATA_LEN_RANGE, "CKR_DATA_LEN_RANGE",
     absl::StatusCode::kInvalidArgument},
    {CKR_DEVICE_ERROR, "CKR_DEVICE_ERROR", absl::StatusCode::kUnavailable},
    {CKR_DEVICE_MEMORY, "CKR_DEVICE_MEMORY", absl::StatusCode::kUnavailable},
    {CKR_DEVICE_REMOVED, "CKR_DEVICE_REMOVED", absl::StatusCode::kUnavailable},
    {CKR_ENCRYPTED_DATA_INVALID, "CKR_ENCRYPTED_DATA_INVALID",
     absl::StatusCode::kInvalidArgument},
    {CKR_ENCRYPTED_DATA_LEN_RANGE, "CKR_ENCRYPTED_DATA_LEN_RANGE",
     absl::StatusCode::kInvalidArgument},
    {CKR_FUNCTION_CANCELED, "CKR_FUNCTION_CANCELED",
     absl::StatusCode::kCancelled},
    {CKR_FUNCTION_NOT_SUPPORTED, "CKR_FUNCTION_NOT_SUPPORTED",
     absl::StatusCode::kUnimplemented},
    {CKR_KEY_HANDLE_INVALID, "CKR_KEY_HANDLE_INVALID",
     absl::StatusCode::kNotFound},
    {CKR_KEY_SIZE_RANGE, "CKR_KEY_SIZE_RANGE",
     absl::StatusCode::kInvalidArgument},
    {CKR_KEY_TYPE_INCONSISTENT, "CKR_KEY_TYPE_INCONSISTENT",
     absl::StatusCode::kFailedPrecondition},
    {CKR_KEY_FUNCTION_NOT_PERMITTED, "CKR_KEY_FUNCTION_NOT_PERMITTED",
     absl::StatusCode::kPermissionDenied},
    {CKR_KEY_NOT_WRAPPABLE, "CKR_KEY_NOT_WRAPPABLE",
     absl::StatusCode::kPermissionDenied},
    {CKR_KEY_UNEXTRACTABLE, "CKR_KEY_UNEXTRACTABLE",
     absl::StatusCode::kPermissionDenied},
    {CKR_MECHANISM_INVALID, "CKR_MECHANISM_INVALID",
     absl::StatusCode::kUnimplemented},
    {CKR_MECHANISM_PARAM_INVALID, "CKR_MECHANISM_PARAM_INVALID",
     absl::StatusCode::kInvalidArgument},
    {CKR_OBJECT_HANDLE_INVALID, "CKR_OBJECT_HANDLE_INVALID",
     absl::StatusCode::kNotFound},
    {CKR_OPERATION_ACTIVE, "CKR_OPERATION_ACTIVE", absl::StatusCode::kInternal},
    {CKR_OPERATION_NOT_INITIALIZED, "CKR_OPERATION_NOT_INITIALIZED",
     absl::StatusCode::kInternal},
    {CKR_PIN_INCORRECT, "CKR_PIN_INCORRECT",
     absl::StatusCode::kPermissionDenied},
    {CKR_PIN_INVALID, "CKR_PIN_INVALID", absl::StatusCode::kInvalidArgument},
    {CKR_PIN_LEN_RANGE, "CKR_PIN_LEN_RANGE",
     absl::StatusCode::kInvalidArgument},
    {CKR_PIN_LOCKED, "CKR_PIN_LOCKED", absl::StatusCode::kPermissionDenied},
    {CKR_SESSION_CLOSED, "CKR_SESSION_CLOSED", absl::StatusCode::kUnavailable},
    {CKR_SESSION_COUNT, "CKR_SESSION_COUNT",
     absl::StatusCode::kResourceExhausted},
    {CKR_SESSION_HANDLE_INVALID, "CKR_SESSION_HANDLE_INVALID",
     absl::StatusCode::kUnavailable},
    {CKR_SESSION_READ_ONLY, "CKR_SESSION_READ_ONLY",
     absl::StatusCode::kFailedPrecondition},
    {CKR_TEMPLATE_INCOMPLETE, "CKR_TEMPLATE_INCOMPLETE",
     absl::StatusCode::kInvalidArgument},
    {CKR_TEMPLATE_INCONSISTENT, "CKR_TEMPLATE_INCONSISTENT",
     absl::StatusCode::kInvalidArgument},
    {CKR_TOKEN_NOT_PRESENT, "CKR_TOKEN_NOT_PRESENT",
     absl::StatusCode::kUnavailable},
    {CKR_TOKEN_NOT_RECOGNIZED, "CKR_TOKEN_NOT_RECOGNIZED",
     absl::StatusCode::kUnavailable},
    {CKR_USER_ALREADY_LOGGED_IN, "CKR_USER_ALREADY_LOGGED_IN",
     absl::StatusCode::kAlreadyExists},
    {CKR_USER_NOT_LOGGED_IN, "CKR_USER_NOT_LOGGED_IN",
     absl::StatusCode::kUnavailable},
    {CKR_USER_PIN_NOT_INITIALIZED, "CKR_USER_PIN_NOT_INITIALIZED",
     absl::StatusCode::kFailedPrecondition},
    {CKR_USER_TYPE_INVALID, "CKR_USER_TYPE_INVALID",
     absl::StatusCode::kInvalidArgument},
    {CKR_WRAPPING_KEY_HANDLE_INVALID, "CKR_WRAPPING_KEY_HANDLE_INVALID",
     absl::StatusCode::kNotFound},
    {CKR_RANDOM_NO_RNG, "CKR_RANDOM_NO_RNG", absl::StatusCode::kUnimplemented},
    {CKR_BUFFER_TOO_SMALL, "CKR_BUFFER_TOO_SMALL", absl::StatusCode::kInternal},
    {CKR_CRYPTOKI_NOT_INITIALIZED, "CKR_CRYPTOKI_NOT_INITIALIZED",
     absl::StatusCode::kFailedPrecondition},
    {CKR_CRYPTOKI_ALREADY_INITIALIZED, "CKR_CRYPTOKI_ALREADY_INITIALIZED",
     absl::StatusCode::kFailedPrecondition},
};

const RvInfo* Find(CK_RV rv) {
  for (const RvInfo& info : kRvTable) {
    if (info.rv == rv) return &info;
  }
  return nullptr;
}

}  // namespace

std::string CkRvName(CK_RV rv) {
  if (const RvInfo* info = Find(rv)) return info->name;
  return absl::StrFormat("CKR_0x%08X", rv);
}

absl::Status CkStatus(CK_RV rv, absl::string_view function) {
  if (rv == CKR_OK) return absl::OkStatus();
  const RvInfo* info = Find(rv);
  return CkStatusAs(
      info ? info->code : absl::StatusCode::kInternal,
      absl::StrFormat("%s: %s (0x%X)", function, CkRvName(rv), rv), rv);
}

absl::Status CkStatusAs(absl::StatusCode code, absl::string_view message,
                        CK_RV rv) {
  absl::Status status(code, message);
  status.SetPayload(kCkRvPayloadUrl, absl::Cord(absl::StrCat(rv)));
  return status;
}

std::optional<CK_RV> CkRvOf(const absl::Status& status) {
  auto payload = status.GetPayload(kCkRvPayloadUrl);
  if (!payload.has_value()) return std::nullopt;
  uint64_t rv = 0;
  if (!absl::SimpleAtoi(std::string(*payload), &rv)) return std::nullopt;
  return static_cast<CK_RV>(rv);
}

bool IsSessionBroken(CK_RV rv) {
  switch (rv) {
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_DEVICE_ERROR:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
      return true;
    default:
      return false;
  }
}

bool IsSessionBroken(const absl::Status& status) {
  std::optional<CK_RV> rv = CkRvOf(status);
  return rv.has_value() && IsSessionBroken(*rv);
}

bool IsStaleObjectHandle(const absl::Status& status) {
  std::optional<CK_RV> rv = CkRvOf(status);
  return rv.has_value() &&
         (*rv == CKR_OBJECT_HANDLE_INVALID || *rv == CKR_KEY_HANDLE_INVALID);
}

}  // namespace custos::hsm
