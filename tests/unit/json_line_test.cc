// ScanJsonObjectLine: accepts exactly the JSON objects nlohmann::json accepts
// (less a byte order mark and nesting past kMaxDepth), says where and why it
// refuses the rest, finds repeated keys without decoding, and hands back the
// top-level members as raw slices.
#include "kms/audit/json_line.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace custos::kms {
namespace {

using ::testing::HasSubstr;

bool NlohmannReadsAnObject(const std::string& line) {
  const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
  return !j.is_discarded() && j.is_object();
}

std::string Nested(int depth) {
  std::string line = "{\"a\":";
  for (int i = 1; i < depth; ++i) line += i % 2 ? "[" : "{\"b\":";
  line += "0";
  for (int i = depth - 1; i >= 1; --i) line += i % 2 ? "]" : "}";
  return line + "}";
}

TEST(ScanJsonObjectLineTest, AcceptsWhatNlohmannAccepts) {
  const std::vector<std::string> lines = {
      "{}",
      " \t{ }\r",
      R"({"seq":1,"prev":"00"})",
      R"({"a":-0,"b":0.5,"c":-12.25e+3,"d":1E-2,"e":10,"f":123456789012345678901234567890})",
      R"({"a":true,"b":false,"c":null,"d":[],"e":{},"f":[[],[{}]]})",
      R"({"s":"\"\\\/\b\f\n\r\t\u0000\u00e9\uD834\uDD1E"})",
      "{\"utf8\":\"caf\xc3\xa9 \xe2\x98\x95 \xf0\x9d\x84\x9e \xef\xbf\xbf\"}",
      "{\"del\":\"\x7f\"}",
      R"({"\u0063heckpoint":{"k":"v"}})",
      R"({ "a" : [ 1 , 2 ] , "b" : { "c" : "d" } })",
      Nested(JsonObjectLine::kMaxDepth),
  };
  for (const std::string& line : lines) {
    JsonObjectLine scan;
    EXPECT_TRUE(ScanJsonObjectLine(line, &scan))
        << line << ": " << (scan.error ? scan.error : "") << " at "
        << scan.error_offset;
    EXPECT_TRUE(NlohmannReadsAnObject(line)) << line;
  }
}

TEST(ScanJsonObjectLineTest, RefusesWhatNlohmannRefusesAndSaysWhere) {
  struct Case {
    std::string line;
    const char* error;
    size_t offset;
  };
  const Case cases[] = {
      {"", "not a JSON object", 0},
      {"[1]", "not a JSON object", 0},
      {"\"s\"", "not a JSON object", 0},
      {R"({"seq":1,"note":"not" JSON","prev":"00"})", "expected ','", 22},
      {R"({"seq":1)", "object is not closed", 8},
      {R"({"seq":1,)", "expected a key", 9},
      {R"({"seq":1,"a":[1,2})", "expected ',' or ']'", 17},
      {R"({"seq":1} x)", "more after the object", 10},
      {R"({"seq":1}{})", "more after the object", 9},
      {R"({"seq" 1})", "expected ':'", 7},
      {R"({seq:1})", "expected a key", 1},
      {R"({"a":01})", "expected ','", 6},
      {R"({"a":1.})", "a digit must follow '.'", 7},
      {R"({"a":.5})", "expected a value", 5},
      {R"({"a":1e})", "a digit must follow 'e'", 7},
      {R"({"a":-})", "expected a value", 6},
      {R"({"a":+1})", "expected a value", 5},
      {R"({"a":tru})", "expected a value", 5},
      {R"({"a":True})", "expected a value", 5},
      {R"({"a":nan})", "expected a value", 5},
      {R"({"a":"b)", "string is not closed", 7},
      {"{\"a\":\"b\\", "string is not closed", 7},
      {"{\"a\":\"\t\"}", "control character", 6},
      {"{\"a\":\"\x01\"}", "control character", 6},
      {R"({"a":"\x"})", "invalid escape", 6},
      {R"({"a":"\u12"})", "4 hex digits", 6},
      {R"({"a":"\uD800"})", "high surrogate without a low one", 6},
      {R"({"a":"\uD800\u0041"})", "high surrogate without a low one", 6},
      {R"({"a":"\uDC00"})", "low surrogate without a high one", 6},
      {"{\"a\":\"\xff\"}", "invalid UTF-8", 6},
      {"{\"a\":\"\x80\"}", "invalid UTF-8", 6},
      {"{\"a\":\"\xc0\xaf\"}", "invalid UTF-8", 6},          // overlong '/'
      {"{\"a\":\"\xe0\x80\xaf\"}", "invalid UTF-8", 6},      // overlong
      {"{\"a\":\"\xed\xa0\x80\"}", "invalid UTF-8", 6},      // a surrogate
      {"{\"a\":\"\xf4\x90\x80\x80\"}", "invalid UTF-8", 6},  // > U+10FFFF
      {"{\"a\":\"\xe2\x98\"}", "invalid UTF-8", 6},          // cut short
      {"{\"a\":\"\xe2\x93\x9d\x8f\"}", "invalid UTF-8", 9},  // stray byte
      {"{\"a\xff\":1}", "invalid UTF-8", 3},
      {"{\"a\":1,\xc3\xa9:1}", "expected a key", 7},
      {std::string("{\"a\":1\0}", 8), "expected ','", 6},
  };
  for (const Case& c : cases) {
    JsonObjectLine scan;
    EXPECT_FALSE(ScanJsonObjectLine(c.line, &scan)) << c.line;
    ASSERT_NE(scan.error, nullptr) << c.line;
    EXPECT_THAT(scan.error, HasSubstr(c.error)) << c.line;
    EXPECT_EQ(scan.error_offset, c.offset) << c.line;
    EXPECT_FALSE(NlohmannReadsAnObject(c.line)) << c.line;
  }
}

TEST(ScanJsonObjectLineTest, RefusesNestingPastTheLimit) {
  JsonObjectLine scan;
  EXPECT_TRUE(ScanJsonObjectLine(Nested(JsonObjectLine::kMaxDepth), &scan));
  EXPECT_FALSE(
      ScanJsonObjectLine(Nested(JsonObjectLine::kMaxDepth + 1), &scan));
  EXPECT_THAT(scan.error, HasSubstr("nested too deeply"));
  const std::string bomb =
      "{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
  EXPECT_FALSE(ScanJsonObjectLine(bomb, &scan));
  EXPECT_THAT(scan.error, HasSubstr("nested too deeply"));
}

TEST(ScanJsonObjectLineTest, RefusesAByteOrderMark) {
  // nlohmann skips one; RFC 8259 §8.1 lets a parser ignore it, and the
  // writer never writes one.
  JsonObjectLine scan;
  EXPECT_FALSE(ScanJsonObjectLine("\xef\xbb\xbf{}", &scan));
}

TEST(ScanJsonObjectLineTest, ReturnsTheTopLevelMembersRaw) {
  const std::string line =
      R"( {"seq" : 12 ,"a":{"b":[1,{"c":2}],"d":"e"},"s":"x\"y", "prev":"ab"} )";
  JsonObjectLine scan;
  ASSERT_TRUE(ScanJsonObjectLine(line, &scan)) << scan.error;
  EXPECT_TRUE(scan.keys_checked);
  EXPECT_FALSE(scan.repeated_key);
  ASSERT_EQ(scan.member_count, 4u);
  EXPECT_EQ(scan.members[0].key, "seq");
  EXPECT_EQ(scan.members[0].value, "12");
  EXPECT_EQ(scan.members[1].key, "a");
  EXPECT_EQ(scan.members[1].value, R"({"b":[1,{"c":2}],"d":"e"})");
  EXPECT_EQ(scan.members[2].key, "s");
  EXPECT_EQ(scan.members[2].value, R"("x\"y")");
  EXPECT_EQ(scan.members[3].key, "prev");
  EXPECT_EQ(scan.members[3].value, R"("ab")");
}

TEST(ScanJsonObjectLineTest, FindsAKeyRepeatedInTheSameObject) {
  struct Case {
    std::string line;
    bool repeated;
    const char* key;
  };
  const Case cases[] = {
      {R"({"seq":1,"seq":7})", true, "seq"},
      {R"({"seq":1,"a":{"x":1},"seq":7})", true, "seq"},
      {R"({"a":{"k":1,"j":[{"k":1}],"k":2}})", true, "k"},
      {R"({"a":[{"k":1,"k":2}]})", true, "k"},
      // The same key in sibling objects, or at another level, is no repeat.
      {R"({"a":{"k":1},"b":{"k":2},"k":{"k":3}})", false, ""},
      {R"({"a":[{"k":1},{"k":2}]})", false, ""},
      {R"({"seq":1,"seqq":2,"se":3})", false, ""},
  };
  for (const Case& c : cases) {
    JsonObjectLine scan;
    ASSERT_TRUE(ScanJsonObjectLine(c.line, &scan)) << c.line;
    EXPECT_TRUE(scan.keys_checked) << c.line;
    EXPECT_EQ(scan.repeated_key, c.repeated) << c.line;
    EXPECT_EQ(scan.first_repeated_key, c.key) << c.line;
  }
}

TEST(ScanJsonObjectLineTest, AnEscapedKeyAnywhereLeavesKeysUnchecked) {
  // "\u0073eq" is "seq" once decoded: raw comparison cannot tell.
  for (const std::string line :
       {R"({"seq":1,"\u0073eq":7})", R"({"a":{"k\n":1}})",
        R"({"a":[{"\"":1}],"b":2})"}) {
    JsonObjectLine scan;
    ASSERT_TRUE(ScanJsonObjectLine(line, &scan)) << line;
    EXPECT_FALSE(scan.keys_checked) << line;
    EXPECT_FALSE(scan.repeated_key) << line;
  }
  // An escape in a value is no concern.
  JsonObjectLine scan;
  ASSERT_TRUE(ScanJsonObjectLine(R"({"k":"\u0073"})", &scan));
  EXPECT_TRUE(scan.keys_checked);
}

TEST(ScanJsonObjectLineTest, TooManyKeysLeavesKeysUnchecked) {
  std::string line = "{";
  for (size_t i = 0; i <= JsonObjectLine::kMaxKeys; ++i) {
    absl::StrAppend(&line, i ? "," : "", "\"k", i, "\":", i);
  }
  line += "}";
  JsonObjectLine scan;
  ASSERT_TRUE(ScanJsonObjectLine(line, &scan)) << scan.error;
  EXPECT_FALSE(scan.keys_checked);
}

TEST(ScanJsonObjectLineTest, AScanForgetsThePreviousLine) {
  JsonObjectLine scan;
  EXPECT_FALSE(ScanJsonObjectLine(R"({"a":1,"a":"\u0041",)", &scan));
  ASSERT_TRUE(ScanJsonObjectLine(R"({"b":2})", &scan));
  EXPECT_EQ(scan.error, nullptr);
  EXPECT_TRUE(scan.keys_checked);
  EXPECT_FALSE(scan.repeated_key);
  ASSERT_EQ(scan.member_count, 1u);
  EXPECT_EQ(scan.members[0].key, "b");
}

}  // namespace
}  // namespace custos::kms
