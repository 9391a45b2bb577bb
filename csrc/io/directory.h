// The folder a sharded checkpoint lives in: creating it, listing it, and
// removing files from it. Knows POSIX only.
#pragma once

#include <string>
#include <vector>

namespace trinity_stream_saver {

// Creates `path` and any missing parent, as os.makedirs(exist_ok=True)
// does. Throws OsError naming the component that could not be made (or
// ENOTDIR if `path` is a file).
void create_directories(const std::string& path);

// The names in `directory` (not "." or ".."), in no particular order.
// Throws OsError.
std::vector<std::string> list_directory(const std::string& directory);

// Removes `path`; a file that is already gone is not an error. Throws
// OsError otherwise.
void remove_file(const std::string& path);

// `directory` + "/" + `name`.
std::string join_path(const std::string& directory, const std::string& name);

}  // namespace trinity_stream_saver
