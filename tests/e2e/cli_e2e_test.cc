// End to end for the `custos` command line: one real custosd per suite, and
// the real build/bin/custos run as a subprocess with the dev-env identities
// in CUSTOS_ADDR, CUSTOS_CA, CUSTOS_CERT and CUSTOS_KEY. Every command of
// docs/cli.md has its happy path and its main error (exit code and message).
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "tests/support/custosd_process.h"
#include "tests/support/subprocess.h"

namespace custos {
namespace {

namespace fs = std::filesystem;
using ::custos::testing::CustosdProcess;
using ::nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

using ::custos::testing::ReadAll;

void WriteAll(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
  ASSERT_TRUE(out.good()) << path;
}

using CliResult = ::custos::testing::ProcessResult;

// How to run the CLI: as which dev-env identity, against which address,
// with what on stdin.
struct RunAs {
  std::string identity = "admin";
  std::string address;     // empty: the suite's server
  std::string stdin_file;  // empty: /dev/null
  bool no_connection_env = false;
};

class CliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto server = CustosdProcess::Start({});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
    work_ = (fs::path(server_->dir()).parent_path() / "cli").string();
    fs::create_directories(work_);
    // service-a may use every operation of the keys made with it.
    WriteAll(
        PolicyFile(),
        json{{"bindings",
              {{{"principals", {CustosdProcess::Principal("service-a")}},
                {"operations",
                 {"GENERATE_DATA_KEY", "GENERATE_DATA_KEY_WITHOUT_PLAINTEXT",
                  "ENCRYPT", "DECRYPT", "RE_ENCRYPT_FROM", "RE_ENCRYPT_TO"}}}}}}
            .dump());
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }

  static std::string Path(const std::string& name) {
    return work_ + "/" + name;
  }
  static std::string PolicyFile() { return Path("service-a-policy.json"); }

  // Runs build/bin/custos ARGS and waits for it.
  static CliResult Cli(const std::vector<std::string>& args,
                       const RunAs& as = {}) {
    static int calls = 0;
    std::vector<std::string> argv = {testing::BinDir() + "/custos"};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<std::string> env = testing::EnvironmentWithout("CUSTOS_");
    if (!as.no_connection_env) {
      const std::string pki = server_->dir() + "/pki/";
      env.push_back("CUSTOS_ADDR=" +
                    (as.address.empty() ? server_->address() : as.address));
      env.push_back("CUSTOS_CA=" + pki + "ca.pem");
      env.push_back("CUSTOS_CERT=" + pki + as.identity + ".pem");
      env.push_back("CUSTOS_KEY=" + pki + as.identity + ".key");
    }
    return testing::RunProcess(
        argv, env, as.stdin_file.empty() ? "/dev/null" : as.stdin_file,
        Path(absl::StrCat("run-", ++calls)));
  }

  static json ParseJson(const CliResult& r) {
    json j = json::parse(r.out, nullptr, /*allow_exceptions=*/false);
    EXPECT_FALSE(j.is_discarded()) << "not JSON: " << r;
    return j;
  }

  // A key whose policy lets service-a use every operation; its id.
  static std::string NewKey(std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"--json",   "key",        "create",
                                     "--policy", PolicyFile(), "--description",
                                     "cli e2e"};
    args.insert(args.end(), extra.begin(), extra.end());
    CliResult r = Cli(args);
    EXPECT_EQ(r.code, 0) << r;
    json j = ParseJson(r);
    return j.is_object() ? j.value("key_id", "") : "";
  }

  // The connection settings of `identity`, for a CLI run.
  static std::vector<std::string> ConnectionEnv(const std::string& identity) {
    const std::string pki = server_->dir() + "/pki/";
    return {"CUSTOS_ADDR=" + server_->address(), "CUSTOS_CA=" + pki + "ca.pem",
            "CUSTOS_CERT=" + pki + identity + ".pem",
            "CUSTOS_KEY=" + pki + identity + ".key"};
  }

  // Runs one shell line of the docs as written, in `dir`, with build/bin
  // first on PATH and `identity`'s connection settings.
  static CliResult Shell(const std::string& line, const std::string& dir,
                         const std::string& identity) {
    static int calls = 0;
    std::vector<std::string> env;
    for (const std::string& v : testing::EnvironmentWithout("CUSTOS_")) {
      if (!absl::StartsWith(v, "PATH=")) env.push_back(v);
    }
    const char* path = getenv("PATH");
    env.push_back(absl::StrCat("PATH=", testing::BinDir(), ":",
                               path != nullptr ? path : "/usr/bin:/bin"));
    for (const std::string& v : ConnectionEnv(identity)) env.push_back(v);
    return testing::RunProcess({"/bin/sh", "-c", "cd " + dir + " && " + line},
                               env, "/dev/null",
                               Path(absl::StrCat("shell-", ++calls)));
  }

  // The checkpoint public key custosd writes beside its segments.
  static std::string PublicKeyFile() {
    for (const auto& e : fs::directory_iterator(server_->audit_dir())) {
      if (e.path().extension() == ".pem") return e.path().string();
    }
    ADD_FAILURE() << "no audit-public-key-*.pem in " << server_->audit_dir();
    return "";
  }

  // A fresh copy of the server's audit directory at work/`name`.
  static std::string CopyAudit(const std::string& name) {
    const std::string copy = Path(name);
    fs::remove_all(copy);
    fs::copy(server_->audit_dir(), copy, fs::copy_options::recursive);
    return copy;
  }

  // Stops the server cleanly (it signs a checkpoint over every record) and
  // starts it again.
  static void RestartServer() {
    absl::Status s = server_->Stop();
    ASSERT_TRUE(s.ok()) << s;
    s = server_->Restart();
    ASSERT_TRUE(s.ok()) << s;
  }

  static std::string RandomBytes(size_t n) {
    std::mt19937_64 rng(42);
    std::string s(n, '\0');
    for (char& c : s) c = static_cast<char>(rng());
    return s;
  }

  static CustosdProcess* server_;
  static std::string work_;
};
CustosdProcess* CliTest::server_ = nullptr;
std::string CliTest::work_;

// "custos: CODE: message" on stderr and the exit code.
#define EXPECT_CLI_ERROR(result, exit_code, ...)                          \
  do {                                                                    \
    const CliResult& r_ = (result);                                       \
    EXPECT_EQ(r_.code, exit_code) << r_;                                  \
    EXPECT_THAT(r_.err, AllOf(HasSubstr("custos: "), __VA_ARGS__)) << r_; \
  } while (0)

TEST_F(CliTest, HelpOnEveryCommandExitsZeroWithAnExample) {
  const std::vector<std::string> commands = {"",
                                             "key",
                                             "key create",
                                             "key list",
                                             "key show",
                                             "key update",
                                             "key rotate",
                                             "key enable",
                                             "key disable",
                                             "key schedule-deletion",
                                             "key cancel-deletion",
                                             "alias",
                                             "alias create",
                                             "alias delete",
                                             "alias list",
                                             "policy",
                                             "policy get",
                                             "policy set",
                                             "datakey",
                                             "datakey generate",
                                             "encrypt",
                                             "decrypt",
                                             "reencrypt",
                                             "random",
                                             "audit",
                                             "audit verify"};
  for (const std::string& command : commands) {
    std::vector<std::string> args =
        absl::StrSplit(command, ' ', absl::SkipEmpty());
    args.push_back("--help");
    CliResult r = Cli(args);
    EXPECT_EQ(r.code, 0) << command << ": " << r;
    EXPECT_THAT(r.out, HasSubstr("Example")) << command << ": " << r;
    EXPECT_THAT(r.out, HasSubstr("Usage:")) << command;
  }
}

TEST_F(CliTest, UsageErrorsExitTwo) {
  CliResult r = Cli({"frobnicate"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("unknown command 'frobnicate'")) << r;
  r = Cli({"key", "frobnicate"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("unknown command 'frobnicate'")) << r;
  r = Cli({"key", "show"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("KEY is required")) << r;
  r = Cli({"encrypt", "-i", "x"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("--key is required")) << r;
  r = Cli({"key", "list", "--bogus"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("--bogus")) << r;
  r = Cli({});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("subcommand is required")) << r;
  // None of these reached the server, so nothing printed on stdout.
  EXPECT_EQ(r.out, "");
}

TEST_F(CliTest, NoConnectionSettingsExitFourNamingCustosAddr) {
  RunAs as;
  as.no_connection_env = true;
  CliResult r = Cli({"key", "list"}, as);
  EXPECT_CLI_ERROR(r, 4, HasSubstr("CUSTOS_ADDR"), HasSubstr("--addr"));
  // Flags are enough on their own.
  const std::string pki = server_->dir() + "/pki/";
  r = Cli({"--addr", server_->address(), "--ca", pki + "ca.pem", "--cert",
           pki + "admin.pem", "--key", pki + "admin.key", "key", "list"},
          as);
  EXPECT_EQ(r.code, 0) << r;
}

TEST_F(CliTest, ServerNotRunningExitsOne) {
  // A port nobody listens on.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  RunAs as;
  as.address = absl::StrCat("localhost:", ntohs(addr.sin_port));
  CliResult r = Cli({"--timeout", "2", "key", "list"}, as);
  EXPECT_CLI_ERROR(r, 1, HasSubstr("UNAVAILABLE"));
  r = Cli({"--timeout", "2", "random"}, as);
  EXPECT_CLI_ERROR(r, 1, HasSubstr("UNAVAILABLE"));
}

TEST_F(CliTest, KeyCreate) {
  CliResult r = Cli({"key", "create", "--alias", "alias/cli-create",
                     "--description", "photo store", "--label", "team=photos",
                     "--rotation-period", "90d", "--policy", PolicyFile()});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, AllOf(HasSubstr("key_id"), HasSubstr("k-"),
                           HasSubstr("alias/cli-create"), HasSubstr("ENABLED"),
                           HasSubstr("photo store"), HasSubstr("team=photos"),
                           HasSubstr("90d"), HasSubstr("VERSION")));
  r = Cli({"--json", "key", "create", "--label", "team=x"});
  ASSERT_EQ(r.code, 0) << r;
  json j = ParseJson(r);
  EXPECT_TRUE(absl::StartsWith(j.value("key_id", ""), "k-")) << r;
  EXPECT_EQ(j.value("state", ""), "ENABLED");
  EXPECT_EQ(j.value("primary_version", 0), 1);
  EXPECT_EQ(j["labels"].value("team", ""), "x");

  // The alias is taken.
  r = Cli({"key", "create", "--alias", "alias/cli-create"});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("alias/cli-create"));
  // A bad period is refused before the server is asked.
  r = Cli({"key", "create", "--rotation-period", "soon"});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("--rotation-period 'soon'"));
  // Only admins manage keys.
  r = Cli({"key", "create"}, {.identity = "service-a"});
  EXPECT_CLI_ERROR(r, 3, HasSubstr("PERMISSION_DENIED"));
}

TEST_F(CliTest, KeyList) {
  const std::string id = NewKey({"--label", "cli-list=yes"});
  CliResult r = Cli({"key", "list", "--label", "cli-list=yes"});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, AllOf(HasSubstr("KEY_ID"), HasSubstr(id),
                           HasSubstr("ENABLED"), HasSubstr("cli e2e")));
  // --json after the command works too (global flags fall through).
  r = Cli({"key", "list", "--all", "--state", "ENABLED", "--json"});
  ASSERT_EQ(r.code, 0) << r;
  json j = ParseJson(r);
  ASSERT_TRUE(j.contains("keys")) << r;
  bool found = false;
  for (const json& k : j["keys"]) {
    found |= k.value("key_id", "") == id;
    EXPECT_EQ(k.value("state", ""), "ENABLED");
  }
  EXPECT_TRUE(found) << r;

  r = Cli({"key", "list", "--state", "SLEEPY"});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("--state"), HasSubstr("ENABLED"));
}

TEST_F(CliTest, KeyShow) {
  const std::string id = NewKey({"--alias", "alias/cli-show"});
  CliResult r = Cli({"key", "show", "alias/cli-show"});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, AllOf(HasSubstr(id), HasSubstr("alias/cli-show"),
                           HasSubstr("ENCRYPTIONS")));
  r = Cli({"--json", "key", "show", id});
  ASSERT_EQ(r.code, 0) << r;
  json j = ParseJson(r);
  EXPECT_EQ(j.value("key_id", ""), id);
  ASSERT_EQ(j["versions"].size(), 1u) << r;
  EXPECT_EQ(j["versions"][0].value("version", 0), 1);

  r = Cli({"key", "show", "alias/cli-nobody"});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("NOT_FOUND"));
}

TEST_F(CliTest, KeyUpdate) {
  const std::string id = NewKey();
  CliResult r = Cli({"--json", "key", "update", id, "--description", "renamed",
                     "--label", "tier=gold", "--rotation-period", "30d"});
  ASSERT_EQ(r.code, 0) << r;
  json j = ParseJson(r);
  EXPECT_EQ(j.value("description", ""), "renamed");
  EXPECT_EQ(j["labels"].value("tier", ""), "gold");
  EXPECT_EQ(j.value("rotation_period", ""), "2592000s");
  r = Cli({"key", "update", id, "--description", "again"});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("again"));

  r = Cli({"key", "update", id, "--label", "no-equals-sign"});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("--label 'no-equals-sign'"),
                   HasSubstr("NAME=VALUE"));
  r = Cli({"key", "update", "alias/cli-nobody", "--description", "x"});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("NOT_FOUND"));
}

TEST_F(CliTest, KeyRotate) {
  const std::string id = NewKey();
  CliResult r = Cli({"--json", "key", "rotate", id});
  ASSERT_EQ(r.code, 0) << r;
  json j = ParseJson(r);
  EXPECT_EQ(j.value("primary_version", 0), 2);
  r = Cli({"key", "rotate", id});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("primary_version"));

  r = Cli({"key", "rotate", id}, {.identity = "service-a"});
  EXPECT_CLI_ERROR(r, 3, HasSubstr("PERMISSION_DENIED"));
}

TEST_F(CliTest, KeyDisableAndEnable) {
  const std::string id = NewKey();
  CliResult r = Cli({"key", "disable", id});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("DISABLED"));
  // A disabled key refuses cryptography: rejected, not refused.
  r = Cli({"datakey", "generate", id}, {.identity = "service-a"});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("FAILED_PRECONDITION"));
  r = Cli({"--json", "key", "enable", id});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_EQ(ParseJson(r).value("state", ""), "ENABLED");
  r = Cli({"datakey", "generate", id}, {.identity = "service-a"});
  EXPECT_EQ(r.code, 0) << r;

  r = Cli({"key", "disable", "alias/cli-nobody"});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("NOT_FOUND"));
  r = Cli({"key", "enable", "alias/cli-nobody"});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("NOT_FOUND"));
}

TEST_F(CliTest, KeyScheduleAndCancelDeletion) {
  const std::string id = NewKey();
  CliResult r = Cli({"key", "schedule-deletion", id, "--days", "3"});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("INVALID_ARGUMENT"));
  // Cancelling what is not scheduled is a wrong state.
  r = Cli({"key", "cancel-deletion", id});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("FAILED_PRECONDITION"));

  r = Cli({"key", "schedule-deletion", id, "--days", "7"});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out,
              AllOf(HasSubstr("PENDING_DELETION"), HasSubstr("deletion_time")));
  r = Cli({"--json", "key", "cancel-deletion", id});
  ASSERT_EQ(r.code, 0) << r;
  json j = ParseJson(r);
  EXPECT_EQ(j.value("state", ""), "DISABLED");
  EXPECT_FALSE(j.contains("deletion_time")) << r;
}

TEST_F(CliTest, Aliases) {
  const std::string id = NewKey();
  CliResult r = Cli({"alias", "create", "alias/cli-alias", id});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("alias/cli-alias -> " + id));
  r = Cli({"--json", "alias", "create", "alias/cli-alias-2", id});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_EQ(ParseJson(r).value("name", ""), "alias/cli-alias-2");

  r = Cli({"alias", "list", "--key", id});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, AllOf(HasSubstr("ALIAS"), HasSubstr("alias/cli-alias "),
                           HasSubstr("alias/cli-alias-2")));
  r = Cli({"--json", "alias", "list", "--key", id});
  ASSERT_EQ(r.code, 0) << r;
  json j = ParseJson(r);
  ASSERT_EQ(j["aliases"].size(), 2u) << r;
  EXPECT_EQ(j["aliases"][0].value("key_id", ""), id);

  r = Cli({"alias", "delete", "alias/cli-alias-2"});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("deleted alias/cli-alias-2"));
  r = Cli({"--json", "alias", "list", "--key", id});
  EXPECT_EQ(ParseJson(r)["aliases"].size(), 1u) << r;

  r = Cli({"alias", "create", "alias/cli-alias", id});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("ALREADY_EXISTS"));
  r = Cli({"alias", "create", "no-prefix", id});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("INVALID_ARGUMENT"));
  r = Cli({"alias", "delete", "alias/cli-alias-2"});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("NOT_FOUND"));
  r = Cli({"alias", "list"}, {.identity = "service-b"});
  EXPECT_CLI_ERROR(r, 3, HasSubstr("PERMISSION_DENIED"));
}

TEST_F(CliTest, PolicyGetAndSet) {
  const std::string id = NewKey();
  CliResult r = Cli({"policy", "get", id});
  ASSERT_EQ(r.code, 0) << r;
  json j = ParseJson(r);
  ASSERT_EQ(j["bindings"].size(), 1u) << r;
  EXPECT_EQ(j["bindings"][0]["principals"][0],
            CustosdProcess::Principal("service-a"));
  // Printed as kms::PolicyToJson writes it: every field, version a number.
  ASSERT_TRUE(j["version"].is_number_unsigned()) << r;
  const uint64_t version = j["version"].get<uint64_t>();
  EXPECT_EQ(j["bindings"][0]["require_justification"], false) << r;

  // What `policy get` prints is what `policy set` reads.
  json changed = j;
  changed.erase("version");
  changed["bindings"][0]["principals"].push_back(
      CustosdProcess::Principal("service-b"));
  WriteAll(Path("policy-b.json"), changed.dump(2));
  r = Cli({"policy", "set", id, Path("policy-b.json"), "--expected-version",
           std::to_string(version)});
  ASSERT_EQ(r.code, 0) << r;
  j = ParseJson(r);
  EXPECT_EQ(j["bindings"][0]["principals"].size(), 2u) << r;
  EXPECT_GT(j.value("version", uint64_t{0}), version);
  // The whole printed policy, version and all, reads back as it is.
  WriteAll(Path("policy-as-printed.json"), r.out);
  r = Cli({"policy", "set", id, Path("policy-as-printed.json")});
  ASSERT_EQ(r.code, 0) << r;

  // A stale version is refused.
  r = Cli({"policy", "set", id, Path("policy-b.json"), "--expected-version",
           std::to_string(version)});
  EXPECT_CLI_ERROR(r, 4, Not(HasSubstr("UNKNOWN")));
  // An unknown field is named, and nothing is sent.
  WriteAll(
      Path("policy-typo.json"),
      R"({"bindings": [{"principals": ["*"], "operation": ["DECRYPT"]}]})");
  r = Cli({"policy", "set", id, Path("policy-typo.json")});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("policy-typo.json"), HasSubstr("operation"),
                   HasSubstr("docs/policies.md"));
  r = Cli({"policy", "get", "alias/cli-nobody"});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("NOT_FOUND"));
}

// The CLI reads policy files with the server's own parser: a field given
// twice is refused (a lenient reader would keep the last one and send a
// policy other than the one reviewed), and nothing is sent.
TEST_F(CliTest, PolicyFileWithAFieldGivenTwiceIsRefused) {
  const std::string id = NewKey();
  const std::string principal = CustosdProcess::Principal("service-b");
  WriteAll(Path("policy-twice.json"),
           R"({"bindings": [{"principals": [")" + principal +
               R"("], "operations": ["DECRYPT"]}], "bindings": []})");
  WriteAll(Path("policy-twice-inner.json"),
           R"({"bindings": [{"principals": ["*"], "principals": [")" +
               principal + R"("], "operations": ["DECRYPT"]}]})");
  for (const char* file : {"policy-twice.json", "policy-twice-inner.json"}) {
    SCOPED_TRACE(file);
    CliResult r = Cli({"policy", "set", id, Path(file)});
    EXPECT_CLI_ERROR(r, 4, HasSubstr(file), HasSubstr("appears twice"),
                     HasSubstr("docs/policies.md"));
    r = Cli({"key", "create", "--policy", Path(file)});
    EXPECT_CLI_ERROR(r, 4, HasSubstr(file), HasSubstr("appears twice"));
  }
  CliResult r = Cli({"--json", "policy", "get", id});
  ASSERT_EQ(r.code, 0) << r;
  json j = ParseJson(r);
  EXPECT_EQ(j.value("version", uint64_t{0}), 1u) << "unchanged: " << r;
  ASSERT_EQ(j["bindings"].size(), 1u);
  EXPECT_EQ(j["bindings"][0]["principals"][0],
            CustosdProcess::Principal("service-a"));
}

TEST_F(CliTest, DataKeyGenerate) {
  const std::string id = NewKey();
  const RunAs service_a = {.identity = "service-a"};
  CliResult r =
      Cli({"datakey", "generate", id, "--context", "tenant=7"}, service_a);
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, AllOf(HasSubstr(id), HasSubstr("ciphertext_blob"),
                           HasSubstr("plaintext"), HasSubstr("key_version")));
  r = Cli({"--json", "datakey", "generate", id, "--bytes", "16"}, service_a);
  ASSERT_EQ(r.code, 0) << r;
  json j = ParseJson(r);
  EXPECT_EQ(j.value("key_id", ""), id);
  std::string plaintext, blob;
  ASSERT_TRUE(absl::Base64Unescape(j.value("plaintext", ""), &plaintext));
  EXPECT_EQ(plaintext.size(), 16u);
  ASSERT_TRUE(absl::Base64Unescape(j.value("ciphertext_blob", ""), &blob));
  EXPECT_GT(blob.size(), 16u);

  r = Cli({"datakey", "generate", id, "--no-plaintext"}, service_a);
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, AllOf(HasSubstr("ciphertext_blob"),
                           Not(HasSubstr("\nplaintext"))));
  r = Cli({"--json", "datakey", "generate", id, "--no-plaintext"}, service_a);
  ASSERT_EQ(r.code, 0) << r;
  j = ParseJson(r);
  EXPECT_FALSE(j.contains("plaintext")) << r;
  EXPECT_FALSE(j.value("ciphertext_blob", "").empty()) << r;

  // service-b is not in the policy.
  r = Cli({"datakey", "generate", id}, {.identity = "service-b"});
  EXPECT_CLI_ERROR(r, 3, HasSubstr("PERMISSION_DENIED"));
  r = Cli({"datakey", "generate", id, "--context", "tenant"}, service_a);
  EXPECT_CLI_ERROR(r, 4, HasSubstr("--context 'tenant'"));
}

class CliEnvelopeTest : public CliTest {
 protected:
  void SetUp() override {
    key_ = NewKey();
    plain_ = Path("plain.bin");
    WriteAll(plain_, RandomBytes(1 << 20));
  }
  std::string key_, plain_;
  const RunAs service_a_ = {.identity = "service-a"};
};

TEST_F(CliEnvelopeTest, RoundTripOfOneMebibyteThroughFiles) {
  CliResult r =
      Cli({"encrypt", "--key", key_, "--context", "tenant=7", "--context",
           "app=photos", "-i", plain_, "-o", Path("a.custos")},
          service_a_);
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_EQ(r.out, "");
  const std::string sealed = ReadAll(Path("a.custos"));
  ASSERT_GT(sealed.size(), size_t{1 << 20});
  EXPECT_EQ(sealed.substr(0, 7), "CUSTOSE");
  EXPECT_FALSE(fs::exists(Path("a.custos.custos-tmp")));

  r = Cli({"decrypt", "-i", Path("a.custos"), "-o", Path("a.out")}, service_a_);
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_TRUE(ReadAll(Path("a.out")) == ReadAll(plain_));
  // With --context, exactly the bound context.
  r = Cli({"decrypt", "--context", "app=photos", "--context", "tenant=7", "-i",
           Path("a.custos"), "-o", Path("a2.out")},
          service_a_);
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_TRUE(ReadAll(Path("a2.out")) == ReadAll(plain_));
}

TEST_F(CliEnvelopeTest, RoundTripThroughStdinAndStdout) {
  CliResult r = Cli({"encrypt", "--key", key_},
                    {.identity = "service-a", .stdin_file = plain_});
  ASSERT_EQ(r.code, 0) << r;
  WriteAll(Path("b.custos"), r.out);
  r = Cli({"decrypt"},
          {.identity = "service-a", .stdin_file = Path("b.custos")});
  ASSERT_EQ(r.code, 0) << r.code << r.err;
  EXPECT_TRUE(r.out == ReadAll(plain_));
}

TEST_F(CliEnvelopeTest, WrongContextIsRejected) {
  ASSERT_EQ(Cli({"encrypt", "--key", key_, "--context", "tenant=7", "-i",
                 plain_, "-o", Path("c.custos")},
                service_a_)
                .code,
            0);
  CliResult r = Cli({"decrypt", "--context", "tenant=8", "-i", Path("c.custos"),
                     "-o", Path("c.out")},
                    service_a_);
  EXPECT_CLI_ERROR(r, 4, HasSubstr("context does not match"));
  EXPECT_FALSE(fs::exists(Path("c.out")));
  EXPECT_FALSE(fs::exists(Path("c.out.custos-tmp")));
}

TEST_F(CliEnvelopeTest, ServiceOutsideThePolicyIsRefused) {
  ASSERT_EQ(
      Cli({"encrypt", "--key", key_, "-i", plain_, "-o", Path("d.custos")},
          service_a_)
          .code,
      0);
  CliResult r = Cli({"decrypt", "-i", Path("d.custos"), "-o", Path("d.out")},
                    {.identity = "service-b"});
  EXPECT_CLI_ERROR(r, 3, HasSubstr("PERMISSION_DENIED"));
  EXPECT_FALSE(fs::exists(Path("d.out")));
  r = Cli({"encrypt", "--key", key_, "-i", plain_, "-o", Path("d2.custos")},
          {.identity = "service-b"});
  EXPECT_CLI_ERROR(r, 3, HasSubstr("PERMISSION_DENIED"));
  EXPECT_FALSE(fs::exists(Path("d2.custos")));
}

TEST_F(CliEnvelopeTest, TamperedFileIsRejectedAndLeavesNoOutput) {
  ASSERT_EQ(
      Cli({"encrypt", "--key", key_, "-i", plain_, "-o", Path("e.custos")},
          service_a_)
          .code,
      0);
  std::string sealed = ReadAll(Path("e.custos"));
  // A bit in the middle of the file: a late chunk fails after earlier ones
  // already verified, so partial plaintext existed in the temporary file.
  sealed[sealed.size() * 3 / 4] ^= 0x01;
  WriteAll(Path("e-tampered.custos"), sealed);
  CliResult r =
      Cli({"decrypt", "-i", Path("e-tampered.custos"), "-o", Path("e.out")},
          service_a_);
  EXPECT_CLI_ERROR(r, 4, HasSubstr("invalid envelope"),
                   HasSubstr("failed authentication"));
  EXPECT_FALSE(fs::exists(Path("e.out")));
  EXPECT_FALSE(fs::exists(Path("e.out.custos-tmp")));

  r = Cli({"decrypt", "-i", Path("missing.custos"), "-o", Path("e.out")},
          service_a_);
  EXPECT_CLI_ERROR(r, 4, HasSubstr("missing.custos"));
}

TEST_F(CliTest, ReEncrypt) {
  const std::string source = NewKey();
  const std::string destination = NewKey({"--alias", "alias/cli-archive"});
  const RunAs service_a = {.identity = "service-a"};
  CliResult r = Cli({"--json", "datakey", "generate", source, "--context",
                     "tenant=7", "--no-plaintext"},
                    service_a);
  ASSERT_EQ(r.code, 0) << r;
  const std::string blob = ParseJson(r).value("ciphertext_blob", "");
  WriteAll(Path("blob.b64"), blob + "\n");

  // To another key and context, from a file.
  r = Cli({"--json", "reencrypt", "--source-context", "tenant=7",
           "--destination-key", "alias/cli-archive", "--destination-context",
           "tenant=8", "-i", Path("blob.b64"), "-o", Path("moved.b64")},
          service_a);
  ASSERT_EQ(r.code, 0) << r;
  json j = ParseJson(r);
  EXPECT_EQ(j.value("source_key_id", ""), source);
  EXPECT_EQ(j.value("key_id", ""), destination);
  EXPECT_EQ(j.value("key_version", 0), 1);
  const std::string moved = j.value("ciphertext_blob", "");
  EXPECT_FALSE(moved.empty());
  EXPECT_NE(moved, blob);
  EXPECT_EQ(ReadAll(Path("moved.b64")), moved + "\n");
  // The new blob is bound to the new context: moving it on needs tenant=8.
  r = Cli(
      {"reencrypt", "--source-context", "tenant=7", "-i", Path("moved.b64")},
      service_a);
  EXPECT_CLI_ERROR(r, 4, HasSubstr("INVALID_ARGUMENT"));

  // Default destination: the blob's own key, at its new primary version;
  // from stdin, as a table.
  ASSERT_EQ(Cli({"key", "rotate", destination}).code, 0);
  r = Cli({"reencrypt", "--source-context", "tenant=8", "--destination-context",
           "tenant=8"},
          {.identity = "service-a", .stdin_file = Path("moved.b64")});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, AllOf(HasSubstr("key_id"), HasSubstr(destination),
                           HasSubstr("ciphertext_blob")));
  bool version_two = false;
  for (absl::string_view line : absl::StrSplit(r.out, '\n')) {
    if (absl::StartsWith(line, "key_version")) {
      version_two = absl::StripTrailingAsciiWhitespace(line).back() == '2';
    }
  }
  EXPECT_TRUE(version_two) << r;

  // Wrong source context: the blob does not open.
  r = Cli({"reencrypt", "--source-context", "tenant=9", "-i", Path("blob.b64"),
           "-o", Path("never.b64")},
          service_a);
  EXPECT_CLI_ERROR(r, 4, HasSubstr("INVALID_ARGUMENT"));
  EXPECT_FALSE(fs::exists(Path("never.b64")));
  // Not a blob at all.
  WriteAll(Path("junk.b64"), "this is not base64!");
  r = Cli({"reencrypt", "-i", Path("junk.b64")}, service_a);
  EXPECT_CLI_ERROR(r, 4, HasSubstr("not a base64 ciphertext blob"));
  // service-b may not use the source key.
  r = Cli({"reencrypt", "--source-context", "tenant=7", "-i", Path("blob.b64")},
          {.identity = "service-b"});
  EXPECT_CLI_ERROR(r, 3, HasSubstr("PERMISSION_DENIED"));
}

TEST_F(CliTest, Random) {
  CliResult r = Cli({"random"}, {.identity = "service-b"});
  ASSERT_EQ(r.code, 0) << r;
  std::string bytes;
  ASSERT_TRUE(
      absl::Base64Unescape(absl::StripTrailingAsciiWhitespace(r.out), &bytes))
      << r;
  EXPECT_EQ(bytes.size(), 32u);
  r = Cli({"--json", "random", "--bytes", "100"});
  ASSERT_EQ(r.code, 0) << r;
  ASSERT_TRUE(absl::Base64Unescape(ParseJson(r).value("random", ""), &bytes));
  EXPECT_EQ(bytes.size(), 100u);

  r = Cli({"random", "--bytes", "5000"});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("1 to 1024"));
}

TEST_F(CliTest, AuditVerify) {
  // Enough records to edit one in the middle, even when run alone.
  for (int i = 0; i < 4; ++i) ASSERT_FALSE(NewKey().empty());
  const std::string copy = Path("audit-copy");
  fs::remove_all(copy);
  fs::copy(server_->audit_dir(), copy, fs::copy_options::recursive);
  CliResult r = Cli({"audit", "verify", copy}, {.no_connection_env = true});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, AllOf(HasSubstr("NODE"), HasSubstr("OK: "),
                           HasSubstr("every hash chain is intact")));
  r = Cli({"--json", "audit", "verify", copy}, {.no_connection_env = true});
  ASSERT_EQ(r.code, 0) << r;
  json j = ParseJson(r);
  EXPECT_EQ(j.value("ok", false), true);
  EXPECT_GE(j.value("records", 0), 4);

  // Edit the third line of the first segment.
  std::vector<std::string> segments;
  for (const auto& e : fs::directory_iterator(copy)) {
    if (absl::EndsWith(e.path().string(), ".jsonl")) {
      segments.push_back(e.path().string());
    }
  }
  ASSERT_FALSE(segments.empty());
  std::sort(segments.begin(), segments.end());
  const std::string segment = segments.front();
  std::vector<std::string> lines = absl::StrSplit(ReadAll(segment), '\n');
  ASSERT_GE(lines.size(), 4u) << segment;
  const size_t at = lines[2].find("\"operation\"");
  ASSERT_NE(at, std::string::npos) << lines[2];
  lines[2].insert(at, "\"edited\":true,");
  WriteAll(segment, absl::StrJoin(lines, "\n"));

  r = Cli({"audit", "verify", copy}, {.no_connection_env = true});
  EXPECT_EQ(r.code, 4) << r;
  const std::string name = fs::path(segment).filename().string();
  EXPECT_THAT(r.out + r.err, AllOf(HasSubstr("BROKEN"), HasSubstr(name))) << r;
  // The first record whose `prev` no longer matches is on line 4.
  EXPECT_THAT(r.out + r.err, HasSubstr(name + ":4:")) << r;

  r = Cli({"audit", "verify", Path("no-such-dir")},
          {.no_connection_env = true});
  EXPECT_CLI_ERROR(r, 4, HasSubstr("no-such-dir"));
}

// The documented order, `custos audit verify --public-key PEM DIR`, once
// let --public-key take DIR as a second key and then asked the server to
// verify its own live log instead: an edited copy printed "OK (verified by
// the server)" and exited 0. A DIR always means those files, in either
// order, and only --server asks the server.
TEST_F(CliTest, AuditVerifyChecksTheGivenDirectoryInEitherFlagOrder) {
  for (int i = 0; i < 4; ++i) ASSERT_FALSE(NewKey().empty());
  RestartServer();  // its shutdown checkpoint signs every record so far
  const std::string copy = CopyAudit("audit-signed");
  const std::string pem = PublicKeyFile();
  const std::vector<std::vector<std::string>> orders = {
      {"audit", "verify", "--public-key", pem, copy},
      {"audit", "verify", copy, "--public-key", pem}};
  // As an auditor, whom the server would answer.
  const RunAs auditor = {.identity = "auditor"};
  for (const auto& args : orders) {
    CliResult r = Cli(args, auditor);
    EXPECT_EQ(r.code, 0) << r;
    EXPECT_THAT(r.out, AllOf(HasSubstr("NODE"),
                             HasSubstr("every checkpoint signature verifies"),
                             Not(HasSubstr("server"))))
        << r;
  }

  // Edit the third line of the first segment.
  std::vector<std::string> segments;
  for (const auto& e : fs::directory_iterator(copy)) {
    if (absl::EndsWith(e.path().string(), ".jsonl")) {
      segments.push_back(e.path().string());
    }
  }
  ASSERT_FALSE(segments.empty());
  std::sort(segments.begin(), segments.end());
  std::vector<std::string> lines =
      absl::StrSplit(ReadAll(segments.front()), '\n');
  ASSERT_GE(lines.size(), 4u);
  const size_t at = lines[2].find("\"operation\"");
  ASSERT_NE(at, std::string::npos) << lines[2];
  lines[2].insert(at, "\"edited\":true,");
  WriteAll(segments.front(), absl::StrJoin(lines, "\n"));
  const std::string name = fs::path(segments.front()).filename().string();
  for (const auto& args : orders) {
    CliResult r = Cli(args, auditor);
    EXPECT_EQ(r.code, 4) << r;
    EXPECT_THAT(r.out, AllOf(HasSubstr("BROKEN"), HasSubstr(name + ":4:"),
                             Not(HasSubstr("verified by the server"))))
        << r;
  }

  // Neither DIR nor --server is a usage error, not a guess; both is too.
  CliResult r = Cli({"audit", "verify", "--public-key", pem}, auditor);
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr("DIR"), HasSubstr("--server"))) << r;
  EXPECT_EQ(r.out, "");
  r = Cli({"audit", "verify", "--server", copy}, auditor);
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_EQ(r.out, "");
  // The server uses its own key: an offline flag with --server is refused
  // rather than ignored.
  r = Cli({"audit", "verify", "--server", "--public-key", pem}, auditor);
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("--server")) << r;
  r = Cli({"audit", "verify", "--max-unsigned-tail", "5", "--server"}, auditor);
  EXPECT_EQ(r.code, 2) << r;
}

// With a key, a node's records must be signed: its log must hold a valid
// checkpoint, and at most --max-unsigned-tail records may follow the last.
TEST_F(CliTest, AuditVerifyWithAKeyNeedsACheckpointAndABoundedTail) {
  ASSERT_FALSE(NewKey().empty());
  RestartServer();
  for (int i = 0; i < 3; ++i) ASSERT_FALSE(NewKey().empty());
  const std::string copy = CopyAudit("audit-tail");
  const std::string pem = PublicKeyFile();
  const RunAs offline = {.no_connection_env = true};
  CliResult r = Cli({"audit", "verify", "--public-key", pem, copy}, offline);
  EXPECT_EQ(r.code, 0) << r;
  r = Cli({"audit", "verify", "--public-key", pem, "--max-unsigned-tail", "1",
           copy},
          offline);
  EXPECT_EQ(r.code, 4) << r;
  EXPECT_THAT(r.out, AllOf(HasSubstr("BROKEN"),
                           HasSubstr("records after its last checkpoint"),
                           HasSubstr("more than the 1 allowed")))
      << r;

  // A chain anyone could write: the first segment's records before its
  // first checkpoint, on their own. They chain, but nothing signed them.
  std::vector<std::string> segments;
  for (const auto& e : fs::directory_iterator(copy)) {
    if (absl::EndsWith(e.path().string(), ".jsonl")) {
      segments.push_back(e.path().string());
    }
  }
  ASSERT_FALSE(segments.empty());
  std::sort(segments.begin(), segments.end());
  std::string unsigned_lines;
  for (absl::string_view line :
       absl::StrSplit(ReadAll(segments.front()), '\n', absl::SkipEmpty())) {
    if (absl::StrContains(line, "\"checkpoint\":")) break;
    absl::StrAppend(&unsigned_lines, line, "\n");
  }
  ASSERT_FALSE(unsigned_lines.empty());
  const std::string forged = Path("audit-forged");
  fs::remove_all(forged);
  fs::create_directories(forged);
  WriteAll(forged + "/" + fs::path(segments.front()).filename().string(),
           unsigned_lines);
  r = Cli({"audit", "verify", "--public-key", pem, forged}, offline);
  EXPECT_EQ(r.code, 4) << r;
  EXPECT_THAT(r.out, HasSubstr("no signed checkpoint")) << r;
  // Without a key only the chain is checked, and the output says so.
  r = Cli({"audit", "verify", forged}, offline);
  EXPECT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("NOT checked")) << r;
}

// docs/cli.md's --expect-key lines, run as written: a file encrypted under
// alias/photos decrypts with --expect-key alias/photos, and is refused,
// writing nothing, with --expect-key alias/archive (a key service-a may
// use too).
TEST_F(CliTest, DecryptWithExpectKeyRunsAsDocumented) {
  ASSERT_FALSE(NewKey({"--alias", "alias/photos"}).empty());
  ASSERT_FALSE(NewKey({"--alias", "alias/archive"}).empty());
  const std::string dir = Path("expect-key");
  fs::remove_all(dir);
  fs::create_directories(dir);
  WriteAll(dir + "/photo.jpg", RandomBytes(200 * 1024));
  const std::string docs = ReadAll(testing::SourceDir() + "/docs/cli.md");
  const std::string encrypt =
      "custos encrypt --key alias/photos -i photo.jpg -o photo.jpg.custos";
  const std::string decrypt =
      "custos decrypt --expect-key alias/photos -i photo.jpg.custos -o "
      "photo-copy.jpg";
  const std::string refused =
      "custos decrypt --expect-key alias/archive -i photo.jpg.custos -o "
      "photo-copy.jpg";
  for (const std::string& line : {encrypt, decrypt, refused}) {
    ASSERT_THAT(docs, HasSubstr("\n" + line + "\n")) << "docs/cli.md";
  }
  CliResult r = Shell(encrypt, dir, "service-a");
  ASSERT_EQ(r.code, 0) << r;
  r = Shell(decrypt, dir, "service-a");
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_TRUE(ReadAll(dir + "/photo-copy.jpg") == ReadAll(dir + "/photo.jpg"));

  fs::remove(dir + "/photo-copy.jpg");
  r = Shell(refused, dir, "service-a");
  EXPECT_CLI_ERROR(r, 4, HasSubstr("INVALID_ARGUMENT"),
                   HasSubstr("not wrapped under the expected key "
                             "'alias/archive'"));
  EXPECT_FALSE(fs::exists(dir + "/photo-copy.jpg"));
  for (const auto& e : fs::directory_iterator(dir)) {
    EXPECT_FALSE(absl::StrContains(e.path().filename().string(), "custos-"))
        << "temporary file left: " << e.path();
  }
}

// Starts build/bin/custos ARGS as `identity` and returns at once; stdout
// and stderr go to files under `dir`. Everything is prepared before fork.
pid_t StartCli(const std::vector<std::string>& args,
               const std::vector<std::string>& env, const std::string& dir) {
  std::vector<std::string> argv = {testing::BinDir() + "/custos"};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<char*> c_argv, c_env;
  for (std::string& a : argv) c_argv.push_back(a.data());
  c_argv.push_back(nullptr);
  std::vector<std::string> env_copy = env;
  for (std::string& e : env_copy) c_env.push_back(e.data());
  c_env.push_back(nullptr);
  const std::string out = dir + "/cli.out", err = dir + "/cli.err";
  const pid_t pid = fork();
  if (pid == 0) {
    const int in_fd = open("/dev/null", O_RDONLY);
    const int out_fd = open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    const int err_fd = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (in_fd < 0 || out_fd < 0 || err_fd < 0) _exit(127);
    dup2(in_fd, 0);
    dup2(out_fd, 1);
    dup2(err_fd, 2);
    execve(c_argv[0], c_argv.data(), c_env.data());
    _exit(127);
  }
  return pid;
}

// An encrypt interrupted by SIGTERM while it reads a slow input (a fifo
// that stays open) leaves no partial output behind; and the CLI runs with
// core dumps off.
TEST_F(CliEnvelopeTest, SigtermRemovesThePartialOutputFile) {
  const std::string dir = Path("interrupted");
  fs::remove_all(dir);
  fs::create_directories(dir + "/out");
  const std::string fifo = dir + "/slow.fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0) << strerror(errno);
  std::vector<std::string> env = testing::EnvironmentWithout("CUSTOS_");
  for (const std::string& v : ConnectionEnv("service-a")) env.push_back(v);
  const pid_t pid = StartCli(
      {"encrypt", "--key", key_, "-i", fifo, "-o", dir + "/out/big.custos"},
      env, dir);
  ASSERT_GT(pid, 0);
  // The writer's end opens once custos has opened the reader's.
  int fd = -1;
  for (int i = 0; i < 400 && fd < 0; ++i) {
    fd = open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) usleep(25 * 1000);
  }
  ASSERT_GE(fd, 0) << ReadAll(dir + "/cli.err");
  ASSERT_EQ(fcntl(fd, F_SETFL, 0), 0);
  const std::string data = RandomBytes(1 << 20);
  ASSERT_EQ(write(fd, data.data(), data.size()),
            static_cast<ssize_t>(data.size()));
  // Wait until encrypted chunks are in the (temporary) output file.
  auto written = [&] {
    uintmax_t bytes = 0;
    for (const auto& e : fs::directory_iterator(dir + "/out")) {
      bytes += fs::file_size(e.path());
    }
    return bytes;
  };
  for (int i = 0; i < 400 && written() < 64 * 1024; ++i) usleep(25 * 1000);
  ASSERT_GE(written(), 64u * 1024) << ReadAll(dir + "/cli.err");
  EXPECT_THAT(ReadAll(absl::StrCat("/proc/", pid, "/limits")),
              ::testing::ContainsRegex("Max core file size +0 +0"));

  ASSERT_EQ(kill(pid, SIGTERM), 0);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  close(fd);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM)
      << "status " << status << ": " << ReadAll(dir + "/cli.err");
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(dir + "/out")) {
    left.push_back(e.path().filename().string());
  }
  EXPECT_TRUE(left.empty()) << absl::StrJoin(left, ", ");
}

}  // namespace
}  // namespace custos

namespace custos {
namespace {

TEST_F(CliEnvelopeTest, FileEncryptedBeforeARotationDecryptsAfterIt) {
  ASSERT_EQ(
      Cli({"encrypt", "--key", key_, "-i", plain_, "-o", Path("old.custos")},
          service_a_)
          .code,
      0);
  CliResult r = Cli({"key", "rotate", key_});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("primary_version  2"));
  r = Cli({"decrypt", "-i", Path("old.custos"), "-o", Path("old.out")},
          service_a_);
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_TRUE(ReadAll(Path("old.out")) == ReadAll(plain_));
}

TEST_F(CliTest, AuditListTailAndPublicKeyForAuditors) {
  const std::string id = NewKey();
  const RunAs auditor = {.identity = "auditor"};
  CliResult r = Cli({"audit", "list", "--key", id, "--all"}, auditor);
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out,
              AllOf(HasSubstr("SEQ"), HasSubstr("CreateKey"), HasSubstr(id)));
  r = Cli({"--json", "audit", "list", "--operation", "CreateKey", "--key", id},
          auditor);
  ASSERT_EQ(r.code, 0) << r;
  json j = ParseJson(r);
  ASSERT_TRUE(j.contains("events")) << r;
  EXPECT_EQ(j["events"].size(), 1u);
  r = Cli({"audit", "list", "--since", "yesterday"}, auditor);
  EXPECT_CLI_ERROR(r, 4, HasSubstr("--since 'yesterday'"));
  // Not an auditor: refused.
  r = Cli({"audit", "list"});
  EXPECT_CLI_ERROR(r, 3, HasSubstr("PERMISSION_DENIED"));
  // Follow from the start, stop after 3 events.
  r = Cli({"audit", "tail", "--from-seq", "1", "--limit", "3"}, auditor);
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("SEQ"));
  // The checkpoint public key, and the server's own verification.
  r = Cli({"audit", "public-key"}, auditor);
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("BEGIN PUBLIC KEY"));
  r = Cli({"audit", "verify", "--server"}, auditor);
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("OK (verified by the server)"));
}

}  // namespace
}  // namespace custos
