// Reads what format/file_check judges (the first 8 bytes, the header and
// the size) from a file on disk. Knows POSIX files only.
#pragma once

#include <optional>
#include <string>

namespace trinity_stream_saver {

// What makes the file open as `fd` not a complete safetensors file, or
// nothing. Throws OsError naming `path` if it cannot be read.
std::optional<std::string> safetensors_file_problem(int fd, const std::string& path);

// Throws ValueError naming `path` and what is wrong with it if it is not a
// complete safetensors file; OsError if it cannot be opened or read.
void check_safetensors_file(const std::string& path);

}  // namespace trinity_stream_saver
