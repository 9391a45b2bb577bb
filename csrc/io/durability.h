// Making a finished file visible under its final name, and making that
// survive a crash or power cut. Knows POSIX files only.
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

// Throws OsError unless `destination` is something a save may replace:
// nothing, a regular file, or a symbolic link (the link itself is
// replaced, as os.replace() does; the file it points to is untouched). A
// directory is EISDIR; a device node, FIFO or socket is EEXIST: replacing
// one by a regular file is never what a save meant.
void check_destination(const std::string& destination);

// Renames the finished `temp_path` to `destination` after checking the
// destination (check_destination). Throws OsError naming `destination`;
// `temp_path` is then still in place.
void rename_into_place(const std::string& temp_path, const std::string& destination);

// After rename_into_place(), fsync()s the directory so that the rename
// survives a power cut. Throws OsError naming the directory and saying
// that the new file is in place, only its name may not be durable yet.
void sync_after_rename(const std::string& temp_path, const std::string& destination);

}  // namespace trinity_stream_saver
