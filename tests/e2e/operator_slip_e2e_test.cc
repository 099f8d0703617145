// Operator slips must never destroy keys: a real custosd on a real SoftHSM2
// token, its database moved away, replaced by an empty one, replaced by an
// older backup, opened against another token, and its audit signing key
// lost. In every case nothing is destroyed, custosd says what is wrong, and
// once the right database is back every blob decrypts again. The
// quarantine is then settled by an operator with custos-hsmtool, audited.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "custos/v1/kms.grpc.pb.h"
#include "tests/support/custosd_process.h"
#include "tests/support/subprocess.h"
#include "tests/support/test_token.h"

namespace custos {
namespace {

namespace pb = ::custos::v1;
namespace fs = std::filesystem;
using ::custos::testing::CustosdProcess;
using ::custos::testing::ProcessResult;
using ::custos::testing::ReadAll;
using ::testing::HasSubstr;
using Code = grpc::StatusCode;

class OperatorSlipE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    CustosdProcess::Options options;
    options.extra_config = "maintenance_interval_seconds: 0.2\n";
    auto server = CustosdProcess::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
  }

  std::string NewKey() {
    absl::StatusOr<std::string> key = server_->CreateKeyFor(
        "service-a", {pb::GENERATE_DATA_KEY, pb::DECRYPT});
    EXPECT_TRUE(key.ok()) << key.status();
    return key.value_or("");
  }

  pb::GenerateDataKeyResponse DataKey(const std::string& key) {
    pb::GenerateDataKeyRequest req;
    req.set_key(key);
    pb::GenerateDataKeyResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = pb::CryptoService::NewStub(server_->Channel("service-a"))
                         ->GenerateDataKey(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return resp;
  }

  grpc::Status Decrypt(const pb::GenerateDataKeyResponse& dk) {
    pb::DecryptRequest req;
    req.set_ciphertext_blob(dk.ciphertext_blob());
    pb::DecryptResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = pb::CryptoService::NewStub(server_->Channel("service-a"))
                         ->Decrypt(&ctx, req, &resp);
    if (s.ok() && resp.plaintext() != dk.plaintext()) {
      return grpc::Status(Code::INTERNAL, "decrypted to something else");
    }
    return s;
  }

  void Rotate(const std::string& key) {
    pb::RotateKeyRequest req;
    req.set_key(key);
    pb::Key rotated;
    grpc::ClientContext ctx;
    grpc::Status s =
        pb::KeyManagementService::NewStub(server_->Channel("admin"))
            ->RotateKey(&ctx, req, &rotated);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }

  // custos-hsmtool ARGS with the server's SoftHSM2 configuration.
  ProcessResult HsmTool(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {testing::BinDir() + "/custos-hsmtool"};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<std::string> env = testing::EnvironmentWithout("SOFTHSM2_");
    env.push_back("SOFTHSM2_CONF=" + server_->softhsm_conf());
    return testing::RunProcess(argv, env, "/dev/null",
                               server_->dir() + "/hsmtool");
  }

  // The CKA_IDs (hex) of the Custos AES key objects on the token.
  std::vector<std::string> KeyObjects() {
    ProcessResult r = HsmTool(
        {"--token", "custos", "--pin-file", server_->pin_file(), "list"});
    EXPECT_EQ(r.code, 0) << r;
    std::vector<std::string> ids;
    for (absl::string_view line : absl::StrSplit(r.out, '\n')) {
      if (absl::StrContains(line, " aes ") &&
          absl::StrContains(line, "custos:k-")) {
        ids.emplace_back(line.substr(0, line.find(' ')));
      }
    }
    return ids;
  }

  // The reconciliation summaries in the log, oldest first.
  std::vector<std::string> SummaryLines() {
    std::vector<std::string> lines;
    for (absl::string_view line :
         absl::StrSplit(ReadAll(server_->log_path()), '\n')) {
      if (absl::StrContains(line, " HSM objects, ")) lines.emplace_back(line);
    }
    return lines;
  }
  std::string LastSummary() {
    std::vector<std::string> lines = SummaryLines();
    return lines.empty() ? "" : lines.back();
  }
  int Summaries() { return static_cast<int>(SummaryLines().size()); }
  // Restarts and waits for that start's reconciliation.
  void RestartAndReconcile() {
    const int before = Summaries();
    ASSERT_TRUE(server_->Restart().ok()) << ReadAll(server_->log_path());
    for (int i = 0; i < 300 && Summaries() <= before; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ASSERT_GT(Summaries(), before) << ReadAll(server_->log_path());
  }

  // Moves the SQLite database (and any WAL files) to `to`, or back.
  void MoveDatabase(const std::string& from, const std::string& to) {
    for (const char* suffix : {"", "-wal", "-shm"}) {
      const std::string f = from + suffix;
      if (fs::exists(f)) fs::rename(f, to + suffix);
    }
  }

  std::string AllAuditText() {
    std::string all;
    for (const auto& entry : fs::directory_iterator(server_->audit_dir())) {
      if (entry.path().extension() == ".jsonl") {
        all += ReadAll(entry.path().string());
      }
    }
    return all;
  }

  std::unique_ptr<CustosdProcess> server_;
};

TEST_F(OperatorSlipE2eTest, MissingDatabaseStopsStartUpAndDestroysNothing) {
  const std::string key = NewKey();
  pb::GenerateDataKeyResponse blob = DataKey(key);
  const std::vector<std::string> objects = KeyObjects();
  ASSERT_TRUE(server_->Stop().ok());
  const std::string db = server_->database_path();
  MoveDatabase(db, db + ".moved");

  ProcessResult start = server_->StartExpectingFailure();
  EXPECT_EQ(start.code, 1) << start;
  EXPECT_THAT(start.err, HasSubstr("does not exist"));
  EXPECT_THAT(start.err, HasSubstr("custosd --config FILE --init"));
  EXPECT_FALSE(fs::exists(db)) << "custosd created a database";
  EXPECT_EQ(KeyObjects(), objects);

  MoveDatabase(db + ".moved", db);
  ASSERT_TRUE(server_->Restart().ok()) << ReadAll(server_->log_path());
  EXPECT_TRUE(Decrypt(blob).ok());
}

TEST_F(OperatorSlipE2eTest, EmptyDatabaseOnAUsedTokenIsRefused) {
  const std::string key = NewKey();
  pb::GenerateDataKeyResponse blob = DataKey(key);
  const std::vector<std::string> objects = KeyObjects();
  ASSERT_TRUE(server_->Stop().ok());
  const std::string db = server_->database_path();
  MoveDatabase(db, db + ".real");

  // An empty file (a truncated copy, a touched path) is not a database.
  { std::ofstream(db).close(); }
  ProcessResult start = server_->StartExpectingFailure();
  EXPECT_EQ(start.code, 1) << start;
  EXPECT_THAT(start.err, HasSubstr("no Custos schema"));
  EXPECT_EQ(fs::file_size(db), 0u);

  // --init on the used token refuses to start a second deployment on it.
  fs::remove(db);
  ProcessResult init = server_->RunCustosd({"--init"});
  EXPECT_EQ(init.code, 1) << init;
  EXPECT_THAT(init.err, HasSubstr("already belongs to another Custos "
                                  "deployment"));
  // What --init created before refusing (the empty schema) cannot start.
  ProcessResult again = server_->StartExpectingFailure();
  EXPECT_EQ(again.code, 1) << again;
  EXPECT_THAT(again.err, HasSubstr("not bound"));
  EXPECT_EQ(KeyObjects(), objects);

  fs::remove(db);
  MoveDatabase(db + ".real", db);
  ASSERT_TRUE(server_->Restart().ok()) << ReadAll(server_->log_path());
  EXPECT_TRUE(Decrypt(blob).ok());
}

TEST_F(OperatorSlipE2eTest, DatabaseOpenedAgainstAnotherTokenIsRefused) {
  const std::string key = NewKey();
  pb::GenerateDataKeyResponse blob = DataKey(key);
  ASSERT_TRUE(server_->Stop().ok());
  // A second token in the same SoftHSM2 store, with the same PIN.
  const std::string pin = ReadAll(server_->pin_file());
  const std::string so_pin = ReadAll(server_->dir() + "/so.pin");
  testing::CommandResult made = testing::RunCommand(absl::StrCat(
      "SOFTHSM2_CONF=", server_->softhsm_conf(),
      " softhsm2-util --init-token --free --label other --so-pin ",
      std::string(absl::StripTrailingAsciiWhitespace(so_pin)), " --pin ",
      std::string(absl::StripTrailingAsciiWhitespace(pin))));
  ASSERT_EQ(made.exit_code, 0) << made.output;
  const std::string config = ReadAll(server_->config_path());
  std::string other = config;
  other.replace(other.find("token_label: custos"), 19, "token_label: other");
  ASSERT_TRUE(testing::WriteFileAtomically(server_->config_path(), other).ok());

  ProcessResult start = server_->StartExpectingFailure();
  EXPECT_EQ(start.code, 1) << start;
  EXPECT_THAT(start.err, HasSubstr("hsm.token_label: the database belongs to "
                                   "token 'custos'"));
  EXPECT_THAT(start.err, HasSubstr("custosd opened token 'other'"));

  ASSERT_TRUE(
      testing::WriteFileAtomically(server_->config_path(), config).ok());
  ASSERT_TRUE(server_->Restart().ok()) << ReadAll(server_->log_path());
  EXPECT_TRUE(Decrypt(blob).ok());
}

// The heart of it: an older backup restored. Keys and versions made after
// the backup are quarantined, not destroyed, reported in the log, the audit
// log and by custos-hsmtool; with the newer database back, all decrypt.
TEST_F(OperatorSlipE2eTest, OlderBackupRestoredLosesNothing) {
  const std::string old_key = NewKey();
  pb::GenerateDataKeyResponse old_blob = DataKey(old_key);
  ASSERT_TRUE(server_->Stop().ok());
  const std::string db = server_->database_path();
  fs::copy_file(db, db + ".backup");
  ASSERT_TRUE(server_->Restart().ok());
  // After the backup: a new key, and a new version of the old one.
  const std::string new_key = NewKey();
  pb::GenerateDataKeyResponse new_blob = DataKey(new_key);
  Rotate(old_key);
  pb::GenerateDataKeyResponse old_key_v2_blob = DataKey(old_key);
  const std::vector<std::string> objects = KeyObjects();
  ASSERT_EQ(objects.size(), 3u);
  ASSERT_TRUE(server_->Stop().ok());

  // Restore the backup.
  MoveDatabase(db, db + ".newer");
  fs::copy_file(db + ".backup", db);
  RestartAndReconcile();
  EXPECT_EQ(KeyObjects(), objects) << "an object was destroyed";
  const std::string log = ReadAll(server_->log_path());
  EXPECT_THAT(log, HasSubstr("quarantined, NOT destroyed"));
  EXPECT_THAT(LastSummary(), HasSubstr("; 2 quarantined;"));
  EXPECT_THAT(log, HasSubstr("destroying nothing"));  // 2 of 3 unclaimed
  EXPECT_THAT(AllAuditText(), HasSubstr("\"QuarantineHsmObjects\""));
  EXPECT_TRUE(Decrypt(old_blob).ok());
  EXPECT_FALSE(Decrypt(new_blob).ok());  // its key is unknown here

  // The operator's view, while custosd runs and once stopped.
  ProcessResult listed =
      HsmTool({"--config", server_->config_path(), "quarantine", "list"});
  EXPECT_EQ(listed.code, 0) << listed;
  EXPECT_THAT(listed.out, HasSubstr("2 quarantined object(s)"));
  ProcessResult busy = HsmTool({"--config", server_->config_path(),
                                "quarantine", "destroy", "--id", objects[0]});
  EXPECT_NE(busy.code, 0) << busy;
  EXPECT_THAT(busy.err, HasSubstr("stop custosd"));
  ASSERT_TRUE(server_->Stop().ok());

  // The newer database back: everything decrypts, nothing is quarantined.
  fs::remove(db);
  MoveDatabase(db + ".newer", db);
  RestartAndReconcile();
  EXPECT_EQ(KeyObjects(), objects);
  EXPECT_TRUE(Decrypt(old_blob).ok());
  EXPECT_TRUE(Decrypt(new_blob).ok());
  EXPECT_TRUE(Decrypt(old_key_v2_blob).ok());
  EXPECT_THAT(LastSummary(), HasSubstr("; 0 quarantined;"));
  ProcessResult verified = server_->VerifyAuditLog();
  EXPECT_EQ(verified.code, 0) << verified;
}

TEST_F(OperatorSlipE2eTest, OperatorDestroysOneQuarantinedObjectByName) {
  const std::string key = NewKey();
  pb::GenerateDataKeyResponse blob = DataKey(key);
  // An object made outside custosd, with a Custos label: no row names it.
  ProcessResult made = HsmTool({"--token", "custos", "--pin-file",
                                server_->pin_file(), "generate-key", "--label",
                                "custos:k-strayaaaaaaaaaaaaaaaaaaaaa:v1"});
  ASSERT_EQ(made.code, 0) << made;
  const std::string stray(absl::StripTrailingAsciiWhitespace(made.out));
  ASSERT_TRUE(server_->Stop().ok());
  RestartAndReconcile();
  EXPECT_THAT(KeyObjects(), ::testing::Contains(stray));
  ASSERT_TRUE(server_->Stop().ok());

  ProcessResult listed =
      HsmTool({"--config", server_->config_path(), "quarantine", "list"});
  EXPECT_EQ(listed.code, 0) << listed;
  EXPECT_THAT(listed.out, HasSubstr(stray));
  EXPECT_THAT(listed.out, HasSubstr("1 quarantined object(s)"));
  // A live key's object is not quarantined, and is refused by name.
  const std::vector<std::string> objects = KeyObjects();
  for (const std::string& id : objects) {
    if (id == stray) continue;
    ProcessResult refused = HsmTool({"--config", server_->config_path(),
                                     "quarantine", "destroy", "--id", id});
    EXPECT_NE(refused.code, 0) << refused;
    EXPECT_THAT(refused.err, HasSubstr("not quarantined"));
  }
  ProcessResult destroyed = HsmTool({"--config", server_->config_path(),
                                     "quarantine", "destroy", "--id", stray});
  EXPECT_EQ(destroyed.code, 0) << destroyed;
  EXPECT_THAT(KeyObjects(), ::testing::Not(::testing::Contains(stray)));
  const std::string audit = AllAuditText();
  EXPECT_THAT(audit, HasSubstr("\"DestroyQuarantinedHsmObject\""));
  EXPECT_THAT(audit, HasSubstr(stray));
  EXPECT_THAT(audit, HasSubstr("custos:operator:"));
  ProcessResult verified = server_->VerifyAuditLog();
  EXPECT_EQ(verified.code, 0) << verified;
  ASSERT_TRUE(server_->Restart().ok());
  EXPECT_TRUE(Decrypt(blob).ok());
}

// The signing key deleted behind custosd's back (pkcs11-tool, as anyone
// with the PIN could): custosd does not start, and --init does not make a
// new key for a node whose audit log exists. custos-hsmtool refuses to
// destroy Custos objects at all.
TEST_F(OperatorSlipE2eTest, LostAuditSigningKeyStopsStartUp) {
  ASSERT_TRUE(server_->Stop().ok());
  ProcessResult list =
      HsmTool({"--token", "custos", "--pin-file", server_->pin_file(), "list"});
  ASSERT_EQ(list.code, 0) << list;
  std::string signer;
  for (absl::string_view line : absl::StrSplit(list.out, '\n')) {
    if (absl::StrContains(line, "custos:audit:")) {
      signer = std::string(line.substr(0, line.find(' ')));
    }
  }
  ASSERT_FALSE(signer.empty()) << list.out;
  ProcessResult refused =
      HsmTool({"--token", "custos", "--pin-file", server_->pin_file(),
               "destroy", "--id", signer});
  EXPECT_NE(refused.code, 0) << refused;
  EXPECT_THAT(refused.err, HasSubstr("is Custos's"));

  const std::string pin(
      absl::StripTrailingAsciiWhitespace(ReadAll(server_->pin_file())));
  for (const char* type : {"privkey", "pubkey"}) {
    testing::CommandResult deleted = testing::RunCommand(absl::StrCat(
        "SOFTHSM2_CONF=", server_->softhsm_conf(),
        " pkcs11-tool --module /usr/lib/softhsm/libsofthsm2.so --token-label "
        "custos --login --pin ",
        pin, " --delete-object --type ", type, " --id ", signer));
    ASSERT_EQ(deleted.exit_code, 0) << deleted.output;
  }
  ProcessResult start = server_->StartExpectingFailure();
  EXPECT_EQ(start.code, 1) << start;
  EXPECT_THAT(start.err, HasSubstr("no checkpoint signing key"));
  ProcessResult init = server_->RunCustosd({"--init"});
  EXPECT_EQ(init.code, 1) << init;
  EXPECT_THAT(init.err, HasSubstr("its checkpoint signing key is gone"));
  ProcessResult still = server_->StartExpectingFailure();
  EXPECT_THAT(still.err, HasSubstr("no checkpoint signing key"));
}

}  // namespace
}  // namespace custos
