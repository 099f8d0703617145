#include "clients/bench/echo_server.h"

#include <signal.h>

#include <iostream>
#include <memory>

#include "absl/strings/str_cat.h"
#include "custos/bench/v1/echo.grpc.pb.h"
#include "hsm/hsm.h"
#include "hsm/module.h"
#include "kms/server/server_settings.h"

namespace custos::bench {
namespace {

namespace echo = ::custos::bench::v1;

// Thread-safe: the Hsm is.
class EchoService final : public echo::Echo::CallbackService {
 public:
  // `hsm` null: plain echo.
  EchoService(hsm::Hsm* hsm, std::string key_id)
      : hsm_(hsm), key_id_(std::move(key_id)) {}

  grpc::ServerUnaryReactor* Echo(grpc::CallbackServerContext* ctx,
                                 const echo::EchoRequest* req,
                                 echo::EchoResponse* resp) override {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    if (hsm_ == nullptr) {
      resp->set_payload(req->payload());
      reactor->Finish(grpc::Status::OK);
      return reactor;
    }
    absl::StatusOr<hsm::GcmSealed> sealed =
        hsm_->EncryptAesGcm(key_id_, "", req->payload());
    if (!sealed.ok()) {
      reactor->Finish(
          grpc::Status(static_cast<grpc::StatusCode>(sealed.status().code()),
                       std::string(sealed.status().message())));
      return reactor;
    }
    resp->mutable_payload()->append(sealed->iv).append(sealed->ciphertext);
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  hsm::Hsm* const hsm_;
  const std::string key_id_;
};

void WaitForStopSignal() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  int number = 0;
  sigwait(&signals, &number);
}

}  // namespace

absl::Status ServeEcho(const server::Config& config, const std::string& listen,
                       EchoMode mode) {
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> tls =
      server::ServerTlsCredentials(config.tls);
  if (!tls.ok()) return tls.status();

  std::unique_ptr<hsm::Module> module;
  std::unique_ptr<hsm::Hsm> hsm;
  std::string key_id;
  if (mode == EchoMode::kHsm) {
    absl::StatusOr<std::unique_ptr<hsm::Module>> loaded =
        hsm::Module::Load(config.hsm.module);
    if (!loaded.ok()) return loaded.status();
    module = *std::move(loaded);
    hsm::Hsm::Options options;
    options.token_label = config.hsm.token_label;
    options.pin_file = config.hsm.pin_file;
    options.pool.size = config.hsm.pool_size;
    options.pool.call_timeout = config.hsm.call_timeout;
    options.pool.lease_timeout = config.hsm.lease_timeout;
    absl::StatusOr<std::unique_ptr<hsm::Hsm>> opened =
        hsm::Hsm::Open(*module, options);
    if (!opened.ok()) return opened.status();
    hsm = *std::move(opened);
    // Not labelled "custos:...": a custosd sharing the token would take it
    // for an orphan of its own and destroy it.
    absl::StatusOr<std::string> id = hsm->GenerateAesKey("bench:echo");
    if (!id.ok()) return id.status();
    key_id = *id;
  }

  EchoService service(hsm.get(), key_id);
  grpc::ServerBuilder builder;
  const std::string address = listen.empty() ? config.listen : listen;
  int port = 0;
  builder.AddListeningPort(address, *tls, &port);
  builder.RegisterService(&service);
  server::ApplyLimits(config.limits, &builder);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  absl::Status result = absl::OkStatus();
  if (server == nullptr || port == 0) {
    result = absl::UnavailableError(
        absl::StrCat("--listen: cannot serve on ", address));
  } else {
    std::cout << "serving " << (mode == EchoMode::kHsm ? "hsm-echo" : "echo")
              << " on " << address << std::endl;
    WaitForStopSignal();
    server->Shutdown(std::chrono::system_clock::now() +
                     std::chrono::seconds(5));
    server->Wait();
  }
  if (hsm != nullptr) hsm->DestroyObjects(key_id).IgnoreError();
  return result;
}

}  // namespace custos::bench
