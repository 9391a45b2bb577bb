// The safetensors dtypes this library writes: their names in the header and
// their width. Pure data; nothing here knows about torch, files or Python.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace trinity_stream_saver {

struct Dtype {
  std::string_view name;  // as written in the header, e.g. "BF16"
  int bits;               // width of one element as the header counts it
};

// Every dtype that safetensors' own torch saver writes, in a fixed order.
std::span<const Dtype> supported_dtypes();

// The dtype named `name` in a header, or nothing if safetensors has no
// such dtype (or we do not write it).
std::optional<Dtype> find_dtype(std::string_view name);

// "BOOL, U8, ..." for error messages that must tell the user what would work.
std::string supported_dtype_names();

// Bytes taken by `element_count` elements, or nothing if that count does
// not fill whole bytes (safetensors refuses a slice that ends mid-byte) or
// the size does not fit in 64 bits.
std::optional<std::uint64_t> byte_size(const Dtype& dtype,
                                       std::uint64_t element_count);

}  // namespace trinity_stream_saver
