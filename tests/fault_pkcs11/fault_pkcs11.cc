// A fault-injecting PKCS#11 module, for tests only.
//
// It exports C_GetFunctionList and forwards every call to a real module
// (SoftHSM2), except where its configuration says to fail a function with a
// chosen CK_RV or make it hang for a while. The configuration is a text file
// named by the environment variable CUSTOS_FAULT_CONFIG, re-read whenever it
// changes (replace it atomically with rename), so a test can switch faults on
// and off while the process under test runs:
//
//   module /usr/lib/softhsm/libsofthsm2.so      # the real module (required)
//   fail C_Encrypt rv=CKR_DEVICE_ERROR          # every call from now on
//   fail C_Decrypt rv=0x30 every=10             # every 10th call
//   fail C_GenerateRandom rv=CKR_DEVICE_ERROR after=5 times=1
//   hang C_Encrypt ms=3000 times=1              # sleep, then forward
//
// With CUSTOS_FAULT_STATS_FILE set, the number of open sessions and of
// faults injected is written to that file whenever it changes (leak and
// fault counts across processes).
//
// Calls are counted per function from the moment the rule was loaded; a rule
// fires on call k when k > after, (k - after) % every == 0, and it has fired
// fewer than `times` times (0: no limit). Thread-safe.
#include <sys/stat.h>

#include <dlfcn.h>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "hsm/pkcs11.h"

namespace {

#define CUSTOS_PKCS11_FUNCTIONS(X) \
  X(C_Initialize)                  \
  X(C_Finalize)                    \
  X(C_GetInfo)                     \
  X(C_GetFunctionList)             \
  X(C_GetSlotList)                 \
  X(C_GetSlotInfo)                 \
  X(C_GetTokenInfo)                \
  X(C_GetMechanismList)            \
  X(C_GetMechanismInfo)            \
  X(C_InitToken)                   \
  X(C_InitPIN)                     \
  X(C_SetPIN)                      \
  X(C_OpenSession)                 \
  X(C_CloseSession)                \
  X(C_CloseAllSessions)            \
  X(C_GetSessionInfo)              \
  X(C_GetOperationState)           \
  X(C_SetOperationState)           \
  X(C_Login)                       \
  X(C_Logout)                      \
  X(C_CreateObject)                \
  X(C_CopyObject)                  \
  X(C_DestroyObject)               \
  X(C_GetObjectSize)               \
  X(C_GetAttributeValue)           \
  X(C_SetAttributeValue)           \
  X(C_FindObjectsInit)             \
  X(C_FindObjects)                 \
  X(C_FindObjectsFinal)            \
  X(C_EncryptInit)                 \
  X(C_Encrypt)                     \
  X(C_EncryptUpdate)               \
  X(C_EncryptFinal)                \
  X(C_DecryptInit)                 \
  X(C_Decrypt)                     \
  X(C_DecryptUpdate)               \
  X(C_DecryptFinal)                \
  X(C_DigestInit)                  \
  X(C_Digest)                      \
  X(C_DigestUpdate)                \
  X(C_DigestKey)                   \
  X(C_DigestFinal)                 \
  X(C_SignInit)                    \
  X(C_Sign)                        \
  X(C_SignUpdate)                  \
  X(C_SignFinal)                   \
  X(C_SignRecoverInit)             \
  X(C_SignRecover)                 \
  X(C_VerifyInit)                  \
  X(C_Verify)                      \
  X(C_VerifyUpdate)                \
  X(C_VerifyFinal)                 \
  X(C_VerifyRecoverInit)           \
  X(C_VerifyRecover)               \
  X(C_DigestEncryptUpdate)         \
  X(C_DecryptDigestUpdate)         \
  X(C_SignEncryptUpdate)           \
  X(C_DecryptVerifyUpdate)         \
  X(C_GenerateKey)                 \
  X(C_GenerateKeyPair)             \
  X(C_WrapKey)                     \
  X(C_UnwrapKey)                   \
  X(C_DeriveKey)                   \
  X(C_SeedRandom)                  \
  X(C_GenerateRandom)              \
  X(C_GetFunctionStatus)           \
  X(C_CancelFunction)              \
  X(C_WaitForSlotEvent)

enum FunctionIndex : size_t {
#define CUSTOS_ENUM(name) k##name,
  CUSTOS_PKCS11_FUNCTIONS(CUSTOS_ENUM)
#undef CUSTOS_ENUM
      kFunctionCount
};

constexpr const char* kFunctionNames[] = {
#define CUSTOS_NAME(name) #name,
    CUSTOS_PKCS11_FUNCTIONS(CUSTOS_NAME)
#undef CUSTOS_NAME
};

struct Rule {
  size_t function;
  bool hang = false;
  CK_RV rv = CKR_OK;
  long hang_ms = 0;
  unsigned long every = 1;
  unsigned long after = 0;
  unsigned long times = 0;
  unsigned long calls = 0;  // calls seen since loaded
  unsigned long fired = 0;
};

struct State {
  std::mutex mu;
  std::string config_path;
  std::string module_path;
  struct stat seen = {};
  std::vector<Rule> rules;
  void* handle = nullptr;
  CK_FUNCTION_LIST* real = nullptr;
  std::array<void*, kFunctionCount> real_fns = {};
  CK_FUNCTION_LIST list = {};
};

State& S() {
  static State* state = new State();  // never destroyed: calls may outlive exit
  return *state;
}

const struct {
  const char* name;
  CK_RV rv;
} kRvNames[] = {
    {"CKR_OK", CKR_OK},
    {"CKR_GENERAL_ERROR", CKR_GENERAL_ERROR},
    {"CKR_FUNCTION_FAILED", CKR_FUNCTION_FAILED},
    {"CKR_DEVICE_ERROR", CKR_DEVICE_ERROR},
    {"CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY},
    {"CKR_DEVICE_REMOVED", CKR_DEVICE_REMOVED},
    {"CKR_SESSION_HANDLE_INVALID", CKR_SESSION_HANDLE_INVALID},
    {"CKR_SESSION_CLOSED", CKR_SESSION_CLOSED},
    {"CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT},
    {"CKR_USER_NOT_LOGGED_IN", CKR_USER_NOT_LOGGED_IN},
    {"CKR_HOST_MEMORY", CKR_HOST_MEMORY},
    {"CKR_KEY_HANDLE_INVALID", CKR_KEY_HANDLE_INVALID},
    {"CKR_OBJECT_HANDLE_INVALID", CKR_OBJECT_HANDLE_INVALID},
    {"CKR_OPERATION_ACTIVE", CKR_OPERATION_ACTIVE},
};

bool ParseRv(const std::string& text, CK_RV* rv) {
  for (const auto& entry : kRvNames) {
    if (text == entry.name) {
      *rv = entry.rv;
      return true;
    }
  }
  char* end = nullptr;
  unsigned long value = std::strtoul(text.c_str(), &end, 0);
  if (end == text.c_str() || *end != '\0') return false;
  *rv = value;
  return true;
}

void Complain(const std::string& what) {
  std::fprintf(stderr, "custos fault module: %s\n", what.c_str());
}

// Parses the config file; caller holds S().mu.
void LoadConfigLocked(State& s) {
  std::ifstream in(s.config_path);
  std::vector<Rule> rules;
  std::string line;
  int line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    std::istringstream words(line.substr(0, line.find('#')));
    std::string verb;
    if (!(words >> verb)) continue;
    if (verb == "module") {
      words >> s.module_path;
      continue;
    }
    std::string fn;
    words >> fn;
    size_t index = kFunctionCount;
    for (size_t i = 0; i < kFunctionCount; ++i) {
      if (fn == kFunctionNames[i]) index = i;
    }
    if ((verb != "fail" && verb != "hang") || index == kFunctionCount) {
      Complain("line " + std::to_string(line_no) + ": expected 'fail|hang " +
               "C_Function key=value...', got '" + line + "'");
      continue;
    }
    Rule rule;
    rule.function = index;
    rule.hang = verb == "hang";
    rule.rv = CKR_DEVICE_ERROR;
    std::string kv;
    while (words >> kv) {
      size_t eq = kv.find('=');
      std::string key = kv.substr(0, eq);
      std::string value = eq == std::string::npos ? "" : kv.substr(eq + 1);
      if (key == "rv") {
        if (!ParseRv(value, &rule.rv)) Complain("unknown rv " + value);
      } else if (key == "ms") {
        rule.hang_ms = std::strtol(value.c_str(), nullptr, 10);
      } else if (key == "every") {
        rule.every = std::max(1UL, std::strtoul(value.c_str(), nullptr, 10));
      } else if (key == "after") {
        rule.after = std::strtoul(value.c_str(), nullptr, 10);
      } else if (key == "times") {
        rule.times = std::strtoul(value.c_str(), nullptr, 10);
      } else {
        Complain("unknown key " + key);
      }
    }
    rules.push_back(rule);
  }
  s.rules = std::move(rules);
}

// Re-reads the configuration if the file changed; returns the action for
// this call of `function`: {hang_ms, rv}. rv == CKR_OK means forward.
void Decide(size_t function, long* hang_ms, CK_RV* rv) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  struct stat st = {};
  if (stat(s.config_path.c_str(), &st) == 0 &&
      (st.st_ino != s.seen.st_ino || st.st_size != s.seen.st_size ||
       st.st_mtim.tv_sec != s.seen.st_mtim.tv_sec ||
       st.st_mtim.tv_nsec != s.seen.st_mtim.tv_nsec)) {
    s.seen = st;
    LoadConfigLocked(s);
  }
  for (Rule& rule : s.rules) {
    if (rule.function != function) continue;
    unsigned long k = ++rule.calls;
    if (k <= rule.after || (k - rule.after) % rule.every != 0) continue;
    if (rule.times != 0 && rule.fired >= rule.times) continue;
    ++rule.fired;
    if (rule.hang) {
      *hang_ms = std::max(*hang_ms, rule.hang_ms);
    } else if (*rv == CKR_OK) {
      *rv = rule.rv;
    }
  }
}

// Sessions open on the real module, for leak checks (see
// custos_fault_open_sessions below).
std::atomic<long> g_open_sessions{0};

// Faults injected so far (failures and hangs).
std::atomic<long> g_injected{0};

// With CUSTOS_FAULT_STATS_FILE set, "open_sessions N" and "injected N" are
// written to that file whenever either changes, so that a test can watch
// another process.
void PublishStats() {
  static const char* path = std::getenv("CUSTOS_FAULT_STATS_FILE");
  if (path == nullptr) return;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  const std::string tmp = std::string(path) + ".tmp";
  if (FILE* f = std::fopen(tmp.c_str(), "w")) {
    std::fprintf(f, "open_sessions %ld\ninjected %ld\n", g_open_sessions.load(),
                 g_injected.load());
    std::fclose(f);
    std::rename(tmp.c_str(), path);
  }
}

void CountSessions(size_t function, CK_RV rv) {
  if (rv != CKR_OK) return;
  if (function == kC_OpenSession) ++g_open_sessions;
  if (function == kC_CloseSession) --g_open_sessions;
  if (function == kC_CloseAllSessions) g_open_sessions = 0;
  if (function == kC_OpenSession || function == kC_CloseSession ||
      function == kC_CloseAllSessions) {
    PublishStats();
  }
}

template <size_t I, typename Fn>
struct Wrap;

template <size_t I, typename... Args>
struct Wrap<I, CK_RV (*)(Args...)> {
  static CK_RV Call(Args... args) {
    long hang_ms = 0;
    CK_RV rv = CKR_OK;
    Decide(I, &hang_ms, &rv);
    if (hang_ms > 0 || rv != CKR_OK) {
      ++g_injected;
      PublishStats();
    }
    if (hang_ms > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(hang_ms));
    }
    if (rv != CKR_OK) return rv;
    auto real = reinterpret_cast<CK_RV (*)(Args...)>(S().real_fns[I]);
    if (real == nullptr) return CKR_FUNCTION_NOT_SUPPORTED;
    rv = real(args...);
    CountSessions(I, rv);
    return rv;
  }
};

CK_RV Setup() {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.real != nullptr) return CKR_OK;
  const char* config = std::getenv("CUSTOS_FAULT_CONFIG");
  if (config == nullptr) {
    Complain("CUSTOS_FAULT_CONFIG is not set");
    return CKR_GENERAL_ERROR;
  }
  s.config_path = config;
  stat(s.config_path.c_str(), &s.seen);
  LoadConfigLocked(s);
  if (s.module_path.empty()) {
    Complain("no 'module PATH' line in " + s.config_path);
    return CKR_GENERAL_ERROR;
  }
  s.handle = dlopen(s.module_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  auto get_list = s.handle ? reinterpret_cast<CK_C_GetFunctionList>(
                                 dlsym(s.handle, "C_GetFunctionList"))
                           : nullptr;
  if (get_list == nullptr || get_list(&s.real) != CKR_OK) {
    Complain("cannot load real module " + s.module_path);
    return CKR_GENERAL_ERROR;
  }
#define CUSTOS_REAL(name) \
  s.real_fns[k##name] = reinterpret_cast<void*>(s.real->name);
  CUSTOS_PKCS11_FUNCTIONS(CUSTOS_REAL)
#undef CUSTOS_REAL
  s.list.version = s.real->version;
#define CUSTOS_WRAP(name) \
  s.list.name = &Wrap<k##name, decltype(s.list.name)>::Call;
  CUSTOS_PKCS11_FUNCTIONS(CUSTOS_WRAP)
#undef CUSTOS_WRAP
  s.list.C_GetFunctionList = &C_GetFunctionList;
  return CKR_OK;
}

}  // namespace

// Sessions opened through this module and not yet closed (one token).
extern "C" __attribute__((visibility("default"))) long
custos_fault_open_sessions() {
  return g_open_sessions.load();
}

extern "C" __attribute__((visibility("default"))) CK_RV C_GetFunctionList(
    CK_FUNCTION_LIST_PTR_PTR list) {
  if (list == nullptr) return CKR_ARGUMENTS_BAD;
  CK_RV rv = Setup();
  if (rv != CKR_OK) return rv;
  *list = &S().list;
  return CKR_OK;
}
