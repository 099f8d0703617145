// LoadGenerator: a closed-loop load generator over gRPC's callback API.
// `concurrency` calls are always in flight (each completion starts the next
// call from the completion callback; no thread per call), spread over
// `channels` connections. Each call picks its RPC from a weighted mix. After
// a warm-up whose results are discarded, it measures for a fixed duration
// and reports calls/s, latency percentiles and errors by status code, in
// total and per RPC.
//
// Thread-safe in the sense that Run() is called once, from one thread;
// completions run on gRPC's threads and touch only their own slot.
#ifndef CUSTOS_CLIENTS_BENCH_LOAD_GENERATOR_H_
#define CUSTOS_CLIENTS_BENCH_LOAD_GENERATOR_H_

#include <grpcpp/grpcpp.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "clients/bench/stats.h"

namespace custos::bench {

// The RPCs the generator can drive.
enum class Op {
  kGenerateDataKey,
  kGenerateDataKeyWithoutPlaintext,
  kGenerateDataKeys,
  kEncrypt,
  kDecrypt,
  kReEncrypt,
  kEcho,
};
inline constexpr Op kAllOps[] = {Op::kGenerateDataKey,
                                 Op::kGenerateDataKeyWithoutPlaintext,
                                 Op::kGenerateDataKeys,
                                 Op::kEncrypt,
                                 Op::kDecrypt,
                                 Op::kReEncrypt,
                                 Op::kEcho};
// Command-line names: generate-data-key, generate-data-key-without-plaintext,
// generate-data-keys, encrypt, decrypt, re-encrypt, echo.
const char* OpName(Op op);
absl::StatusOr<Op> ParseOp(absl::string_view name);

// A weighted mix, e.g. "generate-data-key=80,decrypt=15,encrypt=5", or one
// RPC name (weight 1).
using Mix = std::vector<std::pair<Op, int>>;
absl::StatusOr<Mix> ParseMix(absl::string_view text);

struct LoadOptions {
  std::string address;  // host:port
  std::string ca_file, cert_file, key_file;
  std::string key;  // key id or alias for Custos RPCs
  Mix mix;
  int concurrency = 16;
  int channels = 4;  // capped at concurrency
  absl::Duration warmup = absl::Seconds(2);
  absl::Duration duration = absl::Seconds(10);
  int context_pairs = 2;     // encryption context entries per call
  int batch_size = 100;      // data keys per GenerateDataKeys call
  int payload_bytes = 32;    // Encrypt plaintext and Echo payload
  int prepared_blobs = 256;  // blobs made before the run for (Re)Decrypt
  absl::Duration call_timeout = absl::Seconds(30);
};

// Runs the load described by `options` against a Custos server or a
// custos-bench baseline server and returns what it measured.
absl::StatusOr<RunResult> RunLoad(const LoadOptions& options);

}  // namespace custos::bench

#endif  // CUSTOS_CLIENTS_BENCH_LOAD_GENERATOR_H_
