// The audit log: one JSON line per request that reaches the service,
// allowed, refused or failed, written durably before the reply goes out.
//
// FileAuditLog appends to segment files in one directory with group commit:
// callers enqueue a record and wait; one writer thread appends every queued
// record, fdatasyncs once for the batch, and releases the callers. A segment
// rolls once it reaches `max_segment_bytes` or `max_segment_age` (checked
// before each batch): it is sealed with a checkpoint (when there is a
// signer), fsynced and closed, and the next one is named after the next
// sequence number; the chain runs on across segments and restarts. Each
// record carries its sequence number and `prev`, the SHA-256 (hex) of the
// previous record's line, so any edit, deletion or reordering breaks the
// chain. If a write or sync fails, every caller of that batch and later gets
// UNAVAILABLE (the service then releases nothing) until a write succeeds
// again: the log recovers by itself, without a restart.
//
// With a signer, the log never holds more than `max_unsigned_tail` records
// after its last checkpoint (the bound `custos audit verify` enforces): a
// batch never runs past a due checkpoint, and while checkpoints cannot be
// signed (an HSM fault) the log keeps accepting records up to the bound,
// retrying the signature before each batch, then fails every append with
// UNAVAILABLE until a checkpoint is signed. At Open it counts the unsigned
// records a crash left after the last checkpoint (in the newest segment's
// last MiB), so a restart does not reset the bound.
//
// Metrics (Options::metrics): the queue's depth, each batch's fdatasync
// latency, records written and write failures.
//
// Never holds plaintext, data keys, PINs or ciphertext blobs: records are
// built from allow-listed fields only. Thread-safe.
#ifndef CUSTOS_KMS_AUDIT_AUDIT_LOG_H_
#define CUSTOS_KMS_AUDIT_AUDIT_LOG_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/metrics.h"
#include "kms/audit/audit_chain.h"
#include "kms/audit/checkpoint.h"
#include "kms/encryption_context.h"
#include "kms/policy.h"

namespace custos::kms {

// What one record may hold (docs/audit-format.md, "Size"): each string
// field's JSON text at most its cap below, cut with "…" beyond it; the
// encryption context at most kMaxAuditContextBytes in all (pairs past it,
// and pairs whose key alone is over its cap, are left out, and the detail
// says how many); the whole line, seq and prev included, at most
// kMaxAuditRecordBytes. No request can make a record bigger.
inline constexpr size_t kMaxAuditRecordBytes = 8192;
inline constexpr size_t kMaxAuditPrincipalBytes = 600;
inline constexpr size_t kMaxAuditShortFieldBytes = 160;  // ids, peer, names
inline constexpr size_t kMaxAuditDetailBytes = 1024;     // also justification
inline constexpr size_t kMaxAuditContextBytes = 4096;
inline constexpr size_t kMaxAuditContextKeyBytes = 256;
inline constexpr size_t kMaxAuditContextValueBytes = 512;

enum class AuditOutcome { kAllowed, kDenied, kFailed };
const char* AuditOutcomeName(AuditOutcome outcome);

// What one request did. Field names in the JSON line are documented in
// docs/audit-format.md and stable.
struct AuditRecord {
  absl::Time time;
  std::string principal;
  std::string operation;  // the RPC name, e.g. "GenerateDataKey"
  std::string key_id;     // empty when no key was involved or resolved
  uint32_t key_version = 0;
  EncryptionContext context;
  bool has_justification = false;
  Justification justification;
  AuditOutcome outcome = AuditOutcome::kAllowed;
  absl::StatusCode code = absl::StatusCode::kOk;
  std::string request_id;
  std::string peer;
  std::string detail;  // short, non-secret: "count=100", an error summary
  // The policy a call set (CreateKey, SetKeyPolicy), as
  // PolicyToCanonicalJson made it; empty for other calls. Written as
  // "policy_sha256" and, up to kMaxAuditPolicyBytes, the "policy" object
  // itself; a larger one as "policy_truncated", a string holding its first
  // kAuditPolicyPrefixBytes (docs/audit-format.md).
  std::string policy;
};

// A policy of up to 16 KiB of canonical JSON is recorded whole. The server
// takes requests of up to limits.max_message_bytes (64 KiB by default, at
// most 16 MiB) and ValidatePolicy allows several MiB, so larger ones exist:
// they are recorded by hash and their first 4 KiB, keeping records small.
inline constexpr size_t kMaxAuditPolicyBytes = 16 * 1024;
inline constexpr size_t kAuditPolicyPrefixBytes = 4 * 1024;

// Where records go. The service depends on this interface only.
class AuditLog {
 public:
  // Receives the outcome of an append: OK once the record is durable,
  // UNAVAILABLE if it cannot be made so.
  using AppendDone = absl::AnyInvocable<void(absl::Status) &&>;

  virtual ~AuditLog() = default;
  // Queues the record and returns without blocking; `done` runs exactly
  // once, when the record is durable or has failed, on the log's own thread
  // (or on the caller's, when the log refuses the record at once: queue
  // full, shutting down). `done` must be quick and must not append.
  virtual void AppendAsync(AuditRecord record, AppendDone done) = 0;
  // Returns once the record is durable; UNAVAILABLE if it cannot be made so.
  absl::Status Append(AuditRecord record);
};

class FileAuditLog : public AuditLog {
 public:
  struct Options {
    std::string dir;
    std::string node_id;
    // Records waiting for the writer; beyond this AppendAsync refuses at
    // once with UNAVAILABLE (on the caller's thread) rather than block it.
    size_t max_queue = 16384;
    bool sync = true;  // fdatasync each batch (off only to measure)
    // Under concurrency, how long the writer may wait for a fuller batch
    // before syncing (zero: never wait).
    absl::Duration batch_window = absl::Microseconds(200);
    // Signs a checkpoint every `checkpoint_every` records or
    // `checkpoint_interval`, and at shutdown. Null: no checkpoints.
    AuditSigner* signer = nullptr;
    uint64_t checkpoint_every = 1000;
    absl::Duration checkpoint_interval = absl::Seconds(60);
    // With a signer: the most records held after the last checkpoint; past
    // it appends fail until a checkpoint is signed. 0 (the default):
    // MaxUnsignedTailFor(checkpoint_every), twice checkpoint_every. Must not
    // be below checkpoint_every.
    uint64_t max_unsigned_tail = 0;
    // Before a batch, a segment holding at least one record rolls over to a
    // new one once it has `max_segment_bytes` or is `max_segment_age` old.
    uint64_t max_segment_bytes = uint64_t{64} << 20;
    absl::Duration max_segment_age = absl::Hours(24);
    // Where the log's metrics go (docs/operations.md); null: none. Must
    // outlive the log.
    metrics::Registry* metrics = nullptr;
  };
  struct Stats {
    uint64_t records = 0;
    uint64_t batches = 0;  // = fdatasync calls when sync is on
    uint64_t failures = 0;
    uint64_t checkpoints = 0;
    uint64_t segments = 0;  // opened by this process, the first included
    uint64_t next_seq = 0;
    uint64_t queue_full = 0;  // appends refused because the queue was full
  };

  // Creates the directory if needed, finds the end of the existing chain
  // (truncating a torn final line left by a crash, and logging that it did),
  // and opens a new segment "audit-<node>-<first seq, 20 digits>.jsonl".
  static absl::StatusOr<std::unique_ptr<FileAuditLog>> Open(Options options);
  ~FileAuditLog() override;

  void AppendAsync(AuditRecord record, AppendDone done) override;
  Stats stats() const;
  // The segment being appended to; changes when it rolls.
  std::string segment_path() const;

 private:
  struct Pending {
    std::string fields;  // SerializeFields of the record
    AppendDone done;
  };

  explicit FileAuditLog(Options options) : options_(std::move(options)) {}
  std::string SegmentPathFor(uint64_t first_seq) const;
  void WriterLoop();
  bool HasWork() const ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    return !queue_.empty() || stopping_;
  }
  // Rolls the segment if it is due, then chains, writes and syncs `batch`,
  // and hands it to the completer with the outcome. Writer thread only.
  void WriteRecords(std::vector<Pending>& batch);
  // Tells callers their outcome, so that the writer can start the next
  // batch's write and sync meanwhile (completions finish gRPC calls, which
  // costs CPU). Completer thread only.
  void CompleterLoop();
  // Rolls to a new segment if the current one is due (size or age). On
  // failure the batch fails and the roll is tried again before the next.
  // Writer thread only.
  absl::Status MaybeRoll();
  // Writes and syncs one batch (opening the segment, and syncing the
  // directory after creating it, if needed); on failure, rolls the file back
  // to its last durable length.
  absl::Status WriteBatch(const std::string& bytes);
  // The record's JSON members between "seq" and "prev" (no braces), made
  // on the caller's thread so that the writer only chains and writes.
  std::string SerializeFields(const AuditRecord& record) const;
  // One line: {"seq":N,<fields>,"prev":"<hex>"}.
  static std::string Line(uint64_t seq, const std::string& fields,
                          const std::string& prev);
  // Appends a signed checkpoint if one is due (or `force` and any record
  // came since the last). Writer thread only.
  void MaybeCheckpoint(bool force);
  // How many queued records the next batch may take: up to the next due
  // checkpoint, or, while checkpoints fail, up to the tail bound. 0 means
  // the whole queue: without a signer, or once the bound is reached (then
  // the batch fails unless a checkpoint is signed first). Writer thread
  // only.
  size_t BatchRoom() const;
  // Before the threads start.
  absl::Status RegisterMetrics(metrics::Registry& registry);

  const Options options_;
  // Writer thread only (and Open, before the writer starts):
  std::string path_;  // the current segment
  int fd_ = -1;
  // Holds an exclusive flock on ".audit-<node>.lock" in the directory for the
  // log's lifetime: a second writer for the same node would fork the chain.
  int lock_fd_ = -1;
  bool dir_sync_pending_ = false;  // path_ was created; fsync the directory
  uint64_t durable_size_ = 0;
  absl::Time segment_opened_ = absl::Now();
  uint64_t since_checkpoint_ = 0;   // records after the last checkpoint
  uint64_t max_unsigned_tail_ = 0;  // set by Open
  size_t last_batch_size_ = 0;      // writer thread only
  absl::Time last_checkpoint_ = absl::Now();

  mutable absl::Mutex mu_;
  std::deque<Pending> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 1;
  std::string prev_hash_ ABSL_GUARDED_BY(mu_);     // hex of the last line
  std::string segment_path_ ABSL_GUARDED_BY(mu_);  // = path_, for readers
  Stats stats_ ABSL_GUARDED_BY(mu_);
  std::thread writer_;

  struct Completed {
    std::vector<Pending> batch;
    absl::Status status;
  };
  absl::Mutex completer_mu_;
  std::deque<Completed> completed_ ABSL_GUARDED_BY(completer_mu_);
  bool writer_done_ ABSL_GUARDED_BY(completer_mu_) = false;
  std::thread completer_;

  // Null without metrics; set before the writer starts.
  metrics::Histogram* fsync_seconds_ = nullptr;
  // Unregistered first thing in the destructor: the callbacks read mu_.
  std::vector<metrics::CallbackHandle> metric_callbacks_;
};

}  // namespace custos::kms

#endif  // CUSTOS_KMS_AUDIT_AUDIT_LOG_H_
