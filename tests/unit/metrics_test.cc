// The metrics core: values, families, callbacks and the exact text of the
// Prometheus exposition format 0.0.4.
#include "common/metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/testing/status_matchers.h"

namespace custos::metrics {
namespace {

using ::custos::testing::IsOk;
using ::custos::testing::StatusIs;
using ::testing::HasSubstr;

TEST(MetricsTest, RendersASmallRegistryExactly) {
  Registry registry;
  absl::StatusOr<Family<Counter>*> requests = registry.AddCounter(
      "custos_rpc_requests_total", "Calls finished, by method and code.",
      {"method", "code"});
  ASSERT_THAT(requests.status(), IsOk());
  (*requests)->WithLabels({"Encrypt", "OK"}).Increment(3);
  (*requests)->WithLabels({"Decrypt", "PERMISSION_DENIED"}).Increment();

  absl::StatusOr<Family<Gauge>*> temperature =
      registry.AddGauge("a_gauge", "Help with \\ and\nnewline.");
  ASSERT_THAT(temperature.status(), IsOk());
  (*temperature)->WithLabels({}).Set(-2.5);

  absl::StatusOr<Family<Histogram>*> latency = registry.AddHistogram(
      "custos_rpc_duration_seconds", "Latency.", {"method"}, {0.005, 0.1, 1});
  ASSERT_THAT(latency.status(), IsOk());
  Histogram& h = (*latency)->WithLabels({"Encrypt"});
  h.Observe(0.001);
  h.Observe(0.005);  // on a bound: counted in it (le = less or equal)
  h.Observe(0.25);
  h.Observe(7);

  absl::StatusOr<CallbackHandle> keys = registry.AddCallback(
      "custos_keys", "Keys by state.", Registry::Type::kGauge, {"state"}, [] {
        return std::vector<Sample>{{{"ENABLED"}, 2}, {{"DISABLED"}, 0}};
      });
  ASSERT_THAT(keys.status(), IsOk());

  EXPECT_EQ(registry.Render(),
            "# HELP a_gauge Help with \\\\ and\\nnewline.\n"
            "# TYPE a_gauge gauge\n"
            "a_gauge -2.5\n"
            "# HELP custos_keys Keys by state.\n"
            "# TYPE custos_keys gauge\n"
            "custos_keys{state=\"ENABLED\"} 2\n"
            "custos_keys{state=\"DISABLED\"} 0\n"
            "# HELP custos_rpc_duration_seconds Latency.\n"
            "# TYPE custos_rpc_duration_seconds histogram\n"
            "custos_rpc_duration_seconds_bucket{method=\"Encrypt\","
            "le=\"0.005\"} 2\n"
            "custos_rpc_duration_seconds_bucket{method=\"Encrypt\","
            "le=\"0.1\"} 2\n"
            "custos_rpc_duration_seconds_bucket{method=\"Encrypt\",le=\"1\"} "
            "3\n"
            "custos_rpc_duration_seconds_bucket{method=\"Encrypt\","
            "le=\"+Inf\"} 4\n"
            "custos_rpc_duration_seconds_sum{method=\"Encrypt\"} 7.256\n"
            "custos_rpc_duration_seconds_count{method=\"Encrypt\"} 4\n"
            "# HELP custos_rpc_requests_total Calls finished, by method and "
            "code.\n"
            "# TYPE custos_rpc_requests_total counter\n"
            "custos_rpc_requests_total{method=\"Decrypt\","
            "code=\"PERMISSION_DENIED\"} 1\n"
            "custos_rpc_requests_total{method=\"Encrypt\",code=\"OK\"} 3\n");
}

TEST(MetricsTest, LabelValuesEscapeBackslashQuoteAndNewline) {
  Registry registry;
  absl::StatusOr<Family<Counter>*> c =
      registry.AddCounter("c_total", "h", {"v"});
  ASSERT_THAT(c.status(), IsOk());
  (*c)->WithLabels({"a\\b\"c\nd"}).Increment();
  EXPECT_THAT(registry.Render(),
              HasSubstr("c_total{v=\"a\\\\b\\\"c\\nd\"} 1\n"));
}

TEST(MetricsTest, SpecialAndSmallValuesUsePrometheusSpelling) {
  Registry registry;
  absl::StatusOr<Family<Gauge>*> g = registry.AddGauge("g", "h", {"k"});
  ASSERT_THAT(g.status(), IsOk());
  (*g)->WithLabels({"inf"}).Set(INFINITY);
  (*g)->WithLabels({"minus_inf"}).Set(-INFINITY);
  (*g)->WithLabels({"nan"}).Set(NAN);
  (*g)->WithLabels({"small"}).Set(0.0001);
  (*g)->WithLabels({"tiny"}).Set(1e-7);
  (*g)->WithLabels({"whole"}).Set(42);
  const std::string text = registry.Render();
  EXPECT_THAT(text, HasSubstr("g{k=\"inf\"} +Inf\n"));
  EXPECT_THAT(text, HasSubstr("g{k=\"minus_inf\"} -Inf\n"));
  EXPECT_THAT(text, HasSubstr("g{k=\"nan\"} NaN\n"));
  EXPECT_THAT(text, HasSubstr("g{k=\"small\"} 0.0001\n"));
  EXPECT_THAT(text, HasSubstr("g{k=\"tiny\"} 1e-07\n"));
  EXPECT_THAT(text, HasSubstr("g{k=\"whole\"} 42\n"));
}

TEST(MetricsTest, LatencyBucketsRenderAsPlainDecimals) {
  Registry registry;
  ASSERT_THAT(
      registry.AddHistogram("h_seconds", "h", {}, LatencyBuckets()).status(),
      IsOk());
  (*registry.AddHistogram("h_seconds", "h", {}, LatencyBuckets()))
      ->WithLabels({})
      .Observe(0.0002);
  const std::string text = registry.Render();
  EXPECT_THAT(text, HasSubstr("h_seconds_bucket{le=\"0.0001\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("h_seconds_bucket{le=\"0.00025\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("h_seconds_bucket{le=\"10\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("h_seconds_bucket{le=\"+Inf\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("h_seconds_count 1\n"));
}

TEST(MetricsTest, HistogramIgnoresNanAndCountsEqualsInfBucket) {
  Histogram h({1, 2});
  h.Observe(NAN);
  h.Observe(-5);  // below every bound: the first bucket
  h.Observe(2);
  h.Observe(3);
  Histogram::Snapshot s = h.snapshot();
  EXPECT_EQ(s.cumulative, (std::vector<uint64_t>{1, 2, 3}));
  EXPECT_EQ(s.count, 3u);
  EXPECT_DOUBLE_EQ(s.sum, 0);
}

TEST(MetricsTest, EmptyFamiliesShowOnlyHelpAndType) {
  Registry registry;
  ASSERT_THAT(registry.AddCounter("x_total", "X.", {"a"}).status(), IsOk());
  EXPECT_EQ(registry.Render(), "# HELP x_total X.\n# TYPE x_total counter\n");
}

TEST(MetricsTest, ReRegisteringTheSameFamilyReturnsIt) {
  Registry registry;
  absl::StatusOr<Family<Counter>*> a = registry.AddCounter("x_total", "X.");
  absl::StatusOr<Family<Counter>*> b = registry.AddCounter("x_total", "X.");
  ASSERT_THAT(a.status(), IsOk());
  ASSERT_THAT(b.status(), IsOk());
  EXPECT_EQ(*a, *b);
}

TEST(MetricsTest, ConflictingRegistrationsAreRefused) {
  Registry registry;
  ASSERT_THAT(registry.AddCounter("x_total", "X.", {"a"}).status(), IsOk());
  EXPECT_THAT(registry.AddGauge("x_total", "X.", {"a"}).status(),
              StatusIs(absl::StatusCode::kAlreadyExists));
  EXPECT_THAT(registry.AddCounter("x_total", "X.", {"b"}).status(),
              StatusIs(absl::StatusCode::kAlreadyExists));
  EXPECT_THAT(registry
                  .AddCallback("x_total", "X.", Registry::Type::kCounter, {"a"},
                               [] { return std::vector<Sample>{}; })
                  .status(),
              StatusIs(absl::StatusCode::kAlreadyExists));
  ASSERT_THAT(registry.AddHistogram("h", "H.", {}, {1, 2}).status(), IsOk());
  EXPECT_THAT(registry.AddHistogram("h", "H.", {}, {1, 3}).status(),
              StatusIs(absl::StatusCode::kAlreadyExists));
}

TEST(MetricsTest, InvalidNamesLabelsAndBoundsAreRefused) {
  Registry registry;
  struct Case {
    std::string name;
    std::vector<std::string> labels;
    std::vector<double> bounds;
    std::string why;
  };
  const std::vector<Case> cases = {
      {"", {}, {1}, "metric name"},
      {"1abc", {}, {1}, "metric name"},
      {"a-b", {}, {1}, "metric name"},
      {"ok", {"a:b"}, {1}, "label name"},
      {"ok", {"__reserved"}, {1}, "label name"},
      {"ok", {"le"}, {1}, "label name"},
      {"ok", {"a", "a"}, {1}, "given twice"},
      {"ok", {}, {}, "no bucket bounds"},
      {"ok", {}, {2, 1}, "strictly increasing"},
      {"ok", {}, {1, 1}, "strictly increasing"},
      {"ok", {}, {1, INFINITY}, "finite"},
  };
  for (const Case& c : cases) {
    EXPECT_THAT(registry.AddHistogram(c.name, "h", c.labels, c.bounds).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.why)))
        << c.name;
  }
  EXPECT_THAT(registry.AddCounter("a:b_total", "colons are allowed").status(),
              IsOk());
}

TEST(MetricsTest, CallbacksRunAtEachScrapeUntilTheirHandleIsGone) {
  Registry registry;
  double depth = 3;
  absl::StatusOr<CallbackHandle> handle = registry.AddCallback(
      "queue_depth", "Depth.", Registry::Type::kGauge, [&] { return depth; });
  ASSERT_THAT(handle.status(), IsOk());
  EXPECT_THAT(registry.Render(), HasSubstr("\nqueue_depth 3\n"));
  depth = 5;
  EXPECT_THAT(registry.Render(), HasSubstr("\nqueue_depth 5\n"));

  // A second callback under the same name adds its samples.
  absl::StatusOr<CallbackHandle> second = registry.AddCallback(
      "queue_depth", "Depth.", Registry::Type::kGauge, [] { return 7.0; });
  ASSERT_THAT(second.status(), IsOk());
  EXPECT_THAT(registry.Render(), HasSubstr("\nqueue_depth 5\nqueue_depth 7\n"));

  CallbackHandle moved = *std::move(handle);
  moved.Reset();
  *second = CallbackHandle();
  EXPECT_EQ(registry.Render(),
            "# HELP queue_depth Depth.\n# TYPE queue_depth gauge\n");
}

TEST(MetricsTest, CallbackSamplesWithTheWrongLabelCountAreLeftOut) {
  Registry registry;
  absl::StatusOr<CallbackHandle> handle = registry.AddCallback(
      "c_total", "C.", Registry::Type::kCounter, {"a"}, [] {
        return std::vector<Sample>{{{"x"}, 1}, {{}, 2}, {{"y", "z"}, 3}};
      });
  ASSERT_THAT(handle.status(), IsOk());
  EXPECT_EQ(registry.Render(),
            "# HELP c_total C.\n# TYPE c_total counter\nc_total{a=\"x\"} 1\n");
}

TEST(MetricsTest, CodeCountersMakeOnlyTheCodesSeen) {
  Registry registry;
  absl::StatusOr<Family<Counter>*> family =
      registry.AddCounter("ops_total", "Ops.", {"op", "code"});
  ASSERT_THAT(family.status(), IsOk());
  CodeCounters codes(*family, {"Sign"});
  codes.Increment(0);
  codes.Increment(0);
  codes.Increment(7);
  codes.Increment(99);  // out of range: UNKNOWN
  EXPECT_EQ(registry.Render(),
            "# HELP ops_total Ops.\n"
            "# TYPE ops_total counter\n"
            "ops_total{op=\"Sign\",code=\"OK\"} 2\n"
            "ops_total{op=\"Sign\",code=\"PERMISSION_DENIED\"} 1\n"
            "ops_total{op=\"Sign\",code=\"UNKNOWN\"} 1\n");
}

TEST(MetricsTest, CodeNamesMatchAbsl) {
  for (int code = 0; code <= 16; ++code) {
    EXPECT_EQ(CodeName(code),
              absl::StatusCodeToString(static_cast<absl::StatusCode>(code)));
  }
  EXPECT_EQ(CodeName(-1), "UNKNOWN");
  EXPECT_EQ(CodeName(17), "UNKNOWN");
}

TEST(MetricsTest, ConcurrentUpdatesAndScrapesLoseNothing) {
  Registry registry;
  Family<Counter>* counters = *registry.AddCounter("c_total", "C.", {"t"});
  Family<Histogram>* histograms =
      *registry.AddHistogram("h_seconds", "H.", {"t"}, {0.5, 1.5});
  Family<Gauge>* gauges = *registry.AddGauge("g", "G.");
  Family<Counter>* codes_family =
      *registry.AddCounter("codes_total", "Codes.", {"code"});
  CodeCounters codes(codes_family, {});
  constexpr int kThreads = 8;
  constexpr int kIterations = 30000;  // divisible by 2 and 3
  std::atomic<bool> done{false};
  std::thread scraper([&] {
    while (!done.load()) {
      std::string text = registry.Render();
      ASSERT_FALSE(text.empty());
    }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Half the threads share one child, so children are made in races.
      const std::string label = t % 2 == 0 ? "shared" : std::to_string(t);
      Counter& counter = counters->WithLabels({label});
      Histogram& histogram = histograms->WithLabels({label});
      for (int i = 0; i < kIterations; ++i) {
        counter.Increment();
        histogram.Observe(i % 2);  // 0 and 1: sums are exact
        gauges->WithLabels({}).Add(1);
        codes.Increment(i % 3);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  done = true;
  scraper.join();

  EXPECT_EQ(counters->WithLabels({"shared"}).value(),
            uint64_t{kThreads / 2} * kIterations);
  EXPECT_EQ(counters->WithLabels({"1"}).value(), uint64_t{kIterations});
  Histogram::Snapshot shared = histograms->WithLabels({"shared"}).snapshot();
  EXPECT_EQ(shared.count, uint64_t{kThreads / 2} * kIterations);
  EXPECT_EQ(shared.cumulative[0], shared.count / 2);  // the zeros
  EXPECT_DOUBLE_EQ(shared.sum, kThreads / 2 * kIterations / 2);
  EXPECT_DOUBLE_EQ(gauges->WithLabels({}).value(), kThreads * kIterations);
  const std::string text = registry.Render();
  const int per_code = kThreads * kIterations / 3;
  EXPECT_THAT(text, HasSubstr(absl::StrCat("codes_total{code=\"CANCELLED\"} ",
                                           per_code, "\n")));
}

}  // namespace
}  // namespace custos::metrics
