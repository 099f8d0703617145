#include "hsm/pin_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace custos::hsm {
namespace {

constexpr size_t kMaxPinSize = 255;

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

}  // namespace

absl::StatusOr<SecretBytes> ReadPinFile(const std::string& path) {
  if (path.empty()) {
    return absl::InvalidArgumentError(
        "pin_file is empty: name a file holding the token's user PIN");
  }
  Fd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    return absl::NotFoundError(absl::StrCat(
        "pin_file '", path, "': cannot open: ", std::strerror(errno)));
  }
  struct stat st;
  if (fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("pin_file '", path, "' is not a regular file"));
  }
  mode_t perm = st.st_mode & 0777;
  if ((perm & 077) != 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "pin_file '%s' has mode %04o: it must be readable by its owner only "
        "(0400 or 0600); run: chmod 0400 %s",
        path, perm, path));
  }
  SecretBytes buf(kMaxPinSize + 2);
  size_t len = 0;
  while (len < buf.size()) {
    ssize_t n = read(fd.get(), buf.data() + len, buf.size() - len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      return absl::InternalError(absl::StrCat(
          "pin_file '", path, "': read failed: ", std::strerror(errno)));
    }
    if (n == 0) break;
    len += static_cast<size_t>(n);
  }
  if (len > 0 && buf.data()[len - 1] == '\n') --len;
  if (len > 0 && buf.data()[len - 1] == '\r') --len;
  if (len == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("pin_file '", path, "' holds an empty PIN"));
  }
  if (len > kMaxPinSize) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pin_file '", path, "' holds more than ", kMaxPinSize, " bytes"));
  }
  buf.Truncate(len);
  return buf;
}

}  // namespace custos::hsm
