// Translates the Python state_dict_meta (TensorMeta or (name, dtype, shape)
// tuples) into TensorMeta rows. Done in C++ because checkpoints have tens of
// thousands of entries and a Python loop over them cost more than writing
// the tensors; the rules stay those of the Python API.
#pragma once

#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <vector>

#include <trinity_stream_saver/tensor_meta.h>

namespace trinity_stream_saver {

// `resolve_dtype(name, dtype) -> str` turns any dtype spelling other than a
// safetensors dtype name (a torch.dtype, "bfloat16", "torch.bfloat16") into
// one, raising TypeError/ValueError itself for what it cannot resolve.
// Throws TypeError/ValueError naming the entry for malformed rows.
std::vector<TensorMeta> meta_from_python(pybind11::handle state_dict_meta,
                                         pybind11::handle resolve_dtype);

// The `metadata` argument, a list of (key, value) pairs of str, as UTF-8.
// Throws ValueError naming the key for a string that is not valid Unicode
// (a lone surrogate, as os.fsdecode makes from undecodable bytes).
std::optional<Metadata> metadata_from_python(pybind11::handle metadata);

// repr(object), cut short for error messages (a name can be megabytes).
std::string short_repr(pybind11::handle object);

// The name of object's type, for error messages.
std::string type_name(pybind11::handle object);

}  // namespace trinity_stream_saver
