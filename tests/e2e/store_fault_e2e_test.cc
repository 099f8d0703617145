// Storage and audit faults end to end (docs/security.md, "Faults every release
// survives"): a real custosd over mutual TLS whose SQLite database or
// audit directory sits on a file system the test controls.
//
// Database full (a small tmpfs, filled), read-only (an ext4 volume that goes
// read-only under the running server, as errors=remount-ro does after an I/O
// error) and busy (another connection holds the write lock): every admin
// change fails with UNAVAILABLE and a message that names the database and
// holds no secret, leaves a FAILED audit record, and leaves the key exactly
// as it was, in memory (GetKey), in the database and after a restart; keys
// keep serving data keys from the cache; once the fault clears the same
// changes succeed (without a restart, where the file system allows it) and
// persist. A key's state is never reported as one thing while the database
// holds another, and a state custosd does not know stops it from starting.
//
// Audit directory full, unwritable (immutable) and read-only: every call,
// cryptographic or administrative, is refused with UNAVAILABLE, no data key
// or random byte leaves the server, no change is applied, custosd keeps
// running, and it resumes once the directory is writable again; the chain
// then verifies with its signed checkpoints.
//
// Why not `mount -o remount,ro` of a tmpfs: the kernel refuses (EBUSY) to
// make a file system read-only while a process holds files on it open for
// writing, as custosd does with its database and audit segment. The
// read-only cases therefore use ext4's errors=remount-ro, the way a volume
// really turns read-only under a running server; it stays read-only until
// it is mounted again, which needs custosd to let go of it (a restart).
//
// Runs as root (tmpfs and loop mounts, chattr; mkfs.ext4 and e2fsck from
// e2fsprogs); skips, saying why, where the kernel does not allow a mount.
#include <errno.h>
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <linux/fs.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "custos/v1/kms.grpc.pb.h"
#include "kms/audit/audit_verifier.h"
#include "nlohmann/json.hpp"
#include "tests/support/audit_records.h"
#include "tests/support/custosd_process.h"
#include "tests/support/subprocess.h"
#include "tests/support/test_token.h"

namespace custos {
namespace {

namespace fs = std::filesystem;
namespace pb = ::custos::v1;
using ::custos::testing::CustosdProcess;
using ::custos::testing::ProcessResult;
using ::custos::testing::ReadRecords;
using ::custos::testing::StringField;
using ::testing::HasSubstr;
using Code = grpc::StatusCode;
using Json = nlohmann::json;

using ::custos::testing::ReadAll;

std::string CodeName(Code code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

// A deadline for every call: long enough for the store's busy timeout.
void SetDeadline(grpc::ClientContext* ctx) {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::seconds(60));
}

// Writes `path` until its file system is full (ENOSPC).
void Fill(const std::string& path) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0) << path << ": " << std::strerror(errno);
  const std::string chunk(64 * 1024, 'f');
  while (write(fd, chunk.data(), chunk.size()) ==
         static_cast<ssize_t>(chunk.size())) {
  }
  // Byte by byte into the last page.
  while (write(fd, "f", 1) == 1) {
  }
  const int error = errno;
  close(fd);
  ASSERT_EQ(error, ENOSPC) << std::strerror(error);
}

// Sets or clears the immutable attribute (chattr +i): not even root may
// then create, remove or rename entries of a directory.
absl::Status SetImmutable(const std::string& path, bool on) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::InternalError(path + ": " + std::strerror(errno));
  int flags = 0;
  int rc = ioctl(fd, FS_IOC_GETFLAGS, &flags);
  if (rc == 0) {
    flags = on ? (flags | FS_IMMUTABLE_FL) : (flags & ~FS_IMMUTABLE_FL);
    rc = ioctl(fd, FS_IOC_SETFLAGS, &flags);
  }
  const int error = errno;
  close(fd);
  if (rc != 0) {
    return absl::InternalError(
        absl::StrCat("chattr ", path, ": ", std::strerror(error)));
  }
  return absl::OkStatus();
}

// The device a mount point is mounted from (/proc/self/mountinfo).
std::string MountSource(const std::string& dir) {
  std::istringstream in(ReadAll("/proc/self/mountinfo"));
  std::string line;
  std::string source;
  while (std::getline(in, line)) {
    std::vector<std::string> f = absl::StrSplit(line, ' ');
    if (f.size() < 5 || f[4] != dir) continue;
    auto dash = std::find(f.begin(), f.end(), "-");
    if (dash != f.end() && dash + 2 < f.end()) source = *(dash + 2);
  }
  return source;  // the last mount on `dir` is the visible one
}

// Whether process `pid` runs (and is not a zombie).
bool Alive(pid_t pid) {
  const std::string stat = ReadAll(absl::StrCat("/proc/", pid, "/stat"));
  size_t paren = stat.rfind(')');
  return paren != std::string::npos && paren + 2 < stat.size() &&
         stat[paren + 2] != 'Z';
}

// An open SQLite connection, closed on destruction.
struct Db {
  sqlite3* db = nullptr;
  ~Db() { sqlite3_close(db); }
};

// Holds the database's write lock from another connection (BEGIN
// EXCLUSIVE), as a second writer or a backup tool would.
class DatabaseLock {
 public:
  explicit DatabaseLock(const std::string& path) {
    sqlite3_open_v2(path.c_str(), &db_.db, SQLITE_OPEN_READWRITE, nullptr);
  }
  absl::Status Hold() {
    char* err = nullptr;
    int rc = sqlite3_exec(db_.db,
                          "PRAGMA busy_timeout=10000; BEGIN EXCLUSIVE; "
                          "SELECT count(*) FROM keys;",
                          nullptr, nullptr, &err);
    std::string msg = err ? err : "";
    sqlite3_free(err);
    if (rc != SQLITE_OK) return absl::InternalError("BEGIN EXCLUSIVE: " + msg);
    held_ = true;
    return absl::OkStatus();
  }
  void Release() {
    if (held_) sqlite3_exec(db_.db, "ROLLBACK", nullptr, nullptr, nullptr);
    held_ = false;
  }
  ~DatabaseLock() { Release(); }

 private:
  Db db_;
  bool held_ = false;
};

// What the database itself holds for a key, read with a connection of the
// test's own: "state=N primary=M versions=K", or an error text.
std::string Stored(const std::string& db_path, const std::string& key_id) {
  Db db;
  if (sqlite3_open_v2(db_path.c_str(), &db.db, SQLITE_OPEN_READONLY, nullptr) !=
      SQLITE_OK) {
    return "cannot open the database";
  }
  sqlite3_busy_timeout(db.db, 10000);
  sqlite3_stmt* q = nullptr;
  sqlite3_prepare_v2(db.db,
                     "SELECT state, primary_version, (SELECT count(*) FROM "
                     "key_versions WHERE key_id = keys.id) FROM keys WHERE "
                     "id = ?",
                     -1, &q, nullptr);
  sqlite3_bind_text(q, 1, key_id.c_str(), -1, SQLITE_TRANSIENT);
  std::string out;
  int rc = sqlite3_step(q);
  if (rc == SQLITE_ROW) {
    out = absl::StrCat("state=", sqlite3_column_int(q, 0),
                       " primary=", sqlite3_column_int(q, 1),
                       " versions=", sqlite3_column_int(q, 2));
  } else {
    out = absl::StrCat("no row (", sqlite3_errmsg(db.db), ")");
  }
  sqlite3_finalize(q);
  return out;
}

// Changes a key's stored state behind custosd's back (custosd stopped).
absl::Status WriteStoredState(const std::string& db_path,
                              const std::string& key_id, int state) {
  Db db;
  if (sqlite3_open_v2(db_path.c_str(), &db.db, SQLITE_OPEN_READWRITE,
                      nullptr) != SQLITE_OK) {
    return absl::InternalError("cannot open the database");
  }
  const std::string sql = absl::StrCat("UPDATE keys SET state = ", state,
                                       " WHERE id = '", key_id, "'");
  if (sqlite3_exec(db.db, sql.c_str(), nullptr, nullptr, nullptr) !=
          SQLITE_OK ||
      sqlite3_changes(db.db) != 1) {
    return absl::InternalError(sqlite3_errmsg(db.db));
  }
  return absl::OkStatus();
}

// The checkpoint public keys custosd exported next to the segments.
std::vector<std::string> PublicKeys(const std::string& dir) {
  std::vector<std::string> pems;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (absl::StartsWith(name, "audit-public-key-") &&
        absl::EndsWith(name, ".pem")) {
      pems.push_back(ReadAll(e.path().string()));
    }
  }
  return pems;
}

// A key the scenarios change, and what it had before the fault.
struct Subject {
  std::string key;
  std::string alias;                 // names `key`; DeleteAlias removes it
  std::string new_alias;             // CreateAlias adds it
  pb::GenerateDataKeyResponse warm;  // a data key issued before the fault
};

// What the service says about a key and its surroundings; equal before and
// after a failed change when nothing of it was applied.
struct Snapshot {
  std::string key;      // GetKey and GetKeyPolicy, every field that matters
  int keys = -1;        // ListKeys
  std::string aliases;  // ListAliases, all of them
  size_t hsm_objects = 0;
};

// One admin RPC against the subject, named as the audit log names it.
struct AdminOp {
  std::string rpc;
  std::function<grpc::Status(const Subject&)> call;
};

class StoreFaultE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::string> dir = testing::MakeTempDir("custos-sf");
    ASSERT_TRUE(dir.ok()) << dir.status();
    scratch_ = *dir;
  }

  void TearDown() override {
    server_.reset();  // custosd lets go of the files first
    for (const std::string& path : immutable_) {
      SetImmutable(path, false).IgnoreError();
    }
    for (auto it = mounts_.rbegin(); it != mounts_.rend(); ++it) {
      if (umount2(it->c_str(), 0) != 0) {
        ADD_FAILURE() << "umount " << *it << ": " << std::strerror(errno)
                      << "; detaching it";
        umount2(it->c_str(), MNT_DETACH);
      }
    }
    std::error_code ec;
    if (!scratch_.empty()) fs::remove_all(scratch_, ec);
  }

  // --- file systems -------------------------------------------------------

  // A tmpfs of `size` (mount's syntax, e.g. "2m") on a new directory,
  // `*out`. Skips the test if the kernel does not allow the mount.
  void MountTmpfs(const std::string& name, const std::string& size,
                  std::string* out) {
    const std::string dir = scratch_ + "/" + name;
    fs::create_directory(dir);
    const std::string options = "size=" + size + ",mode=0700";
    if (mount("tmpfs", dir.c_str(), "tmpfs", 0, options.c_str()) != 0) {
      const int error = errno;
      if (error == EPERM) {
        GTEST_SKIP() << "cannot mount a tmpfs: this test needs root (or "
                        "CAP_SYS_ADMIN): "
                     << std::strerror(error);
      }
      FAIL() << "mount tmpfs on " << dir << ": " << std::strerror(error);
    }
    mounts_.push_back(dir);
    *out = dir;
  }

  // An ext4 file system in a 16 MiB image file, on a loop device, mounted
  // with errors=remount-ro on a new directory, `*out`.
  void MountExt4(const std::string& name, std::string* out) {
    const std::string dir = scratch_ + "/" + name;
    const std::string image = scratch_ + "/" + name + ".img";
    fs::create_directory(dir);
    { std::ofstream create(image, std::ios::binary); }
    fs::resize_file(image, 16 << 20);
    testing::CommandResult made = testing::RunCommand(
        "mkfs.ext4 -q -F -O ^has_journal " + image + " 2>&1");
    if (made.exit_code != 0) {
      GTEST_SKIP() << "cannot make an ext4 file system (mkfs.ext4 from "
                      "e2fsprogs): "
                   << made.output;
    }
    images_[dir] = image;
    MountImage(dir);
    *out = dir;
  }

  void MountImage(const std::string& dir) {
    testing::CommandResult mounted =
        testing::RunCommand("mount -t ext4 -o loop,errors=remount-ro " +
                            images_[dir] + " " + dir + " 2>&1");
    if (mounted.exit_code != 0) {
      if (absl::StrContains(mounted.output, "permission denied") ||
          absl::StrContains(mounted.output, "must be superuser") ||
          absl::StrContains(mounted.output, "failed to setup loop device")) {
        GTEST_SKIP() << "cannot mount an image on a loop device (needs root "
                        "and /dev/loop-control): "
                     << mounted.output;
      }
      ADD_FAILURE() << "mount -o loop " << dir << ": " << mounted.output;
      return;
    }
    mounts_.push_back(dir);
  }

  // Makes the ext4 volume on `dir` read-only under the running custosd. A
  // plain read-only remount is refused while files are open for writing
  // (EBUSY); an ext4 error with errors=remount-ro is not (the sysfs
  // trigger_fs_error raises one, as an I/O error would). Checks that the
  // volume refuses writes afterwards.
  void ForceReadOnly(const std::string& dir) {
    if (mount(nullptr, dir.c_str(), nullptr, MS_REMOUNT | MS_RDONLY, nullptr) !=
        0) {
      ASSERT_EQ(errno, EBUSY) << std::strerror(errno);
      const std::string device = fs::path(MountSource(dir)).filename();
      ASSERT_FALSE(device.empty()) << "no device mounted on " << dir;
      const std::string trigger =
          "/sys/fs/ext4/" + device + "/trigger_fs_error";
      if (!fs::exists(trigger)) {
        GTEST_SKIP() << "this kernel has no " << trigger;
      }
      std::ofstream out(trigger);
      out << "custos store_fault_e2e_test: volume made read-only on purpose";
      out.close();
      ASSERT_TRUE(out.good()) << "writing " << trigger;
    }
    int fd =
        open((dir + "/probe").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    const int error = errno;
    if (fd >= 0) close(fd);
    ASSERT_LT(fd, 0) << dir << " still accepts new files";
    ASSERT_EQ(error, EROFS) << std::strerror(error);
  }

  // Unmounts the volume on `dir` and mounts it again, writable (custosd
  // must be stopped): what an operator does after repairing it.
  void Remount(const std::string& dir) {
    ASSERT_FALSE(server_->running());
    ASSERT_EQ(umount2(dir.c_str(), 0), 0) << std::strerror(errno);
    mounts_.erase(std::remove(mounts_.begin(), mounts_.end(), dir),
                  mounts_.end());
    testing::CommandResult checked =
        testing::RunCommand("e2fsck -f -y " + images_[dir] + " 2>&1");
    EXPECT_LE(checked.exit_code, 1) << checked.output;  // 1: errors fixed
    MountImage(dir);
  }

  void MakeImmutable(const std::string& path) {
    absl::Status s = SetImmutable(path, true);
    if (!s.ok()) GTEST_SKIP() << "cannot make a directory immutable: " << s;
    immutable_.push_back(path);
  }
  void MakeMutable(const std::string& path) {
    ASSERT_TRUE(SetImmutable(path, false).ok());
    immutable_.erase(std::remove(immutable_.begin(), immutable_.end(), path),
                     immutable_.end());
  }

  // --- the server ---------------------------------------------------------

  void StartServer(const std::string& storage_dir, const std::string& audit_dir,
                   const std::string& extra_config = "") {
    CustosdProcess::Options options;
    options.storage_dir = storage_dir;
    options.audit_dir = audit_dir;
    options.extra_config = extra_config;
    auto server = CustosdProcess::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    secrets_.push_back(ReadAll(server_->pin_file()));
    secrets_.push_back(ReadAll(server_->dir() + "/so.pin"));
    for (std::string& s : secrets_) {
      while (!s.empty() && s.back() == '\n') s.pop_back();
    }
  }

  std::unique_ptr<pb::KeyManagementService::Stub> Kms() {
    return pb::KeyManagementService::NewStub(server_->Channel("admin"));
  }
  std::unique_ptr<pb::CryptoService::Stub> Crypto() {
    return pb::CryptoService::NewStub(server_->Channel("service-a"));
  }

  grpc::Status DataKey(const std::string& key,
                       pb::GenerateDataKeyResponse* resp) {
    pb::GenerateDataKeyRequest req;
    req.set_key(key);
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    grpc::Status s = Crypto()->GenerateDataKey(&ctx, req, resp);
    if (s.ok()) secrets_.push_back(resp->plaintext());
    return s;
  }
  grpc::Status Decrypt(const std::string& blob, pb::DecryptResponse* resp) {
    pb::DecryptRequest req;
    req.set_ciphertext_blob(blob);
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    return Crypto()->Decrypt(&ctx, req, resp);
  }
  grpc::Status GetKey(const std::string& key, pb::Key* out) {
    pb::GetKeyRequest req;
    req.set_key(key);
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    return Kms()->GetKey(&ctx, req, out);
  }
  pb::KeyState State(const std::string& key) {
    pb::Key k;
    grpc::Status s = GetKey(key, &k);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return k.state();
  }

  // A key that service-a may use, with an alias, and a data key issued
  // under it (which also reserves its version's first block of
  // encryptions, so that further data keys need no database write).
  Subject MakeSubject(const std::string& name) {
    Subject s;
    absl::StatusOr<std::string> key = server_->CreateKeyFor(
        "service-a", {pb::GENERATE_DATA_KEY, pb::ENCRYPT, pb::DECRYPT});
    EXPECT_TRUE(key.ok()) << key.status();
    s.key = key.value_or("");
    s.alias = "alias/" + name;
    s.new_alias = "alias/" + name + "-new";
    pb::CreateAliasRequest req;
    req.set_alias(s.alias);
    req.set_key(s.key);
    pb::Alias alias;
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    grpc::Status made = Kms()->CreateAlias(&ctx, req, &alias);
    EXPECT_TRUE(made.ok()) << made.error_message();
    grpc::Status warm = DataKey(s.key, &s.warm);
    EXPECT_TRUE(warm.ok()) << warm.error_message();
    return s;
  }

  // A data key under the subject, so that this process has reserved
  // encryptions (a restart starts from a fresh reservation).
  void Warm(const Subject& s) {
    pb::GenerateDataKeyResponse dk;
    grpc::Status st = DataKey(s.key, &dk);
    ASSERT_TRUE(st.ok()) << st.error_message();
  }

  // Key objects on the token (custos-hsmtool list).
  size_t HsmObjects() {
    std::vector<std::string> env = testing::EnvironmentWithout("SOFTHSM2_");
    env.push_back("SOFTHSM2_CONF=" + server_->softhsm_conf());
    ProcessResult r = testing::RunProcess(
        {testing::BinDir() + "/custos-hsmtool", "--token", "custos",
         "--pin-file", server_->pin_file(), "list"},
        env, "/dev/null", server_->dir() + "/hsmtool");
    EXPECT_EQ(r.code, 0) << r;
    // Objects whose generate-intent never became a version (a create
    // refused because the audit log could not record it) are not live
    // material: the reconciler claims and destroys them later.
    testing::CommandResult intents = testing::RunCommand(
        "sqlite3 -readonly " + server_->database_path() +
        " 'SELECT lower(hex(hsm_id)) FROM material_intents'");
    size_t n = 0;
    for (absl::string_view line : absl::StrSplit(r.out, '\n')) {
      if (!absl::StrContains(line, "custos:k-")) continue;
      const std::string id(line.substr(0, line.find(' ')));
      if (!absl::StrContains(intents.output, id)) ++n;
    }
    return n;
  }

  Snapshot Take(const Subject& s) {
    Snapshot snap;
    pb::Key k;
    grpc::Status st = GetKey(s.key, &k);
    EXPECT_TRUE(st.ok()) << st.error_message();
    pb::GetKeyPolicyRequest preq;
    preq.set_key(s.key);
    pb::KeyPolicy policy;
    grpc::ClientContext pctx;
    SetDeadline(&pctx);
    st = Kms()->GetKeyPolicy(&pctx, preq, &policy);
    EXPECT_TRUE(st.ok()) << st.error_message();
    std::vector<std::string> aliases(k.aliases().begin(), k.aliases().end());
    std::sort(aliases.begin(), aliases.end());
    snap.key = absl::StrCat(
        "state=", pb::KeyState_Name(k.state()),
        " primary=", k.primary_version(), " description='", k.description(),
        "' update=", k.update_time().seconds(), ".", k.update_time().nanos(),
        " deletion=", k.deletion_time().seconds(), " aliases=[",
        absl::StrJoin(aliases, ","), "] policy_version=", policy.version(),
        " bindings=", policy.bindings_size(), " versions=[");
    for (const pb::KeyVersion& v : k.versions()) {
      absl::StrAppend(&snap.key, v.version(), ":",
                      pb::KeyVersionState_Name(v.state()), ":", v.encryptions(),
                      " ");
    }
    snap.key += "]";
    pb::ListKeysRequest lreq;
    lreq.set_page_size(1000);
    pb::ListKeysResponse listed;
    grpc::ClientContext lctx;
    SetDeadline(&lctx);
    st = Kms()->ListKeys(&lctx, lreq, &listed);
    EXPECT_TRUE(st.ok()) << st.error_message();
    snap.keys = listed.keys_size();
    pb::ListAliasesResponse all;
    grpc::ClientContext actx;
    SetDeadline(&actx);
    st = Kms()->ListAliases(&actx, pb::ListAliasesRequest(), &all);
    EXPECT_TRUE(st.ok()) << st.error_message();
    std::vector<std::string> names;
    for (const pb::Alias& a : all.aliases()) {
      names.push_back(a.name() + "->" + a.key_id());
    }
    snap.aliases = absl::StrJoin(names, ",");
    snap.hsm_objects = HsmObjects();
    return snap;
  }

  static void ExpectSame(const Snapshot& want, const Snapshot& got,
                         const std::string& when) {
    EXPECT_EQ(got.key, want.key) << when;
    EXPECT_EQ(got.keys, want.keys) << when << ": no key was added";
    EXPECT_EQ(got.aliases, want.aliases) << when;
    EXPECT_EQ(got.hsm_objects, want.hsm_objects)
        << when << ": no live HSM object was added";
  }

  // The admin changes, in an order in which all of them can succeed.
  std::vector<AdminOp> Ops() {
    std::vector<AdminOp> ops;
    ops.push_back({"UpdateKey", [this](const Subject& s) {
                     pb::UpdateKeyRequest req;
                     req.set_key(s.key);
                     req.add_update_mask("description");
                     req.set_description("changed");
                     pb::Key out;
                     grpc::ClientContext ctx;
                     SetDeadline(&ctx);
                     return Kms()->UpdateKey(&ctx, req, &out);
                   }});
    ops.push_back({"SetKeyPolicy", [this](const Subject& s) {
                     pb::SetKeyPolicyRequest req;
                     req.set_key(s.key);
                     pb::PolicyBinding* a =
                         req.mutable_policy()->add_bindings();
                     a->add_principals(CustosdProcess::Principal("service-a"));
                     a->add_operations(pb::GENERATE_DATA_KEY);
                     a->add_operations(pb::ENCRYPT);
                     a->add_operations(pb::DECRYPT);
                     pb::PolicyBinding* b =
                         req.mutable_policy()->add_bindings();
                     b->add_principals(CustosdProcess::Principal("service-b"));
                     b->add_operations(pb::DECRYPT);
                     pb::KeyPolicy out;
                     grpc::ClientContext ctx;
                     SetDeadline(&ctx);
                     return Kms()->SetKeyPolicy(&ctx, req, &out);
                   }});
    ops.push_back({"CreateAlias", [this](const Subject& s) {
                     pb::CreateAliasRequest req;
                     req.set_alias(s.new_alias);
                     req.set_key(s.key);
                     pb::Alias out;
                     grpc::ClientContext ctx;
                     SetDeadline(&ctx);
                     return Kms()->CreateAlias(&ctx, req, &out);
                   }});
    ops.push_back({"DeleteAlias", [this](const Subject& s) {
                     pb::DeleteAliasRequest req;
                     req.set_alias(s.alias);
                     google::protobuf::Empty out;
                     grpc::ClientContext ctx;
                     SetDeadline(&ctx);
                     return Kms()->DeleteAlias(&ctx, req, &out);
                   }});
    ops.push_back({"RotateKey", [this](const Subject& s) {
                     pb::RotateKeyRequest req;
                     req.set_key(s.key);
                     pb::Key out;
                     grpc::ClientContext ctx;
                     SetDeadline(&ctx);
                     return Kms()->RotateKey(&ctx, req, &out);
                   }});
    ops.push_back({"DisableKey", [this](const Subject& s) {
                     pb::DisableKeyRequest req;
                     req.set_key(s.key);
                     pb::Key out;
                     grpc::ClientContext ctx;
                     SetDeadline(&ctx);
                     return Kms()->DisableKey(&ctx, req, &out);
                   }});
    ops.push_back({"ScheduleKeyDeletion", [this](const Subject& s) {
                     pb::ScheduleKeyDeletionRequest req;
                     req.set_key(s.key);
                     req.set_pending_window_days(7);
                     pb::Key out;
                     grpc::ClientContext ctx;
                     SetDeadline(&ctx);
                     return Kms()->ScheduleKeyDeletion(&ctx, req, &out);
                   }});
    ops.push_back({"CreateKey", [this](const Subject&) {
                     pb::CreateKeyRequest req;
                     req.set_description("made during a fault");
                     pb::PolicyBinding* b =
                         req.mutable_policy()->add_bindings();
                     b->add_principals(CustosdProcess::Principal("service-a"));
                     b->add_operations(pb::GENERATE_DATA_KEY);
                     pb::Key out;
                     grpc::ClientContext ctx;
                     SetDeadline(&ctx);
                     return Kms()->CreateKey(&ctx, req, &out);
                   }});
    return ops;
  }

  AdminOp Op(const std::string& rpc) {
    for (AdminOp& op : Ops()) {
      if (op.rpc == rpc) return op;
    }
    ADD_FAILURE() << "no op " << rpc;
    return {};
  }

  // Request records (checkpoints left out) in the audit directory.
  std::vector<Json> RequestRecords() {
    std::vector<Json> out;
    for (Json& r : ReadRecords(server_->audit_dir())) {
      if (StringField(r, "operation") != "Checkpoint")
        out.push_back(std::move(r));
    }
    return out;
  }

  // A refusal that says what failed (`cause`) and holds no secret: no PIN,
  // no data key issued in this test.
  void ExpectClearUnavailable(const grpc::Status& s, const std::string& what,
                              const std::string& cause) {
    EXPECT_EQ(s.error_code(), Code::UNAVAILABLE)
        << what << ": " << CodeName(s.error_code()) << " " << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(cause)) << what;
    for (const std::string& secret : secrets_) {
      if (secret.empty()) continue;
      EXPECT_FALSE(absl::StrContains(s.error_message(), secret))
          << what << " leaks a secret in its message";
    }
  }

  // The records a failed admin call left (from `before` on): its last is
  // FAILED with the reply's code; one before it, if any, is the success
  // record written ahead of a commit that then did not happen, and the
  // FAILED record says so.
  void ExpectFailureRecorded(const std::string& rpc, const grpc::Status& s,
                             size_t before) {
    std::vector<Json> records = RequestRecords();
    ASSERT_GT(records.size(), before) << rpc << " left no audit record";
    std::vector<Json> added(records.begin() + before, records.end());
    ASSERT_LE(added.size(), 2u) << rpc;
    const Json& last = added.back();
    EXPECT_EQ(StringField(last, "operation"), rpc) << last.dump();
    EXPECT_EQ(StringField(last, "outcome"), "FAILED") << last.dump();
    EXPECT_EQ(StringField(last, "code"), CodeName(s.error_code()))
        << last.dump();
    if (added.size() == 2) {
      EXPECT_EQ(StringField(added[0], "operation"), rpc) << added[0].dump();
      EXPECT_EQ(StringField(added[0], "outcome"), "ALLOWED") << added[0].dump();
      EXPECT_THAT(StringField(last, "detail"), HasSubstr("was not applied"))
          << last.dump();
    }
  }

  // Every admin change fails cleanly under a store fault and leaves the
  // subject exactly as `before`.
  void ExpectEveryAdminChangeFails(const Subject& s, const Snapshot& before,
                                   const std::string& cause) {
    for (const AdminOp& op : Ops()) {
      SCOPED_TRACE(op.rpc);
      const size_t records = RequestRecords().size();
      grpc::Status st = op.call(s);
      ExpectClearUnavailable(st, op.rpc, cause);
      ExpectFailureRecorded(op.rpc, st, records);
      ExpectSame(before, Take(s), "after a failed " + op.rpc);
      // The cache and the database agree: still ENABLED, one version.
      EXPECT_EQ(State(s.key), pb::ENABLED);
      EXPECT_EQ(Stored(server_->database_path(), s.key),
                "state=1 primary=1 versions=1");
    }
  }

  // Every admin change succeeds, and together they leave the subject as
  // expected.
  void ExpectEveryAdminChangeSucceeds(const Subject& s, const Snapshot& old) {
    for (const AdminOp& op : Ops()) {
      grpc::Status st = op.call(s);
      EXPECT_TRUE(st.ok()) << op.rpc << ": " << CodeName(st.error_code()) << " "
                           << st.error_message();
    }
    pb::Key k;
    ASSERT_TRUE(GetKey(s.key, &k).ok());
    EXPECT_EQ(k.state(), pb::PENDING_DELETION);
    EXPECT_EQ(k.primary_version(), 2u);
    EXPECT_EQ(k.versions_size(), 2);
    EXPECT_EQ(k.description(), "changed");
    EXPECT_THAT(k.aliases(), ::testing::ElementsAre(s.new_alias));
    Snapshot now = Take(s);
    EXPECT_THAT(now.key, HasSubstr("policy_version=2 bindings=2"));
    EXPECT_EQ(now.keys, old.keys + 1);
    EXPECT_EQ(now.hsm_objects, old.hsm_objects + 2);
    EXPECT_EQ(Stored(server_->database_path(), s.key),
              "state=3 primary=2 versions=2");
  }

  // Data keys come from the cache: the old primary still serves new ones
  // and the data key issued before the fault still opens.
  void ExpectServedFromCache(const Subject& s) {
    pb::DecryptResponse opened;
    grpc::Status st = Decrypt(s.warm.ciphertext_blob(), &opened);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(opened.plaintext(), s.warm.plaintext());
    pb::GenerateDataKeyResponse fresh;
    st = DataKey(s.key, &fresh);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(fresh.key_version(), 1u);
    EXPECT_EQ(fresh.plaintext().size(), 32u);
    pb::DecryptResponse again;
    ASSERT_TRUE(Decrypt(fresh.ciphertext_blob(), &again).ok());
    EXPECT_EQ(again.plaintext(), fresh.plaintext());
  }

  // Every call, cryptographic or administrative, is refused because the
  // audit log cannot record it; nothing is released and none is recorded.
  void ExpectEveryCallRefused(const Subject& s) {
    const size_t records = RequestRecords().size();
    const std::string cause = "audit log";
    {
      pb::GenerateDataKeyRequest req;
      req.set_key(s.key);
      pb::GenerateDataKeyResponse resp;
      grpc::ClientContext ctx;
      SetDeadline(&ctx);
      grpc::Status st = Crypto()->GenerateDataKey(&ctx, req, &resp);
      ExpectClearUnavailable(st, "GenerateDataKey", cause);
      EXPECT_TRUE(resp.plaintext().empty());
      EXPECT_TRUE(resp.ciphertext_blob().empty());
    }
    {
      pb::EncryptRequest req;
      req.set_key(s.key);
      req.set_plaintext("attack at dawn");
      pb::EncryptResponse resp;
      grpc::ClientContext ctx;
      SetDeadline(&ctx);
      grpc::Status st = Crypto()->Encrypt(&ctx, req, &resp);
      ExpectClearUnavailable(st, "Encrypt", cause);
      EXPECT_TRUE(resp.ciphertext_blob().empty());
    }
    {
      pb::DecryptResponse resp;
      grpc::Status st = Decrypt(s.warm.ciphertext_blob(), &resp);
      ExpectClearUnavailable(st, "Decrypt", cause);
      EXPECT_TRUE(resp.plaintext().empty());
    }
    {
      pb::GenerateRandomRequest req;
      req.set_number_of_bytes(32);
      pb::GenerateRandomResponse resp;
      grpc::ClientContext ctx;
      SetDeadline(&ctx);
      grpc::Status st = Crypto()->GenerateRandom(&ctx, req, &resp);
      ExpectClearUnavailable(st, "GenerateRandom", cause);
      EXPECT_TRUE(resp.random().empty());
    }
    {
      pb::Key k;
      grpc::Status st = GetKey(s.key, &k);
      ExpectClearUnavailable(st, "GetKey", cause);
      EXPECT_TRUE(k.key_id().empty());
    }
    for (const AdminOp& op : Ops()) {
      ExpectClearUnavailable(op.call(s), op.rpc, cause);
    }
    EXPECT_EQ(RequestRecords().size(), records)
        << "a refused call left a record: then it should have been served";
    EXPECT_TRUE(Alive(server_->pid())) << "custosd must keep running";
    // And it tells the operator why.
    EXPECT_THAT(ReadAll(server_->log_path()),
                HasSubstr("requests are refused until it is writable"));
  }

  // Bounded wait for the audit log to take records again.
  void WaitUntilServing(const Subject& s) {
    for (int i = 0; i < 50; ++i) {
      pb::GenerateDataKeyResponse dk;
      if (DataKey(s.key, &dk).ok()) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    FAIL() << "still refusing 5 s after the audit directory was writable";
  }

  void ExpectAuditVerifies(const std::string& dir) {
    std::vector<std::string> keys = PublicKeys(dir);
    ASSERT_EQ(keys.size(), 1u);
    absl::StatusOr<kms::AuditVerifyReport> report =
        kms::VerifyAuditDirectory(dir, keys);
    ASSERT_TRUE(report.ok()) << report.status();
    EXPECT_TRUE(report->ok) << report->first_break;
    EXPECT_TRUE(report->signatures_checked);
  }

  void Restart() {
    absl::Status restarted = server_->Restart();
    ASSERT_TRUE(restarted.ok()) << restarted;
  }
  void StopAndRestart() {
    absl::Status stopped = server_->Stop();
    ASSERT_TRUE(stopped.ok()) << stopped;
    Restart();
  }

  std::string scratch_;
  std::vector<std::string> mounts_;
  std::vector<std::string> immutable_;
  std::map<std::string, std::string> images_;  // mount point -> image
  std::vector<std::string> secrets_;  // PINs and data keys of this test
  std::unique_ptr<CustosdProcess> server_;
};

// --- the database ----------------------------------------------------------

TEST_F(StoreFaultE2eTest, FullDatabaseDiskFailsAdminChangesAtomically) {
  std::string db;
  MountTmpfs("db", "2m", &db);
  if (IsSkipped() || HasFailure()) return;
  ASSERT_NO_FATAL_FAILURE(StartServer(db, ""));
  const Subject s = MakeSubject("full");
  Snapshot before = Take(s);

  ASSERT_NO_FATAL_FAILURE(Fill(db + "/filler"));
  ExpectEveryAdminChangeFails(s, before, "database");
  ExpectServedFromCache(s);

  // A crash while the disk is full: the database holds the old state.
  server_->Kill(SIGKILL);
  fs::remove(db + "/filler");
  ASSERT_NO_FATAL_FAILURE(Restart());
  ExpectSame(before, Take(s), "after kill -9 and a restart");
  EXPECT_EQ(Stored(server_->database_path(), s.key),
            "state=1 primary=1 versions=1");

  // The disk fills up again, and empties: the same process recovers, and
  // every change then persists.
  ASSERT_NO_FATAL_FAILURE(Warm(s));
  before = Take(s);
  ASSERT_NO_FATAL_FAILURE(Fill(db + "/filler"));
  {
    const AdminOp disable = Op("DisableKey");
    ExpectClearUnavailable(disable.call(s), "DisableKey", "database");
    EXPECT_EQ(State(s.key), pb::ENABLED);
  }
  fs::remove(db + "/filler");
  ExpectEveryAdminChangeSucceeds(s, before);
  const Snapshot applied = Take(s);
  ASSERT_NO_FATAL_FAILURE(StopAndRestart());
  ExpectSame(applied, Take(s), "after a restart");
  ASSERT_TRUE(server_->Stop().ok());
  ExpectAuditVerifies(server_->audit_dir());
}

TEST_F(StoreFaultE2eTest, ReadOnlyDatabaseVolumeFailsAdminChangesAtomically) {
  std::string db;
  MountExt4("db", &db);
  if (IsSkipped() || HasFailure()) return;
  ASSERT_NO_FATAL_FAILURE(StartServer(db, ""));
  const Subject s = MakeSubject("ro");
  const Snapshot before = Take(s);

  ASSERT_NO_FATAL_FAILURE(ForceReadOnly(db));
  ExpectEveryAdminChangeFails(s, before, "database");
  ExpectServedFromCache(s);
  EXPECT_TRUE(Alive(server_->pid()));

  // The volume is repaired and mounted again; custosd restarts on it with
  // the old state, and changes succeed and persist.
  ASSERT_TRUE(server_->Stop().ok());
  ASSERT_NO_FATAL_FAILURE(Remount(db));
  ASSERT_NO_FATAL_FAILURE(Restart());
  ExpectSame(before, Take(s), "after the volume came back");
  ASSERT_NO_FATAL_FAILURE(Warm(s));
  ExpectEveryAdminChangeSucceeds(s, before);
  const Snapshot applied = Take(s);
  ASSERT_NO_FATAL_FAILURE(StopAndRestart());
  ExpectSame(applied, Take(s), "after a restart");
  ASSERT_TRUE(server_->Stop().ok());
  ExpectAuditVerifies(server_->audit_dir());
}

// Another connection holds the write lock: changes wait for the store's
// busy timeout and then fail, retryably, with nothing applied; data keys
// keep coming from the cache, except from a version that has no durable
// reservation of encryptions yet (its counter must be written first:
// docs/security.md, threat 9).
TEST_F(StoreFaultE2eTest, BusyDatabaseFailsAdminChangesRetryably) {
  ASSERT_NO_FATAL_FAILURE(StartServer("", ""));
  const Subject s = MakeSubject("busy");
  absl::StatusOr<std::string> unused =
      server_->CreateKeyFor("service-a", {pb::GENERATE_DATA_KEY});
  ASSERT_TRUE(unused.ok()) << unused.status();
  const Snapshot before = Take(s);
  {
    DatabaseLock lock(server_->database_path());
    absl::Status held = lock.Hold();
    ASSERT_TRUE(held.ok()) << held;
    // The caller learns which part failed; SQLite's own words ("database is
    // locked") go to the server's log only.
    ExpectEveryAdminChangeFails(s, before, "the key database is unavailable");
    EXPECT_THAT(testing::ReadAll(server_->log_path()),
                HasSubstr("database is locked"));
    ExpectServedFromCache(s);
    pb::GenerateDataKeyResponse refused;
    grpc::Status st = DataKey(*unused, &refused);
    ExpectClearUnavailable(st, "GenerateDataKey on an unused key", "database");
    EXPECT_TRUE(refused.plaintext().empty());
    EXPECT_TRUE(refused.ciphertext_blob().empty());

    // The lock goes away while a change waits for it: whatever the change
    // answers, the cache and the database agree with the answer.
    grpc::Status raced;
    std::thread disable([&] { raced = Op("DisableKey").call(s); });
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    lock.Release();
    disable.join();
    ASSERT_TRUE(raced.ok() || raced.error_code() == Code::UNAVAILABLE)
        << raced.error_message();
    EXPECT_EQ(State(s.key), raced.ok() ? pb::DISABLED : pb::ENABLED);
    EXPECT_EQ(Stored(server_->database_path(), s.key),
              raced.ok() ? "state=2 primary=1 versions=1"
                         : "state=1 primary=1 versions=1");
  }
  if (State(s.key) == pb::DISABLED) {
    pb::EnableKeyRequest req;
    req.set_key(s.key);
    pb::Key out;
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    ASSERT_TRUE(Kms()->EnableKey(&ctx, req, &out).ok());
  }
  ExpectEveryAdminChangeSucceeds(s, before);
  const Snapshot applied = Take(s);
  ASSERT_NO_FATAL_FAILURE(StopAndRestart());
  ExpectSame(applied, Take(s), "after a restart");
  ASSERT_TRUE(server_->Stop().ok());
  ExpectAuditVerifies(server_->audit_dir());
}

// Changes that would make a key usable, or keep it unusable, fail on a full
// disk: each key stays in the state it had, in memory and in the database,
// and keeps refusing what it refused. A state custosd does not know is
// never taken for a usable one: it refuses to start.
TEST_F(StoreFaultE2eTest, AFailedChangeNeverLeavesAKeyInAnUnknownState) {
  std::string db;
  MountTmpfs("db", "2m", &db);
  if (IsSkipped() || HasFailure()) return;
  ASSERT_NO_FATAL_FAILURE(StartServer(db, ""));
  auto make = [&] {
    absl::StatusOr<std::string> key = server_->CreateKeyFor(
        "service-a", {pb::GENERATE_DATA_KEY, pb::DECRYPT});
    EXPECT_TRUE(key.ok()) << key.status();
    return key.value_or("");
  };
  const std::string enabled = make();
  const std::string disabled = make();
  const std::string pending = make();
  pb::GenerateDataKeyResponse warm;
  ASSERT_TRUE(DataKey(enabled, &warm).ok());
  {
    pb::DisableKeyRequest req;
    req.set_key(disabled);
    pb::Key out;
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    ASSERT_TRUE(Kms()->DisableKey(&ctx, req, &out).ok());
    pb::ScheduleKeyDeletionRequest sreq;
    sreq.set_key(pending);
    sreq.set_pending_window_days(30);
    grpc::ClientContext sctx;
    SetDeadline(&sctx);
    ASSERT_TRUE(Kms()->ScheduleKeyDeletion(&sctx, sreq, &out).ok());
  }
  // What each key does: serves data keys (enabled) or refuses them.
  auto expect_behaviour = [&](const std::string& when) {
    SCOPED_TRACE(when);
    pb::GenerateDataKeyResponse dk;
    grpc::Status st = DataKey(enabled, &dk);
    EXPECT_TRUE(st.ok()) << st.error_message();
    for (const std::string& key : {disabled, pending}) {
      pb::GenerateDataKeyResponse refused;
      st = DataKey(key, &refused);
      EXPECT_EQ(st.error_code(), Code::FAILED_PRECONDITION)
          << st.error_message();
      EXPECT_TRUE(refused.plaintext().empty());
    }
    EXPECT_EQ(State(enabled), pb::ENABLED);
    EXPECT_EQ(State(disabled), pb::DISABLED);
    EXPECT_EQ(State(pending), pb::PENDING_DELETION);
    const std::string path = server_->database_path();
    EXPECT_EQ(Stored(path, enabled), "state=1 primary=1 versions=1");
    EXPECT_EQ(Stored(path, disabled), "state=2 primary=1 versions=1");
    EXPECT_EQ(Stored(path, pending), "state=3 primary=1 versions=1");
  };
  expect_behaviour("before the fault");

  ASSERT_NO_FATAL_FAILURE(Fill(db + "/filler"));
  auto call = [&](const std::string& rpc, const std::string& key) {
    grpc::ClientContext ctx;
    SetDeadline(&ctx);
    pb::Key out;
    if (rpc == "EnableKey") {
      pb::EnableKeyRequest req;
      req.set_key(key);
      return Kms()->EnableKey(&ctx, req, &out);
    }
    if (rpc == "DisableKey") {
      pb::DisableKeyRequest req;
      req.set_key(key);
      return Kms()->DisableKey(&ctx, req, &out);
    }
    if (rpc == "CancelKeyDeletion") {
      pb::CancelKeyDeletionRequest req;
      req.set_key(key);
      return Kms()->CancelKeyDeletion(&ctx, req, &out);
    }
    pb::ScheduleKeyDeletionRequest req;
    req.set_key(key);
    req.set_pending_window_days(7);
    return Kms()->ScheduleKeyDeletion(&ctx, req, &out);
  };
  const std::vector<std::pair<std::string, std::string>> changes = {
      {"EnableKey", disabled},
      {"DisableKey", enabled},
      {"ScheduleKeyDeletion", enabled},
      {"CancelKeyDeletion", pending},
      {"ScheduleKeyDeletion", disabled}};
  for (const auto& [rpc, key] : changes) {
    SCOPED_TRACE(rpc);
    const size_t records = RequestRecords().size();
    grpc::Status st = call(rpc, key);
    ExpectClearUnavailable(st, rpc, "database");
    ExpectFailureRecorded(rpc, st, records);
    expect_behaviour("after a failed " + rpc);
  }

  server_->Kill(SIGKILL);
  fs::remove(db + "/filler");
  ASSERT_NO_FATAL_FAILURE(Restart());
  expect_behaviour("after kill -9 and a restart");

  // A state this custosd does not know (a newer release's, or an edit of
  // the database) stops it from starting, naming the key.
  ASSERT_TRUE(server_->Stop().ok());
  ASSERT_TRUE(WriteStoredState(server_->database_path(), disabled, 7).ok());
  absl::Status started = server_->Restart();
  EXPECT_FALSE(started.ok()) << "custosd served a key in an unknown state";
  EXPECT_THAT(
      ReadAll(server_->log_path()),
      HasSubstr(absl::StrCat("key ", disabled, " has unknown stored state 7")));
  ASSERT_FALSE(server_->running());
  ASSERT_TRUE(WriteStoredState(server_->database_path(), disabled, 2).ok());
  ASSERT_NO_FATAL_FAILURE(Restart());
  expect_behaviour("after the state was repaired");
  ASSERT_TRUE(server_->Stop().ok());
  ExpectAuditVerifies(server_->audit_dir());
}

// --- the audit directory -----------------------------------------------------

// Segments roll before every batch (age 1 ms), so each record goes to a new
// file: on a full or unwritable directory no record can slip into the
// unused end of the open segment's last page.
constexpr char kRollEveryBatch[] = "audit_max_segment_age_seconds: 0.001";

TEST_F(StoreFaultE2eTest, FullAuditDirectoryRefusesEveryCallUntilItHasRoom) {
  std::string audit;
  MountTmpfs("audit", "4m", &audit);
  if (IsSkipped() || HasFailure()) return;
  ASSERT_NO_FATAL_FAILURE(StartServer("", audit, kRollEveryBatch));
  const Subject s = MakeSubject("audit-full");
  const Snapshot before = Take(s);

  ASSERT_NO_FATAL_FAILURE(Fill(audit + "/filler"));
  ExpectEveryCallRefused(s);

  fs::remove(audit + "/filler");
  WaitUntilServing(s);
  ExpectSame(before, Take(s), "after the refusals: nothing was applied");
  ExpectServedFromCache(s);
  ExpectEveryAdminChangeSucceeds(s, before);
  ASSERT_TRUE(server_->Stop().ok());
  ExpectAuditVerifies(audit);
}

TEST_F(StoreFaultE2eTest, UnwritableAuditDirectoryRefusesEveryCall) {
  // On a tmpfs of its own: chattr needs a file system that supports it.
  std::string audit;
  MountTmpfs("audit", "4m", &audit);
  if (IsSkipped() || HasFailure()) return;
  ASSERT_NO_FATAL_FAILURE(StartServer("", audit, kRollEveryBatch));
  const Subject s = MakeSubject("audit-ro");
  const Snapshot before = Take(s);

  MakeImmutable(audit);
  if (IsSkipped() || HasFailure()) return;
  ExpectEveryCallRefused(s);

  ASSERT_NO_FATAL_FAILURE(MakeMutable(audit));
  WaitUntilServing(s);
  ExpectSame(before, Take(s), "after the refusals: nothing was applied");
  ExpectServedFromCache(s);
  ExpectEveryAdminChangeSucceeds(s, before);
  ASSERT_TRUE(server_->Stop().ok());
  ExpectAuditVerifies(audit);
}

TEST_F(StoreFaultE2eTest, ReadOnlyAuditVolumeRefusesEveryCall) {
  std::string audit;
  MountExt4("audit", &audit);
  if (IsSkipped() || HasFailure()) return;
  ASSERT_NO_FATAL_FAILURE(StartServer("", audit));
  const Subject s = MakeSubject("audit-rofs");
  const Snapshot before = Take(s);

  ASSERT_NO_FATAL_FAILURE(ForceReadOnly(audit));
  ExpectEveryCallRefused(s);

  ASSERT_TRUE(server_->Stop().ok());
  ASSERT_NO_FATAL_FAILURE(Remount(audit));
  ASSERT_NO_FATAL_FAILURE(Restart());
  ExpectSame(before, Take(s), "after the refusals: nothing was applied");
  ExpectServedFromCache(s);
  ExpectEveryAdminChangeSucceeds(s, before);
  ASSERT_TRUE(server_->Stop().ok());
  ExpectAuditVerifies(audit);
}

}  // namespace
}  // namespace custos
