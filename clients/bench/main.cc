// custos-bench: measures Custos, and the baselines it is judged against.
//
//   custos-bench run --key alias/bench --rpc generate-data-key -c 64 -d 10
//   custos-bench run --mix generate-data-key=80,decrypt=20 --json
//   custos-bench serve --config custos.yaml --mode hsm-echo --listen :7600
//   custos-bench create-keys --count 10000 --principal spiffe://...
//
// `run` is a closed-loop load generator (gRPC callback API, N calls always
// in flight); `serve` starts a baseline server with custosd's gRPC and TLS
// settings. scripts/bench drives both and prints Custos as ratios of them.
#include <signal.h>

#include <fstream>
#include <iostream>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "clients/bench/echo_server.h"
#include "clients/bench/load_generator.h"
#include "clients/bench/populate.h"
#include "kms/server/config.h"

namespace {

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? "" : v;
}

int Fail(const absl::Status& status) {
  std::cerr << "custos-bench: " << status.message() << "\n";
  return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  signal(SIGPIPE, SIG_IGN);
  CLI::App app{
      "custos-bench: load generator for Custos and its baseline servers.\n"
      "Run 'custos-bench SUBCOMMAND --help' for run, serve or create-keys."};
  app.require_subcommand(1);

  custos::bench::LoadOptions load;
  load.address = Env("CUSTOS_ADDR");
  load.ca_file = Env("CUSTOS_CA");
  load.cert_file = Env("CUSTOS_CERT");
  load.key_file = Env("CUSTOS_KEY");
  std::string rpc, mix, json_out;
  double duration_s = 10, warmup_s = 2, timeout_s = 30;
  bool json = false, quiet = false;
  CLI::App* run = app.add_subcommand(
      "run", "Drive load at a Custos server (or a baseline) and report.");
  run->add_option("--address", load.address,
                  "host:port (default: $CUSTOS_ADDR)");
  run->add_option("--ca", load.ca_file, "server CA, PEM (default: $CUSTOS_CA)");
  run->add_option("--cert", load.cert_file,
                  "client certificate, PEM (default: $CUSTOS_CERT)");
  run->add_option("--key-file", load.key_file,
                  "client private key, PEM (default: $CUSTOS_KEY)");
  run->add_option("--key", load.key, "key id or alias for Custos RPCs");
  run->add_option(
         "--rpc", rpc,
         "one of generate-data-key, generate-data-key-without-plaintext, "
         "generate-data-keys, encrypt, decrypt, re-encrypt, echo")
      ->default_str("generate-data-key");
  run->add_option("--mix", mix,
                  "weighted mix instead of --rpc, e.g. "
                  "generate-data-key=80,decrypt=15,encrypt=5");
  run->add_option("-c,--concurrency", load.concurrency,
                  "calls in flight at all times")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  run->add_option("--channels", load.channels,
                  "connections the calls are spread over")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  run->add_option("-d,--duration", duration_s, "seconds measured")
      ->capture_default_str()
      ->check(CLI::Range(0.1, 86400.0));
  run->add_option("--warmup", warmup_s, "seconds run first and not counted")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 3600.0));
  run->add_option("--context-pairs", load.context_pairs,
                  "encryption context entries per call")
      ->capture_default_str()
      ->check(CLI::Range(0, 64));
  run->add_option("--batch-size", load.batch_size,
                  "data keys per GenerateDataKeys call")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  run->add_option("--payload-bytes", load.payload_bytes,
                  "Encrypt plaintext / Echo payload size")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  run->add_option("--timeout", timeout_s, "per-call deadline, seconds")
      ->capture_default_str();
  run->add_flag("--json", json, "print JSON instead of a table");
  run->add_option("--json-out", json_out, "also write the JSON to this file");
  run->add_flag("-q,--quiet", quiet, "no progress lines on stderr");

  std::string config_path, mode = "echo", listen;
  CLI::App* serve = app.add_subcommand(
      "serve",
      "Serve a baseline: 'echo' (gRPC + mutual TLS only) or 'hsm-echo' (plus "
      "one AES-GCM call in the HSM), with custosd's settings from its config.");
  serve->add_option("--config", config_path, "custosd YAML configuration")
      ->required();
  serve->add_option("--mode", mode, "echo or hsm-echo")
      ->capture_default_str()
      ->check(CLI::IsMember({"echo", "hsm-echo"}));
  serve->add_option("--listen", listen,
                    "host:port (default: the config's listen address)");

  custos::bench::PopulateOptions populate;
  CLI::App* create = app.add_subcommand(
      "create-keys",
      "Create many keys (as an admin) whose policy lets --principal use "
      "them: set-up for start-up and scale measurements.");
  create->add_option("--address", populate.address,
                     "host:port (default: $CUSTOS_ADDR)");
  create->add_option("--ca", populate.ca_file,
                     "server CA (default: $CUSTOS_CA)");
  create->add_option("--cert", populate.cert_file,
                     "an admin's certificate (default: $CUSTOS_CERT)");
  create->add_option("--key-file", populate.key_file,
                     "its private key (default: $CUSTOS_KEY)");
  create->add_option("--count", populate.count, "keys to create")
      ->capture_default_str()
      ->check(CLI::Range(1, 10000000));
  create->add_option("--threads", populate.threads, "calls in parallel")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  create
      ->add_option("--principal", populate.principal,
                   "who may use the keys (policy principal)")
      ->required();

  CLI11_PARSE(app, argc, argv);

  if (create->parsed()) {
    if (populate.address.empty()) populate.address = Env("CUSTOS_ADDR");
    if (populate.ca_file.empty()) populate.ca_file = Env("CUSTOS_CA");
    if (populate.cert_file.empty()) populate.cert_file = Env("CUSTOS_CERT");
    if (populate.key_file.empty()) populate.key_file = Env("CUSTOS_KEY");
    absl::StatusOr<int> created = custos::bench::CreateKeys(populate);
    if (!created.ok()) return Fail(created.status());
    std::cout << "created " << *created << " keys\n";
    return 0;
  }

  if (serve->parsed()) {
    // Block the stop signals before gRPC starts threads; ServeEcho waits.
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGTERM);
    sigaddset(&signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &signals, nullptr);
    // As custosd does (see its main): no lock-order checks on every Mutex.
    absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
    absl::StatusOr<custos::server::Config> config =
        custos::server::LoadConfig(config_path);
    if (!config.ok()) return Fail(config.status());
    absl::Status s = custos::bench::ServeEcho(
        *config, listen,
        mode == "hsm-echo" ? custos::bench::EchoMode::kHsm
                           : custos::bench::EchoMode::kPlain);
    return s.ok() ? 0 : Fail(s);
  }

  absl::StatusOr<custos::bench::Mix> parsed = custos::bench::ParseMix(
      !mix.empty() ? mix : (!rpc.empty() ? rpc : "generate-data-key"));
  if (!parsed.ok()) return Fail(parsed.status());
  load.mix = *parsed;
  for (const auto& [op, weight] : load.mix) {
    if (op != custos::bench::Op::kEcho && load.key.empty()) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("--key: required for ", custos::bench::OpName(op),
                       " (a key id or alias whose policy allows this "
                       "client)")));
    }
  }
  for (const auto& [value, flag] :
       {std::pair{load.address, "--address or CUSTOS_ADDR"},
        std::pair{load.ca_file, "--ca or CUSTOS_CA"},
        std::pair{load.cert_file, "--cert or CUSTOS_CERT"},
        std::pair{load.key_file, "--key-file or CUSTOS_KEY"}}) {
    if (value.empty()) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat(flag,
                       ": not set (source the env.sh of scripts/dev-env "
                       "or pass the flag)")));
    }
  }
  load.duration = absl::Seconds(duration_s);
  load.warmup = absl::Seconds(warmup_s);
  load.call_timeout = absl::Seconds(timeout_s);
  if (!quiet) {
    std::cerr << "custos-bench: " << load.concurrency << " calls in flight to "
              << load.address << ": warming up " << warmup_s
              << " s, then measuring " << duration_s << " s\n";
  }
  absl::StatusOr<custos::bench::RunResult> result =
      custos::bench::RunLoad(load);
  if (!result.ok()) return Fail(result.status());
  const std::string text = custos::bench::ToJson(*result).dump(2);
  if (!json_out.empty()) {
    std::ofstream out(json_out, std::ios::trunc);
    out << text << "\n";
    if (!out) {
      return Fail(absl::UnavailableError(
          absl::StrCat("--json-out: cannot write ", json_out)));
    }
  }
  std::cout << (json ? text + "\n" : custos::bench::FormatTable(*result));
  // A run where every call failed measured nothing: say so in the exit code.
  return result->total.ok == 0 ? 1 : 0;
}
