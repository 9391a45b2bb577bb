// What a save is planned from: one row per tensor, as the Python API's
// state_dict_meta. Plain data; no torch.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace trinity_stream_saver {

// One tensor the stream will yield: its name, its safetensors dtype name
// ("BF16", "F32", ...) and its torch shape (for "F4", torch's packed
// float4_e2m1fn_x2 shape: two values per element of the last dimension).
struct TensorMeta {
  std::string name;
  std::string dtype;
  std::vector<std::int64_t> shape;
};

// Free-form string metadata stored as the header's "__metadata__", in the
// order given.
using Metadata = std::vector<std::pair<std::string, std::string>>;

}  // namespace trinity_stream_saver
