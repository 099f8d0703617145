// The one place that turns a PKCS#11 return value (CK_RV) into absl::Status.
// The original CK_RV travels inside the status as a payload, so callers (the
// session pool) can decide on recovery without parsing messages.
#ifndef CUSTOS_HSM_CK_STATUS_H_
#define CUSTOS_HSM_CK_STATUS_H_

#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "hsm/pkcs11.h"

namespace custos::hsm {

// The symbolic name of `rv` ("CKR_DEVICE_ERROR"), or "CKR_0x..." if unknown.
std::string CkRvName(CK_RV rv);

// OK for CKR_OK; otherwise a status whose code follows the kind of failure
// (device and session failures are UNAVAILABLE, bad arguments
// INVALID_ARGUMENT, and so on) and whose message is
// "<function>: <CKR name> (0x..)". Never includes key material.
absl::Status CkStatus(CK_RV rv, absl::string_view function);

// A status with a chosen code and message that still carries `rv`, for
// callers that must word a failure themselves (an authentication failure
// must not read like a device fault).
absl::Status CkStatusAs(absl::StatusCode code, absl::string_view message,
                        CK_RV rv);

// The CK_RV carried by a status made by CkStatus, if any.
std::optional<CK_RV> CkRvOf(const absl::Status& status);

// True for failures after which the session can no longer be used and must be
// closed and replaced (PKCS#11 v2.40 section 5.1 and 11.1): handle invalid or
// closed, logged out, device removed or failed.
bool IsSessionBroken(CK_RV rv);
bool IsSessionBroken(const absl::Status& status);

// True for a stale object handle: find the object again by CKA_ID.
bool IsStaleObjectHandle(const absl::Status& status);

}  // namespace custos::hsm

#endif  // CUSTOS_HSM_CK_STATUS_H_
