#include "io/durability.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include <trinity_stream_saver/errors.h>

#include "io/file_descriptor.h"
#include "io/posix_io.h"
#include "io/system_calls.h"

namespace trinity_stream_saver {

namespace {

std::string parent_directory(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

const char* kind_of_special_file(mode_t mode) {
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

}  // namespace

void sync_parent_directory(const std::string& path) {
  const std::string directory = parent_directory(path);
  FileDescriptor fd(retry_on_eintr(
      [&] { return ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); }));
  if (!fd) throw OsError(errno, directory, "open the directory to sync it");
  if (system_calls().fsync(fd.get()) != 0) throw OsError(errno, directory, "sync to disk");
}

void check_destination(const std::string& destination) {
  struct stat info {};
  if (::lstat(destination.c_str(), &info) != 0) {
    // Missing is fine; other errors (a missing directory, no permission)
    // are reported by the step that needs the path, with its own words.
    return;
  }
  if (S_ISREG(info.st_mode) || S_ISLNK(info.st_mode)) return;
  if (S_ISDIR(info.st_mode)) {
    throw OsError(EISDIR, destination,
                  "save a file there: it is a directory; give a file name inside it");
  }
  throw OsError(EEXIST, destination,
                std::string("save a file there: it is ") + kind_of_special_file(info.st_mode) +
                    ", which a save never replaces; remove it or save to another path");
}

void rename_into_place(const std::string& temp_path, const std::string& destination) {
  check_destination(destination);
  if (system_calls().rename(temp_path.c_str(), destination.c_str()) != 0) {
    throw OsError(errno, destination, "rename the temporary file '" + temp_path + "' to it");
  }
}

void sync_after_rename(const std::string& temp_path, const std::string& destination) {
  try {
    sync_parent_directory(destination);
  } catch (const OsError& error) {
    throw OsError(error.error_number(), error.path(),
                  "sync the directory after renaming '" + temp_path + "' to '" + destination +
                      "'; the new file is in place, but its name may not survive a power cut");
  }
}

}  // namespace trinity_stream_saver
