// Fuzzes the offline audit verifier (kms/audit/audit_verifier.h). The input
// is written as node n1's first segment, audit-n1-00000000000000000001.jsonl,
// in a private temporary directory, and verified with the checkpoint public
// key below (and, where a check below needs it, without the key, as a live
// log, or split into two segments). Checks that:
//  - verification always returns a report (the directory is readable), whose
//    totals add up, whose ok agrees with first_break, and whose break is
//    located in the segment;
//  - a verified node's sequence runs 1..last_seq, its checkpoints and
//    unsigned tail are consistent;
//  - checking signatures only ever adds a break: without the key the chain
//    verifies at least as far;
//  - live mode skips an unterminated last line, and only that;
//  - every line of a log that verifies is, read as JSON, a record whose
//    seq and prev are the ones the verifier checked, and a checkpoint
//    exactly when the verifier counted one (its fast path for the writer's
//    own layout must not change the verdict);
//  - the verifier's JSON scanner (kms/audit/json_line.h) accepts a line
//    exactly when nlohmann::json reads it as an object (but for a byte order
//    mark and nesting past its limit, which it refuses), and the members it
//    returns are the object's, raw, when it vouches for their keys;
//  - a log that verifies still verifies, with the same figures, when split
//    at a line into two segments named as the writer names them, and breaks
//    when the second segment is misnamed (records "missing").
// Seeds: segments written by FileAuditLog (checkpoints signed with the key
// below) and edited copies; see tests/fuzz/README.md.
#include <dirent.h>
#include <fcntl.h>
#include <stdlib.h>  // mkdtemp
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "kms/audit/audit_chain.h"
#include "kms/audit/audit_verifier.h"
#include "kms/audit/json_line.h"
#include "nlohmann/json.hpp"
#include "tests/fuzz/fuzz_check.h"

namespace custos::kms {
namespace {

// The public half of the throwaway P-256 key that signed the seeds'
// checkpoints (test-only; its private half was not kept).
constexpr char kCheckpointPublicKey[] =
    "-----BEGIN PUBLIC KEY-----\n"
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE6HHMmKhrmYmJA05bJdGZ5BNbxEq/\n"
    "UWHc4gYuWiU2b28vsE1d/RQruHllmhWCl4XhHiC1XXsOSq+sz41vmTU2HQ==\n"
    "-----END PUBLIC KEY-----\n";

// One temporary directory per process, removed at exit (libFuzzer ends a
// timed run with exit()).
class TempDir {
 public:
  TempDir() {
    const char* tmp = getenv("TMPDIR");
    std::string pattern =
        std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") +
        "/custos-audit-fuzz-XXXXXX";
    CUSTOS_FUZZ_CHECK(mkdtemp(pattern.data()) != nullptr, "mkdtemp");
    path_ = pattern;
  }
  void Remove() const {
    DIR* d = opendir(path_.c_str());
    if (d == nullptr) return;
    while (const dirent* e = readdir(d)) {
      if (absl::StartsWith(e->d_name, "audit-")) {
        (void)unlink((path_ + "/" + e->d_name).c_str());
      }
    }
    closedir(d);
    (void)rmdir(path_.c_str());
  }
  const std::string& path() const { return path_; }
  std::string SegmentPath(uint64_t first_seq) const {
    return absl::StrFormat("%s/audit-n1-%020d.jsonl", path_, first_seq);
  }

 private:
  std::string path_;
};

const TempDir& Dir() {
  static const TempDir* const dir = [] {
    auto* d = new TempDir();
    std::atexit([] { Dir().Remove(); });
    return d;
  }();
  return *dir;
}

void WriteFile(const std::string& path, absl::string_view bytes) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  CUSTOS_FUZZ_CHECK(fd >= 0, "cannot create a segment file");
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
    CUSTOS_FUZZ_CHECK(n > 0, "cannot write a segment file");
    done += static_cast<size_t>(n);
  }
  close(fd);
}

AuditVerifyReport Verify(bool with_key, bool live = false) {
  std::vector<std::string> keys;
  if (with_key) keys.push_back(kCheckpointPublicKey);
  absl::StatusOr<AuditVerifyReport> report =
      VerifyAuditDirectory(Dir().path(), keys, nullptr, live);
  CUSTOS_FUZZ_CHECK(report.ok(),
                    "verification of a readable directory "
                    "returned an error instead of a report");
  CUSTOS_FUZZ_CHECK(report->signatures_checked == with_key,
                    "signatures_checked");
  return *std::move(report);
}

// What must hold of every report on one node's segments.
void CheckReport(const AuditVerifyReport& r, int segments) {
  CUSTOS_FUZZ_CHECK(r.ok == r.first_break.empty(), "ok vs first_break");
  CUSTOS_FUZZ_CHECK(r.nodes.size() == 1 && r.nodes[0].node_id == "n1",
                    "the one node must be reported, broken or not");
  const AuditVerifyReport::Node& n = r.nodes[0];
  CUSTOS_FUZZ_CHECK(n.records == r.records, "node records add up");
  CUSTOS_FUZZ_CHECK(n.segments >= 1 && n.segments <= segments, "segments");
  CUSTOS_FUZZ_CHECK(n.checkpoints <= n.records,
                    "more checkpoints than records");
  if (!r.ok) {
    CUSTOS_FUZZ_CHECK(
        absl::StartsWith(r.first_break, Dir().path() + "/audit-n1-"),
        "the break does not name a segment file");
    CUSTOS_FUZZ_CHECK(n.last_seq <= n.records, "last good seq");
    return;
  }
  CUSTOS_FUZZ_CHECK(n.segments == segments, "every segment visited");
  CUSTOS_FUZZ_CHECK(n.last_seq == n.records, "seq runs from 1 without gaps");
  CUSTOS_FUZZ_CHECK(n.unsigned_tail <= n.last_seq, "unsigned tail");
  if (n.checkpoints == 0) {
    CUSTOS_FUZZ_CHECK(
        n.unsigned_tail == n.last_seq && n.last_checkpoint_seq == 0,
        "no checkpoint: everything is unsigned");
  } else {
    // The checkpoint record covers the one before it.
    CUSTOS_FUZZ_CHECK(n.last_checkpoint_seq + 1 + n.unsigned_tail == n.last_seq,
                      "checkpoint coverage and unsigned tail disagree");
  }
}

bool SameFigures(const AuditVerifyReport& a, const AuditVerifyReport& b) {
  return a.ok == b.ok && a.records == b.records && a.nodes.size() == 1 &&
         b.nodes.size() == 1 && a.nodes[0].last_seq == b.nodes[0].last_seq &&
         a.nodes[0].checkpoints == b.nodes[0].checkpoints &&
         a.nodes[0].last_checkpoint_seq == b.nodes[0].last_checkpoint_seq &&
         a.nodes[0].unsigned_tail == b.nodes[0].unsigned_tail;
}

// Every line of a log that verified, read as JSON the way the audit reader
// and any other consumer reads it, is a record with the seq and prev the
// verifier vouched for, and a checkpoint exactly when the verifier counted
// one: its fast path for the writer's layout must not change the verdict of
// the full parse.
void CheckLinesAreRecords(absl::string_view input,
                          const AuditVerifyReport& report) {
  std::string prev = kAuditGenesisHash;
  uint64_t seq = 0;
  uint64_t checkpoints = 0;
  while (!input.empty()) {
    const size_t nl = input.find('\n');
    const absl::string_view line = input.substr(0, nl);
    input = nl == absl::string_view::npos ? absl::string_view()
                                          : input.substr(nl + 1);
    ++seq;
    const nlohmann::json j =
        nlohmann::json::parse(line.begin(), line.end(), nullptr, false);
    CUSTOS_FUZZ_CHECK(!j.is_discarded() && j.is_object(),
                      "a verified log has a line that is not a JSON object");
    const auto s = j.find("seq");
    const auto p = j.find("prev");
    CUSTOS_FUZZ_CHECK(
        s != j.end() && s->is_number_unsigned() && s->get<uint64_t>() == seq,
        "a verified line's JSON seq is not its position");
    CUSTOS_FUZZ_CHECK(
        p != j.end() && p->is_string() && p->get<std::string>() == prev,
        "a verified line's JSON prev does not chain");
    if (j.contains("checkpoint")) ++checkpoints;
    prev = AuditLineHash(line);
  }
  CUSTOS_FUZZ_CHECK(checkpoints == report.nodes[0].checkpoints,
                    "the verifier counted other checkpoints than the log's "
                    "JSON holds");
}

// The scanner and nlohmann::json agree on every line of the input.
void CheckScannerAgrees(absl::string_view input) {
  static JsonObjectLine* const scan = new JsonObjectLine;
  while (!input.empty()) {
    const size_t nl = input.find('\n');
    const absl::string_view line = input.substr(0, nl);
    input = nl == absl::string_view::npos ? absl::string_view()
                                          : input.substr(nl + 1);
    const bool scanned = ScanJsonObjectLine(line, scan);
    CUSTOS_FUZZ_CHECK(scanned == (scan->error == nullptr),
                      "the scanner's verdict and its error disagree");
    CUSTOS_FUZZ_CHECK(scanned || scan->error_offset <= line.size(),
                      "the scanner's error is past the line");
    if (!scanned && (absl::StartsWith(line, "\xef\xbb\xbf") ||
                     absl::string_view(scan->error) == "nested too deeply")) {
      continue;  // nlohmann skips a byte order mark and has no depth limit
    }
    const nlohmann::json j =
        nlohmann::json::parse(line.begin(), line.end(), nullptr, false);
    CUSTOS_FUZZ_CHECK(scanned == (!j.is_discarded() && j.is_object()),
                      "the JSON scanner and nlohmann disagree on a line");
    if (!scanned || !scan->keys_checked) continue;
    if (scan->repeated_key) continue;  // readers differ: the verifier refuses
    CUSTOS_FUZZ_CHECK(j.size() == scan->member_count,
                      "the scanner's members are not nlohmann's");
    for (size_t i = 0; i < scan->member_count; ++i) {
      const JsonObjectLine::Member& m = scan->members[i];
      const auto it = j.find(std::string(m.key));
      CUSTOS_FUZZ_CHECK(it != j.end(), "a scanned key is not nlohmann's");
      const nlohmann::json value =
          nlohmann::json::parse(m.value.begin(), m.value.end(), nullptr, false);
      CUSTOS_FUZZ_CHECK(!value.is_discarded() && value == *it,
                        "a scanned member's value is not nlohmann's");
    }
  }
}

// Splits a log that verified (`whole`) into two segments at a line, as the
// writer rolls, then puts the one segment back.
void CheckSplit(absl::string_view input, const AuditVerifyReport& whole,
                bool with_key) {
  const uint64_t records = whole.records;
  if (records < 2) return;
  const uint64_t first = 1 + input.size() % (records - 1);  // lines in seg 1
  size_t cut = 0;
  for (uint64_t i = 0; i < first; ++i) cut = input.find('\n', cut) + 1;
  WriteFile(Dir().SegmentPath(1), input.substr(0, cut));
  WriteFile(Dir().SegmentPath(first + 1), input.substr(cut));
  const AuditVerifyReport split = Verify(with_key);
  CheckReport(split, 2);
  CUSTOS_FUZZ_CHECK(SameFigures(split, whole),
                    "splitting a verified log into segments changed the "
                    "verdict");
  (void)unlink(Dir().SegmentPath(first + 1).c_str());

  // Named one past its first record: the record in between is "missing".
  WriteFile(Dir().SegmentPath(first + 2), input.substr(cut));
  const AuditVerifyReport gap = Verify(with_key);
  CheckReport(gap, 2);
  CUSTOS_FUZZ_CHECK(!gap.ok, "a misnamed segment was not reported");
  (void)unlink(Dir().SegmentPath(first + 2).c_str());
  WriteFile(Dir().SegmentPath(1), input);
}

void FuzzOne(absl::string_view input) {
  CheckScannerAgrees(input);
  WriteFile(Dir().SegmentPath(1), input);
  const AuditVerifyReport signed_report = Verify(/*with_key=*/true);
  CheckReport(signed_report, 1);

  // Signatures only add checks. (Each verification costs a 1 MiB read
  // buffer, which under ASan is a fresh mapping and most of the time of a
  // run: the chain alone is checked again when the signed verification
  // passed or stopped at a checkpoint, and for one input in eight.)
  const bool chain_too =
      signed_report.ok ||
      absl::StrContains(signed_report.first_break, "checkpoint") ||
      input.size() % 8 == 0;
  if (chain_too) {
    const AuditVerifyReport chain_report = Verify(/*with_key=*/false);
    CheckReport(chain_report, 1);
    CUSTOS_FUZZ_CHECK(chain_report.records >= signed_report.records,
                      "checking signatures let more records through");
    if (signed_report.ok) {
      CUSTOS_FUZZ_CHECK(SameFigures(chain_report, signed_report),
                        "a log that verifies with its key fails without it");
    } else if (chain_report.ok) {
      CheckLinesAreRecords(input, chain_report);
      CheckSplit(input, chain_report, /*with_key=*/false);
    }
  }

  // Live mode skips an unterminated last line and nothing else. (A
  // terminated log, where it has nothing to skip, is not verified again.)
  if (!input.empty() && input.back() != '\n') {
    const AuditVerifyReport live_report = Verify(/*with_key=*/true, true);
    CheckReport(live_report, 1);
    CUSTOS_FUZZ_CHECK(live_report.records <= signed_report.records,
                      "live mode let more records through");
    if (signed_report.ok) {
      CUSTOS_FUZZ_CHECK(
          live_report.ok && live_report.records + 1 == signed_report.records,
          "live mode did not skip just the unterminated line");
    }
  }

  if (signed_report.ok) {
    CheckLinesAreRecords(input, signed_report);
    CheckSplit(input, signed_report, /*with_key=*/true);
  }
}

}  // namespace
}  // namespace custos::kms

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  custos::kms::FuzzOne(
      absl::string_view(reinterpret_cast<const char*>(data), size));
  return 0;
}
