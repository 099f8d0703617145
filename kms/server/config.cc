#include "kms/server/config.h"

#include <arpa/inet.h>
#include <yaml-cpp/yaml.h>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kms/policy.h"
#include "kms/principal.h"

namespace custos::server {
namespace {

absl::Status FieldError(absl::string_view field, absl::string_view problem) {
  return absl::InvalidArgumentError(
      absl::StrCat("config: ", field, ": ", problem));
}

// Refuses keys of `node` not in `allowed`.
absl::Status OnlyKnown(const YAML::Node& node, absl::string_view where,
                       const std::set<std::string>& allowed) {
  if (!node.IsMap()) {
    return FieldError(where.empty() ? "(top level)" : where,
                      "must be a mapping");
  }
  std::set<std::string> seen;
  for (const auto& kv : node) {
    std::string key = kv.first.as<std::string>();
    if (!seen.insert(key).second) {
      // yaml-cpp would silently keep the first: an appended override must
      // not be ignored without a word.
      return FieldError(where.empty() ? key : absl::StrCat(where, ".", key),
                        "given twice; keep one");
    }
    if (allowed.count(key) == 0) {
      return FieldError(where.empty() ? key : absl::StrCat(where, ".", key),
                        absl::StrCat("unknown field; known fields are ",
                                     absl::StrJoin(allowed, ", ")));
    }
  }
  return absl::OkStatus();
}

std::string Resolve(const std::string& path, const std::string& base) {
  if (path.empty() || path[0] == '/' || base.empty()) return path;
  return base + "/" + path;
}

template <typename T>
absl::Status Get(const YAML::Node& node, const char* key,
                 absl::string_view field, T* out) {
  const YAML::Node v = node[key];
  if (!v) return absl::OkStatus();
  try {
    *out = v.as<T>();
  } catch (const YAML::Exception&) {
    return FieldError(field, "has the wrong type");
  }
  return absl::OkStatus();
}

// The range of every duration: from a millisecond to a year. yaml-cpp reads
// .nan, .inf and 1e300 as doubles, and absl::Seconds() makes each of them an
// infinite duration that passes a "positive" check (maintenance that never
// runs, checkpoints never written); below a millisecond no interval makes
// sense (and below a quarter nanosecond it is zero).
constexpr int64_t kMaxSeconds = int64_t{365} * 24 * 3600;
constexpr int64_t kMaxMilliseconds = kMaxSeconds * 1000;

// A number of seconds from 0.001 to kMaxSeconds, left as is if absent.
absl::Status GetSeconds(const YAML::Node& node, const char* key,
                        absl::string_view field, absl::Duration* out) {
  const YAML::Node v = node[key];
  if (!v) return absl::OkStatus();
  double seconds = 0;
  bool read = true;
  try {
    seconds = v.as<double>();
  } catch (const YAML::Exception&) {
    read = false;
  }
  if (!read || !std::isfinite(seconds) || seconds < 0.001 ||
      seconds > static_cast<double>(kMaxSeconds)) {
    return FieldError(field,
                      absl::StrCat("must be a number of seconds from 0.001 to ",
                                   kMaxSeconds, " (a year)"));
  }
  *out = absl::Seconds(seconds);
  return absl::OkStatus();
}

// A whole number in [min, max], left as is if absent. (yaml-cpp refuses
// .nan, fractions and a '-' for an unsigned type.)
template <typename T>
absl::Status GetWhole(const YAML::Node& node, const char* key,
                      absl::string_view field, T min, T max,
                      absl::string_view unit, T* out) {
  const YAML::Node v = node[key];
  if (!v) return absl::OkStatus();
  T value{};
  bool read = true;
  try {
    value = v.as<T>();
  } catch (const YAML::Exception&) {
    read = false;
  }
  if (!read || value < min || value > max) {
    return FieldError(field, max == std::numeric_limits<T>::max()
                                 ? absl::StrCat("must be a whole number", unit,
                                                " of at least ", min)
                                 : absl::StrCat("must be a whole number", unit,
                                                " from ", min, " to ", max));
  }
  *out = value;
  return absl::OkStatus();
}

// "a.b.c.d:port", port 1-65535: what civetweb (the metrics port) accepts;
// Debian builds it without IPv6, and it resolves no names.
bool ValidIpv4HostPort(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return false;
  const std::string host = address.substr(0, colon);
  const std::string port = address.substr(colon + 1);
  in_addr parsed;
  if (inet_pton(AF_INET, host.c_str(), &parsed) != 1) return false;
  if (port.empty() || port.size() > 5 ||
      port.find_first_not_of("0123456789") != std::string::npos) {
    return false;
  }
  const int number = std::stoi(port);
  return number >= 1 && number <= 65535;
}

#define CUSTOS_CFG(expr)      \
  do {                        \
    absl::Status s_ = (expr); \
    if (!s_.ok()) return s_;  \
  } while (0)

// "host:port" whose host is a loopback address: localhost, 127.0.0.0/8 or
// [::1]. The development listener has no TLS: it must not be reachable
// from another machine.
bool LoopbackHostPort(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return false;
  std::string host = address.substr(0, colon);
  const std::string port = address.substr(colon + 1);
  if (port.empty() || port.size() > 5 ||
      port.find_first_not_of("0123456789") != std::string::npos) {
    return false;
  }
  if (host == "localhost") return true;
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
    in6_addr v6;
    return inet_pton(AF_INET6, host.c_str(), &v6) == 1 &&
           IN6_IS_ADDR_LOOPBACK(&v6);
  }
  in_addr v4;
  return inet_pton(AF_INET, host.c_str(), &v4) == 1 &&
         (ntohl(v4.s_addr) >> 24) == 127;
}

// Each role entry: a typed principal or pattern (kms/principal.h).
absl::Status ValidateRole(const std::vector<std::string>& entries,
                          absl::string_view role) {
  for (size_t i = 0; i < entries.size(); ++i) {
    CUSTOS_CFG(kms::ValidateConfiguredPrincipal(
        entries[i], absl::StrCat(role, "[", i, "]"), /*allow_patterns=*/true));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Config> ParseConfig(const std::string& yaml,
                                   const std::string& base_dir,
                                   ParseOptions options) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config: not valid YAML (line ", e.mark.line + 1, "): ", e.msg));
  }
  if (!root || root.IsNull()) {
    return absl::InvalidArgumentError("config: the file is empty");
  }
  Config c;
  try {
    CUSTOS_CFG(OnlyKnown(
        root, "",
        {"node_id", "listen", "metrics_listen", "tls", "hsm", "storage",
         "audit_dir", "audit_checkpoint_every",
         "audit_checkpoint_interval_seconds", "audit_max_segment_bytes",
         "audit_max_segment_age_seconds", "admins", "auditors", "limits",
         "encryption_limit", "maintenance_interval_seconds", "log_level",
         "development", "testing"}));
    CUSTOS_CFG(Get(root, "node_id", "node_id", &c.node_id));
    CUSTOS_CFG(Get(root, "listen", "listen", &c.listen));
    CUSTOS_CFG(
        Get(root, "metrics_listen", "metrics_listen", &c.metrics_listen));
    CUSTOS_CFG(Get(root, "storage", "storage", &c.storage));
    CUSTOS_CFG(Get(root, "audit_dir", "audit_dir", &c.audit_dir));
    constexpr uint64_t kMaxU64 = std::numeric_limits<uint64_t>::max();
    CUSTOS_CFG(GetWhole<uint64_t>(root, "audit_checkpoint_every",
                                  "audit_checkpoint_every", 1, kMaxU64, "",
                                  &c.audit_checkpoint_every));
    CUSTOS_CFG(GetWhole<uint64_t>(root, "audit_max_segment_bytes",
                                  "audit_max_segment_bytes", 4096, kMaxU64,
                                  " of bytes", &c.audit_max_segment_bytes));
    CUSTOS_CFG(GetSeconds(root, "audit_max_segment_age_seconds",
                          "audit_max_segment_age_seconds",
                          &c.audit_max_segment_age));
    CUSTOS_CFG(GetSeconds(root, "audit_checkpoint_interval_seconds",
                          "audit_checkpoint_interval_seconds",
                          &c.audit_checkpoint_interval));
    CUSTOS_CFG(Get(root, "admins", "admins", &c.admins));
    CUSTOS_CFG(Get(root, "auditors", "auditors", &c.auditors));
    CUSTOS_CFG(GetWhole<uint64_t>(root, "encryption_limit", "encryption_limit",
                                  1, kMaxU64, "", &c.encryption_limit));
    CUSTOS_CFG(GetSeconds(root, "maintenance_interval_seconds",
                          "maintenance_interval_seconds",
                          &c.maintenance_interval));
    CUSTOS_CFG(Get(root, "log_level", "log_level", &c.log_level));
    if (YAML::Node tls = root["tls"]) {
      CUSTOS_CFG(OnlyKnown(
          tls, "tls",
          {"cert", "key", "client_ca", "crl_dir", "reload_interval_seconds"}));
      CUSTOS_CFG(Get(tls, "cert", "tls.cert", &c.tls.cert));
      CUSTOS_CFG(Get(tls, "key", "tls.key", &c.tls.key));
      CUSTOS_CFG(Get(tls, "client_ca", "tls.client_ca", &c.tls.client_ca));
      // Rotation and revocation.
      CUSTOS_CFG(Get(tls, "crl_dir", "tls.crl_dir", &c.tls.crl_dir));
      CUSTOS_CFG(GetWhole(tls, "reload_interval_seconds",
                          "tls.reload_interval_seconds", 1, 3600, " of seconds",
                          &c.tls.reload_interval_seconds));
    }
    if (YAML::Node hsm = root["hsm"]) {
      CUSTOS_CFG(OnlyKnown(hsm, "hsm",
                           {"module", "token_label", "pin_file", "pool_size",
                            "call_timeout_ms", "lease_timeout_ms"}));
      CUSTOS_CFG(Get(hsm, "module", "hsm.module", &c.hsm.module));
      CUSTOS_CFG(
          Get(hsm, "token_label", "hsm.token_label", &c.hsm.token_label));
      CUSTOS_CFG(Get(hsm, "pin_file", "hsm.pin_file", &c.hsm.pin_file));
      CUSTOS_CFG(GetWhole(hsm, "pool_size", "hsm.pool_size", 1, 64, "",
                          &c.hsm.pool_size));
      int64_t call_ms = absl::ToInt64Milliseconds(c.hsm.call_timeout);
      int64_t lease_ms = absl::ToInt64Milliseconds(c.hsm.lease_timeout);
      CUSTOS_CFG(GetWhole<int64_t>(hsm, "call_timeout_ms",
                                   "hsm.call_timeout_ms", 1, kMaxMilliseconds,
                                   " of milliseconds", &call_ms));
      CUSTOS_CFG(GetWhole<int64_t>(hsm, "lease_timeout_ms",
                                   "hsm.lease_timeout_ms", 1, kMaxMilliseconds,
                                   " of milliseconds", &lease_ms));
      c.hsm.call_timeout = absl::Milliseconds(call_ms);
      c.hsm.lease_timeout = absl::Milliseconds(lease_ms);
    }
    if (YAML::Node limits = root["limits"]) {
      CUSTOS_CFG(OnlyKnown(
          limits, "limits",
          {"max_message_bytes", "max_concurrent_streams",
           "max_connection_age_seconds", "max_connection_age_grace_seconds",
           "requests_per_second_per_principal", "burst_per_principal"}));
      // A request must hold a 4 KiB plaintext and its framing.
      CUSTOS_CFG(GetWhole(
          limits, "max_message_bytes", "limits.max_message_bytes", 4096 + 1024,
          16 * 1024 * 1024, " of bytes", &c.limits.max_message_bytes));
      CUSTOS_CFG(GetWhole(limits, "max_concurrent_streams",
                          "limits.max_concurrent_streams", 1,
                          std::numeric_limits<int>::max(), "",
                          &c.limits.max_concurrent_streams));
      // Connection age (gRPC takes milliseconds in an int: a day at most).
      for (const auto& [key, out] :
           {std::pair{"max_connection_age_seconds",
                      &c.limits.max_connection_age},
            std::pair{"max_connection_age_grace_seconds",
                      &c.limits.max_connection_age_grace}}) {
        const std::string field = absl::StrCat("limits.", key);
        CUSTOS_CFG(GetSeconds(limits, key, field, out));
        if (*out > absl::Hours(24)) {
          return FieldError(field, "must be at most 86400 (a day)");
        }
      }
      if (YAML::Node rate = limits["requests_per_second_per_principal"]) {
        double value = -1;
        try {
          value = rate.as<double>();
        } catch (const YAML::Exception&) {
        }
        if (!std::isfinite(value) || value < 0 || value > 1e6) {
          return FieldError("limits.requests_per_second_per_principal",
                            "must be a number from 0 (no limit) to 1000000");
        }
        c.limits.requests_per_second_per_principal = value;
      }
      CUSTOS_CFG(GetWhole(limits, "burst_per_principal",
                          "limits.burst_per_principal", 0, 1000000, "",
                          &c.limits.burst_per_principal));
    }
    if (YAML::Node dev = root["development"]) {
      CUSTOS_CFG(OnlyKnown(dev, "development",
                           {"insecure_listen", "insecure_principal"}));
      CUSTOS_CFG(Get(dev, "insecure_listen", "development.insecure_listen",
                     &c.development.insecure_listen));
      CUSTOS_CFG(Get(dev, "insecure_principal",
                     "development.insecure_principal",
                     &c.development.insecure_principal));
    }
    if (YAML::Node testing = root["testing"]) {
      if (!options.allow_testing) {
        return FieldError(
            "testing",
            "accepted only by custosd-test, the build the tests run; remove "
            "the section (this custosd keeps deletion windows and rotation "
            "periods at their real length)");
      }
      CUSTOS_CFG(
          OnlyKnown(testing, "testing",
                    {"deletion_day_seconds", "min_rotation_period_seconds"}));
      CUSTOS_CFG(GetSeconds(testing, "deletion_day_seconds",
                            "testing.deletion_day_seconds",
                            &c.testing.deletion_day));
      CUSTOS_CFG(GetSeconds(testing, "min_rotation_period_seconds",
                            "testing.min_rotation_period_seconds",
                            &c.testing.min_rotation_period));
    }
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: line ", e.mark.line + 1, ": ", e.msg));
  }

  // Required fields and consistency.
  if (c.listen.empty()) {
    return FieldError("listen", "required, e.g. \"0.0.0.0:7443\"");
  }
  for (const auto& [value, name] :
       {std::pair{&c.tls.cert, "tls.cert"}, std::pair{&c.tls.key, "tls.key"},
        std::pair{&c.tls.client_ca, "tls.client_ca"}}) {
    if (value->empty()) {
      return FieldError(name,
                        "required: custosd serves mutual TLS only (tls.cert, "
                        "tls.key and tls.client_ca)");
    }
  }
  if (c.hsm.module.empty()) {
    return FieldError("hsm.module",
                      "required: the path of the HSM's PKCS#11 library");
  }
  if (c.hsm.token_label.empty()) {
    return FieldError("hsm.token_label", "required");
  }
  if (c.hsm.pin_file.empty()) {
    return FieldError("hsm.pin_file",
                      "required: a file (mode 0400) holding the user PIN");
  }
  if (c.storage.empty()) {
    return FieldError("storage",
                      "required, e.g. sqlite:///var/lib/custos/"
                      "custos.db");
  }
  if (c.audit_dir.empty()) return FieldError("audit_dir", "required");
  if (c.admins.empty()) {
    return FieldError("admins",
                      "name at least one admin principal (a client "
                      "certificate's SAN URI, dns:HOST or cn:NAME)");
  }
  CUSTOS_CFG(ValidateRole(c.admins, "admins"));
  CUSTOS_CFG(ValidateRole(c.auditors, "auditors"));
  for (const std::string& node : {c.node_id}) {
    if (node.empty() || node.size() > 64 ||
        node.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTU"
                               "VWXYZ0123456789-_.") != std::string::npos) {
      return FieldError("node_id", "1-64 characters of [A-Za-z0-9._-]");
    }
  }
  // A port alone binds loopback: /metrics has no TLS and no authentication,
  // so reaching it from elsewhere must be asked for by address.
  if (!c.metrics_listen.empty() &&
      c.metrics_listen.find_first_not_of(":0123456789") == std::string::npos &&
      c.metrics_listen.find(':', 1) == std::string::npos) {
    c.metrics_listen = absl::StrCat(
        "127.0.0.1:", c.metrics_listen[0] == ':' ? c.metrics_listen.substr(1)
                                                 : c.metrics_listen);
  }
  if (!c.metrics_listen.empty() && !ValidIpv4HostPort(c.metrics_listen)) {
    return FieldError("metrics_listen",
                      "an IPv4 address and a port from 1 to 65535, e.g. "
                      "\"127.0.0.1:9464\" (no host names, no IPv6); leave it "
                      "out for no metrics");
  }
  if (!c.development.insecure_listen.empty() &&
      c.development.insecure_principal.empty()) {
    return FieldError("development.insecure_principal",
                      "required with development.insecure_listen: the "
                      "identity every plaintext call acts as");
  }
  if (!c.development.insecure_listen.empty()) {
    if (!LoopbackHostPort(c.development.insecure_listen)) {
      return FieldError("development.insecure_listen",
                        "must be a loopback address and port (127.0.0.1:PORT, "
                        "localhost:PORT or [::1]:PORT): the plaintext listener "
                        "authenticates no one");
    }
    CUSTOS_CFG(kms::ValidateConfiguredPrincipal(
        c.development.insecure_principal, "development.insecure_principal",
        /*allow_patterns=*/false));
    for (const std::string& admin : c.admins) {
      if (kms::GlobMatch(admin, c.development.insecure_principal)) {
        return FieldError(
            "development.insecure_principal",
            absl::StrCat("matches the admin entry '", admin.substr(0, 64),
                         "'; the plaintext listener's principal "
                         "must not be an admin"));
      }
    }
  }
  const std::set<std::string> levels = {"trace", "debug", "info",
                                        "warn",  "error", "critical"};
  if (levels.count(c.log_level) == 0) {
    return FieldError("log_level",
                      "one of trace, debug, info, warn, error, "
                      "critical");
  }
  c.tls.cert = Resolve(c.tls.cert, base_dir);
  c.tls.key = Resolve(c.tls.key, base_dir);
  c.tls.client_ca = Resolve(c.tls.client_ca, base_dir);
  c.tls.crl_dir = Resolve(c.tls.crl_dir, base_dir);
  c.hsm.pin_file = Resolve(c.hsm.pin_file, base_dir);
  c.audit_dir = Resolve(c.audit_dir, base_dir);
  return c;
}

absl::StatusOr<Config> LoadConfig(const std::string& path,
                                  ParseOptions options) {
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("config: cannot read '", path, "'"));
  }
  std::stringstream text;
  text << in.rdbuf();
  std::string base;
  if (size_t slash = path.rfind('/'); slash != std::string::npos) {
    base = path.substr(0, slash);
  }
  return ParseConfig(text.str(), base, options);
}

}  // namespace custos::server
