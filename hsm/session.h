// Session: one open PKCS#11 session on a token, and the primitive operations
// Custos performs on it. Move-only; closes itself on destruction.
//
// Not thread-safe: PKCS#11 sessions must never be used by two threads at once
// (SoftHSM corrupts its heap or returns CKR_OPERATION_ACTIVE). The
// SessionPool gives each caller its own.
//
// Every method maps CK_RV through CkStatus(); none puts key material, PINs or
// plaintext in a status message.
#ifndef CUSTOS_HSM_SESSION_H_
#define CUSTOS_HSM_SESSION_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/secret_bytes.h"
#include "hsm/attribute_template.h"
#include "hsm/pkcs11.h"

namespace custos::hsm {

inline constexpr size_t kGcmIvSize = 12;   // 96-bit IV, NIST SP 800-38D
inline constexpr size_t kGcmTagSize = 16;  // 128-bit tag

class Session {
 public:
  // Opens a read/write session on `slot`.
  static absl::StatusOr<Session> Open(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot);

  Session(Session&& other) noexcept;
  Session& operator=(Session&& other) noexcept;
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  ~Session();

  // Logs the user in. Login state is per token and process (PKCS#11 v2.40
  // section 5.6), so CKR_USER_ALREADY_LOGGED_IN counts as success.
  absl::Status Login(const SecretBytes& pin);

  CK_SESSION_HANDLE handle() const { return handle_; }
  // True once a call failed after its C_*Init succeeded. Whether the module
  // then ended the operation varies (PKCS#11 v2.40 section 5.2 leaves
  // CKR_ARGUMENTS_BAD and others open), so such a session is replaced rather
  // than risk CKR_OPERATION_ACTIVE on its next use.
  bool needs_reset() const { return needs_reset_; }
  CK_FUNCTION_LIST* fn() const { return fn_; }
  CK_SLOT_ID slot() const { return slot_; }

  absl::StatusOr<SecretBytes> GenerateRandom(size_t size);

  absl::StatusOr<CK_OBJECT_HANDLE> GenerateKey(CK_MECHANISM_TYPE mechanism,
                                               AttributeTemplate& attrs);
  // Returns {public, private} handles.
  absl::StatusOr<std::pair<CK_OBJECT_HANDLE, CK_OBJECT_HANDLE>> GenerateKeyPair(
      CK_MECHANISM_TYPE mechanism, AttributeTemplate& public_attrs,
      AttributeTemplate& private_attrs);

  // Objects matching `attrs`, at most `max_objects`.
  absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> FindObjects(
      AttributeTemplate& attrs, size_t max_objects);
  absl::Status DestroyObject(CK_OBJECT_HANDLE object);
  // C_CreateObject (PKCS#11 v2.40 section 5.7), for data objects only: no
  // key material is ever imported.
  absl::StatusOr<CK_OBJECT_HANDLE> CreateObject(AttributeTemplate& attrs);

  // Reads one variable-length attribute (CKA_ID, CKA_LABEL, CKA_EC_POINT).
  absl::StatusOr<std::string> GetBytesAttribute(CK_OBJECT_HANDLE object,
                                                CK_ATTRIBUTE_TYPE type);
  // Reads several variable-length attributes, in one C_GetAttributeValue
  // when each value fits in 256 bytes (CKA_ID and CKA_LABEL of Custos
  // objects do), else with the size-then-value calls of PKCS#11 v2.40
  // section 5.7. SoftHSM re-checks the token's and the object's files on
  // every call, so a scan of the token pays per call, not per byte.
  absl::StatusOr<std::vector<std::string>> GetBytesAttributes(
      CK_OBJECT_HANDLE object, const std::vector<CK_ATTRIBUTE_TYPE>& types);
  // Reads fixed-size attributes in place (CK_BBOOL, CK_ULONG values). A type
  // the token does not know leaves ulValueLen as CK_UNAVAILABLE_INFORMATION.
  absl::Status GetAttributes(CK_OBJECT_HANDLE object,
                             std::vector<CK_ATTRIBUTE>& attrs);

  // AES-GCM with a caller-chosen IV (exactly 12 bytes) and a 16-byte tag,
  // which this layer insists on because SoftHSM accepts any lengths.
  // Returns ciphertext || tag.
  absl::StatusOr<std::string> EncryptAesGcm(CK_OBJECT_HANDLE key,
                                            absl::string_view iv,
                                            absl::string_view aad,
                                            absl::string_view plaintext);
  // Input is ciphertext || tag. A failed tag check is INVALID_ARGUMENT.
  absl::StatusOr<SecretBytes> DecryptAesGcm(CK_OBJECT_HANDLE key,
                                            absl::string_view iv,
                                            absl::string_view aad,
                                            absl::string_view ciphertext);

  // CKM_ECDSA over a digest the caller computed; returns raw r || s.
  absl::StatusOr<std::string> SignEcdsa(CK_OBJECT_HANDLE key,
                                        absl::string_view digest);

 private:
  Session(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot, CK_SESSION_HANDLE handle)
      : fn_(fn), slot_(slot), handle_(handle) {}
  void Close();

  CK_FUNCTION_LIST* fn_ = nullptr;
  CK_SLOT_ID slot_ = 0;
  CK_SESSION_HANDLE handle_ = CK_INVALID_HANDLE;
  bool needs_reset_ = false;
};

}  // namespace custos::hsm

#endif  // CUSTOS_HSM_SESSION_H_
