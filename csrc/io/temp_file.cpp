#include "io/temp_file.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include <trinity_stream_saver/errors.h>

#include "io/posix_io.h"

namespace trinity_stream_saver {

namespace {

// Enough for saves that start together and each find the other's debris;
// a loop that never settles means something else keeps creating files.
constexpr int kCreateAttempts = 16;

const char kInProgress[] =
    "another save to the same destination is writing this file now; wait for "
    "it to finish, or save to a different path";

enum class Lock { kTaken, kHeldByAnotherSave, kUnsupported };

// Where the filesystem has no flock() (some FUSE and NFS mounts answer
// ENOLCK or EOPNOTSUPP), saves go on without the lock, as before it
// existed: O_EXCL and O_NOFOLLOW still keep them off links and debris.
Lock lock_without_waiting(int fd) {
  if (retry_on_eintr([&] { return ::flock(fd, LOCK_EX | LOCK_NB); }) == 0) return Lock::kTaken;
  return errno == EWOULDBLOCK ? Lock::kHeldByAnotherSave : Lock::kUnsupported;
}

bool same_file(const struct stat& a, const struct stat& b) {
  return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

// Removes what is at `path` unless it is a regular file another save holds
// (EBUSY) or a directory (EISDIR). Returns quietly if `path` changed
// meanwhile: the caller tries again.
void remove_debris(const std::string& path) {
  struct stat found {};
  if (::lstat(path.c_str(), &found) != 0) {
    if (errno == ENOENT) return;
    throw OsError(errno, path, "inspect the stale temporary file");
  }
  if (S_ISDIR(found.st_mode)) {
    throw OsError(EISDIR, path,
                  "create the temporary file: a directory is in the way; remove it");
  }
  // A regular file may be the file of a running save: only its lock says.
  // Anything else (link, FIFO, device) is never opened: opening a FIFO
  // would block, and a device open can have effects.
  FileDescriptor held;
  if (S_ISREG(found.st_mode)) {
    held = FileDescriptor(retry_on_eintr(
        [&] { return ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC); }));
    if (!held) {
      if (errno == ENOENT || errno == ELOOP) return;
      throw OsError(errno, path, "check whether a save is writing the stale temporary file");
    }
    if (lock_without_waiting(held.get()) == Lock::kHeldByAnotherSave) {
      throw OsError(EBUSY, path, std::string("create it: ") + kInProgress);
    }
    struct stat opened {};
    if (::fstat(held.get(), &opened) != 0 || !same_file(opened, found)) return;
  }
  // Removed while still locked: once the lock is gone, another save may
  // create its own file here, and this unlink must not hit that one.
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    throw OsError(errno, path, "remove the stale temporary file");
  }
}

// The usual cause of ENOENT here: the destination's folder does not exist.
// The error names that folder, which is what the user must create, rather
// than the temporary file they never asked for.
OsError missing_folder(const std::string& temp_path) {
  const std::size_t slash = temp_path.find_last_of('/');
  const std::string folder = slash == std::string::npos ? "." : temp_path.substr(0, slash + 1);
  return OsError(ENOENT, folder,
                 "create the temporary file '" + temp_path + "': the folder does not exist; "
                 "create it first (os.makedirs) or correct the path");
}

}  // namespace

FileDescriptor create_temp_file(const std::string& path) {
  for (int attempt = 0; attempt < kCreateAttempts; ++attempt) {
    FileDescriptor fd(retry_on_eintr([&] {
      return ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0666);
    }));
    if (!fd) {
      if (errno == ENOENT) throw missing_folder(path);
      if (errno != EEXIST) throw OsError(errno, path, "create the temporary file");
      remove_debris(path);
      continue;
    }
    // Between the creation and the lock, another save may have taken this
    // new file for debris: it holds the lock then, or has removed the file.
    if (lock_without_waiting(fd.get()) == Lock::kHeldByAnotherSave) {
      throw OsError(EBUSY, path, std::string("create it: ") + kInProgress);
    }
    check_still_named(fd, path);
    return fd;
  }
  throw OsError(EBUSY, path, std::string("create it: ") + kInProgress);
}

FileDescriptor open_finished_temp_file(const std::string& path) {
  FileDescriptor fd(retry_on_eintr(
      [&] { return ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC); }));
  if (!fd) {
    if (errno == ELOOP) {
      throw OsError(ELOOP, path,
                    "finalize it: it is a symbolic link, not the file a save wrote");
    }
    throw OsError(errno, path, "open the temporary file");
  }
  struct stat info {};
  if (::fstat(fd.get(), &info) != 0) throw OsError(errno, path, "inspect the temporary file");
  if (!S_ISREG(info.st_mode)) {
    throw OsError(EINVAL, path, "finalize it: it is not a regular file");
  }
  if (lock_without_waiting(fd.get()) == Lock::kHeldByAnotherSave) {
    throw OsError(EBUSY, path,
                  "finalize it: a save is still writing it; finalize it after that "
                  "save has returned");
  }
  return fd;
}

bool still_named(const FileDescriptor& fd, const std::string& path) noexcept {
  struct stat opened {};
  struct stat named {};
  return ::fstat(fd.get(), &opened) == 0 && ::lstat(path.c_str(), &named) == 0 &&
         same_file(opened, named);
}

void check_still_named(const FileDescriptor& fd, const std::string& path) {
  if (!still_named(fd, path)) {
    throw OsError(EBUSY, path,
                  "use the temporary file: it was removed or replaced while it was held "
                  "(by a save to the same destination that started at the same time?)");
  }
}

}  // namespace trinity_stream_saver
