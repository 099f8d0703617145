// AuditReader: reads one node's audit segments for queries (ListAuditEvents,
// StreamAuditEvents). Only complete lines are read, so a record being
// written is never half-seen. Each call scans the segments from the one
// holding `from_seq`; the segments are append-only, so readers need no lock
// with the writer. Thread-safe.
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

class AuditReader {
 public:
  AuditReader(std::string dir, std::string node)
      : dir_(std::move(dir)), node_(std::move(node)) {}

  // Matching events with seq >= from_seq, oldest first, at most `limit`.
  // `*next_seq` is where to continue: after the last event returned when
  // the limit was reached, else after the last record in the log.
  absl::StatusOr<std::vector<AuditEvent>> Read(uint64_t from_seq,
                                               const AuditFilter& filter,
                                               size_t limit,
                                               uint64_t* next_seq) const;

  const std::string& dir() const { return dir_; }
  const std::string& node() const { return node_; }

 private:
  const std::string dir_;
  const std::string node_;
};

}  // namespace custos::kms

#endif  // CUSTOS_KMS_AUDIT_AUDIT_READER_H_
