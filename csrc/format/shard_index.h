// What a sharded checkpoint says about itself, as the Hugging Face tools
// write it: the "__metadata__" of each file and the index
// (model.safetensors.index.json). Pure string building: no torch, no I/O.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <trinity_stream_saver/shard_plan.h>
#include <trinity_stream_saver/tensor_meta.h>

namespace trinity_stream_saver {

// {"format": "pt"}, followed by the user's metadata when the plan is a
// single file (a user "format" replaces ours, as dict.update does).
// huggingface_hub's save_torch_state_dict: a sharded checkpoint keeps the
// user's metadata in the index instead.
Metadata shard_file_metadata(const ShardPlan& plan, const std::optional<Metadata>& user);

// Throws ValueError if the user's metadata names total_size or
// total_parameters, which the index keeps for the checkpoint's own values
// (loaders read them).
void check_index_metadata(const std::optional<Metadata>& user);

// The index exactly as transformers 5 writes it,
// json.dumps(index, indent=2, sort_keys=True) + "\n", of
//   {"metadata": {"total_parameters": ..., "total_size": ..., **user},
//    "weight_map": {tensor name: file name}}. Throws as check_index_metadata.
std::string shard_index_json(const ShardPlan& plan, std::uint64_t total_parameters,
                             const std::optional<Metadata>& user);

}  // namespace trinity_stream_saver
