// Fuzzes custosd's configuration parser (kms/server/config.h), with the input
// as the YAML text. Checks that:
//  - ParseConfig never throws (yaml-cpp throws; nothing may escape) and
//    refuses with INVALID_ARGUMENT and a "config: " message;
//  - a configuration it accepts has every field in the range the parser
//    promises (required fields present, sizes, counts and durations in
//    range — durations finite, from a millisecond to a year —, node_id's
//    alphabet, a known log level);
//  - relative paths are resolved against the base directory and nothing
//    else depends on it: parsing with no base directory gives the same
//    configuration with the paths as written;
//  - LoadConfig on a file holding the input gives what ParseConfig gives
//    with the file's directory as the base;
//  - every accepted role entry is a typed, unreserved principal or pattern,
//    and the development principal is typed, unreserved and no admin;
//  - what the shipped build accepts the test build (allow_testing) accepts
//    too, and the test build's configurations are in range as well.
// Seeds: the configuration scripts/dev-env writes, the one the e2e tests
// write, and variations.
#include <fcntl.h>
#include <stdlib.h>  // mkdtemp
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "kms/policy.h"
#include "kms/principal.h"
#include "kms/server/config.h"
#include "tests/fuzz/fuzz_check.h"

namespace custos::server {
namespace {

constexpr char kBase[] = "/etc/custos";

// One temporary file per process for LoadConfig, removed at exit.
const std::string& ConfigPath() {
  static const std::string* const path = [] {
    const char* tmp = getenv("TMPDIR");
    std::string dir =
        std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") +
        "/custos-config-fuzz-XXXXXX";
    CUSTOS_FUZZ_CHECK(mkdtemp(dir.data()) != nullptr, "mkdtemp");
    auto* p = new std::string(dir + "/custos.yaml");
    std::atexit([] {
      (void)unlink(ConfigPath().c_str());
      const std::string& file = ConfigPath();
      (void)rmdir(file.substr(0, file.rfind('/')).c_str());
    });
    return p;
  }();
  return *path;
}

void WriteFile(const std::string& path, absl::string_view bytes) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  CUSTOS_FUZZ_CHECK(fd >= 0, "cannot create the config file");
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
    CUSTOS_FUZZ_CHECK(n > 0, "cannot write the config file");
    done += static_cast<size_t>(n);
  }
  close(fd);
}

std::string Resolved(const std::string& path, const std::string& base) {
  if (path.empty() || path[0] == '/' || base.empty()) return path;
  return base + "/" + path;
}

bool SameExceptPaths(const Config& a, const Config& b) {
  return a.node_id == b.node_id && a.listen == b.listen &&
         a.hsm.module == b.hsm.module &&
         a.hsm.token_label == b.hsm.token_label &&
         a.hsm.pool_size == b.hsm.pool_size &&
         a.hsm.call_timeout == b.hsm.call_timeout &&
         a.hsm.lease_timeout == b.hsm.lease_timeout && a.storage == b.storage &&
         a.audit_checkpoint_every == b.audit_checkpoint_every &&
         a.audit_max_segment_bytes == b.audit_max_segment_bytes &&
         a.audit_max_segment_age == b.audit_max_segment_age &&
         a.audit_checkpoint_interval == b.audit_checkpoint_interval &&
         a.admins == b.admins && a.auditors == b.auditors &&
         a.limits.max_message_bytes == b.limits.max_message_bytes &&
         a.limits.max_concurrent_streams == b.limits.max_concurrent_streams &&
         a.encryption_limit == b.encryption_limit &&
         a.maintenance_interval == b.maintenance_interval &&
         a.log_level == b.log_level &&
         a.development.insecure_listen == b.development.insecure_listen &&
         a.development.insecure_principal == b.development.insecure_principal &&
         a.testing.deletion_day == b.testing.deletion_day &&
         a.testing.min_rotation_period == b.testing.min_rotation_period;
}

void CheckRanges(const Config& c) {
  CUSTOS_FUZZ_CHECK(!c.listen.empty(), "listen is required");
  CUSTOS_FUZZ_CHECK(
      !c.tls.cert.empty() && !c.tls.key.empty() && !c.tls.client_ca.empty(),
      "tls.* are required");
  CUSTOS_FUZZ_CHECK(!c.hsm.module.empty() && !c.hsm.token_label.empty() &&
                        !c.hsm.pin_file.empty(),
                    "hsm.* are required");
  CUSTOS_FUZZ_CHECK(c.hsm.pool_size >= 1 && c.hsm.pool_size <= 64,
                    "hsm.pool_size");
  CUSTOS_FUZZ_CHECK(c.hsm.call_timeout > absl::ZeroDuration() &&
                        c.hsm.lease_timeout > absl::ZeroDuration(),
                    "HSM timeouts must be positive");
  CUSTOS_FUZZ_CHECK(!c.storage.empty() && !c.audit_dir.empty(),
                    "storage and audit_dir are required");
  CUSTOS_FUZZ_CHECK(c.audit_max_segment_bytes >= 4096 &&
                        c.audit_max_segment_age > absl::ZeroDuration(),
                    "audit segment limits");
  CUSTOS_FUZZ_CHECK(c.audit_checkpoint_every >= 1 &&
                        c.audit_checkpoint_interval > absl::ZeroDuration(),
                    "audit checkpoint limits");
  CUSTOS_FUZZ_CHECK(!c.admins.empty(), "at least one admin");
  CUSTOS_FUZZ_CHECK(!c.node_id.empty() && c.node_id.size() <= 64,
                    "node_id size");
  for (const char ch : c.node_id) {
    const bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                    (ch >= '0' && ch <= '9') || ch == '-' || ch == '_' ||
                    ch == '.';
    CUSTOS_FUZZ_CHECK(ok, "node_id alphabet");
  }
  CUSTOS_FUZZ_CHECK(c.limits.max_message_bytes >= 5120 &&
                        c.limits.max_message_bytes <= 16 * 1024 * 1024,
                    "limits.max_message_bytes");
  CUSTOS_FUZZ_CHECK(c.limits.max_concurrent_streams >= 1,
                    "limits.max_concurrent_streams");
  CUSTOS_FUZZ_CHECK(c.encryption_limit >= 1, "encryption_limit");
  CUSTOS_FUZZ_CHECK(c.maintenance_interval > absl::ZeroDuration(),
                    "maintenance_interval");
  CUSTOS_FUZZ_CHECK(c.development.insecure_listen.empty() ||
                        !c.development.insecure_principal.empty(),
                    "insecure_listen without insecure_principal");
  CUSTOS_FUZZ_CHECK(c.testing.deletion_day > absl::ZeroDuration() &&
                        c.testing.min_rotation_period > absl::ZeroDuration(),
                    "testing durations");
  // Every duration finite and from a millisecond to a year: .nan, .inf or
  // 1e300 seconds would be infinite and pass any "positive" check.
  for (const absl::Duration d :
       {c.hsm.call_timeout, c.hsm.lease_timeout, c.audit_max_segment_age,
        c.audit_checkpoint_interval, c.maintenance_interval,
        c.testing.deletion_day, c.testing.min_rotation_period}) {
    CUSTOS_FUZZ_CHECK(d >= absl::Milliseconds(1) && d <= absl::Hours(24 * 365),
                      "a duration is infinite or out of range");
  }
  for (const std::vector<std::string>* role : {&c.admins, &c.auditors}) {
    for (const std::string& entry : *role) {
      CUSTOS_FUZZ_CHECK(
          kms::ValidateConfiguredPrincipal(entry, "role", true).ok(),
          "a role entry is untyped or reserved");
    }
  }
  if (!c.development.insecure_listen.empty()) {
    const std::string& dev = c.development.insecure_principal;
    CUSTOS_FUZZ_CHECK(kms::ValidateConfiguredPrincipal(dev, "dev", false).ok(),
                      "the development principal is untyped or reserved");
    for (const std::string& admin : c.admins) {
      CUSTOS_FUZZ_CHECK(!kms::GlobMatch(admin, dev),
                        "the development principal is an admin");
    }
  }
  static const std::set<std::string>* const kLevels = new std::set<std::string>{
      "trace", "debug", "info", "warn", "error", "critical"};
  CUSTOS_FUZZ_CHECK(kLevels->count(c.log_level) == 1, "log_level");
}

void CheckError(const absl::Status& status) {
  CUSTOS_FUZZ_CHECK(status.code() == absl::StatusCode::kInvalidArgument,
                    "config errors are INVALID_ARGUMENT");
  CUSTOS_FUZZ_CHECK(absl::StartsWith(status.message(), "config: "),
                    "config error wording");
}

void FuzzOne(absl::string_view input) {
  const std::string yaml(input);
  const absl::StatusOr<Config> based = ParseConfig(yaml, kBase);
  const absl::StatusOr<Config> unbased = ParseConfig(yaml, "");
  const absl::StatusOr<Config> test_build =
      ParseConfig(yaml, kBase, ParseOptions{.allow_testing = true});
  CUSTOS_FUZZ_CHECK(!based.ok() || test_build.ok(),
                    "the test build refused what the shipped build accepts");
  if (test_build.ok()) {
    CheckRanges(*test_build);
  } else {
    CheckError(test_build.status());
  }
  CUSTOS_FUZZ_CHECK(based.ok() == unbased.ok(),
                    "the base directory changed whether the config parses");
  if (!based.ok()) {
    CheckError(based.status());
    CUSTOS_FUZZ_CHECK(based.status() == unbased.status(),
                      "the base directory changed the error");
  } else {
    CheckRanges(*based);
    CheckRanges(*unbased);
    CUSTOS_FUZZ_CHECK(SameExceptPaths(*based, *unbased),
                      "the base directory changed a field that is no path");
    const Config& u = *unbased;
    const Config& b = *based;
    CUSTOS_FUZZ_CHECK(b.tls.cert == Resolved(u.tls.cert, kBase) &&
                          b.tls.key == Resolved(u.tls.key, kBase) &&
                          b.tls.client_ca == Resolved(u.tls.client_ca, kBase) &&
                          b.hsm.pin_file == Resolved(u.hsm.pin_file, kBase) &&
                          b.audit_dir == Resolved(u.audit_dir, kBase),
                      "paths are not resolved against the base directory");
    for (const std::string* path : {&b.tls.cert, &b.tls.key, &b.tls.client_ca,
                                    &b.hsm.pin_file, &b.audit_dir}) {
      CUSTOS_FUZZ_CHECK(absl::StartsWith(*path, "/"),
                        "a resolved path is not absolute");
    }
  }

  // LoadConfig = read the file + ParseConfig with the file's directory.
  WriteFile(ConfigPath(), input);
  const absl::StatusOr<Config> loaded = LoadConfig(ConfigPath());
  CUSTOS_FUZZ_CHECK(loaded.ok() == unbased.ok(),
                    "LoadConfig and ParseConfig disagree");
  if (!loaded.ok()) {
    CUSTOS_FUZZ_CHECK(loaded.status() == unbased.status(),
                      "LoadConfig gives another error");
    return;
  }
  const std::string dir = ConfigPath().substr(0, ConfigPath().rfind('/'));
  const Config& u = *unbased;
  const Config& l = *loaded;
  CUSTOS_FUZZ_CHECK(SameExceptPaths(l, u) &&
                        l.tls.cert == Resolved(u.tls.cert, dir) &&
                        l.tls.key == Resolved(u.tls.key, dir) &&
                        l.tls.client_ca == Resolved(u.tls.client_ca, dir) &&
                        l.hsm.pin_file == Resolved(u.hsm.pin_file, dir) &&
                        l.audit_dir == Resolved(u.audit_dir, dir),
                    "LoadConfig gives another configuration");
}

}  // namespace
}  // namespace custos::server

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  custos::server::FuzzOne(
      absl::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}
