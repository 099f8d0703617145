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

namespace custos::server {

namespace pb = ::custos::v1;

// The one mapping from absl::Status to grpc::Status (the codes are equal).
// Messages are capped at 1 KiB.
grpc::Status ToGrpc(const absl::Status& status);

// Resolves the caller of a call: the verified client certificate's identity
// (mutual TLS), or the configured development principal on the plaintext
// listener. UNAUTHENTICATED otherwise: such a call never reaches the core.
class CallerResolver {
 public:
  // `insecure_principal`: identity for calls without TLS (development only;
  // empty to refuse them).
  explicit CallerResolver(std::string insecure_principal)
      : insecure_principal_(std::move(insecure_principal)) {}
  absl::StatusOr<kms::Caller> Resolve(grpc::ServerContextBase* context);

 private:
  const std::string insecure_principal_;
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
