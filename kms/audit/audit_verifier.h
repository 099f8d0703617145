// Offline verification of audit segments: given a copy of the segment files
// (no server needed), checks every node's hash chain — sequence numbers
// consecutive from 1 across its segments, each segment named after its first
// sequence number (so a removed segment shows as a gap, even before an empty
// one), each record's `prev` equal to the SHA-256 of the line before it —
// and says exactly where the first break is (file, line, sequence number);
// and every signed checkpoint: it must cover exactly the record before it,
// and its ECDSA P-256 signature must verify with one of the public keys
// given. Records after a node's last checkpoint are reported as its unsigned
// tail: cutting them off could not be detected. With public keys given, a
// node that has records must also hold at least one valid checkpoint (a
// hand-written chain is otherwise indistinguishable from a real one), and its
// unsigned tail must not exceed AuditVerifyOptions::max_unsigned_tail (the
// bound custosd itself keeps, see FileAuditLog::Options). Every line must be
// one valid JSON object (kms/audit/json_line.h: UTF-8, nesting at most 64 deep)
// in which no object holds a key twice, so that the verifier and any JSON
// reader read the same seq, prev and checkpoint from it; any other line is a
// break ("not an audit record"). Single-threaded and bound by
// SHA-256 (well over a million typical records a second on one core with
// SHA extensions; tests/bench/audit_verify_bench.cc). Stateless and
// thread-safe.
#ifndef CUSTOS_KMS_AUDIT_AUDIT_VERIFIER_H_
#define CUSTOS_KMS_AUDIT_AUDIT_VERIFIER_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace custos::kms {

// custosd's default `audit_checkpoint_every`: records between checkpoints.
inline constexpr uint64_t kDefaultCheckpointEvery = 1000;
// The most records a node may hold after its last checkpoint, for a given
// checkpoint interval: one interval while the next checkpoint is due, and as
// many again while custosd retries a checkpoint it could not sign (an HSM
// fault); past that custosd refuses requests (FileAuditLog) until it can
// sign again. A log with a longer tail was not written by a custosd with
// these settings, or was cut and extended by hand.
constexpr uint64_t MaxUnsignedTailFor(uint64_t checkpoint_every) {
  return 2 * checkpoint_every;
}
// 2,000: `custos audit verify --max-unsigned-tail`'s default.
inline constexpr uint64_t kDefaultMaxUnsignedTail =
    MaxUnsignedTailFor(kDefaultCheckpointEvery);

struct AuditVerifyReport {
  struct Node {
    std::string node_id;
    int segments = 0;
    uint64_t records = 0;
    uint64_t last_seq = 0;
    uint64_t checkpoints = 0;
    uint64_t last_checkpoint_seq = 0;  // the last record a checkpoint covers
    // Records after the last checkpoint record (all of them if none).
    uint64_t unsigned_tail = 0;
  };
  std::vector<Node> nodes;
  uint64_t records = 0;
  bool ok = true;
  bool signatures_checked = false;  // false when no public key was given
  // Where the first break is: "FILE:LINE: seq N: what is wrong".
  std::string first_break;
};

struct AuditVerifyOptions {
  // The nodes' checkpoint keys (PEM); empty to check the chain only (then
  // nothing below is required either).
  std::vector<std::string> public_key_pems;
  // With public keys: each node that has records must hold a valid
  // checkpoint, and at most this many records may follow its last one.
  uint64_t max_unsigned_tail = kDefaultMaxUnsignedTail;
  // The log is being written (server-side verification): an unterminated
  // last line of a node's newest segment is a record in progress and is
  // skipped rather than reported as a break; and a node may not have
  // reached its first checkpoint yet, so neither a checkpoint nor the tail
  // bound is required (the report still gives the tail).
  bool live = false;
  // Optional: called with the number of records done.
  std::function<void(uint64_t)> progress;
};

// Verifies every audit-<node>-<seq>.jsonl under `dir`. A broken chain, a
// node without a checkpoint or a tail over the bound is reported in the
// report (ok = false), not as an error; errors are for an unreadable
// directory or a public key that is not a P-256 PEM key.
absl::StatusOr<AuditVerifyReport> VerifyAuditDirectoryWith(
    const std::string& dir, const AuditVerifyOptions& options);

// The same, with these fields of AuditVerifyOptions and the default tail
// bound.
absl::StatusOr<AuditVerifyReport> VerifyAuditDirectory(
    const std::string& dir, const std::vector<std::string>& public_key_pems,
    const std::function<void(uint64_t)>& progress = nullptr, bool live = false);

}  // namespace custos::kms

#endif  // CUSTOS_KMS_AUDIT_AUDIT_VERIFIER_H_
