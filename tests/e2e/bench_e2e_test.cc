// End to end for custos-bench: its load generator against a real custosd
// (every RPC of a mix is driven and counted, refusals are counted by status
// code, the JSON report is well formed) and its two baseline servers.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "custos/v1/kms.grpc.pb.h"
#include "tests/support/custosd_process.h"
#include "tests/support/subprocess.h"

namespace custos {
namespace {

namespace pb = ::custos::v1;
using ::custos::testing::CustosdProcess;
using ::custos::testing::ProcessResult;
using ::nlohmann::json;
using ::testing::HasSubstr;

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

class BenchTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto server = CustosdProcess::Start({});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    // A key whose policy lets service-a use every crypto operation.
    absl::StatusOr<std::string> key = server_->CreateKeyFor(
        "service-a",
        {pb::GENERATE_DATA_KEY, pb::GENERATE_DATA_KEY_WITHOUT_PLAINTEXT,
         pb::ENCRYPT, pb::DECRYPT, pb::RE_ENCRYPT_FROM, pb::RE_ENCRYPT_TO});
    ASSERT_TRUE(key.ok()) << key.status();
    key_id_ = new std::string(*key);
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }

  // Runs build/bin/custos-bench ARGS as a dev-env identity.
  static ProcessResult Bench(const std::vector<std::string>& args,
                             const std::string& identity = "service-a") {
    static int calls = 0;
    std::vector<std::string> argv = {testing::BinDir() + "/custos-bench"};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<std::string> env = testing::EnvironmentWithout("CUSTOS_");
    const std::string pki = server_->dir() + "/pki/";
    env.push_back("CUSTOS_ADDR=" + server_->address());
    env.push_back("CUSTOS_CA=" + pki + "ca.pem");
    env.push_back("CUSTOS_CERT=" + pki + identity + ".pem");
    env.push_back("CUSTOS_KEY=" + pki + identity + ".key");
    env.push_back("SOFTHSM2_CONF=" + server_->softhsm_conf());
    return testing::RunProcess(
        argv, env, "/dev/null",
        absl::StrCat(server_->dir(), "/bench-", ++calls));
  }

  static json Json(const ProcessResult& r) {
    json j = json::parse(r.out, nullptr, /*allow_exceptions=*/false);
    EXPECT_FALSE(j.is_discarded()) << "not JSON: " << r;
    return j;
  }

  static void ExpectSaneLatencies(const json& summary) {
    const json& l = summary["latency_ms"];
    EXPECT_GT(l["p50"].get<double>(), 0);
    EXPECT_LE(l["p50"].get<double>(), l["p90"].get<double>());
    EXPECT_LE(l["p90"].get<double>(), l["p99"].get<double>());
    EXPECT_LE(l["p99"].get<double>(), l["p99.9"].get<double>());
    EXPECT_LE(l["p99.9"].get<double>(), l["max"].get<double>());
  }

  static CustosdProcess* server_;
  static std::string* key_id_;
};
CustosdProcess* BenchTest::server_ = nullptr;
std::string* BenchTest::key_id_ = nullptr;

TEST_F(BenchTest, DrivesEveryRpcOfAMixAndReportsEach) {
  ProcessResult r = Bench(
      {"run", "--json", "-q", "--key", *key_id_, "-c", "6", "--channels", "2",
       "--duration", "1.5", "--warmup", "0.2", "--batch-size", "10", "--mix",
       "generate-data-key=2,generate-data-key-without-plaintext=1,"
       "generate-data-keys=1,encrypt=1,decrypt=1,re-encrypt=1"});
  ASSERT_EQ(r.code, 0) << r;
  json j = Json(r);
  EXPECT_EQ(j["concurrency"], 6);
  EXPECT_EQ(j["channels"], 2);
  EXPECT_EQ(j["total"]["failed"], 0) << j.dump(2);
  EXPECT_GT(j["total"]["ok"].get<int>(), 0);
  ExpectSaneLatencies(j["total"]);
  ASSERT_EQ(j["per_rpc"].size(), 6u) << j.dump(2);
  uint64_t sum = 0;
  for (const auto& [name, summary] : j["per_rpc"].items()) {
    SCOPED_TRACE(name);
    EXPECT_GT(summary["ok"].get<int>(), 0);
    sum += summary["ok"].get<uint64_t>();
  }
  EXPECT_EQ(sum, j["total"]["ok"].get<uint64_t>());
  // A GenerateDataKeys call counts as ten data keys.
  const json& batch = j["per_rpc"]["generate-data-keys"];
  EXPECT_NEAR(batch["items_per_second"].get<double>(),
              10 * batch["calls_per_second"].get<double>(), 1e-6);
}

TEST_F(BenchTest, RefusedCallsAreCountedByCodeAndFailTheRun) {
  ProcessResult r = Bench(
      {"run", "--json", "-q", "--key", *key_id_, "--rpc", "generate-data-key",
       "-c", "2", "--duration", "0.5", "--warmup", "0"},
      "service-b");
  EXPECT_EQ(r.code, 1) << "nothing succeeded: " << r;
  json j = Json(r);
  EXPECT_EQ(j["total"]["ok"], 0);
  EXPECT_GT(j["total"]["errors"]["PERMISSION_DENIED"].get<int>(), 0);
}

TEST_F(BenchTest, BadFlagsNameTheFlag) {
  ProcessResult unknown = Bench({"run", "--rpc", "generate-everything"});
  EXPECT_EQ(unknown.code, 2) << unknown;
  EXPECT_THAT(unknown.err, HasSubstr("generate-everything"));
  EXPECT_THAT(unknown.err, HasSubstr("generate-data-key"));
  ProcessResult no_key = Bench({"run", "--rpc", "decrypt"});
  EXPECT_EQ(no_key.code, 2) << no_key;
  EXPECT_THAT(no_key.err, HasSubstr("--key"));
  ProcessResult weight = Bench({"run", "--key", "k", "--mix", "decrypt=x"});
  EXPECT_EQ(weight.code, 2) << weight;
  EXPECT_THAT(weight.err, HasSubstr("weight"));
}

TEST_F(BenchTest, BaselineServersServeEchoWithCustosdSettings) {
  for (const std::string mode : {"echo", "hsm-echo"}) {
    SCOPED_TRACE(mode);
    const std::string listen = absl::StrCat("127.0.0.1:", FreePort());
    // The baseline runs in the background while the load generator runs.
    const std::vector<std::string> serve = {testing::BinDir() + "/custos-bench",
                                            "serve",
                                            "--config",
                                            server_->dir() + "/custos.yaml",
                                            "--mode",
                                            mode,
                                            "--listen",
                                            listen};
    std::vector<std::string> env = testing::EnvironmentWithout("SOFTHSM2_");
    env.push_back("SOFTHSM2_CONF=" + server_->softhsm_conf());
    ProcessResult served;
    std::thread server([&] {
      served = testing::RunProcess(serve, env, "/dev/null",
                                   absl::StrCat(server_->dir(), "/", mode));
    });
    ProcessResult r;
    for (int attempt = 0; attempt < 50; ++attempt) {
      r = Bench({"run", "--json", "-q", "--address", listen, "--rpc", "echo",
                 "-c", "4", "--duration", "0.5", "--warmup", "0"});
      if (r.code == 0) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    EXPECT_EQ(r.code, 0) << r;
    json j = Json(r);
    EXPECT_GT(j["total"]["ok"].get<int>(), 0);
    EXPECT_EQ(j["total"]["failed"], 0);
    ExpectSaneLatencies(j["total"]);
    // Stop it the way scripts/bench does: SIGTERM, then a clean exit.
    ProcessResult pids = testing::RunProcess(
        {"/usr/bin/pgrep", "-f", "--", "--listen " + listen}, env, "/dev/null",
        absl::StrCat(server_->dir(), "/pgrep"));
    ASSERT_EQ(pids.code, 0) << pids;
    kill(std::stoi(pids.out), SIGTERM);
    server.join();
    EXPECT_EQ(served.code, 0) << served;
    EXPECT_THAT(served.out, HasSubstr("serving " + mode));
  }
}

}  // namespace
}  // namespace custos
