#include "kms/audit/audit_verifier.h"

#include <dirent.h>

#include <algorithm>
#include <fstream>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/escaping.h"
#include "common/p256.h"
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

struct Line {
  uint64_t seq = 0;
  std::string prev;
  bool is_checkpoint = false;
  uint64_t last_seq = 0;
  std::string head, key, signature;  // signature: raw bytes
};

// Fast path for the writer's own layout: {"seq":N, ... ,"prev":"<64 hex>"}
// with no checkpoint. Anything else takes the full JSON parse. (Edits in
// between are caught by the hash chain either way.)
bool ReadFast(const std::string& line, Line* out) {
  constexpr absl::string_view kSeq = "{\"seq\":";
  constexpr absl::string_view kPrev = ",\"prev\":\"";
  if (line.size() < 90 || !absl::StartsWith(line, kSeq) ||
      !absl::EndsWith(line, "\"}")) {
    return false;
  }
  const size_t prev_at = line.size() - 2 - 64 - kPrev.size();
  if (absl::string_view(line).substr(prev_at, kPrev.size()) != kPrev) {
    return false;
  }
  if (line.find("\"checkpoint\":") != std::string::npos) return false;
  size_t comma = line.find(',', kSeq.size());
  if (comma == std::string::npos ||
      !absl::SimpleAtoi(
          absl::string_view(line).substr(kSeq.size(), comma - kSeq.size()),
          &out->seq)) {
    return false;
  }
  out->prev = line.substr(prev_at + kPrev.size(), 64);
  return true;
}

// Reads a record; false if it is not one.
bool ReadRecord(const std::string& line, Line* out) {
  if (ReadFast(line, out)) return true;
  nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("seq") ||
      !j["seq"].is_number_unsigned() || !j.contains("prev") ||
      !j["prev"].is_string()) {
    return false;
  }
  out->seq = j["seq"].get<uint64_t>();
  out->prev = j["prev"].get<std::string>();
  if (j.contains("checkpoint")) {
    const nlohmann::json& c = j["checkpoint"];
    if (!c.is_object() || !c.contains("last_seq") ||
        !c["last_seq"].is_number_unsigned() || !c.contains("head") ||
        !c["head"].is_string() || !c.contains("key") || !c["key"].is_string() ||
        !c.contains("signature") || !c["signature"].is_string() ||
        !absl::Base64Unescape(c["signature"].get<std::string>(),
                              &out->signature)) {
      return false;
    }
    out->is_checkpoint = true;
    out->last_seq = c["last_seq"].get<uint64_t>();
    out->head = c["head"].get<std::string>();
    out->key = c["key"].get<std::string>();
  }
  return true;
}

}  // namespace

absl::StatusOr<AuditVerifyReport> VerifyAuditDirectory(
    const std::string& dir, const std::vector<std::string>& public_key_pems,
    const std::function<void(uint64_t)>& progress) {
  std::map<std::string, std::string> keys;  // fingerprint -> PEM
  for (const std::string& pem : public_key_pems) {
    keys[PublicKeyFingerprint(pem)] = pem;
  }
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
  report.signatures_checked = !keys.empty();
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
        Line rec;
        const uint64_t& seq = rec.seq;
        const std::string& prev = rec.prev;
        auto fail = [&](const std::string& what) {
          report.ok = false;
          report.first_break = absl::StrCat(path, ":", line_no, ": seq ",
                                            expected, ": ", what);
        };
        if (!ReadRecord(line, &rec)) {
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
        } else if (rec.is_checkpoint) {
          if (rec.last_seq + 1 != seq || rec.head != prev_hash) {
            fail("checkpoint does not cover the record before it");
          } else if (!keys.empty()) {
            auto key = keys.find(rec.key);
            if (key == keys.end()) {
              fail(absl::StrCat("checkpoint signed by key ", rec.key,
                                ", which is not among the public keys given"));
            } else if (!VerifyP256Signature(
                            key->second,
                            CheckpointMessage(node, rec.last_seq, rec.head),
                            rec.signature)
                            .ok()) {
              fail("checkpoint signature does not verify");
            }
          }
          if (report.ok) {
            ++summary.checkpoints;
            summary.last_checkpoint_seq = rec.last_seq;
          }
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
    summary.unsigned_tail = summary.last_seq - summary.last_checkpoint_seq;
    report.nodes.push_back(summary);
  }
  if (progress) progress(report.records);
  return report;
}

}  // namespace custos::kms
