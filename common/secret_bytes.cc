#include "common/secret_bytes.h"

#include <openssl/crypto.h>

#include <cstring>
#include <utility>

namespace custos {

SecretBytes::SecretBytes(size_t size)
    : data_(size ? new uint8_t[size]() : nullptr), size_(size) {}

SecretBytes SecretBytes::CopyOf(absl::string_view bytes) {
  SecretBytes out(bytes.size());
  if (!bytes.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

SecretBytes::SecretBytes(SecretBytes&& other) noexcept
    : data_(std::move(other.data_)), size_(std::exchange(other.size_, 0)) {}

SecretBytes& SecretBytes::operator=(SecretBytes&& other) noexcept {
  if (this != &other) {
    Cleanse();
    data_ = std::move(other.data_);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

SecretBytes::~SecretBytes() { Cleanse(); }

void SecretBytes::Truncate(size_t size) {
  if (size >= size_) return;
  OPENSSL_cleanse(data_.get() + size, size_ - size);
  size_ = size;
}

bool SecretBytes::Equals(absl::string_view other) const {
  if (other.size() != size_) return false;
  if (size_ == 0) return true;
  return CRYPTO_memcmp(data_.get(), other.data(), size_) == 0;
}

void SecretBytes::Cleanse() {
  // The full allocation is cleansed; Truncate only shortens the visible size.
  if (data_) OPENSSL_cleanse(data_.get(), size_);
  data_.reset();
  size_ = 0;
}

}  // namespace custos
