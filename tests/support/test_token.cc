#include "tests/support/test_token.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "hsm/ck_status.h"
#include "hsm/module.h"

namespace custos::testing {
namespace {

constexpr char kSoPin[] = "custos-test-so";

absl::Status InitToken(const std::string& label, const std::string& user_pin) {
  CUSTOS_ASSIGN_OR_RETURN(auto module, hsm::Module::Load(kSoftHsmModule));
  CUSTOS_ASSIGN_OR_RETURN(auto tokens, module->ListTokens());
  CK_SLOT_ID free_slot = 0;
  bool found = false;
  for (const auto& t : tokens) {
    if (!t.initialized) {
      free_slot = t.slot;
      found = true;
      break;
    }
  }
  if (!found) return absl::NotFoundError("SoftHSM offers no free slot");
  CK_FUNCTION_LIST* fn = module->fn();
  std::string padded = hsm::PadTokenLabel(label);
  CUSTOS_RETURN_IF_ERROR(hsm::CkStatus(
      fn->C_InitToken(
          free_slot,
          reinterpret_cast<CK_UTF8CHAR_PTR>(const_cast<char*>(kSoPin)),
          std::strlen(kSoPin),
          reinterpret_cast<CK_UTF8CHAR_PTR>(padded.data())),
      "C_InitToken"));
  // SoftHSM moves the new token to another slot id: find it by label.
  CUSTOS_ASSIGN_OR_RETURN(CK_SLOT_ID slot, module->FindSlotByTokenLabel(label));
  CK_SESSION_HANDLE session;
  CUSTOS_RETURN_IF_ERROR(
      hsm::CkStatus(fn->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION,
                                      nullptr, nullptr, &session),
                    "C_OpenSession"));
  absl::Status s = hsm::CkStatus(
      fn->C_Login(session, CKU_SO,
                  reinterpret_cast<CK_UTF8CHAR_PTR>(const_cast<char*>(kSoPin)),
                  std::strlen(kSoPin)),
      "C_Login(SO)");
  if (s.ok()) {
    s = hsm::CkStatus(fn->C_InitPIN(session,
                                    reinterpret_cast<CK_UTF8CHAR_PTR>(
                                        const_cast<char*>(user_pin.data())),
                                    user_pin.size()),
                      "C_InitPIN");
  }
  fn->C_CloseSession(session);
  return s;
}

}  // namespace

absl::StatusOr<std::string> MakeTempDir(const std::string& prefix) {
  const char* base = std::getenv("TMPDIR");
  std::string templ =
      absl::StrCat(base && *base ? base : "/tmp", "/", prefix, "-XXXXXX");
  if (mkdtemp(templ.data()) == nullptr) {
    return absl::InternalError(
        absl::StrCat("mkdtemp ", templ, ": ", std::strerror(errno)));
  }
  return templ;
}

absl::Status WriteFileAtomically(const std::string& path,
                                 const std::string& contents, int mode) {
  std::string tmp = path + ".tmp";
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, mode);
  if (fd < 0) return absl::InternalError("open " + tmp);
  bool ok = write(fd, contents.data(), contents.size()) ==
            static_cast<ssize_t>(contents.size());
  fchmod(fd, mode);
  ok = close(fd) == 0 && ok;
  if (!ok || rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::InternalError("write " + path);
  }
  return absl::OkStatus();
}

CommandResult RunCommand(const std::string& command) {
  CommandResult result{-1, ""};
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0)
    result.output.append(buf, n);
  int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

absl::StatusOr<std::unique_ptr<TestToken>> TestToken::Create(
    const std::string& label) {
  std::unique_ptr<TestToken> token(new TestToken());
  CUSTOS_ASSIGN_OR_RETURN(token->dir_, MakeTempDir("custos-token"));
  token->label_ = label;
  token->user_pin_ = "custos-test-pin";
  std::filesystem::create_directories(token->dir_ + "/tokens");
  token->conf_path_ = token->dir_ + "/softhsm2.conf";
  CUSTOS_RETURN_IF_ERROR(WriteFileAtomically(
      token->conf_path_,
      absl::StrCat("directories.tokendir = ", token->dir_,
                   "/tokens\nobjectstore.backend = file\nlog.level = ERROR\n"),
      0600));
  setenv("SOFTHSM2_CONF", token->conf_path_.c_str(), 1);
  token->pin_file_ = token->dir_ + "/user.pin";
  CUSTOS_RETURN_IF_ERROR(
      WriteFileAtomically(token->pin_file_, token->user_pin_ + "\n", 0400));
  CUSTOS_RETURN_IF_ERROR(InitToken(label, token->user_pin_));
  return token;
}

TestToken::~TestToken() {
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

}  // namespace custos::testing
