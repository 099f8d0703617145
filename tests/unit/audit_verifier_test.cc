// VerifyAuditDirectory against a real log: FileAuditLog writes ~100 records
// with a checkpoint every 10, signed by an in-memory P-256 key, rolling
// across several segments. Each case copies that log, tampers with the copy
// and checks that verification fails and names the exact spot (file, line,
// sequence number); the untouched log verifies.
#include "kms/audit/audit_verifier.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "common/testing/status_matchers.h"
#include "kms/audit/audit_chain.h"
#include "kms/audit/audit_log.h"
#include "kms/audit/checkpoint.h"
#include "nlohmann/json.hpp"
#include "tests/support/memory_signer.h"
#include "tests/support/test_token.h"

namespace custos::kms {
namespace {

using ::custos::testing::IsOk;
using ::testing::HasSubstr;

constexpr char kNode[] = "node-1";
constexpr int kRecords = 100;

using ::custos::testing::MemorySigner;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  ASSERT_TRUE(out.good()) << path;
}

// The untouched log, as written: its segments and lines, and where each
// sequence number is.
struct Log {
  struct Segment {
    std::string name;
    std::vector<std::string> lines;
  };
  struct Where {
    size_t segment;
    size_t line;  // 0-based
    bool checkpoint;
  };
  std::vector<Segment> segments;
  std::vector<Where> by_seq;  // [seq - 1]
  uint64_t checkpoints = 0;
};

Log* g_log = nullptr;
MemorySigner* g_signer = nullptr;
MemorySigner* g_other_signer = nullptr;
std::string* g_root = nullptr;
std::string* g_master = nullptr;

const Log::Where& At(uint64_t seq) { return g_log->by_seq.at(seq - 1); }
const std::string& Line(uint64_t seq) {
  return g_log->segments[At(seq).segment].lines[At(seq).line];
}
std::string PathOf(const std::string& dir, size_t segment) {
  return absl::StrCat(dir, "/", g_log->segments[segment].name);
}
// "FILE:LINE: seq N: " as the verifier names a spot in `dir`.
std::string Spot(const std::string& dir, size_t segment, size_t line,
                 uint64_t seq) {
  return absl::StrCat(PathOf(dir, segment), ":", line + 1, ": seq ", seq, ": ");
}
std::string SpotOf(const std::string& dir, uint64_t seq) {
  return Spot(dir, At(seq).segment, At(seq).line, seq);
}
uint64_t FirstSeqOf(size_t segment) {
  for (uint64_t seq = 1; seq <= g_log->by_seq.size(); ++seq) {
    if (At(seq).segment == segment) return seq;
  }
  ADD_FAILURE() << "segment " << segment << " is empty";
  return 0;
}
// Rewrites one segment of `dir` from `lines`.
void WriteSegment(const std::string& dir, size_t segment,
                  const std::vector<std::string>& lines) {
  std::string text;
  for (const std::string& line : lines) absl::StrAppend(&text, line, "\n");
  WriteFile(PathOf(dir, segment), text);
}
// Replaces the line holding `seq` in `dir`.
void ReplaceLine(const std::string& dir, uint64_t seq,
                 const std::string& line) {
  std::vector<std::string> lines = g_log->segments[At(seq).segment].lines;
  lines[At(seq).line] = line;
  WriteSegment(dir, At(seq).segment, lines);
}
// An ordinary record of `segment` whose successor is in the same segment,
// past its first few lines.
uint64_t PlainRecordIn(size_t segment) {
  for (uint64_t seq = 1; seq < g_log->by_seq.size(); ++seq) {
    if (At(seq).segment == segment && At(seq).line >= 2 &&
        !At(seq).checkpoint && !At(seq + 1).checkpoint &&
        At(seq + 1).segment == segment) {
      return seq;
    }
  }
  ADD_FAILURE() << "no plain record in segment " << segment;
  return 1;
}
// Checkpoint records, in order.
std::vector<uint64_t> Checkpoints() {
  std::vector<uint64_t> out;
  for (uint64_t seq = 1; seq <= g_log->by_seq.size(); ++seq) {
    if (At(seq).checkpoint) out.push_back(seq);
  }
  return out;
}
// `line` with the string value of "field" (its first occurrence) replaced.
std::string WithValue(const std::string& line, const std::string& field,
                      const std::string& value) {
  const std::string key = absl::StrCat("\"", field, "\":\"");
  size_t at = line.find(key);
  EXPECT_NE(at, std::string::npos) << field << " in " << line;
  if (at == std::string::npos) return line;
  at += key.size();
  const size_t end = line.find('"', at);
  return absl::StrCat(line.substr(0, at), value, line.substr(end));
}
std::string ValueOf(const std::string& line, const std::string& field) {
  const std::string key = absl::StrCat("\"", field, "\":\"");
  const size_t at = line.find(key) + key.size();
  return line.substr(at, line.find('"', at) - at);
}

// `line` with `members` (ending in ',') inserted after its seq.
std::string WithMembers(const std::string& line, const std::string& members) {
  const size_t at = line.find(',') + 1;
  return absl::StrCat(line.substr(0, at), members, line.substr(at));
}
// The spot and message of a line that is not valid JSON.
std::string NotJsonAt(const std::string& dir, uint64_t seq) {
  return SpotOf(dir, seq) +
         "not an audit record (edited or torn): not valid JSON at byte ";
}

enum class Keys { kRight, kWrong, kNone };

struct Case {
  std::string name;
  // Tampers with the copy in `dir`; returns the spot first_break must name
  // (and what is wrong), or "" when the log must verify.
  std::function<std::string(const std::string& dir)> tamper;
  Keys keys = Keys::kRight;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

std::vector<Case> Cases() {
  return {
      {"Untouched", [](const std::string&) { return std::string(); }},
      {"UntouchedWithoutAKey", [](const std::string&) { return std::string(); },
       Keys::kNone},
      {"EditAFieldSameLength",
       [](const std::string& dir) {
         const uint64_t seq = PlainRecordIn(0);
         std::string edited = Line(seq);
         const size_t at = edited.find("alice");
         EXPECT_NE(at, std::string::npos) << edited;
         edited.replace(at, 5, "mallo");
         ReplaceLine(dir, seq, edited);
         return SpotOf(dir, seq + 1) + "prev does not match";
       }},
      {"EditAFieldDifferentLength",
       [](const std::string& dir) {
         const uint64_t seq = PlainRecordIn(1);
         ReplaceLine(dir, seq, WithValue(Line(seq), "outcome", "DENIED"));
         return SpotOf(dir, seq + 1) + "prev does not match";
       }},
      {"EditTheSeqOfALine",
       [](const std::string& dir) {
         // A line rewritten to look like its successor: caught on the spot.
         const uint64_t seq = PlainRecordIn(1);
         std::string edited = Line(seq);
         edited.replace(0, edited.find(','),
                        absl::StrCat("{\"seq\":", seq + 1));
         ReplaceLine(dir, seq, edited);
         return SpotOf(dir, seq) + absl::StrCat("found seq ", seq + 1);
       }},
      {"DeleteALine",
       [](const std::string& dir) {
         const uint64_t seq = PlainRecordIn(1);
         std::vector<std::string> lines =
             g_log->segments[At(seq).segment].lines;
         lines.erase(lines.begin() + At(seq).line);
         WriteSegment(dir, At(seq).segment, lines);
         // Its successor now sits where it was.
         return SpotOf(dir, seq) + absl::StrCat("found seq ", seq + 1);
       }},
      {"SwapTwoAdjacentLines",
       [](const std::string& dir) {
         const uint64_t seq = PlainRecordIn(0);
         std::vector<std::string> lines =
             g_log->segments[At(seq).segment].lines;
         std::swap(lines[At(seq).line], lines[At(seq).line + 1]);
         WriteSegment(dir, At(seq).segment, lines);
         return SpotOf(dir, seq) + absl::StrCat("found seq ", seq + 1);
       }},
      {"NotJson",
       [](const std::string& dir) {
         const uint64_t seq = PlainRecordIn(2);
         ReplaceLine(dir, seq, "{\"seq\":" + Line(seq).substr(1, 40));
         return SpotOf(dir, seq) + "not an audit record";
       }},
      // Lines that are not valid JSON, or that JSON readers read otherwise
      // than the verifier would by their bytes, break the chain where they
      // are (the fast path once let each of them through, so that only the
      // next line's prev, if anything, showed the edit).
      {"TextThatIsNotJsonInsideARecord",
       [](const std::string& dir) {
         const uint64_t seq = PlainRecordIn(0);
         ReplaceLine(dir, seq,
                     WithMembers(Line(seq), "\"note\":\"not\" JSON\","));
         return NotJsonAt(dir, seq);
       }},
      {"SeqGivenTwice",
       [](const std::string& dir) {
         // The verifier would read the first, nlohmann the last.
         const uint64_t seq = PlainRecordIn(1);
         ReplaceLine(
             dir, seq,
             WithMembers(Line(seq), absl::StrCat("\"seq\":", seq + 7, ",")));
         return SpotOf(dir, seq) +
                "not an audit record (edited or torn): key \"seq\" appears "
                "twice in one object";
       }},
      {"AKeyGivenTwiceInANestedObject",
       [](const std::string& dir) {
         const uint64_t seq = PlainRecordIn(2);
         ReplaceLine(
             dir, seq,
             WithMembers(Line(seq), "\"context\":{\"t\":\"a\",\"t\":\"b\"},"));
         return SpotOf(dir, seq) +
                "not an audit record (edited or torn): key \"t\" appears "
                "twice in one object";
       }},
      {"ACheckpointWhoseKeyIsWrittenWithAnEscape",
       [](const std::string& dir) {
         // "\u0063heckpoint" is "checkpoint" to every JSON reader: a forged
         // checkpoint, which must be checked like any other.
         const uint64_t seq = PlainRecordIn(1);
         const std::string prev = ValueOf(Line(seq), "prev");
         ReplaceLine(
             dir, seq,
             WithMembers(Line(seq),
                         absl::StrCat("\"\\u0063heckpoint\":{\"last_seq\":",
                                      seq - 1, ",\"head\":\"", prev,
                                      "\",\"key\":\"", g_signer->fingerprint(),
                                      "\",\"signature\":\"AAAA\"},")));
         return SpotOf(dir, seq) + "checkpoint signature does not verify";
       }},
      {"TruncatedJson",
       [](const std::string& dir) {
         const uint64_t seq = PlainRecordIn(0);
         ReplaceLine(dir, seq, Line(seq).substr(0, Line(seq).size() - 1));
         return NotJsonAt(dir, seq) + absl::StrCat(Line(seq).size(),
                                                   ": the object is not "
                                                   "closed");
       }},
      {"GarbageAfterTheObject",
       [](const std::string& dir) {
         // Ends the way the writer ends a line, with another prev.
         const uint64_t seq = PlainRecordIn(1);
         ReplaceLine(dir, seq,
                     absl::StrCat(Line(seq), " x\",\"prev\":\"",
                                  ValueOf(Line(seq), "prev"), "\"}"));
         return NotJsonAt(dir, seq) +
                absl::StrCat(Line(seq).size() + 2, ": more after the object");
       }},
      {"InvalidUtf8InAString",
       [](const std::string& dir) {
         const uint64_t seq = PlainRecordIn(2);
         ReplaceLine(dir, seq,
                     WithValue(Line(seq), "principal", "al\xe2\x93\x9d\x8f"));
         return NotJsonAt(dir, seq);
       }},
      {"ALoneSurrogateEscape",
       [](const std::string& dir) {
         const uint64_t seq = PlainRecordIn(0);
         ReplaceLine(dir, seq, WithValue(Line(seq), "principal", "\\ud800"));
         return NotJsonAt(dir, seq);
       }},
      {"NestingDepthBomb",
       [](const std::string& dir) {
         const uint64_t seq = PlainRecordIn(1);
         ReplaceLine(dir, seq,
                     WithMembers(Line(seq), "\"x\":" + std::string(5000, '[') +
                                                std::string(5000, ']') + ","));
         return NotJsonAt(dir, seq);
       }},
      {"TruncateAtALineBeforeTheLastCheckpointOfASegment",
       [](const std::string& dir) {
         // Cut segment 0 just before its second-to-last checkpoint: the
         // records and checkpoints after it are gone; the gap shows at the
         // start of segment 1.
         std::vector<uint64_t> in_first;
         for (uint64_t seq : Checkpoints()) {
           if (At(seq).segment == 0) in_first.push_back(seq);
         }
         EXPECT_GE(in_first.size(), 2u);
         const uint64_t cut = in_first[in_first.size() - 2];
         std::vector<std::string> lines = g_log->segments[0].lines;
         lines.resize(At(cut).line);
         WriteSegment(dir, 0, lines);
         return Spot(dir, 1, 0, cut) +
                absl::StrCat("the segment is named for seq ", FirstSeqOf(1),
                             ": records ", cut, "..", FirstSeqOf(1) - 1,
                             " are missing");
       }},
      {"TruncateMidLineBeforeTheLastCheckpoint",
       [](const std::string& dir) {
         // The newest segment, cut inside the line before its last
         // checkpoint: the torn line is where it breaks.
         const size_t last = g_log->segments.size() - 1;
         const std::vector<uint64_t> checkpoints = Checkpoints();
         const uint64_t checkpoint = checkpoints.back();
         EXPECT_EQ(At(checkpoint).segment, last);
         const uint64_t torn = checkpoint - 1;
         std::string text;
         for (size_t i = 0; i < At(torn).line; ++i) {
           absl::StrAppend(&text, g_log->segments[last].lines[i], "\n");
         }
         text += Line(torn).substr(0, Line(torn).size() / 2);
         WriteFile(PathOf(dir, last), text);
         return SpotOf(dir, torn) + "not an audit record";
       }},
      {"RemoveAMiddleSegment",
       [](const std::string& dir) {
         std::filesystem::remove(PathOf(dir, 1));
         const uint64_t missing = FirstSeqOf(1);
         return Spot(dir, 2, 0, missing) +
                absl::StrCat("the segment is named for seq ", FirstSeqOf(2),
                             ": records ", missing, "..", FirstSeqOf(2) - 1,
                             " are missing");
       }},
      {"RemoveTheSegmentBeforeAnEmptyOne",
       [](const std::string& dir) {
         // A restart that wrote nothing leaves an empty segment named for
         // the next seq: it still shows that the segment before it is gone.
         const size_t last = g_log->segments.size() - 1;
         const uint64_t next = g_log->by_seq.size() + 1;
         const std::string empty =
             absl::StrFormat("%s/audit-%s-%020d.jsonl", dir, kNode, next);
         WriteFile(empty, "");
         std::filesystem::remove(PathOf(dir, last));
         return absl::StrCat(empty, ":1: seq ", FirstSeqOf(last), ": ");
       }},
      {"ReplaceACheckpointSignature",
       [](const std::string& dir) {
         // Another checkpoint's signature: valid base64, 64 bytes, from the
         // right key — over another message.
         const std::vector<uint64_t> checkpoints = Checkpoints();
         const uint64_t seq = checkpoints[1];
         ReplaceLine(dir, seq,
                     WithValue(Line(seq), "signature",
                               ValueOf(Line(checkpoints[2]), "signature")));
         return SpotOf(dir, seq) + "checkpoint signature does not verify";
       }},
      {"ChangeACheckpointHead",
       [](const std::string& dir) {
         const std::vector<uint64_t> checkpoints = Checkpoints();
         const uint64_t seq = checkpoints[2];
         ReplaceLine(dir, seq,
                     WithValue(Line(seq), "head",
                               ValueOf(Line(checkpoints[1]), "head")));
         return SpotOf(dir, seq) + "checkpoint does not cover";
       }},
      {"WrongPublicKey",
       [](const std::string& dir) {
         const uint64_t first = Checkpoints().front();
         return SpotOf(dir, first) +
                absl::StrCat("checkpoint signed by key ",
                             g_signer->fingerprint(),
                             ", which is not among the public keys given");
       },
       Keys::kWrong},
  };
}

class AuditVerifierTest : public ::testing::TestWithParam<Case> {
 protected:
  // Writes the log once for every case.
  static void SetUpTestSuite() {
    absl::StatusOr<std::string> root =
        ::custos::testing::MakeTempDir("custos-audit-verify");
    ASSERT_TRUE(root.ok()) << root.status();
    g_root = new std::string(*root);
    g_master = new std::string(*g_root + "/master");
    g_signer = new MemorySigner;
    g_other_signer = new MemorySigner;
    {
      FileAuditLog::Options options;
      options.dir = *g_master;
      options.node_id = kNode;
      options.sync = false;
      options.signer = g_signer;
      options.checkpoint_every = 10;
      options.max_segment_bytes = 6000;
      absl::StatusOr<std::unique_ptr<FileAuditLog>> log =
          FileAuditLog::Open(options);
      ASSERT_TRUE(log.ok()) << log.status();
      for (int i = 0; i < kRecords; ++i) {
        AuditRecord r;
        r.time = absl::FromUnixMicros(1700000000000000 + i * 1000);
        r.principal = i % 3 == 0 ? "bob" : "alice";
        r.operation = i % 2 == 0 ? "Encrypt" : "GenerateDataKey";
        r.key_id = "k-0123456789abcdefghijklmnop";
        r.key_version = 1 + i % 4;
        if (i % 5 == 0) r.context = {{"tenant", absl::StrCat("t", i)}};
        r.request_id = absl::StrCat("req-", i);
        r.peer = "ipv4:10.0.0.1:5555";
        ASSERT_THAT((*log)->Append(std::move(r)), IsOk());
      }
    }  // the final checkpoint
    g_log = new Log;
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(*g_master)) {
      if (e.path().extension() != ".jsonl") continue;  // the writer's lock
      names.push_back(e.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    for (const std::string& name : names) {
      Log::Segment segment{name, {}};
      std::string text = ReadFile(*g_master + "/" + name);
      ASSERT_FALSE(text.empty()) << name;
      text.pop_back();
      for (absl::string_view line : absl::StrSplit(text, '\n')) {
        const bool checkpoint = absl::StrContains(line, "\"checkpoint\":");
        g_log->by_seq.push_back(
            {g_log->segments.size(), segment.lines.size(), checkpoint});
        g_log->checkpoints += checkpoint;
        segment.lines.emplace_back(line);
      }
      g_log->segments.push_back(std::move(segment));
    }
  }
  static void TearDownTestSuite() {
    if (g_root != nullptr) std::filesystem::remove_all(*g_root);
    delete g_log;
    delete g_signer;
    delete g_other_signer;
    delete g_root;
    delete g_master;
  }
};

TEST_F(AuditVerifierTest, TheLogSpansSegmentsEachSealedByACheckpoint) {
  ASSERT_GE(g_log->segments.size(), 3u);
  EXPECT_GT(g_log->checkpoints, static_cast<uint64_t>(kRecords / 10));
  for (const Log::Segment& segment : g_log->segments) {
    // Rolled segments end with the checkpoint sealing them; the newest with
    // the one written at shutdown.
    EXPECT_THAT(segment.lines.back(), HasSubstr("\"checkpoint\":"))
        << segment.name;
    nlohmann::json first = nlohmann::json::parse(segment.lines.front());
    EXPECT_EQ(segment.name, absl::StrFormat("audit-%s-%020d.jsonl", kNode,
                                            first["seq"].get<uint64_t>()));
  }
}

TEST_P(AuditVerifierTest, NamesTheFirstBreak) {
  const Case& c = GetParam();
  const std::string dir = absl::StrCat(*g_root, "/", c.name);
  std::filesystem::copy(*g_master, dir);
  const std::string spot = c.tamper(dir);
  std::vector<std::string> keys;
  if (c.keys == Keys::kRight) keys = {g_signer->public_key_pem()};
  if (c.keys == Keys::kWrong) keys = {g_other_signer->public_key_pem()};
  absl::StatusOr<AuditVerifyReport> report = VerifyAuditDirectory(dir, keys);
  ASSERT_THAT(report, IsOk());
  EXPECT_EQ(report->signatures_checked, c.keys != Keys::kNone);
  if (spot.empty()) {
    const uint64_t total = g_log->by_seq.size();
    EXPECT_TRUE(report->ok) << report->first_break;
    EXPECT_EQ(report->first_break, "");
    EXPECT_EQ(report->records, total);
    ASSERT_EQ(report->nodes.size(), 1u);
    const AuditVerifyReport::Node& node = report->nodes[0];
    EXPECT_EQ(node.node_id, kNode);
    EXPECT_EQ(node.segments, static_cast<int>(g_log->segments.size()));
    EXPECT_EQ(node.records, total);
    EXPECT_EQ(node.last_seq, total);
    EXPECT_EQ(node.checkpoints, g_log->checkpoints);
    EXPECT_EQ(node.last_checkpoint_seq, total - 1);  // shutdown's checkpoint
    EXPECT_EQ(node.unsigned_tail, 0u);
  } else {
    EXPECT_FALSE(report->ok);
    EXPECT_THAT(report->first_break, HasSubstr(spot));
    EXPECT_TRUE(absl::StartsWith(report->first_break, dir + "/audit-"))
        << report->first_break;
  }
  std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Tampering, AuditVerifierTest,
                         ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<Case>& p) {
                           return p.param.name;
                         });

TEST_F(AuditVerifierTest, RecordsAfterTheLastCheckpointAreTheUnsignedTail) {
  const std::string dir = *g_root + "/tail";
  std::filesystem::copy(*g_master, dir);
  {
    FileAuditLog::Options options;
    options.dir = dir;
    options.node_id = kNode;
    options.sync = false;  // no signer: no checkpoints
    absl::StatusOr<std::unique_ptr<FileAuditLog>> log =
        FileAuditLog::Open(options);
    ASSERT_TRUE(log.ok()) << log.status();
    for (int i = 0; i < 3; ++i) {
      AuditRecord r;
      r.time = absl::Now();
      r.principal = "carol";
      r.operation = "Decrypt";
      ASSERT_THAT((*log)->Append(std::move(r)), IsOk());
    }
  }
  absl::StatusOr<AuditVerifyReport> report =
      VerifyAuditDirectory(dir, {g_signer->public_key_pem()});
  ASSERT_THAT(report, IsOk());
  EXPECT_TRUE(report->ok) << report->first_break;
  ASSERT_EQ(report->nodes.size(), 1u);
  EXPECT_EQ(report->nodes[0].last_seq, g_log->by_seq.size() + 3);
  EXPECT_EQ(report->nodes[0].unsigned_tail, 3u);
  EXPECT_EQ(report->nodes[0].segments,
            static_cast<int>(g_log->segments.size()) + 1);
  std::filesystem::remove_all(dir);
}

// Records written after the last checkpoint without a signer, as many as
// the bound allows and then one more: the bound is on the unsigned tail, and
// the break names the first record past it.
TEST_F(AuditVerifierTest, AnUnsignedTailOverTheBoundIsABreak) {
  const std::string dir = *g_root + "/long-tail";
  std::filesystem::copy(*g_master, dir);
  {
    FileAuditLog::Options options;
    options.dir = dir;
    options.node_id = kNode;
    options.sync = false;  // no signer: no checkpoints
    absl::StatusOr<std::unique_ptr<FileAuditLog>> log =
        FileAuditLog::Open(options);
    ASSERT_TRUE(log.ok()) << log.status();
    for (int i = 0; i < 4; ++i) {
      AuditRecord r;
      r.time = absl::Now();
      r.principal = "carol";
      r.operation = "Decrypt";
      ASSERT_THAT((*log)->Append(std::move(r)), IsOk());
    }
  }
  const uint64_t total = g_log->by_seq.size() + 4;
  AuditVerifyOptions options;
  options.public_key_pems = {g_signer->public_key_pem()};
  options.max_unsigned_tail = 4;
  absl::StatusOr<AuditVerifyReport> report =
      VerifyAuditDirectoryWith(dir, options);
  ASSERT_THAT(report, IsOk());
  EXPECT_TRUE(report->ok) << "a tail of 4 is within 4: " << report->first_break;

  options.max_unsigned_tail = 3;
  report = VerifyAuditDirectoryWith(dir, options);
  ASSERT_THAT(report, IsOk());
  EXPECT_FALSE(report->ok);
  const std::string newest = absl::StrFormat("%s/audit-%s-%020d.jsonl", dir,
                                             kNode, g_log->by_seq.size() + 1);
  EXPECT_THAT(
      report->first_break,
      HasSubstr(absl::StrCat(newest, ":4: seq ", total, ": node ", kNode,
                             " has 4 records after its last "
                             "checkpoint (seq ",
                             total - 4, "), more than the 3 allowed")))
      << report->first_break;
  ASSERT_EQ(report->nodes.size(), 1u);
  EXPECT_EQ(report->nodes[0].unsigned_tail, 4u);

  // Without a key the chain alone is checked, and the tail only reported;
  // so it is for the server checking its own live log.
  options.public_key_pems.clear();
  report = VerifyAuditDirectoryWith(dir, options);
  ASSERT_THAT(report, IsOk());
  EXPECT_TRUE(report->ok) << report->first_break;
  options.public_key_pems = {g_signer->public_key_pem()};
  options.live = true;
  report = VerifyAuditDirectoryWith(dir, options);
  ASSERT_THAT(report, IsOk());
  EXPECT_TRUE(report->ok) << report->first_break;
  std::filesystem::remove_all(dir);
}

TEST_F(AuditVerifierTest, ABadPublicKeyIsAnError) {
  EXPECT_FALSE(VerifyAuditDirectory(*g_master, {"not a key"}).ok());
}

TEST_F(AuditVerifierTest, AnUnreadableDirectoryIsAnError) {
  EXPECT_FALSE(VerifyAuditDirectory(*g_root + "/nowhere", {}).ok());
}

// The public half of the key that signed the fuzz seeds' checkpoints
// (tests/fuzz/audit_verifier_fuzz.cc); fingerprint 43a6b553fb35d690.
constexpr char kFuzzCheckpointPublicKey[] =
    "-----BEGIN PUBLIC KEY-----\n"
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE6HHMmKhrmYmJA05bJdGZ5BNbxEq/\n"
    "UWHc4gYuWiU2b28vsE1d/RQruHllmhWCl4XhHiC1XXsOSq+sz41vmTU2HQ==\n"
    "-----END PUBLIC KEY-----\n";

// `text` as node n1's only segment, verified in a directory of its own.
struct HandWritten {
  std::string segment;  // its path, as breaks name it
  AuditVerifyReport report;
};
HandWritten VerifyText(const std::string& text,
                       const std::vector<std::string>& keys) {
  absl::StatusOr<std::string> dir =
      ::custos::testing::MakeTempDir("custos-audit-verify-text");
  EXPECT_THAT(dir, IsOk());
  if (!dir.ok()) return {};
  HandWritten out;
  out.segment = *dir + "/audit-n1-00000000000000000001.jsonl";
  WriteFile(out.segment, text);
  absl::StatusOr<AuditVerifyReport> report = VerifyAuditDirectory(*dir, keys);
  EXPECT_THAT(report, IsOk());
  if (report.ok()) out.report = *std::move(report);
  std::filesystem::remove_all(*dir);
  return out;
}

// The inputs of tests/fuzz/regressions/audit_verifier_fuzz/, byte for byte:
// each once verified, though a JSON reader reads it otherwise or not at all.
TEST(AuditVerifierFuzzRegressionTest, EachIsABreakAtItsLine) {
  const std::string genesis = kAuditGenesisHash;
  struct Regression {
    const char* name;
    std::string text;
    std::string problem;  // after "FILE:1: seq 1: "
  };
  const Regression cases[] = {
      {"fast_path_accepts_line_that_is_not_json.jsonl",
       R"({"seq":1,"note":"not" JSON","prev":")" + genesis + "\"}\n",
       "not an audit record (edited or torn): not valid JSON at byte 23: "
       "expected ',' or '}'"},
      {"fast_path_seq_differs_from_json_seq.jsonl",
       R"({"seq":1,"seq":7,"operation":"Decrypt","prev":")" + genesis + "\"}\n",
       "not an audit record (edited or torn): key \"seq\" appears twice in "
       "one object"},
      {"fast_path_misses_escaped_checkpoint_key.jsonl",
       R"({"seq":1,"\u0063heckpoint":{"last_seq":0,"head":")" + genesis +
           R"(","key":"43a6b553fb35d690","signature":"AAAA"},)"
           R"("operation":"Checkpoint","prev":")" +
           genesis + "\"}\n",
       "checkpoint signature does not verify"},
      {"crash-35afb141bd21318ca2bd492efb81cf0925b4b45b",
       R"({"seq":1,"time":"2023-11-14T22:13:20.000000Z","node":"IIIIIIIIIIIIIIIIIIn1)"
       "\xe2\xd3\xdd\x8f"
       R"(rincipal":"spiffe://custos.test/photos/uploader","operation":)"
       R"("GenerateDataKey","key_id":"k-abcdefghijklmnopqrstuvwxyz",)"
       R"("key_version":1,"outcome":"ALLOWED","code":"OK",)"
       R"("request_id":"req-0","peer":"ipv4:127.0.0.1:50000","prev":")" +
           genesis + "\"}\n",
       "not an audit record (edited or torn): not valid JSON at byte 75: "
       "invalid UTF-8 in a string"},
  };
  for (const Regression& c : cases) {
    const HandWritten v = VerifyText(c.text, {kFuzzCheckpointPublicKey});
    EXPECT_FALSE(v.report.ok) << c.name;
    EXPECT_EQ(v.report.first_break,
              absl::StrCat(v.segment, ":1: seq 1: ", c.problem))
        << c.name;
    EXPECT_EQ(v.report.records, 0u) << c.name;
  }
}

TEST(AuditVerifierFuzzRegressionTest, AnEscapedCheckpointKeyCountsAsOne) {
  // Without a key the chain alone is checked: the record is a checkpoint,
  // as it is to any JSON reader, and covers the record before it.
  const std::string genesis = kAuditGenesisHash;
  const HandWritten v = VerifyText(
      R"({"seq":1,"\u0063heckpoint":{"last_seq":0,"head":")" + genesis +
          R"(","key":"43a6b553fb35d690","signature":"AAAA"},"prev":")" +
          genesis + "\"}\n",
      {});
  EXPECT_TRUE(v.report.ok) << v.report.first_break;
  ASSERT_EQ(v.report.nodes.size(), 1u);
  EXPECT_EQ(v.report.nodes[0].checkpoints, 1u);
  EXPECT_EQ(v.report.nodes[0].unsigned_tail, 0u);
}

// Anyone can write records that chain: with a key given, a log without a
// single valid checkpoint proves nothing and is a break.
TEST(AuditVerifierTextTest, AForgedChainWithoutACheckpointFailsWithAKey) {
  MemorySigner signer;
  std::string text;
  std::string prev = kAuditGenesisHash;
  for (int seq = 1; seq <= 3; ++seq) {
    const std::string line = absl::StrCat(
        R"({"seq":)", seq,
        R"(,"time":"2026-01-01T00:00:00.000000Z","node":"n1",)"
        R"("principal":"spiffe://t/admin","operation":"CreateKey",)"
        R"("outcome":"ALLOWED","code":"OK","prev":")",
        prev, "\"}");
    absl::StrAppend(&text, line, "\n");
    prev = AuditLineHash(line);
  }
  const HandWritten signed_check = VerifyText(text, {signer.public_key_pem()});
  EXPECT_FALSE(signed_check.report.ok);
  EXPECT_THAT(signed_check.report.first_break,
              HasSubstr(absl::StrCat(signed_check.segment,
                                     ":3: seq 3: node n1 has 3 records and no "
                                     "signed checkpoint")));
  ASSERT_EQ(signed_check.report.nodes.size(), 1u);
  EXPECT_EQ(signed_check.report.nodes[0].unsigned_tail, 3u);

  const HandWritten chain_only = VerifyText(text, {});
  EXPECT_TRUE(chain_only.report.ok) << chain_only.report.first_break;
}

TEST(AuditVerifierTextTest, ValidJsonInAnotherLayoutVerifies) {
  // Not the writer's layout, but JSON that reads as a chained record: the
  // verifier reads what any JSON reader reads.
  std::vector<std::string> lines;
  std::string prev = kAuditGenesisHash;
  auto add = [&](const std::string& line) {
    lines.push_back(line);
    prev = AuditLineHash(line);
  };
  add(R"({"seq":1,"prev":")" + prev + "\"}");
  add(R"( { "prev" : ")" + prev + R"(" , "seq" : 2 } )");
  add(R"({"\u0073eq":3,"context":{"k\"":"v"},"prev":")" + prev + "\"}");
  add(R"({"seq":4,"detail":"caf\u00e9 )"
      "\xe2\x98\x95 \xf0\x9d\x84\x9e"
      R"( \ud834\udd1e","n":-1.5e+3,"a":[true,false,null,{}],"o":{},)"
      R"("prev":")" +
      prev + "\"}\r");
  std::string text;
  for (const std::string& line : lines) absl::StrAppend(&text, line, "\n");
  const HandWritten v = VerifyText(text, {});
  EXPECT_TRUE(v.report.ok) << v.report.first_break;
  EXPECT_EQ(v.report.records, 4u);
}

TEST(AuditVerifierTextTest, WhateverTheWriterWritesVerifies) {
  // Strings that need escaping or replacing, in every field and in context
  // keys: the writer's lines must never read as a break (some take the full
  // parse, as a context key with an escape does).
  absl::StatusOr<std::string> dir =
      ::custos::testing::MakeTempDir("custos-audit-verify-writer");
  ASSERT_THAT(dir, IsOk());
  MemorySigner signer;
  const std::vector<std::string> nasty = {
      "plain",
      "quote \" backslash \\ slash /",
      std::string("nul \0 and \x01\x1f\x7f", 13),
      "tab\tnewline\ncr\r",
      "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xef\xbf\xbf",
      "invalid \xff \xc0\xaf \xed\xa0\x80 \xf4\x90\x80\x80 \xe2\x82",
      "\\u0063heckpoint",
      "",
  };
  {
    FileAuditLog::Options options;
    options.dir = *dir;
    options.node_id = "n1";
    options.sync = false;
    options.signer = &signer;
    options.checkpoint_every = 3;
    absl::StatusOr<std::unique_ptr<FileAuditLog>> log =
        FileAuditLog::Open(options);
    ASSERT_THAT(log, IsOk());
    for (size_t i = 0; i < nasty.size(); ++i) {
      const std::string& s = nasty[i];
      AuditRecord r;
      r.time = absl::FromUnixMicros(1700000000000000 + i);
      r.principal = s;
      r.operation = s;
      r.key_id = s;
      r.key_version = static_cast<uint32_t>(i);
      r.context = {{s, s}, {absl::StrCat("k", i, s), "v"}};
      r.has_justification = true;
      r.justification.detail = s;
      r.request_id = s;
      r.peer = s;
      r.detail = s;
      ASSERT_THAT((*log)->Append(std::move(r)), IsOk()) << i;
    }
  }
  absl::StatusOr<AuditVerifyReport> report =
      VerifyAuditDirectory(*dir, {signer.public_key_pem()});
  ASSERT_THAT(report, IsOk());
  EXPECT_TRUE(report->ok) << report->first_break;
  ASSERT_EQ(report->nodes.size(), 1u);
  EXPECT_GT(report->nodes[0].checkpoints, 2u);
  EXPECT_EQ(report->nodes[0].unsigned_tail, 0u);
  std::filesystem::remove_all(*dir);
}

TEST(AuditVerifierTextTest, AnUnusualLineThatIsNoRecordIsNamed) {
  const std::string genesis = kAuditGenesisHash;
  struct Unusual {
    std::string line;
    std::string problem;
  };
  const Unusual cases[] = {
      {R"({"seq":"1","prev":")" + genesis + "\"}",
       "no \"seq\" that is a non-negative integer"},
      {R"({"seq":1.0,"prev":")" + genesis + "\"}",
       "no \"seq\" that is a non-negative integer"},
      {R"({"prev":")" + genesis + "\"}",
       "no \"seq\" that is a non-negative integer"},
      {R"({"seq":1,"prev":null})", "no \"prev\" that is a string"},
      {R"({"seq":1,"\u0073eq":1,"prev":")" + genesis + "\"}",
       "key \"seq\" appears twice in one object"},
      {R"({"seq":1,"checkpoint":{"last_seq":0},"prev":")" + genesis + "\"}",
       "\"checkpoint\" is not an object with last_seq, head, key and a base64 "
       "signature"},
  };
  for (const Unusual& c : cases) {
    const HandWritten v = VerifyText(c.line + "\n", {});
    EXPECT_EQ(v.report.first_break,
              absl::StrCat(v.segment,
                           ":1: seq 1: not an audit record (edited or torn): ",
                           c.problem))
        << c.line;
  }
}

}  // namespace
}  // namespace custos::kms
