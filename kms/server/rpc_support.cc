#include "kms/server/rpc_support.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace custos::server {
namespace {

void ToProto(absl::Time t, google::protobuf::Timestamp* out) {
  const int64_t us = absl::ToUnixMicros(t);
  out->set_seconds(us / 1000000);
  out->set_nanos(static_cast<int32_t>((us % 1000000) * 1000));
}

std::string NewRequestId() {
  unsigned char bytes[12];
  RAND_bytes(bytes, sizeof(bytes));
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<char*>(bytes), sizeof(bytes)));
}

bool ValidRequestId(absl::string_view id) {
  if (id.empty() || id.size() > 64) return false;
  for (char c : id) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
    if (!ok) return false;
  }
  return true;
}

}  // namespace

absl::Status ForCaller(const absl::Status& status) {
  const absl::StatusCode code = status.code();
  if (code != absl::StatusCode::kUnavailable &&
      code != absl::StatusCode::kInternal &&
      code != absl::StatusCode::kDataLoss &&
      code != absl::StatusCode::kUnknown) {
    return status;
  }
  const std::string lower = absl::AsciiStrToLower(status.message());
  absl::string_view part;
  if (absl::StrContains(lower, "audit log") ||
      absl::StartsWith(lower, "audit:")) {
    part = "request refused because the audit log cannot record it";
  } else if (absl::StrContains(lower, "database") ||
             absl::StartsWith(lower, "storage")) {
    part = "the key database is unavailable";
  } else if (absl::StrContains(lower, "hsm") ||
             absl::StrContains(lower, "pkcs#11") ||
             absl::StartsWith(status.message(), "C_") ||
             absl::StrContains(lower, "ckr_")) {
    part = "the HSM is unavailable";
  } else if (code == absl::StatusCode::kUnavailable) {
    part = "custosd cannot serve this request now";
  } else {
    part = "custosd failed to serve this request";
  }
  return absl::Status(code, absl::StrCat(part,
                                         code == absl::StatusCode::kUnavailable
                                             ? "; retry later"
                                             : "; report it to the operator",
                                         " (the server log has the details)"));
}

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  const absl::Status shown = ForCaller(status);
  if (shown.message() != status.message()) {
    spdlog::warn("call failed with {}: {}",
                 absl::StatusCodeToString(status.code()),
                 status.message().substr(0, 1024));
  }
  std::string message(shown.message().substr(0, 1024));
  return grpc::Status(static_cast<grpc::StatusCode>(shown.code()), message);
}

ResolvedCaller CallerResolver::Resolve(grpc::ServerContextBase* context) {
  ResolvedCaller resolved = Identify(context);
  if (resolved.refusal.ok() && limiter_ != nullptr) {
    resolved.refusal = limiter_->Admit(resolved.caller.principal);
  }
  return resolved;
}

ResolvedCaller CallerResolver::Identify(grpc::ServerContextBase* context) {
  ResolvedCaller resolved;
  kms::Caller& caller = resolved.caller;
  caller.peer = context->peer();
  auto metadata = context->client_metadata();
  auto rid = metadata.find("x-request-id");
  if (rid != metadata.end() && ValidRequestId(absl::string_view(
                                   rid->second.data(), rid->second.size()))) {
    caller.request_id = std::string(rid->second.data(), rid->second.size());
  } else {
    caller.request_id = NewRequestId();
  }
  std::shared_ptr<const grpc::AuthContext> auth = context->auth_context();
  if (auth == nullptr || !auth->IsPeerAuthenticated()) {
    if (!insecure_principal_.empty()) {
      caller.principal = insecure_principal_;
      return resolved;
    }
    caller.principal = "unauthenticated";
    resolved.refusal = absl::UnauthenticatedError(
        "no verified client certificate: custosd requires mutual TLS");
    return resolved;
  }
  std::vector<grpc::string_ref> pems =
      auth->FindPropertyValues("x509_pem_cert");
  if (pems.empty()) {
    caller.principal = "unauthenticated";
    resolved.refusal =
        absl::UnauthenticatedError("no client certificate presented");
    return resolved;
  }
  PeerIdentity identity =
      identities_.Lookup(absl::string_view(pems[0].data(), pems[0].size()));
  if (!identity.principal.ok()) {
    caller.principal = std::move(identity.fingerprint);
    resolved.refusal = identity.principal.status();
    return resolved;
  }
  caller.principal = *std::move(identity.principal);
  return resolved;
}

void CleanseBytes(std::string* bytes) {
  if (!bytes->empty()) OPENSSL_cleanse(bytes->data(), bytes->size());
  bytes->clear();
}

void ToProto(const kms::Key& key, bool with_versions, pb::Key* out) {
  out->set_key_id(key.id);
  for (const std::string& alias : key.aliases) out->add_aliases(alias);
  out->set_description(key.description);
  for (const auto& [name, value] : key.labels) {
    (*out->mutable_labels())[name] = value;
  }
  out->set_purpose(static_cast<pb::KeyPurpose>(key.purpose));
  out->set_state(static_cast<pb::KeyState>(key.state));
  if (key.rotation_period > absl::ZeroDuration()) {
    out->mutable_rotation_period()->set_seconds(
        absl::ToInt64Seconds(key.rotation_period));
    if (key.next_rotation_time != absl::InfinitePast()) {
      ToProto(key.next_rotation_time, out->mutable_next_rotation_time());
    }
  }
  out->set_primary_version(key.primary_version);
  ToProto(key.create_time, out->mutable_create_time());
  ToProto(key.update_time, out->mutable_update_time());
  if (key.deletion_time != absl::InfinitePast()) {
    ToProto(key.deletion_time, out->mutable_deletion_time());
  }
  if (with_versions) {
    for (const kms::KeyVersion& v : key.versions) {
      pb::KeyVersion* pv = out->add_versions();
      pv->set_version(v.number);
      pv->set_state(static_cast<pb::KeyVersionState>(v.state));
      ToProto(v.create_time, pv->mutable_create_time());
      pv->set_encryptions(v.encryptions_reserved);
    }
  }
}

void ToProto(const kms::KeyPolicy& policy, pb::KeyPolicy* out) {
  out->set_version(policy.version);
  for (const kms::PolicyBinding& b : policy.bindings) {
    pb::PolicyBinding* pbb = out->add_bindings();
    for (const std::string& p : b.principals) pbb->add_principals(p);
    for (kms::KeyOperation op : b.operations) {
      pbb->add_operations(static_cast<pb::KeyOperation>(op));
    }
    for (const auto& [k, v] : b.required_context) {
      (*pbb->mutable_required_context())[k] = v;
    }
    pbb->set_require_justification(b.require_justification);
    for (kms::JustificationReason r : b.allowed_reasons) {
      pbb->add_allowed_reasons(static_cast<pb::JustificationReason>(r));
    }
  }
}

void ToProto(const kms::AliasRecord& alias, pb::Alias* out) {
  out->set_name(alias.name);
  out->set_key_id(alias.key_id);
  ToProto(alias.create_time, out->mutable_create_time());
}

absl::StatusOr<kms::KeyPolicy> FromProto(const pb::KeyPolicy& policy) {
  kms::KeyPolicy out;
  out.version = policy.version();
  for (int i = 0; i < policy.bindings_size(); ++i) {
    const pb::PolicyBinding& b = policy.bindings(i);
    kms::PolicyBinding binding;
    binding.principals.assign(b.principals().begin(), b.principals().end());
    for (int op : b.operations()) {
      if (op < 1 || op > 6) {
        return absl::InvalidArgumentError(absl::StrCat(
            "policy.bindings[", i, "].operations: unknown value ", op));
      }
      binding.operations.push_back(static_cast<kms::KeyOperation>(op));
    }
    binding.required_context.insert(b.required_context().begin(),
                                    b.required_context().end());
    binding.require_justification = b.require_justification();
    for (int r : b.allowed_reasons()) {
      if (r < 1 || r > 6) {
        return absl::InvalidArgumentError(absl::StrCat(
            "policy.bindings[", i, "].allowed_reasons: unknown value ", r));
      }
      binding.allowed_reasons.push_back(
          static_cast<kms::JustificationReason>(r));
    }
    out.bindings.push_back(std::move(binding));
  }
  return out;
}

kms::EncryptionContext FromProto(
    const google::protobuf::Map<std::string, std::string>& context) {
  return kms::EncryptionContext(context.begin(), context.end());
}

absl::StatusOr<kms::JustificationParam> FromProto(
    const pb::AccessJustification& justification, bool present) {
  kms::JustificationParam out;
  if (!present) return out;
  int reason = justification.reason();
  if (reason < 1 || reason > 6) {
    return absl::InvalidArgumentError(
        "justification.reason: set one of the JustificationReason values");
  }
  if (justification.detail().size() > 1024) {
    return absl::InvalidArgumentError(
        "justification.detail: longer than 1024 bytes");
  }
  out.present = true;
  out.value.reason = static_cast<kms::JustificationReason>(reason);
  out.value.detail = justification.detail();
  return out;
}

absl::StatusOr<absl::Duration> FromProto(
    const google::protobuf::Duration& duration, absl::string_view field) {
  if (duration.seconds() < 0 || duration.nanos() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": must not be negative"));
  }
  return absl::Seconds(duration.seconds()) +
         absl::Nanoseconds(duration.nanos());
}

}  // namespace custos::server
