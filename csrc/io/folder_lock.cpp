#include "io/folder_lock.h"

#include <fcntl.h>
#include <sys/file.h>

#include <cerrno>

#include <trinity_stream_saver/errors.h>

#include "io/posix_io.h"

namespace trinity_stream_saver {

FileDescriptor lock_folder(const std::string& directory) {
  FileDescriptor fd(retry_on_eintr(
      [&] { return ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); }));
  if (!fd) throw OsError(errno, directory, "open the save directory to lock it");
  if (retry_on_eintr([&] { return ::flock(fd.get(), LOCK_EX | LOCK_NB); }) != 0 &&
      errno == EWOULDBLOCK) {
    throw OsError(EBUSY, directory,
                  "save a sharded checkpoint into it: another sharded save into this folder is "
                  "running; wait for it to finish, or save into a different folder");
  }
  return fd;
}

}  // namespace trinity_stream_saver
