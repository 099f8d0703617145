#include "hsm/pin_file.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>

#include "common/testing/status_matchers.h"
#include "tests/support/test_token.h"

namespace custos::hsm {
namespace {

using ::custos::testing::StatusIs;
using ::custos::testing::WriteFileAtomically;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

class PinFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto dir = custos::testing::MakeTempDir("custos-pin");
    ASSERT_TRUE(dir.ok());
    dir_ = *dir;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Write(const std::string& contents, int mode) {
    std::string path = dir_ + "/pin";
    EXPECT_TRUE(WriteFileAtomically(path, contents, mode).ok());
    return path;
  }
  std::string dir_;
};

TEST_F(PinFileTest, ReadsOwnerOnlyFileAndStripsNewline) {
  for (int mode : {0400, 0600}) {
    auto pin = ReadPinFile(Write("1234\n", mode));
    ASSERT_TRUE(pin.ok()) << pin.status();
    EXPECT_EQ(pin->view(), "1234");
  }
  auto crlf = ReadPinFile(Write("abcd\r\n", 0400));
  ASSERT_TRUE(crlf.ok());
  EXPECT_EQ(crlf->view(), "abcd");
}

TEST_F(PinFileTest, WorldReadableFileIsRefusedWithTheModeAndTheFix) {
  std::string path = Write("1234\n", 0644);
  EXPECT_THAT(ReadPinFile(path),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       AllOf(HasSubstr("mode 0644"), HasSubstr("chmod 0400"),
                             Not(HasSubstr("1234")))));
}

TEST_F(PinFileTest, GroupReadableFileIsRefused) {
  EXPECT_THAT(ReadPinFile(Write("1234", 0640)),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST_F(PinFileTest, MissingEmptyAndOversizedAreRefused) {
  EXPECT_THAT(ReadPinFile(dir_ + "/absent"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("absent")));
  EXPECT_THAT(ReadPinFile(""), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ReadPinFile(Write("\n", 0400)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("empty")));
  EXPECT_THAT(ReadPinFile(Write(std::string(300, 'x'), 0400)),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(PinFileTest, DirectoryIsRefused) {
  std::filesystem::create_directory(dir_ + "/d");
  chmod((dir_ + "/d").c_str(), 0700);
  EXPECT_THAT(ReadPinFile(dir_ + "/d"),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

}  // namespace
}  // namespace custos::hsm
