#include "tests/support/audit_records.h"

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "absl/strings/match.h"

namespace custos::testing {

std::vector<std::string> SegmentFiles(const std::string& dir) {
  std::vector<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (absl::StartsWith(name, "audit-") && absl::EndsWith(name, ".jsonl")) {
      files.push_back(e.path().string());
    }
  }
  std::sort(files.begin(), files.end());
  return files;
}

std::vector<nlohmann::json> ReadRecords(const std::string& dir, int* unparsed) {
  std::vector<nlohmann::json> records;
  for (const std::string& file : SegmentFiles(dir)) {
    std::ifstream in(file, std::ios::binary);
    std::string line;
    while (std::getline(in, line)) {
      nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded() || !j.is_object()) {
        if (unparsed != nullptr) ++*unparsed;
        continue;
      }
      records.push_back(std::move(j));
    }
  }
  return records;
}

std::string StringField(const nlohmann::json& record, const char* name) {
  auto it = record.find(name);
  if (it == record.end() || !it->is_string()) return "";
  return it->get<std::string>();
}

}  // namespace custos::testing
