// Microbenchmark of raw HSM operations through hsm/: the baseline every later
// Custos benchmark quotes its figures against. Runs against a fresh SoftHSM2
// token in a temporary directory.
//
//   RawSession*  one session per thread, called directly (no pool, no worker
//                thread, no deadline): what the token itself can do.
//   Hsm*         through Hsm and its SessionPool (worker hand-off, deadline,
//                handle cache): what Custos's core pays per HSM call.
#include <benchmark/benchmark.h>

#include <atomic>
#include <cstdio>
#include <memory>

#include "hsm/attribute_template.h"
#include "hsm/hsm.h"
#include "hsm/key_templates.h"
#include "hsm/module.h"
#include "hsm/session.h"
#include "tests/support/test_token.h"

namespace {

using custos::hsm::Hsm;
using custos::hsm::Module;
using custos::hsm::Session;

std::unique_ptr<custos::testing::TestToken> g_token;
std::unique_ptr<Module> g_module;
std::unique_ptr<Hsm> g_hsm;
std::string g_key_id;
const std::string kDataKey(32, '\x5a');
const std::string kAad = "key=k-bench;version=1";

// Any failed HSM call fails the run (the ctest smoke test relies on it).
std::atomic<bool> g_failed{false};

void Check(const absl::Status& s, benchmark::State& state) {
  if (s.ok()) return;
  g_failed = true;
  state.SkipWithError(std::string(s.message()).c_str());
}

Session OpenRawSession(CK_OBJECT_HANDLE* key) {
  auto slot = g_module->FindSlotByTokenLabel(g_token->label());
  auto session = Session::Open(g_module->fn(), *slot);
  (void)session->Login(custos::SecretBytes::CopyOf(g_token->user_pin()));
  custos::hsm::AttributeTemplate query;
  query.Ulong(CKA_CLASS, CKO_SECRET_KEY).Bytes(CKA_ID, g_key_id);
  *key = session->FindObjects(query, 1)->front();
  return *std::move(session);
}

void BM_RawSessionEncrypt32(benchmark::State& state) {
  CK_OBJECT_HANDLE key;
  Session session = OpenRawSession(&key);
  std::string iv(12, '\x01');
  for (auto _ : state) {
    auto ct = session.EncryptAesGcm(key, iv, kAad, kDataKey);
    if (!ct.ok()) Check(ct.status(), state);
    benchmark::DoNotOptimize(ct);
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_RawSessionDecrypt32(benchmark::State& state) {
  CK_OBJECT_HANDLE key;
  Session session = OpenRawSession(&key);
  std::string iv(12, '\x01');
  std::string ct = *session.EncryptAesGcm(key, iv, kAad, kDataKey);
  for (auto _ : state) {
    auto pt = session.DecryptAesGcm(key, iv, kAad, ct);
    if (!pt.ok()) Check(pt.status(), state);
    benchmark::DoNotOptimize(pt);
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_RawSessionRandom32(benchmark::State& state) {
  CK_OBJECT_HANDLE key;
  Session session = OpenRawSession(&key);
  for (auto _ : state) {
    auto r = session.GenerateRandom(32);
    if (!r.ok()) Check(r.status(), state);
    benchmark::DoNotOptimize(r);
  }
  state.SetItemsProcessed(state.iterations());
}

// Includes drawing the 12-byte IV from the HSM RNG, as Custos does.
void BM_HsmEncrypt32(benchmark::State& state) {
  for (auto _ : state) {
    auto sealed = g_hsm->EncryptAesGcm(g_key_id, kAad, kDataKey);
    if (!sealed.ok()) Check(sealed.status(), state);
    benchmark::DoNotOptimize(sealed);
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_HsmDecrypt32(benchmark::State& state) {
  auto sealed = g_hsm->EncryptAesGcm(g_key_id, kAad, kDataKey);
  for (auto _ : state) {
    auto pt =
        g_hsm->DecryptAesGcm(g_key_id, sealed->iv, kAad, sealed->ciphertext);
    if (!pt.ok()) Check(pt.status(), state);
    benchmark::DoNotOptimize(pt);
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_HsmRandom32(benchmark::State& state) {
  for (auto _ : state) {
    auto r = g_hsm->GenerateRandom(32);
    if (!r.ok()) Check(r.status(), state);
    benchmark::DoNotOptimize(r);
  }
  state.SetItemsProcessed(state.iterations());
}

BENCHMARK(BM_RawSessionEncrypt32)->Threads(1)->Threads(2)->UseRealTime();
BENCHMARK(BM_RawSessionDecrypt32)->Threads(1)->Threads(2)->UseRealTime();
BENCHMARK(BM_RawSessionRandom32)->Threads(1)->Threads(2)->UseRealTime();
BENCHMARK(BM_HsmEncrypt32)->Threads(1)->Threads(2)->Threads(8)->UseRealTime();
BENCHMARK(BM_HsmDecrypt32)->Threads(1)->Threads(2)->Threads(8)->UseRealTime();
BENCHMARK(BM_HsmRandom32)->Threads(1)->Threads(2)->Threads(8)->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  auto token = custos::testing::TestToken::Create("bench-token");
  if (!token.ok()) {
    std::fprintf(stderr, "token: %s\n", token.status().ToString().c_str());
    return 1;
  }
  g_token = *std::move(token);
  auto module = Module::Load(custos::testing::kSoftHsmModule);
  if (!module.ok()) return 1;
  g_module = *std::move(module);
  Hsm::Options options;
  options.token_label = g_token->label();
  options.pin_file = g_token->pin_file();
  options.pool.size = 2;  // one per core
  auto hsm = Hsm::Open(*g_module, options);
  if (!hsm.ok()) {
    std::fprintf(stderr, "hsm: %s\n", hsm.status().ToString().c_str());
    return 1;
  }
  g_hsm = *std::move(hsm);
  auto key = g_hsm->GenerateAesKey("bench");
  if (!key.ok()) {
    std::fprintf(stderr, "key: %s\n", key.status().ToString().c_str());
    return 1;
  }
  g_key_id = *key;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_hsm.reset();
  g_module.reset();
  g_token.reset();
  if (g_failed) std::fprintf(stderr, "hsm_bench: HSM calls failed\n");
  return g_failed ? 1 : 0;
}
