// custos: the command line of Custos. Keys, aliases, policies, data keys,
// envelope encryption of files and streams, and offline audit
// verification. Human tables by default, --json for scripts; exit codes:
// 0 ok, 1 failure, 2 usage, 3 refused, 4 rejected (see docs/cli.md).
#include <google/protobuf/util/json_util.h>
#include <openssl/crypto.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <ext/stdio_filebuf.h>

#include <atomic>
#include <climits>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "clients/cli/output.h"
#include "clients/cpp/client.h"
#include "clients/cpp/envelope.h"
#include "kms/audit/audit_verifier.h"
#include "kms/policy.h"
#include "nlohmann/json.hpp"

namespace custos::cli {
namespace {

namespace pb = ::custos::v1;
using client::Client;

struct Globals {
  std::string addr, ca, cert, key;
  bool json = false;
  double timeout_seconds = 10;
};

// Everything the subcommands' flags fill in.
struct Args {
  std::string key, alias, description, policy_file,
      input = "-", output = "-", state, label, dir, destination_key, expect_key;
  std::vector<std::string> labels, context, destination_context, public_keys;
  std::string rotation_period;
  uint32_t days = 0, bytes = 0, page_size = 0;
  uint64_t expected_version = 0;
  bool no_plaintext = false, all = false, force = false;
  // audit verify: ask the server instead of reading DIR; the tail bound.
  bool server = false;
  uint64_t max_unsigned_tail = kms::kDefaultMaxUnsignedTail;
  // audit list / tail filters
  std::string principal, operation, outcome, since, until;
  uint64_t from_seq = 0;
  uint32_t limit = 0;
};

absl::StatusOr<std::unique_ptr<Client>> Connect(const Globals& g) {
  client::ClientOptions options;
  absl::StatusOr<client::ClientOptions> env =
      client::ClientOptions::FromEnvironment();
  if (env.ok()) options = *env;
  if (!g.addr.empty()) options.address = g.addr;
  if (!g.ca.empty()) options.ca_file = g.ca;
  if (!g.cert.empty()) options.cert_file = g.cert;
  if (!g.key.empty()) options.key_file = g.key;
  if (options.address.empty() || options.ca_file.empty() ||
      options.cert_file.empty() || options.key_file.empty()) {
    return absl::InvalidArgumentError(
        "no server given: use --addr, --ca, --cert, --key or set CUSTOS_ADDR, "
        "CUSTOS_CA, CUSTOS_CERT, CUSTOS_KEY (source the dev env's env.sh)");
  }
  options.timeout = absl::Seconds(g.timeout_seconds);
  return Client::Connect(options);
}

absl::StatusOr<std::map<std::string, std::string>> ParsePairs(
    const std::vector<std::string>& pairs, absl::string_view flag) {
  std::map<std::string, std::string> out;
  for (const std::string& p : pairs) {
    size_t eq = p.find('=');
    if (eq == std::string::npos || eq == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          flag, " '", p, "': expected NAME=VALUE, e.g. ", flag, " tenant=7"));
    }
    if (!out.emplace(p.substr(0, eq), p.substr(eq + 1)).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, ": '", p.substr(0, eq), "' given twice"));
    }
  }
  return out;
}

// "90d", "12h", "30m", "3600s" or "0" (off).
absl::StatusOr<google::protobuf::Duration> ParsePeriod(const std::string& s) {
  google::protobuf::Duration d;
  if (s == "0") return d;
  int64_t n = 0;
  int64_t unit = 0;
  if (s.size() >= 2 && absl::SimpleAtoi(s.substr(0, s.size() - 1), &n)) {
    switch (s.back()) {
      case 'd':
        unit = 86400;
        break;
      case 'h':
        unit = 3600;
        break;
      case 'm':
        unit = 60;
        break;
      case 's':
        unit = 1;
        break;
    }
  }
  if (unit == 0 || n < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--rotation-period '", s,
                     "': use a number and d, h, m or s, e.g. 90d"));
  }
  d.set_seconds(n * unit);
  return d;
}

const char* StateName(pb::KeyState s) {
  switch (s) {
    case pb::ENABLED:
      return "ENABLED";
    case pb::DISABLED:
      return "DISABLED";
    case pb::PENDING_DELETION:
      return "PENDING_DELETION";
    case pb::DESTROYED:
      return "DESTROYED";
    default:
      return "UNSPECIFIED";
  }
}

void PrintKey(const Globals& g, const pb::Key& key) {
  if (g.json) return PrintJson(key);
  std::vector<std::vector<std::string>> rows = {
      {"key_id", key.key_id()},
      {"aliases", absl::StrJoin(key.aliases(), ", ")},
      {"state", StateName(key.state())},
      {"description", key.description()},
      {"primary_version", absl::StrCat(key.primary_version())},
      {"created", FormatSeconds(key.create_time().seconds())},
  };
  std::vector<std::string> labels;
  for (const auto& [k, v] : key.labels()) labels.push_back(k + "=" + v);
  if (!labels.empty()) rows.push_back({"labels", absl::StrJoin(labels, ", ")});
  if (key.rotation_period().seconds() > 0) {
    rows.push_back(
        {"rotation_period",
         absl::StrCat(key.rotation_period().seconds() / 86400, "d")});
    rows.push_back(
        {"next_rotation", FormatSeconds(key.next_rotation_time().seconds())});
  }
  if (key.has_deletion_time()) {
    rows.push_back(
        {"deletion_time", FormatSeconds(key.deletion_time().seconds())});
  }
  PrintTable({"FIELD", "VALUE"}, rows);
  if (key.versions_size() > 0) {
    std::cout << "\n";
    std::vector<std::vector<std::string>> versions;
    for (const pb::KeyVersion& v : key.versions()) {
      const char* state = v.state() == pb::KEY_VERSION_ENABLED    ? "ENABLED"
                          : v.state() == pb::KEY_VERSION_DISABLED ? "DISABLED"
                                                                  : "DESTROYED";
      versions.push_back({absl::StrCat(v.version()), state,
                          FormatSeconds(v.create_time().seconds()),
                          absl::StrCat(v.encryptions())});
    }
    PrintTable({"VERSION", "STATE", "CREATED", "ENCRYPTIONS(<=)"}, versions);
  }
}

// The temporary output file while it exists, for the SIGINT/SIGTERM
// handler: a handler may only do async-signal-safe work (unlink, on a path
// in a fixed buffer), and must find a path that is whole. Set by Files.
char g_partial_output[PATH_MAX];
volatile sig_atomic_t g_partial_output_set = 0;

// Removes the partial output, then dies of the same signal (exit status
// 128 + signal, as the shell expects of an interrupted command).
extern "C" void RemovePartialOutputAndDie(int signal_number) {
  if (g_partial_output_set != 0) unlink(g_partial_output);
  struct sigaction default_action = {};
  default_action.sa_handler = SIG_DFL;
  sigaction(signal_number, &default_action, nullptr);
  raise(signal_number);
}

// Decrypted plaintext and data keys pass through this process's memory:
// no core dump may hold them, and no same-user process may read them
// (PR_SET_DUMPABLE 0 also refuses ptrace and /proc/PID/mem). A partial
// output file must not outlive an interrupted encrypt or decrypt.
void HardenProcess() {
  const struct rlimit no_core = {0, 0};
  setrlimit(RLIMIT_CORE, &no_core);
  prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  struct sigaction action = {};
  action.sa_handler = RemovePartialOutputAndDie;
  sigemptyset(&action.sa_mask);
  for (int signal_number : {SIGINT, SIGTERM, SIGHUP}) {
    sigaction(signal_number, &action, nullptr);
  }
}

// Opens input ("-" is stdin) and output ("-" is stdout; files are written
// to a temporary name and renamed only on success, and the temporary file
// is removed on failure, SIGINT, SIGTERM or SIGHUP).
class Files {
 public:
  absl::Status Open(const std::string& input, const std::string& output) {
    if (input != "-") {
      file_in_.open(input, std::ios::binary);
      if (!file_in_) {
        return absl::NotFoundError(absl::StrCat("cannot read '", input, "'"));
      }
      in_ = &file_in_;
    }
    if (output != "-") {
      // A fresh, unpredictable name beside the target, created exclusively
      // with mode 0600 (decrypted data must not be readable by others, and
      // no one can plant a symlink there).
      final_ = output;
      std::filesystem::path target(output);
      std::string dir = target.has_parent_path() ? target.parent_path().string()
                                                 : std::string(".");
      temp_ = dir + "/." + target.filename().string() + ".custos-XXXXXX";
      fd_ = mkstemp(temp_.data());
      if (fd_ < 0) {
        temp_.clear();
        return absl::UnavailableError(
            absl::StrCat("cannot create a file in '", dir, "'"));
      }
      // mkstemp succeeded, so the path fits (PATH_MAX includes the NUL).
      if (temp_.size() < sizeof(g_partial_output)) {
        std::memcpy(g_partial_output, temp_.c_str(), temp_.size() + 1);
        std::atomic_signal_fence(std::memory_order_seq_cst);
        g_partial_output_set = 1;
      }
      out_buf_ = std::make_unique<__gnu_cxx::stdio_filebuf<char>>(
          fd_, std::ios::out | std::ios::binary);
      file_out_ = std::make_unique<std::ostream>(out_buf_.get());
      out_ = file_out_.get();
    }
    return absl::OkStatus();
  }
  std::istream& in() { return *in_; }
  std::ostream& out() { return *out_; }
  // Makes the output durable and gives it its name; until then only the
  // temporary file exists, and it is removed if anything fails.
  absl::Status Commit() {
    out_->flush();
    if (!*out_) return absl::UnavailableError("write failed");
    if (final_.empty()) return absl::OkStatus();
    if (fsync(fd_) != 0) return absl::UnavailableError("fsync failed");
    std::error_code ec;
    std::filesystem::rename(temp_, final_, ec);
    if (ec) {
      return absl::UnavailableError(
          absl::StrCat("cannot rename to '", final_, "': ", ec.message()));
    }
    // A signal from here on finds no temporary file (unlink fails harmlessly
    // in between) and must not touch the output.
    g_partial_output_set = 0;
    temp_.clear();
    return absl::OkStatus();
  }
  ~Files() {
    file_out_.reset();
    out_buf_.reset();  // closes fd_
    if (!temp_.empty()) {
      std::error_code ec;
      std::filesystem::remove(temp_, ec);
    }
    g_partial_output_set = 0;
  }

 private:
  std::istream* in_ = &std::cin;
  std::ostream* out_ = &std::cout;
  std::ifstream file_in_;
  int fd_ = -1;
  std::unique_ptr<__gnu_cxx::stdio_filebuf<char>> out_buf_;
  std::unique_ptr<std::ostream> file_out_;
  std::string final_, temp_;
};

// Progress on stderr for large inputs, when stderr is a terminal.
client::EnvelopeOptions ProgressOptions() {
  client::EnvelopeOptions options;
  if (isatty(STDERR_FILENO)) {
    options.progress = [](uint64_t bytes) {
      if (bytes >= (8u << 20)) {
        std::fprintf(stderr, "\r%.1f MiB", bytes / 1048576.0);
      }
    };
  }
  return options;
}

// The proto enums KeyOperation and JustificationReason have the numbers of
// kms's (kms/policy.h), so values convert by cast.
void PolicyToProto(const kms::KeyPolicy& in, pb::KeyPolicy* out) {
  out->Clear();
  out->set_version(in.version);
  for (const kms::PolicyBinding& b : in.bindings) {
    pb::PolicyBinding* binding = out->add_bindings();
    for (const std::string& p : b.principals) binding->add_principals(p);
    for (kms::KeyOperation op : b.operations) {
      binding->add_operations(static_cast<pb::KeyOperation>(op));
    }
    binding->mutable_required_context()->insert(b.required_context.begin(),
                                                b.required_context.end());
    binding->set_require_justification(b.require_justification);
    for (kms::JustificationReason r : b.allowed_reasons) {
      binding->add_allowed_reasons(static_cast<pb::JustificationReason>(r));
    }
  }
}

kms::KeyPolicy PolicyFromProto(const pb::KeyPolicy& in) {
  kms::KeyPolicy out;
  out.version = in.version();
  for (const pb::PolicyBinding& b : in.bindings()) {
    kms::PolicyBinding binding;
    binding.principals.assign(b.principals().begin(), b.principals().end());
    for (int op : b.operations()) {
      binding.operations.push_back(static_cast<kms::KeyOperation>(op));
    }
    binding.required_context.insert(b.required_context().begin(),
                                    b.required_context().end());
    binding.require_justification = b.require_justification();
    for (int r : b.allowed_reasons()) {
      binding.allowed_reasons.push_back(
          static_cast<kms::JustificationReason>(r));
    }
    out.bindings.push_back(std::move(binding));
  }
  return out;
}

// Reads a policy file with the server's own strict parser
// (kms::PolicyFromJson): a field given twice, an unknown field or a wrong
// type is refused here, naming the field, rather than one reading of it
// silently winning.
absl::Status ReadPolicyFile(const std::string& path, pb::KeyPolicy* policy) {
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("policy file '", path, "': cannot read"));
  }
  std::stringstream text;
  text << in.rdbuf();
  absl::StatusOr<kms::KeyPolicy> parsed = kms::PolicyFromJson(text.str());
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy file '", path, "': ", parsed.status().message(),
                     " (see docs/policies.md for the format)"));
  }
  PolicyToProto(*parsed, policy);
  return absl::OkStatus();
}

// A policy in the form ReadPolicyFile reads (kms::PolicyToJson: every
// field, version a number), indented.
void PrintPolicy(const pb::KeyPolicy& policy) {
  const std::string json = kms::PolicyToJson(PolicyFromProto(policy));
  const nlohmann::ordered_json parsed =
      nlohmann::ordered_json::parse(json, nullptr, /*allow_exceptions=*/false);
  std::cout << (parsed.is_discarded() ? json : parsed.dump(2)) << "\n";
}

int RunKeyCommand(const std::string& cmd, const Globals& g, const Args& a) {
  absl::StatusOr<std::unique_ptr<Client>> c = Connect(g);
  if (!c.ok()) return Fail(c.status());
  Client& client = **c;
  absl::StatusOr<pb::Key> key;
  if (cmd == "create") {
    pb::CreateKeyRequest req;
    req.set_description(a.description);
    req.set_alias(a.alias);
    auto labels = ParsePairs(a.labels, "--label");
    if (!labels.ok()) return Fail(labels.status());
    req.mutable_labels()->insert(labels->begin(), labels->end());
    if (!a.rotation_period.empty()) {
      auto period = ParsePeriod(a.rotation_period);
      if (!period.ok()) return Fail(period.status());
      *req.mutable_rotation_period() = *period;
    }
    if (!a.policy_file.empty()) {
      absl::Status s = ReadPolicyFile(a.policy_file, req.mutable_policy());
      if (!s.ok()) return Fail(s);
    }
    key = client.CreateKey(req);
  } else if (cmd == "show") {
    pb::GetKeyRequest req;
    req.set_key(a.key);
    key = client.GetKey(req);
  } else if (cmd == "list") {
    pb::ListKeysRequest req;
    req.set_page_size(a.page_size);
    req.set_label(a.label);
    if (!a.state.empty()) {
      pb::KeyState state;
      if (!pb::KeyState_Parse(a.state, &state)) {
        return Fail(absl::InvalidArgumentError(
            "--state: one of ENABLED, DISABLED, PENDING_DELETION, DESTROYED"));
      }
      req.set_state(state);
    }
    pb::ListKeysResponse all;
    do {
      auto page = client.ListKeys(req);
      if (!page.ok()) return Fail(page.status());
      all.mutable_keys()->MergeFrom(page->keys());
      req.set_page_token(page->next_page_token());
      all.set_next_page_token(page->next_page_token());
    } while (a.all && !req.page_token().empty());
    if (g.json) {
      PrintJson(all);
      return kExitOk;
    }
    std::vector<std::vector<std::string>> rows;
    for (const pb::Key& k : all.keys()) {
      rows.push_back({k.key_id(), StateName(k.state()),
                      absl::StrCat(k.primary_version()),
                      absl::StrJoin(k.aliases(), ","), k.description()});
    }
    PrintTable({"KEY_ID", "STATE", "PRIMARY", "ALIASES", "DESCRIPTION"}, rows);
    if (!all.next_page_token().empty()) {
      std::cerr << "(more keys: use --all)\n";
    }
    return kExitOk;
  } else if (cmd == "update") {
    pb::UpdateKeyRequest req;
    req.set_key(a.key);
    if (!a.description.empty()) {
      req.add_update_mask("description");
      req.set_description(a.description);
    }
    if (!a.labels.empty()) {
      auto labels = ParsePairs(a.labels, "--label");
      if (!labels.ok()) return Fail(labels.status());
      req.add_update_mask("labels");
      req.mutable_labels()->insert(labels->begin(), labels->end());
    }
    if (!a.rotation_period.empty()) {
      auto period = ParsePeriod(a.rotation_period);
      if (!period.ok()) return Fail(period.status());
      req.add_update_mask("rotation_period");
      *req.mutable_rotation_period() = *period;
    }
    key = client.UpdateKey(req);
  } else if (cmd == "rotate") {
    pb::RotateKeyRequest req;
    req.set_key(a.key);
    key = client.RotateKey(req);
  } else if (cmd == "enable") {
    pb::EnableKeyRequest req;
    req.set_key(a.key);
    key = client.EnableKey(req);
  } else if (cmd == "disable") {
    pb::DisableKeyRequest req;
    req.set_key(a.key);
    key = client.DisableKey(req);
  } else if (cmd == "schedule-deletion") {
    pb::ScheduleKeyDeletionRequest req;
    req.set_key(a.key);
    req.set_pending_window_days(a.days);
    key = client.ScheduleKeyDeletion(req);
  } else if (cmd == "cancel-deletion") {
    pb::CancelKeyDeletionRequest req;
    req.set_key(a.key);
    key = client.CancelKeyDeletion(req);
  }
  if (!key.ok()) return Fail(key.status());
  PrintKey(g, *key);
  return kExitOk;
}

int RunAliasCommand(const std::string& cmd, const Globals& g, const Args& a) {
  absl::StatusOr<std::unique_ptr<Client>> c = Connect(g);
  if (!c.ok()) return Fail(c.status());
  if (cmd == "create") {
    pb::CreateAliasRequest req;
    req.set_alias(a.alias);
    req.set_key(a.key);
    auto alias = (*c)->CreateAlias(req);
    if (!alias.ok()) return Fail(alias.status());
    if (g.json) {
      PrintJson(*alias);
    } else {
      std::cout << alias->name() << " -> " << alias->key_id() << "\n";
    }
    return kExitOk;
  }
  if (cmd == "delete") {
    pb::DeleteAliasRequest req;
    req.set_alias(a.alias);
    absl::Status s = (*c)->DeleteAlias(req);
    if (!s.ok()) return Fail(s);
    if (!g.json) std::cout << "deleted " << a.alias << "\n";
    if (g.json) std::cout << "{}\n";
    return kExitOk;
  }
  pb::ListAliasesRequest req;
  req.set_key(a.key);
  auto list = (*c)->ListAliases(req);
  if (!list.ok()) return Fail(list.status());
  if (g.json) {
    PrintJson(*list);
    return kExitOk;
  }
  std::vector<std::vector<std::string>> rows;
  for (const pb::Alias& alias : list->aliases()) {
    rows.push_back({alias.name(), alias.key_id(),
                    FormatSeconds(alias.create_time().seconds())});
  }
  PrintTable({"ALIAS", "KEY_ID", "CREATED"}, rows);
  return kExitOk;
}

int RunPolicyCommand(const std::string& cmd, const Globals& g, const Args& a) {
  absl::StatusOr<std::unique_ptr<Client>> c = Connect(g);
  if (!c.ok()) return Fail(c.status());
  absl::StatusOr<pb::KeyPolicy> policy;
  if (cmd == "get") {
    pb::GetKeyPolicyRequest req;
    req.set_key(a.key);
    policy = (*c)->GetKeyPolicy(req);
  } else {
    pb::SetKeyPolicyRequest req;
    req.set_key(a.key);
    req.set_expected_version(a.expected_version);
    absl::Status s = ReadPolicyFile(a.policy_file, req.mutable_policy());
    if (!s.ok()) return Fail(s);
    policy = (*c)->SetKeyPolicy(req);
  }
  if (!policy.ok()) return Fail(policy.status());
  // Policies print as JSON either way: it is the format `policy set` reads.
  PrintPolicy(*policy);
  return kExitOk;
}

int RunDataKey(const Globals& g, const Args& a) {
  absl::StatusOr<std::unique_ptr<Client>> c = Connect(g);
  if (!c.ok()) return Fail(c.status());
  auto context = ParsePairs(a.context, "--context");
  if (!context.ok()) return Fail(context.status());
  pb::GenerateDataKeyRequest req;
  req.set_key(a.key);
  if (a.bytes != 0) req.set_number_of_bytes(a.bytes);
  req.mutable_encryption_context()->insert(context->begin(), context->end());
  auto resp = a.no_plaintext ? (*c)->GenerateDataKeyWithoutPlaintext(req)
                             : (*c)->GenerateDataKey(req);
  if (!resp.ok()) return Fail(resp.status());
  if (g.json) {
    PrintJson(*resp);
  } else {
    std::vector<std::vector<std::string>> rows = {
        {"key_id", resp->key_id()},
        {"key_version", absl::StrCat(resp->key_version())},
        {"ciphertext_blob", absl::Base64Escape(resp->ciphertext_blob())}};
    if (!a.no_plaintext) {
      rows.push_back({"plaintext", absl::Base64Escape(resp->plaintext())});
    }
    PrintTable({"FIELD", "VALUE (bytes in base64)"}, rows);
  }
  client::CleanseResponse(&*resp);
  return kExitOk;
}

int RunEnvelope(bool encrypt, const Globals& g, const Args& a) {
  absl::StatusOr<std::unique_ptr<Client>> c = Connect(g);
  if (!c.ok()) return Fail(c.status());
  auto context = ParsePairs(a.context, "--context");
  if (!context.ok()) return Fail(context.status());
  Files files;
  if (absl::Status s = files.Open(a.input, a.output); !s.ok()) return Fail(s);
  client::EnvelopeOptions options = ProgressOptions();
  absl::Status s;
  if (encrypt) {
    s = client::EncryptStream(**c, a.key, *context, files.in(), files.out(),
                              options);
  } else {
    options.expected_key = a.expect_key;
    s = client::DecryptStream(**c, files.in(), files.out(),
                              a.context.empty() ? nullptr : &*context, options);
  }
  if (options.progress) std::fprintf(stderr, "\r");
  if (!s.ok()) return Fail(s);
  if (absl::Status done = files.Commit(); !done.ok()) return Fail(done);
  return kExitOk;
}

int RunReEncrypt(const Globals& g, const Args& a) {
  absl::StatusOr<std::unique_ptr<Client>> c = Connect(g);
  if (!c.ok()) return Fail(c.status());
  auto source = ParsePairs(a.context, "--source-context");
  if (!source.ok()) return Fail(source.status());
  auto destination = ParsePairs(a.destination_context, "--destination-context");
  if (!destination.ok()) return Fail(destination.status());
  Files files;
  if (absl::Status s = files.Open(a.input, a.output); !s.ok()) return Fail(s);
  std::stringstream text;
  text << files.in().rdbuf();
  std::string encoded = text.str();
  std::erase_if(encoded, [](char ch) { return absl::ascii_isspace(ch); });
  pb::ReEncryptRequest req;
  if (encoded.empty() ||
      !absl::Base64Unescape(encoded, req.mutable_ciphertext_blob())) {
    return Fail(absl::InvalidArgumentError(
        "input is not a base64 ciphertext blob (as printed by `custos "
        "datakey generate`)"));
  }
  req.set_destination_key(a.destination_key);
  req.mutable_source_encryption_context()->insert(source->begin(),
                                                  source->end());
  req.mutable_destination_encryption_context()->insert(destination->begin(),
                                                       destination->end());
  auto resp = (*c)->ReEncrypt(req);
  if (!resp.ok()) return Fail(resp.status());
  const std::string blob = absl::Base64Escape(resp->ciphertext_blob());
  if (a.output != "-") {
    files.out() << blob << "\n";
    if (absl::Status done = files.Commit(); !done.ok()) return Fail(done);
  }
  if (g.json) {
    PrintJson(*resp);
  } else {
    PrintTable(
        {"FIELD", "VALUE"},
        {{"source_key_id", resp->source_key_id()},
         {"source_key_version", absl::StrCat(resp->source_key_version())},
         {"key_id", resp->key_id()},
         {"key_version", absl::StrCat(resp->key_version())},
         {"ciphertext_blob", blob}});
  }
  return kExitOk;
}

int RunRandom(const Globals& g, const Args& a) {
  absl::StatusOr<std::unique_ptr<Client>> c = Connect(g);
  if (!c.ok()) return Fail(c.status());
  pb::GenerateRandomRequest req;
  req.set_number_of_bytes(a.bytes == 0 ? 32 : a.bytes);
  auto resp = (*c)->GenerateRandom(req);
  if (!resp.ok()) return Fail(resp.status());
  if (g.json) {
    PrintJson(*resp);
  } else {
    std::cout << absl::Base64Escape(resp->random()) << "\n";
  }
  return kExitOk;
}

absl::StatusOr<pb::AuditFilter> AuditFilterFrom(const Args& a) {
  pb::AuditFilter f;
  f.set_principal(a.principal);
  f.set_key_id(a.key);
  f.set_operation(a.operation);
  f.set_outcome(a.outcome);
  for (const auto& [text, field, out] :
       {std::tuple{a.since, "--since", f.mutable_start_time()},
        std::tuple{a.until, "--until", f.mutable_end_time()}}) {
    if (text.empty()) continue;
    absl::Time t;
    std::string err;
    if (!absl::ParseTime(absl::RFC3339_full, text, &t, &err)) {
      return absl::InvalidArgumentError(absl::StrCat(
          field, " '", text, "': use RFC 3339, e.g. 2026-11-27T20:00:00Z"));
    }
    out->set_seconds(absl::ToUnixSeconds(t));
  }
  if (a.since.empty()) f.clear_start_time();
  if (a.until.empty()) f.clear_end_time();
  return f;
}

std::vector<std::string> EventRow(const pb::AuditEvent& e) {
  return {absl::StrCat(e.seq()),
          FormatSeconds(e.time().seconds()),
          e.principal(),
          e.operation(),
          e.key_id().empty()
              ? "-"
              : absl::StrCat(
                    e.key_id(),
                    e.key_version() ? absl::StrCat("/v", e.key_version()) : ""),
          e.outcome(),
          e.code()};
}

const std::vector<std::string> kEventHeader = {
    "SEQ", "TIME", "PRINCIPAL", "OPERATION", "KEY", "OUTCOME", "CODE"};

int RunAuditList(const Globals& g, const Args& a) {
  absl::StatusOr<std::unique_ptr<Client>> c = Connect(g);
  if (!c.ok()) return Fail(c.status());
  auto filter = AuditFilterFrom(a);
  if (!filter.ok()) return Fail(filter.status());
  pb::ListAuditEventsRequest req;
  *req.mutable_filter() = *filter;
  req.set_page_size(a.page_size);
  pb::ListAuditEventsResponse all;
  do {
    auto page = (*c)->ListAuditEvents(req);
    if (!page.ok()) return Fail(page.status());
    all.mutable_events()->MergeFrom(page->events());
    req.set_page_token(page->next_page_token());
    all.set_next_page_token(page->next_page_token());
  } while (a.all && !req.page_token().empty());
  if (g.json) {
    for (pb::AuditEvent& e : *all.mutable_events()) e.clear_raw();
    PrintJson(all);
    return kExitOk;
  }
  std::vector<std::vector<std::string>> rows;
  for (const pb::AuditEvent& e : all.events()) rows.push_back(EventRow(e));
  PrintTable(kEventHeader, rows);
  if (!all.next_page_token().empty()) std::cerr << "(more events: use --all)\n";
  return kExitOk;
}

int RunAuditTail(const Globals& g, const Args& a) {
  absl::StatusOr<std::unique_ptr<Client>> c = Connect(g);
  if (!c.ok()) return Fail(c.status());
  auto filter = AuditFilterFrom(a);
  if (!filter.ok()) return Fail(filter.status());
  pb::StreamAuditEventsRequest req;
  *req.mutable_filter() = *filter;
  req.set_from_seq(a.from_seq);
  uint32_t seen = 0;
  if (!g.json) PrintTable(kEventHeader, {});
  absl::Status s = (*c)->StreamAuditEvents(req, [&](const pb::AuditEvent& e) {
    if (g.json) {
      std::cout << e.raw() << std::endl;
    } else {
      PrintTable({}, {EventRow(e)});
      std::cout.flush();
    }
    return a.limit == 0 || ++seen < a.limit;
  });
  if (!s.ok()) return Fail(s);
  return kExitOk;
}

int RunAuditPublicKey(const Globals& g, const Args& a) {
  absl::StatusOr<std::unique_ptr<Client>> c = Connect(g);
  if (!c.ok()) return Fail(c.status());
  auto key = (*c)->GetAuditPublicKey(pb::GetAuditPublicKeyRequest());
  if (!key.ok()) return Fail(key.status());
  if (g.json) {
    PrintJson(*key);
  } else {
    std::cout << key->public_key_pem();
    std::cerr << "node " << key->node() << ", key " << key->fingerprint()
              << "\n";
  }
  return kExitOk;
}

int RunAuditVerifyServer(const Globals& g) {
  absl::StatusOr<std::unique_ptr<Client>> c = Connect(g);
  if (!c.ok()) return Fail(c.status());
  auto report = (*c)->VerifyAuditLog(pb::VerifyAuditLogRequest());
  if (!report.ok()) return Fail(report.status());
  if (g.json) {
    PrintJson(*report);
  } else if (report->ok()) {
    std::cout << "OK (verified by the server): " << report->records()
              << " records, " << report->checkpoints()
              << " checkpoints, unsigned tail " << report->unsigned_tail()
              << "\n";
  } else {
    std::cout << "BROKEN: " << report->first_break() << "\n";
  }
  return report->ok() ? kExitOk : kExitRejected;
}

int RunAuditVerify(const Globals& g, const Args& a) {
  // A DIR always means these files: a DIR lost to a flag must never turn
  // into the server vouching for its own live log instead.
  if (a.server) return RunAuditVerifyServer(g);
  auto progress = [](uint64_t n) {
    if (isatty(STDERR_FILENO))
      std::fprintf(stderr, "\r%llu records", (unsigned long long)n);
  };
  // One key per node (replicas each sign their own chain).
  std::vector<std::string> keys;
  for (const std::string& path : a.public_keys) {
    std::ifstream in(path);
    std::stringstream pem;
    pem << in.rdbuf();
    if (!in || pem.str().find("BEGIN PUBLIC KEY") == std::string::npos) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("--public-key '", path,
                       "': not a PEM public key (export it with custosd's "
                       "audit-public-key-<node>.pem or GetAuditPublicKey)")));
    }
    keys.push_back(pem.str());
  }
  kms::AuditVerifyOptions options;
  options.public_key_pems = std::move(keys);
  options.max_unsigned_tail = a.max_unsigned_tail;
  options.progress = progress;
  absl::StatusOr<kms::AuditVerifyReport> report =
      kms::VerifyAuditDirectoryWith(a.dir, options);
  if (isatty(STDERR_FILENO)) std::fprintf(stderr, "\r");
  if (!report.ok()) return Fail(report.status());
  if (g.json) {
    nlohmann::json out = {{"ok", report->ok},
                          {"records", report->records},
                          {"signatures_checked", report->signatures_checked},
                          {"first_break", report->first_break},
                          {"nodes", nlohmann::json::array()}};
    for (const auto& node : report->nodes) {
      out["nodes"].push_back({{"node", node.node_id},
                              {"segments", node.segments},
                              {"records", node.records},
                              {"last_seq", node.last_seq},
                              {"checkpoints", node.checkpoints},
                              {"unsigned_tail", node.unsigned_tail}});
    }
    std::cout << out.dump(2) << "\n";
  } else {
    std::vector<std::vector<std::string>> rows;
    for (const auto& node : report->nodes) {
      rows.push_back({node.node_id, absl::StrCat(node.segments),
                      absl::StrCat(node.records), absl::StrCat(node.last_seq),
                      absl::StrCat(node.checkpoints),
                      absl::StrCat(node.unsigned_tail)});
    }
    PrintTable({"NODE", "SEGMENTS", "RECORDS", "LAST_SEQ", "CHECKPOINTS",
                "UNSIGNED_TAIL"},
               rows);
    if (report->ok) {
      std::cout << "OK: " << report->records
                << " records; every hash chain is intact; "
                << (report->signatures_checked
                        ? "every checkpoint signature verifies"
                        : "checkpoint signatures NOT checked (give "
                          "--public-key)")
                << "\n";
    } else {
      std::cout << "BROKEN: " << report->first_break << "\n";
    }
  }
  return report->ok ? kExitOk : kExitRejected;
}

}  // namespace

int Main(int argc, char** argv) {
  HardenProcess();
  Globals g;
  Args a;
  CLI::App app{
      "custos: manage keys and encrypt data with a Custos server.\n"
      "Connection from --addr/--ca/--cert/--key or CUSTOS_ADDR, CUSTOS_CA, "
      "CUSTOS_CERT, CUSTOS_KEY.\nExample: custos key create --alias "
      "alias/photos --description \"photo store\""};
  app.add_option("--addr", g.addr, "server host:port");
  app.add_option("--ca", g.ca, "CA certificate of the server (PEM)");
  app.add_option("--cert", g.cert, "client certificate (PEM)");
  app.add_option("--key", g.key, "client private key (PEM)");
  app.add_flag("--json", g.json, "print JSON instead of tables");
  app.add_option("--timeout", g.timeout_seconds, "seconds per call")
      ->capture_default_str();
  app.require_subcommand(1);
  // Global flags work after the command too: custos key list --json.
  app.fallthrough();

  std::string command;
  auto add = [&](CLI::App* parent, const std::string& name,
                 const std::string& help, const std::string& example) {
    CLI::App* sub = parent->add_subcommand(name, help);
    sub->footer("Example:\n  " + example);
    sub->callback([&command, sub, parent] {
      command = parent->get_name() + " " + sub->get_name();
    });
    return sub;
  };

  CLI::App* key = app.add_subcommand("key", "create and manage keys");
  key->require_subcommand(1);
  key->footer("Example:\n  custos key list");
  CLI::App* create = add(key, "create",
                         "create a key (its first version is "
                         "generated inside the HSM)",
                         "custos key create --alias alias/photos "
                         "--policy photos-policy.json --rotation-period 90d");
  create->add_option("--description", a.description, "free text");
  create->add_option("--alias", a.alias, "alias/NAME to create with it");
  create->add_option("--label", a.labels, "NAME=VALUE, repeatable");
  create->add_option("--rotation-period", a.rotation_period,
                     "rotate every 90d, 12h, ... (default never)");
  create->add_option("--policy", a.policy_file,
                     "JSON policy file (docs/policies.md)");
  CLI::App* list =
      add(key, "list", "list keys", "custos key list --state ENABLED");
  list->add_option("--state", a.state, "ENABLED, DISABLED, ...");
  list->add_option("--label", a.label, "NAME or NAME=VALUE");
  list->add_option("--page-size", a.page_size, "keys per page");
  list->add_flag("--all", a.all, "fetch every page");
  for (auto [name, help] : std::vector<std::pair<std::string, std::string>>{
           {"show", "show a key and its versions"},
           {"rotate", "add a new version and make it primary"},
           {"enable", "enable a disabled key"},
           {"disable", "refuse every cryptographic use of a key"},
           {"cancel-deletion",
            "stop a scheduled deletion (the key stays "
            "disabled)"}}) {
    add(key, name, help, "custos key " + name + " alias/photos")
        ->add_option("KEY", a.key, "key id or alias")
        ->required();
  }
  CLI::App* update =
      add(key, "update",
          "change description, labels or "
          "rotation period",
          "custos key update alias/photos --rotation-period 30d");
  update->add_option("KEY", a.key, "key id or alias")->required();
  update->add_option("--description", a.description, "new description");
  update->add_option("--label", a.labels, "NAME=VALUE (replaces all labels)");
  update->add_option("--rotation-period", a.rotation_period,
                     "90d, or 0 for never");
  CLI::App* sched = add(key, "schedule-deletion",
                        "destroy the key after 7-30 days (unusable at once)",
                        "custos key schedule-deletion alias/old --days 7");
  sched->add_option("KEY", a.key, "key id or alias")->required();
  sched->add_option("--days", a.days, "7-30, default 30");

  CLI::App* alias = app.add_subcommand("alias", "name keys");
  alias->require_subcommand(1);
  alias->footer("Example:\n  custos alias list");
  CLI::App* acreate = add(alias, "create", "create an alias",
                          "custos alias create alias/photos k-...");
  acreate->add_option("ALIAS", a.alias, "alias/NAME")->required();
  acreate->add_option("KEY", a.key, "key id or alias")->required();
  add(alias, "delete", "delete an alias", "custos alias delete alias/photos")
      ->add_option("ALIAS", a.alias, "alias/NAME")
      ->required();
  add(alias, "list", "list aliases", "custos alias list --key k-...")
      ->add_option("--key", a.key, "only this key's aliases");

  CLI::App* policy = app.add_subcommand("policy", "who may use a key");
  policy->require_subcommand(1);
  policy->footer("Example:\n  custos policy get alias/photos");
  add(policy, "get", "print a key's policy (JSON)",
      "custos policy get alias/photos > policy.json")
      ->add_option("KEY", a.key, "key id or alias")
      ->required();
  CLI::App* pset = add(policy, "set", "replace a key's policy from a JSON file",
                       "custos policy set alias/photos policy.json");
  pset->add_option("KEY", a.key, "key id or alias")->required();
  pset->add_option("FILE", a.policy_file, "policy JSON")->required();
  pset->add_option("--expected-version", a.expected_version,
                   "refuse if the policy changed since this version");

  CLI::App* datakey = app.add_subcommand("datakey", "data keys");
  datakey->require_subcommand(1);
  datakey->footer(
      "Example:\n  custos datakey generate alias/photos --no-plaintext");
  CLI::App* gen = add(datakey, "generate", "a fresh data key and its blob",
                      "custos datakey generate alias/photos --context "
                      "tenant=7 --no-plaintext");
  gen->add_option("KEY", a.key, "key id or alias")->required();
  gen->add_option("--context", a.context, "NAME=VALUE, repeatable");
  gen->add_option("--bytes", a.bytes, "1-1024 (default 32)");
  gen->add_flag("--no-plaintext", a.no_plaintext, "only the wrapped key");

  CLI::App* enc = app.add_subcommand(
      "encrypt", "envelope-encrypt a file or stream with a fresh data key");
  enc->footer(
      "Example:\n  custos encrypt --key alias/photos --context "
      "tenant=7 -i photo.jpg -o photo.jpg.custos");
  enc->add_option("--key", a.key, "key id or alias")->required();
  enc->add_option("--context", a.context, "NAME=VALUE, repeatable");
  enc->add_option("-i,--input", a.input, "file, or - for stdin")
      ->capture_default_str();
  enc->add_option("-o,--output", a.output, "file, or - for stdout")
      ->capture_default_str();
  CLI::App* dec = app.add_subcommand("decrypt", "decrypt an envelope file");
  dec->footer(
      "Example:\n  custos decrypt --expect-key alias/photos -i "
      "photo.jpg.custos -o photo.jpg");
  dec->add_option("--context", a.context,
                  "NAME=VALUE the file must be bound to (optional)");
  dec->add_option("--expect-key", a.expect_key,
                  "key id or alias the file must be encrypted under; any "
                  "other key's file is refused (recommended)");
  dec->add_option("-i,--input", a.input, "file, or - for stdin")
      ->capture_default_str();
  dec->add_option("-o,--output", a.output, "file, or - for stdout")
      ->capture_default_str();
  CLI::App* reenc = app.add_subcommand(
      "reencrypt",
      "move a ciphertext blob (base64) to another key, key version or context "
      "without seeing its plaintext");
  reenc->footer(
      "Example:\n  custos reencrypt --source-context tenant=7 "
      "--destination-key alias/archive --destination-context tenant=7 "
      "-i blob.b64 -o blob-archive.b64");
  reenc->add_option("--destination-key", a.destination_key,
                    "key id or alias (default: the blob's own key, i.e. its "
                    "primary version)");
  reenc->add_option("--source-context", a.context,
                    "NAME=VALUE the blob is bound to, repeatable");
  reenc->add_option("--destination-context", a.destination_context,
                    "NAME=VALUE to bind the new blob to, repeatable");
  reenc
      ->add_option("-i,--input", a.input,
                   "file holding the base64 blob, or - for stdin")
      ->capture_default_str();
  reenc
      ->add_option("-o,--output", a.output,
                   "also write the new base64 blob to this file")
      ->capture_default_str();
  CLI::App* random = app.add_subcommand("random", "random bytes from the HSM");
  random->footer("Example:\n  custos random --bytes 32");
  random->add_option("--bytes", a.bytes, "1-1024 (default 32)");

  CLI::App* audit = app.add_subcommand("audit", "the audit log");
  audit->require_subcommand(1);
  audit->footer("Example:\n  custos audit verify ./audit");
  CLI::App* verify = add(audit, "verify",
                         "verify copied audit segments offline (exit 4 on a "
                         "break, naming file, line and seq)",
                         "custos audit verify --public-key "
                         "audit-public-key.pem ./audit");
  CLI::Option* verify_dir = verify->add_option(
      "DIR", a.dir, "directory of copied audit-*.jsonl segments");
  CLI::Option* verify_server = verify->add_flag(
      "--server", a.server,
      "instead of DIR: ask the server to verify its own live log "
      "(auditors)");
  verify_dir->excludes(verify_server);
  verify_server->excludes(verify_dir);
  // The server checks its own log with its own key: flags for an offline
  // check would be silently unused there.
  verify
      ->add_option("--max-unsigned-tail", a.max_unsigned_tail,
                   "with --public-key: most records allowed after a node's "
                   "last checkpoint (twice the server's "
                   "audit_checkpoint_every)")
      ->capture_default_str()
      ->excludes(verify_server);
  auto add_filters = [&](CLI::App* cmd) {
    cmd->add_option("--principal", a.principal, "only this caller");
    cmd->add_option("--key", a.key, "only this key id");
    cmd->add_option("--operation", a.operation, "only this RPC, e.g. Decrypt");
    cmd->add_option("--outcome", a.outcome, "ALLOWED, DENIED or FAILED");
    cmd->add_option("--since", a.since, "RFC 3339 time, inclusive");
    cmd->add_option("--until", a.until, "RFC 3339 time, exclusive");
  };
  CLI::App* alist = add(audit, "list", "list audit events (auditors only)",
                        "custos audit list --outcome DENIED --all");
  add_filters(alist);
  alist->add_option("--page-size", a.page_size, "events per page");
  alist->add_flag("--all", a.all, "fetch every page");
  CLI::App* atail =
      add(audit, "tail", "follow the audit log like tail -f (Ctrl-C stops)",
          "custos audit tail --operation Decrypt");
  add_filters(atail);
  atail->add_option("--from-seq", a.from_seq,
                    "start at this sequence number (default: new events)");
  atail->add_option("--limit", a.limit, "stop after this many events");
  add(audit, "public-key", "print the server's checkpoint public key (PEM)",
      "custos audit public-key > audit-public-key.pem");
  // One value per flag: a DIR after it must stay the DIR.
  verify
      ->add_option("--public-key", a.public_keys,
                   "checkpoint key (PEM); repeat the flag for each node "
                   "whose segments DIR holds")
      ->allow_extra_args(false)
      ->excludes(verify_server);
  verify->callback([&command, verify_dir, verify_server] {
    command = "audit verify";
    if (verify_dir->count() == 0 && verify_server->count() == 0) {
      throw CLI::RequiredError(
          "DIR (a copy of the audit segments to verify offline) or --server "
          "(ask the server to verify its own log)");
    }
  });

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // CLI11 reports "custos frob" as "A subcommand is required"; name the
    // word it did not know instead.
    if (dynamic_cast<const CLI::RequiredError*>(&e) != nullptr) {
      for (CLI::App* parent : {&app, key, alias, policy, datakey, audit}) {
        if ((parent == &app || parent->parsed()) &&
            !parent->remaining().empty()) {
          std::cerr << "unknown command '" << parent->remaining().front()
                    << "'; run with --help for the list\n";
          return kExitUsage;
        }
      }
    }
    int rc = app.exit(e);
    return rc == 0 ? kExitOk : kExitUsage;
  }
  if (app.got_subcommand("encrypt")) return RunEnvelope(true, g, a);
  if (app.got_subcommand("decrypt")) return RunEnvelope(false, g, a);
  if (app.got_subcommand("reencrypt")) return RunReEncrypt(g, a);
  if (app.got_subcommand("random")) return RunRandom(g, a);
  const std::string group = command.substr(0, command.find(' '));
  const std::string verb = command.substr(command.find(' ') + 1);
  if (group == "key") return RunKeyCommand(verb, g, a);
  if (group == "alias") return RunAliasCommand(verb, g, a);
  if (group == "policy") return RunPolicyCommand(verb, g, a);
  if (group == "datakey") return RunDataKey(g, a);
  if (group == "audit" && verb == "list") return RunAuditList(g, a);
  if (group == "audit" && verb == "tail") return RunAuditTail(g, a);
  if (group == "audit" && verb == "public-key") return RunAuditPublicKey(g, a);
  if (group == "audit") return RunAuditVerify(g, a);
  std::cerr << app.help();
  return kExitUsage;
}

}  // namespace custos::cli

int main(int argc, char** argv) { return custos::cli::Main(argc, argv); }
