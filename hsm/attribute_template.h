// AttributeTemplate: an owned list of PKCS#11 attributes (CK_ATTRIBUTE) for
// C_GenerateKey, C_FindObjectsInit and friends. Values are stored in
// containers whose elements never move, so the CK_ATTRIBUTE pointers stay
// valid for the template's lifetime. Not thread-safe; a value type.
#ifndef CUSTOS_HSM_ATTRIBUTE_TEMPLATE_H_
#define CUSTOS_HSM_ATTRIBUTE_TEMPLATE_H_

#include <deque>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "hsm/pkcs11.h"

namespace custos::hsm {

class AttributeTemplate {
 public:
  AttributeTemplate() = default;
  AttributeTemplate(const AttributeTemplate&) = delete;
  AttributeTemplate& operator=(const AttributeTemplate&) = delete;
  AttributeTemplate(AttributeTemplate&&) = default;

  AttributeTemplate& Bool(CK_ATTRIBUTE_TYPE type, bool value);
  AttributeTemplate& Ulong(CK_ATTRIBUTE_TYPE type, CK_ULONG value);
  AttributeTemplate& Bytes(CK_ATTRIBUTE_TYPE type, absl::string_view value);

  CK_ATTRIBUTE* data() { return attrs_.data(); }
  CK_ULONG size() const { return attrs_.size(); }

 private:
  std::vector<CK_ATTRIBUTE> attrs_;
  std::deque<CK_BBOOL> bools_;
  std::deque<CK_ULONG> ulongs_;
  std::deque<std::string> bytes_;
};

}  // namespace custos::hsm

#endif  // CUSTOS_HSM_ATTRIBUTE_TEMPLATE_H_
