// Keys for the store tests (store_contract_test.cc, sqlite_store_test.cc):
// a sample key with every field set to something other than its default,
// and a field-by-field comparison that names the field that differs.
// Header-only; each test file gets its own copy.
#ifndef CUSTOS_TESTS_INTEGRATION_STORE_SAMPLES_H_
#define CUSTOS_TESTS_INTEGRATION_STORE_SAMPLES_H_

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "kms/key.h"
#include "kms/policy.h"

namespace custos::kms::store_samples {

// A fixed instant with a non-zero microsecond part.
inline const absl::Time kT0 = absl::FromUnixMicros(1700000000123456);
// The schema version both stores migrate to.
inline constexpr int kLatestSchemaVersion = 4;

inline KeyPolicy SamplePolicy() {
  KeyPolicy policy;
  policy.version = 7;
  PolicyBinding use;
  use.principals = {"spiffe://example.org/billing", "spiffe://example.org/*"};
  use.operations = {KeyOperation::kEncrypt, KeyOperation::kDecrypt};
  use.required_context = {{"tenant", "acme-*"}, {"env", "prod"}};
  use.require_justification = true;
  use.allowed_reasons = {JustificationReason::kCustomerInitiatedAccess};
  PolicyBinding gen;
  gen.principals = {"spiffe://example.org/batch"};
  gen.operations = {KeyOperation::kGenerateDataKey};
  policy.bindings = {use, gen};
  return policy;
}

// A key with every field set to something other than its default: two
// versions whose HSM ids start with `hsm_prefix` (ids are unique across
// keys) and two aliases, "alias/a-billing" and "alias/b/billing".
inline Key SampleKey(const std::string& id, const std::string& hsm_prefix) {
  Key key;
  key.id = id;
  key.description = "billing records; 'quoted' \"and\" unicode \xc3\xa9";
  key.labels = {{"team", "billing"}, {"cost-center", "42"}, {"empty", ""}};
  key.purpose = KeyPurpose::kEncryptDecrypt;
  key.state = KeyState::kDisabled;
  key.rotation_period = absl::Hours(24 * 90);
  key.next_rotation_time = kT0 + absl::Hours(24 * 90) + absl::Microseconds(1);
  key.primary_version = 2;
  key.create_time = kT0;
  key.update_time = kT0 + absl::Microseconds(999999);
  key.deletion_time = absl::InfinitePast();
  key.policy = SamplePolicy();
  KeyVersion v1;
  v1.number = 1;
  v1.state = VersionState::kDisabled;
  v1.hsm_id = hsm_prefix + std::string("\x00\x01\x00\xff", 4);
  v1.create_time = kT0 + absl::Microseconds(1);
  v1.encryptions_reserved = (uint64_t{1} << 40) + 3;
  KeyVersion v2;
  v2.number = 2;
  v2.state = VersionState::kEnabled;
  v2.hsm_id = hsm_prefix + std::string("\x00\x00\x02", 3);
  v2.create_time = kT0 + absl::Seconds(5) + absl::Microseconds(7);
  v2.encryptions_reserved = 0;
  key.versions = {v1, v2};
  key.aliases = {"alias/a-billing", "alias/b/billing"};  // sorted
  return key;
}

inline void ExpectSameKey(const Key& got, const Key& want) {
  EXPECT_EQ(got.id, want.id);
  EXPECT_EQ(got.description, want.description);
  EXPECT_EQ(got.labels, want.labels);
  EXPECT_EQ(got.purpose, want.purpose);
  EXPECT_EQ(got.state, want.state);
  EXPECT_EQ(got.rotation_period, want.rotation_period);
  EXPECT_EQ(got.next_rotation_time, want.next_rotation_time);
  EXPECT_EQ(got.primary_version, want.primary_version);
  EXPECT_EQ(got.create_time, want.create_time);
  EXPECT_EQ(got.update_time, want.update_time);
  EXPECT_EQ(got.deletion_time, want.deletion_time);
  EXPECT_EQ(got.deletion_window, want.deletion_window);
  EXPECT_EQ(got.deletion_elapsed, want.deletion_elapsed);
  EXPECT_EQ(got.destruction_started, want.destruction_started);
  EXPECT_TRUE(got.policy == want.policy)
      << "got " << PolicyToJson(got.policy) << "\nwant "
      << PolicyToJson(want.policy);
  ASSERT_EQ(got.versions.size(), want.versions.size());
  for (size_t i = 0; i < want.versions.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("version index ", i));
    EXPECT_EQ(got.versions[i].number, want.versions[i].number);
    EXPECT_EQ(got.versions[i].state, want.versions[i].state);
    EXPECT_EQ(got.versions[i].hsm_id, want.versions[i].hsm_id);
    EXPECT_EQ(got.versions[i].create_time, want.versions[i].create_time);
    EXPECT_EQ(got.versions[i].encryptions_reserved,
              want.versions[i].encryptions_reserved);
  }
  EXPECT_EQ(got.aliases, want.aliases);
}

}  // namespace custos::kms::store_samples

#endif  // CUSTOS_TESTS_INTEGRATION_STORE_SAMPLES_H_
