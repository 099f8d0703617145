// AuditReader: reads one node's audit segments for queries (ListAuditEvents,
// StreamAuditEvents). Only complete lines are read, so a record being
// written is never half-seen. A read resumes from an AuditPosition (segment
// and byte offset), so following the log reads only what was appended since
// the last poll. The segments are append-only, so readers need no lock with
// the writer. Thread-safe.
#ifndef CUSTOS_KMS_AUDIT_AUDIT_READER_H_
#define CUSTOS_KMS_AUDIT_AUDIT_READER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kms/encryption_context.h"

namespace custos::kms {

struct AuditFilter {
  absl::Time start = absl::InfinitePast();  // inclusive
  absl::Time end = absl::InfiniteFuture();  // exclusive
  std::string principal;
  std::string key_id;
  std::string operation;
  std::string outcome;
};

// One record as read back.
struct AuditEvent {
  uint64_t seq = 0;
  absl::Time time;
  std::string node, principal, operation, key_id;
  uint32_t key_version = 0;
  EncryptionContext context;
  bool has_justification = false;
  std::string justification_reason, justification_detail;
  std::string outcome, code, request_id, peer, detail;
  bool checkpoint = false;
  std::string raw;  // the stored line
};

// Where a reader is in the log.
struct AuditPosition {
  uint64_t segment = 0;   // first seq of the segment; 0: find by next_seq
  uint64_t offset = 0;    // bytes of that segment already read
  uint64_t next_seq = 1;  // seq after the last record read (to locate)
};

class AuditReader {
 public:
  AuditReader(std::string dir, std::string node)
      : dir_(std::move(dir)), node_(std::move(node)) {}

  // Matching events from `position` on, oldest first, at most `limit`;
  // advances `position` past every record read (matching or not).
  absl::StatusOr<std::vector<AuditEvent>> Read(AuditPosition& position,
                                               const AuditFilter& filter,
                                               size_t limit) const;
  // The position just after the last complete record.
  absl::StatusOr<AuditPosition> End() const;

  const std::string& dir() const { return dir_; }
  const std::string& node() const { return node_; }

 private:
  struct Segment {
    uint64_t first_seq;
    std::string path;
  };
  absl::StatusOr<std::vector<Segment>> Segments() const;

  const std::string dir_;
  const std::string node_;
};

}  // namespace custos::kms

#endif  // CUSTOS_KMS_AUDIT_AUDIT_READER_H_
