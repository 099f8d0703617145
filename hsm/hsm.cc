#include "hsm/hsm.h"

#include <chrono>
#include <iterator>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/p256.h"
#include "common/status_macros.h"
#include "hsm/ck_status.h"
#include "hsm/key_templates.h"
#include "hsm/pin_file.h"

namespace custos::hsm {
namespace {

// Indexed by Hsm::Operation.
constexpr const char* kOperationNames[] = {
    "GenerateAesKey",        "VerifyAesKey",   "EncryptAesGcm",
    "GenerateAndSealAesGcm", "DecryptAesGcm",  "GenerateRandom",
    "GenerateSigningKey",    "SignP256",       "SigningPublicKeyPem",
    "DestroyObjects",        "ListKeyObjects", "FindKeyIdsByLabel",
    "CreateMarker",          "FindMarkers",
};

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
      .count();
}

}  // namespace

// Per operation: its latency on the HSM (measured on the worker, each
// attempt on its own) and its outcomes as callers see them (after retries
// and timeouts), each series made on first use. Thread-safe.
class Hsm::Metrics {
 public:
  struct Op {
    Op(metrics::Family<metrics::Histogram>* durations,
       metrics::Family<metrics::Counter>* outcomes, const std::string& name)
        : duration(durations, {name}), outcome(outcomes, {name}) {}
    metrics::LazyChild<metrics::Histogram> duration;
    metrics::CodeCounters outcome;
  };

  static absl::StatusOr<std::unique_ptr<Metrics>> Create(
      metrics::Registry& registry) {
    static_assert(std::size(kOperationNames) ==
                  static_cast<size_t>(Operation::kCount));
    CUSTOS_ASSIGN_OR_RETURN(
        auto* durations,
        registry.AddHistogram(
            "custos_hsm_operation_duration_seconds",
            "Time an HSM operation spent on its session (each attempt), by "
            "operation.",
            {"operation"}, metrics::LatencyBuckets()));
    CUSTOS_ASSIGN_OR_RETURN(
        auto* outcomes,
        registry.AddCounter("custos_hsm_operations_total",
                            "HSM operations finished, by operation and "
                            "status code (errors: code != OK).",
                            {"operation", "code"}));
    auto m = std::unique_ptr<Metrics>(new Metrics());
    for (const char* name : kOperationNames) {
      m->ops_.push_back(std::make_unique<Op>(durations, outcomes, name));
    }
    return m;
  }

  Op& op(Operation operation) { return *ops_[static_cast<int>(operation)]; }

 private:
  Metrics() = default;
  std::vector<std::unique_ptr<Op>> ops_;
};

Hsm::Hsm(std::unique_ptr<Metrics> metrics, std::unique_ptr<SessionPool> pool,
         bool shared_token, TokenSummary token)
    : shared_token_(shared_token),
      token_(std::move(token)),
      metrics_(std::move(metrics)),
      pool_(std::move(pool)) {}

Hsm::~Hsm() = default;

// The result lives in shared state because a timed-out call may finish
// later; so do the metrics (metrics_ outlives pool_'s workers).
template <typename T, typename F>
absl::StatusOr<T> Hsm::Call(Operation operation, F f) {
  Metrics::Op* op = metrics_ == nullptr ? nullptr : &metrics_->op(operation);
  auto out = std::make_shared<std::optional<T>>();
  absl::Status s = pool_->Run(
      [f = std::move(f), out, op](Session& session) mutable -> absl::Status {
        std::chrono::steady_clock::time_point start;
        if (op != nullptr) start = std::chrono::steady_clock::now();
        absl::StatusOr<T> r = f(session);
        if (op != nullptr) op->duration.Get().Observe(SecondsSince(start));
        if (!r.ok()) return r.status();
        *out = *std::move(r);
        return absl::OkStatus();
      });
  if (op != nullptr) op->outcome.Increment(static_cast<int>(s.code()));
  if (!s.ok()) return s;
  return std::move(**out);
}

absl::StatusOr<std::unique_ptr<Hsm>> Hsm::Open(const Module& module,
                                               const Options& options) {
  if (options.token_label.empty()) {
    return absl::InvalidArgumentError(
        "token_label is empty: name the HSM token Custos uses");
  }
  CUSTOS_ASSIGN_OR_RETURN(CK_SLOT_ID slot,
                          module.FindSlotByTokenLabel(options.token_label));
  TokenSummary token{slot, options.token_label, "", true};
  CUSTOS_ASSIGN_OR_RETURN(std::vector<TokenSummary> tokens,
                          module.ListTokens());
  for (const TokenSummary& t : tokens) {
    if (t.slot == slot) token = t;
  }
  CUSTOS_ASSIGN_OR_RETURN(SecretBytes pin, ReadPinFile(options.pin_file));
  std::unique_ptr<Metrics> metrics;
  SessionPool::Options pool_options = options.pool;
  if (options.metrics != nullptr) {
    CUSTOS_ASSIGN_OR_RETURN(metrics, Metrics::Create(*options.metrics));
    if (pool_options.metrics == nullptr) pool_options.metrics = options.metrics;
  }
  absl::StatusOr<std::unique_ptr<SessionPool>> pool =
      SessionPool::Create(module.fn(), slot, std::move(pin), pool_options);
  if (!pool.ok()) {
    return absl::Status(
        pool.status().code(),
        absl::StrCat("opening sessions on token '", options.token_label,
                     "': ", pool.status().message()));
  }
  return std::unique_ptr<Hsm>(new Hsm(std::move(metrics), *std::move(pool),
                                      options.shared_token, std::move(token)));
}

absl::StatusOr<CK_OBJECT_HANDLE> Hsm::Resolve(Session& session,
                                              const std::string& id,
                                              CK_OBJECT_CLASS cls) {
  {
    absl::MutexLock lock(&mu_);
    if (uint64_t epoch = pool_->epoch(); epoch != handles_epoch_) {
      handles_.clear();  // a session broke: handles may have been renumbered
      handles_epoch_ = epoch;
    }
    auto it = handles_.find(std::make_pair(cls, id));
    if (it != handles_.end()) return it->second;
  }
  AttributeTemplate query;
  query.Ulong(CKA_CLASS, cls).Bytes(CKA_ID, id);
  CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found,
                          session.FindObjects(query, 2));
  // With a shared token, an object another process (a replica) has just
  // made may take a moment to appear: SoftHSM2 notices another process's
  // new files within about 0.1 s, and a cluster of network HSMs replicates
  // with a lag. Callers only ask for objects the database says exist, so
  // look again a few times (0.6 s in all) before calling it missing.
  for (absl::Duration wait = absl::Milliseconds(10);
       shared_token_ && found.empty() && wait <= absl::Milliseconds(320);
       wait *= 2) {
    absl::SleepFor(wait);
    CUSTOS_ASSIGN_OR_RETURN(found, session.FindObjects(query, 2));
  }
  if (found.empty()) {
    return absl::NotFoundError(
        absl::StrCat("no HSM object with CKA_ID ", ObjectIdHex(id)));
  }
  if (found.size() > 1) {
    return absl::FailedPreconditionError(
        absl::StrCat("several HSM objects share CKA_ID ", ObjectIdHex(id),
                     ": refusing an ambiguous key"));
  }
  if (cls == CKO_SECRET_KEY) {
    CUSTOS_RETURN_IF_ERROR(VerifyCmkAttributes(session, found[0]));
  } else if (cls == CKO_PRIVATE_KEY) {
    CUSTOS_RETURN_IF_ERROR(VerifySigningKeyAttributes(session, found[0]));
  }
  absl::MutexLock lock(&mu_);
  handles_[std::make_pair(cls, id)] = found[0];
  return found[0];
}

void Hsm::Forget(const std::string& id, CK_OBJECT_CLASS cls) {
  absl::MutexLock lock(&mu_);
  handles_.erase(std::make_pair(cls, id));
}

template <typename T, typename F>
absl::StatusOr<T> Hsm::WithObject(Session& session, const std::string& id,
                                  CK_OBJECT_CLASS cls, F use) {
  CUSTOS_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE handle, Resolve(session, id, cls));
  absl::StatusOr<T> result = use(handle);
  if (!result.ok() && IsStaleObjectHandle(result.status())) {
    Forget(id, cls);
    CUSTOS_ASSIGN_OR_RETURN(handle, Resolve(session, id, cls));
    result = use(handle);
  }
  return result;
}

absl::StatusOr<std::string> Hsm::NewObjectId() {
  CUSTOS_ASSIGN_OR_RETURN(SecretBytes id, GenerateRandom(kObjectIdSize));
  return std::string(id.view());
}

absl::StatusOr<std::string> Hsm::GenerateAesKey(absl::string_view label) {
  CUSTOS_ASSIGN_OR_RETURN(std::string id, NewObjectId());
  return GenerateAesKey(id, label);
}

absl::StatusOr<std::string> Hsm::GenerateAesKey(absl::string_view id,
                                                absl::string_view label) {
  if (id.size() != kObjectIdSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("CKA_ID must be ", kObjectIdSize, " bytes"));
  }
  return Call<std::string>(
      Operation::kGenerateAesKey,
      [this, id = std::string(id), label = std::string(label)](
          Session& session) -> absl::StatusOr<std::string> {
        if (shared_token_) {
          // Takes in every object other processes made so far (see
          // Options::shared_token); the id is new, so nothing matches.
          AttributeTemplate none;
          none.Ulong(CKA_CLASS, CKO_SECRET_KEY).Bytes(CKA_ID, id);
          CUSTOS_RETURN_IF_ERROR(session.FindObjects(none, 1).status());
        }
        CUSTOS_ASSIGN_OR_RETURN(CK_OBJECT_HANDLE key,
                                GenerateCmk(session, id, label));
        absl::MutexLock lock(&mu_);
        handles_[std::make_pair(CKO_SECRET_KEY, id)] = key;
        return id;
      });
}

absl::Status Hsm::VerifyAesKey(absl::string_view id) {
  Forget(std::string(id), CKO_SECRET_KEY);  // verify afresh, not from cache
  return Call<bool>(Operation::kVerifyAesKey,
                    [this, id = std::string(id)](
                        Session& session) -> absl::StatusOr<bool> {
                      CUSTOS_RETURN_IF_ERROR(
                          Resolve(session, id, CKO_SECRET_KEY).status());
                      return true;
                    })
      .status();
}

absl::StatusOr<GcmSealed> Hsm::EncryptAesGcm(absl::string_view id,
                                             absl::string_view aad,
                                             absl::string_view plaintext) {
  return Call<GcmSealed>(
      Operation::kEncryptAesGcm,
      [this, id = std::string(id), aad = std::string(aad),
       plaintext = SecretBytes::CopyOf(plaintext)](
          Session& session) -> absl::StatusOr<GcmSealed> {
        return WithObject<GcmSealed>(
            session, id, CKO_SECRET_KEY,
            [&](CK_OBJECT_HANDLE key) -> absl::StatusOr<GcmSealed> {
              CUSTOS_ASSIGN_OR_RETURN(SecretBytes iv,
                                      session.GenerateRandom(kGcmIvSize));
              GcmSealed sealed{std::string(iv.view()), ""};
              CUSTOS_ASSIGN_OR_RETURN(
                  sealed.ciphertext,
                  session.EncryptAesGcm(key, sealed.iv, aad, plaintext.view()));
              return sealed;
            });
      });
}

absl::StatusOr<std::vector<SealedSecret>> Hsm::GenerateAndSealAesGcm(
    absl::string_view id, absl::string_view aad, size_t bytes, size_t count) {
  if (bytes == 0 || count == 0) {
    return absl::InvalidArgumentError("nothing to generate");
  }
  return Call<std::vector<SealedSecret>>(
      Operation::kGenerateAndSealAesGcm,
      [this, id = std::string(id), aad = std::string(aad), bytes,
       count](Session& session) -> absl::StatusOr<std::vector<SealedSecret>> {
        return WithObject<std::vector<SealedSecret>>(
            session, id, CKO_SECRET_KEY,
            [&](CK_OBJECT_HANDLE key)
                -> absl::StatusOr<std::vector<SealedSecret>> {
              // One RNG call for every secret and IV.
              const size_t each = bytes + kGcmIvSize;
              CUSTOS_ASSIGN_OR_RETURN(SecretBytes random,
                                      session.GenerateRandom(each * count));
              std::vector<SealedSecret> out;
              out.reserve(count);
              for (size_t i = 0; i < count; ++i) {
                absl::string_view chunk = random.view().substr(i * each, each);
                SealedSecret secret;
                secret.plaintext = SecretBytes::CopyOf(chunk.substr(0, bytes));
                secret.sealed.iv = std::string(chunk.substr(bytes));
                CUSTOS_ASSIGN_OR_RETURN(
                    secret.sealed.ciphertext,
                    session.EncryptAesGcm(key, secret.sealed.iv, aad,
                                          secret.plaintext.view()));
                out.push_back(std::move(secret));
              }
              return out;
            });
      });
}

absl::StatusOr<SecretBytes> Hsm::DecryptAesGcm(absl::string_view id,
                                               absl::string_view iv,
                                               absl::string_view aad,
                                               absl::string_view ciphertext) {
  if (iv.size() != kGcmIvSize) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AES-GCM IV must be ", kGcmIvSize, " bytes, got ", iv.size()));
  }
  if (ciphertext.size() < kGcmTagSize) {
    return absl::InvalidArgumentError("AES-GCM ciphertext shorter than a tag");
  }
  return Call<SecretBytes>(
      Operation::kDecryptAesGcm,
      [this, id = std::string(id), iv = std::string(iv), aad = std::string(aad),
       ciphertext = std::string(ciphertext)](
          Session& session) -> absl::StatusOr<SecretBytes> {
        return WithObject<SecretBytes>(
            session, id, CKO_SECRET_KEY, [&](CK_OBJECT_HANDLE key) {
              return session.DecryptAesGcm(key, iv, aad, ciphertext);
            });
      });
}

absl::StatusOr<SecretBytes> Hsm::GenerateRandom(size_t size) {
  return Call<SecretBytes>(
      Operation::kGenerateRandom,
      [size](Session& session) { return session.GenerateRandom(size); });
}

absl::StatusOr<std::string> Hsm::GenerateSigningKey(absl::string_view label) {
  return Call<std::string>(
      Operation::kGenerateSigningKey,
      [this, label = std::string(label)](
          Session& session) -> absl::StatusOr<std::string> {
        CUSTOS_ASSIGN_OR_RETURN(SecretBytes id_bytes,
                                session.GenerateRandom(kObjectIdSize));
        std::string id(id_bytes.view());
        CUSTOS_ASSIGN_OR_RETURN(auto pair,
                                GenerateP256SigningKeyPair(session, id, label));
        absl::MutexLock lock(&mu_);
        handles_[std::make_pair(CKO_PUBLIC_KEY, id)] = pair.first;
        handles_[std::make_pair(CKO_PRIVATE_KEY, id)] = pair.second;
        return id;
      });
}

absl::StatusOr<std::string> Hsm::SignP256(absl::string_view id,
                                          absl::string_view message) {
  return Call<std::string>(
      Operation::kSignP256,
      [this, id = std::string(id), digest = Sha256(message)](
          Session& session) -> absl::StatusOr<std::string> {
        return WithObject<std::string>(session, id, CKO_PRIVATE_KEY,
                                       [&](CK_OBJECT_HANDLE key) {
                                         return session.SignEcdsa(key, digest);
                                       });
      });
}

absl::StatusOr<std::string> Hsm::SigningPublicKeyPem(absl::string_view id) {
  CUSTOS_ASSIGN_OR_RETURN(
      std::string point,
      Call<std::string>(
          Operation::kSigningPublicKeyPem,
          [this, id = std::string(id)](Session& session) {
            return WithObject<std::string>(
                session, id, CKO_PUBLIC_KEY, [&](CK_OBJECT_HANDLE key) {
                  return session.GetBytesAttribute(key, CKA_EC_POINT);
                });
          }));
  return P256PublicKeyPemFromEcPoint(point);
}

absl::StatusOr<int> Hsm::DestroyObjects(absl::string_view id) {
  std::string key(id);
  absl::StatusOr<int> destroyed =
      Call<int>(Operation::kDestroyObjects,
                [key](Session& session) -> absl::StatusOr<int> {
                  int count = 0;
                  for (;;) {
                    AttributeTemplate query;
                    query.Bytes(CKA_ID, key);
                    CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found,
                                            session.FindObjects(query, 64));
                    if (found.empty()) return count;
                    for (CK_OBJECT_HANDLE object : found) {
                      CUSTOS_RETURN_IF_ERROR(session.DestroyObject(object));
                      ++count;
                    }
                  }
                });
  // Forget the handles after the objects are gone, so that no concurrent
  // Resolve can cache one of them again.
  absl::MutexLock lock(&mu_);
  for (CK_OBJECT_CLASS cls :
       {CKO_SECRET_KEY, CKO_PRIVATE_KEY, CKO_PUBLIC_KEY}) {
    handles_.erase(std::make_pair(cls, key));
  }
  return destroyed;
}

absl::Status Hsm::CreateMarker(absl::string_view id, absl::string_view label) {
  return Call<bool>(Operation::kCreateMarker,
                    [id = std::string(id), label = std::string(label)](
                        Session& session) -> absl::StatusOr<bool> {
                      // Data objects have no CKA_ID (PKCS#11 v2.40 section
                      // 4.5): the marker's id is its value.
                      AttributeTemplate t;
                      t.Ulong(CKA_CLASS, CKO_DATA)
                          .Bool(CKA_TOKEN, true)
                          .Bool(CKA_PRIVATE, true)
                          .Bool(CKA_MODIFIABLE, false)
                          .Bytes(CKA_LABEL, label)
                          .Bytes(CKA_APPLICATION, "custos")
                          .Bytes(CKA_VALUE, id);
                      CUSTOS_RETURN_IF_ERROR(session.CreateObject(t).status());
                      return true;
                    })
      .status();
}

absl::StatusOr<std::vector<std::string>> Hsm::FindMarkers(
    absl::string_view label) {
  return Call<std::vector<std::string>>(
      Operation::kFindMarkers,
      [label = std::string(label)](
          Session& session) -> absl::StatusOr<std::vector<std::string>> {
        AttributeTemplate query;
        query.Ulong(CKA_CLASS, CKO_DATA).Bytes(CKA_LABEL, label);
        CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found,
                                session.FindObjects(query, 1024));
        std::vector<std::string> ids;
        for (CK_OBJECT_HANDLE object : found) {
          CUSTOS_ASSIGN_OR_RETURN(std::string id,
                                  session.GetBytesAttribute(object, CKA_VALUE));
          ids.push_back(std::move(id));
        }
        return ids;
      });
}

absl::Status Hsm::DestroyMarker(absl::string_view id, absl::string_view label) {
  return Call<bool>(Operation::kFindMarkers,
                    [id = std::string(id), label = std::string(label)](
                        Session& session) -> absl::StatusOr<bool> {
                      AttributeTemplate query;
                      query.Ulong(CKA_CLASS, CKO_DATA)
                          .Bytes(CKA_LABEL, label)
                          .Bytes(CKA_VALUE, id);
                      CUSTOS_ASSIGN_OR_RETURN(
                          std::vector<CK_OBJECT_HANDLE> found,
                          session.FindObjects(query, 16));
                      for (CK_OBJECT_HANDLE object : found) {
                        CUSTOS_RETURN_IF_ERROR(session.DestroyObject(object));
                      }
                      return true;
                    })
      .status();
}

absl::StatusOr<std::vector<HsmObject>> Hsm::ListKeyObjects() {
  return Call<std::vector<HsmObject>>(
      Operation::kListKeyObjects,
      [](Session& session) -> absl::StatusOr<std::vector<HsmObject>> {
        std::vector<HsmObject> objects;
        for (CK_OBJECT_CLASS cls : {CKO_SECRET_KEY, CKO_PRIVATE_KEY}) {
          AttributeTemplate query;
          query.Ulong(CKA_CLASS, cls);
          CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found,
                                  session.FindObjects(query, 1 << 20));
          for (CK_OBJECT_HANDLE object : found) {
            // One call per object, not four: this reads the whole token.
            CUSTOS_ASSIGN_OR_RETURN(
                std::vector<std::string> values,
                session.GetBytesAttributes(object, {CKA_ID, CKA_LABEL}));
            objects.push_back(
                HsmObject{cls, std::move(values[0]), std::move(values[1])});
          }
        }
        return objects;
      });
}

absl::StatusOr<std::vector<std::string>> Hsm::FindKeyIdsByLabel(
    CK_OBJECT_CLASS cls, absl::string_view label) {
  return Call<std::vector<std::string>>(
      Operation::kFindKeyIdsByLabel,
      [cls, label = std::string(label)](
          Session& session) -> absl::StatusOr<std::vector<std::string>> {
        AttributeTemplate query;
        query.Ulong(CKA_CLASS, cls).Bytes(CKA_LABEL, label);
        CUSTOS_ASSIGN_OR_RETURN(std::vector<CK_OBJECT_HANDLE> found,
                                session.FindObjects(query, 1 << 20));
        std::vector<std::string> ids;
        ids.reserve(found.size());
        for (CK_OBJECT_HANDLE object : found) {
          CUSTOS_ASSIGN_OR_RETURN(std::string id,
                                  session.GetBytesAttribute(object, CKA_ID));
          ids.push_back(std::move(id));
        }
        return ids;
      });
}

}  // namespace custos::hsm
