// What every gRPC handler of custosd shares: turning a call's peer into a
// Caller, absl::Status into grpc::Status (the one place), proto <-> core
// conversions, and a unary reactor that cleanses secrets when the call is
// done. Thread-safe (stateless, or internally locked).
#ifndef CUSTOS_KMS_SERVER_RPC_SUPPORT_H_
#define CUSTOS_KMS_SERVER_RPC_SUPPORT_H_

#include <grpcpp/grpcpp.h>

#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "custos/v1/kms.pb.h"
#include "custos/v1/resources.pb.h"
#include "kms/authorizer.h"
#include "kms/key.h"
#include "kms/key_service.h"
#include "kms/server/identity.h"
#include "kms/server/rate_limiter.h"

namespace custos::server {

namespace pb = ::custos::v1;

// The one mapping from absl::Status to grpc::Status (the codes are equal).
// Messages are capped at 1 KiB. UNAVAILABLE, INTERNAL, DATA_LOSS and UNKNOWN
// reach the caller as ForCaller words them; their own message (file paths,
// database errors) goes to the server log only.
grpc::Status ToGrpc(const absl::Status& status);

// `status` as a caller may see it: unchanged for the codes whose messages
// are about the request; for UNAVAILABLE, INTERNAL, DATA_LOSS and UNKNOWN a
// generic message that names only the part that failed (the audit log, the
// key database, the HSM).
absl::Status ForCaller(const absl::Status& status);

// A call's caller, or why it has none. When `refusal` is set, the call
// must not reach an operation; `caller` then names the peer for the audit
// log by its certificate's fingerprint ("cert-sha256:<hex>"), or
// "unauthenticated" when it sent none, never by a name it claims.
struct ResolvedCaller {
  kms::Caller caller;
  absl::Status refusal;
};

// Resolves and admits the caller of a call: the verified client
// certificate's identity (mutual TLS), or the configured development
// principal on the plaintext listener; then the caller's rate limit, if
// any. Otherwise a refusal (UNAUTHENTICATED, RESOURCE_EXHAUSTED), which the
// handlers audit: such a call never reaches an operation. Thread-safe.
class CallerResolver {
 public:
  // `insecure_principal`: identity for calls without TLS (development only;
  // empty to refuse them). `limiter`: null for no rate limit; must outlive
  // the resolver.
  explicit CallerResolver(std::string insecure_principal,
                          RateLimiter* limiter = nullptr)
      : insecure_principal_(std::move(insecure_principal)), limiter_(limiter) {}
  ResolvedCaller Resolve(grpc::ServerContextBase* context);

 private:
  // The caller's identity, or the refusal.
  ResolvedCaller Identify(grpc::ServerContextBase* context);

  const std::string insecure_principal_;
  RateLimiter* const limiter_;
  IdentityCache identities_;
};

// A unary reactor that runs `cleanup` (cleansing plaintext in the request
// and response) once gRPC is done with the call.
class CleansingReactor : public grpc::ServerUnaryReactor {
 public:
  explicit CleansingReactor(std::function<void()> cleanup)
      : cleanup_(std::move(cleanup)) {}
  void OnDone() override {
    if (cleanup_) cleanup_();
    delete this;
  }

 private:
  std::function<void()> cleanup_;
};

// Overwrites a protobuf bytes field's storage with zeros, then clears it.
void CleanseBytes(std::string* bytes);

// Conversions.
void ToProto(const kms::Key& key, bool with_versions, pb::Key* out);
void ToProto(const kms::KeyPolicy& policy, pb::KeyPolicy* out);
void ToProto(const kms::AliasRecord& alias, pb::Alias* out);
absl::StatusOr<kms::KeyPolicy> FromProto(const pb::KeyPolicy& policy);
kms::EncryptionContext FromProto(
    const google::protobuf::Map<std::string, std::string>& context);
absl::StatusOr<kms::JustificationParam> FromProto(
    const pb::AccessJustification& justification, bool present);
absl::StatusOr<absl::Duration> FromProto(
    const google::protobuf::Duration& duration, absl::string_view field);

}  // namespace custos::server

#endif  // CUSTOS_KMS_SERVER_RPC_SUPPORT_H_
