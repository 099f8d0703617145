// Reads the HSM user PIN from a file. The PIN never comes from a flag or an
// environment variable, and never appears in a log or an error message.
#ifndef CUSTOS_HSM_PIN_FILE_H_
#define CUSTOS_HSM_PIN_FILE_H_

#include <string>

#include "absl/status/statusor.h"
#include "common/secret_bytes.h"

namespace custos::hsm {

// Reads the PIN from `path`. The file must be a regular file readable by its
// owner only (mode 0400 or 0600); any group or other permission bit is refused
// with FAILED_PRECONDITION naming the mode and the fix. One trailing newline
// (\n or \r\n) is removed; an empty PIN or one over 255 bytes is refused.
absl::StatusOr<SecretBytes> ReadPinFile(const std::string& path);

}  // namespace custos::hsm

#endif  // CUSTOS_HSM_PIN_FILE_H_
