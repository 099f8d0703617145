#include "hsm/key_templates.h"

#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

namespace custos::hsm {
namespace {

// DER encoding of the P-256 (prime256v1) named-curve OID 1.2.840.10045.3.1.7.
constexpr char kP256Oid[] = "\x06\x08\x2a\x86\x48\xce\x3d\x03\x01\x07";

struct Expectation {
  CK_ATTRIBUTE_TYPE type;
  const char* name;
  CK_ULONG value;  // CK_BBOOL or CK_ULONG, compared as CK_ULONG
  bool is_bool;
  bool optional;  // may be unknown to older tokens
};

// Reads every expected attribute and refuses the object unless all match,
// naming each mismatch. Values start as sentinels that are neither CK_TRUE
// nor CK_FALSE, so an attribute the module did not fill in (whatever its
// return value said) can never pass as "false".
absl::Status Verify(Session& session, CK_OBJECT_HANDLE object,
                    absl::string_view what,
                    const std::vector<Expectation>& expected) {
  constexpr CK_BBOOL kUnsetBool = 0xA5;
  constexpr CK_ULONG kUnsetUlong = CK_UNAVAILABLE_INFORMATION;
  std::vector<CK_ULONG> ulongs(expected.size(), kUnsetUlong);
  std::vector<CK_BBOOL> bools(expected.size(), kUnsetBool);
  std::vector<CK_ATTRIBUTE> attrs;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (expected[i].is_bool) {
      attrs.push_back({expected[i].type, &bools[i], sizeof(CK_BBOOL)});
    } else {
      attrs.push_back({expected[i].type, &ulongs[i], sizeof(CK_ULONG)});
    }
  }
  CUSTOS_RETURN_IF_ERROR(session.GetAttributes(object, attrs));
  std::vector<std::string> problems;
  for (size_t i = 0; i < expected.size(); ++i) {
    const Expectation& e = expected[i];
    bool unavailable =
        attrs[i].ulValueLen == CK_UNAVAILABLE_INFORMATION ||
        (e.is_bool ? (bools[i] != CK_TRUE && bools[i] != CK_FALSE)
                   : ulongs[i] == kUnsetUlong);
    if (unavailable) {
      if (!e.optional) {
        problems.push_back(absl::StrCat(e.name, " is not reported"));
      }
      continue;
    }
    if (e.is_bool) {
      bool actual = bools[i] == CK_TRUE;
      if (actual != (e.value != 0)) {
        problems.push_back(absl::StrCat(e.name, " is ",
                                        actual ? "true" : "false", " (must be ",
                                        e.value ? "true" : "false", ")"));
      }
    } else if (ulongs[i] != e.value) {
      problems.push_back(
          absl::StrCat(e.name, " is ", ulongs[i], " (must be ", e.value, ")"));
    }
  }
  if (problems.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat(what, " refused: ", absl::StrJoin(problems, "; ")));
}

#define CUSTOS_BOOL(attr, v, opt) \
  { attr, #attr, v, true, opt }
#define CUSTOS_ULONG(attr, v) \
  { attr, #attr, v, false, false }

}  // namespace

std::string ObjectIdHex(absl::string_view id) {
  return absl::BytesToHexString(id);
}

AttributeTemplate CmkTemplate(absl::string_view id, absl::string_view label) {
  AttributeTemplate t;
  t.Ulong(CKA_CLASS, CKO_SECRET_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_AES)
      .Ulong(CKA_VALUE_LEN, kAesKeySize)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, false)
      .Bool(CKA_ENCRYPT, true)
      .Bool(CKA_DECRYPT, true)
      .Bool(CKA_WRAP, false)
      .Bool(CKA_UNWRAP, false)
      .Bool(CKA_DERIVE, false)
      .Bool(CKA_SIGN, false)
      .Bool(CKA_VERIFY, false)
      .Bool(CKA_MODIFIABLE, false)
      .Bool(CKA_COPYABLE, false)
      .Bytes(CKA_ID, id)
      .Bytes(CKA_LABEL, label);
  return t;
}

absl::StatusOr<CK_OBJECT_HANDLE> GenerateCmk(Session& session,
                                             absl::string_view id,
                                             absl::string_view label) {
  AttributeTemplate t = CmkTemplate(id, label);
  CUSTOS_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE key,
                          session.GenerateKey(CKM_AES_KEY_GEN, t));
  if (absl::Status s = VerifyCmkAttributes(session, key); !s.ok()) {
    session.DestroyObject(key).IgnoreError();
    return s;
  }
  return key;
}

absl::Status VerifyCmkAttributes(Session& session, CK_OBJECT_HANDLE key) {
  return Verify(session, key, "HSM key",
                {
                    CUSTOS_ULONG(CKA_CLASS, CKO_SECRET_KEY),
                    CUSTOS_ULONG(CKA_KEY_TYPE, CKK_AES),
                    CUSTOS_ULONG(CKA_VALUE_LEN, kAesKeySize),
                    CUSTOS_BOOL(CKA_TOKEN, true, false),
                    CUSTOS_BOOL(CKA_PRIVATE, true, false),
                    CUSTOS_BOOL(CKA_SENSITIVE, true, false),
                    CUSTOS_BOOL(CKA_EXTRACTABLE, false, false),
                    CUSTOS_BOOL(CKA_ENCRYPT, true, false),
                    CUSTOS_BOOL(CKA_DECRYPT, true, false),
                    CUSTOS_BOOL(CKA_WRAP, false, false),
                    CUSTOS_BOOL(CKA_UNWRAP, false, false),
                    CUSTOS_BOOL(CKA_DERIVE, false, false),
                    CUSTOS_BOOL(CKA_SIGN, false, false),
                    CUSTOS_BOOL(CKA_VERIFY, false, false),
                    CUSTOS_BOOL(CKA_MODIFIABLE, false, false),
                    CUSTOS_BOOL(CKA_COPYABLE, false, true),
                    CUSTOS_BOOL(CKA_ALWAYS_SENSITIVE, true, false),
                    CUSTOS_BOOL(CKA_NEVER_EXTRACTABLE, true, false),
                    CUSTOS_BOOL(CKA_LOCAL, true, false),
                });
}

absl::StatusOr<std::pair<CK_OBJECT_HANDLE, CK_OBJECT_HANDLE>>
GenerateP256SigningKeyPair(Session& session, absl::string_view id,
                           absl::string_view label) {
  AttributeTemplate pub;
  pub.Ulong(CKA_CLASS, CKO_PUBLIC_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_EC)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, false)
      .Bool(CKA_VERIFY, true)
      .Bool(CKA_ENCRYPT, false)
      .Bool(CKA_WRAP, false)
      .Bool(CKA_DERIVE, false)
      .Bool(CKA_MODIFIABLE, false)
      .Bytes(CKA_EC_PARAMS, absl::string_view(kP256Oid, sizeof(kP256Oid) - 1))
      .Bytes(CKA_ID, id)
      .Bytes(CKA_LABEL, label);
  AttributeTemplate priv;
  priv.Ulong(CKA_CLASS, CKO_PRIVATE_KEY)
      .Ulong(CKA_KEY_TYPE, CKK_EC)
      .Bool(CKA_TOKEN, true)
      .Bool(CKA_PRIVATE, true)
      .Bool(CKA_SENSITIVE, true)
      .Bool(CKA_EXTRACTABLE, false)
      .Bool(CKA_SIGN, true)
      .Bool(CKA_SIGN_RECOVER, false)
      .Bool(CKA_DECRYPT, false)
      .Bool(CKA_UNWRAP, false)
      .Bool(CKA_DERIVE, false)
      .Bool(CKA_MODIFIABLE, false)
      .Bool(CKA_COPYABLE, false)
      .Bytes(CKA_ID, id)
      .Bytes(CKA_LABEL, label);
  CUSTOS_ASSIGN_OR_RETURN(
      auto pair, session.GenerateKeyPair(CKM_EC_KEY_PAIR_GEN, pub, priv));
  if (absl::Status s = VerifySigningKeyAttributes(session, pair.second);
      !s.ok()) {
    session.DestroyObject(pair.second).IgnoreError();
    session.DestroyObject(pair.first).IgnoreError();
    return s;
  }
  return pair;
}

absl::Status VerifySigningKeyAttributes(Session& session,
                                        CK_OBJECT_HANDLE key) {
  absl::Status s = Verify(session, key, "HSM signing key",
                          {
                              CUSTOS_ULONG(CKA_CLASS, CKO_PRIVATE_KEY),
                              CUSTOS_ULONG(CKA_KEY_TYPE, CKK_EC),
                              CUSTOS_BOOL(CKA_TOKEN, true, false),
                              CUSTOS_BOOL(CKA_PRIVATE, true, false),
                              CUSTOS_BOOL(CKA_SENSITIVE, true, false),
                              CUSTOS_BOOL(CKA_EXTRACTABLE, false, false),
                              CUSTOS_BOOL(CKA_SIGN, true, false),
                              CUSTOS_BOOL(CKA_SIGN_RECOVER, false, true),
                              CUSTOS_BOOL(CKA_DECRYPT, false, false),
                              CUSTOS_BOOL(CKA_UNWRAP, false, false),
                              CUSTOS_BOOL(CKA_DERIVE, false, false),
                              CUSTOS_BOOL(CKA_MODIFIABLE, false, false),
                              CUSTOS_BOOL(CKA_COPYABLE, false, true),
                              CUSTOS_BOOL(CKA_ALWAYS_SENSITIVE, true, false),
                              CUSTOS_BOOL(CKA_NEVER_EXTRACTABLE, true, false),
                              CUSTOS_BOOL(CKA_LOCAL, true, false),
                          });
  if (!s.ok()) return s;
  // The curve must be P-256: the verifier of checkpoint signatures assumes
  // it.
  CUSTOS_ASSIGN_OR_RETURN(std::string params,
                          session.GetBytesAttribute(key, CKA_EC_PARAMS));
  if (params != absl::string_view(kP256Oid, sizeof(kP256Oid) - 1)) {
    return absl::FailedPreconditionError(
        "HSM signing key refused: CKA_EC_PARAMS is not P-256");
  }
  return absl::OkStatus();
}

}  // namespace custos::hsm
