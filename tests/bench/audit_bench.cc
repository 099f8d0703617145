// What durable audit costs: GenerateDataKey through the real core (SoftHSM2
// token, SQLite, policy check, audit log) with the audit log syncing every
// batch (group commit + fdatasync) versus writing without fsync, at 1, 16
// and 64 concurrent callers. Threads stand in for clients: this isolates the
// audit's cost from gRPC's (custos-bench measures the whole server).
//
//   audit_bench [--seconds S]      (default 5 per configuration)
//
// Prints one table; never fails on a number.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "hsm/hsm.h"
#include "hsm/module.h"
#include "kms/audit/audit_log.h"
#include "kms/authorizer.h"
#include "kms/key_registry.h"
#include "kms/key_service.h"
#include "kms/store/store.h"
#include "tests/support/test_token.h"

namespace {

using namespace custos;  // NOLINT: a benchmark's main

struct Result {
  double calls_per_second;
  double p50_us, p99_us;
  double records_per_sync;
  uint64_t errors;
};

Result Run(hsm::Hsm* hsm, const std::string& dir, bool sync, int threads,
           double seconds) {
  std::filesystem::create_directories(dir);
  auto store =
      kms::OpenStore("sqlite://" + dir + "/custos.db", kms::OpenMode::kCreate);
  auto registry = kms::KeyRegistry::Load(store->get());
  kms::FileAuditLog::Options audit_options;
  audit_options.dir = dir + "/audit";
  audit_options.node_id = "bench";
  audit_options.sync = sync;
  auto audit = kms::FileAuditLog::Open(audit_options);
  kms::Authorizer authorizer(kms::Roles{{"admin"}, {}});
  kms::KeyService service(kms::KeyService::Options(), hsm, registry->get(),
                          audit->get(), &authorizer);
  kms::CreateKeyParams create;
  kms::PolicyBinding binding;
  binding.principals = {"svc"};
  binding.operations = {kms::KeyOperation::kGenerateDataKey};
  create.policy.bindings.push_back(binding);
  auto key = service.CreateKey(kms::Caller{"admin", "", ""}, create);
  const std::string key_id = (*key)->id;
  const auto before = (*audit)->stats();

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> errors{0};
  std::vector<std::vector<double>> latencies(threads);
  std::vector<std::thread> workers;
  const auto start = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      kms::Caller caller{"svc", "", ""};
      kms::DataKeyParams params;
      params.key = key_id;
      params.context = {{"tenant", "bench"}};
      while (!stop) {
        auto t0 = std::chrono::steady_clock::now();
        auto r = service.GenerateDataKey(caller, params);
        auto t1 = std::chrono::steady_clock::now();
        if (!r.ok()) ++errors;
        latencies[t].push_back(
            std::chrono::duration<double, std::micro>(t1 - t0).count());
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& w : workers) w.join();
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  std::vector<double> all;
  for (auto& l : latencies) all.insert(all.end(), l.begin(), l.end());
  std::sort(all.begin(), all.end());
  const auto after = (*audit)->stats();
  Result r;
  r.calls_per_second = all.size() / elapsed;
  r.p50_us = all.empty() ? 0 : all[all.size() / 2];
  r.p99_us = all.empty() ? 0 : all[all.size() * 99 / 100];
  const uint64_t batches = after.batches - before.batches;
  r.records_per_sync =
      batches ? double(after.records - before.records) / batches : 0;
  r.errors = errors;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 5;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--seconds") == 0)
      seconds = std::atof(argv[i + 1]);
  }
  auto token = custos::testing::TestToken::Create("audit-bench");
  if (!token.ok()) {
    std::fprintf(stderr, "token: %s\n", token.status().ToString().c_str());
    return 1;
  }
  auto module = custos::hsm::Module::Load(custos::testing::kSoftHsmModule);
  custos::hsm::Hsm::Options options;
  options.token_label = (*token)->label();
  options.pin_file = (*token)->pin_file();
  options.pool.size = 2;
  auto hsm = custos::hsm::Hsm::Open(**module, options);
  if (!hsm.ok()) return 1;
  std::printf(
      "GenerateDataKey through the core, %.0f s per row (SoftHSM2, "
      "SQLite, policy, audit)\n",
      seconds);
  std::printf("%-7s %-8s %10s %9s %9s %12s %7s\n", "callers", "audit",
              "calls/s", "p50 us", "p99 us", "records/sync", "errors");
  for (int threads : {1, 16, 64}) {
    double with_sync = 0;
    for (bool sync : {false, true}) {
      std::string dir = absl::StrCat((*token)->dir(), "/run-", threads, "-",
                                     sync ? "sync" : "nosync");
      Result r = Run(hsm->get(), dir, sync, threads, seconds);
      std::printf(
          "%-7d %-8s %10.0f %9.0f %9.0f %12s %7llu", threads,
          sync ? "fsync" : "no-fsync", r.calls_per_second, r.p50_us, r.p99_us,
          sync ? absl::StrCat(static_cast<int>(r.records_per_sync * 10) / 10.0)
                     .c_str()
               : "-",
          static_cast<unsigned long long>(r.errors));
      if (sync) {
        std::printf("   durable/no-fsync = %.2f\n",
                    with_sync > 0 ? r.calls_per_second / with_sync : 0);
      } else {
        with_sync = r.calls_per_second;
        std::printf("\n");
      }
    }
  }
  return 0;
}
