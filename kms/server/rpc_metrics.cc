#include "kms/server/rpc_metrics.h"

#include <google/protobuf/descriptor.h>

#include <chrono>

#include "absl/strings/str_cat.h"

namespace custos::server {
namespace {

// gRPC's own services, which custosd serves beside its own; their
// descriptors are not in the protobuf generated pool.
constexpr const char* kGrpcMethods[] = {
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
};

// One call's recorder, made by gRPC when the call starts and deleted with
// it; records the call when its status goes out. gRPC runs its hooks one at
// a time.
class Interceptor final : public grpc::experimental::Interceptor {
 public:
  explicit Interceptor(RpcMetrics::Method* method)
      : method_(method), start_(std::chrono::steady_clock::now()) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* batch) override {
    if (batch->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      method_->duration.Get().Observe(
          std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                        start_)
              .count());
      method_->codes.Increment(
          static_cast<int>(batch->GetSendStatus().error_code()));
    }
    batch->Proceed();
  }

 private:
  RpcMetrics::Method* const method_;
  const std::chrono::steady_clock::time_point start_;
};

// Makes the recorder of each call. Thread-safe (stateless).
class InterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit InterceptorFactory(RpcMetrics* metrics) : metrics_(metrics) {}

  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    const char* method = info->method();
    return new Interceptor(&metrics_->ForPath(method == nullptr ? "" : method));
  }

 private:
  RpcMetrics* const metrics_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<RpcMetrics>> RpcMetrics::Create(
    metrics::Registry& registry, const std::vector<std::string>& services) {
  absl::StatusOr<metrics::Family<metrics::Counter>*> requests =
      registry.AddCounter("custos_rpc_requests_total",
                          "gRPC calls finished, by service, method and "
                          "status code.",
                          {"service", "method", "code"});
  if (!requests.ok()) return requests.status();
  absl::StatusOr<metrics::Family<metrics::Histogram>*> durations =
      registry.AddHistogram("custos_rpc_duration_seconds",
                            "Time from a gRPC call's start to its status, by "
                            "service and method.",
                            {"service", "method"}, metrics::LatencyBuckets());
  if (!durations.ok()) return durations.status();

  std::unique_ptr<RpcMetrics> m(new RpcMetrics());
  auto add = [&](absl::string_view path) {
    // "/package.Service/Method"
    const size_t slash = path.rfind('/');
    m->methods_[path] = std::make_unique<Method>(
        *requests, *durations, std::string(path.substr(1, slash - 1)),
        std::string(path.substr(slash + 1)));
  };
  for (const std::string& name : services) {
    const google::protobuf::ServiceDescriptor* service =
        google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
            name);
    if (service == nullptr) {
      return absl::NotFoundError(
          absl::StrCat("metrics: no service ", name, " in this binary"));
    }
    for (int i = 0; i < service->method_count(); ++i) {
      add(absl::StrCat("/", service->full_name(), "/",
                       service->method(i)->name()));
    }
  }
  for (const char* path : kGrpcMethods) add(path);
  m->unknown_ =
      std::make_unique<Method>(*requests, *durations, "unknown", "unknown");
  return m;
}

RpcMetrics::Method& RpcMetrics::ForPath(absl::string_view path) {
  auto it = methods_.find(path);
  return it == methods_.end() ? *unknown_ : *it->second;
}

void RpcMetrics::InstallOn(grpc::ServerBuilder* builder) {
  std::vector<
      std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
      factories;
  factories.push_back(std::make_unique<InterceptorFactory>(this));
  builder->experimental().SetInterceptorCreators(std::move(factories));
}

}  // namespace custos::server
