#include "kms/audit/audit_reader.h"

#include <dirent.h>

#include <algorithm>
#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace custos::kms {
namespace {

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

absl::StatusOr<std::vector<AuditReader::Segment>> AuditReader::Segments()
    const {
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
  return segments;
}

absl::StatusOr<std::vector<AuditEvent>> AuditReader::Read(
    AuditPosition& position, const AuditFilter& filter, size_t limit) const {
  absl::StatusOr<std::vector<Segment>> segments = Segments();
  if (!segments.ok()) return segments.status();
  std::vector<AuditEvent> out;
  if (segments->empty()) return out;
  // Where to start: the position's segment, or the one holding next_seq.
  size_t i = 0;
  uint64_t skip_below = 0;  // when locating by seq, records before it
  if (position.segment == 0) {
    skip_below = position.next_seq;
    while (i + 1 < segments->size() &&
           (*segments)[i + 1].first_seq <= position.next_seq) {
      ++i;
    }
    position.segment = (*segments)[i].first_seq;
    position.offset = 0;
  } else {
    while (i < segments->size() &&
           (*segments)[i].first_seq != position.segment) {
      ++i;
    }
    if (i == segments->size()) {
      return absl::NotFoundError(
          absl::StrCat("audit: the segment starting at seq ", position.segment,
                       " is gone; start again from a sequence number"));
    }
  }
  constexpr size_t kChunk = 1 << 20;
  std::string buffer;
  for (; i < segments->size(); ++i) {
    const Segment& segment = (*segments)[i];
    if (segment.first_seq != position.segment) {
      position.segment = segment.first_seq;
      position.offset = 0;
    }
    std::ifstream in(segment.path, std::ios::binary);
    in.seekg(static_cast<std::streamoff>(position.offset));
    buffer.clear();
    for (;;) {
      // Read on from the last complete line; keep a partial one for later.
      const size_t kept = buffer.size();
      buffer.resize(kept + kChunk);
      in.read(buffer.data() + kept, kChunk);
      buffer.resize(kept + static_cast<size_t>(in.gcount()));
      size_t start = 0;
      for (size_t nl; (nl = buffer.find('\n', start)) != std::string::npos;
           start = nl + 1) {
        position.offset += nl + 1 - start;
        AuditEvent e;
        if (!Parse(buffer.substr(start, nl - start), &e) ||
            e.seq < skip_below) {
          continue;
        }
        position.next_seq = e.seq + 1;
        if (!Matches(e, filter)) continue;
        out.push_back(std::move(e));
        if (out.size() >= limit) return out;
      }
      buffer.erase(0, start);
      if (!in) break;  // end of this segment (for now)
    }
  }
  // Stay on the newest segment: a record being written continues there.
  position.segment = segments->back().first_seq;
  return out;
}

absl::StatusOr<AuditPosition> AuditReader::End() const {
  absl::StatusOr<std::vector<Segment>> segments = Segments();
  if (!segments.ok()) return segments.status();
  AuditPosition end;
  if (segments->empty()) return end;
  const Segment& newest = segments->back();
  std::ifstream in(newest.path, std::ios::binary | std::ios::ate);
  std::streamoff size = in.tellg();
  // Only complete lines count: back up to the last newline.
  std::string tail(static_cast<size_t>(std::min<std::streamoff>(size, 65536)),
                   '\0');
  in.seekg(size - static_cast<std::streamoff>(tail.size()));
  in.read(tail.data(), static_cast<std::streamsize>(tail.size()));
  size_t nl = tail.rfind('\n');
  end.segment = newest.first_seq;
  end.offset = nl == std::string::npos
                   ? 0
                   : static_cast<uint64_t>(size) - (tail.size() - nl - 1);
  end.next_seq = 0;  // unknown until a record is read
  return end;
}

}  // namespace custos::kms
