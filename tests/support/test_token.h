// TestToken: a fresh SoftHSM2 token in a temporary directory, for one test
// suite. Create() writes a softhsm2.conf there, points SOFTHSM2_CONF at it,
// initialises a token through PKCS#11 itself (C_InitToken on the free slot,
// C_InitPIN as the SO), finalises the module again, and writes the user PIN
// to a 0400 file. The directory is removed on destruction. Not thread-safe.
#ifndef CUSTOS_TESTS_SUPPORT_TEST_TOKEN_H_
#define CUSTOS_TESTS_SUPPORT_TEST_TOKEN_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace custos::testing {

inline constexpr char kSoftHsmModule[] = "/usr/lib/softhsm/libsofthsm2.so";

class TestToken {
 public:
  static absl::StatusOr<std::unique_ptr<TestToken>> Create(
      const std::string& label = "custos-test");
  ~TestToken();

  const std::string& dir() const { return dir_; }
  const std::string& label() const { return label_; }
  const std::string& pin_file() const { return pin_file_; }
  const std::string& user_pin() const { return user_pin_; }
  const std::string& conf_path() const { return conf_path_; }

 private:
  TestToken() = default;
  std::string dir_, label_, pin_file_, user_pin_, conf_path_;
};

// Creates a temporary directory under $TMPDIR (or /tmp); never empty on OK.
absl::StatusOr<std::string> MakeTempDir(const std::string& prefix);
// Writes `contents` to `path` with `mode`, atomically (write + rename).
absl::Status WriteFileAtomically(const std::string& path,
                                 const std::string& contents, int mode = 0600);
// Runs a shell command, returning its exit code and combined output.
struct CommandResult {
  int exit_code;
  std::string output;
};
CommandResult RunCommand(const std::string& command);

}  // namespace custos::testing

#endif  // CUSTOS_TESTS_SUPPORT_TEST_TOKEN_H_
