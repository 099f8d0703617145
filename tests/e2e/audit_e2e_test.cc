// End to end: the audit log of a real custosd process. Every request that
// reaches the service leaves exactly one record (allowed, refused or
// failed), under concurrency the chain has no gaps and its signed
// checkpoints verify offline, a kill -9 loses no record of a request that
// got a reply, and a full disk makes custosd refuse (fail closed) until the
// space comes back.
#include <errno.h>
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mount.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "custos/v1/kms.grpc.pb.h"
#include "kms/audit/audit_verifier.h"
#include "nlohmann/json.hpp"
#include "tests/support/audit_records.h"
#include "tests/support/custosd_process.h"
#include "tests/support/test_token.h"

namespace custos {
namespace {

namespace fs = std::filesystem;
namespace pb = ::custos::v1;
using ::custos::testing::CustosdProcess;
using ::custos::testing::ReadRecords;
using ::custos::testing::SegmentFiles;
using ::custos::testing::StringField;
using Json = nlohmann::json;

using ::custos::testing::ReadAll;

// The checkpoint public keys custosd exported next to the segments.
std::vector<std::string> PublicKeys(const std::string& dir) {
  std::vector<std::string> pems;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (absl::StartsWith(name, "audit-public-key-") &&
        absl::EndsWith(name, ".pem")) {
      pems.push_back(ReadAll(e.path().string()));
    }
  }
  return pems;
}

// Verifies the chain and every checkpoint signature with the exported key.
void ExpectVerifies(const std::string& dir, kms::AuditVerifyReport* out) {
  std::vector<std::string> keys = PublicKeys(dir);
  ASSERT_EQ(keys.size(), 1u) << "custosd exports one checkpoint public key";
  ASSERT_THAT(keys[0], ::testing::HasSubstr("BEGIN PUBLIC KEY"));
  absl::StatusOr<kms::AuditVerifyReport> report =
      kms::VerifyAuditDirectory(dir, keys);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->ok) << report->first_break;
  EXPECT_TRUE(report->signatures_checked);
  ASSERT_EQ(report->nodes.size(), 1u);
  *out = *report;
}

// Sequence numbers 1, 2, 3 … in file order, without gaps or repeats.
void ExpectGapFree(const std::vector<Json>& records) {
  ASSERT_FALSE(records.empty());
  for (size_t i = 0; i < records.size(); ++i) {
    ASSERT_TRUE(records[i].contains("seq")) << records[i].dump();
    ASSERT_EQ(records[i]["seq"].get<uint64_t>(), i + 1) << records[i].dump();
  }
}

size_t CountAllowed(const std::vector<Json>& records,
                    const std::string& operation) {
  return std::count_if(records.begin(), records.end(), [&](const Json& r) {
    return StringField(r, "operation") == operation &&
           StringField(r, "outcome") == "ALLOWED" &&
           StringField(r, "code") == "OK";
  });
}

std::chrono::system_clock::time_point In(std::chrono::milliseconds d) {
  return std::chrono::system_clock::now() + d;
}

// One GenerateDataKey with a deadline and, if given, an x-request-id.
grpc::Status GenerateDataKey(pb::CryptoService::Stub* stub,
                             const std::string& key,
                             const std::string& request_id,
                             pb::GenerateDataKeyResponse* resp) {
  pb::GenerateDataKeyRequest req;
  req.set_key(key);
  (*req.mutable_encryption_context())["purpose"] = "audit-e2e";
  grpc::ClientContext ctx;
  ctx.set_deadline(In(std::chrono::seconds(20)));
  if (!request_id.empty()) ctx.AddMetadata("x-request-id", request_id);
  return stub->GenerateDataKey(&ctx, req, resp);
}

class AuditE2eTest : public ::testing::Test {
 protected:
  void StartServer(const std::string& extra_config = "") {
    CustosdProcess::Options options;
    options.extra_config = extra_config;
    auto server = CustosdProcess::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
  }

  std::unique_ptr<pb::CryptoService::Stub> Crypto(const std::string& who) {
    return pb::CryptoService::NewStub(server_->Channel(who));
  }
  std::unique_ptr<pb::KeyManagementService::Stub> Kms(const std::string& who) {
    return pb::KeyManagementService::NewStub(server_->Channel(who));
  }

  // A key service-a may use for everything; service-b is not in its policy.
  std::string NewKey(const std::string& request_id = "") {
    pb::CreateKeyRequest req;
    req.set_description("audit e2e");
    pb::PolicyBinding* b = req.mutable_policy()->add_bindings();
    b->add_principals(CustosdProcess::Principal("service-a"));
    for (int op = 1; op <= 6; ++op) {
      b->add_operations(static_cast<pb::KeyOperation>(op));
    }
    pb::Key key;
    grpc::ClientContext ctx;
    ctx.set_deadline(In(std::chrono::seconds(20)));
    if (!request_id.empty()) ctx.AddMetadata("x-request-id", request_id);
    grpc::Status s = Kms("admin")->CreateKey(&ctx, req, &key);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return key.key_id();
  }

  std::unique_ptr<CustosdProcess> server_;
};

TEST_F(AuditE2eTest, EveryRequestAllowedRefusedOrFailedHasExactlyOneRecord) {
  StartServer();
  const std::string key = NewKey("t1-create-key");
  ASSERT_FALSE(key.empty());

  pb::GenerateDataKeyResponse allowed;
  grpc::Status s = GenerateDataKey(Crypto("service-a").get(), key,
                                   "t1-gdk-allowed", &allowed);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(allowed.plaintext().size(), 32u);

  pb::GenerateDataKeyResponse refused;
  s = GenerateDataKey(Crypto("service-b").get(), key, "t1-gdk-refused",
                      &refused);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_TRUE(refused.plaintext().empty());

  {
    pb::DecryptRequest req;
    req.set_ciphertext_blob("this is not a ciphertext blob at all");
    pb::DecryptResponse resp;
    grpc::ClientContext ctx;
    ctx.AddMetadata("x-request-id", "t1-decrypt-garbage");
    s = Crypto("service-a")->Decrypt(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    pb::CreateKeyRequest req;
    pb::Key out;
    grpc::ClientContext ctx;
    ctx.AddMetadata("x-request-id", "t1-create-by-service");
    s = Kms("service-a")->CreateKey(&ctx, req, &out);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  }

  struct Expected {
    const char* request_id;
    const char* identity;
    const char* operation;
    const char* outcome;
    const char* code;
  };
  const std::vector<Expected> expected = {
      {"t1-create-key", "admin", "CreateKey", "ALLOWED", "OK"},
      {"t1-gdk-allowed", "service-a", "GenerateDataKey", "ALLOWED", "OK"},
      {"t1-gdk-refused", "service-b", "GenerateDataKey", "DENIED",
       "PERMISSION_DENIED"},
      {"t1-decrypt-garbage", "service-a", "Decrypt", "FAILED",
       "INVALID_ARGUMENT"},
      {"t1-create-by-service", "service-a", "CreateKey", "DENIED",
       "PERMISSION_DENIED"},
  };
  // Records are durable before the reply: no need to stop the server.
  const std::vector<Json> records = ReadRecords(server_->audit_dir());
  for (const Expected& e : expected) {
    std::vector<Json> found;
    for (const Json& r : records) {
      if (StringField(r, "request_id") == e.request_id) found.push_back(r);
    }
    ASSERT_EQ(found.size(), 1u) << e.request_id;
    const Json& r = found[0];
    EXPECT_EQ(StringField(r, "principal"),
              CustosdProcess::Principal(e.identity))
        << r.dump();
    EXPECT_EQ(StringField(r, "operation"), e.operation) << r.dump();
    EXPECT_EQ(StringField(r, "outcome"), e.outcome) << r.dump();
    EXPECT_EQ(StringField(r, "code"), e.code) << r.dump();
  }
  // The allowed ones name the key they used.
  for (const Json& r : records) {
    const std::string rid = StringField(r, "request_id");
    if (rid == "t1-create-key" || rid == "t1-gdk-allowed") {
      EXPECT_EQ(StringField(r, "key_id"), key) << r.dump();
    }
    if (rid == "t1-gdk-allowed") {
      EXPECT_EQ(r.value("context", Json::object()),
                Json({{"purpose", "audit-e2e"}}));
    }
  }

  // No record holds the data key in any encoding.
  std::string segments;
  for (const std::string& f : SegmentFiles(server_->audit_dir())) {
    segments += ReadAll(f);
  }
  const std::string dk = allowed.plaintext();
  for (const std::string& form :
       {dk, absl::BytesToHexString(dk),
        absl::AsciiStrToUpper(absl::BytesToHexString(dk)),
        absl::Base64Escape(dk), absl::WebSafeBase64Escape(dk)}) {
    EXPECT_EQ(segments.find(form), std::string::npos)
        << "a data key encoding is in the audit log";
  }
  EXPECT_EQ(segments.find(allowed.ciphertext_blob()), std::string::npos);
  EXPECT_EQ(segments.find(absl::Base64Escape(allowed.ciphertext_blob())),
            std::string::npos);
}

TEST_F(AuditE2eTest, ConcurrentClientsLeaveAGapFreeSignedChain) {
  StartServer("audit_checkpoint_every: 100\n");
  const std::string key = NewKey();
  ASSERT_FALSE(key.empty());
  constexpr int kThreads = 64;
  constexpr int kCallsEach = 50;
  std::atomic<int> succeeded{0};
  std::atomic<int> failed{0};
  std::mutex mu;
  std::string first_error;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    // Its own channel (and so its own connection) per client.
    std::shared_ptr<grpc::Channel> channel = server_->Channel("service-a");
    threads.emplace_back([&, channel] {
      auto stub = pb::CryptoService::NewStub(channel);
      for (int i = 0; i < kCallsEach; ++i) {
        pb::GenerateDataKeyResponse resp;
        grpc::Status s = GenerateDataKey(stub.get(), key, "", &resp);
        if (s.ok() && resp.plaintext().size() == 32) {
          ++succeeded;
        } else {
          ++failed;
          std::lock_guard<std::mutex> lock(mu);
          if (first_error.empty()) first_error = s.error_message();
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failed.load(), 0) << first_error;
  ASSERT_GT(succeeded.load(), 0);

  ASSERT_TRUE(server_->Stop().ok());
  int unparsed = 0;
  const std::vector<Json> records =
      ReadRecords(server_->audit_dir(), &unparsed);
  EXPECT_EQ(unparsed, 0);
  ExpectGapFree(records);
  EXPECT_EQ(CountAllowed(records, "GenerateDataKey"),
            static_cast<size_t>(succeeded.load()));

  kms::AuditVerifyReport report;
  ExpectVerifies(server_->audit_dir(), &report);
  ASSERT_EQ(report.nodes.size(), 1u);
  EXPECT_EQ(report.records, records.size());
  // After the batch that reaches 100 records (a batch holds at most one
  // record per client), and once more at shutdown: nothing is left unsigned.
  EXPECT_GE(report.nodes[0].checkpoints,
            static_cast<uint64_t>(succeeded.load()) / (100 + kThreads + 1));
  EXPECT_GE(report.nodes[0].checkpoints, 1u);
  EXPECT_EQ(report.nodes[0].unsigned_tail, 0u)
      << "a clean shutdown signs the head of the chain";
}

TEST_F(AuditE2eTest, KillNineLosesNoRecordOfARepliedRequest) {
  StartServer("audit_checkpoint_every: 100\n");
  const std::string key = NewKey();
  ASSERT_FALSE(key.empty());
  std::mutex mu;
  std::vector<std::string> replied;  // request ids that got an OK reply
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    std::shared_ptr<grpc::Channel> channel = server_->Channel("service-a");
    threads.emplace_back([&, channel, t] {
      auto stub = pb::CryptoService::NewStub(channel);
      for (int i = 0; !stop; ++i) {
        const std::string id = absl::StrCat("crash-", t, "-", i);
        pb::GenerateDataKeyResponse resp;
        if (GenerateDataKey(stub.get(), key, id, &resp).ok()) {
          std::lock_guard<std::mutex> lock(mu);
          replied.push_back(id);
        }
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  server_->Kill(SIGKILL);
  stop = true;
  for (auto& th : threads) th.join();
  ASSERT_GT(replied.size(), 10u);

  ASSERT_TRUE(server_->Restart().ok());
  auto stub = Crypto("service-a");
  std::vector<std::string> after;
  for (int i = 0; i < 5; ++i) {
    const std::string id = absl::StrCat("after-crash-", i);
    pb::GenerateDataKeyResponse resp;
    grpc::Status s = GenerateDataKey(stub.get(), key, id, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    after.push_back(id);
  }
  ASSERT_TRUE(server_->Stop().ok());

  kms::AuditVerifyReport report;
  ExpectVerifies(server_->audit_dir(), &report);
  ASSERT_EQ(report.nodes.size(), 1u);
  // The chain continues in a new segment after the crash.
  EXPECT_GE(report.nodes[0].segments, 2);
  EXPECT_EQ(report.nodes[0].unsigned_tail, 0u);
  int unparsed = 0;
  const std::vector<Json> records =
      ReadRecords(server_->audit_dir(), &unparsed);
  EXPECT_EQ(unparsed, 0) << "the torn line is cut off at restart";
  ExpectGapFree(records);
  std::set<std::string> recorded;
  for (const Json& r : records) {
    if (StringField(r, "operation") == "GenerateDataKey" &&
        StringField(r, "outcome") == "ALLOWED") {
      recorded.insert(StringField(r, "request_id"));
    }
  }
  int missing = 0;
  for (const std::string& id : replied) {
    if (recorded.count(id) == 0) {
      ++missing;
      ADD_FAILURE() << "request " << id << " got a reply but has no record";
      if (missing > 5) break;
    }
  }
  for (const std::string& id : after) {
    EXPECT_EQ(recorded.count(id), 1u) << id;
  }
}

// The audit directory on a 256 KiB tmpfs that the test fills up.
class AuditFullDiskTest : public AuditE2eTest {
 protected:
  void TearDown() override {
    server_.reset();  // custosd must let go of the files first
    if (!mountpoint_.empty()) {
      if (mounted_ && umount(mountpoint_.c_str()) != 0) {
        umount2(mountpoint_.c_str(), MNT_DETACH);
      }
      std::error_code ec;
      fs::remove_all(fs::path(mountpoint_).parent_path(), ec);
    }
  }

  // Writes `path` until its file system is full.
  static void Fill(const std::string& path) {
    int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ASSERT_GE(fd, 0) << std::strerror(errno);
    const std::string chunk(4096, 'f');
    for (;;) {
      ssize_t n = write(fd, chunk.data(), chunk.size());
      if (n < static_cast<ssize_t>(chunk.size())) break;
    }
    // Byte by byte into the last page.
    while (write(fd, "f", 1) == 1) {
    }
    const int error = errno;
    close(fd);
    ASSERT_EQ(error, ENOSPC) << std::strerror(error);
  }

  std::string mountpoint_;
  bool mounted_ = false;
};

TEST_F(AuditFullDiskTest, AFullAuditDiskFailsClosedAndRecoversWithoutRestart) {
  absl::StatusOr<std::string> tmp = testing::MakeTempDir("custos-audit-fs");
  ASSERT_TRUE(tmp.ok()) << tmp.status();
  mountpoint_ = *tmp + "/audit";
  ASSERT_TRUE(fs::create_directory(mountpoint_));
  if (mount("tmpfs", mountpoint_.c_str(), "tmpfs", 0, "size=256k,mode=0700") !=
      0) {
    GTEST_SKIP() << "cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): "
                 << std::strerror(errno);
  }
  mounted_ = true;

  // custos.yaml keeps the first of duplicate keys (yaml-cpp), so appending
  // `audit_dir:` would be ignored: rewrite the line instead, carrying the
  // chain written so far over to the tmpfs.
  StartServer();
  const std::string key = NewKey();
  ASSERT_FALSE(key.empty());
  ASSERT_TRUE(server_->Stop().ok());
  for (const auto& e : fs::directory_iterator(server_->audit_dir())) {
    fs::copy_file(e.path(), mountpoint_ + "/" + e.path().filename().string());
  }
  const std::string config_path = server_->dir() + "/custos.yaml";
  std::string config;
  {
    std::istringstream in(ReadAll(config_path));
    std::string line;
    int replaced = 0;
    while (std::getline(in, line)) {
      if (absl::StartsWith(line, "audit_dir:")) {
        line = "audit_dir: " + mountpoint_;
        ++replaced;
      }
      config += line + "\n";
    }
    ASSERT_EQ(replaced, 1) << config;
  }
  {
    std::ofstream out(config_path, std::ios::trunc);
    out << config;
    ASSERT_TRUE(out.good());
  }
  ASSERT_TRUE(server_->Restart().ok());

  auto stub = Crypto("service-a");
  int ok_replies = 0;
  pb::GenerateDataKeyResponse resp;
  grpc::Status s = GenerateDataKey(stub.get(), key, "", &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ++ok_replies;

  Fill(mountpoint_ + "/filler");
  // The segment's last page may still hold a few records; a record that
  // fits is durable and its call may succeed. Once one does not fit, none
  // does.
  int slack = 0;
  for (;; ++slack) {
    ASSERT_LT(slack, 64) << "records kept being written to a full disk";
    pb::GenerateDataKeyResponse r;
    s = GenerateDataKey(stub.get(), key, "", &r);
    if (!s.ok()) break;
    ++ok_replies;
  }
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();

  // Under load: every call is refused and releases nothing.
  std::atomic<int> refused_ok{0};
  std::atomic<int> wrongly_served{0};
  std::atomic<int> leaked{0};
  std::mutex mu;
  std::string wrong;
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    std::shared_ptr<grpc::Channel> channel = server_->Channel("service-a");
    threads.emplace_back([&, channel] {
      auto own = pb::CryptoService::NewStub(channel);
      for (int i = 0; i < 25; ++i) {
        pb::GenerateDataKeyResponse r;
        grpc::Status st = GenerateDataKey(own.get(), key, "", &r);
        if (!r.plaintext().empty()) ++leaked;
        if (st.error_code() == grpc::StatusCode::UNAVAILABLE) {
          ++refused_ok;
        } else {
          ++wrongly_served;
          std::lock_guard<std::mutex> lock(mu);
          wrong = absl::StrCat(st.error_code(), " ", st.error_message());
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(refused_ok.load(), 8 * 25);
  EXPECT_EQ(wrongly_served.load(), 0) << wrong;
  EXPECT_EQ(leaked.load(), 0);
  ASSERT_TRUE(server_->running()) << "custosd must keep running";

  // Space comes back: calls succeed again, without a restart.
  fs::remove(mountpoint_ + "/filler");
  const auto give_up =
      std::chrono::steady_clock::now() + std::chrono::seconds(5);
  bool recovered = false;
  while (std::chrono::steady_clock::now() < give_up) {
    pb::GenerateDataKeyResponse r;
    if (GenerateDataKey(stub.get(), key, "", &r).ok()) {
      EXPECT_EQ(r.plaintext().size(), 32u);
      ++ok_replies;
      recovered = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(recovered) << "still refusing 5 s after the disk had room";
  for (int i = 0; i < 20; ++i) {
    pb::GenerateDataKeyResponse r;
    s = GenerateDataKey(stub.get(), key, "", &r);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ++ok_replies;
  }

  ASSERT_TRUE(server_->Stop().ok());
  kms::AuditVerifyReport report;
  ExpectVerifies(mountpoint_, &report);
  const std::vector<Json> records = ReadRecords(mountpoint_);
  ExpectGapFree(records);
  // Refused calls left no record (none could be written); served ones did.
  EXPECT_EQ(CountAllowed(records, "GenerateDataKey"),
            static_cast<size_t>(ok_replies));
}

}  // namespace
}  // namespace custos
