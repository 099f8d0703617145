// OpenStore: picks the Store implementation by the URL's scheme.
#include <algorithm>
#include <memory>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kms/store/postgres_store.h"
#include "kms/store/sqlite_store.h"
#include "kms/store/store.h"

namespace custos::kms {

std::string RedactStorageUrl(absl::string_view url) {
  std::string out(url);
  // scheme://user:password@host... -> scheme://user:***@host... The
  // userinfo ends at the last '@' (a password may hold an unescaped '@',
  // '/' or '?'); erring toward hiding more is fine in a log line.
  if (const size_t scheme = out.find("://"); scheme != std::string::npos) {
    const size_t start = scheme + 3;
    const size_t at = out.rfind('@');
    const size_t colon = out.find(':', start);
    if (at != std::string::npos && at > start && colon != std::string::npos &&
        colon < at) {
      out.replace(colon + 1, at - colon - 1, "***");
    }
  }
  // password=VALUE wherever it stands: a URL query parameter (also
  // sslpassword=), or a key=value connection string, quoted or not.
  const auto is_blank = [](char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
  };
  size_t from = 0;
  for (;;) {
    const std::string lower = absl::AsciiStrToLower(out);
    const size_t name = lower.find("password", from);
    if (name == std::string::npos) break;
    size_t i = name + 8;
    while (i < out.size() && is_blank(out[i])) ++i;
    if (i >= out.size() || out[i] != '=') {
      from = name + 8;
      continue;
    }
    ++i;
    while (i < out.size() && is_blank(out[i])) ++i;
    size_t end = i;
    if (end < out.size() && out[end] == '\'') {
      for (++end; end < out.size() && out[end] != '\''; ++end) {
        if (out[end] == '\\') ++end;
      }
      if (end < out.size()) ++end;  // the closing quote
    } else {
      while (end < out.size() && out[end] != '&' && !is_blank(out[end])) ++end;
    }
    end = std::min(end, out.size());
    out.replace(i, end - i, "***");
    from = i + 3;
  }
  return out;
}

absl::Status NotInitialisedError(absl::string_view what) {
  return absl::FailedPreconditionError(absl::StrCat(
      "storage: ", what,
      ". custosd never creates a database by itself: a database moved "
      "away, a typo in `storage` or an unmounted volume must not look like "
      "a new, empty one. Check `storage` (and restore the database if it "
      "was lost); to set up a NEW deployment run: custosd --config FILE "
      "--init"));
}

absl::StatusOr<std::unique_ptr<Store>> OpenStore(const std::string& url,
                                                 OpenMode mode) {
  constexpr absl::string_view kSqlite = "sqlite:";
  if (absl::StartsWith(url, kSqlite)) {
    std::string path = url.substr(kSqlite.size());
    if (absl::StartsWith(path, "//")) path = path.substr(2);  // sqlite:///abs
    if (path.empty()) {
      return absl::InvalidArgumentError(
          "storage: sqlite URL has no path; use sqlite:///var/lib/custos/"
          "custos.db");
    }
    CUSTOS_ASSIGN_OR_RETURN(std::unique_ptr<SqliteStore> store,
                            SqliteStore::Open(path, mode));
    return std::unique_ptr<Store>(std::move(store));
  }
  if (absl::StartsWith(url, "postgresql://") ||
      absl::StartsWith(url, "postgres://")) {
    CUSTOS_ASSIGN_OR_RETURN(std::unique_ptr<PostgresStore> store,
                            PostgresStore::Open(url, mode));
    return std::unique_ptr<Store>(std::move(store));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("storage: unsupported URL '", RedactStorageUrl(url),
                   "'; use sqlite:///path/to/custos.db or "
                   "postgresql://user@host:5432/dbname"));
}

}  // namespace custos::kms
