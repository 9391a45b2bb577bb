// Whether a file is a complete safetensors file, judged from its first
// bytes and its size: what finalize checks before it puts a file in place
// (a file cut short, or one a save is still writing, must not replace a
// good checkpoint). Pure: the caller reads the bytes (writer/verify_file).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace trinity_stream_saver {

// The header length N stored little-endian in the first 8 bytes of
// `prefix`, or nothing if `prefix` is shorter than 8 bytes.
std::optional<std::uint64_t> decode_header_length(std::string_view prefix);

// What is wrong with a file of `file_size` bytes that starts with `prefix`
// (its first 8 bytes or fewer) as far as its header length goes: too short
// to hold one, a length of 0 (a save writes the header last), a header
// reaching beyond the end of the file or longer than safetensors reads.
// Nothing if a header of that length can follow.
std::optional<std::string> check_header_length(std::string_view prefix, std::uint64_t file_size);

// What is wrong with the header `header` (the N bytes after the length,
// padding included) of a file of `file_size` bytes, or nothing if the file
// is complete: a JSON object whose "__metadata__", if present, maps
// strings to strings, and whose every other entry has a known dtype, a
// shape and data_offsets of exactly the bytes that dtype and shape need,
// the entries covering the data after the header from its first byte to
// the end of the file, without gaps or overlaps.
std::optional<std::string> check_header(std::string_view header, std::uint64_t file_size);

}  // namespace trinity_stream_saver
