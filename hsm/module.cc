#include "hsm/module.h"

#include <dlfcn.h>

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"
#include "hsm/ck_status.h"

namespace custos::hsm {
namespace {

constexpr int kTransientRetries = 5;

std::string FromPadded(const unsigned char* bytes, size_t size) {
  absl::string_view s(reinterpret_cast<const char*>(bytes), size);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\0')) {
    s.remove_suffix(1);
  }
  return std::string(s);
}

// Several processes sharing a SoftHSM token directory can see a half-written
// file for a moment (docs/hsm.md, "SoftHSM2's behaviour the code depends on"):
// such reads are retried briefly.
bool IsTransient(CK_RV rv) {
  return rv == CKR_GENERAL_ERROR || rv == CKR_FUNCTION_FAILED ||
         rv == CKR_TOKEN_NOT_RECOGNIZED;
}

}  // namespace

std::string PadTokenLabel(absl::string_view label) {
  std::string out(label.substr(0, 32));
  out.resize(32, ' ');
  return out;
}

absl::StatusOr<std::unique_ptr<Module>> Module::Load(const std::string& path) {
  if (path.empty()) {
    return absl::InvalidArgumentError(
        "PKCS#11 module path is empty: set it to the HSM vendor's library, "
        "e.g. /usr/lib/softhsm/libsofthsm2.so");
  }
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* err = dlerror();
    return absl::NotFoundError(absl::StrCat("cannot load PKCS#11 module '",
                                            path, "': ", err ? err : "?"));
  }
  auto get_list = reinterpret_cast<CK_C_GetFunctionList>(
      dlsym(handle, "C_GetFunctionList"));
  if (get_list == nullptr) {
    dlclose(handle);
    return absl::InvalidArgumentError(absl::StrCat(
        "'", path, "' is not a PKCS#11 module (no C_GetFunctionList)"));
  }
  CK_FUNCTION_LIST* fn = nullptr;
  if (absl::Status s = CkStatus(get_list(&fn), "C_GetFunctionList");
      !s.ok() || fn == nullptr) {
    dlclose(handle);
    return s.ok() ? absl::InternalError("C_GetFunctionList returned no list")
                  : s;
  }
  CK_C_INITIALIZE_ARGS args = {};
  args.flags = CKF_OS_LOCKING_OK;
  if (absl::Status s = CkStatus(fn->C_Initialize(&args), "C_Initialize");
      !s.ok()) {
    dlclose(handle);
    return s;
  }
  return std::unique_ptr<Module>(new Module(path, handle, fn));
}

Module::~Module() {
  fn_->C_Finalize(nullptr);
  dlclose(handle_);
}

absl::StatusOr<std::vector<TokenSummary>> Module::ListTokens() const {
  CK_RV rv = CKR_OK;
  for (int attempt = 0; attempt <= kTransientRetries; ++attempt) {
    if (attempt > 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    CK_ULONG count = 0;
    rv = fn_->C_GetSlotList(CK_TRUE, nullptr, &count);
    if (rv != CKR_OK) {
      if (IsTransient(rv)) continue;
      return CkStatus(rv, "C_GetSlotList");
    }
    std::vector<CK_SLOT_ID> slots(count);
    rv = fn_->C_GetSlotList(CK_TRUE, slots.data(), &count);
    if (rv == CKR_BUFFER_TOO_SMALL) continue;  // a token appeared meanwhile
    if (rv != CKR_OK) {
      if (IsTransient(rv)) continue;
      return CkStatus(rv, "C_GetSlotList");
    }
    slots.resize(count);
    std::vector<TokenSummary> tokens;
    for (CK_SLOT_ID slot : slots) {
      CK_TOKEN_INFO info;
      rv = fn_->C_GetTokenInfo(slot, &info);
      if (rv == CKR_TOKEN_NOT_PRESENT) continue;
      if (rv != CKR_OK) break;
      tokens.push_back(
          {slot, FromPadded(info.label, sizeof(info.label)),
           FromPadded(info.serialNumber, sizeof(info.serialNumber)),
           (info.flags & CKF_TOKEN_INITIALIZED) != 0});
    }
    if (rv != CKR_OK && rv != CKR_TOKEN_NOT_PRESENT) {
      if (IsTransient(rv)) continue;
      return CkStatus(rv, "C_GetTokenInfo");
    }
    return tokens;
  }
  return CkStatus(rv, "C_GetSlotList/C_GetTokenInfo (after retries)");
}

absl::StatusOr<CK_SLOT_ID> Module::FindSlotByTokenLabel(
    absl::string_view label) const {
  CUSTOS_ASSIGN_OR_RETURN(std::vector<TokenSummary> tokens, ListTokens());
  std::vector<std::string> labels;
  for (const TokenSummary& t : tokens) {
    if (t.initialized && t.label == label) return t.slot;
    if (t.initialized) labels.push_back(absl::StrCat("'", t.label, "'"));
  }
  return absl::NotFoundError(
      absl::StrCat("no initialised token labelled '", label, "' in ", path_,
                   "; tokens present: ",
                   labels.empty() ? "none" : absl::StrJoin(labels, ", "),
                   ". Check token_label in the config."));
}

}  // namespace custos::hsm
