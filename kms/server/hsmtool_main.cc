// custos-hsmtool: drives the hsm/ layer by hand against a PKCS#11 token, for
// the demo, operators checking an HSM before starting custosd, and tests that
// need a second process. With --config (custosd's configuration) it also
// lists the quarantine, the Custos objects no database row names, and
// destroys one of them when the operator names it, recording it first in
// the node's audit log (custosd must be stopped on that node: the log has
// one writer). It never prints key material or the PIN.
#include <pwd.h>
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/p256.h"
#include "common/status_macros.h"
#include "hsm/hsm.h"
#include "hsm/key_templates.h"
#include "hsm/module.h"
#include "kms/audit/audit_log.h"
#include "kms/audit/checkpoint.h"
#include "kms/deployment.h"
#include "kms/quarantine.h"
#include "kms/server/config.h"
#include "kms/store/store.h"

namespace {

using custos::hsm::Hsm;

struct Flags {
  std::string module = "/usr/lib/softhsm/libsofthsm2.so";
  std::string token;
  std::string pin_file;
  std::string label = "custos-hsmtool";
  std::string id_hex;
  std::string config;  // custosd's YAML, for `quarantine`
};

absl::StatusOr<std::string> ParseId(const std::string& hex) {
  std::string id;
  if (hex.empty() || hex.size() % 2 != 0 ||
      hex.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos) {
    return absl::InvalidArgumentError(
        "--id must be the key's CKA_ID in hex, as generate-key printed it");
  }
  return absl::HexStringToBytes(hex);
}

// Who runs the tool, for the audit record: the Unix account.
std::string OperatorName() {
  const uid_t uid = getuid();
  const passwd* pw = getpwuid(uid);
  return absl::StrCat(
      "custos:operator:", pw != nullptr ? pw->pw_name : std::to_string(uid),
      " (custos-hsmtool)");
}

// `quarantine list` and `quarantine destroy --id HEX`, on the database and
// token that custosd's configuration names.
absl::Status RunQuarantine(const std::string& command, const Flags& flags) {
  if (flags.config.empty()) {
    return absl::InvalidArgumentError(
        "--config: quarantine needs custosd's configuration file (it names "
        "the database, the token and the audit directory)");
  }
  CUSTOS_ASSIGN_OR_RETURN(
      custos::server::Config config,
      custos::server::LoadConfig(
          flags.config,
          // The tool uses none of the test settings;
          // it reads the tests' configs too.
          custos::server::ParseOptions{.allow_testing = true}));
  CUSTOS_ASSIGN_OR_RETURN(
      std::unique_ptr<custos::kms::Store> store,
      custos::kms::OpenStore(config.storage, custos::kms::OpenMode::kExisting));
  CUSTOS_ASSIGN_OR_RETURN(auto module,
                          custos::hsm::Module::Load(config.hsm.module));
  Hsm::Options options;
  options.token_label = config.hsm.token_label;
  options.pin_file = config.hsm.pin_file;
  options.pool.size = 1;
  options.shared_token = store->Shared();
  CUSTOS_ASSIGN_OR_RETURN(auto hsm, Hsm::Open(*module, options));
  CUSTOS_RETURN_IF_ERROR(custos::kms::CheckDeployment(*store, *hsm));
  if (command == "list") {
    CUSTOS_ASSIGN_OR_RETURN(std::vector<custos::hsm::HsmObject> objects,
                            custos::kms::FindQuarantined(*store, *hsm));
    std::printf("%-34s %s\n", "CKA_ID", "CKA_LABEL");
    for (const auto& o : objects) {
      std::printf("%-34s %s\n", custos::hsm::ObjectIdHex(o.id).c_str(),
                  o.label.c_str());
    }
    std::printf("%zu quarantined object(s): named by no row of %s\n",
                objects.size(),
                custos::kms::RedactStorageUrl(config.storage).c_str());
    return absl::OkStatus();
  }
  CUSTOS_ASSIGN_OR_RETURN(std::string id, ParseId(flags.id_hex));
  CUSTOS_ASSIGN_OR_RETURN(auto signer, custos::kms::HsmAuditSigner::Open(
                                           hsm.get(), config.node_id));
  custos::kms::FileAuditLog::Options audit_options;
  audit_options.dir = config.audit_dir;
  audit_options.node_id = config.node_id;
  audit_options.signer = signer.get();
  audit_options.checkpoint_every = config.audit_checkpoint_every;
  audit_options.checkpoint_interval = config.audit_checkpoint_interval;
  audit_options.max_segment_bytes = config.audit_max_segment_bytes;
  audit_options.max_segment_age = config.audit_max_segment_age;
  absl::StatusOr<std::unique_ptr<custos::kms::FileAuditLog>> audit =
      custos::kms::FileAuditLog::Open(audit_options);
  if (!audit.ok()) {
    return absl::Status(
        audit.status().code(),
        absl::StrCat(audit.status().message(), " (stop custosd on node ",
                     config.node_id, " first: its audit log has one writer)"));
  }
  CUSTOS_RETURN_IF_ERROR(custos::kms::DestroyQuarantined(
      *store, *hsm, **audit, id, OperatorName(), absl::Now()));
  std::cout << "destroyed quarantined object " << flags.id_hex
            << " (recorded in the audit log of node " << config.node_id
            << ")\n";
  return absl::OkStatus();
}

absl::Status RunCommand(const std::string& command, const Flags& flags) {
  CUSTOS_ASSIGN_OR_RETURN(auto module, custos::hsm::Module::Load(flags.module));
  if (command == "tokens") {
    CUSTOS_ASSIGN_OR_RETURN(auto tokens, module->ListTokens());
    for (const auto& t : tokens) {
      std::cout << "slot " << t.slot << "  label '" << t.label << "'  serial "
                << t.serial << (t.initialized ? "" : "  (not initialised)")
                << "\n";
    }
    return absl::OkStatus();
  }
  Hsm::Options options;
  options.token_label = flags.token;
  options.pin_file = flags.pin_file;
  options.pool.size = 1;
  CUSTOS_ASSIGN_OR_RETURN(auto hsm, Hsm::Open(*module, options));
  if (command == "generate-key") {
    CUSTOS_ASSIGN_OR_RETURN(std::string id, hsm->GenerateAesKey(flags.label));
    std::cout << custos::hsm::ObjectIdHex(id) << "\n";
    return absl::OkStatus();
  }
  if (command == "list") {
    CUSTOS_ASSIGN_OR_RETURN(auto objects, hsm->ListKeyObjects());
    std::printf("%-34s %-8s %s\n", "CKA_ID", "CLASS", "CKA_LABEL");
    for (const auto& o : objects) {
      std::printf("%-34s %-8s %s\n", custos::hsm::ObjectIdHex(o.id).c_str(),
                  o.object_class == CKO_SECRET_KEY ? "aes" : "ec-priv",
                  o.label.c_str());
    }
    return absl::OkStatus();
  }
  CUSTOS_ASSIGN_OR_RETURN(std::string id, ParseId(flags.id_hex));
  if (command == "verify-key") {
    CUSTOS_RETURN_IF_ERROR(hsm->VerifyAesKey(id));
    std::cout << "key " << flags.id_hex
              << ": present; SENSITIVE, ALWAYS_SENSITIVE, NEVER_EXTRACTABLE, "
                 "LOCAL; no WRAP/UNWRAP/DERIVE; not MODIFIABLE\n";
    return absl::OkStatus();
  }
  if (command == "roundtrip") {
    // A 32-byte random "data key", wrapped and unwrapped inside the HSM.
    CUSTOS_ASSIGN_OR_RETURN(custos::SecretBytes data_key,
                            hsm->GenerateRandom(32));
    const std::string aad = "custos-hsmtool roundtrip";
    CUSTOS_ASSIGN_OR_RETURN(auto sealed,
                            hsm->EncryptAesGcm(id, aad, data_key.view()));
    std::cout << "wrapped a 32-byte random data key under " << flags.id_hex
              << ":\n  iv  " << absl::BytesToHexString(sealed.iv) << "\n  ct  "
              << absl::BytesToHexString(sealed.ciphertext)
              << " (32 bytes + 16-byte tag)\n";
    CUSTOS_ASSIGN_OR_RETURN(
        custos::SecretBytes opened,
        hsm->DecryptAesGcm(id, sealed.iv, aad, sealed.ciphertext));
    if (!opened.Equals(data_key.view())) {
      return absl::InternalError("round trip returned different bytes");
    }
    std::cout << "unwrapped: identical to the original (not printed)\n";
    std::string tampered = sealed.ciphertext;
    tampered[0] ^= 1;
    auto refused = hsm->DecryptAesGcm(id, sealed.iv, aad, tampered);
    std::cout << "one flipped ciphertext bit: "
              << (refused.ok() ? "ACCEPTED (bug)"
                               : std::string(refused.status().message()))
              << "\n";
    return refused.ok() ? absl::InternalError("tampering not detected")
                        : absl::OkStatus();
  }
  if (command == "destroy") {
    // Custos's own objects are destroyed only through Custos, audited:
    // keys by ScheduleKeyDeletion, the quarantine by `quarantine destroy`.
    CUSTOS_ASSIGN_OR_RETURN(auto objects, hsm->ListKeyObjects());
    for (const auto& o : objects) {
      if (o.id == id && o.label.rfind("custos:", 0) == 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "object ", flags.id_hex, " ('", o.label,
            "') is Custos's: destroy keys with ScheduleKeyDeletion, and "
            "objects no database row names with `custos-hsmtool --config "
            "FILE quarantine destroy --id ...` (both audited)"));
      }
    }
    CUSTOS_ASSIGN_OR_RETURN(int n, hsm->DestroyObjects(id));
    std::cout << "destroyed " << n << " object(s)\n";
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError("unknown command " + command);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "custos-hsmtool: check a PKCS#11 token the way custosd uses it.\n"
      "Example:\n  custos-hsmtool --token custos --pin-file pin generate-key "
      "--label demo"};
  Flags flags;
  app.add_option("--module", flags.module, "PKCS#11 library path")
      ->capture_default_str();
  app.add_option("--token", flags.token, "token label");
  app.add_option("--pin-file", flags.pin_file,
                 "file holding the user PIN (mode 0400 or 0600)");
  app.add_option("--config", flags.config,
                 "custosd's configuration (for quarantine)");
  app.require_subcommand(1);
  app.add_subcommand("tokens", "list the module's tokens");
  app.add_subcommand("list", "list key objects (CKA_ID, class, label)");
  app.add_subcommand("generate-key",
                     "generate an AES-256 CMK; print its CKA_ID")
      ->add_option("--label", flags.label, "CKA_LABEL")
      ->capture_default_str();
  for (const char* name : {"verify-key", "roundtrip", "destroy"}) {
    app.add_subcommand(name, std::string(name) == "verify-key"
                                 ? "check a key's attributes"
                             : std::string(name) == "roundtrip"
                                 ? "wrap and unwrap a random data key"
                                 : "destroy every object with this CKA_ID")
        ->add_option("--id", flags.id_hex, "CKA_ID in hex")
        ->required();
  }
  CLI::App* quarantine = app.add_subcommand(
      "quarantine",
      "Custos objects that no database row names (needs --config)");
  quarantine->require_subcommand(1);
  quarantine->add_subcommand("list", "list the quarantined objects");
  quarantine
      ->add_subcommand("destroy",
                       "destroy ONE quarantined object, named by its CKA_ID, "
                       "after recording it in the audit log (stop custosd "
                       "on this node first)")
      ->add_option("--id", flags.id_hex, "CKA_ID in hex, as list prints it")
      ->required();
  CLI11_PARSE(app, argc, argv);
  std::string command = app.get_subcommands().front()->get_name();
  absl::Status s;
  if (command == "quarantine") {
    const std::string sub = quarantine->get_subcommands().front()->get_name();
    command += " " + sub;
    s = RunQuarantine(sub, flags);
  } else {
    s = RunCommand(command, flags);
  }
  if (!s.ok()) {
    std::cerr << "custos-hsmtool " << command << ": " << s.message() << "\n";
    return 1;
  }
  return 0;
}
