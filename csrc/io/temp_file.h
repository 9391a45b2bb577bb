// The temporary file of a save (`<destination>.tmp`), claimed so that it
// cannot be turned against the user and two saves cannot write into one
// file. Knows POSIX files only.
//
// Why a lock and not only O_EXCL: a save that was killed leaves its
// temporary file behind, and the next save must replace it; O_EXCL alone
// cannot tell such debris from the file of a save that is still running.
// A running save holds an flock() on its file (the kernel drops it when the
// process dies), so a file nobody holds a lock on is debris.
#pragma once

#include <string>

#include "io/file_descriptor.h"

namespace trinity_stream_saver {

// Creates `path` for writing, mode 0666 less the umask, and locks it.
// Never writes through a symbolic link and never into an existing file:
// whatever is at `path` (a stale temporary file no save holds, a symbolic
// link, a FIFO, a device node) is removed first, with unlink(), which does
// not follow links, and the file is created with O_CREAT | O_EXCL |
// O_NOFOLLOW. Throws OsError: EBUSY if another save is writing `path`,
// EISDIR if a directory is in the way, and the creation's own errors.
FileDescriptor create_temp_file(const std::string& path);

// Opens the temporary file a save left at `path` (rename=False) for
// reading and locks it, so that no save can start writing it while it is
// checked and renamed. Throws OsError: ELOOP if `path` is a symbolic link,
// EBUSY if a save is writing it, EINVAL if it is not a regular file.
FileDescriptor open_finished_temp_file(const std::string& path);

// Whether `path` still names the file open as `fd`.
bool still_named(const FileDescriptor& fd, const std::string& path) noexcept;

// Throws OsError if `path` no longer names the file open as `fd`: someone
// removed or replaced it, and renaming `path` would publish their file.
void check_still_named(const FileDescriptor& fd, const std::string& path);

}  // namespace trinity_stream_saver
