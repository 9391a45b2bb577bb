// Making a finished file survive a crash or power cut, and making it
// visible under its final name. Knows POSIX files only.
//
// Why both steps: rename() is atomic but not durable. After a power cut the
// new name can point at a file whose data never reached the disk unless the
// data was synced before the rename, and the rename itself can be lost
// unless the directory that holds the name is synced after it.
#pragma once

#include <string>

namespace trinity_stream_saver {

// fsync()s the directory that holds `path`, so that a rename or creation of
// `path` survives a crash. Throws OsError.
void sync_parent_directory(const std::string& path);

// The step a save with rename=False leaves to the caller: with `sync`,
// fdatasync() `temp_path`, rename it to `destination`, fsync() the
// directory. Throws OsError naming the path that failed; if the rename did
// not happen, `temp_path` is still in place.
void finalize_file(const std::string& temp_path, const std::string& destination, bool sync);

}  // namespace trinity_stream_saver
