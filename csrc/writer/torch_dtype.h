// Which torch dtype is written as which safetensors dtype: the bridge
// between torch's ScalarType and the format's dtype table. Knows torch's
// ScalarType, nothing of files or Python.
#pragma once

#include <c10/core/ScalarType.h>

#include <optional>

#include "format/dtype.h"

namespace trinity_stream_saver {

// The safetensors dtype a torch dtype is saved as, or nothing if
// safetensors cannot store it.
std::optional<Dtype> safetensors_dtype(c10::ScalarType scalar_type);

}  // namespace trinity_stream_saver
