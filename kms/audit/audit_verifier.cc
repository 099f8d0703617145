#include "kms/audit/audit_verifier.h"

#include <dirent.h>

#include <algorithm>
#include <fstream>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kms/audit/audit_chain.h"
#include "nlohmann/json.hpp"

namespace custos::kms {
namespace {

struct Segment {
  std::string name;
  std::string node;
  uint64_t first_seq;
};

// Parses "audit-<node>-<20 digits>.jsonl".
bool ParseSegmentName(const std::string& name, Segment* out) {
  if (!absl::StartsWith(name, "audit-") || !absl::EndsWith(name, ".jsonl")) {
    return false;
  }
  std::string core = name.substr(6, name.size() - 6 - 6);
  size_t dash = core.rfind('-');
  if (dash == std::string::npos || dash == 0) return false;
  out->name = name;
  out->node = core.substr(0, dash);
  return absl::SimpleAtoi(core.substr(dash + 1), &out->first_seq);
}

// Pulls "seq" and "prev" from a line; false if it is not a record.
bool ReadRecord(const std::string& line, uint64_t* seq, std::string* prev) {
  nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("seq") ||
      !j["seq"].is_number_unsigned() || !j.contains("prev") ||
      !j["prev"].is_string()) {
    return false;
  }
  *seq = j["seq"].get<uint64_t>();
  *prev = j["prev"].get<std::string>();
  return true;
}

}  // namespace

absl::StatusOr<AuditVerifyReport> VerifyAuditDirectory(
    const std::string& dir, const std::function<void(uint64_t)>& progress) {
  std::map<std::string, std::vector<Segment>> by_node;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("cannot read audit directory '", dir, "'"));
  }
  while (dirent* e = readdir(d)) {
    Segment s;
    if (ParseSegmentName(e->d_name, &s)) by_node[s.node].push_back(s);
  }
  closedir(d);
  AuditVerifyReport report;
  for (auto& [node, segments] : by_node) {
    std::sort(segments.begin(), segments.end(),
              [](const Segment& a, const Segment& b) {
                return a.first_seq < b.first_seq;
              });
    AuditVerifyReport::Node summary;
    summary.node_id = node;
    uint64_t expected = 1;
    std::string prev_hash = kAuditGenesisHash;
    for (const Segment& seg : segments) {
      ++summary.segments;
      const std::string path = dir + "/" + seg.name;
      std::ifstream in(path, std::ios::binary);
      if (!in) return absl::NotFoundError("cannot read " + path);
      std::string line;
      uint64_t line_no = 0;
      while (std::getline(in, line)) {
        ++line_no;
        uint64_t seq = 0;
        std::string prev;
        auto fail = [&](const std::string& what) {
          report.ok = false;
          report.first_break = absl::StrCat(path, ":", line_no, ": seq ",
                                            expected, ": ", what);
        };
        if (!ReadRecord(line, &seq, &prev)) {
          fail("not an audit record (edited or torn)");
        } else if (seq != expected) {
          fail(absl::StrCat("found seq ", seq,
                            seq > expected ? " (records missing before it)"
                                           : " (records repeated or "
                                             "reordered)"));
        } else if (prev != prev_hash) {
          fail(seq == 1 ? "the chain does not start from the genesis hash"
                        : "prev does not match the record before it (that "
                          "record or this one was edited, or one was "
                          "removed)");
        }
        if (!report.ok) {
          summary.last_seq = expected - 1;  // the last good record
          report.nodes.push_back(summary);
          return report;
        }
        prev_hash = AuditLineHash(line);
        ++expected;
        ++summary.records;
        ++report.records;
        if (progress && report.records % 100000 == 0) progress(report.records);
      }
    }
    summary.last_seq = expected - 1;
    report.nodes.push_back(summary);
  }
  if (progress) progress(report.records);
  return report;
}

}  // namespace custos::kms
