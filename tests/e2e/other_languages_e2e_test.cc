// End to end from other gRPC stacks: the Python example (Debian's
// python3-grpcio, stubs generated at run time) and the Node.js example
// (@grpc/grpc-js + @grpc/proto-loader) call GenerateDataKey and Decrypt over
// mutual TLS against a real custosd, as service-a (allowed by the key's
// policy) and as service-b (not in it).
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "custos/v1/kms.grpc.pb.h"
#include "tests/support/custosd_process.h"
#include "tests/support/test_token.h"

namespace custos {
namespace {

namespace fs = std::filesystem;
namespace pb = ::custos::v1;
using ::custos::testing::CustosdProcess;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kPython[] = "/usr/bin/python3";
constexpr char kAlias[] = "alias/other-languages";

using ::custos::testing::ReadAll;

struct ProgramRun {
  int exit_code = -1;  // -1: killed, timed out or could not start
  std::string out, err;
  std::string Describe() const {
    return absl::StrCat("exit ", exit_code, "\n--- stdout\n", out,
                        "--- stderr\n", err);
  }
};

// Runs argv (no shell) in `cwd` with stdout and stderr captured apart;
// kills it after `timeout`.
ProgramRun RunProgram(
    const std::vector<std::string>& argv, const std::string& cwd,
    const std::string& scratch,
    std::chrono::seconds timeout = std::chrono::seconds(180)) {
  static int counter = 0;
  const std::string base = absl::StrCat(scratch, "/run-", ++counter);
  const std::string out_path = base + ".out", err_path = base + ".err";
  pid_t pid = fork();
  if (pid == 0) {
    int out = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    int err = open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    int null = open("/dev/null", O_RDONLY);
    dup2(null, STDIN_FILENO);
    dup2(out, STDOUT_FILENO);
    dup2(err, STDERR_FILENO);
    setpgid(0, 0);  // its own group, so a timeout kills npm's children too
    if (!cwd.empty() && chdir(cwd.c_str()) != 0) _exit(126);
    std::vector<char*> args;
    for (const std::string& a : argv)
      args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    _exit(127);
  }
  ProgramRun run;
  if (pid < 0) {
    run.err = "fork failed";
    return run;
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  int status = 0;
  bool timed_out = false;
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(-pid, SIGKILL);
      waitpid(pid, &status, 0);
      timed_out = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  run.out = ReadAll(out_path);
  run.err = ReadAll(err_path);
  if (timed_out) {
    run.err += absl::StrCat("\n[killed after ", timeout.count(), "s]\n");
  } else if (WIFEXITED(status)) {
    run.exit_code = WEXITSTATUS(status);
  }
  return run;
}

// The first lines of a tool's complaint, enough to see why it failed.
std::string Head(const std::string& text, int lines = 5) {
  size_t at = 0;
  while (lines-- > 0) {
    at = text.find('\n', at);
    if (at == std::string::npos) return text;
    ++at;
  }
  return text.substr(0, at);
}

bool OnPath(const std::string& tool) {
  return testing::RunCommand("command -v " + tool).exit_code == 0;
}

class OtherLanguagesTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto scratch = testing::MakeTempDir("custos-other-languages");
    ASSERT_TRUE(scratch.ok()) << scratch.status();
    scratch_ = new std::string(*scratch);
    node_dir_ = new std::string();
    node_skip_ = new std::string();
    PrepareNode();

    auto server = CustosdProcess::Start({});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();

    // A key only service-a may use, for data keys and decryption.
    pb::CreateKeyRequest req;
    req.set_description("other-languages e2e");
    req.set_alias(kAlias);
    pb::PolicyBinding* b = req.mutable_policy()->add_bindings();
    b->add_principals(CustosdProcess::Principal("service-a"));
    b->add_operations(pb::GENERATE_DATA_KEY);
    b->add_operations(pb::DECRYPT);
    pb::Key key;
    grpc::ClientContext ctx;
    grpc::Status s =
        pb::KeyManagementService::NewStub(server_->Channel("admin"))
            ->CreateKey(&ctx, req, &key);
    ASSERT_TRUE(s.ok()) << s.error_message();
    key_id_ = new std::string(key.key_id());
  }

  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
    if (scratch_ != nullptr &&
        std::getenv("CUSTOS_KEEP_TEST_DIRS") == nullptr) {
      std::error_code ec;
      fs::remove_all(*scratch_, ec);
    }
  }

  // Copies clients/node (without node_modules) to the scratch directory and
  // installs its locked dependencies there with `npm ci`, so the source tree
  // is never written. Sets node_skip_ (the Node tests skip) only when npm
  // cannot reach its registry; any other problem is a failure.
  static void PrepareNode() {
    // scripts/test installs Node; missing tools are a failure, not a skip.
    if (!OnPath("node") || !OnPath("npm")) {
      ADD_FAILURE()
          << "node or npm is not on PATH (apt-get install nodejs npm)";
      *node_skip_ = "node or npm is not installed (see the failure above)";
      return;
    }
    const fs::path src = fs::path(testing::SourceDir()) / "clients/node";
    const fs::path dst = fs::path(*scratch_) / "node";
    fs::create_directories(dst);
    for (const char* f : {"package.json", "package-lock.json", "example.js"}) {
      fs::copy_file(src / f, dst / f);
    }
    *node_dir_ = dst.string();
    // Few retries: an offline machine should skip soon, not after minutes.
    const std::vector<std::string> net = {
        "--fetch-retries=1", "--fetch-timeout=30000",
        "--cache=" + *scratch_ + "/npm-cache"};
    std::vector<std::string> ci_argv = {"npm", "ci", "--no-audit", "--no-fund"};
    ci_argv.insert(ci_argv.end(), net.begin(), net.end());
    ProgramRun ci = RunProgram(ci_argv, *node_dir_, *scratch_);
    if (ci.exit_code == 0) return;
    // Only an unreachable registry is a reason to skip; anything else
    // (a broken lock file, say) is a failure.
    std::vector<std::string> ping_argv = {"npm", "ping"};
    ping_argv.insert(ping_argv.end(), net.begin(), net.end());
    ProgramRun ping =
        RunProgram(ping_argv, *node_dir_, *scratch_, std::chrono::seconds(60));
    if (ping.exit_code != 0) {
      *node_skip_ = absl::StrCat(
          "the npm registry is unreachable, so clients/node's dependencies "
          "cannot be installed (npm ci exited ",
          ci.exit_code, "; npm ping exited ", ping.exit_code, "):\n",
          Head(ping.err));
      return;
    }
    ADD_FAILURE() << "npm ci failed although the registry answers:\n"
                  << ci.Describe();
    *node_skip_ = "npm ci failed (see the failure above)";
  }

  // --addr/--ca/--cert/--key for a dev-env identity, plus the key and a
  // two-pair encryption context.
  static std::vector<std::string> CommonFlags(const std::string& identity) {
    const std::string pki = server_->dir() + "/pki/";
    return {"--addr",     server_->address(),  // localhost:PORT
            "--ca",       pki + "ca.pem",
            "--cert",     pki + identity + ".pem",
            "--key",      pki + identity + ".key",
            "--key-name", kAlias,
            "--context",  "tenant=acme",
            "--context",  "purpose=other-languages e2e"};
  }

  static ProgramRun Python(const std::string& identity) {
    std::vector<std::string> argv = {
        kPython, testing::SourceDir() + "/clients/python/custos_example.py",
        "--proto-dir", testing::SourceDir() + "/proto"};
    for (std::string& f : CommonFlags(identity)) argv.push_back(std::move(f));
    return RunProgram(argv, *scratch_, *scratch_);
  }

  static ProgramRun Node(const std::string& identity) {
    std::vector<std::string> argv = {"node", *node_dir_ + "/example.js",
                                     "--proto-dir",
                                     testing::SourceDir() + "/proto"};
    for (std::string& f : CommonFlags(identity)) argv.push_back(std::move(f));
    return RunProgram(argv, *node_dir_, *scratch_);
  }

  // One JSON line that names the key and never carries the data key.
  // Python prints `"ok": true`, Node `"ok":true`: compare without spaces.
  static void ExpectSuccess(const ProgramRun& run) {
    ASSERT_EQ(run.exit_code, 0) << run.Describe();
    std::string compact = run.out;
    compact.erase(std::remove(compact.begin(), compact.end(), ' '),
                  compact.end());
    EXPECT_THAT(compact, HasSubstr("\"ok\":true")) << run.Describe();
    EXPECT_THAT(compact,
                HasSubstr(absl::StrCat("\"key_id\":\"", *key_id_, "\"")))
        << run.Describe();
    EXPECT_THAT(compact, HasSubstr("\"key_version\":1")) << run.Describe();
    EXPECT_THAT(run.out, Not(HasSubstr("plaintext"))) << run.Describe();
    EXPECT_EQ(std::count(run.out.begin(), run.out.end(), '\n'), 1)
        << run.Describe();
  }

  static void ExpectDenied(const ProgramRun& run) {
    EXPECT_NE(run.exit_code, 0) << run.Describe();
    EXPECT_THAT(run.err, HasSubstr("PERMISSION_DENIED")) << run.Describe();
    EXPECT_THAT(run.out, Not(HasSubstr("\"ok\""))) << run.Describe();
  }

  static CustosdProcess* server_;
  static std::string* scratch_;
  static std::string* node_dir_;
  static std::string* node_skip_;
  static std::string* key_id_;
};
CustosdProcess* OtherLanguagesTest::server_ = nullptr;
std::string* OtherLanguagesTest::scratch_ = nullptr;
std::string* OtherLanguagesTest::node_dir_ = nullptr;
std::string* OtherLanguagesTest::node_skip_ = nullptr;
std::string* OtherLanguagesTest::key_id_ = nullptr;

TEST_F(OtherLanguagesTest, PythonGeneratesAndDecryptsAsServiceA) {
  ExpectSuccess(Python("service-a"));
}

TEST_F(OtherLanguagesTest, PythonIsDeniedAsServiceB) {
  ExpectDenied(Python("service-b"));
}

TEST_F(OtherLanguagesTest, NodeGeneratesAndDecryptsAsServiceA) {
  if (!node_skip_->empty()) GTEST_SKIP() << *node_skip_;
  ExpectSuccess(Node("service-a"));
}

TEST_F(OtherLanguagesTest, NodeIsDeniedAsServiceB) {
  if (!node_skip_->empty()) GTEST_SKIP() << *node_skip_;
  ExpectDenied(Node("service-b"));
}

}  // namespace
}  // namespace custos
