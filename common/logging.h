// The one way Custos includes spdlog: structured one-line events, no secrets.
// Debian 12's abseil has its own string_view type, which fmt cannot format
// on its own; this header teaches it.
#ifndef CUSTOS_COMMON_LOGGING_H_
#define CUSTOS_COMMON_LOGGING_H_

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "absl/strings/string_view.h"

template <>
struct fmt::formatter<absl::string_view> : fmt::formatter<fmt::string_view> {
  template <typename FormatContext>
  auto format(absl::string_view s, FormatContext& ctx) const {
    return fmt::formatter<fmt::string_view>::format(
        fmt::string_view(s.data(), s.size()), ctx);
  }
};

#endif  // CUSTOS_COMMON_LOGGING_H_
