// OpenStore: picks the Store implementation by the URL's scheme.
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "kms/store/postgres_store.h"
#include "kms/store/sqlite_store.h"
#include "kms/store/store.h"

namespace custos::kms {

std::string RedactStorageUrl(absl::string_view url) {
  // scheme://user:password@host... -> scheme://user:***@host...
  const size_t scheme = url.find("://");
  if (scheme == absl::string_view::npos) return std::string(url);
  const size_t start = scheme + 3;
  const size_t at = url.find('@', start);
  const size_t slash = url.find('/', start);
  if (at == absl::string_view::npos ||
      (slash != absl::string_view::npos && slash < at)) {
    return std::string(url);
  }
  const size_t colon = url.find(':', start);
  if (colon == absl::string_view::npos || colon > at) return std::string(url);
  return absl::StrCat(url.substr(0, colon + 1), "***", url.substr(at));
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
