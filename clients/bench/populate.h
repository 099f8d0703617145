// Populates a Custos server with keys, for benchmarks that need many (such
// as start-up time with 10,000 keys). Uses the admin's credentials; not
// measured itself. Each key's policy lets `principal` use every crypto
// operation. Thread-safe to call once at a time.
#ifndef CUSTOS_CLIENTS_BENCH_POPULATE_H_
#define CUSTOS_CLIENTS_BENCH_POPULATE_H_

#include <string>

#include "absl/status/statusor.h"

namespace custos::bench {

struct PopulateOptions {
  std::string address;
  std::string ca_file, cert_file, key_file;  // an admin's
  int count = 1000;
  int threads = 8;
  std::string principal;  // who may use the keys
  bool progress = true;   // a line on stderr every 10%
};

// Creates the keys; returns how many were created. Stops at the first
// error and returns it (naming how many were made).
absl::StatusOr<int> CreateKeys(const PopulateOptions& options);

}  // namespace custos::bench

#endif  // CUSTOS_CLIENTS_BENCH_POPULATE_H_
