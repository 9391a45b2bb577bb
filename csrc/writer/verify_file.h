// Whether a file on disk is a complete safetensors file: reads what
// format/file_check judges (the first 8 bytes, the header and the size)
// through io/. The public check_safetensors_file (stream_saver.h) and
// finalize() are built on it.
#pragma once

#include <optional>
#include <string>

namespace trinity_stream_saver {

// What makes the file open as `fd` not a complete safetensors file, or
// nothing. Throws OsError naming `path` if it cannot be read.
std::optional<std::string> safetensors_file_problem(int fd, const std::string& path);

}  // namespace trinity_stream_saver
