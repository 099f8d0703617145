// SecretBytes: a fixed-size, move-only byte buffer for key material, PINs and
// plaintext data keys. Its storage is cleansed (OPENSSL_cleanse) when the
// buffer is destroyed or moved from, and it never grows, so no copy of the
// secret is left behind in a freed reallocation. Not thread-safe; it is a
// value type.
#ifndef CUSTOS_COMMON_SECRET_BYTES_H_
#define CUSTOS_COMMON_SECRET_BYTES_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/strings/string_view.h"

namespace custos {

class SecretBytes {
 public:
  SecretBytes() = default;
  // A zero-filled buffer of `size` bytes.
  explicit SecretBytes(size_t size);
  // A buffer holding a copy of `bytes`. The caller cleanses its own copy.
  static SecretBytes CopyOf(absl::string_view bytes);

  SecretBytes(SecretBytes&& other) noexcept;
  SecretBytes& operator=(SecretBytes&& other) noexcept;
  SecretBytes(const SecretBytes&) = delete;
  SecretBytes& operator=(const SecretBytes&) = delete;
  ~SecretBytes();

  uint8_t* data() { return data_.get(); }
  const uint8_t* data() const { return data_.get(); }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  // A view of the bytes; valid while this buffer lives and is not moved.
  absl::string_view view() const {
    return absl::string_view(reinterpret_cast<const char*>(data_.get()), size_);
  }
  // Shortens the buffer to `size` bytes (cleansing the tail). Never grows.
  void Truncate(size_t size);
  // Constant-time comparison of contents (lengths are not secret).
  bool Equals(absl::string_view other) const;

 private:
  void Cleanse();

  std::unique_ptr<uint8_t[]> data_;
  size_t size_ = 0;
};

}  // namespace custos

#endif  // CUSTOS_COMMON_SECRET_BYTES_H_
