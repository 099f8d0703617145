#include "kms/audit/audit_log.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/notification.h"
#include "common/logging.h"
#include "common/p256.h"
#include "common/status_macros.h"
#include "kms/audit/audit_verifier.h"
#include "kms/audit/json_text.h"
#include "nlohmann/json.hpp"

namespace custos::kms {
namespace {

using OrderedJson = nlohmann::ordered_json;

std::string Errno(absl::string_view what, const std::string& path) {
  return absl::StrCat(what, " ", path, ": ", std::strerror(errno));
}

// Reads up to the last `max` bytes of the file at `fd`.
std::string ReadTail(int fd, off_t size, size_t max) {
  off_t start = size > static_cast<off_t>(max) ? size - max : 0;
  std::string buf(size - start, '\0');
  ssize_t n = pread(fd, buf.data(), buf.size(), start);
  buf.resize(n < 0 ? 0 : n);
  return buf;
}

// The records after the last checkpoint among the complete lines of
// `lines` (a segment's tail): all of them if none is a checkpoint.
uint64_t UnsignedRecordsAtEnd(absl::string_view lines) {
  uint64_t count = 0;
  while (!lines.empty()) {
    if (lines.back() == '\n') lines.remove_suffix(1);
    const size_t nl = lines.rfind('\n');
    const absl::string_view line =
        nl == absl::string_view::npos ? lines : lines.substr(nl + 1);
    lines = nl == absl::string_view::npos ? absl::string_view()
                                          : lines.substr(0, nl + 1);
    if (line.empty()) continue;
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.contains("checkpoint")) break;
    ++count;
  }
  return count;
}

absl::Status SyncDir(const std::string& dir) {
  int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return absl::UnavailableError(Errno("audit: open", dir));
  int rc = fsync(fd);
  close(fd);
  if (rc != 0) return absl::UnavailableError(Errno("audit: fsync", dir));
  return absl::OkStatus();
}

}  // namespace

const char* AuditOutcomeName(AuditOutcome outcome) {
  switch (outcome) {
    case AuditOutcome::kAllowed:
      return "ALLOWED";
    case AuditOutcome::kDenied:
      return "DENIED";
    case AuditOutcome::kFailed:
      return "FAILED";
  }
  return "UNKNOWN";
}

absl::StatusOr<std::unique_ptr<FileAuditLog>> FileAuditLog::Open(
    Options options) {
  if (options.dir.empty()) {
    return absl::InvalidArgumentError(
        "audit_dir is empty: name a directory for the audit segments");
  }
  if (options.node_id.empty()) {
    return absl::InvalidArgumentError("node_id is empty");
  }
  const uint64_t max_unsigned_tail =
      options.max_unsigned_tail != 0
          ? options.max_unsigned_tail
          : MaxUnsignedTailFor(std::max<uint64_t>(options.checkpoint_every, 1));
  if (max_unsigned_tail < options.checkpoint_every) {
    return absl::InvalidArgumentError(
        absl::StrCat("audit max_unsigned_tail ", max_unsigned_tail,
                     " is below checkpoint_every ", options.checkpoint_every,
                     ": give at least checkpoint_every, or 0 for twice it"));
  }
  if (mkdir(options.dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return absl::UnavailableError(Errno("audit: mkdir", options.dir));
  }
  std::unique_ptr<FileAuditLog> log(new FileAuditLog(options));
  log->max_unsigned_tail_ = max_unsigned_tail;
  // One writer per node and directory, before anything is read or written:
  // a second custosd would otherwise cut what it takes for a torn line and
  // number records the first one numbers too.
  const std::string lock_path =
      absl::StrCat(options.dir, "/.audit-", options.node_id, ".lock");
  log->lock_fd_ = open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (log->lock_fd_ < 0) {
    return absl::UnavailableError(Errno("audit: open", lock_path));
  }
  if (flock(log->lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "audit_dir: ", options.dir, " is in use by another custosd for node ",
        options.node_id, " (", lock_path,
        " is locked); stop that one, or give this one its own audit_dir or "
        "node_id"));
  }
  // Find the newest segment of this node: names sort by first sequence.
  const std::string prefix = absl::StrCat("audit-", options.node_id, "-");
  std::vector<std::string> segments;
  if (DIR* d = opendir(options.dir.c_str())) {
    while (dirent* e = readdir(d)) {
      std::string name = e->d_name;
      // Exactly "audit-<node>-<20 digits>.jsonl": node "a" must not take
      // node "a-b"'s segments for its own.
      if (name.size() == prefix.size() + 20 + 6 &&
          absl::StartsWith(name, prefix) && absl::EndsWith(name, ".jsonl") &&
          std::all_of(name.begin() + prefix.size(), name.end() - 6,
                      [](char c) { return c >= '0' && c <= '9'; })) {
        segments.push_back(name);
      }
    }
    closedir(d);
  } else {
    return absl::UnavailableError(Errno("audit: opendir", options.dir));
  }
  std::sort(segments.begin(), segments.end());
  uint64_t next_seq = 1;
  std::string prev = kAuditGenesisHash;
  for (auto it = segments.rbegin(); it != segments.rend(); ++it) {
    std::string path = options.dir + "/" + *it;
    int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return absl::UnavailableError(Errno("audit: open", path));
    struct stat st;
    fstat(fd, &st);
    std::string tail = ReadTail(fd, st.st_size, 1 << 20);
    size_t end = tail.rfind('\n');
    size_t keep = end == std::string::npos ? 0 : end + 1;
    if (keep != tail.size()) {
      // A crash tore the final line: it was never durable, so no reply
      // depended on it. Cut it off and say so.
      off_t new_size = st.st_size - (tail.size() - keep);
      if (ftruncate(fd, new_size) != 0 || fsync(fd) != 0) {
        close(fd);
        return absl::UnavailableError(Errno("audit: truncate", path));
      }
      spdlog::warn("audit: truncated a torn final line ({} bytes) in {}",
                   tail.size() - keep, path);
      tail.resize(keep);
    }
    close(fd);
    if (tail.empty()) continue;  // empty segment: look at the one before
    tail.pop_back();             // the final newline
    size_t start = tail.rfind('\n');
    std::string last = tail.substr(start == std::string::npos ? 0 : start + 1);
    nlohmann::json j = nlohmann::json::parse(last, nullptr, false);
    if (j.is_discarded() || !j.contains("seq") || !j["seq"].is_number()) {
      return absl::DataLossError(absl::StrCat(
          "audit: the last record of ", path,
          " is not a valid record; the log needs an auditor's attention "
          "(verify it with `custos audit verify`) before custosd can append"));
    }
    next_seq = j["seq"].get<uint64_t>() + 1;
    prev = AuditLineHash(last);
    // A crash may have left records after the last checkpoint; they count
    // against the bound (seen up to this tail: a segment is sealed with a
    // checkpoint when it rolls, and a bound's worth of records fits).
    if (options.signer != nullptr) {
      log->since_checkpoint_ = UnsignedRecordsAtEnd(tail);
    }
    break;
  }
  log->path_ = log->SegmentPathFor(next_seq);
  log->fd_ =
      open(log->path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (log->fd_ < 0) {
    return absl::UnavailableError(Errno("audit: create", log->path_));
  }
  struct stat st;
  fstat(log->fd_, &st);
  log->durable_size_ = st.st_size;
  log->segment_opened_ = absl::Now();
  CUSTOS_RETURN_IF_ERROR(SyncDir(options.dir));
  {
    absl::MutexLock lock(&log->mu_);
    log->next_seq_ = next_seq;
    log->prev_hash_ = prev;
    log->segment_path_ = log->path_;
    log->stats_.segments = 1;
  }
  if (options.metrics != nullptr) {
    CUSTOS_RETURN_IF_ERROR(log->RegisterMetrics(*options.metrics));
  }
  log->completer_ = std::thread([raw = log.get()] { raw->CompleterLoop(); });
  log->writer_ = std::thread([raw = log.get()] { raw->WriterLoop(); });
  return log;
}

absl::Status FileAuditLog::RegisterMetrics(metrics::Registry& registry) {
  absl::StatusOr<metrics::Family<metrics::Histogram>*> fsync =
      registry.AddHistogram(
          "custos_audit_fsync_duration_seconds",
          "Time each fdatasync of the audit segment took (one per "
          "group-commit batch or checkpoint).",
          {}, metrics::LatencyBuckets());
  if (!fsync.ok()) return fsync.status();
  fsync_seconds_ = &(*fsync)->WithLabels({});
  using Type = metrics::Registry::Type;
  struct Reading {
    const char* name;
    const char* help;
    Type type;
    double (*read)(const FileAuditLog&);
  };
  const Reading readings[] = {
      {"custos_audit_queue_depth",
       "Audit records waiting for the writer (requests are refused with "
       "UNAVAILABLE beyond the queue's limit).",
       Type::kGauge,
       [](const FileAuditLog& log) -> double {
         absl::MutexLock lock(&log.mu_);
         return static_cast<double>(log.queue_.size());
       }},
      {"custos_audit_records_total", "Audit records made durable.",
       Type::kCounter,
       [](const FileAuditLog& log) -> double {
         return static_cast<double>(log.stats().records);
       }},
      {"custos_audit_write_failures_total",
       "Failed audit writes or syncs (each fails its batch's requests).",
       Type::kCounter,
       [](const FileAuditLog& log) -> double {
         return static_cast<double>(log.stats().failures);
       }},
  };
  for (const Reading& r : readings) {
    absl::StatusOr<metrics::CallbackHandle> handle = registry.AddCallback(
        r.name, r.help, r.type, [this, read = r.read] { return read(*this); });
    if (!handle.ok()) return handle.status();
    metric_callbacks_.push_back(*std::move(handle));
  }
  return absl::OkStatus();
}

FileAuditLog::~FileAuditLog() {
  metric_callbacks_.clear();  // no scrape reads the log from here on
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (writer_.joinable()) writer_.join();  // not started if Open failed
  {
    absl::MutexLock lock(&completer_mu_);
    writer_done_ = true;
  }
  if (completer_.joinable()) completer_.join();  // after every completion
  if (fd_ >= 0) close(fd_);
  if (lock_fd_ >= 0) close(lock_fd_);  // releases the flock, last
}

absl::Status AuditLog::Append(AuditRecord record) {
  absl::Notification durable;
  absl::Status result;
  AppendAsync(std::move(record), [&](absl::Status s) {
    result = std::move(s);
    durable.Notify();
  });
  durable.WaitForNotification();
  return result;
}

void FileAuditLog::AppendAsync(AuditRecord record, AppendDone done) {
  std::string fields = SerializeFields(record);
  absl::Status refused;
  {
    absl::MutexLock lock(&mu_);
    // A full queue refuses rather than waits: the caller may be a gRPC
    // callback thread, which must never block on the disk.
    if (stopping_) {
      refused = absl::UnavailableError("audit log is shutting down");
    } else if (queue_.size() >= options_.max_queue) {
      ++stats_.queue_full;
      refused = absl::UnavailableError(
          "audit log queue is full (the disk is slower than the requests); "
          "retry later");
    } else {
      queue_.push_back(Pending{std::move(fields), std::move(done)});
      return;
    }
  }
  std::move(done)(std::move(refused));
}

std::string FileAuditLog::SegmentPathFor(uint64_t first_seq) const {
  return absl::StrFormat("%s/audit-%s-%020d.jsonl", options_.dir,
                         options_.node_id, first_seq);
}

std::string FileAuditLog::segment_path() const {
  absl::MutexLock lock(&mu_);
  return segment_path_;
}

void FileAuditLog::WriterLoop() {
  for (;;) {
    std::vector<Pending> batch;
    bool stopping = false;
    {
      absl::MutexLock lock(&mu_);
      const absl::Condition has_work(this, &FileAuditLog::HasWork);
      if (options_.signer != nullptr) {
        // Also wake for time-based checkpoints.
        mu_.AwaitWithTimeout(has_work, options_.checkpoint_interval);
      } else {
        mu_.Await(has_work);
      }
      // Under concurrency (the last batch held several records), wait a
      // bounded moment for as many again: one fsync then covers more
      // requests. A lone caller never waits.
      if (options_.batch_window > absl::ZeroDuration() &&
          last_batch_size_ > 1 && !stopping_ && !queue_.empty() &&
          queue_.size() < last_batch_size_) {
        const size_t want = last_batch_size_;
        auto full = [this, want]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return queue_.size() >= want || stopping_;
        };
        mu_.AwaitWithTimeout(absl::Condition(&full), options_.batch_window);
      }
    }
    if (BatchRoom() == 0 && options_.signer != nullptr) {
      // At the bound: the queue can only be served once a checkpoint is
      // signed; try now (the records are refused if it fails).
      MaybeCheckpoint(/*force=*/true);
    }
    {
      absl::MutexLock lock(&mu_);
      // A batch stops at a due checkpoint, so that the signed head never
      // falls further behind than the bound (the rest waits for the next).
      const size_t room = BatchRoom();
      const size_t take =
          room == 0 ? queue_.size() : std::min(room, queue_.size());
      batch.assign(std::make_move_iterator(queue_.begin()),
                   std::make_move_iterator(queue_.begin() + take));
      queue_.erase(queue_.begin(), queue_.begin() + take);
      stopping = stopping_ && queue_.empty();
    }
    if (!batch.empty()) last_batch_size_ = batch.size();
    if (!batch.empty()) WriteRecords(batch);
    MaybeCheckpoint(/*force=*/stopping);
    if (stopping) return;
  }
}

absl::Status FileAuditLog::MaybeRoll() {
  // An empty segment never rolls: its name is already the next sequence.
  if (durable_size_ == 0 ||
      (durable_size_ < options_.max_segment_bytes &&
       absl::Now() - segment_opened_ < options_.max_segment_age)) {
    return absl::OkStatus();
  }
  // Seal the segment: with a checkpoint as its last record, everything in
  // it is signed and only the newest segment can have an unsigned tail.
  MaybeCheckpoint(/*force=*/true);
  if (options_.sync) {
    // Each batch was fdatasynced; this makes the file's metadata durable too
    // before it is left behind. Reopen it if a failure closed it.
    int fd = fd_ >= 0 ? fd_ : open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) != 0) {
      std::string error = Errno(fd < 0 ? "open" : "fsync", path_);
      if (fd >= 0) close(fd);
      fd_ = -1;
      return absl::UnavailableError(
          absl::StrCat("audit log unavailable: ", error,
                       "; requests are refused until it is writable"));
    }
    if (fd != fd_) close(fd);
  }
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
  uint64_t next_seq;
  {
    absl::MutexLock lock(&mu_);
    next_seq = next_seq_;
  }
  const std::string old_path = path_;
  path_ = SegmentPathFor(next_seq);
  durable_size_ = 0;
  segment_opened_ = absl::Now();
  dir_sync_pending_ = true;  // WriteBatch creates the file and syncs the dir
  {
    absl::MutexLock lock(&mu_);
    segment_path_ = path_;
    ++stats_.segments;
  }
  spdlog::info("audit: rolled from {} to {}", old_path, path_);
  return absl::OkStatus();
}

size_t FileAuditLog::BatchRoom() const {
  if (options_.signer == nullptr) return 0;
  const uint64_t limit =
      since_checkpoint_ < options_.checkpoint_every
          ? std::min(options_.checkpoint_every, max_unsigned_tail_)
          : max_unsigned_tail_;
  return limit > since_checkpoint_ ? limit - since_checkpoint_ : 0;
}

void FileAuditLog::WriteRecords(std::vector<Pending>& batch) {
  absl::Status s = MaybeRoll();
  if (s.ok() && options_.signer != nullptr &&
      since_checkpoint_ + batch.size() > max_unsigned_tail_) {
    // Fail closed: the records would run past the bound on what may follow
    // the last checkpoint, and the checkpoint tried just before this batch
    // (WriterLoop) could not be signed.
    s = absl::UnavailableError(absl::StrCat(
        "audit log unavailable: no checkpoint could be signed for the last ",
        since_checkpoint_, " records (at most ", max_unsigned_tail_,
        " may follow a checkpoint); requests are refused until the "
        "checkpoint key in the HSM can sign again"));
  }
  uint64_t seq;
  std::string prev;
  {
    absl::MutexLock lock(&mu_);  // only this thread changes them
    seq = next_seq_;
    prev = prev_hash_;
  }
  if (s.ok()) {
    std::string bytes;
    for (const auto& p : batch) {
      std::string line = Line(seq++, p.fields, prev);
      prev = AuditLineHash(line);
      bytes.append(line).push_back('\n');
    }
    s = WriteBatch(bytes);
  }
  if (s.ok()) since_checkpoint_ += batch.size();
  {
    absl::MutexLock lock(&mu_);
    if (s.ok()) {
      next_seq_ = seq;
      prev_hash_ = prev;
      stats_.records += batch.size();
      ++stats_.batches;
    } else {
      ++stats_.failures;
      spdlog::error("{}", s.message());
    }
  }
  absl::MutexLock lock(&completer_mu_);
  completed_.push_back(Completed{std::move(batch), std::move(s)});
}

void FileAuditLog::CompleterLoop() {
  for (;;) {
    std::deque<Completed> ready;
    {
      absl::MutexLock lock(&completer_mu_);
      auto has_work = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(completer_mu_) {
        return !completed_.empty() || writer_done_;
      };
      completer_mu_.Await(absl::Condition(&has_work));
      if (completed_.empty()) return;  // the writer is done and so are we
      ready.swap(completed_);
    }
    for (Completed& c : ready) {
      for (Pending& p : c.batch) std::move(p.done)(c.status);
    }
  }
}

void FileAuditLog::MaybeCheckpoint(bool force) {
  if (options_.signer == nullptr || since_checkpoint_ == 0) return;
  const absl::Time now = absl::Now();
  if (!force && since_checkpoint_ < options_.checkpoint_every &&
      now - last_checkpoint_ < options_.checkpoint_interval) {
    return;
  }
  uint64_t seq;
  std::string head;
  {
    absl::MutexLock lock(&mu_);
    seq = next_seq_;
    head = prev_hash_;
  }
  absl::StatusOr<std::string> signature =
      options_.signer->Sign(CheckpointMessage(options_.node_id, seq - 1, head));
  if (!signature.ok()) {
    // Records stay durable and chained; the next checkpoint will cover them.
    spdlog::error("audit: could not sign a checkpoint: {}",
                  signature.status().message());
    last_checkpoint_ = now;
    return;
  }
  OrderedJson j;
  j["seq"] = seq;
  j["time"] =
      absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", now, absl::UTCTimeZone());
  j["node"] = options_.node_id;
  j["principal"] = "custos:system";
  j["operation"] = "Checkpoint";
  j["outcome"] = "ALLOWED";
  j["code"] = "OK";
  j["checkpoint"] = {{"last_seq", seq - 1},
                     {"head", head},
                     {"key", options_.signer->fingerprint()},
                     {"signature", absl::Base64Escape(*signature)}};
  j["prev"] = head;
  std::string line = j.dump();
  absl::Status s = WriteBatch(line + "\n");
  absl::MutexLock lock(&mu_);
  if (s.ok()) {
    next_seq_ = seq + 1;
    prev_hash_ = AuditLineHash(line);
    ++stats_.checkpoints;
    since_checkpoint_ = 0;
    last_checkpoint_ = now;
  } else {
    ++stats_.failures;
    spdlog::error("{}", s.message());
  }
}

absl::Status FileAuditLog::WriteBatch(const std::string& bytes) {
  if (fd_ < 0) {
    fd_ = open(path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd_ < 0) {
      return absl::UnavailableError(
          absl::StrCat("audit log unavailable: ", Errno("open", path_),
                       "; requests are refused until it is writable"));
    }
    struct stat st;
    fstat(fd_, &st);
    durable_size_ = st.st_size;
  }
  if (dir_sync_pending_ && options_.sync) {
    // A new segment: its directory entry must be durable before any record
    // in it is acknowledged.
    absl::Status s = SyncDir(options_.dir);
    if (!s.ok()) {
      return absl::UnavailableError(
          absl::StrCat("audit log unavailable: ", s.message(),
                       "; requests are refused until it is writable"));
    }
  }
  dir_sync_pending_ = false;
  size_t written = 0;
  const char* what = "write";
  bool ok = true;
  while (written < bytes.size()) {
    ssize_t n = write(fd_, bytes.data() + written, bytes.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ok = false;
      break;
    }
    written += static_cast<size_t>(n);
  }
  if (ok && options_.sync) {
    const auto start = std::chrono::steady_clock::now();
    if (fdatasync(fd_) != 0) {
      what = "fdatasync";
      ok = false;
    }
    if (fsync_seconds_ != nullptr) {
      fsync_seconds_->Observe(std::chrono::duration<double>(
                                  std::chrono::steady_clock::now() - start)
                                  .count());
    }
  }
  if (ok) {
    durable_size_ += bytes.size();
    return absl::OkStatus();
  }
  std::string error = Errno(what, path_);
  // Roll back to the last durable record so the chain stays whole, and
  // reopen next time (after a failed fsync the page cache cannot be trusted).
  if (ftruncate(fd_, durable_size_) != 0) {
    spdlog::error("audit: could not roll back {} to {} bytes", path_,
                  durable_size_);
  }
  close(fd_);
  fd_ = -1;
  return absl::UnavailableError(
      absl::StrCat("audit log unavailable: ", error,
                   "; requests are refused until it is writable"));
}

std::string FileAuditLog::SerializeFields(const AuditRecord& r) const {
  // Written by hand rather than through a JSON document: this runs once per
  // request on the request's thread, and a document costs a few dozen
  // allocations (measured with perf). The audit tests parse every line back.
  // Every value is capped (kMaxAudit*): whatever a request carries, the
  // record stays below kMaxAuditRecordBytes.
  std::string out;
  out.reserve(256 + std::min(r.detail.size(), kMaxAuditDetailBytes));
  const auto member = [&out](absl::string_view name) {
    if (!out.empty()) out.push_back(',');
    AppendJsonString(&out, name);
    out.push_back(':');
  };
  const auto capped = [&out](absl::string_view value, size_t max) {
    AppendJsonStringCapped(&out, value, max);
  };
  // The context first, aside: what it leaves out goes into the detail.
  std::string context;
  size_t omitted = 0;
  for (const auto& [k, v] : r.context) {  // sorted: a std::map
    std::string pair;
    if (AppendJsonStringCapped(&pair, k, kMaxAuditContextKeyBytes)) {
      ++omitted;  // a cut key could read like another: leave it out
      continue;
    }
    pair.push_back(':');
    AppendJsonStringCapped(&pair, v, kMaxAuditContextValueBytes);
    if (context.size() + pair.size() + 3 > kMaxAuditContextBytes) {
      ++omitted;
      continue;
    }
    if (!context.empty()) context.push_back(',');
    context.append(pair);
  }
  member("time");
  AppendJsonString(&out, absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", r.time,
                                          absl::UTCTimeZone()));
  member("node");
  capped(options_.node_id, kMaxAuditShortFieldBytes);
  member("principal");
  capped(r.principal, kMaxAuditPrincipalBytes);
  member("operation");
  capped(r.operation, kMaxAuditShortFieldBytes);
  if (!r.key_id.empty()) {
    member("key_id");
    capped(r.key_id, kMaxAuditShortFieldBytes);
  }
  if (r.key_version != 0) {
    member("key_version");
    absl::StrAppend(&out, r.key_version);
  }
  if (!context.empty()) {
    member("context");
    out.push_back('{');
    out.append(context);
    out.push_back('}');
  }
  if (r.has_justification) {
    member("justification");
    out.append("{\"reason\":");
    AppendJsonString(&out, JustificationReasonName(r.justification.reason));
    out.append(",\"detail\":");
    capped(r.justification.detail, kMaxAuditDetailBytes);
    out.push_back('}');
  }
  member("outcome");
  AppendJsonString(&out, AuditOutcomeName(r.outcome));
  member("code");
  AppendJsonString(&out, absl::StatusCodeToString(r.code));
  if (!r.request_id.empty()) {
    member("request_id");
    capped(r.request_id, kMaxAuditShortFieldBytes);
  }
  if (!r.peer.empty()) {
    member("peer");
    capped(r.peer, kMaxAuditShortFieldBytes);
  }
  std::string detail = r.detail;
  if (omitted > 0) {
    detail = absl::StrCat(omitted, " of ", r.context.size(),
                          " context pairs not recorded (record size cap)",
                          detail.empty() ? "" : "; ", detail);
  }
  if (!detail.empty()) {
    member("detail");
    capped(detail, kMaxAuditDetailBytes);
  }
  if (!r.policy.empty()) {
    member("policy_sha256");
    AppendJsonString(&out, AuditLineHash(r.policy));  // SHA-256, hex
    if (r.policy.size() <= kMaxAuditPolicyBytes) {
      // Already canonical JSON on one line (PolicyToCanonicalJson).
      member("policy");
      out.append(r.policy);
    } else {
      // Cut at a character boundary: a UTF-8 continuation byte never starts
      // one.
      size_t cut = kAuditPolicyPrefixBytes;
      while (cut > 0 &&
             (static_cast<unsigned char>(r.policy[cut]) & 0xC0) == 0x80) {
        --cut;
      }
      member("policy_truncated");
      AppendJsonString(&out, absl::string_view(r.policy).substr(0, cut));
    }
  }
  return out;
}

std::string FileAuditLog::Line(uint64_t seq, const std::string& fields,
                               const std::string& prev) {
  // The same bytes nlohmann::json would write for the whole object (seq,
  // then the fields, then prev): prev is lowercase hex, needing no escape.
  return absl::StrCat("{\"seq\":", seq, ",", fields, ",\"prev\":\"", prev,
                      "\"}");
}

FileAuditLog::Stats FileAuditLog::stats() const {
  absl::MutexLock lock(&mu_);
  Stats s = stats_;
  s.next_seq = next_seq_;
  return s;
}

}  // namespace custos::kms
