#include "hsm/attribute_template.h"

namespace custos::hsm {

AttributeTemplate& AttributeTemplate::Bool(CK_ATTRIBUTE_TYPE type, bool value) {
  CK_BBOOL& v = bools_.emplace_back(value ? CK_TRUE : CK_FALSE);
  attrs_.push_back({type, &v, sizeof(v)});
  return *this;
}

AttributeTemplate& AttributeTemplate::Ulong(CK_ATTRIBUTE_TYPE type,
                                            CK_ULONG value) {
  CK_ULONG& v = ulongs_.emplace_back(value);
  attrs_.push_back({type, &v, sizeof(v)});
  return *this;
}

AttributeTemplate& AttributeTemplate::Bytes(CK_ATTRIBUTE_TYPE type,
                                            absl::string_view value) {
  std::string& v = bytes_.emplace_back(value);
  attrs_.push_back({type, v.data(), static_cast<CK_ULONG>(v.size())});
  return *this;
}

}  // namespace custos::hsm
