// The lock a sharded save holds on its folder from the first temporary file
// to the last removal of the clean-up. Knows POSIX only.
//
// Why the folder and not only each file: two sharded saves with different
// shard counts write files of different names, so their per-file locks
// (io/temp_file.h) never meet, and each one's clean-up removes the other's
// shards. Why flock() on the folder itself and not a lock file in it: a
// lock file would be one more name in a checkpoint folder that users copy
// and upload, and debris after a kill; the kernel drops a flock() when the
// process dies, so a killed save never leaves the folder locked.
#pragma once

#include <string>

#include "io/file_descriptor.h"

namespace trinity_stream_saver {

// Opens the folder `directory` and locks it without waiting. Returns the
// descriptor that holds the lock (closing it releases the lock). Throws
// OsError: EBUSY if another save holds it, ENOTDIR or ENOENT if
// `directory` is not a folder. Where the filesystem has no flock() (some
// FUSE and NFS mounts), returns the unlocked descriptor: saves go on as
// they did before the lock existed.
FileDescriptor lock_folder(const std::string& directory);

}  // namespace trinity_stream_saver
