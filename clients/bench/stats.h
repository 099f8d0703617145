// What one load run measured, and its two renderings: a human table and
// JSON. Latencies are kept exactly (one entry per call, microseconds), so
// percentiles are exact, not bucketed. Not thread-safe: one recorder per
// load slot, merged after the run.
#ifndef CUSTOS_CLIENTS_BENCH_STATS_H_
#define CUSTOS_CLIENTS_BENCH_STATS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"

namespace custos::bench {

// Raw observations of one RPC (or of all of them).
struct Recorder {
  std::vector<uint32_t> ok_latency_us;     // successful calls only
  uint64_t items = 0;                      // data keys returned (batches count)
  std::map<std::string, uint64_t> errors;  // status code name -> calls
  void Merge(const Recorder& other);
};

struct Summary {
  uint64_t ok = 0;
  uint64_t failed = 0;
  double calls_per_second = 0;  // successful calls / measured seconds
  double items_per_second = 0;  // data keys / measured seconds
  double mean_ms = 0, p50_ms = 0, p90_ms = 0, p99_ms = 0, p999_ms = 0,
         max_ms = 0;
  std::map<std::string, uint64_t> errors;
};

// Sorts `recorder`'s latencies in place.
Summary Summarize(Recorder& recorder, double seconds);

struct RunResult {
  std::string target;
  std::string mix;
  int concurrency = 0;
  int channels = 0;
  double seconds = 0;  // measured window
  double client_cpu_seconds = 0;
  Summary total;
  std::map<std::string, Summary> per_rpc;  // only when the mix has several
};

nlohmann::json ToJson(const RunResult& result);
// A few aligned lines for a terminal.
std::string FormatTable(const RunResult& result);

}  // namespace custos::bench

#endif  // CUSTOS_CLIENTS_BENCH_STATS_H_
