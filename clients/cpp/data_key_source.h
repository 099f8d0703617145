// DataKeySource: where envelope encryption gets its data keys. The gRPC
// Client implements it; tests use a fake. Implementations are thread-safe.
#ifndef CUSTOS_CLIENTS_CPP_DATA_KEY_SOURCE_H_
#define CUSTOS_CLIENTS_CPP_DATA_KEY_SOURCE_H_

#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "common/secret_bytes.h"

namespace custos::client {

class DataKeySource {
 public:
  virtual ~DataKeySource() = default;
  struct DataKey {
    SecretBytes plaintext;  // 32 bytes
    std::string blob;       // the KMS ciphertext blob
  };
  virtual absl::StatusOr<DataKey> GenerateDataKey(
      const std::string& key,
      const std::map<std::string, std::string>& context) = 0;
  // Unwraps `blob` under `context`. `expected_key` (an id or alias; empty:
  // any) is the key the blob must be wrapped under: a blob of any other key
  // is refused like an invalid one (INVALID_ARGUMENT), before anything is
  // unwrapped.
  virtual absl::StatusOr<SecretBytes> DecryptDataKey(
      const std::string& blob,
      const std::map<std::string, std::string>& context,
      const std::string& expected_key) = 0;
};

}  // namespace custos::client

#endif  // CUSTOS_CLIENTS_CPP_DATA_KEY_SOURCE_H_
