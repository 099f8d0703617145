// Soak: mixed load on a real custosd (80% GenerateDataKey, 15% Decrypt, 5%
// admin calls including rotations) with HSM errors injected on 0.1% of
// encrypt and decrypt calls, for CUSTOS_SOAK_SECONDS (default 120; scripts/
// soak MINUTES runs longer). At the end it checks that nothing was lost:
// every blob issued decrypts to the plaintext recorded for it (by SHA-256),
// no (key, version, IV) repeats, the audit log holds exactly one record per
// call made, the chain verifies, and RSS, open files and HSM sessions stayed
// flat after warm-up.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/sha.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "custos/v1/kms.grpc.pb.h"
#include "kms/ciphertext_blob.h"
#include "tests/support/audit_records.h"
#include "tests/support/custosd_process.h"
#include "tests/support/subprocess.h"

namespace custos {
namespace {

namespace pb = ::custos::v1;
using ::custos::testing::CustosdProcess;
using Clock = std::chrono::steady_clock;

std::string Sha256(const std::string& data) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(),
         digest);
  return std::string(reinterpret_cast<char*>(digest), sizeof(digest));
}

using ::custos::testing::ReadAll;

// One sample of the server's resources.
struct Resources {
  long rss_kib = 0;
  long open_files = 0;
  long hsm_sessions = 0;
};

// A "name N" line of the fault module's stats file.
long Stat(const std::string& stats_file, const std::string& name) {
  std::istringstream in(ReadAll(stats_file));
  std::string key;
  long value = 0;
  while (in >> key >> value) {
    if (key == name) return value;
  }
  return 0;
}

Resources Sample(pid_t pid, const std::string& stats_file) {
  Resources r;
  std::istringstream status(ReadAll(absl::StrCat("/proc/", pid, "/status")));
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmRSS:", 0) == 0) r.rss_kib = std::atol(line.c_str() + 6);
  }
  for (const auto& e : std::filesystem::directory_iterator(
           absl::StrCat("/proc/", pid, "/fd"))) {
    (void)e;
    ++r.open_files;
  }
  r.hsm_sessions = Stat(stats_file, "open_sessions");
  return r;
}

TEST(SoakTest, MixedLoadWithHsmFaultsLosesNothing) {
  const char* env_seconds = std::getenv("CUSTOS_SOAK_SECONDS");
  const int seconds = env_seconds != nullptr ? std::atoi(env_seconds) : 120;
  ASSERT_GT(seconds, 0);
  const std::string tmp = std::filesystem::temp_directory_path() /
                          absl::StrCat("custos-soak-", getpid());
  const std::string faults = tmp + ".faults";
  const std::string sessions = tmp + ".stats";
  {
    std::ofstream out(faults);
    out << "module /usr/lib/softhsm/libsofthsm2.so\n"
           "fail C_Encrypt rv=CKR_DEVICE_ERROR every=1000\n"
           "fail C_Decrypt rv=CKR_DEVICE_ERROR every=1000\n";
  }
  CustosdProcess::Options options;
  options.hsm_module = CUSTOS_FAULT_MODULE;
  options.env = {{"CUSTOS_FAULT_CONFIG", faults},
                 {"CUSTOS_FAULT_STATS_FILE", sessions}};
  // Rotations are admin calls here; keep automatic ones out of the count
  // by leaving the encryption limit at its default.
  auto started = CustosdProcess::Start(options);
  ASSERT_TRUE(started.ok()) << started.status();
  std::unique_ptr<CustosdProcess> server = *std::move(started);

  std::atomic<uint64_t> calls{0};  // every RPC this test makes
  std::vector<std::string> keys;
  for (int i = 0; i < 3; ++i) {
    ++calls;
    absl::StatusOr<std::string> key =
        server->CreateKeyFor("service-a", {pb::GENERATE_DATA_KEY, pb::DECRYPT});
    ASSERT_TRUE(key.ok()) << key.status();
    keys.push_back(*key);
  }

  struct Issued {
    std::string blob;
    std::string plaintext_hash;
    std::string context;  // the "soak" context value it was issued under
  };
  std::mutex mu;
  std::vector<Issued> issued;
  std::map<std::string, uint64_t> failures;  // by code
  std::atomic<uint64_t> ok_calls{0}, mismatches{0};
  std::atomic<bool> stop{false};

  auto worker = [&](int index) {
    std::mt19937_64 rng(1000 + index);
    auto crypto = pb::CryptoService::NewStub(server->Channel("service-a"));
    auto admin = pb::KeyManagementService::NewStub(server->Channel("admin"));
    while (!stop) {
      const int dice = static_cast<int>(rng() % 100);
      const std::string& key = keys[rng() % keys.size()];
      grpc::ClientContext ctx;
      grpc::Status s;
      if (dice < 80) {
        pb::GenerateDataKeyRequest req;
        req.set_key(key);
        (*req.mutable_encryption_context())["soak"] = std::to_string(index);
        pb::GenerateDataKeyResponse resp;
        s = crypto->GenerateDataKey(&ctx, req, &resp);
        if (s.ok()) {
          std::lock_guard<std::mutex> lock(mu);
          issued.push_back({resp.ciphertext_blob(), Sha256(resp.plaintext()),
                            std::to_string(index)});
        }
      } else if (dice < 95) {
        Issued pick;
        {
          std::lock_guard<std::mutex> lock(mu);
          if (issued.empty()) continue;
          pick = issued[rng() % issued.size()];
        }
        pb::DecryptRequest req;
        req.set_ciphertext_blob(pick.blob);
        (*req.mutable_encryption_context())["soak"] = pick.context;
        pb::DecryptResponse resp;
        ++calls;
        s = crypto->Decrypt(&ctx, req, &resp);
        if (s.ok() && Sha256(resp.plaintext()) != pick.plaintext_hash) {
          ++mismatches;
        }
        if (s.ok()) {
          ++ok_calls;
        } else {
          std::lock_guard<std::mutex> lock(mu);
          ++failures[std::to_string(s.error_code())];
        }
        continue;
      } else if (dice < 97) {
        pb::RotateKeyRequest req;
        req.set_key(key);
        pb::Key resp;
        s = admin->RotateKey(&ctx, req, &resp);
      } else {
        pb::GetKeyRequest req;
        req.set_key(key);
        pb::Key resp;
        s = admin->GetKey(&ctx, req, &resp);
      }
      ++calls;
      if (s.ok()) {
        ++ok_calls;
      } else {
        std::lock_guard<std::mutex> lock(mu);
        ++failures[std::to_string(s.error_code())];
      }
    }
  };

  const pid_t pid = server->pid();
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) threads.emplace_back(worker, i);
  // Resources after a warm-up of a quarter of the run (at least 10 s), and
  // at the end.
  const auto start = Clock::now();
  const auto warm_at = start + std::chrono::seconds(std::max(10, seconds / 4));
  const auto end = start + std::chrono::seconds(seconds);
  std::this_thread::sleep_until(warm_at);
  const Resources warm = Sample(pid, sessions);
  Resources peak = warm;
  while (Clock::now() < end) {
    std::this_thread::sleep_for(std::chrono::seconds(1));
    Resources now = Sample(pid, sessions);
    peak.rss_kib = std::max(peak.rss_kib, now.rss_kib);
    peak.open_files = std::max(peak.open_files, now.open_files);
    peak.hsm_sessions = std::max(peak.hsm_sessions, now.hsm_sessions);
  }
  stop = true;
  for (std::thread& t : threads) t.join();
  const Resources last = Sample(pid, sessions);

  // Faults off; every blob issued must open to its plaintext.
  {
    std::ofstream out(faults + ".tmp");
    out << "module /usr/lib/softhsm/libsofthsm2.so\n";
  }
  std::filesystem::rename(faults + ".tmp", faults);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::set<std::tuple<std::string, uint32_t, std::string>> ivs;
  for (const Issued& item : issued) {
    absl::StatusOr<kms::ParsedBlob> parsed = kms::ParseBlob(item.blob);
    ASSERT_TRUE(parsed.ok());
    EXPECT_TRUE(
        ivs.emplace(parsed->header.key_id, parsed->header.version, parsed->iv)
            .second)
        << "a (key, version, IV) pair repeats";
  }
  const long injected = Stat(sessions, "injected");
  std::atomic<uint64_t> verified{0}, lost{0};
  std::vector<std::thread> checkers;
  for (int t = 0; t < 8; ++t) {
    checkers.emplace_back([&, t] {
      auto crypto = pb::CryptoService::NewStub(server->Channel("service-a"));
      for (size_t i = t; i < issued.size(); i += 8) {
        pb::DecryptRequest req;
        req.set_ciphertext_blob(issued[i].blob);
        (*req.mutable_encryption_context())["soak"] = issued[i].context;
        pb::DecryptResponse resp;
        grpc::ClientContext ctx;
        ++calls;
        grpc::Status s = crypto->Decrypt(&ctx, req, &resp);
        if (s.ok() && Sha256(resp.plaintext()) == issued[i].plaintext_hash) {
          ++verified;
        } else {
          ++lost;
        }
      }
    });
  }
  for (std::thread& t : checkers) t.join();
  EXPECT_EQ(lost.load(), 0u) << "issued blobs that no longer open";
  ASSERT_TRUE(server->Stop().ok());

  uint64_t records = 0;
  for (const auto& r : testing::ReadRecords(server->audit_dir())) {
    if (r.contains("checkpoint")) continue;
    ++records;
    if (r.value("outcome", "") == "FAILED") {
      std::printf("soak: failed call: %s %s: %s\n",
                  r.value("operation", "").c_str(), r.value("code", "").c_str(),
                  r.value("detail", "").c_str());
    }
  }
  uint64_t failed = 0;
  std::string failure_text;
  for (const auto& [code, n] : failures) {
    failed += n;
    absl::StrAppend(&failure_text, " code ", code, ": ", n);
  }
  std::printf(
      "soak: %d s, %llu calls (load: %llu ok, %llu failed:%s), %ld HSM "
      "faults injected, %llu data keys verified, RSS %ld -> %ld KiB (peak "
      "%ld), open files %ld -> %ld, HSM sessions %ld -> %ld\n",
      seconds, static_cast<unsigned long long>(calls.load()),
      static_cast<unsigned long long>(ok_calls.load()),
      static_cast<unsigned long long>(failed), failure_text.c_str(), injected,
      static_cast<unsigned long long>(verified.load()), warm.rss_kib,
      last.rss_kib, peak.rss_kib, warm.open_files, last.open_files,
      warm.hsm_sessions, last.hsm_sessions);

  EXPECT_EQ(mismatches.load(), 0u);
  EXPECT_EQ(records, calls.load())
      << "the audit log holds one record per call, served or refused";
  EXPECT_GT(issued.size(), 100u);
  // Injected device errors are retried on a fresh session by the pool, so
  // callers rarely see them; the module counts what it injected.
  EXPECT_GT(injected, 0) << "faults were injected";
  // Flat after warm-up: no growth beyond allocator noise, no leaked file or
  // session.
  EXPECT_LE(last.rss_kib, warm.rss_kib + warm.rss_kib / 4 + 16 * 1024);
  EXPECT_LE(last.open_files, warm.open_files + 2);
  EXPECT_LE(last.hsm_sessions, warm.hsm_sessions);

  testing::ProcessResult verify = testing::RunProcess(
      {testing::BinDir() + "/custos", "audit", "verify", server->audit_dir()},
      testing::EnvironmentWithout("CUSTOS_"), "/dev/null", tmp + ".verify");
  EXPECT_EQ(verify.code, 0) << verify;
  std::remove(faults.c_str());
  std::remove(sessions.c_str());
}

}  // namespace
}  // namespace custos
