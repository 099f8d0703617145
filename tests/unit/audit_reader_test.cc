// AuditReader: paging, following from a position, and reading across
// rolled segments, over a real FileAuditLog in a temporary directory.
#include "kms/audit/audit_reader.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <memory>

#include "absl/strings/str_cat.h"
#include "kms/audit/audit_log.h"
#include "tests/support/test_token.h"

namespace custos::kms {
namespace {

class AuditReaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto dir = custos::testing::MakeTempDir("custos-audit-reader");
    ASSERT_TRUE(dir.ok());
    dir_ = *dir;
    FileAuditLog::Options options;
    options.dir = dir_;
    options.node_id = "n1";
    options.sync = false;
    options.max_segment_bytes = 4096;  // a few records per segment
    auto log = FileAuditLog::Open(options);
    ASSERT_TRUE(log.ok()) << log.status();
    log_ = *std::move(log);
  }
  void TearDown() override {
    log_.reset();
    std::filesystem::remove_all(dir_);
  }
  void Append(int n, const std::string& principal = "p") {
    for (int i = 0; i < n; ++i) {
      AuditRecord r;
      r.time = absl::Now();
      r.principal = principal;
      r.operation = "Decrypt";
      r.detail = std::string(300, 'x');  // ~500-byte lines
      ASSERT_TRUE(log_->Append(r).ok());
    }
  }
  int Segments() const {
    int n = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir_)) {
      n += e.path().extension() == ".jsonl";
    }
    return n;
  }

  std::string dir_;
  std::unique_ptr<FileAuditLog> log_;
};

TEST_F(AuditReaderTest, PagesThroughRolledSegmentsInOrder) {
  Append(40);
  ASSERT_GE(Segments(), 3);
  AuditReader reader(dir_, "n1");
  AuditPosition position;
  uint64_t expected = 1;
  for (int page = 0; page < 100; ++page) {
    auto events = reader.Read(position, AuditFilter(), 7);
    ASSERT_TRUE(events.ok()) << events.status();
    if (events->empty()) break;
    for (const AuditEvent& e : *events) EXPECT_EQ(e.seq, expected++);
  }
  EXPECT_EQ(expected, 41u);
}

TEST_F(AuditReaderTest, LocatesASequenceNumberInAMiddleSegment) {
  Append(40);
  AuditReader reader(dir_, "n1");
  AuditPosition position;
  position.next_seq = 23;
  auto events = reader.Read(position, AuditFilter(), 3);
  ASSERT_TRUE(events.ok());
  ASSERT_EQ(events->size(), 3u);
  EXPECT_EQ((*events)[0].seq, 23u);
  EXPECT_EQ((*events)[2].seq, 25u);
  EXPECT_EQ(position.next_seq, 26u);
}

TEST_F(AuditReaderTest, FollowingFromTheEndSeesOnlyNewRecords) {
  Append(10);
  AuditReader reader(dir_, "n1");
  auto end = reader.End();
  ASSERT_TRUE(end.ok());
  AuditPosition position = *end;
  auto none = reader.Read(position, AuditFilter(), 100);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
  Append(15, "later");  // rolls into new segments too
  auto events = reader.Read(position, AuditFilter(), 100);
  ASSERT_TRUE(events.ok()) << events.status();
  ASSERT_EQ(events->size(), 15u);
  EXPECT_EQ(events->front().seq, 11u);
  EXPECT_EQ(events->back().seq, 25u);
  for (const AuditEvent& e : *events) EXPECT_EQ(e.principal, "later");
  // Nothing is read twice.
  auto again = reader.Read(position, AuditFilter(), 100);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->empty());
}

TEST_F(AuditReaderTest, FiltersSkipButStillAdvance) {
  Append(5, "a");
  Append(5, "b");
  AuditReader reader(dir_, "n1");
  AuditFilter only_b;
  only_b.principal = "b";
  AuditPosition position;
  auto events = reader.Read(position, only_b, 100);
  ASSERT_TRUE(events.ok());
  ASSERT_EQ(events->size(), 5u);
  EXPECT_EQ(events->front().seq, 6u);
  EXPECT_EQ(position.next_seq, 11u);
}

}  // namespace
}  // namespace custos::kms
