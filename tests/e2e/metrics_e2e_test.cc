// End to end: a real custosd with metrics_listen, scraped over plain HTTP
// (a socket client of the test's own) around a few calls: the counters of
// each (method, code) pair grow by exactly the calls made, latency
// histograms count them, and the HSM, pool, audit and key metrics are there
// and agree with what the service reports.
#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <map>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "custos/v1/kms.grpc.pb.h"
#include "tests/support/custosd_process.h"

namespace custos {
namespace {

namespace pb = ::custos::v1;
using ::custos::testing::CustosdProcess;
using ::testing::HasSubstr;

struct HttpResponse {
  int status = 0;
  std::string headers;  // the status line and headers, CRLF-separated
  std::string body;
};

// One HTTP/1.1 request over a fresh connection to `address` (IPv4:port).
absl::StatusOr<HttpResponse> Http(const std::string& address,
                                  const std::string& method,
                                  const std::string& path) {
  const size_t colon = address.rfind(':');
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  int port = 0;
  if (colon == std::string::npos ||
      !absl::SimpleAtoi(address.substr(colon + 1), &port) ||
      inet_pton(AF_INET, address.substr(0, colon).c_str(), &addr.sin_addr) !=
          1) {
    return absl::InvalidArgumentError("bad address " + address);
  }
  addr.sin_port = htons(static_cast<uint16_t>(port));
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError("socket failed");
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return absl::UnavailableError("cannot connect to " + address);
  }
  const std::string request =
      absl::StrCat(method, " ", path, " HTTP/1.1\r\nHost: ", address,
                   "\r\nConnection: close\r\n\r\n");
  if (write(fd, request.data(), request.size()) !=
      static_cast<ssize_t>(request.size())) {
    close(fd);
    return absl::UnavailableError("write failed");
  }
  std::string raw;
  char buffer[16384];
  for (;;) {
    const ssize_t n = read(fd, buffer, sizeof(buffer));
    if (n <= 0) break;
    raw.append(buffer, static_cast<size_t>(n));
  }
  close(fd);
  const size_t end = raw.find("\r\n\r\n");
  HttpResponse response;
  std::vector<std::string> status_line = absl::StrSplit(raw, ' ');
  if (end == std::string::npos || status_line.size() < 2 ||
      !absl::SimpleAtoi(status_line[1], &response.status)) {
    return absl::DataLossError("not an HTTP response: " + raw.substr(0, 200));
  }
  response.headers = raw.substr(0, end);
  response.body = raw.substr(end + 4);
  return response;
}

// Every sample of an exposition, by its series (name{labels}).
using Samples = std::map<std::string, double>;

Samples Parse(const std::string& text) {
  Samples samples;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    double value = 0;
    EXPECT_NE(space, absl::string_view::npos) << line;
    if (space == absl::string_view::npos) continue;
    EXPECT_TRUE(absl::SimpleAtod(line.substr(space + 1), &value)) << line;
    const bool fresh =
        samples.emplace(std::string(line.substr(0, space)), value).second;
    EXPECT_TRUE(fresh) << "series listed twice: " << line;
  }
  return samples;
}

// The value of `series`, or 0 when it is absent (a series appears on its
// first use).
double Value(const Samples& samples, const std::string& series) {
  auto it = samples.find(series);
  return it == samples.end() ? 0 : it->second;
}

std::string Rpc(const std::string& method) {
  return absl::StrCat("service=\"custos.v1.CryptoService\",method=\"", method,
                      "\"");
}

class MetricsE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    CustosdProcess::Options options;
    options.metrics = true;
    auto server = CustosdProcess::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }

  static Samples Scrape() {
    absl::StatusOr<HttpResponse> r =
        Http(server_->metrics_address(), "GET", "/metrics");
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return {};
    EXPECT_EQ(r->status, 200) << r->headers;
    EXPECT_THAT(r->headers,
                HasSubstr("Content-Type: text/plain; version=0.0.4"));
    return Parse(r->body);
  }

  static grpc::Status GenerateDataKey(const std::string& who,
                                      const std::string& key) {
    pb::GenerateDataKeyRequest req;
    req.set_key(key);
    pb::GenerateDataKeyResponse resp;
    grpc::ClientContext ctx;
    return pb::CryptoService::NewStub(server_->Channel(who))
        ->GenerateDataKey(&ctx, req, &resp);
  }

  static CustosdProcess* server_;
};
CustosdProcess* MetricsE2eTest::server_ = nullptr;

TEST_F(MetricsE2eTest, CountsEachCallOnceByMethodAndCodeWithItsLatency) {
  absl::StatusOr<std::string> key =
      server_->CreateKeyFor("service-a", {pb::GENERATE_DATA_KEY});
  ASSERT_TRUE(key.ok()) << key.status();
  const Samples before = Scrape();

  constexpr int kAllowed = 3;
  constexpr int kRefused = 2;
  for (int i = 0; i < kAllowed; ++i) {
    grpc::Status s = GenerateDataKey("service-a", *key);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  for (int i = 0; i < kRefused; ++i) {
    // service-b is not in the key's policy.
    EXPECT_EQ(GenerateDataKey("service-b", *key).error_code(),
              grpc::StatusCode::PERMISSION_DENIED);
  }
  const Samples after = Scrape();

  const std::string gdk = Rpc("GenerateDataKey");
  const auto delta = [&](const std::string& series) {
    return Value(after, series) - Value(before, series);
  };
  EXPECT_EQ(
      delta(absl::StrCat("custos_rpc_requests_total{", gdk, ",code=\"OK\"}")),
      kAllowed);
  EXPECT_EQ(delta(absl::StrCat("custos_rpc_requests_total{", gdk,
                               ",code=\"PERMISSION_DENIED\"}")),
            kRefused);
  const std::string count =
      absl::StrCat("custos_rpc_duration_seconds_count{", gdk, "}");
  EXPECT_EQ(delta(count), kAllowed + kRefused);
  EXPECT_GT(delta(absl::StrCat("custos_rpc_duration_seconds_sum{", gdk, "}")),
            0);
  // Buckets are cumulative and end at the count.
  EXPECT_EQ(Value(after, absl::StrCat("custos_rpc_duration_seconds_bucket{",
                                      gdk, ",le=\"+Inf\"}")),
            Value(after, count));
  double previous = 0;
  for (const char* le : {"0.0001", "0.001", "0.01", "0.1", "1", "10"}) {
    const double v = Value(after, absl::StrCat("custos_rpc_duration_seconds_"
                                               "bucket{",
                                               gdk, ",le=\"", le, "\"}"));
    EXPECT_GE(v, previous) << le;
    previous = v;
  }
  // The key's creation is counted under its own service.
  EXPECT_GE(Value(after,
                  "custos_rpc_requests_total{service=\"custos.v1."
                  "KeyManagementService\",method=\"CreateKey\",code=\"OK\"}"),
            1);

  // Each allowed call made one HSM operation; refused ones none.
  const std::string seal = "operation=\"GenerateAndSealAesGcm\"";
  EXPECT_EQ(delta(absl::StrCat("custos_hsm_operations_total{", seal,
                               ",code=\"OK\"}")),
            kAllowed);
  EXPECT_EQ(delta(absl::StrCat("custos_hsm_operation_duration_seconds_count{",
                               seal, "}")),
            kAllowed);
  EXPECT_GE(delta("custos_hsm_pool_wait_seconds_count"), kAllowed);
  EXPECT_EQ(Value(after, "custos_hsm_pool_sessions"), 2);  // dev-env's pool
  // Background work (reconciliation, checkpoints) may hold a session.
  EXPECT_LE(Value(after, "custos_hsm_pool_sessions_in_use"), 2);
  EXPECT_EQ(after.count("custos_hsm_pool_queued_operations"), 1u);
  EXPECT_EQ(Value(after, "custos_hsm_pool_lease_timeouts_total"), 0);

  // Every call, allowed or refused, left a durable audit record.
  EXPECT_GE(delta("custos_audit_records_total"), kAllowed + kRefused);
  EXPECT_GE(delta("custos_audit_fsync_duration_seconds_count"), 1);
  EXPECT_EQ(Value(after, "custos_audit_write_failures_total"), 0);
  EXPECT_EQ(after.count("custos_audit_queue_depth"), 1u);
}

TEST_F(MetricsE2eTest, KeysByStateMatchTheKeysListed) {
  absl::StatusOr<std::string> a =
      server_->CreateKeyFor("service-a", {pb::ENCRYPT});
  absl::StatusOr<std::string> b =
      server_->CreateKeyFor("service-a", {pb::ENCRYPT});
  ASSERT_TRUE(a.ok() && b.ok());
  {
    pb::DisableKeyRequest req;
    req.set_key(*b);
    pb::Key resp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(pb::KeyManagementService::NewStub(server_->Channel("admin"))
                    ->DisableKey(&ctx, req, &resp)
                    .ok());
  }
  std::map<std::string, int> listed = {{"ENABLED", 0},
                                       {"DISABLED", 0},
                                       {"PENDING_DELETION", 0},
                                       {"DESTROYED", 0}};
  std::string token;
  do {
    pb::ListKeysRequest req;
    req.set_page_size(100);
    req.set_page_token(token);
    pb::ListKeysResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s =
        pb::KeyManagementService::NewStub(server_->Channel("admin"))
            ->ListKeys(&ctx, req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    for (const pb::Key& k : resp.keys()) ++listed[pb::KeyState_Name(k.state())];
    token = resp.next_page_token();
  } while (!token.empty());
  ASSERT_GE(listed["DISABLED"], 1);

  const Samples samples = Scrape();
  for (const auto& [state, n] : listed) {
    EXPECT_EQ(
        Value(samples, absl::StrCat("custos_keys{state=\"", state, "\"}")), n)
        << state;
    EXPECT_EQ(samples.count(absl::StrCat("custos_keys{state=\"", state, "\"}")),
              1u);
  }
}

TEST_F(MetricsE2eTest, UnknownMethodsShareOneSeries) {
  const Samples before = Scrape();
  grpc::GenericStub stub(server_->Channel("admin"));
  for (const char* method :
       {"/custos.v1.CryptoService/NoSuchMethod", "/no.Such/Service"}) {
    grpc::ClientContext ctx;
    grpc::CompletionQueue cq;
    grpc::ByteBuffer request, response;
    std::unique_ptr<grpc::GenericClientAsyncResponseReader> call =
        stub.PrepareUnaryCall(&ctx, method, request, &cq);
    call->StartCall();
    grpc::Status status;
    call->Finish(&response, &status, reinterpret_cast<void*>(1));
    void* tag = nullptr;
    bool ok = false;
    ASSERT_TRUE(cq.Next(&tag, &ok));
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED) << method;
  }
  const Samples after = Scrape();
  const std::string unknown =
      "custos_rpc_requests_total{service=\"unknown\",method=\"unknown\","
      "code=\"UNIMPLEMENTED\"}";
  EXPECT_EQ(Value(after, unknown) - Value(before, unknown), 2);
  for (const auto& [series, value] : after) {
    EXPECT_THAT(series, ::testing::Not(HasSubstr("NoSuch"))) << series;
  }
}

TEST_F(MetricsE2eTest, OnlyGetAndHeadOfSlashMetricsAreServed) {
  absl::StatusOr<HttpResponse> root =
      Http(server_->metrics_address(), "GET", "/");
  ASSERT_TRUE(root.ok()) << root.status();
  EXPECT_EQ(root->status, 404);
  absl::StatusOr<HttpResponse> below =
      Http(server_->metrics_address(), "GET", "/metrics/extra");
  ASSERT_TRUE(below.ok()) << below.status();
  EXPECT_EQ(below->status, 404);
  absl::StatusOr<HttpResponse> post =
      Http(server_->metrics_address(), "POST", "/metrics");
  ASSERT_TRUE(post.ok()) << post.status();
  EXPECT_EQ(post->status, 405);
  EXPECT_THAT(post->headers, HasSubstr("Allow: GET, HEAD"));
  absl::StatusOr<HttpResponse> head =
      Http(server_->metrics_address(), "HEAD", "/metrics");
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_EQ(head->status, 200);
  EXPECT_TRUE(head->body.empty());
}

}  // namespace
}  // namespace custos
