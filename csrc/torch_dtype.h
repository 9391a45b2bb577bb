// Which torch dtype is written as which safetensors dtype, and the header
// shape of a tensor: the bridge between torch's view of a tensor and the
// format's. Knows torch's ScalarType, nothing of files or Python.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "dtype.h"

namespace trinity_stream_saver {

struct TorchDtype {
  c10::ScalarType scalar_type;
  Dtype dtype;
  // Header elements per torch element: float4_e2m1fn_x2 packs two F4 values
  // in each byte, and safetensors writes the shape of the unpacked values.
  int elements_per_item;
};

std::optional<TorchDtype> find_torch_dtype(c10::ScalarType scalar_type);
std::optional<TorchDtype> find_torch_dtype(std::string_view safetensors_name);

// The "shape" that safetensors writes for a tensor of `sizes`, or nothing
// if the format cannot describe it (a 0-dim packed tensor has no last
// dimension to unpack).
std::optional<std::vector<std::int64_t>> header_shape(const TorchDtype& dtype,
                                                      c10::IntArrayRef sizes);

}  // namespace trinity_stream_saver
