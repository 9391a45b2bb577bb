// The layout of one safetensors file, computed from its metadata alone
// (as safetensors' `prepare` does): the reserved header length N and the
// size of the data after it. Pure logic: no torch, no I/O.
//
// Why the header is sized before the data: the file is written in one pass
// without holding more than one tensor, and the data offsets depend on
// where the data starts. Reserving exactly the header that the metadata
// describes (rounded up to 8, as safetensors pads) makes our file
// byte-identical to the pure-Python saver's.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include <trinity_stream_saver/tensor_meta.h>

#include "format/dtype.h"
#include "format/header.h"

namespace trinity_stream_saver {

struct FileLayout {
  std::uint64_t header_size;  // N: the JSON header length reserved in the file
  std::uint64_t data_size;    // bytes of tensor data after the header
  std::uint64_t largest_tensor;  // bytes of the largest row (0 without rows)
};

// The dtype and byte size of one row, checked. Throws ValueError naming the
// row for an unknown dtype, a negative dimension, a shape the format cannot
// describe or a size of 2^64 bytes or more.
struct CheckedMeta {
  Dtype dtype;
  std::vector<std::int64_t> header_shape;
  std::uint64_t bytes;
};
CheckedMeta check_meta(const TensorMeta& meta);

// The layout of a file holding `meta`'s tensors in order, with `metadata`
// as "__metadata__" (none without it). Throws ValueError for bad rows,
// duplicate or reserved names, and a header safetensors could not read.
// With `entries`, also gives the header entry of each row, in order (for a
// writer that sends the header before the data).
FileLayout plan_file(const std::vector<TensorMeta>& meta, const std::optional<Metadata>& metadata,
                     std::vector<std::string>* entries = nullptr);

// Throws ValueError if `name` is reserved or already in `seen`; `where`
// starts the message ("tensor 'x'", "state_dict_meta").
void check_tensor_name(const std::string& name, const std::unordered_set<std::string>& seen,
                       const std::string& where);

// "<where> has dtype <dtype>, which safetensors cannot store. ..."
std::string unsupported_dtype_message(const std::string& where, const std::string& dtype);

// 'name' in quotes, cut short if very long, for error messages.
std::string quoted_name(const std::string& name);

}  // namespace trinity_stream_saver
