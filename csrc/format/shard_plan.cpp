#include "format/shard_plan.h"

#include <cstdio>
#include <unordered_set>

#include <trinity_stream_saver/errors.h>

#include "format/file_plan.h"

namespace trinity_stream_saver {

namespace {

constexpr std::string_view kSuffixField = "{suffix}";
constexpr std::string_view kIndexExtension = ".index.json";

std::string with_suffix(const std::string& pattern, const std::string& suffix) {
  std::string name = pattern;
  name.replace(name.find(kSuffixField), kSuffixField.size(), suffix);
  return name;
}

bool is_shard_suffix(std::string_view text) {
  // "-NNNNN-of-NNNNN"
  if (text.size() != 15 || text[0] != '-' || text.substr(6, 4) != "-of-") return false;
  for (const std::size_t i : {1, 2, 3, 4, 5, 10, 11, 12, 13, 14}) {
    if (text[i] < '0' || text[i] > '9') return false;
  }
  return true;
}

std::uint64_t numel(const TensorMeta& row) {
  std::uint64_t count = 1;
  // check_meta() has bounded the byte size, and no dtype stores fewer than
  // one byte per torch element, so this cannot overflow.
  for (const std::int64_t dim : row.shape) count *= static_cast<std::uint64_t>(dim);
  return count;
}

void add_checked(std::uint64_t* total, std::uint64_t value, const char* what) {
  if (__builtin_add_overflow(*total, value, total)) {
    throw ValueError(std::string("state_dict_meta describes tensors whose ") + what +
                     " reaches 2^64; check the shapes.");
  }
}

}  // namespace

void check_filename_pattern(const std::string& pattern) {
  const std::size_t field = pattern.find(kSuffixField);
  const std::string where = "filename_pattern '" + pattern + "'";
  if (field == std::string::npos) {
    throw ValueError(where + " has no '{suffix}'; shard names are made by replacing it "
                     "(e.g. 'model{suffix}.safetensors').");
  }
  std::string rest = pattern;
  rest.erase(field, kSuffixField.size());
  if (rest.find_first_of("{}") != std::string::npos) {
    throw ValueError(where + " must contain '{suffix}' once and no other brace.");
  }
  if (pattern.find('/') != std::string::npos || pattern.find('\0') != std::string::npos) {
    throw ValueError(where + " must be a file name, without '/'; pass the folder as "
                     "save_directory.");
  }
  const std::string single = with_suffix(pattern, "");
  if (single.empty()) {
    throw ValueError(where + " gives an empty file name for a single-file checkpoint.");
  }
  if (single == "." || single == "..") {
    throw ValueError(where + " gives the file name '" + single +
                     "' for a single-file checkpoint, which names a folder; use a name such "
                     "as 'model{suffix}.safetensors'.");
  }
  // A single file named like an index would be written over the folder's
  // JSON index (model{suffix}.safetensors.index.json gives
  // model.safetensors.index.json), one named like a temporary file over
  // another save's; shard names end as the pattern does.
  for (const std::string_view reserved : {kIndexExtension, std::string_view(".tmp")}) {
    if (single.ends_with(reserved) || pattern.ends_with(reserved)) {
      throw ValueError(where + " gives file names ending in '" + std::string(reserved) +
                       "', which this library keeps for " +
                       (reserved == kIndexExtension ? "indexes" : "temporary files") +
                       "; end it with '.safetensors' (e.g. 'model{suffix}.safetensors').");
    }
  }
}

std::string shard_filename(const std::string& pattern, std::size_t number, std::size_t count) {
  if (count == 1) return with_suffix(pattern, "");
  char suffix[64];
  std::snprintf(suffix, sizeof suffix, "-%05zu-of-%05zu", number, count);
  return with_suffix(pattern, suffix);
}

bool is_checkpoint_filename(const std::string& pattern, const std::string& filename) {
  const std::size_t field = pattern.find(kSuffixField);
  if (field == std::string::npos) return false;
  const std::string_view prefix(pattern.data(), field);
  const std::string_view suffix = std::string_view(pattern).substr(field + kSuffixField.size());
  std::string_view name(filename);
  // Only the index a save writes: the single file's name plus ".index.json"
  // (never "<shard name>.index.json", which no save writes).
  if (name.ends_with(kIndexExtension)) {
    name.remove_suffix(kIndexExtension.size());
    return name == with_suffix(pattern, "");
  }
  if (!name.starts_with(prefix)) return false;
  name.remove_prefix(prefix.size());
  if (!name.ends_with(suffix)) return false;
  name.remove_suffix(suffix.size());
  return name.empty() || is_shard_suffix(name);
}

std::string ShardPlan::index_filename() const {
  return shard_filename(filename_pattern, 1, 1) + std::string(kIndexExtension);
}

ShardPlan plan_shards(const std::vector<TensorMeta>& meta, std::uint64_t max_shard_size,
                      const std::string& filename_pattern) {
  check_filename_pattern(filename_pattern);
  ShardPlan plan;
  plan.filename_pattern = filename_pattern;
  // The hub's loop: oversized tensors are appended as shards of their own
  // as they come, the shard being filled only when it is full or at the end.
  std::vector<ShardFile> shards;
  ShardFile current;
  std::unordered_set<std::string> names;
  for (const TensorMeta& row : meta) {
    check_tensor_name(row.name, names, "state_dict_meta");
    names.insert(row.name);
    const std::uint64_t size = check_meta(row).bytes;
    add_checked(&plan.total_size, size, "total size");
    add_checked(&plan.total_parameters, numel(row), "parameter count");
    if (size > max_shard_size) {
      shards.push_back(ShardFile{"", {row}, size});
      continue;
    }
    // current.bytes <= max_shard_size here, so the sum cannot overflow
    // unless max_shard_size is near 2^64; compare without adding.
    if (size > max_shard_size - current.bytes) {
      shards.push_back(std::move(current));
      current = ShardFile{};
    }
    current.tensors.push_back(row);
    current.bytes += size;
  }
  if (!current.tensors.empty() || shards.empty()) shards.push_back(std::move(current));
  for (std::size_t i = 0; i < shards.size(); ++i) {
    shards[i].filename = shard_filename(filename_pattern, i + 1, shards.size());
  }
  plan.files = std::move(shards);
  return plan;
}

std::vector<std::size_t> file_indices(const ShardPlan& plan,
                                      const std::vector<std::string>& filenames) {
  std::vector<std::size_t> files;
  files.reserve(filenames.size());
  for (const std::string& name : filenames) {
    std::size_t i = 0;
    while (i < plan.files.size() && plan.files[i].filename != name) ++i;
    if (i == plan.files.size()) {
      throw ValueError(quoted_name(name) + " is not a file of the shard plan.");
    }
    files.push_back(i);
  }
  return files;
}

}  // namespace trinity_stream_saver
