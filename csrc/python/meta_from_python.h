// Translates the Python state_dict_meta (TensorMeta or (name, dtype, shape)
// tuples) into TensorMeta rows. Done in C++ because checkpoints have tens of
// thousands of entries and a Python loop over them cost more than writing
// the tensors; the rules stay those of the Python API.
#pragma once

#include <pybind11/pybind11.h>

#include <vector>

#include <trinity_stream_saver/tensor_meta.h>

namespace trinity_stream_saver {

// `resolve_dtype(name, dtype) -> str` turns any dtype spelling other than a
// safetensors dtype name (a torch.dtype, "bfloat16", "torch.bfloat16") into
// one, raising TypeError/ValueError itself for what it cannot resolve.
// Throws TypeError/ValueError naming the entry for malformed rows.
std::vector<TensorMeta> meta_from_python(pybind11::handle state_dict_meta,
                                         pybind11::handle resolve_dtype);

}  // namespace trinity_stream_saver
