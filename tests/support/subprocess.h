// Runs a program to completion and captures its output, for end-to-end tests
// of the command-line tools. Safe to call from a process with gRPC threads:
// everything is prepared before fork, and the child only dup2s and execs.
// Thread-compatible (each call uses its own scratch files).
#ifndef CUSTOS_TESTS_SUPPORT_SUBPROCESS_H_
#define CUSTOS_TESTS_SUPPORT_SUBPROCESS_H_

#include <ostream>
#include <string>
#include <vector>

namespace custos::testing {

struct ProcessResult {
  int code = -1;  // exit status, or 128 + signal
  std::string out, err;
};
std::ostream& operator<<(std::ostream& os, const ProcessResult& r);

// Runs argv[0] (a path) with exactly `env`, stdin from `stdin_path`, and
// stdout/stderr through files named `scratch_prefix`.out/.err (removed after).
ProcessResult RunProcess(const std::vector<std::string>& argv,
                         const std::vector<std::string>& env,
                         const std::string& stdin_path,
                         const std::string& scratch_prefix);

// The whole file at `path`, or "" if it cannot be read.
std::string ReadAll(const std::string& path);

// This process's environment without the variables starting with `prefix`.
std::vector<std::string> EnvironmentWithout(const std::string& prefix);

}  // namespace custos::testing

#endif  // CUSTOS_TESTS_SUPPORT_SUBPROCESS_H_
