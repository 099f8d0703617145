#include "kms/audit/audit_verifier.h"

#include <dirent.h>
#include <fcntl.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/p256.h"
#include "kms/audit/audit_chain.h"
#include "kms/audit/json_line.h"
#include "nlohmann/json.hpp"

namespace custos::kms {
namespace {

constexpr size_t kHexHashSize = 64;

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

std::string SegmentName(const std::string& node, uint64_t first_seq) {
  return absl::StrFormat("audit-%s-%020d.jsonl", node, first_seq);
}

// Reads a file line by line through one reusable buffer: no allocation per
// line. A final line without its newline is returned too.
class LineReader {
 public:
  // `drop_unterminated`: a final line without its newline is a record still
  // being written (verifying a live log), not a line to check.
  LineReader(int fd, bool drop_unterminated)
      : fd_(fd),
        buf_(new char[kInitialSize]),
        drop_unterminated_(drop_unterminated) {}

  // The next line, without its newline, valid until the next call. False at
  // the end of the file or on a read error (then `error()` says which).
  bool Next(absl::string_view* line) {
    for (;;) {
      if (const void* nl =
              std::memchr(buf_.get() + scanned_, '\n', end_ - scanned_)) {
        const char* at = static_cast<const char*>(nl);
        *line =
            absl::string_view(buf_.get() + begin_, at - (buf_.get() + begin_));
        begin_ = scanned_ = at - buf_.get() + 1;
        return true;
      }
      scanned_ = end_;
      if (eof_) {
        if (begin_ == end_ || drop_unterminated_) return false;
        *line = absl::string_view(buf_.get() + begin_, end_ - begin_);
        begin_ = scanned_ = end_;
        return true;
      }
      // Keep the partial line: move it to the front, and grow the buffer if
      // it fills the buffer.
      if (begin_ > 0) {
        std::memmove(buf_.get(), buf_.get() + begin_, end_ - begin_);
        end_ -= begin_;
        scanned_ -= begin_;
        begin_ = 0;
      }
      if (end_ == size_) {
        std::unique_ptr<char[]> bigger(new char[size_ * 2]);
        std::memcpy(bigger.get(), buf_.get(), end_);
        buf_ = std::move(bigger);
        size_ *= 2;
      }
      ssize_t n = read(fd_, buf_.get() + end_, size_ - end_);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        error_ = std::strerror(errno);
        return false;
      }
      if (n == 0) eof_ = true;
      end_ += static_cast<size_t>(n);
    }
  }
  const std::string& error() const { return error_; }

 private:
  static constexpr size_t kInitialSize = 1 << 20;
  const int fd_;
  std::unique_ptr<char[]> buf_;
  size_t size_ = kInitialSize;
  size_t begin_ = 0;    // start of the next line
  size_t scanned_ = 0;  // no newline in [begin_, scanned_)
  size_t end_ = 0;      // end of the data read
  bool eof_ = false;
  const bool drop_unterminated_;
  std::string error_;
};

// SHA-256 of a line as lowercase hex into a caller's buffer, with the digest
// fetched once and one context reused: AuditLineHash's result, without its
// allocations and its per-call algorithm lookup.
class LineHasher {
 public:
  LineHasher()
      : fetched_(EVP_MD_fetch(nullptr, "SHA2-256", nullptr)),
        md_(fetched_ != nullptr ? fetched_ : EVP_sha256()),
        ctx_(EVP_MD_CTX_new()) {}
  ~LineHasher() {
    EVP_MD_CTX_free(ctx_);
    EVP_MD_free(fetched_);
  }
  LineHasher(const LineHasher&) = delete;
  LineHasher& operator=(const LineHasher&) = delete;

  bool Hex(absl::string_view line, char out[kHexHashSize]) {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (ctx_ == nullptr || EVP_DigestInit_ex2(ctx_, md_, nullptr) != 1 ||
        EVP_DigestUpdate(ctx_, line.data(), line.size()) != 1 ||
        EVP_DigestFinal_ex(ctx_, digest, &len) != 1 || len != 32) {
      return false;
    }
    static constexpr char kDigits[] = "0123456789abcdef";
    for (unsigned int i = 0; i < len; ++i) {
      out[2 * i] = kDigits[digest[i] >> 4];
      out[2 * i + 1] = kDigits[digest[i] & 0xf];
    }
    return true;
  }

 private:
  EVP_MD* const fetched_;
  const EVP_MD* const md_;
  EVP_MD_CTX* const ctx_;
};

// The checkpoint public keys, by fingerprint, each parsed once: parsing a
// PEM costs several times what verifying a signature does.
class CheckpointKeys {
 public:
  CheckpointKeys() = default;
  CheckpointKeys(const CheckpointKeys&) = delete;
  CheckpointKeys& operator=(const CheckpointKeys&) = delete;
  ~CheckpointKeys() {
    for (auto& [fingerprint, key] : keys_) EVP_PKEY_free(key);
  }

  absl::Status Add(const std::string& pem) {
    BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
    EVP_PKEY* key =
        bio ? PEM_read_bio_PUBKEY(bio, nullptr, nullptr, nullptr) : nullptr;
    BIO_free(bio);
    char group[64] = {0};
    size_t group_len = 0;
    if (key == nullptr || !EVP_PKEY_is_a(key, "EC") ||
        !EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, group,
                                        sizeof(group), &group_len) ||
        absl::string_view(group, group_len) != "prime256v1") {
      EVP_PKEY_free(key);
      return absl::InvalidArgumentError(
          "checkpoint public key: not a PEM P-256 public key");
    }
    EVP_PKEY*& slot = keys_[PublicKeyFingerprint(pem)];
    EVP_PKEY_free(slot);
    slot = key;
    return absl::OkStatus();
  }
  bool empty() const { return keys_.empty(); }
  // Null if no key has this fingerprint.
  EVP_PKEY* Find(const std::string& fingerprint) const {
    auto it = keys_.find(fingerprint);
    return it == keys_.end() ? nullptr : it->second;
  }

  // Whether `raw` (r||s) is a valid ECDSA signature over SHA-256(message).
  static bool Verify(EVP_PKEY* key, absl::string_view message,
                     absl::string_view raw) {
    if (raw.size() != kP256RawSignatureSize) return false;
    const auto* bytes = reinterpret_cast<const unsigned char*>(raw.data());
    ECDSA_SIG* sig = ECDSA_SIG_new();
    BIGNUM* r = BN_bin2bn(bytes, 32, nullptr);
    BIGNUM* s = BN_bin2bn(bytes + 32, 32, nullptr);
    if (sig == nullptr || r == nullptr || s == nullptr ||
        ECDSA_SIG_set0(sig, r, s) != 1) {
      BN_free(r);
      BN_free(s);
      ECDSA_SIG_free(sig);
      return false;
    }
    unsigned char* der = nullptr;
    const int der_len = i2d_ECDSA_SIG(sig, &der);
    ECDSA_SIG_free(sig);
    if (der_len <= 0) return false;
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    const bool ok =
        ctx != nullptr &&
        EVP_DigestVerifyInit(ctx, nullptr, EVP_sha256(), nullptr, key) == 1 &&
        EVP_DigestVerify(ctx, der, static_cast<size_t>(der_len),
                         reinterpret_cast<const unsigned char*>(message.data()),
                         message.size()) == 1;
    EVP_MD_CTX_free(ctx);
    OPENSSL_free(der);
    return ok;
  }

 private:
  std::map<std::string, EVP_PKEY*> keys_;
};

// One record, as far as verification cares. Reused across lines.
struct Record {
  uint64_t seq = 0;
  absl::string_view prev;  // into the line, or into `prev_storage`
  bool is_checkpoint = false;
  uint64_t last_seq = 0;
  std::string head, key, signature;  // signature: raw bytes
  std::string prev_storage;
  JsonObjectLine scan;  // the line's members (2 KiB: kept, not rebuilt)
  std::string problem;  // why the line is not a record
};

// A key for a message: escaped and cut short (it comes from the file).
std::string PrintableKey(absl::string_view key) {
  constexpr size_t kMax = 40;
  std::string out = absl::CHexEscape(key.substr(0, kMax));
  if (key.size() > kMax) out += "...";
  return out;
}

// The fast path, for an ordinary record as the writer lays it out. The line
// is valid JSON (ScanJsonObjectLine), no key in it holds an escape and none
// repeats, so its raw keys are the keys any reader decodes; there is no
// top-level "checkpoint"; "seq" is a plain integer and "prev" a string of 64
// bytes, compared raw with the hash (64 lowercase hex digits) next: it
// matches only if it holds no escape, so only if any reader decodes it to
// the same, and a mismatch is reported as the full parse would. The rest of
// the line is left to the hash chain. Anything else takes the full parse:
// false.
bool ReadFast(const JsonObjectLine& scan, Record* out) {
  if (!scan.keys_checked || scan.repeated_key) return false;
  absl::string_view seq, prev;
  for (size_t i = 0; i < scan.member_count; ++i) {
    const JsonObjectLine::Member& m = scan.members[i];
    switch (m.key.size()) {
      case 3:
        if (m.key == "seq") seq = m.value;
        break;
      case 4:
        if (m.key == "prev") prev = m.value;
        break;
      case 10:
        if (m.key == "checkpoint") return false;
        break;
    }
  }
  // 1 to 19 digits, so no overflow (the scanner allows no leading zero).
  if (seq.empty() || seq.size() > 19) return false;
  uint64_t n = 0;
  for (const char c : seq) {
    if (c < '0' || c > '9') return false;
    n = n * 10 + static_cast<uint64_t>(c - '0');
  }
  if (prev.size() != kHexHashSize + 2 || prev.front() != '"' ||
      prev.back() != '"') {
    return false;
  }
  out->seq = n;
  out->prev = prev.substr(1, kHexHashSize);
  out->is_checkpoint = false;
  return true;
}

// The full parse, for checkpoints and any line the fast path declines. Keys
// are compared decoded, so "\u0063heckpoint" is "checkpoint"; a key that
// repeats within an object makes the line no record, as readers disagree on
// it (nlohmann keeps the last value, others the first or refuse the line).
bool ReadFull(absl::string_view line, Record* out) {
  std::vector<std::set<std::string>> open_objects;
  std::string repeated;
  bool has_repeated = false;
  const nlohmann::json::parser_callback_t check_keys =
      [&](int /*depth*/, nlohmann::json::parse_event_t event,
          nlohmann::json& parsed) {
        switch (event) {
          case nlohmann::json::parse_event_t::object_start:
            open_objects.emplace_back();
            break;
          case nlohmann::json::parse_event_t::object_end:
            if (!open_objects.empty()) open_objects.pop_back();
            break;
          case nlohmann::json::parse_event_t::key:
            if (!open_objects.empty() && !has_repeated &&
                !open_objects.back().insert(parsed.get<std::string>()).second) {
              has_repeated = true;
              repeated = parsed.get<std::string>();
            }
            break;
          default:
            break;
        }
        return true;
      };
  const nlohmann::json j =
      nlohmann::json::parse(line.begin(), line.end(), check_keys, false);
  if (j.is_discarded() || !j.is_object()) {
    out->problem = "not a JSON object";
    return false;
  }
  if (has_repeated) {
    out->problem = absl::StrCat("key \"", PrintableKey(repeated),
                                "\" appears twice in one object");
    return false;
  }
  const auto seq = j.find("seq");
  if (seq == j.end() || !seq->is_number_unsigned()) {
    out->problem = "no \"seq\" that is a non-negative integer";
    return false;
  }
  const auto prev = j.find("prev");
  if (prev == j.end() || !prev->is_string()) {
    out->problem = "no \"prev\" that is a string";
    return false;
  }
  out->seq = seq->get<uint64_t>();
  out->prev_storage = prev->get<std::string>();
  out->prev = out->prev_storage;
  out->is_checkpoint = false;
  const auto checkpoint = j.find("checkpoint");
  if (checkpoint != j.end()) {
    const nlohmann::json& c = *checkpoint;
    out->signature.clear();
    if (!c.is_object() || !c.contains("last_seq") ||
        !c["last_seq"].is_number_unsigned() || !c.contains("head") ||
        !c["head"].is_string() || !c.contains("key") || !c["key"].is_string() ||
        !c.contains("signature") || !c["signature"].is_string() ||
        !absl::Base64Unescape(c["signature"].get<std::string>(),
                              &out->signature)) {
      out->problem =
          "\"checkpoint\" is not an object with last_seq, head, key and a "
          "base64 signature";
      return false;
    }
    out->is_checkpoint = true;
    out->last_seq = c["last_seq"].get<uint64_t>();
    out->head = c["head"].get<std::string>();
    out->key = c["key"].get<std::string>();
  }
  return true;
}

// Reads a record; false (and `out->problem`) if the line is not one. Every
// line must first be valid JSON: both paths then read what any JSON reader
// reads.
bool ReadRecord(absl::string_view line, Record* out) {
  if (!ScanJsonObjectLine(line, &out->scan)) {
    out->problem =
        absl::StrCat("not valid JSON at byte ", out->scan.error_offset + 1,
                     ": ", out->scan.error);
    return false;
  }
  if (out->scan.repeated_key) {
    out->problem =
        absl::StrCat("key \"", PrintableKey(out->scan.first_repeated_key),
                     "\" appears twice in one object");
    return false;
  }
  return ReadFast(out->scan, out) || ReadFull(line, out);
}

}  // namespace

absl::StatusOr<AuditVerifyReport> VerifyAuditDirectory(
    const std::string& dir, const std::vector<std::string>& public_key_pems,
    const std::function<void(uint64_t)>& progress, bool live) {
  AuditVerifyOptions options;
  options.public_key_pems = public_key_pems;
  options.progress = progress;
  options.live = live;
  return VerifyAuditDirectoryWith(dir, options);
}

absl::StatusOr<AuditVerifyReport> VerifyAuditDirectoryWith(
    const std::string& dir, const AuditVerifyOptions& options) {
  const std::function<void(uint64_t)>& progress = options.progress;
  const bool live = options.live;
  CheckpointKeys keys;
  for (const std::string& pem : options.public_key_pems) {
    if (absl::Status s = keys.Add(pem); !s.ok()) return s;
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
  LineHasher hasher;
  Record rec;
  for (auto& [node, segments] : by_node) {
    std::sort(segments.begin(), segments.end(),
              [](const Segment& a, const Segment& b) {
                return a.first_seq < b.first_seq;
              });
    AuditVerifyReport::Node summary;
    summary.node_id = node;
    uint64_t expected = 1;
    uint64_t last_checkpoint_at = 0;  // the checkpoint record's own seq
    // Where the first record past the tail bound after the last checkpoint
    // is ("FILE:LINE"), if there is one.
    std::string first_over_bound;
    std::string last_path;  // the newest segment with records, its lines
    uint64_t last_lines = 0;
    char prev_hash[kHexHashSize];
    std::memcpy(prev_hash, kAuditGenesisHash, kHexHashSize);
    std::string previous_segment;  // the last one that held records
    for (const Segment& seg : segments) {
      const bool newest = &seg == &segments.back();
      ++summary.segments;
      const std::string path = dir + "/" + seg.name;
      uint64_t line_no = 0;
      auto fail = [&](const std::string& what) {
        report.ok = false;
        report.first_break =
            absl::StrCat(path, ":", std::max<uint64_t>(line_no, 1), ": seq ",
                         expected, ": ", what);
        summary.last_seq = expected - 1;  // the last good record
        report.nodes.push_back(summary);
        return report;
      };
      // A segment is named after its first record, which continues the
      // chain of the one before: a different name means records are gone
      // (or segments overlap), even when this segment is empty.
      if (seg.first_seq > expected) {
        return fail(absl::StrCat(
            "the segment is named for seq ", seg.first_seq, ": records ",
            expected, "..", seg.first_seq - 1, " are missing (",
            previous_segment.empty()
                ? absl::StrCat("no ", SegmentName(node, expected))
                : absl::StrCat("the end of ", previous_segment,
                               " was cut off"
                               " or a segment after it, starting with ",
                               SegmentName(node, expected), ", was removed"),
            ")"));
      }
      if (seg.first_seq < expected) {
        return fail(absl::StrCat("the segment is named for seq ", seg.first_seq,
                                 " but the segments before it "
                                 "already run to seq ",
                                 expected - 1,
                                 " (segments overlap or were renamed)"));
      }
      const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) {
        return absl::NotFoundError(
            absl::StrCat("cannot read ", path, ": ", std::strerror(errno)));
      }
      LineReader reader(fd, live && newest);
      absl::string_view line;
      while (reader.Next(&line)) {
        ++line_no;
        if (!ReadRecord(line, &rec)) {
          close(fd);
          return fail(absl::StrCat("not an audit record (edited or torn): ",
                                   rec.problem));
        }
        const uint64_t seq = rec.seq;
        if (seq != expected) {
          close(fd);
          return fail(absl::StrCat(
              "found seq ", seq,
              seq > expected ? " (records missing before it, or reordered)"
                             : " (records repeated or reordered)"));
        }
        if (rec.prev != absl::string_view(prev_hash, kHexHashSize)) {
          close(fd);
          return fail(seq == 1
                          ? "the chain does not start from the genesis hash"
                          : "prev does not match the record before it (that "
                            "record or this one was edited, or one was "
                            "removed)");
        }
        if (rec.is_checkpoint) {
          if (rec.last_seq + 1 != seq || rec.head != rec.prev) {
            close(fd);
            return fail("checkpoint does not cover the record before it");
          }
          if (!keys.empty()) {
            EVP_PKEY* key = keys.Find(rec.key);
            if (key == nullptr) {
              close(fd);
              return fail(
                  absl::StrCat("checkpoint signed by key ", rec.key,
                               ", which is not among the public keys given"));
            }
            if (!CheckpointKeys::Verify(
                    key, CheckpointMessage(node, rec.last_seq, rec.head),
                    rec.signature)) {
              close(fd);
              return fail("checkpoint signature does not verify");
            }
          }
          ++summary.checkpoints;
          summary.last_checkpoint_seq = rec.last_seq;
          last_checkpoint_at = seq;
        }
        if (!hasher.Hex(line, prev_hash)) {
          close(fd);
          return absl::InternalError("audit verify: SHA-256 failed");
        }
        if (!rec.is_checkpoint &&
            seq - last_checkpoint_at == options.max_unsigned_tail + 1) {
          first_over_bound = absl::StrCat(path, ":", line_no);
        }
        ++expected;
        ++summary.records;
        ++report.records;
        if (progress && report.records % 100000 == 0) progress(report.records);
      }
      close(fd);
      if (!reader.error().empty()) {
        return absl::UnavailableError(
            absl::StrCat("cannot read ", path, ": ", reader.error()));
      }
      if (line_no > 0) {
        previous_segment = seg.name;
        last_path = path;
        last_lines = line_no;
      }
    }
    summary.last_seq = expected - 1;
    summary.unsigned_tail = summary.last_seq - last_checkpoint_at;
    report.nodes.push_back(summary);
    // Only signatures make a chain more than anyone could write: with keys,
    // a node's records must be signed up to a bounded tail.
    if (keys.empty() || live || summary.records == 0) continue;
    if (summary.checkpoints == 0) {
      report.ok = false;
      report.first_break = absl::StrCat(
          last_path, ":", std::max<uint64_t>(last_lines, 1), ": seq ",
          summary.last_seq, ": node ", node, " has ", summary.records,
          " records and no signed checkpoint, so nothing vouches for them "
          "(custosd signs one every audit_checkpoint_every records, every "
          "audit_checkpoint_interval_seconds and when it stops; if the copy "
          "was taken before the first one, copy the log again later)");
      return report;
    }
    if (summary.unsigned_tail > options.max_unsigned_tail) {
      report.ok = false;
      report.first_break = absl::StrCat(
          first_over_bound, ": seq ",
          last_checkpoint_at + options.max_unsigned_tail + 1, ": node ", node,
          " has ", summary.unsigned_tail,
          " records after its last checkpoint (seq ", last_checkpoint_at,
          "), more than the ", options.max_unsigned_tail,
          " allowed (custosd refuses requests before that; if the node runs "
          "with a larger audit_checkpoint_every, pass --max-unsigned-tail "
          "twice that)");
      return report;
    }
  }
  if (progress) progress(report.records);
  return report;
}

}  // namespace custos::kms
