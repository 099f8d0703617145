// How the custos CLI prints: aligned tables for people, JSON for scripts,
// errors with exit codes that tell usage errors, refusals and failures
// apart. Not thread-safe (the CLI is single-threaded).
#ifndef CUSTOS_CLIENTS_CLI_OUTPUT_H_
#define CUSTOS_CLIENTS_CLI_OUTPUT_H_

#include <google/protobuf/message.h>

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace custos::cli {

// Exit codes (documented in docs/cli.md).
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;   // server unavailable, I/O, internal
inline constexpr int kExitUsage = 2;     // bad flags or arguments
inline constexpr int kExitRefused = 3;   // not authenticated or not allowed
inline constexpr int kExitRejected = 4;  // invalid, not found, wrong state

int ExitCodeFor(const absl::Status& status);

// Prints "custos: <code>: <message>" to stderr and returns the exit code.
int Fail(const absl::Status& status);

// A table: header row, then rows; columns padded to their widest cell.
void PrintTable(const std::vector<std::string>& header,
                const std::vector<std::vector<std::string>>& rows);

// One message as JSON with the proto field names (snake_case).
std::string ToJson(const google::protobuf::Message& message);
void PrintJson(const google::protobuf::Message& message);

// "2026-11-27T20:30:00Z" for a proto Timestamp's seconds; "-" when 0.
std::string FormatSeconds(int64_t seconds);

}  // namespace custos::cli

#endif  // CUSTOS_CLIENTS_CLI_OUTPUT_H_
