#include "clients/bench/load_generator.h"

#include <openssl/crypto.h>
#include <sys/resource.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <random>
#include <thread>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "clients/bench/channel.h"
#include "custos/bench/v1/echo.grpc.pb.h"
#include "custos/v1/kms.grpc.pb.h"

namespace custos::bench {
namespace {

namespace pb = ::custos::v1;
namespace echo = ::custos::bench::v1;
using Clock = std::chrono::steady_clock;

constexpr int kOpCount = static_cast<int>(std::size(kAllOps));

double CpuSeconds() {
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_utime.tv_sec + usage.ru_stime.tv_sec +
         (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

void Cleanse(std::string* secret) {
  OPENSSL_cleanse(secret->data(), secret->size());
}

// Everything shared by the slots: channels, stubs, prepared inputs, phase.
struct Shared {
  const LoadOptions* options;
  std::vector<std::unique_ptr<pb::CryptoService::Stub>> crypto;
  std::vector<std::unique_ptr<echo::Echo::Stub>> echo;
  std::vector<std::string> blobs;  // for Decrypt and ReEncrypt
  std::map<std::string, std::string> context;
  std::string payload;
  std::vector<int> weights;  // cumulative, per mix entry

  enum Phase { kWarmup, kMeasure, kStop };
  std::atomic<int> phase{kWarmup};
  std::atomic<int> in_flight{0};
  std::mutex mu;
  std::condition_variable drained;
};

// One call in flight at a time, forever: the closed loop.
class Slot {
 public:
  Slot(Shared* shared, int index)
      : shared_(shared),
        index_(index),
        rng_(0x5eed + static_cast<uint64_t>(index)) {}

  void Start() {
    const LoadOptions& o = *shared_->options;
    const int channel = index_ % static_cast<int>(shared_->crypto.size());
    op_ = Pick();
    context_ = std::make_unique<grpc::ClientContext>();
    context_->set_deadline(std::chrono::system_clock::now() +
                           absl::ToChronoSeconds(o.call_timeout));
    start_ = Clock::now();
    auto done = [this](grpc::Status s) { Done(s); };
    pb::CryptoService::Stub::async_interface* crypto =
        shared_->crypto[channel]->async();
    switch (op_) {
      case Op::kGenerateDataKey:
      case Op::kGenerateDataKeyWithoutPlaintext:
        data_key_.set_key(o.key);
        data_key_.mutable_encryption_context()->insert(shared_->context.begin(),
                                                       shared_->context.end());
        data_key_response_.Clear();
        if (op_ == Op::kGenerateDataKey) {
          crypto->GenerateDataKey(context_.get(), &data_key_,
                                  &data_key_response_, done);
        } else {
          crypto->GenerateDataKeyWithoutPlaintext(context_.get(), &data_key_,
                                                  &data_key_response_, done);
        }
        break;
      case Op::kGenerateDataKeys:
        data_keys_.set_key(o.key);
        data_keys_.set_count(o.batch_size);
        data_keys_.mutable_encryption_context()->insert(
            shared_->context.begin(), shared_->context.end());
        data_keys_response_.Clear();
        crypto->GenerateDataKeys(context_.get(), &data_keys_,
                                 &data_keys_response_, done);
        break;
      case Op::kEncrypt:
        encrypt_.set_key(o.key);
        encrypt_.set_plaintext(shared_->payload);
        encrypt_.mutable_encryption_context()->insert(shared_->context.begin(),
                                                      shared_->context.end());
        encrypt_response_.Clear();
        crypto->Encrypt(context_.get(), &encrypt_, &encrypt_response_, done);
        break;
      case Op::kDecrypt:
        decrypt_.set_ciphertext_blob(NextBlob());
        decrypt_.mutable_encryption_context()->insert(shared_->context.begin(),
                                                      shared_->context.end());
        decrypt_response_.Clear();
        crypto->Decrypt(context_.get(), &decrypt_, &decrypt_response_, done);
        break;
      case Op::kReEncrypt:
        reencrypt_.set_ciphertext_blob(NextBlob());
        reencrypt_.set_destination_key(o.key);
        reencrypt_.mutable_source_encryption_context()->insert(
            shared_->context.begin(), shared_->context.end());
        reencrypt_.mutable_destination_encryption_context()->insert(
            shared_->context.begin(), shared_->context.end());
        reencrypt_response_.Clear();
        crypto->ReEncrypt(context_.get(), &reencrypt_, &reencrypt_response_,
                          done);
        break;
      case Op::kEcho:
        echo_.set_payload(shared_->payload);
        echo_response_.Clear();
        shared_->echo[channel]->async()->Echo(context_.get(), &echo_,
                                              &echo_response_, done);
        break;
    }
  }

  Recorder& recorder(Op op) { return recorders_[static_cast<int>(op)]; }

 private:
  Op Pick() {
    const Mix& mix = shared_->options->mix;
    if (mix.size() == 1) return mix[0].first;
    std::uniform_int_distribution<int> dist(0, shared_->weights.back() - 1);
    const int x = dist(rng_);
    for (size_t i = 0; i < mix.size(); ++i) {
      if (x < shared_->weights[i]) return mix[i].first;
    }
    return mix.back().first;
  }

  const std::string& NextBlob() {
    return shared_->blobs[next_blob_++ % shared_->blobs.size()];
  }

  void Done(const grpc::Status& status) {
    const auto elapsed = Clock::now() - start_;
    if (shared_->phase.load(std::memory_order_relaxed) == Shared::kMeasure) {
      Recorder& r = recorder(op_);
      if (status.ok()) {
        r.ok_latency_us.push_back(static_cast<uint32_t>(std::min<int64_t>(
            std::chrono::duration_cast<std::chrono::microseconds>(elapsed)
                .count(),
            UINT32_MAX)));
        r.items += op_ == Op::kGenerateDataKeys
                       ? data_keys_response_.data_keys_size()
                       : 1;
      } else {
        r.errors[absl::StatusCodeToString(
            static_cast<absl::StatusCode>(status.error_code()))]++;
      }
    }
    // Data keys in the replies are not used: cleanse them anyway.
    Cleanse(data_key_response_.mutable_plaintext());
    for (pb::DataKey& key : *data_keys_response_.mutable_data_keys()) {
      Cleanse(key.mutable_plaintext());
    }
    if (shared_->phase.load(std::memory_order_relaxed) == Shared::kStop) {
      std::lock_guard<std::mutex> lock(shared_->mu);
      if (--shared_->in_flight == 0) shared_->drained.notify_all();
      return;
    }
    Start();
  }

  Shared* const shared_;
  const int index_;
  std::mt19937_64 rng_;
  Op op_ = Op::kEcho;
  Clock::time_point start_;
  std::unique_ptr<grpc::ClientContext> context_;
  size_t next_blob_ = 0;
  Recorder recorders_[kOpCount];

  pb::GenerateDataKeyRequest data_key_;
  pb::GenerateDataKeyResponse data_key_response_;
  pb::GenerateDataKeysRequest data_keys_;
  pb::GenerateDataKeysResponse data_keys_response_;
  pb::EncryptRequest encrypt_;
  pb::EncryptResponse encrypt_response_;
  pb::DecryptRequest decrypt_;
  pb::DecryptResponse decrypt_response_;
  pb::ReEncryptRequest reencrypt_;
  pb::ReEncryptResponse reencrypt_response_;
  echo::EchoRequest echo_;
  echo::EchoResponse echo_response_;
};

bool MixUses(const Mix& mix, Op op) {
  for (const auto& [o, w] : mix) {
    if (o == op) return true;
  }
  return false;
}

std::string MixText(const Mix& mix) {
  if (mix.size() == 1) return OpName(mix[0].first);
  std::string out;
  for (const auto& [op, weight] : mix) {
    absl::StrAppend(&out, out.empty() ? "" : ",", OpName(op), "=", weight);
  }
  return out;
}

// Makes the blobs that Decrypt and ReEncrypt calls replay.
absl::Status PrepareBlobs(Shared& shared) {
  const LoadOptions& o = *shared.options;
  for (int i = 0; i < o.prepared_blobs; ++i) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() +
                     absl::ToChronoSeconds(o.call_timeout));
    pb::GenerateDataKeyRequest req;
    req.set_key(o.key);
    req.mutable_encryption_context()->insert(shared.context.begin(),
                                             shared.context.end());
    pb::GenerateDataKeyResponse resp;
    grpc::Status s = shared.crypto[i % shared.crypto.size()]
                         ->GenerateDataKeyWithoutPlaintext(&ctx, req, &resp);
    if (!s.ok()) {
      return absl::Status(
          static_cast<absl::StatusCode>(s.error_code()),
          absl::StrCat("preparing blobs for Decrypt with "
                       "GenerateDataKeyWithoutPlaintext on key '",
                       o.key, "': ", s.error_message(),
                       " (does the key's policy allow this client "
                       "GENERATE_DATA_KEY_WITHOUT_PLAINTEXT?)"));
    }
    shared.blobs.push_back(resp.ciphertext_blob());
  }
  return absl::OkStatus();
}

}  // namespace

const char* OpName(Op op) {
  switch (op) {
    case Op::kGenerateDataKey:
      return "generate-data-key";
    case Op::kGenerateDataKeyWithoutPlaintext:
      return "generate-data-key-without-plaintext";
    case Op::kGenerateDataKeys:
      return "generate-data-keys";
    case Op::kEncrypt:
      return "encrypt";
    case Op::kDecrypt:
      return "decrypt";
    case Op::kReEncrypt:
      return "re-encrypt";
    case Op::kEcho:
      return "echo";
  }
  return "?";
}

absl::StatusOr<Op> ParseOp(absl::string_view name) {
  for (Op op : kAllOps) {
    if (name == OpName(op)) return op;
  }
  std::string known;
  for (Op op : kAllOps)
    absl::StrAppend(&known, known.empty() ? "" : ", ", OpName(op));
  return absl::InvalidArgumentError(
      absl::StrCat("unknown rpc '", name, "'; use one of: ", known));
}

absl::StatusOr<Mix> ParseMix(absl::string_view text) {
  Mix mix;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    std::pair<absl::string_view, absl::string_view> kv =
        absl::StrSplit(part, absl::MaxSplits('=', 1));
    absl::StatusOr<Op> op = ParseOp(kv.first);
    if (!op.ok()) return op.status();
    int weight = 1;
    if (!kv.second.empty() && (!absl::SimpleAtoi(kv.second, &weight) ||
                               weight < 1 || weight > 1000000)) {
      return absl::InvalidArgumentError(
          absl::StrCat("mix: weight of ", kv.first,
                       " must be a whole number >= 1, got '", kv.second, "'"));
    }
    mix.emplace_back(*op, weight);
  }
  if (mix.empty()) {
    return absl::InvalidArgumentError(
        "mix: empty; e.g. generate-data-key=80,decrypt=20");
  }
  return mix;
}

absl::StatusOr<RunResult> RunLoad(const LoadOptions& o) {
  if (o.concurrency < 1) {
    return absl::InvalidArgumentError("concurrency: must be at least 1");
  }
  Shared shared;
  shared.options = &o;
  for (int i = 0; i < o.context_pairs; ++i) {
    shared.context[absl::StrCat("context-key-", i)] =
        absl::StrCat("value-", i, "-0123456789abcdef");
  }
  shared.payload.assign(static_cast<size_t>(o.payload_bytes), 'p');
  int sum = 0;
  for (const auto& [op, weight] : o.mix)
    shared.weights.push_back(sum += weight);

  const int channels = std::max(1, std::min(o.channels, o.concurrency));
  for (int i = 0; i < channels; ++i) {
    absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = ConnectChannel(
        o.address, TlsFiles{o.ca_file, o.cert_file, o.key_file}, i);
    if (!channel.ok()) return channel.status();
    shared.crypto.push_back(pb::CryptoService::NewStub(*channel));
    shared.echo.push_back(echo::Echo::NewStub(*channel));
  }
  if (MixUses(o.mix, Op::kDecrypt) || MixUses(o.mix, Op::kReEncrypt)) {
    absl::Status prepared = PrepareBlobs(shared);
    if (!prepared.ok()) return prepared;
  }

  std::vector<std::unique_ptr<Slot>> slots;
  for (int i = 0; i < o.concurrency; ++i) {
    slots.push_back(std::make_unique<Slot>(&shared, i));
  }
  shared.in_flight = o.concurrency;
  for (auto& slot : slots) slot->Start();

  std::this_thread::sleep_for(absl::ToChronoNanoseconds(o.warmup));
  const double cpu_start = CpuSeconds();
  const Clock::time_point measure_start = Clock::now();
  shared.phase = Shared::kMeasure;
  std::this_thread::sleep_for(absl::ToChronoNanoseconds(o.duration));
  shared.phase = Shared::kStop;
  const Clock::time_point measure_end = Clock::now();
  const double cpu_end = CpuSeconds();
  {
    std::unique_lock<std::mutex> lock(shared.mu);
    shared.drained.wait(lock, [&] { return shared.in_flight == 0; });
  }

  RunResult result;
  result.target = o.address;
  result.mix = MixText(o.mix);
  result.concurrency = o.concurrency;
  result.channels = channels;
  result.seconds =
      std::chrono::duration<double>(measure_end - measure_start).count();
  result.client_cpu_seconds = cpu_end - cpu_start;
  Recorder total;
  for (Op op : kAllOps) {
    if (!MixUses(o.mix, op)) continue;
    Recorder per;
    for (auto& slot : slots) per.Merge(slot->recorder(op));
    total.Merge(per);
    if (o.mix.size() > 1) {
      result.per_rpc[OpName(op)] = Summarize(per, result.seconds);
    }
  }
  result.total = Summarize(total, result.seconds);
  return result;
}

}  // namespace custos::bench
