#include "format/shard_index.h"

#include <map>

#include <trinity_stream_saver/errors.h>

#include "format/header.h"

namespace trinity_stream_saver {

namespace {

// json.dumps(..., indent=2) of a flat object whose values are already JSON
// text, nested at `depth`. std::map orders keys by their UTF-8 bytes, which
// is the code point order sort_keys=True uses.
void append_object(std::string& out, const std::map<std::string, std::string>& members,
                   int depth) {
  if (members.empty()) {
    out += "{}";
    return;
  }
  const std::string inner(2 * (depth + 1), ' ');
  out += "{\n";
  bool first = true;
  for (const auto& [key, value] : members) {
    if (!first) out += ",\n";
    first = false;
    out += inner;
    out += json_string(key);
    out += ": ";
    out += value;
  }
  out += '\n';
  out += std::string(2 * depth, ' ');
  out += '}';
}

}  // namespace

Metadata shard_file_metadata(const ShardPlan& plan, const std::optional<Metadata>& user) {
  Metadata metadata{{"format", "pt"}};
  if (plan.is_sharded() || !user) return metadata;
  for (const auto& [key, value] : *user) {
    bool replaced = false;
    for (auto& entry : metadata) {
      if (entry.first == key) {
        entry.second = value;
        replaced = true;
      }
    }
    if (!replaced) metadata.emplace_back(key, value);
  }
  return metadata;
}

void check_index_metadata(const std::optional<Metadata>& user) {
  if (!user) return;
  for (const auto& entry : *user) {
    const std::string& key = entry.first;
    if (key == "total_size" || key == "total_parameters") {
      throw ValueError("metadata key '" + key + "' is reserved: the index stores the "
                       "checkpoint's own " + key + " under it. Rename the key.");
    }
  }
}

std::string shard_index_json(const ShardPlan& plan, std::uint64_t total_parameters,
                             const std::optional<Metadata>& user) {
  check_index_metadata(user);
  std::map<std::string, std::string> metadata;
  if (user) {
    for (const auto& [key, value] : *user) metadata[key] = json_string(value);
  }
  metadata["total_parameters"] = std::to_string(total_parameters);
  metadata["total_size"] = std::to_string(plan.total_size);
  std::map<std::string, std::string> weight_map;
  for (const ShardFile& file : plan.files) {
    const std::string filename = json_string(file.filename);
    for (const TensorMeta& row : file.tensors) weight_map.emplace(row.name, filename);
  }
  std::string out = "{\n  \"metadata\": ";
  append_object(out, metadata, 1);
  out += ",\n  \"weight_map\": ";
  append_object(out, weight_map, 1);
  out += "\n}\n";
  return out;
}

}  // namespace trinity_stream_saver
