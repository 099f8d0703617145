// Offline audit verification speed: VerifyAuditDirectory over a log that
// FileAuditLog wrote (sync off) into a temporary directory — by default
// 1,000,000 typical records (~350 bytes), a signed checkpoint every 1000,
// rolling at 64 MiB. Reports records/s on one core; the goal is at least a
// million. Not run by ctest:
//
//   build/bin/audit_verify_bench [--records=N] [--dir=DIR]
//       --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
//
// --dir=DIR writes the log there and keeps it; if DIR already holds audit
// segments (a copy of a real log, say), they are verified instead, chain
// only.
#include <benchmark/benchmark.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "kms/audit/audit_log.h"
#include "kms/audit/audit_verifier.h"
#include "kms/audit/checkpoint.h"
#include "tests/support/memory_signer.h"
#include "tests/support/test_token.h"

namespace {

using custos::kms::AuditRecord;
using custos::kms::AuditSigner;
using custos::kms::FileAuditLog;

using ::custos::testing::MemorySigner;

uint64_t g_records = 1000000;
std::string g_root;  // removed at the end, unless --dir
std::string g_dir;
bool g_existing = false;  // --dir already held a log
std::unique_ptr<MemorySigner> g_signer;

// A typical record (~350 bytes with its chain fields): a data key
// generated for a service, every other one with an encryption context.
AuditRecord TypicalRecord(uint64_t i) {
  AuditRecord r;
  r.time = absl::FromUnixMicros(1700000000000000 + i * 137);
  r.principal = "spiffe://acme.org/billing";
  r.operation = "GenerateDataKey";
  r.key_id = "k-4f9c2a7e1b3d5f8a0c6e2b4d9f";
  r.key_version = 3;
  if (i % 2 == 0) r.context = {{"tenant", absl::StrCat("acme-", i % 977)}};
  r.request_id = absl::StrCat("req-", i);
  r.peer = "ipv4:10.12.34.56:51234";
  return r;
}

void WriteLog() {
  if (!g_dir.empty()) {
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(g_dir, ec)) {
      const std::string name = e.path().filename().string();
      if (name.rfind("audit-", 0) == 0 && e.path().extension() == ".jsonl") {
        g_existing = true;
      }
    }
    if (g_existing) return;
  } else {
    absl::StatusOr<std::string> root =
        custos::testing::MakeTempDir("custos-audit-bench");
    if (!root.ok()) {
      std::fprintf(stderr, "%s\n", root.status().ToString().c_str());
      std::exit(1);
    }
    g_root = *root;
    g_dir = g_root + "/audit";
  }
  g_signer = std::make_unique<MemorySigner>();
  FileAuditLog::Options options;
  options.dir = g_dir;
  options.node_id = "node-1";
  options.sync = false;
  options.signer = g_signer.get();
  options.checkpoint_every = 1000;
  auto log = FileAuditLog::Open(options);
  if (!log.ok()) {
    std::fprintf(stderr, "%s\n", log.status().ToString().c_str());
    std::exit(1);
  }
  constexpr int kThreads = 32;
  std::atomic<uint64_t> next{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (uint64_t i; (i = next.fetch_add(1)) < g_records;) {
        if (!(*log)->Append(TypicalRecord(i)).ok()) std::abort();
      }
    });
  }
  for (auto& th : threads) th.join();
  log->reset();  // writes the final checkpoint
  std::fprintf(stderr, "wrote %llu records into %s\n",
               static_cast<unsigned long long>(g_records), g_dir.c_str());
}

uint64_t DirBytes() {
  uint64_t bytes = 0;
  for (const auto& e : std::filesystem::directory_iterator(g_dir)) {
    if (e.path().extension() == ".jsonl") bytes += e.file_size();
  }
  return bytes;
}

void Verify(benchmark::State& state, bool with_key) {
  std::vector<std::string> keys;
  if (with_key && g_existing) {
    state.SkipWithError("--dir holds an existing log: no key for it");
    return;
  }
  if (with_key) keys.push_back(g_signer->public_key_pem());
  uint64_t records = 0, last = 0;
  for (auto _ : state) {
    auto report = custos::kms::VerifyAuditDirectory(g_dir, keys);
    if (!report.ok() || !report->ok) {
      state.SkipWithError(report.ok() ? report->first_break.c_str()
                                      : "verify failed");
      return;
    }
    records += report->records;
    last = report->records;
  }
  state.counters["records/s"] = benchmark::Counter(static_cast<double>(records),
                                                   benchmark::Counter::kIsRate);
  state.counters["records"] = static_cast<double>(last);
  state.counters["bytes/record"] =
      static_cast<double>(DirBytes()) / static_cast<double>(last);
}

void BM_VerifyWithSignatures(benchmark::State& state) { Verify(state, true); }
void BM_VerifyChainOnly(benchmark::State& state) { Verify(state, false); }
BENCHMARK(BM_VerifyWithSignatures)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_VerifyChainOnly)->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (absl::ConsumePrefix(&arg, "--dir=")) {
      g_dir = std::string(arg);
    } else if (absl::ConsumePrefix(&arg, "--records=")) {
      if (!absl::SimpleAtoi(arg, &g_records) || g_records == 0) {
        std::fprintf(stderr, "--records: a positive number\n");
        return 2;
      }
    } else {
      args.push_back(argv[i]);
    }
  }
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 2;
  WriteLog();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (!g_root.empty()) std::filesystem::remove_all(g_root);
  return 0;
}
