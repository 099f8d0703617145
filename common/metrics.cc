#include "common/metrics.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace custos::metrics {
namespace {

// A float as Prometheus's own clients write it (Go's %g with the shortest
// precision that reads back exactly), and its special values.
std::string FormatValue(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  char buffer[32];
  std::to_chars_result r = std::to_chars(buffer, buffer + sizeof(buffer), value,
                                         std::chars_format::general);
  return std::string(buffer, r.ptr);
}

// Label values escape backslash, double quote and line feed; HELP text
// escapes backslash and line feed (exposition format 0.0.4).
void AppendEscaped(absl::string_view text, bool quote, std::string* out) {
  for (char c : text) {
    switch (c) {
      case '\\':
        out->append("\\\\");
        break;
      case '\n':
        out->append("\\n");
        break;
      case '"':
        if (quote) {
          out->append("\\\"");
        } else {
          out->push_back(c);
        }
        break;
      default:
        out->push_back(c);
    }
  }
}

// name="value",... without braces.
std::string RenderLabels(const std::vector<std::string>& names,
                         const std::vector<std::string>& values) {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out.push_back(',');
    absl::StrAppend(&out, names[i], "=\"");
    AppendEscaped(values[i], /*quote=*/true, &out);
    out.push_back('"');
  }
  return out;
}

// One sample line: name{labels} value, with `extra` (e.g. le="0.5") added
// to the labels.
void AppendSample(absl::string_view name, absl::string_view labels,
                  absl::string_view extra, absl::string_view value,
                  std::string* out) {
  out->append(name.data(), name.size());
  if (!labels.empty() || !extra.empty()) {
    out->push_back('{');
    out->append(labels.data(), labels.size());
    if (!labels.empty() && !extra.empty()) out->push_back(',');
    out->append(extra.data(), extra.size());
    out->push_back('}');
  }
  out->push_back(' ');
  out->append(value.data(), value.size());
  out->push_back('\n');
}

bool ValidName(absl::string_view name, bool colons) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                    c == '_' || (colons && c == ':') ||
                    (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

const char* TypeName(Registry::Type type) {
  switch (type) {
    case Registry::Type::kCounter:
      return "counter";
    case Registry::Type::kGauge:
      return "gauge";
    case Registry::Type::kHistogram:
      return "histogram";
  }
  return "untyped";
}

}  // namespace

// ---- Histogram ----------------------------------------------------------

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)),
      buckets_(new std::atomic<uint64_t>[bounds_.size() + 1]) {
  for (size_t i = 0; i <= bounds_.size(); ++i) buckets_[i].store(0);
}

void Histogram::Observe(double value) {
  if (std::isnan(value)) return;
  const size_t i =
      std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin();
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(value, std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::snapshot() const {
  Snapshot s;
  s.cumulative.reserve(bounds_.size() + 1);
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    s.count += buckets_[i].load(std::memory_order_relaxed);
    s.cumulative.push_back(s.count);
  }
  s.sum = sum_.load(std::memory_order_relaxed);
  return s;
}

std::vector<double> LatencyBuckets() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
          0.05,   0.1,     0.25,   0.5,   1,      2.5,   5,    10};
}

// ---- Family --------------------------------------------------------------

template <typename T>
T& Family<T>::WithLabels(const std::vector<std::string>& values) {
  if (values.size() != label_names_.size()) {
    std::fprintf(stderr,
                 "custos: metrics: %zu label values given for %zu labels\n",
                 values.size(), label_names_.size());
    std::abort();
  }
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = children_.try_emplace(values);
  if (inserted) {
    it->second.labels = RenderLabels(label_names_, values);
    if constexpr (std::is_same_v<T, Histogram>) {
      it->second.metric = std::make_unique<Histogram>(bounds_);
    } else {
      it->second.metric = std::make_unique<T>();
    }
  }
  return *it->second.metric;
}

template <>
void Family<Counter>::Render(const std::string& name, std::string* out) const {
  absl::MutexLock lock(&mu_);
  for (const auto& [values, child] : children_) {
    AppendSample(name, child.labels, "", absl::StrCat(child.metric->value()),
                 out);
  }
}

template <>
void Family<Gauge>::Render(const std::string& name, std::string* out) const {
  absl::MutexLock lock(&mu_);
  for (const auto& [values, child] : children_) {
    AppendSample(name, child.labels, "", FormatValue(child.metric->value()),
                 out);
  }
}

template <>
void Family<Histogram>::Render(const std::string& name,
                               std::string* out) const {
  const std::string bucket = name + "_bucket";
  std::vector<std::string> le;
  le.reserve(bounds_.size() + 1);
  for (double bound : bounds_) {
    le.push_back(absl::StrCat("le=\"", FormatValue(bound), "\""));
  }
  le.push_back("le=\"+Inf\"");
  absl::MutexLock lock(&mu_);
  for (const auto& [values, child] : children_) {
    const Histogram::Snapshot s = child.metric->snapshot();
    for (size_t i = 0; i < le.size(); ++i) {
      AppendSample(bucket, child.labels, le[i], absl::StrCat(s.cumulative[i]),
                   out);
    }
    AppendSample(name + "_sum", child.labels, "", FormatValue(s.sum), out);
    AppendSample(name + "_count", child.labels, "", absl::StrCat(s.count), out);
  }
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

// ---- CodeCounters ---------------------------------------------------------

std::string CodeName(int code) {
  if (code < 0 || code > 16) return "UNKNOWN";
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

CodeCounters::CodeCounters(Family<Counter>* family,
                           std::vector<std::string> leading) {
  for (int code = 0; code < kCodes; ++code) {
    std::vector<std::string> values = leading;
    values.push_back(CodeName(code));
    by_code_[code] =
        std::make_unique<LazyChild<Counter>>(family, std::move(values));
  }
}

void CodeCounters::Increment(int code) {
  if (code < 0 || code >= kCodes) code = 2;  // UNKNOWN
  by_code_[code]->Get().Increment();
}

// ---- CallbackHandle -------------------------------------------------------

CallbackHandle::CallbackHandle(CallbackHandle&& other) noexcept
    : registry_(std::exchange(other.registry_, nullptr)),
      id_(std::exchange(other.id_, 0)) {}

CallbackHandle& CallbackHandle::operator=(CallbackHandle&& other) noexcept {
  if (this != &other) {
    Reset();
    registry_ = std::exchange(other.registry_, nullptr);
    id_ = std::exchange(other.id_, 0);
  }
  return *this;
}

void CallbackHandle::Reset() {
  if (registry_ != nullptr) registry_->RemoveCallback(id_);
  registry_ = nullptr;
  id_ = 0;
}

// ---- Registry -------------------------------------------------------------

struct Registry::Entry {
  std::string help;
  Type type;
  bool callback;
  std::vector<std::string> label_names;
  std::vector<double> bounds;
  std::unique_ptr<Family<Counter>> counters;
  std::unique_ptr<Family<Gauge>> gauges;
  std::unique_ptr<Family<Histogram>> histograms;
  std::map<uint64_t, Callback> callbacks;  // by handle id
};

Registry::Registry() = default;
Registry::~Registry() = default;

absl::StatusOr<Registry::Entry*> Registry::AddLocked(
    const std::string& name, const std::string& help, Type type, bool callback,
    const std::vector<std::string>& label_names,
    const std::vector<double>& bounds) {
  if (!ValidName(name, /*colons=*/true)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "metric name '", name, "' is not [a-zA-Z_:][a-zA-Z0-9_:]*"));
  }
  std::set<std::string> seen;
  for (const std::string& label : label_names) {
    if (!ValidName(label, /*colons=*/false) || label.rfind("__", 0) == 0 ||
        (type == Type::kHistogram && label == "le")) {
      return absl::InvalidArgumentError(
          absl::StrCat("metric ", name, ": label name '", label,
                       "' is not [a-zA-Z_][a-zA-Z0-9_]* (nor __..., nor le "
                       "on a histogram)"));
    }
    if (!seen.insert(label).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("metric ", name, ": label '", label, "' given twice"));
    }
  }
  if (type == Type::kHistogram) {
    if (bounds.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("histogram ", name, ": no bucket bounds"));
    }
    for (size_t i = 0; i < bounds.size(); ++i) {
      if (!std::isfinite(bounds[i]) || (i > 0 && bounds[i] <= bounds[i - 1])) {
        return absl::InvalidArgumentError(absl::StrCat(
            "histogram ", name,
            ": bucket bounds must be finite and strictly increasing"));
      }
    }
  }
  auto it = entries_.find(name);
  if (it != entries_.end()) {
    Entry& e = *it->second;
    if (e.type != type || e.callback != callback ||
        e.label_names != label_names || e.bounds != bounds) {
      return absl::AlreadyExistsError(
          absl::StrCat("metric ", name,
                       " is already registered with another type, labels "
                       "or buckets"));
    }
    return &e;
  }
  auto entry = std::make_unique<Entry>();
  entry->help = help;
  entry->type = type;
  entry->callback = callback;
  entry->label_names = label_names;
  entry->bounds = bounds;
  if (!callback) {
    switch (type) {
      case Type::kCounter:
        entry->counters.reset(new Family<Counter>(label_names, {}));
        break;
      case Type::kGauge:
        entry->gauges.reset(new Family<Gauge>(label_names, {}));
        break;
      case Type::kHistogram:
        entry->histograms.reset(new Family<Histogram>(label_names, bounds));
        break;
    }
  }
  Entry* raw = entry.get();
  entries_.emplace(name, std::move(entry));
  return raw;
}

absl::StatusOr<Family<Counter>*> Registry::AddCounter(
    const std::string& name, const std::string& help,
    std::vector<std::string> label_names) {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<Entry*> e =
      AddLocked(name, help, Type::kCounter, false, label_names, {});
  if (!e.ok()) return e.status();
  return (*e)->counters.get();
}

absl::StatusOr<Family<Gauge>*> Registry::AddGauge(
    const std::string& name, const std::string& help,
    std::vector<std::string> label_names) {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<Entry*> e =
      AddLocked(name, help, Type::kGauge, false, label_names, {});
  if (!e.ok()) return e.status();
  return (*e)->gauges.get();
}

absl::StatusOr<Family<Histogram>*> Registry::AddHistogram(
    const std::string& name, const std::string& help,
    std::vector<std::string> label_names, std::vector<double> bounds) {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<Entry*> e =
      AddLocked(name, help, Type::kHistogram, false, label_names, bounds);
  if (!e.ok()) return e.status();
  return (*e)->histograms.get();
}

absl::StatusOr<CallbackHandle> Registry::AddCallback(
    const std::string& name, const std::string& help, Type type,
    std::vector<std::string> label_names, Callback callback) {
  if (type == Type::kHistogram) {
    return absl::InvalidArgumentError(
        absl::StrCat("metric ", name, ": callbacks are counters or gauges"));
  }
  if (!callback) {
    return absl::InvalidArgumentError(
        absl::StrCat("metric ", name, ": no callback"));
  }
  absl::MutexLock lock(&mu_);
  absl::StatusOr<Entry*> e =
      AddLocked(name, help, type, /*callback=*/true, label_names, {});
  if (!e.ok()) return e.status();
  const uint64_t id = next_callback_id_++;
  (*e)->callbacks.emplace(id, std::move(callback));
  return CallbackHandle(this, id);
}

absl::StatusOr<CallbackHandle> Registry::AddCallback(
    const std::string& name, const std::string& help, Type type,
    std::function<double()> value) {
  if (!value) {
    return absl::InvalidArgumentError(
        absl::StrCat("metric ", name, ": no callback"));
  }
  return AddCallback(name, help, type, {},
                     [value = std::move(value)]() -> std::vector<Sample> {
                       return {Sample{{}, value()}};
                     });
}

void Registry::RemoveCallback(uint64_t id) {
  absl::MutexLock lock(&mu_);
  for (auto& [name, entry] : entries_) {
    if (entry->callbacks.erase(id) > 0) return;
  }
}

std::string Registry::Render() const {
  std::string out;
  absl::MutexLock lock(&mu_);
  for (const auto& [name, entry] : entries_) {
    out.append("# HELP ").append(name).push_back(' ');
    AppendEscaped(entry->help, /*quote=*/false, &out);
    out.push_back('\n');
    absl::StrAppend(&out, "# TYPE ", name, " ", TypeName(entry->type), "\n");
    if (entry->counters) entry->counters->Render(name, &out);
    if (entry->gauges) entry->gauges->Render(name, &out);
    if (entry->histograms) entry->histograms->Render(name, &out);
    for (const auto& [id, callback] : entry->callbacks) {
      for (const Sample& s : callback()) {
        // A sample with the wrong number of labels cannot be rendered
        // correctly; leaving it out keeps the rest of the scrape valid.
        if (s.label_values.size() != entry->label_names.size()) continue;
        AppendSample(name, RenderLabels(entry->label_names, s.label_values), "",
                     FormatValue(s.value), &out);
      }
    }
  }
  return out;
}

}  // namespace custos::metrics
