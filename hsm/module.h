// A loaded PKCS#11 library (SoftHSM2 in tests, a vendor HSM in production).
//
// Load() dlopens the library, takes its function list and calls C_Initialize
// with CKF_OS_LOCKING_OK; the destructor calls C_Finalize and unloads it.
// C_Initialize is process-wide, so there is one Module per process, owned by
// main (or a test fixture) and passed by reference; never a singleton.
// Thread-safe: the function list is immutable after Load().
#ifndef CUSTOS_HSM_MODULE_H_
#define CUSTOS_HSM_MODULE_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "hsm/pkcs11.h"

namespace custos::hsm {

struct TokenSummary {
  CK_SLOT_ID slot;
  std::string label;  // trailing blanks removed
  std::string serial;
  bool initialized;
};

class Module {
 public:
  static absl::StatusOr<std::unique_ptr<Module>> Load(const std::string& path);
  ~Module();
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // The module's functions. Valid for this Module's lifetime.
  CK_FUNCTION_LIST* fn() const { return fn_; }
  const std::string& path() const { return path_; }

  // Tokens present in the module's slots. Retries transient failures (a token
  // directory being written by another process) a bounded number of times.
  absl::StatusOr<std::vector<TokenSummary>> ListTokens() const;

  // The slot whose token has this label. Tokens are always found by label:
  // slot ids are not stable (SoftHSM renumbers them on C_InitToken).
  // NOT_FOUND names the labels that do exist.
  absl::StatusOr<CK_SLOT_ID> FindSlotByTokenLabel(
      absl::string_view label) const;

 private:
  Module(std::string path, void* handle, CK_FUNCTION_LIST* fn)
      : path_(std::move(path)), handle_(handle), fn_(fn) {}

  std::string path_;
  void* handle_;
  CK_FUNCTION_LIST* fn_;
};

// Pads `label` with blanks to the 32 bytes of CK_TOKEN_INFO.label.
std::string PadTokenLabel(absl::string_view label);

}  // namespace custos::hsm

#endif  // CUSTOS_HSM_MODULE_H_
