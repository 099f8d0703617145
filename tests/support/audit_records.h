// Reads a custosd audit directory the way an end-to-end test needs: the
// segment files in order and their records as JSON. Stateless.
#ifndef CUSTOS_TESTS_SUPPORT_AUDIT_RECORDS_H_
#define CUSTOS_TESTS_SUPPORT_AUDIT_RECORDS_H_

#include <string>
#include <vector>

#include "nlohmann/json.hpp"

namespace custos::testing {

// The segment files of `dir`, in name order (= sequence order per node).
std::vector<std::string> SegmentFiles(const std::string& dir);

// Every record in `dir`, in order. A line that does not parse (only
// possible as the torn last line of a running or crashed server) is
// counted in `unparsed`.
std::vector<nlohmann::json> ReadRecords(const std::string& dir,
                                        int* unparsed = nullptr);

// The string field `name` of `record`, or "" if it is absent or not a
// string.
std::string StringField(const nlohmann::json& record, const char* name);

}  // namespace custos::testing

#endif  // CUSTOS_TESTS_SUPPORT_AUDIT_RECORDS_H_
