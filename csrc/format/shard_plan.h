// The names of a sharded checkpoint's files, and which files in a folder
// belong to a checkpoint of a given pattern (so that a re-save can remove
// what an older save left). Pure string logic: no torch, no I/O. The plan
// itself (plan_shards) is declared in the public shard_plan.h.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include <trinity_stream_saver/shard_plan.h>

namespace trinity_stream_saver {

// Throws ValueError unless `pattern` holds exactly one "{suffix}", no other
// brace (Python's str.format would read it differently) and no '/', and
// gives file names that are neither "." nor ".." nor end in ".index.json"
// or ".tmp" (an index's or a temporary file's name).
void check_filename_pattern(const std::string& pattern);

// The pattern with "{suffix}" replaced by "-<number>-of-<count>" (both
// zero-padded to 5 digits, as "{:05d}" pads), or by "" when count is 1.
// `number` counts from 1.
std::string shard_filename(const std::string& pattern, std::size_t number, std::size_t count);

// Whether `filename` is a file a save with `pattern` writes: the single
// file, a shard "-NNNNN-of-NNNNN" or the index (the single file's name
// plus ".index.json").
bool is_checkpoint_filename(const std::string& pattern, const std::string& filename);

// The indices in plan.files of the files named `filenames`, in that order.
// Throws ValueError naming a filename that is not a file of the plan.
std::vector<std::size_t> file_indices(const ShardPlan& plan,
                                      const std::vector<std::string>& filenames);

}  // namespace trinity_stream_saver
