#include "clients/bench/populate.h"

#include <atomic>
#include <iostream>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "clients/bench/channel.h"
#include "custos/v1/kms.grpc.pb.h"

namespace custos::bench {

namespace pb = ::custos::v1;

absl::StatusOr<int> CreateKeys(const PopulateOptions& o) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = ConnectChannel(
      o.address, TlsFiles{o.ca_file, o.cert_file, o.key_file}, 0);
  if (!channel.ok()) return channel.status();
  std::unique_ptr<pb::KeyManagementService::Stub> stub =
      pb::KeyManagementService::NewStub(*channel);

  pb::CreateKeyRequest request;
  request.set_description("custos-bench population");
  (*request.mutable_labels())["bench"] = "population";
  pb::PolicyBinding* binding = request.mutable_policy()->add_bindings();
  binding->add_principals(o.principal);
  for (pb::KeyOperation op :
       {pb::GENERATE_DATA_KEY, pb::GENERATE_DATA_KEY_WITHOUT_PLAINTEXT,
        pb::DECRYPT, pb::ENCRYPT}) {
    binding->add_operations(op);
  }

  std::atomic<int> next{0}, created{0};
  std::mutex mu;
  absl::Status first_error;
  auto work = [&] {
    for (;;) {
      const int i = next++;
      if (i >= o.count) return;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (!first_error.ok()) return;
      }
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(60));
      pb::Key key;
      grpc::Status s = stub->CreateKey(&ctx, request, &key);
      if (!s.ok()) {
        std::lock_guard<std::mutex> lock(mu);
        if (first_error.ok()) {
          first_error = absl::Status(
              static_cast<absl::StatusCode>(s.error_code()),
              absl::StrCat("CreateKey: ", s.error_message(),
                           " (is --cert an admin's certificate?)"));
        }
        return;
      }
      const int done = ++created;
      if (o.progress && o.count >= 10 && done % (o.count / 10) == 0) {
        std::cerr << "custos-bench: created " << done << " of " << o.count
                  << " keys\n";
      }
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < std::max(1, o.threads); ++t) threads.emplace_back(work);
  for (std::thread& t : threads) t.join();
  if (!first_error.ok()) {
    return absl::Status(first_error.code(),
                        absl::StrCat(first_error.message(), "; ",
                                     created.load(), " keys were created"));
  }
  return created.load();
}

}  // namespace custos::bench
