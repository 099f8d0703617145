#include "common/secret_bytes.h"

#include <gtest/gtest.h>

#include <utility>

namespace custos {
namespace {

TEST(SecretBytesTest, CopyOfHoldsTheBytes) {
  SecretBytes s = SecretBytes::CopyOf("abc");
  EXPECT_EQ(s.size(), 3u);
  EXPECT_EQ(s.view(), "abc");
  EXPECT_TRUE(s.Equals("abc"));
  EXPECT_FALSE(s.Equals("abd"));
  EXPECT_FALSE(s.Equals("ab"));
}

TEST(SecretBytesTest, MoveLeavesTheSourceEmpty) {
  SecretBytes a = SecretBytes::CopyOf("secret");
  SecretBytes b = std::move(a);
  EXPECT_TRUE(
      a.empty());  // NOLINT(bugprone-use-after-move): checked on purpose
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(b.view(), "secret");
  SecretBytes c = SecretBytes::CopyOf("x");
  c = std::move(b);
  EXPECT_EQ(c.view(), "secret");
}

TEST(SecretBytesTest, TruncateShortensAndNeverGrows) {
  SecretBytes s = SecretBytes::CopyOf("0123456789");
  const uint8_t* storage = s.data();
  s.Truncate(4);
  EXPECT_EQ(s.view(), "0123");
  for (size_t i = 4; i < 10; ++i) EXPECT_EQ(storage[i], 0) << i;
  s.Truncate(40);
  EXPECT_EQ(s.view(), "0123");
}

TEST(SecretBytesTest, NewBufferIsZeroed) {
  SecretBytes s(8);
  for (size_t i = 0; i < s.size(); ++i) EXPECT_EQ(s.data()[i], 0);
}

TEST(SecretBytesTest, EmptyBuffersCompareEqual) {
  SecretBytes s;
  EXPECT_TRUE(s.Equals(""));
  EXPECT_EQ(s.view(), "");
}

}  // namespace
}  // namespace custos
