#include "kms/encryption_context.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/testing/status_matchers.h"

namespace custos::kms {
namespace {

using ::custos::testing::IsOk;
using ::custos::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

std::string Hex(absl::string_view bytes) {
  return absl::BytesToHexString(bytes);
}

// --- IsValidUtf8 -----------------------------------------------------------

struct Utf8Case {
  const char* name;
  std::string bytes;
  bool valid;
};

class Utf8Test : public ::testing::TestWithParam<Utf8Case> {};

TEST_P(Utf8Test, AcceptsOnlyWellFormedUtf8) {
  EXPECT_EQ(IsValidUtf8(GetParam().bytes), GetParam().valid)
      << Hex(GetParam().bytes);
}

INSTANTIATE_TEST_SUITE_P(
    Table, Utf8Test,
    ::testing::Values(
        Utf8Case{"Empty", "", true}, Utf8Case{"Ascii", "tenant=acme", true},
        Utf8Case{"Nul", std::string("\0", 1), true},
        Utf8Case{"Del", "\x7f", true},
        Utf8Case{"TwoByteMin", "\xc2\x80", true},        // U+0080
        Utf8Case{"TwoByte", "caf\xc3\xa9", true},        // é
        Utf8Case{"TwoByteMax", "\xdf\xbf", true},        // U+07FF
        Utf8Case{"ThreeByteMin", "\xe0\xa0\x80", true},  // U+0800
        Utf8Case{"Euro", "\xe2\x82\xac", true},
        Utf8Case{"BeforeSurrogates", "\xed\x9f\xbf", true},  // U+D7FF
        Utf8Case{"AfterSurrogates", "\xee\x80\x80", true},   // U+E000
        Utf8Case{"Bom", "\xef\xbb\xbf", true},
        Utf8Case{"FourByteMin", "\xf0\x90\x80\x80", true},  // U+10000
        Utf8Case{"Clef", "\xf0\x9d\x84\x9e", true},         // U+1D11E
        Utf8Case{"MaxScalar", "\xf4\x8f\xbf\xbf", true},    // U+10FFFF
        Utf8Case{"LoneContinuation", "\x80", false},
        Utf8Case{"ContinuationAfterAscii", "a\xbf", false},
        Utf8Case{"OverlongNulC0", "\xc0\x80", false},
        Utf8Case{"OverlongSlashC0", "\xc0\xaf", false},
        Utf8Case{"OverlongC1", "\xc1\xbf", false},
        Utf8Case{"OverlongThreeByte", "\xe0\x9f\xbf", false},
        Utf8Case{"OverlongThreeByteSlash", "\xe0\x80\xaf", false},
        Utf8Case{"OverlongFourByte", "\xf0\x8f\xbf\xbf", false},
        Utf8Case{"HighSurrogate", "\xed\xa0\x80", false},  // U+D800
        Utf8Case{"LowSurrogate", "\xed\xbf\xbf", false},   // U+DFFF
        Utf8Case{"SurrogatePair", "\xed\xa0\xbd\xed\xb2\xa9", false},
        Utf8Case{"AboveMaxScalar", "\xf4\x90\x80\x80", false},  // U+110000
        Utf8Case{"LeadF5", "\xf5\x80\x80\x80", false},
        Utf8Case{"LeadF8", "\xf8\x88\x80\x80\x80", false},
        Utf8Case{"ByteFe", "\xfe", false}, Utf8Case{"ByteFf", "\xff", false},
        Utf8Case{"TruncatedTwoByte", "caf\xc3", false},
        Utf8Case{"TruncatedThreeByte", "\xe2\x82", false},
        Utf8Case{"TruncatedFourByte", "a\xf0\x9d\x84", false},
        Utf8Case{"BadSecondByte", "\xc3\x28", false},
        Utf8Case{"BadThirdByte", "\xe2\x82\x28", false},
        Utf8Case{"BadFourthByte", "\xf0\x9d\x84\x28", false},
        Utf8Case{"Latin1", "caf\xe9", false}),
    [](const auto& test) { return std::string(test.param.name); });

// --- CanonicalEncryptionContext --------------------------------------------

TEST(CanonicalEncryptionContextTest, EmptyContextIsFourZeroBytes) {
  EXPECT_EQ(CanonicalEncryptionContext({}), std::string(4, '\0'));
}

TEST(CanonicalEncryptionContextTest, EncodesOnePairWithLengthPrefixes) {
  EXPECT_EQ(Hex(CanonicalEncryptionContext({{"app", "archive"}})),
            "00000001"
            "00000003"
            "617070"
            "00000007"
            "61726368697665");
}

TEST(CanonicalEncryptionContextTest, EncodesPairsInBytewiseKeyOrder) {
  // The two-pair golden vector's context.
  const std::string expected =
      "00000002"
      "00000007"
      "707572706f7365"  // purpose
      "00000006"
      "6261636b7570"  // backup
      "00000006"
      "74656e616e74"  // tenant
      "00000004"
      "61636d65";  // acme
  EXPECT_EQ(Hex(CanonicalEncryptionContext(
                {{"tenant", "acme"}, {"purpose", "backup"}})),
            expected);
  EXPECT_EQ(Hex(CanonicalEncryptionContext(
                {{"purpose", "backup"}, {"tenant", "acme"}})),
            expected);
}

TEST(CanonicalEncryptionContextTest, OrdersKeysAsUnsignedBytes) {
  // 'B' (0x42) < 'a' (0x61) < "é" (0xc3 0xa9), whatever char's signedness.
  EXPECT_EQ(Hex(CanonicalEncryptionContext(
                {{"\xc3\xa9", "3"}, {"a", "2"}, {"B", "1"}})),
            "00000003"
            "00000001"
            "42"
            "00000001"
            "31"
            "00000001"
            "61"
            "00000001"
            "32"
            "00000002"
            "c3a9"
            "00000001"
            "33");
}

TEST(CanonicalEncryptionContextTest, EmptyValueDiffersFromAbsentPair) {
  const std::string absent = CanonicalEncryptionContext({{"a", "1"}});
  const std::string empty_value =
      CanonicalEncryptionContext({{"a", "1"}, {"b", ""}});
  EXPECT_NE(absent, empty_value);
  EXPECT_EQ(Hex(empty_value),
            "00000002"
            "00000001"
            "61"
            "00000001"
            "31"
            "00000001"
            "62"
            "00000000");
}

TEST(CanonicalEncryptionContextTest, ReCasedKeyDiffers) {
  EXPECT_NE(CanonicalEncryptionContext({{"tenant", "acme"}}),
            CanonicalEncryptionContext({{"Tenant", "acme"}}));
}

TEST(CanonicalEncryptionContextTest, ReCasedValueDiffers) {
  EXPECT_NE(CanonicalEncryptionContext({{"tenant", "acme"}}),
            CanonicalEncryptionContext({{"tenant", "ACME"}}));
}

TEST(CanonicalEncryptionContextTest, LengthPrefixesKeepSplitsApart) {
  EXPECT_NE(CanonicalEncryptionContext({{"ab", "c"}}),
            CanonicalEncryptionContext({{"a", "bc"}}));
  EXPECT_NE(CanonicalEncryptionContext({{"a", "b"}, {"c", "d"}}),
            CanonicalEncryptionContext({{"a", "bcd"}}));
}

TEST(CanonicalEncryptionContextTest, ExtraOrMissingPairDiffers) {
  const std::string two = CanonicalEncryptionContext({{"a", "1"}, {"b", "2"}});
  EXPECT_NE(two, CanonicalEncryptionContext({{"a", "1"}}));
  EXPECT_NE(two,
            CanonicalEncryptionContext({{"a", "1"}, {"b", "2"}, {"c", "3"}}));
}

// --- ValidateEncryptionContext ---------------------------------------------

// `n` pairs whose keys sort in numeric order, n <= 1000.
EncryptionContext NumberedPairs(size_t n) {
  EncryptionContext context;
  for (size_t i = 0; i < n; ++i) {
    context[absl::StrCat("k", 1000 + i)] = "v";  // k1000, k1001, ...
  }
  return context;
}

TEST(ValidateEncryptionContextTest, AcceptsEmptyContext) {
  EXPECT_THAT(ValidateEncryptionContext({}), IsOk());
}

TEST(ValidateEncryptionContextTest, AcceptsUtf8KeysAndValuesAndEmptyValues) {
  EXPECT_THAT(ValidateEncryptionContext({{"tenant", "acme"},
                                         {"region", "z\xc3\xbcrich"},
                                         {"\xe2\x82\xac", ""}}),
              IsOk());
}

TEST(ValidateEncryptionContextTest, AcceptsExactlyTheLimits) {
  EXPECT_THAT(ValidateEncryptionContext(NumberedPairs(kMaxContextPairs)),
              IsOk());
  EXPECT_THAT(ValidateEncryptionContext(
                  {{"k", std::string(kMaxContextBytes - 1, 'v')}}),
              IsOk());
}

struct BadContextCase {
  const char* name;
  EncryptionContext context;
  std::string problem;  // substring of the message
  std::string key;      // how the offending key is echoed
};

class ValidateEncryptionContextBadTest
    : public ::testing::TestWithParam<BadContextCase> {};

TEST_P(ValidateEncryptionContextBadTest, RejectsNamingProblemAndKey) {
  const BadContextCase& c = GetParam();
  EXPECT_THAT(
      ValidateEncryptionContext(c.context),
      StatusIs(absl::StatusCode::kInvalidArgument,
               AllOf(StartsWith("encryption_context: "), HasSubstr(c.problem),
                     HasSubstr("\"" + c.key + "\""))));
}

TEST_P(ValidateEncryptionContextBadTest, NeverEchoesAValue) {
  absl::Status s = ValidateEncryptionContext(GetParam().context);
  for (const auto& [key, value] : GetParam().context) {
    if (value.size() >= 3) {
      EXPECT_THAT(std::string(s.message()), Not(HasSubstr(value)));
    }
  }
  EXPECT_LE(s.message().size(), 400u);
}

constexpr char kSecret[] = "s3cr3t-value";

INSTANTIATE_TEST_SUITE_P(
    SecurityBadInputs, ValidateEncryptionContextBadTest,
    ::testing::Values(
        BadContextCase{"EmptyKey", {{"", kSecret}}, "empty key", ""},
        BadContextCase{"InvalidUtf8Key",
                       {{"ten\xffnt", kSecret}},
                       "invalid UTF-8 in key",
                       "ten\\xffnt"},
        BadContextCase{"OverlongKey",
                       {{"a\xc0\xaf", kSecret}},
                       "invalid UTF-8 in key",
                       "a\\xc0\\xaf"},
        BadContextCase{"InvalidUtf8Value",
                       {{"tenant", std::string(kSecret) + "\xed\xa0\x80"}},
                       "invalid UTF-8 in the value of key",
                       "tenant"},
        BadContextCase{"TruncatedUtf8Value",
                       {{"tenant", std::string(kSecret) + "\xe2\x82"}},
                       "invalid UTF-8 in the value of key",
                       "tenant"},
        BadContextCase{"NulInKey",
                       {{std::string("ten\0ant", 7), kSecret}},
                       "NUL byte in key",
                       "ten\\x00ant"},
        BadContextCase{
            "NulInValue",
            {{"tenant", std::string(kSecret) + std::string("\0x", 2)}},
            "NUL byte in the value of key",
            "tenant"},
        BadContextCase{"SixtyFourKiBValue",
                       {{"blob", std::string(64 * 1024, 'v')}},
                       "more than 8192 bytes",
                       "blob"},
        BadContextCase{
            "OneByteOverTotal",
            {{"a", std::string(4096, 'v')}, {"b", std::string(4095, 'v')}},
            "more than 8192 bytes",
            "b"},
        BadContextCase{"SixtyFivePairs", NumberedPairs(65),
                       "more than 64 pairs (65)", "k1064"},
        BadContextCase{"ThousandPairs", NumberedPairs(1000),
                       "more than 64 pairs (1000)", "k1064"},
        BadContextCase{"QuoteAndBackslashInInvalidKey",
                       {{"\"\\\x01\xff", kSecret}},
                       "invalid UTF-8 in key",
                       "\\x22\\x5c\\x01\\xff"}),
    [](const auto& test) { return std::string(test.param.name); });

TEST(ValidateEncryptionContextTest, EchoesAtMost64BytesOfALongKey) {
  // 4 KiB: long, yet inside the size limit, so the UTF-8 check answers.
  const std::string key = std::string(4096, 'x') + "\xff";
  absl::Status s = ValidateEncryptionContext({{key, "v"}});
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument,
                          AllOf(HasSubstr("invalid UTF-8 in key"),
                                HasSubstr("\"" + std::string(64, 'x') +
                                          "\"... (4097 bytes)"))));
  EXPECT_THAT(std::string(s.message()), Not(HasSubstr(std::string(65, 'x'))));
}

TEST(ValidateEncryptionContextTest, OversizedContextIsRejectedOnSizeFirst) {
  // Invalid UTF-8 and too big: the size limit answers, without a byte scan.
  EXPECT_THAT(
      ValidateEncryptionContext({{"k", std::string(64 * 1024, '\xff')}}),
      StatusIs(absl::StatusCode::kInvalidArgument,
               HasSubstr("more than 8192 bytes")));
}

}  // namespace
}  // namespace custos::kms
