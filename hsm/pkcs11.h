// The one way Custos includes the PKCS#11 API (p11-kit's pkcs11.h, v2.40).
// p11-kit's header leaves short lower-case macros defined (iv_ptr, aad_len,
// tag_bits, ...) that break C++ headers included after it; they are undefined
// here. Include this header last among system headers.
#ifndef CUSTOS_HSM_PKCS11_H_
#define CUSTOS_HSM_PKCS11_H_

#include <p11-kit/pkcs11.h>

#undef aad_len
#undef aad_ptr
#undef ck_rsa_pkcs_mgf_type_t
#undef ck_rsa_pkcs_oaep_source_type_t
#undef counter_bits
#undef data_params
#undef hash_alg
#undef iv_bits
#undef iv_len
#undef iv_ptr
#undef public_data
#undef public_data_len
#undef s_len
#undef shared_data
#undef shared_data_len
#undef source_data
#undef source_data_len
#undef string_data
#undef string_data_len
#undef tag_bits

#endif  // CUSTOS_HSM_PKCS11_H_
