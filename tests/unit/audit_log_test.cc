// FileAuditLog in a temporary directory: gap-free sequence numbers, the hash
// chain, group commit under concurrency, continuation across restarts and
// torn final lines, rolling segments by size and age, and the allow-list of
// fields.
#include "kms/audit/audit_log.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/testing/status_matchers.h"
#include "kms/audit/audit_verifier.h"
#include "kms/audit/json_text.h"
#include "kms/policy.h"
#include "kms/audit_api.h"
#include "kms/authorizer.h"
#include "nlohmann/json.hpp"
#include "tests/support/memory_signer.h"
#include "tests/support/test_token.h"

namespace custos::kms {
namespace {

using ::custos::testing::IsOk;
using ::custos::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::IsSubsetOf;
using ::testing::UnorderedElementsAreArray;

constexpr char kNode[] = "node-1";

// Every field a record may carry (docs: audit_log.h, Serialize).
const std::set<std::string>& DocumentedFields() {
  static const auto* fields = new std::set<std::string>{
      "seq",         "time",          "node",
      "principal",   "operation",     "key_id",
      "key_version", "context",       "justification",
      "outcome",     "code",          "request_id",
      "peer",        "detail",        "prev",
      "policy",      "policy_sha256", "policy_truncated"};
  return *fields;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Every segment of `dir`, in name order.
std::vector<std::string> Segments(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.path().extension() != ".jsonl") continue;  // the lock file
    out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Every line of every segment of `dir`, in order, without newlines. Fails the
// test if a segment does not end with a newline.
std::vector<std::string> AllLines(const std::string& dir) {
  std::vector<std::string> lines;
  for (const std::string& path : Segments(dir)) {
    std::string text = ReadFile(path);
    if (text.empty()) continue;
    EXPECT_EQ(text.back(), '\n') << path;
    text.pop_back();
    for (absl::string_view line : absl::StrSplit(text, '\n')) {
      lines.emplace_back(line);
    }
  }
  return lines;
}

// Checks that `lines` number 1..n without gaps and chain from the genesis
// hash. Returns the hash of the last line.
std::string ExpectValidChain(const std::vector<std::string>& lines) {
  std::string prev = kAuditGenesisHash;
  for (size_t i = 0; i < lines.size(); ++i) {
    nlohmann::json j = nlohmann::json::parse(lines[i], nullptr, false);
    if (j.is_discarded()) {
      ADD_FAILURE() << "line " << i << " is not JSON: " << lines[i];
      return prev;
    }
    EXPECT_EQ(j.value("seq", uint64_t{0}), i + 1) << lines[i];
    EXPECT_EQ(j.value("prev", std::string()), prev) << "seq " << i + 1;
    EXPECT_EQ(j.value("node", std::string()), kNode);
    prev = AuditLineHash(lines[i]);
  }
  return prev;
}

AuditRecord SimpleRecord(const std::string& principal, int n) {
  AuditRecord r;
  r.time = absl::Now();
  r.principal = principal;
  r.operation = "Encrypt";
  r.key_id = "k-0123456789abcdefghijklmnop";
  r.key_version = 1;
  r.request_id = absl::StrCat("req-", n);
  return r;
}

class AuditLogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::string> dir =
        ::custos::testing::MakeTempDir("custos-audit");
    ASSERT_TRUE(dir.ok()) << dir.status();
    root_ = *dir;
    dir_ = root_ + "/audit";  // Open creates it
  }
  void TearDown() override {
    if (!root_.empty()) std::filesystem::remove_all(root_);
  }

  std::unique_ptr<FileAuditLog> Open(
      uint64_t max_segment_bytes = uint64_t{64} << 20,
      absl::Duration max_segment_age = absl::Hours(24)) {
    FileAuditLog::Options options;
    options.dir = dir_;
    options.node_id = kNode;
    options.max_segment_bytes = max_segment_bytes;
    options.max_segment_age = max_segment_age;
    absl::StatusOr<std::unique_ptr<FileAuditLog>> log =
        FileAuditLog::Open(options);
    EXPECT_THAT(log, IsOk());
    return log.ok() ? *std::move(log) : nullptr;
  }

  std::string root_, dir_;
};

TEST_F(AuditLogTest, OpenRefusesEmptyDirOrNode) {
  FileAuditLog::Options options;
  options.node_id = kNode;
  EXPECT_THAT(
      FileAuditLog::Open(options),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("audit_dir")));
  options.dir = dir_;
  options.node_id = "";
  EXPECT_THAT(
      FileAuditLog::Open(options),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("node_id")));
}

TEST_F(AuditLogTest, AppendsGapFreeSequenceWithHashChain) {
  std::unique_ptr<FileAuditLog> log = Open();
  ASSERT_NE(log, nullptr);
  EXPECT_EQ(log->segment_path(),
            dir_ + "/audit-node-1-00000000000000000001.jsonl");
  for (int i = 0; i < 5; ++i) {
    ASSERT_THAT(log->Append(SimpleRecord("spiffe://example.org/a", i)), IsOk());
  }
  // Each Append returns only once its record is on disk.
  std::vector<std::string> lines = AllLines(dir_);
  ASSERT_EQ(lines.size(), 5u);
  ExpectValidChain(lines);
  nlohmann::json first = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(first["prev"], kAuditGenesisHash);
  EXPECT_EQ(first["principal"], "spiffe://example.org/a");
  EXPECT_EQ(first["operation"], "Encrypt");
  EXPECT_EQ(first["request_id"], "req-0");
  EXPECT_EQ(first["outcome"], "ALLOWED");
  EXPECT_EQ(first["code"], "OK");
  FileAuditLog::Stats stats = log->stats();
  EXPECT_EQ(stats.records, 5u);
  EXPECT_EQ(stats.next_seq, 6u);
  EXPECT_EQ(stats.failures, 0u);
}

TEST_F(AuditLogTest, MetricsCountRecordsSyncsAndQueueDepth) {
  metrics::Registry registry;  // outlives the log
  FileAuditLog::Options options;
  options.dir = dir_;
  options.node_id = kNode;
  options.metrics = &registry;
  absl::StatusOr<std::unique_ptr<FileAuditLog>> log =
      FileAuditLog::Open(options);
  ASSERT_THAT(log, IsOk());
  for (int i = 0; i < 3; ++i) {
    ASSERT_THAT((*log)->Append(SimpleRecord("spiffe://example.org/a", i)),
                IsOk());
  }
  // One caller at a time: one batch, so one fdatasync, per record.
  const std::string text = registry.Render();
  EXPECT_THAT(text,
              HasSubstr("\ncustos_audit_fsync_duration_seconds_count 3\n"));
  EXPECT_THAT(text, HasSubstr("\ncustos_audit_records_total 3\n"));
  EXPECT_THAT(text, HasSubstr("\ncustos_audit_write_failures_total 0\n"));
  EXPECT_THAT(text, HasSubstr("\ncustos_audit_queue_depth 0\n"));
  log->reset();
  EXPECT_THAT(registry.Render(),
              ::testing::Not(HasSubstr("custos_audit_records_total 3")));
}

TEST_F(AuditLogTest, ChainDetectsAnEditedLine) {
  std::unique_ptr<FileAuditLog> log = Open();
  ASSERT_NE(log, nullptr);
  for (int i = 0; i < 3; ++i) {
    ASSERT_THAT(log->Append(SimpleRecord("alice", i)), IsOk());
  }
  std::vector<std::string> lines = AllLines(dir_);
  ASSERT_EQ(lines.size(), 3u);
  std::string edited = lines[1];
  const size_t at = edited.find("alice");
  ASSERT_NE(at, std::string::npos);
  edited.replace(at, 5, "mallo");
  nlohmann::json third = nlohmann::json::parse(lines[2]);
  EXPECT_EQ(third["prev"], AuditLineHash(lines[1]));
  EXPECT_NE(third["prev"], AuditLineHash(edited));
}

TEST_F(AuditLogTest, ConcurrentAppendsAreGapFreeAndGroupCommitted) {
  std::unique_ptr<FileAuditLog> log = Open();
  ASSERT_NE(log, nullptr);
  constexpr int kThreads = 64;
  constexpr int kPerThread = 50;
  std::vector<std::thread> threads;
  std::vector<int> failures(kThreads, 0);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        if (!log->Append(SimpleRecord(absl::StrCat("thread-", t), i)).ok()) {
          ++failures[t];
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(failures[t], 0) << t;

  std::vector<std::string> lines = AllLines(dir_);
  ASSERT_EQ(lines.size(), static_cast<size_t>(kThreads * kPerThread));
  ExpectValidChain(lines);
  // Every record is there exactly once.
  std::set<std::string> seen;
  for (const std::string& line : lines) {
    nlohmann::json j = nlohmann::json::parse(line);
    seen.insert(absl::StrCat(j["principal"].get<std::string>(), "/",
                             j["request_id"].get<std::string>()));
  }
  EXPECT_EQ(seen.size(), static_cast<size_t>(kThreads * kPerThread));

  FileAuditLog::Stats stats = log->stats();
  EXPECT_EQ(stats.records, static_cast<uint64_t>(kThreads * kPerThread));
  EXPECT_EQ(stats.next_seq, static_cast<uint64_t>(kThreads * kPerThread + 1));
  EXPECT_LT(stats.batches, stats.records) << "no group commit happened";
  EXPECT_GT(stats.batches, 0u);
}

TEST_F(AuditLogTest, ReopenContinuesSequenceAndChainInANewSegment) {
  std::string first_segment;
  {
    std::unique_ptr<FileAuditLog> log = Open();
    ASSERT_NE(log, nullptr);
    first_segment = log->segment_path();
    for (int i = 0; i < 3; ++i) {
      ASSERT_THAT(log->Append(SimpleRecord("a", i)), IsOk());
    }
  }
  {
    std::unique_ptr<FileAuditLog> log = Open();
    ASSERT_NE(log, nullptr);
    EXPECT_NE(log->segment_path(), first_segment);
    EXPECT_EQ(log->segment_path(),
              dir_ + "/audit-node-1-00000000000000000004.jsonl");
    EXPECT_EQ(log->stats().next_seq, 4u);
    for (int i = 3; i < 5; ++i) {
      ASSERT_THAT(log->Append(SimpleRecord("a", i)), IsOk());
    }
  }
  EXPECT_EQ(Segments(dir_).size(), 2u);
  std::vector<std::string> lines = AllLines(dir_);
  ASSERT_EQ(lines.size(), 5u);
  ExpectValidChain(lines);
}

// Node "node-1" and node "node-1-b" share the directory: each continues
// its own chain, never the other's (their file names share a prefix).
TEST_F(AuditLogTest, NodeWhoseNameExtendsAnotherKeepsItsOwnChain) {
  {
    FileAuditLog::Options options;
    options.dir = dir_;
    options.node_id = std::string(kNode) + "-b";
    absl::StatusOr<std::unique_ptr<FileAuditLog>> other =
        FileAuditLog::Open(options);
    ASSERT_THAT(other, IsOk());
    for (int i = 0; i < 5; ++i) {
      ASSERT_THAT((*other)->Append(SimpleRecord("b", i)), IsOk());
    }
  }
  std::unique_ptr<FileAuditLog> log = Open();
  ASSERT_NE(log, nullptr);
  EXPECT_EQ(log->stats().next_seq, 1u);
  EXPECT_EQ(log->segment_path(),
            dir_ + "/audit-" + kNode + "-00000000000000000001.jsonl");
  ASSERT_THAT(log->Append(SimpleRecord("a", 0)), IsOk());
}

TEST_F(AuditLogTest, ReopenAfterAnEmptySegmentStillContinues) {
  {
    std::unique_ptr<FileAuditLog> log = Open();
    ASSERT_NE(log, nullptr);
    ASSERT_THAT(log->Append(SimpleRecord("a", 0)), IsOk());
  }
  { ASSERT_NE(Open(), nullptr); }  // opens a segment and writes nothing
  {
    std::unique_ptr<FileAuditLog> log = Open();
    ASSERT_NE(log, nullptr);
    EXPECT_EQ(log->stats().next_seq, 2u);
    ASSERT_THAT(log->Append(SimpleRecord("a", 1)), IsOk());
  }
  std::vector<std::string> lines = AllLines(dir_);
  ASSERT_EQ(lines.size(), 2u);
  ExpectValidChain(lines);
}

TEST_F(AuditLogTest, TornFinalLineIsTruncatedAndTheChainContinues) {
  std::string segment;
  {
    std::unique_ptr<FileAuditLog> log = Open();
    ASSERT_NE(log, nullptr);
    segment = log->segment_path();
    for (int i = 0; i < 3; ++i) {
      ASSERT_THAT(log->Append(SimpleRecord("a", i)), IsOk());
    }
  }
  const std::string intact = ReadFile(segment);
  {
    // Half of a JSON line, as a crash mid-write would leave it.
    std::ofstream out(segment, std::ios::binary | std::ios::app);
    out << R"({"seq":4,"time":"2024-01-01T00:00:00.000000Z","node":"nod)";
  }
  ASSERT_NE(ReadFile(segment), intact);
  {
    std::unique_ptr<FileAuditLog> log = Open();
    ASSERT_NE(log, nullptr);
    EXPECT_EQ(ReadFile(segment), intact) << "torn line not truncated";
    EXPECT_EQ(log->stats().next_seq, 4u);
    ASSERT_THAT(log->Append(SimpleRecord("a", 3)), IsOk());
  }
  std::vector<std::string> lines = AllLines(dir_);
  ASSERT_EQ(lines.size(), 4u);
  ExpectValidChain(lines);
}

TEST_F(AuditLogTest, SegmentHoldingOnlyATornLineFallsBackToThePrevious) {
  {
    std::unique_ptr<FileAuditLog> log = Open();
    ASSERT_NE(log, nullptr);
    ASSERT_THAT(log->Append(SimpleRecord("a", 0)), IsOk());
    ASSERT_THAT(log->Append(SimpleRecord("a", 1)), IsOk());
  }
  std::string second;
  {
    std::unique_ptr<FileAuditLog> log = Open();
    ASSERT_NE(log, nullptr);
    second = log->segment_path();
  }
  {
    std::ofstream out(second, std::ios::binary | std::ios::app);
    out << R"({"seq":3,"ti)";
  }
  {
    std::unique_ptr<FileAuditLog> log = Open();
    ASSERT_NE(log, nullptr);
    EXPECT_EQ(log->stats().next_seq, 3u);
    ASSERT_THAT(log->Append(SimpleRecord("a", 2)), IsOk());
  }
  std::vector<std::string> lines = AllLines(dir_);
  ASSERT_EQ(lines.size(), 3u);
  ExpectValidChain(lines);
}

TEST_F(AuditLogTest, CorruptLastRecordRefusesToOpen) {
  std::string segment;
  {
    std::unique_ptr<FileAuditLog> log = Open();
    ASSERT_NE(log, nullptr);
    segment = log->segment_path();
    ASSERT_THAT(log->Append(SimpleRecord("a", 0)), IsOk());
  }
  {
    std::ofstream out(segment, std::ios::binary | std::ios::app);
    out << "this is not a record\n";
  }
  FileAuditLog::Options options;
  options.dir = dir_;
  options.node_id = kNode;
  // Run in a child process: a failing Open must return DATA_LOSS and not
  // bring the process down, and a crash here must not hide the other tests.
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        absl::StatusOr<std::unique_ptr<FileAuditLog>> log =
            FileAuditLog::Open(options);
        const bool data_loss =
            log.status().code() == absl::StatusCode::kDataLoss;
        // The child reran SetUp in a directory of its own; exit skips
        // TearDown.
        std::filesystem::remove_all(root_);
        std::exit(data_loss ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
}

// Each segment is named after the seq of its first line.
void ExpectSegmentsNamedByFirstSeq(const std::string& dir) {
  for (const std::string& path : Segments(dir)) {
    std::string text = ReadFile(path);
    if (text.empty()) continue;
    nlohmann::json first =
        nlohmann::json::parse(text.substr(0, text.find('\n')));
    EXPECT_EQ(path, absl::StrFormat("%s/audit-%s-%020d.jsonl", dir, kNode,
                                    first["seq"].get<uint64_t>()));
  }
}

TEST_F(AuditLogTest, RollsAtTheSizeLimitAndTheChainContinues) {
  constexpr uint64_t kMaxBytes = 1000;
  std::unique_ptr<FileAuditLog> log = Open(kMaxBytes);
  ASSERT_NE(log, nullptr);
  std::set<std::string> paths = {log->segment_path()};
  for (int i = 0; i < 30; ++i) {
    ASSERT_THAT(log->Append(SimpleRecord("a", i)), IsOk());
    paths.insert(log->segment_path());
  }
  const std::vector<std::string> segments = Segments(dir_);
  ASSERT_GE(segments.size(), 3u);
  EXPECT_EQ(paths, std::set<std::string>(segments.begin(), segments.end()));
  EXPECT_EQ(log->segment_path(), segments.back());
  EXPECT_EQ(log->stats().segments, segments.size());
  // Appends one at a time: every segment but the newest reached the limit
  // and stopped at the first batch after it.
  const size_t line_size = ReadFile(segments[0]).find('\n') + 1;
  for (size_t i = 0; i + 1 < segments.size(); ++i) {
    const uint64_t size = std::filesystem::file_size(segments[i]);
    EXPECT_GE(size, kMaxBytes) << segments[i];
    EXPECT_LT(size, kMaxBytes + 2 * line_size) << segments[i];
  }
  std::vector<std::string> lines = AllLines(dir_);
  ASSERT_EQ(lines.size(), 30u);
  ExpectValidChain(lines);
  ExpectSegmentsNamedByFirstSeq(dir_);
}

TEST_F(AuditLogTest, RollsAtTheAgeLimit) {
  // Age zero: every batch after the first finds its segment due.
  std::unique_ptr<FileAuditLog> log =
      Open(uint64_t{64} << 20, absl::ZeroDuration());
  ASSERT_NE(log, nullptr);
  for (int i = 0; i < 4; ++i) {
    ASSERT_THAT(log->Append(SimpleRecord("a", i)), IsOk());
  }
  EXPECT_EQ(Segments(dir_).size(), 4u);
  EXPECT_EQ(log->segment_path(),
            dir_ + "/audit-node-1-00000000000000000004.jsonl");
  ExpectValidChain(AllLines(dir_));
  ExpectSegmentsNamedByFirstSeq(dir_);
}

TEST_F(AuditLogTest, ChainContinuesAcrossRollsAndReopen) {
  {
    std::unique_ptr<FileAuditLog> log = Open(600);
    ASSERT_NE(log, nullptr);
    for (int i = 0; i < 10; ++i) {
      ASSERT_THAT(log->Append(SimpleRecord("a", i)), IsOk());
    }
    EXPECT_GE(log->stats().segments, 2u);
  }
  const size_t before = Segments(dir_).size();
  {
    std::unique_ptr<FileAuditLog> log = Open(600);
    ASSERT_NE(log, nullptr);
    EXPECT_EQ(log->stats().next_seq, 11u);
    EXPECT_EQ(log->segment_path(),
              dir_ + "/audit-node-1-00000000000000000011.jsonl");
    for (int i = 10; i < 20; ++i) {
      ASSERT_THAT(log->Append(SimpleRecord("a", i)), IsOk());
    }
  }
  EXPECT_GE(Segments(dir_).size(), before + 2);
  std::vector<std::string> lines = AllLines(dir_);
  ASSERT_EQ(lines.size(), 20u);
  ExpectValidChain(lines);
  ExpectSegmentsNamedByFirstSeq(dir_);
}

TEST_F(AuditLogTest, ConcurrentAppendsAcrossRollsStayGapFree) {
  std::unique_ptr<FileAuditLog> log = Open(4096);
  ASSERT_NE(log, nullptr);
  constexpr int kThreads = 16;
  constexpr int kPerThread = 40;
  std::atomic<bool> done{false};
  // segment_path() may be read while the writer rolls.
  std::thread reader([&] {
    while (!done) EXPECT_THAT(log->segment_path(), HasSubstr("/audit-"));
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        EXPECT_THAT(log->Append(SimpleRecord(absl::StrCat("t", t), i)), IsOk());
      }
    });
  }
  for (std::thread& th : threads) th.join();
  done = true;
  reader.join();
  EXPECT_GE(Segments(dir_).size(), 3u);
  std::vector<std::string> lines = AllLines(dir_);
  ASSERT_EQ(lines.size(), static_cast<size_t>(kThreads * kPerThread));
  ExpectValidChain(lines);
  ExpectSegmentsNamedByFirstSeq(dir_);
}

// Asynchronous and synchronous callers share the log, and then the log is
// destroyed while the asynchronous ones are still appending. Every `done`
// runs exactly once: OK for a record that is on disk, UNAVAILABLE (on the
// caller's own thread, before AppendAsync returns) for one refused because
// the log is shutting down, nothing else. A call that starts after the
// destructor has returned would be the caller's bug, so a completion holds
// the destructor open (it joins the completer thread) until every
// asynchronous caller has been refused and stopped.
TEST_F(AuditLogTest, AsyncAndSyncAppendsRacingShutdownCompleteEachCallOnce) {
  std::unique_ptr<FileAuditLog> log = Open();
  ASSERT_NE(log, nullptr);
  FileAuditLog* const raw = log.get();
  struct Call {
    std::atomic<int> runs{0};
    std::atomic<int> code{-1};
  };
  constexpr int kAsyncThreads = 6;
  constexpr int kSyncThreads = 4;
  constexpr int kSyncAppends = 25;
  constexpr int kUnavailable = static_cast<int>(absl::StatusCode::kUnavailable);
  // Each asynchronous thread's calls in order. Only that thread adds to its
  // deque, which never moves an element that a `done` may still touch.
  std::vector<std::deque<Call>> calls(kAsyncThreads);
  std::vector<int> refused(kAsyncThreads, 0);
  std::atomic<int> async_running{kAsyncThreads};
  std::vector<std::thread> async_threads;
  for (int t = 0; t < kAsyncThreads; ++t) {
    async_threads.emplace_back([&, raw, t] {
      for (int i = 0;; ++i) {
        Call& call = calls[t].emplace_back();
        raw->AppendAsync(SimpleRecord(absl::StrCat("async-", t), i),
                         [&call](absl::Status s) {
                           call.code = static_cast<int>(s.code());
                           ++call.runs;
                         });
        // Only a refusal can have said UNAVAILABLE by now (the log's own
        // thread only completes OK here: no write fails).
        if (call.code.load() == kUnavailable) {
          ++refused[t];
          break;
        }
        absl::SleepFor(absl::Microseconds(200));
      }
      --async_running;
    });
  }
  std::vector<std::thread> sync_threads;
  for (int t = 0; t < kSyncThreads; ++t) {
    sync_threads.emplace_back([raw, t] {
      for (int i = 0; i < kSyncAppends; ++i) {
        EXPECT_THAT(raw->Append(SimpleRecord(absl::StrCat("sync-", t), i)),
                    IsOk());
      }
    });
  }
  for (std::thread& th : sync_threads) th.join();
  std::atomic<int> gate_runs{0};
  raw->AppendAsync(SimpleRecord("gate", 0), [&](absl::Status s) {
    EXPECT_THAT(s, IsOk());
    ++gate_runs;
    while (async_running.load() > 0) absl::SleepFor(absl::Milliseconds(1));
  });
  log.reset();  // from its first line on, new records are refused
  for (std::thread& th : async_threads) th.join();

  EXPECT_EQ(gate_runs.load(), 1);
  std::set<std::string> acknowledged = {"gate/req-0"};
  for (int t = 0; t < kSyncThreads; ++t) {
    for (int i = 0; i < kSyncAppends; ++i) {
      acknowledged.insert(absl::StrCat("sync-", t, "/req-", i));
    }
  }
  for (int t = 0; t < kAsyncThreads; ++t) {
    EXPECT_EQ(refused[t], 1) << "async-" << t;
    int i = 0;
    for (const Call& call : calls[t]) {
      SCOPED_TRACE(absl::StrCat("async-", t, " call ", i));
      EXPECT_EQ(call.runs.load(), 1);
      if (call.code.load() == static_cast<int>(absl::StatusCode::kOk)) {
        acknowledged.insert(absl::StrCat("async-", t, "/req-", i));
      } else {
        // Only each thread's last call, the one refused.
        EXPECT_EQ(call.code.load(), kUnavailable);
        EXPECT_EQ(i + 1, static_cast<int>(calls[t].size()));
      }
      ++i;
    }
  }
  // What was acknowledged is exactly what is on disk, chained.
  std::vector<std::string> lines = AllLines(dir_);
  ExpectValidChain(lines);
  std::set<std::string> on_disk;
  for (const std::string& line : lines) {
    nlohmann::json j = nlohmann::json::parse(line);
    on_disk.insert(absl::StrCat(j["principal"].get<std::string>(), "/",
                                j["request_id"].get<std::string>()));
  }
  EXPECT_EQ(on_disk.size(), lines.size()) << "a record was written twice";
  EXPECT_EQ(on_disk, acknowledged);
}

TEST_F(AuditLogTest, RecordsCarryOnlyDocumentedFields) {
  std::unique_ptr<FileAuditLog> log = Open();
  ASSERT_NE(log, nullptr);
  AuditRecord full;
  full.time = absl::FromUnixMicros(1700000000123456);
  full.principal = "spiffe://example.org/billing";
  full.operation = "GenerateDataKey";
  full.key_id = "k-0123456789abcdefghijklmnop";
  full.key_version = 3;
  full.context = {{"tenant", "acme"}, {"env", "prod"}};
  full.has_justification = true;
  full.justification.reason = JustificationReason::kCustomerInitiatedAccess;
  full.justification.detail = "ticket 42";
  full.outcome = AuditOutcome::kDenied;
  full.code = absl::StatusCode::kPermissionDenied;
  full.request_id = "req-full";
  full.peer = "ipv4:10.0.0.1:5555";
  full.detail = "count=1";
  full.policy = R"({"bindings":[],"version":1})";
  ASSERT_THAT(log->Append(full), IsOk());
  AuditRecord minimal;
  minimal.time = absl::Now();
  minimal.principal = "p";
  minimal.operation = "ListKeys";
  ASSERT_THAT(log->Append(minimal), IsOk());

  std::vector<std::string> lines = AllLines(dir_);
  ASSERT_EQ(lines.size(), 2u);
  nlohmann::json j = nlohmann::json::parse(lines[0]);
  std::vector<std::string> keys;
  for (auto it = j.begin(); it != j.end(); ++it) keys.push_back(it.key());
  std::set<std::string> expected_keys = DocumentedFields();
  expected_keys.erase("policy_truncated");  // only for huge policies
  EXPECT_THAT(keys, UnorderedElementsAreArray(expected_keys));
  EXPECT_EQ(j["time"], "2023-11-14T22:13:20.123456Z");
  EXPECT_EQ(j["key_version"], 3);
  EXPECT_EQ(j["context"]["tenant"], "acme");
  EXPECT_EQ(j["justification"]["reason"], "CUSTOMER_INITIATED_ACCESS");
  EXPECT_EQ(j["outcome"], "DENIED");
  EXPECT_EQ(j["code"], "PERMISSION_DENIED");
  // Nested objects hold only their documented members too.
  std::vector<std::string> justification_keys;
  for (auto it = j["justification"].begin(); it != j["justification"].end();
       ++it) {
    justification_keys.push_back(it.key());
  }
  EXPECT_THAT(justification_keys,
              UnorderedElementsAreArray({"reason", "detail"}));

  nlohmann::json m = nlohmann::json::parse(lines[1]);
  std::set<std::string> minimal_keys;
  for (auto it = m.begin(); it != m.end(); ++it) minimal_keys.insert(it.key());
  EXPECT_THAT(minimal_keys, IsSubsetOf(DocumentedFields()));
  for (const char* absent :
       {"key_id", "key_version", "context", "justification", "request_id",
        "peer", "detail", "policy", "policy_sha256"}) {
    EXPECT_EQ(minimal_keys.count(absent), 0u) << absent;
  }
  // No field name anywhere in the log sounds like a secret.
  for (const std::string& line : lines) {
    nlohmann::json rec = nlohmann::json::parse(line);
    for (auto it = rec.begin(); it != rec.end(); ++it) {
      EXPECT_EQ(DocumentedFields().count(it.key()), 1u) << it.key();
      for (const char* word : {"plaintext", "ciphertext", "pin", "secret",
                               "password", "data_key", "material", "blob"}) {
        EXPECT_EQ(it.key().find(word), std::string::npos) << it.key();
      }
    }
  }
}

TEST_F(AuditLogTest, OneWriterPerNodeAndDirectory) {
  std::unique_ptr<FileAuditLog> first = Open();
  ASSERT_NE(first, nullptr);
  FileAuditLog::Options same;
  same.dir = dir_;
  same.node_id = kNode;
  absl::StatusOr<std::unique_ptr<FileAuditLog>> second =
      FileAuditLog::Open(same);
  EXPECT_THAT(second.status(),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("in use by another custosd")));
  FileAuditLog::Options other = same;
  other.node_id = std::string(kNode) + "-other";
  EXPECT_THAT(FileAuditLog::Open(other).status(), IsOk());
  ASSERT_THAT(first->Append(SimpleRecord("a", 0)), IsOk());
  first.reset();  // the lock goes with the log
  EXPECT_THAT(FileAuditLog::Open(same).status(), IsOk());
}

TEST_F(AuditLogTest, HostileStringsStayOnOneLine) {
  std::unique_ptr<FileAuditLog> log = Open();
  ASSERT_NE(log, nullptr);
  AuditRecord r = SimpleRecord("evil\n{\"seq\":999}", 0);
  static constexpr char kDetail[] = "bad utf-8 \xff\xfe and NUL \0 end";
  r.detail = std::string(kDetail, sizeof(kDetail) - 1);  // the NUL included
  r.context = {{"k\n", "v\r\n"}};
  ASSERT_THAT(log->Append(r), IsOk());
  ASSERT_THAT(log->Append(SimpleRecord("next", 1)), IsOk());
  std::vector<std::string> lines = AllLines(dir_);
  ASSERT_EQ(lines.size(), 2u);
  ExpectValidChain(lines);
  nlohmann::json j = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(j["principal"], "evil\n{\"seq\":999}");
}

// A policy set by a call is in its record: whole (as an object) when small,
// else by hash and a prefix cut at a character boundary, so that no record
// grows with the policy.
TEST_F(AuditLogTest, PolicyIsRecordedWholeOrByHashAndPrefix) {
  std::unique_ptr<FileAuditLog> log = Open();
  ASSERT_NE(log, nullptr);
  KeyPolicy small;
  small.version = 2;
  small.bindings.push_back(
      PolicyBinding{.principals = {"spiffe://t/svc-a"},
                    .operations = {KeyOperation::kDecrypt},
                    .required_context = {{"tenant", "*"}}});
  AuditRecord record = SimpleRecord("admin", 1);
  record.policy = PolicyToCanonicalJson(small);
  ASSERT_THAT(log->Append(record), IsOk());

  KeyPolicy huge;
  PolicyBinding binding;
  binding.operations = {KeyOperation::kDecrypt};
  // 200 principals of ~120 bytes, each with a 3-byte character that a cut
  // could split: well over kMaxAuditPolicyBytes.
  for (int i = 0; i < 200; ++i) {
    binding.principals.push_back(
        absl::StrCat("spiffe://t/\xe2\x82\xac", std::string(100, 'x'), i));
  }
  huge.bindings.push_back(binding);
  AuditRecord big = SimpleRecord("admin", 2);
  big.policy = PolicyToCanonicalJson(huge);
  ASSERT_GT(big.policy.size(), kMaxAuditPolicyBytes);
  ASSERT_THAT(log->Append(big), IsOk());

  std::vector<std::string> lines = AllLines(dir_);
  ASSERT_EQ(lines.size(), 2u);
  nlohmann::json j = nlohmann::json::parse(lines[0]);
  ASSERT_TRUE(j["policy"].is_object()) << lines[0];
  EXPECT_EQ(j["policy"].dump(), record.policy) << "canonical, as given";
  EXPECT_EQ(j["policy"]["bindings"][0]["principals"][0], "spiffe://t/svc-a");
  EXPECT_EQ(j["policy"]["version"], 2);
  EXPECT_EQ(j["policy_sha256"], AuditLineHash(record.policy));
  EXPECT_FALSE(j.contains("policy_truncated"));

  nlohmann::json k = nlohmann::json::parse(lines[1]);  // valid UTF-8 too
  EXPECT_FALSE(k.contains("policy"));
  EXPECT_EQ(k["policy_sha256"], AuditLineHash(big.policy));
  const std::string prefix = k["policy_truncated"].get<std::string>();
  EXPECT_LE(prefix.size(), kAuditPolicyPrefixBytes);
  EXPECT_GT(prefix.size(), kAuditPolicyPrefixBytes - 4);
  EXPECT_EQ(big.policy.substr(0, prefix.size()), prefix);
  EXPECT_LT(lines[1].size(), kAuditPolicyPrefixBytes + 1024);
}

TEST(PolicyToCanonicalJsonTest, SortsKeysAndHasNoWhitespace) {
  KeyPolicy policy;
  policy.version = 3;
  policy.bindings.push_back(
      PolicyBinding{.principals = {"a b"},
                    .operations = {KeyOperation::kEncrypt},
                    .required_context = {{"z", "1"}, {"a", "2"}}});
  EXPECT_EQ(PolicyToCanonicalJson(policy),
            R"({"bindings":[{"allowed_reasons":[],"operations":["ENCRYPT"],)"
            R"("principals":["a b"],"require_justification":false,)"
            R"("required_context":{"a":"2","z":"1"}}],"version":3})");
}

// An AuditSigner that fails (as an HSM in trouble does) while told to.
class SwitchableSigner : public AuditSigner {
 public:
  absl::StatusOr<std::string> Sign(absl::string_view message) override {
    ++attempts_;
    if (failing_) return absl::UnavailableError("HSM: CKR_DEVICE_ERROR");
    return signer_.Sign(message);
  }
  const std::string& public_key_pem() const override {
    return signer_.public_key_pem();
  }
  const std::string& fingerprint() const override {
    return signer_.fingerprint();
  }
  void set_failing(bool failing) { failing_ = failing; }
  int attempts() const { return attempts_; }

 private:
  ::custos::testing::MemorySigner signer_;
  std::atomic<bool> failing_{false};
  std::atomic<int> attempts_{0};
};

class AuditLogCheckpointTest : public AuditLogTest {
 protected:
  std::unique_ptr<FileAuditLog> OpenSigned(uint64_t checkpoint_every) {
    FileAuditLog::Options options;
    options.dir = dir_;
    options.node_id = kNode;
    options.signer = &signer_;
    options.checkpoint_every = checkpoint_every;
    options.checkpoint_interval = absl::Hours(1);  // by count only
    absl::StatusOr<std::unique_ptr<FileAuditLog>> log =
        FileAuditLog::Open(options);
    EXPECT_THAT(log, IsOk());
    return log.ok() ? *std::move(log) : nullptr;
  }

  // The seq of every checkpoint record among `lines`.
  static std::vector<uint64_t> CheckpointSeqs(
      const std::vector<std::string>& lines) {
    std::vector<uint64_t> out;
    for (const std::string& line : lines) {
      nlohmann::json j = nlohmann::json::parse(line);
      if (j.contains("checkpoint")) out.push_back(j["seq"].get<uint64_t>());
    }
    return out;
  }

  absl::StatusOr<AuditVerifyReport> Verify(uint64_t max_unsigned_tail) {
    AuditVerifyOptions options;
    options.public_key_pems = {signer_.public_key_pem()};
    options.max_unsigned_tail = max_unsigned_tail;
    return VerifyAuditDirectoryWith(dir_, options);
  }

  SwitchableSigner signer_;
};

// 100 records queued at once make one batch without checkpoints; with
// checkpoint_every 10 no more than 10 records may ever follow a checkpoint,
// so the batch stops at each due checkpoint.
TEST_F(AuditLogCheckpointTest, ABatchNeverRunsPastADueCheckpoint) {
  std::unique_ptr<FileAuditLog> log = OpenSigned(10);
  ASSERT_NE(log, nullptr);
  std::atomic<int> done{0};
  for (int i = 0; i < 100; ++i) {
    log->AppendAsync(SimpleRecord("p", i), [&](absl::Status s) {
      EXPECT_THAT(s, IsOk());
      ++done;
    });
  }
  log.reset();  // drains the queue
  EXPECT_EQ(done.load(), 100);
  std::vector<std::string> lines = AllLines(dir_);
  ExpectValidChain(lines);
  uint64_t previous = 0;
  for (uint64_t seq : CheckpointSeqs(lines)) {
    EXPECT_LE(seq - previous - 1, 10u) << "records before checkpoint " << seq;
    previous = seq;
  }
  absl::StatusOr<AuditVerifyReport> report = Verify(10);
  ASSERT_THAT(report, IsOk());
  EXPECT_TRUE(report->ok) << report->first_break;
}

// While no checkpoint can be signed the log serves up to the tail bound
// (twice checkpoint_every), then refuses every record, writing nothing,
// until the signer is back; the first append then gets a checkpoint first.
TEST_F(AuditLogCheckpointTest, FailsClosedAtTheTailBoundUntilASignatureWorks) {
  std::unique_ptr<FileAuditLog> log = OpenSigned(5);
  ASSERT_NE(log, nullptr);
  signer_.set_failing(true);
  for (int i = 0; i < 10; ++i) {
    ASSERT_THAT(log->Append(SimpleRecord("p", i)), IsOk()) << i;
  }
  EXPECT_GE(signer_.attempts(), 1) << "a checkpoint was due at 5";
  for (int i = 0; i < 3; ++i) {
    EXPECT_THAT(log->Append(SimpleRecord("p", 100 + i)),
                StatusIs(absl::StatusCode::kUnavailable,
                         AllOf(HasSubstr("no checkpoint could be signed"),
                               HasSubstr("at most 10"))));
  }
  EXPECT_EQ(AllLines(dir_).size(), 10u) << "refused records are not written";

  signer_.set_failing(false);
  ASSERT_THAT(log->Append(SimpleRecord("p", 200)), IsOk());
  std::vector<std::string> lines = AllLines(dir_);
  ASSERT_EQ(lines.size(), 12u);
  EXPECT_EQ(CheckpointSeqs(lines), std::vector<uint64_t>{11});
  ExpectValidChain(lines);
  log.reset();
  absl::StatusOr<AuditVerifyReport> report = Verify(10);
  ASSERT_THAT(report, IsOk());
  EXPECT_TRUE(report->ok) << report->first_break;
}

// A crash (here: a shutdown whose checkpoint could not be signed) leaves an
// unsigned tail; the next process counts it, so the bound holds across
// restarts.
TEST_F(AuditLogCheckpointTest, RestartCountsTheUnsignedTailLeftBehind) {
  signer_.set_failing(true);
  {
    std::unique_ptr<FileAuditLog> log = OpenSigned(5);
    ASSERT_NE(log, nullptr);
    for (int i = 0; i < 8; ++i) {
      ASSERT_THAT(log->Append(SimpleRecord("p", i)), IsOk());
    }
  }
  std::unique_ptr<FileAuditLog> log = OpenSigned(5);
  ASSERT_NE(log, nullptr);
  ASSERT_THAT(log->Append(SimpleRecord("p", 8)), IsOk());
  ASSERT_THAT(log->Append(SimpleRecord("p", 9)), IsOk());
  EXPECT_THAT(log->Append(SimpleRecord("p", 10)),
              StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ(AllLines(dir_).size(), 10u);
}

TEST_F(AuditLogCheckpointTest, OpenRefusesATailBoundBelowTheInterval) {
  FileAuditLog::Options options;
  options.dir = dir_;
  options.node_id = kNode;
  options.signer = &signer_;
  options.checkpoint_every = 100;
  options.max_unsigned_tail = 50;
  EXPECT_THAT(FileAuditLog::Open(options),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("max_unsigned_tail"),
                             HasSubstr("checkpoint_every"))));
}

TEST(JsonTextTest, ValidStringsAreWrittenAsNlohmannWritesThem) {
  std::vector<std::string> cases = {
      "",
      "plain",
      "quote \" and \\ slash /",
      "tab\tnl\ncr\rbs\bff\f",
      "\x7f del",
      "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x94\x91"};
  std::string controls;
  for (int c = 0; c < 0x20; ++c) controls.push_back(static_cast<char>(c));
  cases.push_back(controls);
  for (const std::string& value : cases) {
    SCOPED_TRACE(value);
    std::string ours;
    AppendJsonString(&ours, value);
    EXPECT_EQ(ours, nlohmann::json(value).dump());
    EXPECT_EQ(nlohmann::json::parse(ours).get<std::string>(), value);
  }
}

TEST(JsonTextTest, InvalidUtf8BecomesReplacementCharacters) {
  for (const std::string& value :
       {std::string("\xff"), std::string("a\xc3"), std::string("\xc0\xaf"),
        std::string("\xed\xa0\x80"), std::string("\xf4\x90\x80\x80"),
        std::string("ok\xe2\x82"
                    "end")}) {
    std::string ours;
    AppendJsonString(&ours, value);
    // Parses as JSON (the parser rejects invalid UTF-8) and holds U+FFFD.
    nlohmann::json parsed = nlohmann::json::parse(ours, nullptr, false);
    ASSERT_FALSE(parsed.is_discarded()) << absl::CHexEscape(ours);
    EXPECT_THAT(parsed.get<std::string>(), HasSubstr("\xEF\xBF\xBD"));
  }
}

// One request must not bloat the log: whatever its fields hold (here a 60 KB
// value of control bytes, each of which JSON escapes to six), its record
// stays within kMaxAuditRecordBytes, still parses, still chains, and says
// what it left out.
TEST_F(AuditLogTest, RecordsAreCappedWhateverTheRequestHolds) {
  std::unique_ptr<FileAuditLog> log = Open();
  ASSERT_NE(log, nullptr);
  const std::string controls(60 * 1024, '\x01');
  AuditRecord huge = SimpleRecord(std::string(10000, '\x02'), 0);
  huge.operation = std::string(5000, '\x03');
  huge.key_id = std::string(5000, '\x04');
  huge.context["tenant"] = controls;
  for (int i = 0; i < 64; ++i) {
    huge.context[absl::StrCat("k", i, std::string(300, '\x05'))] = "v";
    huge.context[absl::StrCat("pair", i)] = std::string(1000, '\x06');
  }
  huge.has_justification = true;
  huge.justification.reason = JustificationReason::kSystemOperation;
  huge.justification.detail = std::string(5000, '\x07');
  huge.request_id = std::string(5000, '\x08');
  huge.peer = std::string(5000, '\x0b');
  huge.detail = controls;
  ASSERT_THAT(log->Append(huge), IsOk());
  // And a small one after it: the chain goes on.
  ASSERT_THAT(log->Append(SimpleRecord("spiffe://example.org/a", 1)), IsOk());
  std::vector<std::string> lines = AllLines(dir_);
  ASSERT_EQ(lines.size(), 2u);
  ExpectValidChain(lines);
  EXPECT_LE(lines[0].size(), kMaxAuditRecordBytes);
  nlohmann::json j = nlohmann::json::parse(lines[0]);
  for (const char* field :
       {"principal", "operation", "key_id", "request_id", "peer", "detail"}) {
    const std::string value = j[field].get<std::string>();
    EXPECT_GT(value.size(), 16u) << field;  // cut, not dropped
    EXPECT_EQ(value.substr(value.size() - 3), "\xE2\x80\xA6") << field;
  }
  EXPECT_THAT(j["detail"].get<std::string>(),
              HasSubstr("context pairs not recorded"));
  EXPECT_LE(j["context"].dump().size(), kMaxAuditContextBytes + 16);
  EXPECT_FALSE(j["context"].contains(
      absl::StrCat("k0", std::string(300, '\x05'))));  // key over its cap
}

TEST(AuditJsonTextTest, CappedStringsCutAtCharacterBoundaries) {
  std::string out;
  EXPECT_FALSE(AppendJsonStringCapped(&out, "short", 64));
  EXPECT_EQ(out, "\"short\"");
  // Multi-byte characters and escapes are never split.
  for (const std::string& value :
       {std::string(100, '\x01'), std::string(50, 'a') + std::string(30, '"'),
        std::string(100, '\xff')}) {
    for (size_t cap = 8; cap < 40; ++cap) {
      std::string capped;
      AppendJsonStringCapped(&capped, value, cap);
      EXPECT_LE(capped.size(), cap) << cap;
      EXPECT_FALSE(nlohmann::json::parse(capped, nullptr, false).is_discarded())
          << capped;
    }
  }
  std::string umlauts;
  for (int i = 0; i < 40; ++i) umlauts += "\xC3\xBC";
  for (size_t cap = 8; cap < 40; ++cap) {
    std::string capped;
    ASSERT_TRUE(AppendJsonStringCapped(&capped, umlauts, cap));
    EXPECT_LE(capped.size(), cap);
    nlohmann::json j = nlohmann::json::parse(capped, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << capped;
  }
}

// Blocks the writer thread inside its first checkpoint until released: a
// disk that has stopped answering, without timing anything.
class StalledSigner : public AuditSigner {
 public:
  absl::StatusOr<std::string> Sign(absl::string_view message) override {
    // Only the writer thread signs: no race on the first notification.
    if (!entered_.HasBeenNotified()) entered_.Notify();
    release_.WaitForNotification();
    return inner_.Sign(message);
  }
  const std::string& public_key_pem() const override {
    return inner_.public_key_pem();
  }
  const std::string& fingerprint() const override {
    return inner_.fingerprint();
  }
  void WaitUntilStalled() { entered_.WaitForNotification(); }
  void Release() {
    if (!release_.HasBeenNotified()) release_.Notify();
  }

 private:
  absl::Notification entered_;
  absl::Notification release_;
  ::custos::testing::MemorySigner inner_;
};

// A full queue refuses at once, on the caller's thread, instead of blocking
// it (a gRPC callback thread must never wait for the disk); the queued
// records are still written once the writer moves again.
TEST_F(AuditLogTest, FullQueueRefusesWithoutBlocking) {
  StalledSigner signer;
  FileAuditLog::Options options;
  options.dir = dir_;
  options.node_id = kNode;
  options.signer = &signer;
  options.checkpoint_every = 1;
  options.max_queue = 2;
  absl::StatusOr<std::unique_ptr<FileAuditLog>> log =
      FileAuditLog::Open(options);
  ASSERT_THAT(log, IsOk());
  // Whatever fails below, the writer is released before the log is closed.
  struct ReleaseOnExit {
    StalledSigner* signer;
    ~ReleaseOnExit() { signer->Release(); }
  } release_on_exit{&signer};
  // The first record is written; the writer then stalls in its checkpoint.
  ASSERT_THAT((*log)->Append(SimpleRecord("spiffe://example.org/a", 0)),
              IsOk());
  signer.WaitUntilStalled();
  absl::Notification queued_done[2];
  absl::Status queued_status[2];
  for (int i = 0; i < 2; ++i) {
    (*log)->AppendAsync(SimpleRecord("spiffe://example.org/a", i + 1),
                        [&, i](absl::Status s) {
                          queued_status[i] = s;
                          queued_done[i].Notify();
                        });
  }
  bool refused_inline = false;
  absl::Status refused;
  (*log)->AppendAsync(SimpleRecord("spiffe://example.org/a", 3),
                      [&](absl::Status s) {
                        refused = s;
                        refused_inline = true;
                      });
  // `done` ran before AppendAsync returned: nothing waited.
  EXPECT_TRUE(refused_inline);
  EXPECT_THAT(refused, StatusIs(absl::StatusCode::kUnavailable,
                                HasSubstr("queue is full")));
  EXPECT_EQ((*log)->stats().queue_full, 1u);
  signer.Release();
  for (int i = 0; i < 2; ++i) {
    queued_done[i].WaitForNotification();
    EXPECT_THAT(queued_status[i], IsOk());
  }
  log->reset();
  // Three records and their checkpoints; the refused one is not there.
  int requests = 0;
  for (const std::string& line : AllLines(dir_)) {
    nlohmann::json j = nlohmann::json::parse(line);
    if (j["operation"] != "Checkpoint") ++requests;
    EXPECT_NE(j.value("request_id", ""), "req-3");
  }
  EXPECT_EQ(requests, 3);
}

// ListAuditEvents pages are bounded by bytes, whatever page_size asks, and
// the next page starts exactly where the last one stopped.
TEST_F(AuditLogTest, AuditPagesAreBoundedByBytes) {
  std::unique_ptr<FileAuditLog> log = Open();
  ASSERT_NE(log, nullptr);
  constexpr int kRecords = 300;
  for (int i = 0; i < kRecords; ++i) {
    AuditRecord r = SimpleRecord("spiffe://example.org/a", i);
    for (int p = 0; p < 7; ++p) {
      r.context[absl::StrCat("blob", p)] = std::string(480, 'x');
    }
    r.detail = std::string(1000, 'd');
    ASSERT_THAT(log->Append(r), IsOk());
  }
  const Authorizer authorizer(Roles{{}, {"spiffe://example.org/auditor"}});
  ::custos::testing::MemorySigner signer;
  AuditReader reader(dir_, kNode);
  AuditApi api(&reader, log.get(), &authorizer, &signer);
  const Caller auditor{"spiffe://example.org/auditor", "", "r"};
  AuditFilter encrypts;
  encrypts.operation = "Encrypt";
  std::string token;
  std::vector<uint64_t> seen;
  int pages = 0;
  do {
    absl::StatusOr<AuditPage> page = api.List(auditor, encrypts, 1000, token);
    ASSERT_THAT(page, IsOk());
    ASSERT_FALSE(page->events.empty());
    size_t bytes = 0;
    for (const AuditEvent& e : page->events) {
      bytes += 2 * e.raw.size() + 64;
      seen.push_back(e.seq);
    }
    EXPECT_LE(bytes, kMaxAuditPageBytes);
    token = page->next_page_token;
    ++pages;
  } while (!token.empty() && pages < 100);
  EXPECT_GT(pages, 2);  // 300 records of ~4.8 KB: about 110 a page
  ASSERT_EQ(seen.size(), static_cast<size_t>(kRecords));
  for (size_t i = 0; i < seen.size(); ++i) EXPECT_EQ(seen[i], i + 1);
}

}  // namespace
}  // namespace custos::kms
