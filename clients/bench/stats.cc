#include "clients/bench/stats.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace custos::bench {
namespace {

double Percentile(const std::vector<uint32_t>& sorted, double p) {
  if (sorted.empty()) return 0;
  // Nearest rank: the smallest value with at least p of the calls at or
  // below it.
  size_t rank = static_cast<size_t>(std::ceil(p * sorted.size()));
  rank = std::clamp<size_t>(rank, 1, sorted.size());
  return sorted[rank - 1] / 1000.0;
}

nlohmann::json SummaryJson(const Summary& s) {
  nlohmann::json j;
  j["ok"] = s.ok;
  j["failed"] = s.failed;
  j["calls_per_second"] = s.calls_per_second;
  j["items_per_second"] = s.items_per_second;
  j["latency_ms"] = {{"mean", s.mean_ms},  {"p50", s.p50_ms},
                     {"p90", s.p90_ms},    {"p99", s.p99_ms},
                     {"p99.9", s.p999_ms}, {"max", s.max_ms}};
  j["errors"] = s.errors;
  return j;
}

std::string Row(const std::string& name, const Summary& s) {
  std::string errors;
  for (const auto& [code, n] : s.errors) {
    absl::StrAppend(&errors, errors.empty() ? "" : " ", code, "=", n);
  }
  return absl::StrFormat("%-36s %10.0f %8.2f %8.2f %8.2f %8.2f %8.2f  %s\n",
                         name, s.calls_per_second, s.p50_ms, s.p90_ms, s.p99_ms,
                         s.p999_ms, s.max_ms, errors.empty() ? "-" : errors);
}

}  // namespace

void Recorder::Merge(const Recorder& other) {
  ok_latency_us.insert(ok_latency_us.end(), other.ok_latency_us.begin(),
                       other.ok_latency_us.end());
  items += other.items;
  for (const auto& [code, n] : other.errors) errors[code] += n;
}

Summary Summarize(Recorder& recorder, double seconds) {
  Summary s;
  std::vector<uint32_t>& lat = recorder.ok_latency_us;
  std::sort(lat.begin(), lat.end());
  s.ok = lat.size();
  for (const auto& [code, n] : recorder.errors) s.failed += n;
  s.errors = recorder.errors;
  if (seconds > 0) {
    s.calls_per_second = s.ok / seconds;
    s.items_per_second = recorder.items / seconds;
  }
  if (!lat.empty()) {
    const double sum = std::accumulate(lat.begin(), lat.end(), 0.0);
    s.mean_ms = sum / lat.size() / 1000.0;
    s.p50_ms = Percentile(lat, 0.50);
    s.p90_ms = Percentile(lat, 0.90);
    s.p99_ms = Percentile(lat, 0.99);
    s.p999_ms = Percentile(lat, 0.999);
    s.max_ms = lat.back() / 1000.0;
  }
  return s;
}

nlohmann::json ToJson(const RunResult& r) {
  nlohmann::json j;
  j["target"] = r.target;
  j["mix"] = r.mix;
  j["concurrency"] = r.concurrency;
  j["channels"] = r.channels;
  j["seconds"] = r.seconds;
  j["client_cpu_seconds"] = r.client_cpu_seconds;
  j["total"] = SummaryJson(r.total);
  nlohmann::json per = nlohmann::json::object();
  for (const auto& [name, s] : r.per_rpc) per[name] = SummaryJson(s);
  j["per_rpc"] = per;
  return j;
}

std::string FormatTable(const RunResult& r) {
  std::string out = absl::StrFormat(
      "target %s, mix %s, %d concurrent calls on %d channels, %.1f s "
      "measured, client CPU %.0f%%\n",
      r.target, r.mix, r.concurrency, r.channels, r.seconds,
      r.seconds > 0 ? 100.0 * r.client_cpu_seconds / r.seconds : 0.0);
  out += absl::StrFormat("%-36s %10s %8s %8s %8s %8s %8s  %s\n", "rpc",
                         "calls/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
                         "max ms", "errors");
  for (const auto& [name, s] : r.per_rpc) out += Row(name, s);
  out += Row("total", r.total);
  if (r.total.items_per_second > 0 &&
      r.total.items_per_second != r.total.calls_per_second) {
    out += absl::StrFormat("data keys/s: %.0f\n", r.total.items_per_second);
  }
  return out;
}

}  // namespace custos::bench
