// ParseConfig: defaults, required fields, unknown fields, wrong types,
// ranges, and path resolution. Every refusal is INVALID_ARGUMENT naming the
// field.
#include "kms/server/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/time.h"
#include "common/testing/status_matchers.h"
#include "kms/store/store.h"

namespace custos::server {
namespace {

using ::custos::testing::IsOk;
using ::custos::testing::StatusIs;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr char kBase[] = "/etc/custos";
// What custosd-test (the build the tests run) parses with.
constexpr ParseOptions kTestBuild{.allow_testing = true};

// Every required field, and nothing else.
constexpr char kMinimal[] = R"yaml(
listen: "127.0.0.1:7443"
tls:
  cert: tls/server.pem
  key: tls/server.key
  client_ca: tls/clients-ca.pem
hsm:
  module: /usr/lib/softhsm/libsofthsm2.so
  token_label: custos
  pin_file: hsm.pin
storage: sqlite:///var/lib/custos/custos.db
audit_dir: audit
admins:
  - spiffe://example.org/admin
)yaml";

// kMinimal with the line containing `needle` removed.
std::string Without(const std::string& needle) {
  std::string out;
  size_t pos = 0;
  const std::string text = kMinimal;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(pos, end - pos);
    if (line.find(needle) == std::string::npos) out += line + "\n";
    pos = end + 1;
  }
  return out;
}

// kMinimal with `from` replaced by `to` (which must occur).
std::string Replace(const std::string& from, const std::string& to) {
  const std::string text = kMinimal;
  EXPECT_NE(text.find(from), std::string::npos) << from;
  return absl::StrReplaceAll(text, {{from, to}});
}

TEST(ParseConfigTest, MinimalConfigParsesWithDefaults) {
  absl::StatusOr<Config> c = ParseConfig(kMinimal, kBase);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->listen, "127.0.0.1:7443");
  EXPECT_EQ(c->hsm.module, "/usr/lib/softhsm/libsofthsm2.so");
  EXPECT_EQ(c->hsm.token_label, "custos");
  EXPECT_EQ(c->storage, "sqlite:///var/lib/custos/custos.db");
  EXPECT_THAT(c->admins, ElementsAre("spiffe://example.org/admin"));
  // Defaults.
  const Config defaults;
  EXPECT_EQ(c->node_id, "custos-1");
  EXPECT_THAT(c->auditors, IsEmpty());
  EXPECT_EQ(c->hsm.pool_size, 2);
  EXPECT_EQ(c->hsm.call_timeout, absl::Seconds(10));
  EXPECT_EQ(c->hsm.lease_timeout, absl::Seconds(5));
  EXPECT_EQ(c->limits.max_message_bytes, defaults.limits.max_message_bytes);
  EXPECT_EQ(c->limits.max_concurrent_streams,
            defaults.limits.max_concurrent_streams);
  EXPECT_EQ(c->encryption_limit, uint64_t{1} << 30);
  EXPECT_EQ(c->maintenance_interval, absl::Seconds(10));
  EXPECT_EQ(c->log_level, "info");
  EXPECT_THAT(c->development.insecure_listen, IsEmpty());
  EXPECT_THAT(c->development.insecure_principal, IsEmpty());
  EXPECT_THAT(c->metrics_listen, IsEmpty());  // no metrics unless asked
  EXPECT_EQ(c->testing.deletion_day, absl::Hours(24));
  EXPECT_EQ(c->testing.min_rotation_period, absl::Hours(24));
}

TEST(ParseConfigTest, ReadsEveryOptionalField) {
  const std::string yaml = std::string(kMinimal) + R"yaml(
node_id: node-7
auditors: [spiffe://example.org/auditor]
limits: {max_message_bytes: 131072, max_concurrent_streams: 8}
encryption_limit: 1000
maintenance_interval_seconds: 0.5
log_level: debug
development:
  insecure_listen: 127.0.0.1:7000
  insecure_principal: cn:dev
testing: {deletion_day_seconds: 2, min_rotation_period_seconds: 1}
)yaml";
  std::string with_hsm = absl::StrReplaceAll(
      yaml, {{"  pin_file: hsm.pin\n",
              "  pin_file: hsm.pin\n  pool_size: 64\n  call_timeout_ms: 250\n"
              "  lease_timeout_ms: 100\n"}});
  absl::StatusOr<Config> c = ParseConfig(with_hsm, kBase, kTestBuild);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->node_id, "node-7");
  EXPECT_THAT(c->auditors, ElementsAre("spiffe://example.org/auditor"));
  EXPECT_EQ(c->hsm.pool_size, 64);
  EXPECT_EQ(c->hsm.call_timeout, absl::Milliseconds(250));
  EXPECT_EQ(c->hsm.lease_timeout, absl::Milliseconds(100));
  EXPECT_EQ(c->limits.max_message_bytes, 131072);
  EXPECT_EQ(c->limits.max_concurrent_streams, 8);
  EXPECT_EQ(c->encryption_limit, 1000u);
  EXPECT_EQ(c->maintenance_interval, absl::Milliseconds(500));
  EXPECT_EQ(c->log_level, "debug");
  EXPECT_EQ(c->development.insecure_listen, "127.0.0.1:7000");
  EXPECT_EQ(c->development.insecure_principal, "cn:dev");
  EXPECT_EQ(c->testing.deletion_day, absl::Seconds(2));
  EXPECT_EQ(c->testing.min_rotation_period, absl::Seconds(1));
}

TEST(ParseConfigTest, EachRequiredFieldMissingIsNamed) {
  struct Case {
    const char* line;   // removed from kMinimal
    const char* field;  // must appear in the message
  };
  const Case cases[] = {
      {"listen:", "listen"},
      {"  cert:", "tls"},
      {"  key:", "tls"},
      {"  client_ca:", "tls"},
      {"  module:", "hsm.module"},
      {"  token_label:", "hsm.token_label"},
      {"  pin_file:", "hsm.pin_file"},
      {"storage:", "storage"},
      {"audit_dir:", "audit_dir"},
  };
  for (const Case& c : cases) {
    EXPECT_THAT(
        ParseConfig(Without(c.line), kBase),
        StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.field)))
        << c.line;
  }
  // The tls message names the sub-fields it wants.
  EXPECT_THAT(ParseConfig(Without("  client_ca:"), kBase),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("tls"), HasSubstr("client_ca"))));
}

TEST(ParseConfigTest, MissingSectionsAreNamed) {
  // Whole tls section gone.
  std::string no_tls = Without("tls:");
  no_tls =
      absl::StrReplaceAll(no_tls, {{"  cert: tls/server.pem\n", ""},
                                   {"  key: tls/server.key\n", ""},
                                   {"  client_ca: tls/clients-ca.pem\n", ""}});
  EXPECT_THAT(ParseConfig(no_tls, kBase),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tls")));
}

TEST(ParseConfigTest, AdminsMissingOrEmptyIsNamed) {
  std::string no_admins = Without("admins:");
  no_admins = absl::StrReplaceAll(no_admins,
                                  {{"  - spiffe://example.org/admin\n", ""}});
  EXPECT_THAT(
      ParseConfig(no_admins, kBase),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("admins")));
  EXPECT_THAT(
      ParseConfig(
          Replace("admins:\n  - spiffe://example.org/admin\n", "admins: []\n"),
          kBase),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("admins")));
}

TEST(ParseConfigTest, EmptyStringCountsAsMissing) {
  EXPECT_THAT(
      ParseConfig(Replace("listen: \"127.0.0.1:7443\"", "listen: \"\""), kBase),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("listen")));
}

TEST(ParseConfigTest, UnknownTopLevelFieldIsNamed) {
  EXPECT_THAT(ParseConfig(std::string(kMinimal) + "listne: 1.2.3.4:1\n", kBase),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("listne"), HasSubstr("unknown"))));
}

TEST(ParseConfigTest, UnknownNestedFieldsAreNamed) {
  struct Case {
    std::string yaml;
    const char* field;
  };
  const Case cases[] = {
      {Replace("  cert: tls/server.pem", "  cert: a\n  certs: b"), "tls.certs"},
      {Replace("  token_label: custos",
               "  token_label: custos\n  pin: \"1234\""),
       "hsm.pin"},
      {std::string(kMinimal) + "limits: {max_messages: 1}\n",
       "limits.max_messages"},
      {std::string(kMinimal) + "development: {insecure: true}\n",
       "development.insecure"},
      {std::string(kMinimal) + "testing: {deletion_days: 1}\n",
       "testing.deletion_days"},
  };
  for (const Case& c : cases) {
    EXPECT_THAT(ParseConfig(c.yaml, kBase, kTestBuild),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         AllOf(HasSubstr(c.field), HasSubstr("unknown"))))
        << c.field;
  }
}

TEST(ParseConfigTest, WrongTypesAreNamed) {
  struct Case {
    std::string yaml;
    const char* field;
  };
  const Case cases[] = {
      {Replace("listen: \"127.0.0.1:7443\"", "listen: [a, b]"), "listen"},
      {Replace("storage: sqlite:///var/lib/custos/custos.db",
               "storage: {url: x}"),
       "storage"},
      {Replace("admins:\n  - spiffe://example.org/admin",
               "admins: spiffe://example.org/admin"),
       "admins"},
      {Replace("  pin_file: hsm.pin", "  pin_file: hsm.pin\n  pool_size: two"),
       "hsm.pool_size"},
      {Replace("  pin_file: hsm.pin",
               "  pin_file: hsm.pin\n  call_timeout_ms: soon"),
       "hsm.call_timeout_ms"},
      {Replace("  cert: tls/server.pem", "  cert: [a]"), "tls.cert"},
      {std::string(kMinimal) + "encryption_limit: lots\n", "encryption_limit"},
      {std::string(kMinimal) + "maintenance_interval_seconds: often\n",
       "maintenance_interval_seconds"},
      {std::string(kMinimal) + "limits: {max_message_bytes: big}\n",
       "limits.max_message_bytes"},
      {std::string(kMinimal) + "auditors: {a: b}\n", "auditors"},
  };
  for (const Case& c : cases) {
    EXPECT_THAT(
        ParseConfig(c.yaml, kBase),
        StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.field)))
        << c.field;
  }
}

TEST(ParseConfigTest, SectionThatIsNotAMappingIsNamed) {
  std::string yaml = Without("tls:");
  yaml = absl::StrReplaceAll(yaml, {{"  cert: tls/server.pem\n", ""},
                                    {"  key: tls/server.key\n", ""},
                                    {"  client_ca: tls/clients-ca.pem\n", ""}});
  yaml += "tls: server.pem\n";
  EXPECT_THAT(ParseConfig(yaml, kBase),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("tls"), HasSubstr("mapping"))));
  EXPECT_THAT(
      ParseConfig("- a\n- b\n", kBase),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("mapping")));
}

TEST(ParseConfigTest, PoolSizeOutsideOneToSixtyFourRefused) {
  for (const char* size : {"0", "65", "-1"}) {
    EXPECT_THAT(
        ParseConfig(
            Replace("  pin_file: hsm.pin",
                    std::string("  pin_file: hsm.pin\n  pool_size: ") + size),
            kBase),
        StatusIs(absl::StatusCode::kInvalidArgument,
                 HasSubstr("hsm.pool_size")))
        << size;
  }
  for (const char* size : {"1", "64"}) {
    EXPECT_THAT(
        ParseConfig(
            Replace("  pin_file: hsm.pin",
                    std::string("  pin_file: hsm.pin\n  pool_size: ") + size),
            kBase),
        IsOk())
        << size;
  }
}

TEST(ParseConfigTest, NonPositiveTimeoutsRefused) {
  for (const char* field : {"call_timeout_ms", "lease_timeout_ms"}) {
    EXPECT_THAT(ParseConfig(Replace("  pin_file: hsm.pin",
                                    std::string("  pin_file: hsm.pin\n  ") +
                                        field + ": 0"),
                            kBase),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(field)))
        << field;
  }
}

TEST(ParseConfigTest, OtherRangesRefused) {
  struct Case {
    const char* extra;
    const char* field;
  };
  const Case cases[] = {
      {"limits: {max_message_bytes: 5119}\n", "limits.max_message_bytes"},
      {"limits: {max_message_bytes: 16777217}\n", "limits.max_message_bytes"},
      {"limits: {max_concurrent_streams: 0}\n",
       "limits.max_concurrent_streams"},
      {"encryption_limit: 0\n", "encryption_limit"},
      // A negative count must not wrap around to 2^64 - 1.
      {"encryption_limit: -1\n", "encryption_limit"},
      {"maintenance_interval_seconds: 0\n", "maintenance_interval_seconds"},
      {"maintenance_interval_seconds: -5\n", "maintenance_interval_seconds"},
      {"log_level: verbose\n", "log_level"},
      {"node_id: \"a b\"\n", "node_id"},
      {"node_id: \"../etc\"\n", "node_id"},
      {"node_id: \"\"\n", "node_id"},
      {"testing: {deletion_day_seconds: 0}\n", "testing"},
  };
  for (const Case& c : cases) {
    EXPECT_THAT(
        ParseConfig(std::string(kMinimal) + c.extra, kBase, kTestBuild),
        StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.field)))
        << c.extra;
  }
}

// kMinimal with `field` ("name" or "section.name") set to `value`.
std::string With(const std::string& field, const std::string& value) {
  const size_t dot = field.find('.');
  if (dot == std::string::npos) {
    return absl::StrCat(kMinimal, field, ": ", value, "\n");
  }
  const std::string section = field.substr(0, dot);
  const std::string name = field.substr(dot + 1);
  if (section == "hsm") {
    return Replace("  pin_file: hsm.pin",
                   absl::StrCat("  pin_file: hsm.pin\n  ", name, ": ", value));
  }
  return absl::StrCat(kMinimal, section, ": {", name, ": ", value, "}\n");
}

constexpr const char* kSecondsFields[] = {
    "audit_checkpoint_interval_seconds",   "audit_max_segment_age_seconds",
    "maintenance_interval_seconds",        "testing.deletion_day_seconds",
    "testing.min_rotation_period_seconds",
};

TEST(ParseConfigTest, DurationsMustBeFiniteAndInRange) {
  // yaml-cpp reads .nan and .inf as doubles; absl::Seconds() would make them
  // (and 1e300) an infinite duration that passes a "positive" check.
  for (const char* field : kSecondsFields) {
    for (const char* value :
         {".nan", ".NaN", ".NAN", ".inf", ".Inf", "+.inf", "-.inf", "1e300",
          "31536000.5", "0", "-0", "0.0009", "1e-300", "-5", "often", "[1]",
          "\"\""}) {
      EXPECT_THAT(ParseConfig(With(field, value), kBase, kTestBuild),
                  StatusIs(absl::StatusCode::kInvalidArgument,
                           HasSubstr(absl::StrCat(
                               field,
                               ": must be a number of seconds from 0.001 to "
                               "31536000 (a year)"))))
          << field << ": " << value;
    }
  }
}

TEST(ParseConfigTest, DurationsAtTheEndsOfTheRangeAreAccepted) {
  for (const char* field : kSecondsFields) {
    for (const char* value : {"0.001", "1", "31536000", "3.1536e7"}) {
      EXPECT_THAT(ParseConfig(With(field, value), kBase, kTestBuild), IsOk())
          << field << ": " << value;
    }
  }
  absl::StatusOr<Config> c =
      ParseConfig(With("maintenance_interval_seconds", "0.001"), kBase);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->maintenance_interval, absl::Milliseconds(1));
  c = ParseConfig(With("audit_max_segment_age_seconds", "31536000"), kBase);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->audit_max_segment_age, absl::Hours(24 * 365));
}

TEST(ParseConfigTest, WholeNumbersMustBeInRange) {
  struct Case {
    const char* field;
    const char* range;  // as the message states it
    std::vector<const char*> refused;
    std::vector<const char*> accepted;
  };
  const Case cases[] = {
      {"audit_checkpoint_every",
       "must be a whole number of at least 1",
       {"0", "-1", ".nan", ".inf", "1.5", "1e3", "18446744073709551616"},
       {"1", "18446744073709551615"}},
      {"audit_max_segment_bytes",
       "must be a whole number of bytes of at least 4096",
       {"4095", "-4096", ".nan", ".inf", "4096.5"},
       {"4096"}},
      {"encryption_limit",
       "must be a whole number of at least 1",
       {"0", "-1", ".nan", "-.inf", "2.5"},
       {"1"}},
      {"hsm.pool_size",
       "must be a whole number from 1 to 64",
       {"0", "65", "-1", ".nan", ".inf", "2.0"},
       {"1", "64"}},
      {"hsm.call_timeout_ms",
       "must be a whole number of milliseconds from 1 to 31536000000",
       {"0", "-1", "31536000001", ".nan", ".inf", "0.5", "9223372036854775808"},
       {"1", "31536000000"}},
      {"hsm.lease_timeout_ms",
       "must be a whole number of milliseconds from 1 to 31536000000",
       {"0", ".nan", "-.inf"},
       {"1", "31536000000"}},
      {"limits.max_message_bytes",
       "must be a whole number of bytes from 5120 to 16777216",
       {"5119", "16777217", ".nan", ".inf"},
       {"5120", "16777216"}},
      {"limits.max_concurrent_streams",
       "must be a whole number of at least 1",
       {"0", "-1", ".nan", ".inf", "2147483648"},
       {"1", "2147483647"}},
  };
  for (const Case& c : cases) {
    for (const char* value : c.refused) {
      EXPECT_THAT(ParseConfig(With(c.field, value), kBase),
                  StatusIs(absl::StatusCode::kInvalidArgument,
                           HasSubstr(absl::StrCat(c.field, ": ", c.range))))
          << c.field << ": " << value;
    }
    for (const char* value : c.accepted) {
      EXPECT_THAT(ParseConfig(With(c.field, value), kBase), IsOk())
          << c.field << ": " << value;
    }
  }
}

TEST(ParseConfigTest, InsecureListenRequiresPrincipal) {
  EXPECT_THAT(
      ParseConfig(std::string(kMinimal) +
                      "development: {insecure_listen: 127.0.0.1:7000}\n",
                  kBase),
      StatusIs(absl::StatusCode::kInvalidArgument,
               HasSubstr("development.insecure_principal")));
}

TEST(ParseConfigTest, MetricsListenIsAnIpv4AddressAndPort) {
  for (const char* good : {"127.0.0.1:9464", "0.0.0.0:1", "10.1.2.3:65535"}) {
    absl::StatusOr<Config> c = ParseConfig(
        absl::StrCat(kMinimal, "metrics_listen: \"", good, "\"\n"), kBase);
    ASSERT_THAT(c, IsOk()) << good;
    EXPECT_EQ(c->metrics_listen, good);
  }
  for (const char* bad :
       {"127.0.0.1", "localhost:9464", "[::1]:9464", "127.0.0.1:0",
        "127.0.0.1:65536", "127.0.0.1:http", "127.0.0.1:", ":0", "99999",
        "127.0.0.1:94640", "127.0.0.1:+9464", "1.2.3:9464"}) {
    EXPECT_THAT(
        ParseConfig(absl::StrCat(kMinimal, "metrics_listen: \"", bad, "\"\n"),
                    kBase),
        StatusIs(
            absl::StatusCode::kInvalidArgument,
            AllOf(HasSubstr("metrics_listen"), HasSubstr("127.0.0.1:9464"))))
        << bad;
  }
}

TEST(ParseConfigTest, RelativePathsResolvedAgainstBaseDir) {
  absl::StatusOr<Config> c = ParseConfig(kMinimal, kBase);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->tls.cert, "/etc/custos/tls/server.pem");
  EXPECT_EQ(c->tls.key, "/etc/custos/tls/server.key");
  EXPECT_EQ(c->tls.client_ca, "/etc/custos/tls/clients-ca.pem");
  EXPECT_EQ(c->hsm.pin_file, "/etc/custos/hsm.pin");
  EXPECT_EQ(c->audit_dir, "/etc/custos/audit");
  // Absolute paths and URLs are left alone.
  EXPECT_EQ(c->hsm.module, "/usr/lib/softhsm/libsofthsm2.so");
  EXPECT_EQ(c->storage, "sqlite:///var/lib/custos/custos.db");
}

TEST(ParseConfigTest, AbsolutePathsAndEmptyBaseDirLeftAlone) {
  absl::StatusOr<Config> c = ParseConfig(
      Replace("  cert: tls/server.pem", "  cert: /srv/server.pem"), kBase);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->tls.cert, "/srv/server.pem");
  EXPECT_EQ(c->tls.key, "/etc/custos/tls/server.key");

  c = ParseConfig(kMinimal, "");
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->tls.cert, "tls/server.pem");
  EXPECT_EQ(c->hsm.pin_file, "hsm.pin");
}

TEST(ParseConfigTest, InvalidYamlReportsALine) {
  const std::string yaml = "listen: a\ntls:\n  cert: [unclosed\n  key: b\n";
  EXPECT_THAT(ParseConfig(yaml, kBase),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("YAML"), HasSubstr("line"))));
  EXPECT_THAT(ParseConfig("a: b\n  c: : d\n\t- x\n", kBase),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("line")));
}

TEST(ParseConfigTest, EmptyDocumentRefused) {
  EXPECT_THAT(ParseConfig("", kBase),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("empty")));
  EXPECT_THAT(ParseConfig("# only a comment\n", kBase),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("empty")));
}

TEST(LoadConfigTest, MissingFileIsNotFound) {
  EXPECT_THAT(LoadConfig("/nonexistent/custos.yaml"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("custos.yaml")));
}

}  // namespace
}  // namespace custos::server

namespace custos::server {
namespace {

TEST(ConfigDuplicatesTest, AKeyGivenTwiceIsRefusedByName) {
  const std::string yaml = R"(listen: "127.0.0.1:1"
tls: {cert: c, key: k, client_ca: a}
hsm: {module: m, token_label: t, pin_file: p}
storage: sqlite:///x.db
audit_dir: /a
audit_dir: /b
admins: [x]
)";
  absl::StatusOr<Config> c = ParseConfig(yaml, "");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("audit_dir: given twice"),
            std::string::npos)
      << c.status();
}

// Certificate rotation and revocation (tls.crl_dir,
// tls.reload_interval_seconds) and the maximum connection age.
TEST(ConfigTlsReloadTest, DefaultsReloadEveryFiveSecondsAndAgeFiveMinutes) {
  absl::StatusOr<Config> c = ParseConfig(kMinimal, kBase);
  ASSERT_THAT(c, IsOk());
  EXPECT_THAT(c->tls.crl_dir, IsEmpty());  // no revocation checks
  EXPECT_EQ(c->tls.reload_interval_seconds, 5);
  EXPECT_EQ(c->limits.max_connection_age, absl::Minutes(5));
  EXPECT_EQ(c->limits.max_connection_age_grace, absl::Seconds(30));
}

TEST(ConfigTlsReloadTest, ReadsTheFieldsAndResolvesTheCrlDirectory) {
  const std::string yaml =
      Replace("  client_ca: tls/clients-ca.pem\n",
              "  client_ca: tls/clients-ca.pem\n  crl_dir: tls/crl\n"
              "  reload_interval_seconds: 2\n") +
      "limits: {max_connection_age_seconds: 1.5, "
      "max_connection_age_grace_seconds: 0.5}\n";
  absl::StatusOr<Config> c = ParseConfig(yaml, kBase);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->tls.crl_dir, "/etc/custos/tls/crl");
  EXPECT_EQ(c->tls.reload_interval_seconds, 2);
  EXPECT_EQ(c->limits.max_connection_age, absl::Milliseconds(1500));
  EXPECT_EQ(c->limits.max_connection_age_grace, absl::Milliseconds(500));
}

TEST(ConfigTlsReloadTest, OutOfRangeValuesAreRefusedByName) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {Replace("  key: tls/server.key\n",
               "  key: tls/server.key\n  reload_interval_seconds: 0\n"),
       "tls.reload_interval_seconds"},
      {Replace("  key: tls/server.key\n",
               "  key: tls/server.key\n  reload_interval_seconds: 0.5\n"),
       "tls.reload_interval_seconds"},
      {Replace("  key: tls/server.key\n",
               "  key: tls/server.key\n  crl_dirs: x\n"),
       "tls.crl_dirs"},
      {std::string(kMinimal) + "limits: {max_connection_age_seconds: 0}\n",
       "limits.max_connection_age_seconds"},
      {std::string(kMinimal) + "limits: {max_connection_age_seconds: 86401}\n",
       "limits.max_connection_age_seconds"},
      {std::string(kMinimal) +
           "limits: {max_connection_age_grace_seconds: .inf}\n",
       "limits.max_connection_age_grace_seconds"},
  };
  for (const auto& [yaml, field] : cases) {
    EXPECT_THAT(ParseConfig(yaml, kBase),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         HasSubstr("config: " + field)))
        << yaml;
  }
}

}  // namespace
}  // namespace custos::server

namespace custos::server {
namespace {

using ::custos::testing::IsOk;
using ::custos::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

// The shipped custosd parses with the default options: a config that
// shortens deletion windows is refused, naming the section and the build
// that accepts it.
TEST(ConfigHardeningTest, TestingSectionRefusedOutsideTheTestBuild) {
  const std::string yaml =
      std::string(kMinimal) + "testing: {deletion_day_seconds: 1}\n";
  EXPECT_THAT(ParseConfig(yaml, kBase),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("testing"), HasSubstr("custosd-test"))));
  absl::StatusOr<Config> c = ParseConfig(yaml, kBase, kTestBuild);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->testing.deletion_day, absl::Seconds(1));
}

TEST(ConfigHardeningTest, RoleEntriesMustBeTypedAndNotReserved) {
  for (const char* good :
       {"spiffe://example.org/admin", "spiffe://example.org/ops/*",
        "dns:ops.example.org", "cn:billing-batch", "urn:example:admin", "*"}) {
    EXPECT_THAT(ParseConfig(Replace("  - spiffe://example.org/admin",
                                    absl::StrCat("  - \"", good, "\"")),
                            kBase),
                IsOk())
        << good;
  }
  struct Case {
    const char* entry;
    const char* says;
  };
  const Case bad[] = {
      {"billing-batch", "cn:NAME"},  // untyped: was a CN or DNS name
      {"ops.example.org", "dns:HOST"},
      {"custos:system", "reserved"},
      {"CUSTOS:system", "reserved"},
      {"cert-sha256:00ff", "never matches"},
      {"DNS:ops.example.org", "lower case"},
      {"cn:two words", "space"},
  };
  for (const Case& c : bad) {
    EXPECT_THAT(ParseConfig(Replace("  - spiffe://example.org/admin",
                                    absl::StrCat("  - \"", c.entry, "\"")),
                            kBase),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         AllOf(HasSubstr("admins[0]"), HasSubstr(c.says))))
        << c.entry;
    EXPECT_THAT(
        ParseConfig(absl::StrCat(kMinimal, "auditors: [\"", c.entry, "\"]\n"),
                    kBase),
        StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("auditors[0]")))
        << c.entry;
  }
}

std::string WithDevelopment(const std::string& listen,
                            const std::string& principal) {
  return absl::StrCat(kMinimal, "development: {insecure_listen: \"", listen,
                      "\", insecure_principal: \"", principal, "\"}\n");
}

TEST(ConfigHardeningTest, InsecureListenOnlyOnLoopback) {
  for (const char* good :
       {"127.0.0.1:7000", "127.1.2.3:7000", "localhost:7000", "[::1]:7000"}) {
    EXPECT_THAT(ParseConfig(WithDevelopment(good, "cn:dev"), kBase), IsOk())
        << good;
  }
  for (const char* bad :
       {"0.0.0.0:7000", "10.0.0.1:7000", "[::]:7000", "example.org:7000",
        "127.0.0.1", ":7000", "128.0.0.1:7000"}) {
    EXPECT_THAT(ParseConfig(WithDevelopment(bad, "cn:dev"), kBase),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         AllOf(HasSubstr("development.insecure_listen"),
                               HasSubstr("loopback"))))
        << bad;
  }
}

TEST(ConfigHardeningTest, InsecurePrincipalIsNeverAnAdmin) {
  // kMinimal's admin, an admin pattern, and a reserved name.
  EXPECT_THAT(ParseConfig(WithDevelopment("127.0.0.1:7000",
                                          "spiffe://example.org/admin"),
                          kBase),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("development.insecure_principal"),
                             HasSubstr("admin"))));
  const std::string pattern_admin =
      absl::StrReplaceAll(WithDevelopment("127.0.0.1:7000", "cn:dev"),
                          {{"  - spiffe://example.org/admin", "  - \"cn:*\""}});
  EXPECT_THAT(ParseConfig(pattern_admin, kBase),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("must not be an admin")));
  EXPECT_THAT(
      ParseConfig(WithDevelopment("127.0.0.1:7000", "custos:system"), kBase),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("reserved")));
  EXPECT_THAT(
      ParseConfig(WithDevelopment("127.0.0.1:7000", "dev"), kBase),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("has no type")));
  EXPECT_THAT(
      ParseConfig(WithDevelopment("127.0.0.1:7000", "cn:*"), kBase),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not a pattern")));
}

TEST(ConfigHardeningTest, MetricsPortAloneMeansLoopback) {
  for (const char* port : {"9464", ":9464"}) {
    absl::StatusOr<Config> c = ParseConfig(
        absl::StrCat(kMinimal, "metrics_listen: \"", port, "\"\n"), kBase);
    ASSERT_THAT(c, IsOk()) << port;
    EXPECT_EQ(c->metrics_listen, "127.0.0.1:9464") << port;
  }
  // Unquoted YAML reads a bare port as a number: the same.
  absl::StatusOr<Config> c =
      ParseConfig(absl::StrCat(kMinimal, "metrics_listen: 9464\n"), kBase);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->metrics_listen, "127.0.0.1:9464");
}

TEST(ConfigHardeningTest, RateLimitSettings) {
  absl::StatusOr<Config> c = ParseConfig(kMinimal, kBase);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->limits.requests_per_second_per_principal, 0);  // off
  c = ParseConfig(absl::StrCat(kMinimal,
                               "limits: {requests_per_second_per_principal: "
                               "2.5, burst_per_principal: 10}\n"),
                  kBase);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->limits.requests_per_second_per_principal, 2.5);
  EXPECT_EQ(c->limits.burst_per_principal, 10);
  for (const char* bad : {"-1", ".nan", ".inf", "1e9", "fast"}) {
    EXPECT_THAT(
        ParseConfig(absl::StrCat(kMinimal,
                                 "limits: {requests_per_second_per_principal: ",
                                 bad, "}\n"),
                    kBase),
        StatusIs(absl::StatusCode::kInvalidArgument,
                 HasSubstr("limits.requests_per_second_per_principal")))
        << bad;
  }
}

}  // namespace
}  // namespace custos::server

namespace custos::kms {
namespace {

// A PostgreSQL password never reaches a log line or an error, wherever the
// URL carries it.
TEST(RedactStorageUrlTest, HidesEveryPassword) {
  struct Case {
    const char* url;
    const char* secret;
    const char* kept;  // must survive, so the line still helps
  };
  const Case cases[] = {
      {"postgresql://custos:s3cret@db:5432/custos", "s3cret", "@db:5432"},
      {"postgresql://custos:p@ss/w0rd?x@db/custos", "w0rd", "@db/custos"},
      {"postgresql://custos@db/custos?password=s3cret&sslmode=require",
       "s3cret", "sslmode=require"},
      {"postgres://db/custos?sslmode=require&PASSWORD=s3cret", "s3cret",
       "sslmode=require"},
      {"postgresql://db/custos?sslpassword=keypass", "keypass", "db/custos"},
      {"host=db user=custos password=s3cret dbname=custos", "s3cret",
       "dbname=custos"},
      {"host=db password = 'two words\\' quoted' dbname=x", "words",
       "dbname=x"},
  };
  for (const Case& c : cases) {
    const std::string redacted = RedactStorageUrl(c.url);
    EXPECT_THAT(redacted, ::testing::Not(::testing::HasSubstr(c.secret)))
        << c.url;
    EXPECT_THAT(redacted, ::testing::HasSubstr(c.kept)) << c.url;
    EXPECT_THAT(redacted, ::testing::HasSubstr("***")) << c.url;
  }
  EXPECT_EQ(RedactStorageUrl("sqlite:///var/lib/custos/custos.db"),
            "sqlite:///var/lib/custos/custos.db");
  EXPECT_EQ(RedactStorageUrl("postgresql://custos@db:5432/custos"),
            "postgresql://custos@db:5432/custos");
}

}  // namespace
}  // namespace custos::kms
