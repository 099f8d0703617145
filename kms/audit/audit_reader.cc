#include "kms/audit/audit_reader.h"

#include <dirent.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace custos::kms {
namespace {

struct Segment {
  uint64_t first_seq;
  std::string path;
};

std::string Str(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : "";
}

bool Parse(const std::string& line, AuditEvent* e) {
  nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("seq") ||
      !j["seq"].is_number_unsigned()) {
    return false;
  }
  e->seq = j["seq"].get<uint64_t>();
  std::string err;
  if (!absl::ParseTime(absl::RFC3339_full, Str(j, "time"), &e->time, &err)) {
    return false;
  }
  e->node = Str(j, "node");
  e->principal = Str(j, "principal");
  e->operation = Str(j, "operation");
  e->key_id = Str(j, "key_id");
  if (j.contains("key_version") && j["key_version"].is_number_unsigned()) {
    e->key_version = j["key_version"].get<uint32_t>();
  }
  if (j.contains("context") && j["context"].is_object()) {
    for (auto it = j["context"].begin(); it != j["context"].end(); ++it) {
      if (it->is_string()) e->context[it.key()] = it->get<std::string>();
    }
  }
  if (j.contains("justification") && j["justification"].is_object()) {
    e->has_justification = true;
    e->justification_reason = Str(j["justification"], "reason");
    e->justification_detail = Str(j["justification"], "detail");
  }
  e->outcome = Str(j, "outcome");
  e->code = Str(j, "code");
  e->request_id = Str(j, "request_id");
  e->peer = Str(j, "peer");
  e->detail = Str(j, "detail");
  e->checkpoint = j.contains("checkpoint");
  e->raw = line;
  return true;
}

bool Matches(const AuditEvent& e, const AuditFilter& f) {
  return e.time >= f.start && e.time < f.end &&
         (f.principal.empty() || e.principal == f.principal) &&
         (f.key_id.empty() || e.key_id == f.key_id) &&
         (f.operation.empty() || e.operation == f.operation) &&
         (f.outcome.empty() || e.outcome == f.outcome);
}

}  // namespace

absl::StatusOr<std::vector<AuditEvent>> AuditReader::Read(
    uint64_t from_seq, const AuditFilter& filter, size_t limit,
    uint64_t* next_seq) const {
  const std::string prefix = absl::StrCat("audit-", node_, "-");
  std::vector<Segment> segments;
  DIR* d = opendir(dir_.c_str());
  if (d == nullptr) {
    return absl::UnavailableError(absl::StrCat("audit: cannot read ", dir_));
  }
  while (dirent* entry = readdir(d)) {
    std::string name = entry->d_name;
    uint64_t first = 0;
    if (absl::StartsWith(name, prefix) && absl::EndsWith(name, ".jsonl") &&
        absl::SimpleAtoi(
            name.substr(prefix.size(), name.size() - prefix.size() - 6),
            &first)) {
      segments.push_back({first, dir_ + "/" + name});
    }
  }
  closedir(d);
  std::sort(segments.begin(), segments.end(),
            [](const Segment& a, const Segment& b) {
              return a.first_seq < b.first_seq;
            });
  std::vector<AuditEvent> out;
  *next_seq = from_seq;
  for (size_t i = 0; i < segments.size(); ++i) {
    // Skip segments that end before from_seq.
    if (i + 1 < segments.size() && segments[i + 1].first_seq <= from_seq) {
      continue;
    }
    std::ifstream in(segments[i].path, std::ios::binary);
    std::stringstream buffer;
    buffer << in.rdbuf();
    const std::string text = buffer.str();
    size_t start = 0;
    for (size_t nl; (nl = text.find('\n', start)) != std::string::npos;
         start = nl + 1) {
      AuditEvent e;
      if (!Parse(text.substr(start, nl - start), &e) || e.seq < from_seq) {
        continue;
      }
      *next_seq = e.seq + 1;
      if (!Matches(e, filter)) continue;
      out.push_back(std::move(e));
      if (out.size() >= limit) return out;
    }
  }
  return out;
}

}  // namespace custos::kms
