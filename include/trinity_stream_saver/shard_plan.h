// Which tensors go into which file of a sharded checkpoint, computed from
// state_dict_meta alone, exactly as huggingface_hub's
// split_torch_state_dict_into_shards computes it for the same names, sizes
// and order. Plain data and pure logic: no torch, no files.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <trinity_stream_saver/tensor_meta.h>

namespace trinity_stream_saver {

// One file of the plan: its name and its tensors' rows, in yield order.
struct ShardFile {
  std::string filename;
  std::vector<TensorMeta> tensors;
  std::uint64_t bytes = 0;  // the tensors' data, without the header
};

struct ShardPlan {
  std::string filename_pattern;  // as given, with one "{suffix}"
  std::vector<ShardFile> files;  // in file-number order
  std::uint64_t total_size = 0;  // bytes of all tensors' data (the index's "total_size")
  // Sum of the tensors' torch numel (a float4_e2m1fn_x2 element counts
  // once, as transformers' num_parameters() counts it).
  std::uint64_t total_parameters = 0;

  // More than one file: the checkpoint needs an index.
  bool is_sharded() const noexcept { return files.size() > 1; }
  // "model.safetensors.index.json" for the default pattern.
  std::string index_filename() const;
};

// The default largest shard, as huggingface_hub's: 5 GB = 5 * 10^9 bytes.
inline constexpr std::uint64_t kDefaultMaxShardSize = 5'000'000'000;
inline constexpr const char* kDefaultFilenamePattern = "model{suffix}.safetensors";

// Tensors fill shards greedily in order; a tensor that would take the
// current shard over `max_shard_size` starts a new one, and a tensor larger
// than `max_shard_size` gets a shard of its own (placed before the shard
// being filled, as the hub places it). Files are named
// filename_pattern with "{suffix}" replaced by "-00001-of-00005"; a plan of
// one file uses "" (model.safetensors). Unlike the hub, which plans no file
// for an empty state dict, an empty `meta` plans one empty file, so that a
// save always leaves a loadable checkpoint.
//
// Throws ValueError naming the row for a bad row or a duplicate name, and
// for a pattern without exactly one "{suffix}", with other braces, with a
// '/' (a file name, not a path), or giving names that a folder's index or
// temporary files use ("....index.json", "....tmp") or "." / "..".
ShardPlan plan_shards(const std::vector<TensorMeta>& meta,
                      std::uint64_t max_shard_size = kDefaultMaxShardSize,
                      const std::string& filename_pattern = kDefaultFilenamePattern);

}  // namespace trinity_stream_saver
