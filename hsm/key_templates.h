// The attribute templates Custos generates keys with, and the checks it makes
// before using any key (docs/security.md, threat 6). The checks never trust the
// template alone: SoftHSM does not enforce every attribute, so what the token
// reports is read back and compared.
#ifndef CUSTOS_HSM_KEY_TEMPLATES_H_
#define CUSTOS_HSM_KEY_TEMPLATES_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "hsm/attribute_template.h"
#include "hsm/pkcs11.h"
#include "hsm/session.h"

namespace custos::hsm {

inline constexpr size_t kAesKeySize = 32;    // AES-256
inline constexpr size_t kObjectIdSize = 16;  // random CKA_ID

// AES-256 customer master key version: a token object that can only encrypt
// and decrypt inside the HSM. SENSITIVE, never EXTRACTABLE, no WRAP/UNWRAP/
// DERIVE/SIGN, not MODIFIABLE or COPYABLE.
AttributeTemplate CmkTemplate(absl::string_view id, absl::string_view label);

// Generates a CMK version with CmkTemplate and verifies it; on a failed check
// the new object is destroyed and the check's error returned.
absl::StatusOr<CK_OBJECT_HANDLE> GenerateCmk(Session& session,
                                             absl::string_view id,
                                             absl::string_view label);

// FAILED_PRECONDITION naming the first attribute that differs unless the
// object is an AES-256 secret key with SENSITIVE, ALWAYS_SENSITIVE,
// NEVER_EXTRACTABLE, LOCAL, ENCRYPT, DECRYPT true and EXTRACTABLE, WRAP,
// UNWRAP, DERIVE, MODIFIABLE false (and COPYABLE false where the token
// reports it).
absl::Status VerifyCmkAttributes(Session& session, CK_OBJECT_HANDLE key);

// ECDSA P-256 signing key pair (audit checkpoints): the private half is
// SENSITIVE, never EXTRACTABLE, SIGN only. Returns {public, private}.
absl::StatusOr<std::pair<CK_OBJECT_HANDLE, CK_OBJECT_HANDLE>>
GenerateP256SigningKeyPair(Session& session, absl::string_view id,
                           absl::string_view label);

// The private-key counterpart of VerifyCmkAttributes: EC key, SIGN true,
// SENSITIVE, ALWAYS_SENSITIVE, NEVER_EXTRACTABLE, LOCAL true; EXTRACTABLE,
// DECRYPT, UNWRAP, DERIVE, MODIFIABLE false.
absl::Status VerifySigningKeyAttributes(Session& session, CK_OBJECT_HANDLE key);

// Hex of a CKA_ID, for logs and messages (ids are not secret).
std::string ObjectIdHex(absl::string_view id);

}  // namespace custos::hsm

#endif  // CUSTOS_HSM_KEY_TEMPLATES_H_
