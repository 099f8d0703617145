// Metrics: counters, gauges and histograms, with labels, collected in a
// Registry that renders the Prometheus text exposition format, version 0.0.4
// (https://prometheus.io/docs/instrumenting/exposition_formats/). No HTTP
// here: kms/server/metrics_http.h serves Registry::Render().
//
// Costs on the hot path: Counter::Increment is one relaxed atomic add;
// Gauge::Set one atomic store; Histogram::Observe a binary search over its
// bounds and two atomic adds (a bucket and the sum). No lock, no allocation.
// Finding a labelled child (Family::WithLabels) takes the family's mutex and
// builds a key: do it once and keep the pointer (LazyChild and CodeCounters
// below do that for children first used on the hot path).
//
// Values are read without stopping writers: a scrape taken during updates
// sees each atomic at some moment, so a histogram's _sum may lag its _count
// by an observation in flight. _count always equals the +Inf bucket.
#ifndef CUSTOS_COMMON_METRICS_H_
#define CUSTOS_COMMON_METRICS_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace custos::metrics {

// A count that only goes up (requests, errors). Thread-safe, lock-free.
class Counter {
 public:
  Counter() = default;
  Counter(const Counter&) = delete;
  Counter& operator=(const Counter&) = delete;

  void Increment(uint64_t n = 1) {
    value_.fetch_add(n, std::memory_order_relaxed);
  }
  uint64_t value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> value_{0};
};

// A value that goes up and down. Thread-safe, lock-free.
class Gauge {
 public:
  Gauge() = default;
  Gauge(const Gauge&) = delete;
  Gauge& operator=(const Gauge&) = delete;

  void Set(double value) { value_.store(value, std::memory_order_relaxed); }
  void Add(double delta) { value_.fetch_add(delta, std::memory_order_relaxed); }
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

// Counts observations (latencies, in seconds) into fixed buckets, each
// counting the observations <= its upper bound, plus +Inf; also their sum.
// Thread-safe, lock-free.
class Histogram {
 public:
  // `bounds`: finite, strictly increasing upper bounds (+Inf is implied);
  // Registry::AddHistogram checks them.
  explicit Histogram(std::vector<double> bounds);
  Histogram(const Histogram&) = delete;
  Histogram& operator=(const Histogram&) = delete;

  // NaN is ignored (it would make the sum NaN for good).
  void Observe(double value);

  struct Snapshot {
    std::vector<uint64_t> cumulative;  // per bound, then +Inf (= count)
    uint64_t count = 0;
    double sum = 0;
  };
  Snapshot snapshot() const;
  const std::vector<double>& bounds() const { return bounds_; }

 private:
  const std::vector<double> bounds_;
  // Non-cumulative: buckets_[i] counts values in (bounds_[i-1], bounds_[i]];
  // the last one counts values above every bound.
  const std::unique_ptr<std::atomic<uint64_t>[]> buckets_;
  std::atomic<double> sum_{0};
};

// Latency buckets, in seconds, for calls from a tenth of a millisecond to
// ten seconds (HSM timeouts are seconds long).
std::vector<double> LatencyBuckets();

// The children of one metric name, one per combination of label values,
// created on first use and never removed (label values must come from small
// fixed sets: RPC names, status codes, never request data). Thread-safe.
template <typename T>
class Family {
 public:
  Family(const Family&) = delete;
  Family& operator=(const Family&) = delete;

  // The child with these label values, one per label name, in order (a
  // different number is a programming error and aborts). The reference
  // lives as long as the Registry.
  T& WithLabels(const std::vector<std::string>& values);
  const std::vector<std::string>& label_names() const { return label_names_; }

 private:
  friend class Registry;
  struct Child {
    std::string labels;  // rendered: a="x",b="y" (escaped)
    std::unique_ptr<T> metric;
  };

  Family(std::vector<std::string> label_names, std::vector<double> bounds)
      : label_names_(std::move(label_names)), bounds_(std::move(bounds)) {}
  void Render(const std::string& name, std::string* out) const;

  const std::vector<std::string> label_names_;
  const std::vector<double> bounds_;  // histograms only
  mutable absl::Mutex mu_;
  // Ordered, so that the exposition is stable.
  std::map<std::vector<std::string>, Child> children_ ABSL_GUARDED_BY(mu_);
};

// Instantiated in metrics.cc.
template <>
void Family<Counter>::Render(const std::string& name, std::string* out) const;
template <>
void Family<Gauge>::Render(const std::string& name, std::string* out) const;
template <>
void Family<Histogram>::Render(const std::string& name, std::string* out) const;
extern template class Family<Counter>;
extern template class Family<Gauge>;
extern template class Family<Histogram>;

// A child of a family with label values fixed in advance, made on its first
// use: families whose every combination would be mostly zeros (RPC x code)
// then show only what happened. Afterwards Get() is one atomic load.
// Thread-safe.
template <typename T>
class LazyChild {
 public:
  LazyChild(Family<T>* family, std::vector<std::string> label_values)
      : family_(family), label_values_(std::move(label_values)) {}
  LazyChild(const LazyChild&) = delete;
  LazyChild& operator=(const LazyChild&) = delete;

  T& Get() {
    T* child = child_.load(std::memory_order_acquire);
    if (child == nullptr) {
      // Racing first uses find the same child.
      child = &family_->WithLabels(label_values_);
      child_.store(child, std::memory_order_release);
    }
    return *child;
  }

 private:
  Family<T>* const family_;
  const std::vector<std::string> label_values_;
  std::atomic<T*> child_{nullptr};
};

// Counts outcomes by status code (absl and gRPC codes are equal): the
// children of a counter family whose last label is "code", with the other
// label values fixed, each made on first use. Thread-safe.
class CodeCounters {
 public:
  // `family`'s label names end with "code"; `leading` gives the others.
  CodeCounters(Family<Counter>* family, std::vector<std::string> leading);
  CodeCounters(const CodeCounters&) = delete;
  CodeCounters& operator=(const CodeCounters&) = delete;

  // Codes outside 0..16 count as UNKNOWN.
  void Increment(int code);

 private:
  static constexpr int kCodes = 17;  // OK .. UNAUTHENTICATED
  std::array<std::unique_ptr<LazyChild<Counter>>, kCodes> by_code_;
};

// The name of a status code as Prometheus labels show it: "OK",
// "PERMISSION_DENIED", ...; UNKNOWN outside 0..16.
std::string CodeName(int code);

// One sample of a callback metric: label values (one per label name) and
// the value.
struct Sample {
  std::vector<std::string> label_values;
  double value = 0;
};

class Registry;

// Keeps a callback registered; unregisters it on destruction (waiting for a
// scrape that is calling it). Hold it in the object the callback reads, so
// that the callback never outlives what it reads. Move-only; not
// thread-safe (one owner), though handles of one registry may be dropped
// on any threads at once.
class CallbackHandle {
 public:
  CallbackHandle() = default;
  CallbackHandle(CallbackHandle&& other) noexcept;
  CallbackHandle& operator=(CallbackHandle&& other) noexcept;
  CallbackHandle(const CallbackHandle&) = delete;
  CallbackHandle& operator=(const CallbackHandle&) = delete;
  ~CallbackHandle() { Reset(); }

  void Reset();

 private:
  friend class Registry;
  CallbackHandle(Registry* registry, uint64_t id)
      : registry_(registry), id_(id) {}
  Registry* registry_ = nullptr;
  uint64_t id_ = 0;
};

// Every metric of a process, by name, and their rendering. Metrics are
// registered once (at start-up) and live as long as the registry; callback
// metrics are read at scrape time. One Registry per process, created in
// main and passed to each component (a null Registry* means no metrics).
// Thread-safe.
class Registry {
 public:
  enum class Type { kCounter, kGauge, kHistogram };

  Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;
  // Every CallbackHandle must be gone first.
  ~Registry();

  // Registers a family, or returns the one already under `name` if it has
  // the same type, label names (and bounds): two components may share one.
  // INVALID_ARGUMENT for a name or label name Prometheus does not accept
  // ([a-zA-Z_:][a-zA-Z0-9_:]* and [a-zA-Z_][a-zA-Z0-9_]*, not "__..."),
  // histogram bounds that are not finite and increasing, or a histogram
  // label "le"; ALREADY_EXISTS if `name` is taken by something else.
  absl::StatusOr<Family<Counter>*> AddCounter(
      const std::string& name, const std::string& help,
      std::vector<std::string> label_names = {});
  absl::StatusOr<Family<Gauge>*> AddGauge(
      const std::string& name, const std::string& help,
      std::vector<std::string> label_names = {});
  absl::StatusOr<Family<Histogram>*> AddHistogram(
      const std::string& name, const std::string& help,
      std::vector<std::string> label_names, std::vector<double> bounds);

  // A counter or gauge whose samples `callback` returns at each scrape
  // (pool use, queue depth, keys by state: values another object already
  // keeps). Several callbacks may share a name (same type and labels):
  // their samples are listed together. The callback runs under the
  // registry's lock: it must be quick and must not use the registry.
  using Callback = std::function<std::vector<Sample>()>;
  absl::StatusOr<CallbackHandle> AddCallback(
      const std::string& name, const std::string& help, Type type,
      std::vector<std::string> label_names, Callback callback);
  // The same for one unlabelled value.
  absl::StatusOr<CallbackHandle> AddCallback(const std::string& name,
                                             const std::string& help, Type type,
                                             std::function<double()> value);

  // Every metric, sorted by name, in the text format 0.0.4: "# HELP" and
  // "# TYPE" lines, then the samples (histograms as _bucket{le=...}, _sum
  // and _count). Served as "text/plain; version=0.0.4".
  std::string Render() const;

 private:
  friend class CallbackHandle;
  struct Entry;

  absl::StatusOr<Entry*> AddLocked(const std::string& name,
                                   const std::string& help, Type type,
                                   bool callback,
                                   const std::vector<std::string>& label_names,
                                   const std::vector<double>& bounds)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RemoveCallback(uint64_t id);

  mutable absl::Mutex mu_;
  std::map<std::string, std::unique_ptr<Entry>> entries_ ABSL_GUARDED_BY(mu_);
  uint64_t next_callback_id_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace custos::metrics

#endif  // CUSTOS_COMMON_METRICS_H_
