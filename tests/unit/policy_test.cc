#include "kms/policy.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/testing/status_matchers.h"
#include "kms/encryption_context.h"

namespace custos::kms {
namespace {

using ::custos::testing::IsOk;
using ::custos::testing::IsOkAndHolds;
using ::custos::testing::StatusIs;
using ::testing::HasSubstr;

// ---- Enum names ----

TEST(KeyOperationNameTest, NamesRoundTripThroughParse) {
  for (int i = 1; i <= 6; ++i) {
    const auto op = static_cast<KeyOperation>(i);
    KeyOperation parsed;
    ASSERT_TRUE(ParseKeyOperation(KeyOperationName(op), &parsed)) << i;
    EXPECT_EQ(parsed, op);
  }
  EXPECT_STREQ(KeyOperationName(KeyOperation::kDecrypt), "DECRYPT");
  EXPECT_STREQ(KeyOperationName(KeyOperation::kGenerateDataKeyWithoutPlaintext),
               "GENERATE_DATA_KEY_WITHOUT_PLAINTEXT");
}

TEST(KeyOperationNameTest, ParseRejectsOtherSpellings) {
  KeyOperation op = KeyOperation::kEncrypt;
  for (const char* name : {"decrypt", "Decrypt", "DECRYPT ", "", "UNKNOWN",
                           "KEY_OPERATION_UNSPECIFIED", "4"}) {
    EXPECT_FALSE(ParseKeyOperation(name, &op)) << name;
  }
  EXPECT_EQ(op, KeyOperation::kEncrypt);  // Untouched.
}

TEST(JustificationReasonNameTest, NamesRoundTripThroughParse) {
  for (int i = 1; i <= 6; ++i) {
    const auto r = static_cast<JustificationReason>(i);
    JustificationReason parsed;
    ASSERT_TRUE(ParseJustificationReason(JustificationReasonName(r), &parsed))
        << i;
    EXPECT_EQ(parsed, r);
  }
  EXPECT_STREQ(
      JustificationReasonName(JustificationReason::kCustomerInitiatedAccess),
      "CUSTOMER_INITIATED_ACCESS");
  EXPECT_STREQ(JustificationReasonName(JustificationReason::kSystemOperation),
               "SYSTEM_OPERATION");
}

TEST(JustificationReasonNameTest, UnspecifiedNeverParses) {
  JustificationReason r = JustificationReason::kSystemOperation;
  EXPECT_FALSE(
      ParseJustificationReason("JUSTIFICATION_REASON_UNSPECIFIED", &r));
  EXPECT_FALSE(ParseJustificationReason("customer_initiated_access", &r));
  EXPECT_EQ(r, JustificationReason::kSystemOperation);
}

// ---- GlobMatch ----

struct GlobCase {
  const char* name;
  std::string pattern;
  std::string text;
  bool match;
};

class GlobMatchTest : public ::testing::TestWithParam<GlobCase> {};

TEST_P(GlobMatchTest, MatchesAsTabled) {
  const GlobCase& c = GetParam();
  EXPECT_EQ(GlobMatch(c.pattern, c.text), c.match)
      << "pattern=\"" << c.pattern << "\" text=\"" << c.text << "\"";
}

INSTANTIATE_TEST_SUITE_P(
    Table, GlobMatchTest,
    ::testing::Values(
        GlobCase{"ExactMatches", "spiffe://a/b", "spiffe://a/b", true},
        GlobCase{"ExactDiffers", "spiffe://a/b", "spiffe://a/c", false},
        GlobCase{"ExactIsCaseSensitive", "abc", "ABC", false},
        GlobCase{"PrefixIsNotAMatch", "abc", "abcd", false},
        GlobCase{"TextPrefixIsNotAMatch", "abcd", "abc", false},
        GlobCase{"StarAtEnd", "spiffe://a/*", "spiffe://a/b/c", true},
        GlobCase{"StarAtEndMatchesEmpty", "spiffe://a/*", "spiffe://a/", true},
        GlobCase{"StarAtEndNeedsPrefix", "spiffe://a/*", "spiffe://ab", false},
        GlobCase{"StarAtStart", "*.example.org", "db.example.org", true},
        GlobCase{"StarAtStartNeedsSuffix", "*.example.org", "example.org",
                 false},
        GlobCase{"StarInMiddle", "a*z", "a/b/c/z", true},
        GlobCase{"StarInMiddleMatchesEmpty", "a*z", "az", true},
        GlobCase{"StarInMiddleNeedsEnds", "a*z", "a/b/c/y", false},
        GlobCase{"MultipleStars", "*/photos/*/up*", "x/photos/1/uploader",
                 true},
        GlobCase{"MultipleStarsInOrder", "*a*b*", "xbxa", false},
        GlobCase{"AdjacentStars", "a**b", "ab", true},
        GlobCase{"LoneStarMatchesAnything", "*", "anything/at/all", true},
        GlobCase{"LoneStarMatchesEmpty", "*", "", true},
        GlobCase{"EmptyPatternMatchesEmpty", "", "", true},
        GlobCase{"EmptyPatternRejectsText", "", "a", false},
        GlobCase{"EmptyTextNeedsStarsOnly", "a*", "", false},
        GlobCase{"QuestionMarkIsLiteral", "a?c", "abc", false},
        GlobCase{"QuestionMarkMatchesItself", "a?c", "a?c", true},
        GlobCase{"BracketIsLiteral", "[ab]", "a", false},
        GlobCase{"BracketMatchesItself", "[ab]", "[ab]", true},
        GlobCase{"DotIsLiteral", "a.c", "abc", false},
        GlobCase{"BackslashIsLiteral", "a\\*", "a\\xyz", true},
        GlobCase{"BackslashDoesNotEscape", "a\\*", "a*", false},
        GlobCase{"StarInTextIsLiteral", "spiffe://a/b", "spiffe://a/*", false},
        GlobCase{"StarInTextMatchesStarPattern", "spiffe://a/*", "spiffe://a/*",
                 true},
        GlobCase{"LoneStarTextMatchesOnlyStarPatterns", "x", "*", false},
        GlobCase{"BacktrackAfterPartialMatch", "*abc", "ababc", true},
        GlobCase{"NonAsciiBytes", "caf*", "caf\xc3\xa9", true}),
    [](const ::testing::TestParamInfo<GlobCase>& param_info) {
      return std::string(param_info.param.name);
    });

TEST(GlobMatchPerformanceTest, PathologicalPatternFinishesQuickly) {
  const std::string text(10000, 'a');
  const auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(GlobMatch("*a*a*a*a*a*a*a*b", text));
  EXPECT_TRUE(GlobMatch("*a*a*a*a*a*a*a*a", text));
  // A long literal tail after a star: quadratic-ish at worst, still bounded.
  EXPECT_FALSE(GlobMatch("*" + std::string(500, 'a') + "b", text));
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_LT(elapsed, std::chrono::milliseconds(500));
}

// ---- PolicyAllows ----

constexpr absl::string_view kUploader = "spiffe://custos.test/photos/uploader";
constexpr absl::string_view kBilling = "spiffe://custos.test/billing/reader";

Justification Reason(JustificationReason r) {
  Justification j;
  j.reason = r;
  j.detail = "ticket 42";
  return j;
}

// The policy that most cases run against.
KeyPolicy TestPolicy() {
  KeyPolicy policy;
  // Photos services may generate data keys for any tenant.
  PolicyBinding photos;
  photos.principals = {"spiffe://custos.test/photos/*"};
  photos.operations = {KeyOperation::kGenerateDataKey};
  photos.required_context = {{"tenant", "*"}};
  policy.bindings.push_back(photos);
  // The billing reader may decrypt one tenant's data, with a customer
  // justification.
  PolicyBinding billing;
  billing.principals = {std::string(kBilling)};
  billing.operations = {KeyOperation::kDecrypt};
  billing.required_context = {{"tenant", "acme"}, {"purpose", "invoice-*"}};
  billing.require_justification = true;
  billing.allowed_reasons = {JustificationReason::kCustomerInitiatedAccess};
  policy.bindings.push_back(billing);
  // An exact principal with no conditions.
  PolicyBinding exact;
  exact.principals = {"spiffe://custos.test/ops"};
  exact.operations = {KeyOperation::kEncrypt};
  policy.bindings.push_back(exact);
  // Batch jobs may re-encrypt away from this key; a justification is
  // optional, but if they send one it must be a system reason.
  PolicyBinding restricted;
  restricted.principals = {"spiffe://custos.test/jobs/*"};
  restricted.operations = {KeyOperation::kReEncryptFrom};
  restricted.allowed_reasons = {JustificationReason::kSystemOperation};
  policy.bindings.push_back(restricted);
  return policy;
}

struct AccessCase {
  const char* name;
  std::string principal;
  KeyOperation operation;
  EncryptionContext context;
  std::optional<Justification> justification;
  bool allowed;
};

class PolicyAllowsTest : public ::testing::TestWithParam<AccessCase> {};

TEST_P(PolicyAllowsTest, DecidesAsTabled) {
  const AccessCase& c = GetParam();
  AccessRequest request;
  request.principal = c.principal;
  request.operation = c.operation;
  request.context = &c.context;
  request.justification = c.justification ? &*c.justification : nullptr;
  EXPECT_EQ(PolicyAllows(TestPolicy(), request), c.allowed);
}

const EncryptionContext kAcmeInvoice = {{"tenant", "acme"},
                                        {"purpose", "invoice-2024"}};

INSTANTIATE_TEST_SUITE_P(
    Table, PolicyAllowsTest,
    ::testing::Values(
        // Principals.
        AccessCase{"GlobPrincipalMatchesUploader",
                   std::string(kUploader),
                   KeyOperation::kGenerateDataKey,
                   {{"tenant", "acme"}},
                   std::nullopt,
                   true},
        AccessCase{"GlobPrincipalMatchesDeeperPath",
                   "spiffe://custos.test/photos/a/b",
                   KeyOperation::kGenerateDataKey,
                   {{"tenant", "acme"}},
                   std::nullopt,
                   true},
        AccessCase{"GlobPrincipalNeedsTheSlash",
                   "spiffe://custos.test/photosX",
                   KeyOperation::kGenerateDataKey,
                   {{"tenant", "acme"}},
                   std::nullopt,
                   false},
        AccessCase{"OtherTrustDomainDenied",
                   "spiffe://evil.test/photos/uploader",
                   KeyOperation::kGenerateDataKey,
                   {{"tenant", "acme"}},
                   std::nullopt,
                   false},
        AccessCase{"CallerStarDoesNotMatchLiteralPattern",
                   "spiffe://custos.test/*",
                   KeyOperation::kEncrypt,
                   {},
                   std::nullopt,
                   false},
        AccessCase{"CallerLoneStarDenied",
                   "*",
                   KeyOperation::kEncrypt,
                   {},
                   std::nullopt,
                   false},
        AccessCase{"ExactPrincipalAllowed",
                   "spiffe://custos.test/ops",
                   KeyOperation::kEncrypt,
                   {},
                   std::nullopt,
                   true},
        AccessCase{"ExactPrincipalIsCaseSensitive",
                   "spiffe://custos.test/OPS",
                   KeyOperation::kEncrypt,
                   {},
                   std::nullopt,
                   false},
        AccessCase{"EmptyPrincipalDenied",
                   "",
                   KeyOperation::kEncrypt,
                   {},
                   std::nullopt,
                   false},
        // Operations.
        AccessCase{"UploaderMayNotDecrypt",
                   std::string(kUploader),
                   KeyOperation::kDecrypt,
                   {{"tenant", "acme"}},
                   std::nullopt,
                   false},
        AccessCase{"GenerateDoesNotImplyWithoutPlaintext",
                   std::string(kUploader),
                   KeyOperation::kGenerateDataKeyWithoutPlaintext,
                   {{"tenant", "acme"}},
                   std::nullopt,
                   false},
        AccessCase{"DecryptBindingDoesNotAllowEncrypt", std::string(kBilling),
                   KeyOperation::kEncrypt, kAcmeInvoice,
                   Reason(JustificationReason::kCustomerInitiatedAccess),
                   false},
        AccessCase{"ReEncryptFromDoesNotAllowReEncryptTo",
                   "spiffe://custos.test/jobs/rotate",
                   KeyOperation::kReEncryptTo,
                   {},
                   Reason(JustificationReason::kSystemOperation),
                   false},
        // Context conditions.
        AccessCase{"RequiredContextMissingDenied",
                   std::string(kUploader),
                   KeyOperation::kGenerateDataKey,
                   {},
                   std::nullopt,
                   false},
        AccessCase{"RequiredContextOtherKeyDenied",
                   std::string(kUploader),
                   KeyOperation::kGenerateDataKey,
                   {{"team", "acme"}},
                   std::nullopt,
                   false},
        AccessCase{"RequiredContextReCasedKeyDenied",
                   std::string(kUploader),
                   KeyOperation::kGenerateDataKey,
                   {{"Tenant", "acme"}},
                   std::nullopt,
                   false},
        AccessCase{"RequiredContextGlobMatchesEmptyValue",
                   std::string(kUploader),
                   KeyOperation::kGenerateDataKey,
                   {{"tenant", ""}},
                   std::nullopt,
                   true},
        AccessCase{"ExtraContextPairsAllowed",
                   std::string(kUploader),
                   KeyOperation::kGenerateDataKey,
                   {{"tenant", "acme"}, {"album", "7"}},
                   std::nullopt,
                   true},
        AccessCase{"AllRequiredPairsAndJustificationAllowed",
                   std::string(kBilling), KeyOperation::kDecrypt, kAcmeInvoice,
                   Reason(JustificationReason::kCustomerInitiatedAccess), true},
        AccessCase{"RequiredContextWrongValueDenied",
                   std::string(kBilling),
                   KeyOperation::kDecrypt,
                   {{"tenant", "globex"}, {"purpose", "invoice-2024"}},
                   Reason(JustificationReason::kCustomerInitiatedAccess),
                   false},
        AccessCase{"RequiredContextReCasedValueDenied",
                   std::string(kBilling),
                   KeyOperation::kDecrypt,
                   {{"tenant", "ACME"}, {"purpose", "invoice-2024"}},
                   Reason(JustificationReason::kCustomerInitiatedAccess),
                   false},
        AccessCase{"RequiredContextOnePairMissingDenied",
                   std::string(kBilling),
                   KeyOperation::kDecrypt,
                   {{"tenant", "acme"}},
                   Reason(JustificationReason::kCustomerInitiatedAccess),
                   false},
        AccessCase{"RequiredContextGlobValueMismatchDenied",
                   std::string(kBilling),
                   KeyOperation::kDecrypt,
                   {{"tenant", "acme"}, {"purpose", "payroll"}},
                   Reason(JustificationReason::kCustomerInitiatedAccess),
                   false},
        AccessCase{"CallerStarValueIsLiteral",
                   std::string(kBilling),
                   KeyOperation::kDecrypt,
                   {{"tenant", "*"}, {"purpose", "invoice-1"}},
                   Reason(JustificationReason::kCustomerInitiatedAccess),
                   false},
        // Justifications.
        AccessCase{"RequiredJustificationAbsentDenied", std::string(kBilling),
                   KeyOperation::kDecrypt, kAcmeInvoice, std::nullopt, false},
        AccessCase{"RequiredJustificationUnspecifiedDenied",
                   std::string(kBilling), KeyOperation::kDecrypt, kAcmeInvoice,
                   Reason(JustificationReason::kUnspecified), false},
        AccessCase{"RequiredJustificationWrongReasonDenied",
                   std::string(kBilling), KeyOperation::kDecrypt, kAcmeInvoice,
                   Reason(JustificationReason::kProviderInitiatedReview),
                   false},
        AccessCase{"RequiredJustificationOutOfRangeReasonDenied",
                   std::string(kBilling), KeyOperation::kDecrypt, kAcmeInvoice,
                   Reason(static_cast<JustificationReason>(99)), false},
        AccessCase{"UnrequiredJustificationIgnoredWithoutAllowList",
                   std::string(kUploader),
                   KeyOperation::kGenerateDataKey,
                   {{"tenant", "acme"}},
                   Reason(JustificationReason::kThirdPartyDataRequest),
                   true},
        AccessCase{"AllowListPermitsNoJustification",
                   "spiffe://custos.test/jobs/rotate",
                   KeyOperation::kReEncryptFrom,
                   {},
                   std::nullopt,
                   true},
        AccessCase{"AllowListPermitsListedReason",
                   "spiffe://custos.test/jobs/rotate",
                   KeyOperation::kReEncryptFrom,
                   {},
                   Reason(JustificationReason::kSystemOperation),
                   true},
        AccessCase{"AllowListRefusesUnlistedReason",
                   "spiffe://custos.test/jobs/rotate",
                   KeyOperation::kReEncryptFrom,
                   {},
                   Reason(JustificationReason::kThirdPartyDataRequest),
                   false}),
    [](const ::testing::TestParamInfo<AccessCase>& param_info) {
      return std::string(param_info.param.name);
    });

TEST(PolicyAllowsDefaultTest, EmptyPolicyDeniesEverything) {
  const KeyPolicy empty;
  const EncryptionContext context = {{"tenant", "acme"}};
  const Justification justification =
      Reason(JustificationReason::kCustomerInitiatedAccess);
  for (int op = 1; op <= 6; ++op) {
    for (absl::string_view principal :
         {kUploader, kBilling, absl::string_view("*")}) {
      AccessRequest request;
      request.principal = principal;
      request.operation = static_cast<KeyOperation>(op);
      request.context = &context;
      request.justification = &justification;
      EXPECT_FALSE(PolicyAllows(empty, request)) << principal << " " << op;
    }
  }
}

TEST(PolicyAllowsDefaultTest, NullContextCountsAsEmpty) {
  const KeyPolicy policy = TestPolicy();
  AccessRequest request;
  request.operation = KeyOperation::kGenerateDataKey;
  request.principal = kUploader;
  request.context = nullptr;
  EXPECT_FALSE(PolicyAllows(policy, request));  // tenant is required.
  request.principal = "spiffe://custos.test/ops";
  request.operation = KeyOperation::kEncrypt;
  EXPECT_TRUE(PolicyAllows(policy, request));  // No conditions.
}

TEST(PolicyAllowsDefaultTest, BindingWithoutPrincipalsAllowsNobody) {
  KeyPolicy policy;
  PolicyBinding binding;
  binding.operations = {KeyOperation::kDecrypt};
  policy.bindings.push_back(binding);
  AccessRequest request;
  request.principal = kBilling;
  request.operation = KeyOperation::kDecrypt;
  EXPECT_FALSE(PolicyAllows(policy, request));
}

TEST(PolicyAllowsDefaultTest, ConditionsDoNotCombineAcrossBindings) {
  // One binding grants the principal, another the context-free operation to
  // someone else: neither alone allows the request.
  KeyPolicy policy;
  PolicyBinding a;
  a.principals = {std::string(kBilling)};
  a.operations = {KeyOperation::kDecrypt};
  a.required_context = {{"tenant", "acme"}};
  PolicyBinding b;
  b.principals = {"spiffe://custos.test/other"};
  b.operations = {KeyOperation::kDecrypt};
  policy.bindings = {a, b};
  const EncryptionContext context = {{"tenant", "globex"}};
  AccessRequest request;
  request.principal = kBilling;
  request.operation = KeyOperation::kDecrypt;
  request.context = &context;
  EXPECT_FALSE(PolicyAllows(policy, request));
}

// ---- ValidatePolicy ----

PolicyBinding ValidBinding() {
  PolicyBinding b;
  b.principals = {"spiffe://custos.test/svc"};
  b.operations = {KeyOperation::kDecrypt};
  return b;
}

TEST(ValidatePolicyTest, AcceptsTestPolicyAndEmptyPolicy) {
  EXPECT_THAT(ValidatePolicy(TestPolicy()), IsOk());
  EXPECT_THAT(ValidatePolicy(KeyPolicy{}), IsOk());
}

struct InvalidCase {
  const char* name;
  KeyPolicy policy;
  std::string expected_substring;
};

class ValidatePolicyErrorTest : public ::testing::TestWithParam<InvalidCase> {};

TEST_P(ValidatePolicyErrorTest, NamesTheFieldPath) {
  EXPECT_THAT(ValidatePolicy(GetParam().policy),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr(GetParam().expected_substring)));
}

// Builds a policy of one binding (after `before` valid ones) changed by `f`.
template <typename F>
KeyPolicy With(F f, int before = 0) {
  KeyPolicy policy;
  for (int i = 0; i < before; ++i) policy.bindings.push_back(ValidBinding());
  PolicyBinding b = ValidBinding();
  f(b);
  policy.bindings.push_back(b);
  return policy;
}

std::vector<InvalidCase> InvalidCases() {
  std::vector<InvalidCase> cases;
  cases.push_back({"EmptyPrincipal",
                   With(
                       [](PolicyBinding& b) {
                         b.principals = {"a", ""};
                       },
                       2),
                   "policy.bindings[2].principals[1]: empty; name a "
                   "principal such as spiffe://"});
  cases.push_back({"NoPrincipals",
                   With([](PolicyBinding& b) { b.principals.clear(); }),
                   "policy.bindings[0].principals: empty"});
  cases.push_back(
      {"TooManyPrincipals", With([](PolicyBinding& b) {
         b.principals.clear();
         for (int i = 0; i < 101; ++i) {
           b.principals.push_back("p" + std::to_string(i));
         }
       }),
       "policy.bindings[0].principals: 101 principals; at most 100"});
  cases.push_back({"LongPrincipal", With([](PolicyBinding& b) {
                     b.principals = {std::string(513, 'p')};
                   }),
                   "policy.bindings[0].principals[0]: 513 bytes; at most 512"});
  cases.push_back({"InvalidUtf8Principal",
                   With([](PolicyBinding& b) { b.principals = {"a\xc3"}; }),
                   "policy.bindings[0].principals[0]: \"a\\xc3\" is not "
                   "valid UTF-8"});
  cases.push_back({"OverlongUtf8Principal",
                   With([](PolicyBinding& b) { b.principals = {"\xc0\xaf"}; }),
                   "principals[0]: \"\\xc0\\xaf\" is not valid UTF-8"});
  cases.push_back(
      {"ControlCharacterPrincipal",
       With([](PolicyBinding& b) { b.principals = {"spiffe://a\n/b"}; }),
       "policy.bindings[0].principals[0]: \"spiffe://a\\n/b\" contains a "
       "control character"});
  cases.push_back({"NulPrincipal", With([](PolicyBinding& b) {
                     b.principals = {std::string("spiffe://a\0b", 12)};
                   }),
                   "contains a control character"});
  cases.push_back({"DuplicatePrincipal", With([](PolicyBinding& b) {
                     b.principals = {"a", "a"};
                   }),
                   "policy.bindings[0].principals[1]: \"a\" is listed twice"});
  cases.push_back({"NoOperations",
                   With([](PolicyBinding& b) { b.operations.clear(); }),
                   "policy.bindings[0].operations: empty; list at least one "
                   "of GENERATE_DATA_KEY"});
  cases.push_back(
      {"UnknownOperation", With([](PolicyBinding& b) {
         b.operations = {KeyOperation::kDecrypt, static_cast<KeyOperation>(0)};
       }),
       "policy.bindings[0].operations[1]: unknown operation 0"});
  cases.push_back(
      {"DuplicateOperation", With([](PolicyBinding& b) {
         b.operations = {KeyOperation::kDecrypt, KeyOperation::kDecrypt};
       }),
       "policy.bindings[0].operations[1]: DECRYPT is listed twice"});
  cases.push_back({"EmptyContextKey", With([](PolicyBinding& b) {
                     b.required_context = {{"", "x"}};
                   }),
                   "policy.bindings[0].required_context[\"\"]: empty key"});
  cases.push_back({"NulInContextValue", With([](PolicyBinding& b) {
                     b.required_context = {{"k", std::string("a\0", 2)}};
                   }),
                   "policy.bindings[0].required_context[\"k\"]: value is not "
                   "valid UTF-8 or contains NUL"});
  cases.push_back({"InvalidUtf8ContextKey", With([](PolicyBinding& b) {
                     b.required_context = {{"\xff", "x"}};
                   }),
                   "required_context[\"\\xff\"]: key is not valid UTF-8"});
  cases.push_back(
      {"TooManyContextPairs", With([](PolicyBinding& b) {
         for (int i = 0; i < 65; ++i) {
           b.required_context["k" + std::to_string(i)] = "v";
         }
       }),
       "policy.bindings[0].required_context: 65 pairs; at most 64"});
  cases.push_back({"ContextTooLarge", With([](PolicyBinding& b) {
                     b.required_context = {{"k", std::string(8192, 'v')}};
                   }),
                   "policy.bindings[0].required_context: 8193 bytes"});
  cases.push_back({"UnspecifiedAllowedReason", With([](PolicyBinding& b) {
                     b.allowed_reasons = {JustificationReason::kUnspecified};
                   }),
                   "policy.bindings[0].allowed_reasons[0]: "
                   "JUSTIFICATION_REASON_UNSPECIFIED is not a reason"});
  cases.push_back({"UnknownAllowedReason", With([](PolicyBinding& b) {
                     b.allowed_reasons = {static_cast<JustificationReason>(7)};
                   }),
                   "policy.bindings[0].allowed_reasons[0]: unknown reason 7"});
  cases.push_back({"DuplicateAllowedReason", With([](PolicyBinding& b) {
                     b.allowed_reasons = {
                         JustificationReason::kSystemOperation,
                         JustificationReason::kSystemOperation};
                   }),
                   "allowed_reasons[1]: SYSTEM_OPERATION is listed twice"});
  KeyPolicy too_many;
  too_many.bindings.assign(101, ValidBinding());
  cases.push_back({"TooManyBindings", too_many,
                   "policy.bindings: 101 bindings; at most 100"});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(
    Table, ValidatePolicyErrorTest, ::testing::ValuesIn(InvalidCases()),
    [](const ::testing::TestParamInfo<InvalidCase>& param_info) {
      return std::string(param_info.param.name);
    });

TEST(ValidatePolicyTest, AcceptsLimitsExactly) {
  KeyPolicy policy = With([](PolicyBinding& b) {
    b.principals = {std::string(512, 'p'), "caf\xc3\xa9/*"};
    for (int i = 0; i < 64; ++i) {
      b.required_context["k" + std::to_string(i)] = "";
    }
    b.allowed_reasons = {JustificationReason::kCustomerInitiatedAccess,
                         JustificationReason::kSystemOperation};
  });
  policy.bindings.resize(100, ValidBinding());
  EXPECT_THAT(ValidatePolicy(policy), IsOk());
}

TEST(ValidatePolicyTest, LongInputIsEchoedOnlyInPart) {
  const absl::Status status = ValidatePolicy(With(
      [](PolicyBinding& b) { b.principals = {std::string(500, 'x') + "\n"}; }));
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_LT(status.message().size(), 200u);
}

// ---- JSON ----

TEST(PolicyJsonTest, WritesTheDocumentedForm) {
  KeyPolicy policy;
  policy.version = 3;
  PolicyBinding b = ValidBinding();
  b.required_context = {{"tenant", "*"}, {"app", "photos"}};
  b.require_justification = true;
  b.allowed_reasons = {JustificationReason::kCustomerInitiatedAccess};
  policy.bindings.push_back(b);
  EXPECT_EQ(
      PolicyToJson(policy),
      R"({"version":3,"bindings":[{"principals":["spiffe://custos.test/svc"],)"
      R"("operations":["DECRYPT"],"required_context":{"app":"photos",)"
      R"("tenant":"*"},"require_justification":true,)"
      R"("allowed_reasons":["CUSTOMER_INITIATED_ACCESS"]}]})");
  EXPECT_EQ(PolicyToJson(KeyPolicy{}), R"({"version":0,"bindings":[]})");
}

TEST(PolicyJsonTest, RoundTripsEveryField) {
  KeyPolicy policy = TestPolicy();
  policy.version = 18446744073709551615u;
  policy.bindings[0].principals.push_back("caf\xc3\xa9 \"quoted\" \\ *");
  policy.bindings[0].required_context["emoji"] = "\xf0\x9f\x94\x91*";
  const std::string json = PolicyToJson(policy);
  EXPECT_THAT(PolicyFromJson(json), IsOkAndHolds(policy));
  // Stable: serialising the parsed policy gives the same bytes.
  CUSTOS_ASSERT_OK_AND_ASSIGN(KeyPolicy parsed, PolicyFromJson(json));
  EXPECT_EQ(PolicyToJson(parsed), json);
}

TEST(PolicyJsonTest, OptionalFieldsTakeDefaults) {
  KeyPolicy expected;
  expected.bindings.push_back(ValidBinding());
  EXPECT_THAT(PolicyFromJson(R"({"bindings":[{"principals":[
                  "spiffe://custos.test/svc"],"operations":["DECRYPT"]}]})"),
              IsOkAndHolds(expected));
  EXPECT_THAT(PolicyFromJson(R"( {"bindings": []} )"),
              IsOkAndHolds(KeyPolicy{}));
}

struct JsonErrorCase {
  const char* name;
  std::string json;
  std::string expected_substring;
};

class PolicyFromJsonErrorTest : public ::testing::TestWithParam<JsonErrorCase> {
};

TEST_P(PolicyFromJsonErrorTest, RejectsWithFieldPath) {
  EXPECT_THAT(PolicyFromJson(GetParam().json),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr(GetParam().expected_substring)));
}

constexpr char kOk[] = R"("principals":["p"],"operations":["DECRYPT"])";

INSTANTIATE_TEST_SUITE_P(
    Table, PolicyFromJsonErrorTest,
    ::testing::Values(
        JsonErrorCase{"NotJson", "{bindings:", "policy: not valid JSON"},
        JsonErrorCase{"Empty", "", "policy: not valid JSON"},
        JsonErrorCase{"TrailingGarbage", R"({"bindings":[]} x)",
                      "policy: not valid JSON"},
        JsonErrorCase{"NotAnObject", "[]", "policy: expected a JSON object"},
        JsonErrorCase{"UnknownTopLevelField", R"({"bindings":[],"bindngs":[]})",
                      "policy: unknown field \"bindngs\"; the fields are "
                      "version, bindings"},
        JsonErrorCase{"UnknownBindingField",
                      absl::StrCat(R"({"bindings":[{)", kOk,
                                   R"(,"required_contxt":{"a":"b"}}]})"),
                      "policy.bindings[0]: unknown field \"required_contxt\""},
        JsonErrorCase{"DuplicateTopLevelField",
                      R"({"bindings":[],"bindings":[]})",
                      "field \"bindings\" appears twice"},
        JsonErrorCase{
            "DuplicateContextKey",
            absl::StrCat(R"({"bindings":[{)", kOk,
                         R"(,"required_context":{"t":"a","t":"*"}}]})"),
            "field \"t\" appears twice"},
        JsonErrorCase{"MissingBindings", R"({"version":1})",
                      "policy.bindings: missing"},
        JsonErrorCase{"MissingPrincipals",
                      R"({"bindings":[{"operations":["DECRYPT"]}]})",
                      "policy.bindings[0].principals: missing"},
        JsonErrorCase{"MissingOperations",
                      R"({"bindings":[{"principals":["p"]}]})",
                      "policy.bindings[0].operations: missing"},
        JsonErrorCase{"VersionNegative", R"({"version":-1,"bindings":[]})",
                      "policy.version: expected a non-negative integer"},
        JsonErrorCase{"VersionString", R"({"version":"1","bindings":[]})",
                      "policy.version: expected a non-negative integer"},
        JsonErrorCase{"VersionFraction", R"({"version":1.5,"bindings":[]})",
                      "policy.version: expected a non-negative integer"},
        JsonErrorCase{"BindingsNotArray", R"({"bindings":{}})",
                      "policy.bindings: expected an array"},
        JsonErrorCase{"BindingNotObject", R"({"bindings":["p"]})",
                      "policy.bindings[0]: expected an object"},
        JsonErrorCase{"PrincipalsNotArray",
                      R"({"bindings":[{"principals":"p","operations":[]}]})",
                      "policy.bindings[0].principals: expected an array"},
        JsonErrorCase{"PrincipalNotString",
                      R"({"bindings":[{"principals":["p",7],)"
                      R"("operations":["DECRYPT"]}]})",
                      "policy.bindings[0].principals[1]: expected a string"},
        JsonErrorCase{"BadOperationName",
                      R"({"bindings":[{"principals":["p"],)"
                      R"("operations":["DECRYPT","decrypt"]}]})",
                      "policy.bindings[0].operations[1]: unknown operation "
                      "\"decrypt\"; use one of GENERATE_DATA_KEY"},
        JsonErrorCase{"OperationNumber",
                      R"({"bindings":[{"principals":["p"],)"
                      R"("operations":[4]}]})",
                      "policy.bindings[0].operations[0]: expected a string"},
        JsonErrorCase{"ContextNotObject",
                      absl::StrCat(R"({"bindings":[{)", kOk,
                                   R"(,"required_context":["t"]}]})"),
                      "policy.bindings[0].required_context: expected an "
                      "object"},
        JsonErrorCase{"ContextValueNotString",
                      absl::StrCat(R"({"bindings":[{)", kOk,
                                   R"(,"required_context":{"t":null}}]})"),
                      "policy.bindings[0].required_context[\"t\"]: expected "
                      "a string"},
        JsonErrorCase{"RequireJustificationString",
                      absl::StrCat(R"({"bindings":[{)", kOk,
                                   R"(,"require_justification":"true"}]})"),
                      "policy.bindings[0].require_justification: expected "
                      "true or false"},
        JsonErrorCase{"BadReasonName",
                      absl::StrCat(R"({"bindings":[{)", kOk,
                                   R"(,"allowed_reasons":["CUSTOMER"]}]})"),
                      "policy.bindings[0].allowed_reasons[0]: unknown reason "
                      "\"CUSTOMER\""},
        JsonErrorCase{
            "UnspecifiedReasonName",
            absl::StrCat(R"({"bindings":[{)", kOk,
                         R"(,"allowed_reasons":)"
                         R"(["JUSTIFICATION_REASON_UNSPECIFIED"]}]})"),
            "policy.bindings[0].allowed_reasons[0]: unknown reason"},
        JsonErrorCase{"FailsValidation",
                      R"({"bindings":[{"principals":[""],)"
                      R"("operations":["DECRYPT"]}]})",
                      "policy.bindings[0].principals[0]: empty"},
        JsonErrorCase{"InvalidUtf8",
                      "{\"bindings\":[{\"principals\":[\"\xff\"]",
                      "policy: not valid JSON"},
        JsonErrorCase{"DeepNesting",
                      std::string(10000, '[') + std::string(10000, ']'),
                      "policy: nested deeper than 8 levels"}),
    [](const ::testing::TestParamInfo<JsonErrorCase>& param_info) {
      return std::string(param_info.param.name);
    });

// The example in docs/policies.md, and its table of outcomes.
TEST(PolicyJsonTest, DocumentedExampleBehavesAsDocumented) {
  constexpr char kExample[] = R"({
    "version": 0,
    "bindings": [
      {
        "principals": ["spiffe://example.org/photos/uploader"],
        "operations": ["GENERATE_DATA_KEY"],
        "required_context": {"tenant": "*"}
      },
      {
        "principals": ["spiffe://example.org/billing/reader"],
        "operations": ["DECRYPT"],
        "require_justification": true,
        "allowed_reasons": ["CUSTOMER_INITIATED_ACCESS"]
      }
    ]
  })";
  CUSTOS_ASSERT_OK_AND_ASSIGN(KeyPolicy policy, PolicyFromJson(kExample));
  const std::string uploader = "spiffe://example.org/photos/uploader";
  const std::string billing = "spiffe://example.org/billing/reader";
  const EncryptionContext acme = {{"tenant", "acme"}};
  const EncryptionContext none;
  const EncryptionContext recased = {{"Tenant", "acme"}};
  const Justification customer =
      Reason(JustificationReason::kCustomerInitiatedAccess);
  const Justification review =
      Reason(JustificationReason::kProviderInitiatedReview);
  auto allows = [&](const std::string& principal, KeyOperation op,
                    const EncryptionContext& context,
                    const Justification* justification) {
    AccessRequest request;
    request.principal = principal;
    request.operation = op;
    request.context = &context;
    request.justification = justification;
    return PolicyAllows(policy, request);
  };
  EXPECT_TRUE(allows(uploader, KeyOperation::kGenerateDataKey, acme, nullptr));
  EXPECT_FALSE(allows(uploader, KeyOperation::kGenerateDataKey, none, nullptr));
  EXPECT_FALSE(
      allows(uploader, KeyOperation::kGenerateDataKey, recased, nullptr));
  EXPECT_FALSE(allows(uploader, KeyOperation::kDecrypt, acme, nullptr));
  EXPECT_TRUE(allows(billing, KeyOperation::kDecrypt, none, &customer));
  EXPECT_FALSE(allows(billing, KeyOperation::kDecrypt, none, nullptr));
  EXPECT_FALSE(allows(billing, KeyOperation::kDecrypt, none, &review));
  EXPECT_FALSE(allows("spiffe://example.org/admin", KeyOperation::kDecrypt,
                      none, &customer));
}

TEST(PolicyJsonTest, RefusesOversizedInput) {
  const std::string huge(kMaxPolicyJsonBytes + 1, ' ');
  EXPECT_THAT(PolicyFromJson(huge),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("bytes of JSON; at most")));
}

}  // namespace
}  // namespace custos::kms
