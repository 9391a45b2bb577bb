// The safetensors header: a compact JSON object, one entry per tensor,
// padded with spaces to a multiple of 8 and preceded by its length as a
// little-endian u64. Pure string building; no I/O, no torch, no Python.
//
// Strings are escaped as Python's json.dumps(..., separators=(",", ":"))
// escapes them with its default ensure_ascii=True, so that our header is
// byte-for-byte the one the pure-Python saver writes.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <trinity_stream_saver/tensor_meta.h>

#include "format/dtype.h"

namespace trinity_stream_saver {

// safetensors refuses to read a header longer than this.
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

// The key safetensors reserves for the free-form string metadata.
inline constexpr std::string_view kMetadataKey = "__metadata__";

// `text` as a JSON string literal, escaped as json.dumps escapes it.
std::string json_string(std::string_view text);

// `"name":{"dtype":"BF16","shape":[4,8],"data_offsets":[begin,end]}`
std::string tensor_entry(std::string_view name, const Dtype& dtype,
                         std::span<const std::int64_t> shape,
                         std::uint64_t begin, std::uint64_t end);

// `"__metadata__":{"key":"value",...}`
std::string metadata_entry(const Metadata& metadata);

// The JSON object, built entry by entry. Its size is known at every step,
// which is what lets the writer reject a tensor that would not fit the
// space reserved for the header before writing any of its bytes.
class HeaderJson final {
 public:
  // Size of the JSON text if `entry` were appended next.
  std::uint64_t size_with(const std::string& entry) const;
  std::uint64_t size() const noexcept { return size_; }
  void append(std::string entry);
  std::string str() const;

 private:
  std::vector<std::string> entries_;
  std::uint64_t size_ = 2;  // "{}"
};

// The header length N a JSON text of `json_size` bytes is padded to.
std::uint64_t padded_header_size(std::uint64_t json_size);

// The first 8 + N bytes of the file: N as little-endian u64, then `json`
// padded with spaces to N. Requires json.size() <= padded_size.
std::string encode_header(const std::string& json, std::uint64_t padded_size);

}  // namespace trinity_stream_saver
