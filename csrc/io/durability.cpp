#include "io/durability.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

#include <trinity_stream_saver/errors.h>

namespace trinity_stream_saver {

namespace {

int open_or_throw(const std::string& path, int flags, const std::string& action) {
  int fd = -1;
  do {
    fd = ::open(path.c_str(), flags | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) throw OsError(errno, path, action);
  return fd;
}

// Syncs an open descriptor and closes it; `data_only` skips metadata that
// is not needed to read the data back (timestamps).
void sync_and_close(int fd, const std::string& path, bool data_only) {
  const int synced = data_only ? ::fdatasync(fd) : ::fsync(fd);
  const int sync_errno = errno;
  ::close(fd);
  if (synced != 0) throw OsError(sync_errno, path, "sync to disk");
}

std::string parent_directory(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace

void sync_parent_directory(const std::string& path) {
  const std::string directory = parent_directory(path);
  const int fd = open_or_throw(directory, O_RDONLY | O_DIRECTORY, "open the directory to sync it");
  sync_and_close(fd, directory, /*data_only=*/false);
}

void finalize_file(const std::string& temp_path, const std::string& destination, bool sync) {
  if (sync) {
    const int fd = open_or_throw(temp_path, O_RDONLY, "open the temporary file to sync it");
    sync_and_close(fd, temp_path, /*data_only=*/true);
  }
  if (::rename(temp_path.c_str(), destination.c_str()) != 0) {
    throw OsError(errno, destination, "rename the temporary file '" + temp_path + "' to it");
  }
  if (sync) sync_parent_directory(destination);
}

}  // namespace trinity_stream_saver
