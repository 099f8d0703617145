#include "hsm/session.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "hsm/ck_status.h"

namespace custos::hsm {
namespace {

// Some modules (SoftHSM) refuse a NULL data pointer even with length 0.
CK_BYTE kEmpty[1] = {0};

CK_BYTE_PTR Bytes(absl::string_view s) {
  if (s.data() == nullptr) return kEmpty;
  return reinterpret_cast<CK_BYTE_PTR>(const_cast<char*>(s.data()));
}

absl::Status CheckGcmSizes(absl::string_view iv) {
  if (iv.size() != kGcmIvSize) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AES-GCM IV must be ", kGcmIvSize, " bytes, got ", iv.size()));
  }
  return absl::OkStatus();
}

CK_GCM_PARAMS GcmParams(absl::string_view iv, absl::string_view aad) {
  CK_GCM_PARAMS params = {};
  params.pIv = Bytes(iv);
  params.ulIvLen = iv.size();
  params.ulIvBits = iv.size() * 8;
  params.pAAD = aad.empty() ? nullptr : Bytes(aad);
  params.ulAADLen = aad.size();
  params.ulTagBits = kGcmTagSize * 8;
  return params;
}

}  // namespace

absl::StatusOr<Session> Session::Open(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot) {
  CK_SESSION_HANDLE handle = CK_INVALID_HANDLE;
  absl::Status s =
      CkStatus(fn->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION,
                                 nullptr, nullptr, &handle),
               "C_OpenSession");
  if (!s.ok()) return s;
  return Session(fn, slot, handle);
}

Session::Session(Session&& other) noexcept
    : fn_(other.fn_),
      slot_(other.slot_),
      handle_(std::exchange(other.handle_, CK_INVALID_HANDLE)),
      needs_reset_(other.needs_reset_) {}

Session& Session::operator=(Session&& other) noexcept {
  if (this != &other) {
    Close();
    fn_ = other.fn_;
    slot_ = other.slot_;
    handle_ = std::exchange(other.handle_, CK_INVALID_HANDLE);
    needs_reset_ = other.needs_reset_;
  }
  return *this;
}

Session::~Session() { Close(); }

void Session::Close() {
  if (handle_ != CK_INVALID_HANDLE) {
    // A session closed behind our back answers CKR_SESSION_HANDLE_INVALID;
    // nothing more can be done about it here.
    fn_->C_CloseSession(handle_);
    handle_ = CK_INVALID_HANDLE;
  }
}

absl::Status Session::Login(const SecretBytes& pin) {
  CK_RV rv = fn_->C_Login(handle_, CKU_USER,
                          const_cast<CK_UTF8CHAR_PTR>(pin.data()), pin.size());
  if (rv == CKR_USER_ALREADY_LOGGED_IN) return absl::OkStatus();
  return CkStatus(rv, "C_Login");
}

absl::StatusOr<SecretBytes> Session::GenerateRandom(size_t size) {
  SecretBytes out(size);
  if (size == 0) return out;
  absl::Status s = CkStatus(fn_->C_GenerateRandom(handle_, out.data(), size),
                            "C_GenerateRandom");
  if (!s.ok()) return s;
  return out;
}

absl::StatusOr<CK_OBJECT_HANDLE> Session::GenerateKey(
    CK_MECHANISM_TYPE mechanism, AttributeTemplate& attrs) {
  CK_MECHANISM mech = {mechanism, nullptr, 0};
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  absl::Status s = CkStatus(
      fn_->C_GenerateKey(handle_, &mech, attrs.data(), attrs.size(), &key),
      "C_GenerateKey");
  if (!s.ok()) return s;
  return key;
}

absl::StatusOr<std::pair<CK_OBJECT_HANDLE, CK_OBJECT_HANDLE>>
Session::GenerateKeyPair(CK_MECHANISM_TYPE mechanism,
                         AttributeTemplate& public_attrs,
                         AttributeTemplate& private_attrs) {
  CK_MECHANISM mech = {mechanism, nullptr, 0};
  CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE, priv = CK_INVALID_HANDLE;
  absl::Status s =
      CkStatus(fn_->C_GenerateKeyPair(handle_, &mech, public_attrs.data(),
                                      public_attrs.size(), private_attrs.data(),
                                      private_attrs.size(), &pub, &priv),
               "C_GenerateKeyPair");
  if (!s.ok()) return s;
  return std::make_pair(pub, priv);
}

absl::StatusOr<std::vector<CK_OBJECT_HANDLE>> Session::FindObjects(
    AttributeTemplate& attrs, size_t max_objects) {
  absl::Status s =
      CkStatus(fn_->C_FindObjectsInit(handle_, attrs.data(), attrs.size()),
               "C_FindObjectsInit");
  if (!s.ok()) return s;
  std::vector<CK_OBJECT_HANDLE> found;
  CK_OBJECT_HANDLE batch[64];
  while (found.size() < max_objects) {
    CK_ULONG n = 0;
    CK_ULONG want = std::min<size_t>(64, max_objects - found.size());
    s = CkStatus(fn_->C_FindObjects(handle_, batch, want, &n), "C_FindObjects");
    if (!s.ok() || n == 0) break;
    found.insert(found.end(), batch, batch + n);
  }
  // Always finish the search, or the session stays in a search operation.
  absl::Status final_status =
      CkStatus(fn_->C_FindObjectsFinal(handle_), "C_FindObjectsFinal");
  if (!final_status.ok()) needs_reset_ = true;
  if (!s.ok()) return s;
  if (!final_status.ok()) return final_status;
  return found;
}

absl::Status Session::DestroyObject(CK_OBJECT_HANDLE object) {
  return CkStatus(fn_->C_DestroyObject(handle_, object), "C_DestroyObject");
}

absl::StatusOr<CK_OBJECT_HANDLE> Session::CreateObject(
    AttributeTemplate& attrs) {
  CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
  absl::Status s = CkStatus(
      fn_->C_CreateObject(handle_, attrs.data(), attrs.size(), &object),
      "C_CreateObject");
  if (!s.ok()) return s;
  return object;
}

absl::StatusOr<std::string> Session::GetBytesAttribute(CK_OBJECT_HANDLE object,
                                                       CK_ATTRIBUTE_TYPE type) {
  CK_ATTRIBUTE attr = {type, nullptr, 0};
  absl::Status s = CkStatus(fn_->C_GetAttributeValue(handle_, object, &attr, 1),
                            "C_GetAttributeValue");
  if (!s.ok()) return s;
  if (attr.ulValueLen == CK_UNAVAILABLE_INFORMATION) {
    return absl::NotFoundError("C_GetAttributeValue: attribute unavailable");
  }
  std::string value(attr.ulValueLen, '\0');
  attr.pValue = value.data();
  s = CkStatus(fn_->C_GetAttributeValue(handle_, object, &attr, 1),
               "C_GetAttributeValue");
  if (!s.ok()) return s;
  value.resize(attr.ulValueLen);
  return value;
}

absl::StatusOr<std::vector<std::string>> Session::GetBytesAttributes(
    CK_OBJECT_HANDLE object, const std::vector<CK_ATTRIBUTE_TYPE>& types) {
  constexpr size_t kFirstGuess = 256;
  std::vector<std::string> values(types.size(), std::string(kFirstGuess, '\0'));
  std::vector<CK_ATTRIBUTE> attrs(types.size());
  for (size_t i = 0; i < types.size(); ++i) {
    attrs[i] = {types[i], values[i].data(), kFirstGuess};
  }
  CK_RV rv =
      fn_->C_GetAttributeValue(handle_, object, attrs.data(), attrs.size());
  if (rv == CKR_BUFFER_TOO_SMALL) {
    // A value is longer than the guess: ask every size, then read them all.
    for (CK_ATTRIBUTE& attr : attrs) {
      attr.pValue = nullptr;
      attr.ulValueLen = 0;
    }
    absl::Status s = CkStatus(
        fn_->C_GetAttributeValue(handle_, object, attrs.data(), attrs.size()),
        "C_GetAttributeValue");
    if (!s.ok()) return s;
    for (size_t i = 0; i < attrs.size(); ++i) {
      if (attrs[i].ulValueLen == CK_UNAVAILABLE_INFORMATION) {
        return absl::NotFoundError(
            "C_GetAttributeValue: attribute unavailable");
      }
      values[i].assign(attrs[i].ulValueLen, '\0');
      attrs[i].pValue = values[i].data();
    }
    rv = fn_->C_GetAttributeValue(handle_, object, attrs.data(), attrs.size());
  }
  absl::Status s = CkStatus(rv, "C_GetAttributeValue");
  if (!s.ok()) return s;
  for (size_t i = 0; i < attrs.size(); ++i) {
    if (attrs[i].ulValueLen == CK_UNAVAILABLE_INFORMATION) {
      return absl::NotFoundError("C_GetAttributeValue: attribute unavailable");
    }
    values[i].resize(attrs[i].ulValueLen);
  }
  return values;
}

absl::Status Session::GetAttributes(CK_OBJECT_HANDLE object,
                                    std::vector<CK_ATTRIBUTE>& attrs) {
  CK_RV rv =
      fn_->C_GetAttributeValue(handle_, object, attrs.data(), attrs.size());
  // Per PKCS#11 v2.40 section 5.7, these two still fill every attribute they
  // can and mark the rest CK_UNAVAILABLE_INFORMATION.
  if (rv == CKR_ATTRIBUTE_TYPE_INVALID || rv == CKR_ATTRIBUTE_SENSITIVE) {
    return absl::OkStatus();
  }
  return CkStatus(rv, "C_GetAttributeValue");
}

absl::StatusOr<std::string> Session::EncryptAesGcm(
    CK_OBJECT_HANDLE key, absl::string_view iv, absl::string_view aad,
    absl::string_view plaintext) {
  if (absl::Status s = CheckGcmSizes(iv); !s.ok()) return s;
  CK_GCM_PARAMS params = GcmParams(iv, aad);
  CK_MECHANISM mech = {CKM_AES_GCM, &params, sizeof(params)};
  absl::Status s =
      CkStatus(fn_->C_EncryptInit(handle_, &mech, key), "C_EncryptInit");
  if (!s.ok()) return s;
  std::string out(plaintext.size() + kGcmTagSize, '\0');
  CK_ULONG out_len = out.size();
  s = CkStatus(
      fn_->C_Encrypt(handle_, Bytes(plaintext), plaintext.size(),
                     reinterpret_cast<CK_BYTE_PTR>(out.data()), &out_len),
      "C_Encrypt");
  if (!s.ok()) {
    needs_reset_ = true;
    return s;
  }
  if (out_len != plaintext.size() + kGcmTagSize) {
    return absl::InternalError(absl::StrCat("C_Encrypt: AES-GCM returned ",
                                            out_len, " bytes, expected ",
                                            plaintext.size() + kGcmTagSize));
  }
  return out;
}

absl::StatusOr<SecretBytes> Session::DecryptAesGcm(
    CK_OBJECT_HANDLE key, absl::string_view iv, absl::string_view aad,
    absl::string_view ciphertext) {
  if (absl::Status s = CheckGcmSizes(iv); !s.ok()) return s;
  if (ciphertext.size() < kGcmTagSize) {
    return absl::InvalidArgumentError("AES-GCM ciphertext shorter than a tag");
  }
  CK_GCM_PARAMS params = GcmParams(iv, aad);
  CK_MECHANISM mech = {CKM_AES_GCM, &params, sizeof(params)};
  absl::Status s =
      CkStatus(fn_->C_DecryptInit(handle_, &mech, key), "C_DecryptInit");
  if (!s.ok()) return s;
  // SoftHSM asks for an output buffer as long as the input, tag included.
  SecretBytes out(ciphertext.size());
  CK_ULONG out_len = out.size();
  CK_RV rv = fn_->C_Decrypt(handle_, Bytes(ciphertext), ciphertext.size(),
                            out.data(), &out_len);
  // A failed tag check is CKR_ENCRYPTED_DATA_INVALID by the spec, and
  // CKR_GENERAL_ERROR from SoftHSM (docs/hsm.md, "SoftHSM2's behaviour the code
  // depends on"). Both end the operation (PKCS#11 v2.40 section 5.2), so the
  // session stays usable: a stream of bad ciphertexts must not cost a new
  // session each.
  if (rv == CKR_ENCRYPTED_DATA_INVALID || rv == CKR_GENERAL_ERROR ||
      rv == CKR_ENCRYPTED_DATA_LEN_RANGE) {
    return CkStatusAs(absl::StatusCode::kInvalidArgument,
                      "AES-GCM authentication failed", rv);
  }
  if (rv != CKR_OK) {
    needs_reset_ = true;
    return CkStatus(rv, "C_Decrypt");
  }
  if (out_len != ciphertext.size() - kGcmTagSize) {
    return absl::InternalError("C_Decrypt: unexpected AES-GCM output length");
  }
  out.Truncate(out_len);
  return out;
}

absl::StatusOr<std::string> Session::SignEcdsa(CK_OBJECT_HANDLE key,
                                               absl::string_view digest) {
  CK_MECHANISM mech = {CKM_ECDSA, nullptr, 0};
  absl::Status s = CkStatus(fn_->C_SignInit(handle_, &mech, key), "C_SignInit");
  if (!s.ok()) return s;
  std::string sig(132, '\0');  // large enough for P-521; P-256 uses 64
  CK_ULONG sig_len = sig.size();
  s = CkStatus(fn_->C_Sign(handle_, Bytes(digest), digest.size(),
                           reinterpret_cast<CK_BYTE_PTR>(sig.data()), &sig_len),
               "C_Sign");
  if (!s.ok()) {
    needs_reset_ = true;
    return s;
  }
  sig.resize(sig_len);
  return sig;
}

}  // namespace custos::hsm
