#include "io/file_sink.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>

#include "io/durability.h"
#include <trinity_stream_saver/errors.h>
#include "io/posix_io.h"

namespace trinity_stream_saver {

FileSink::FileSink(std::string path) : path_(std::move(path)) {
  do {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  } while (fd_ < 0 && errno == EINTR);
  if (fd_ < 0) throw OsError(errno, path_, "create the temporary file");
}

FileSink::~FileSink() {
  if (finished_) return;
  if (fd_ >= 0) ::close(fd_);
  ::unlink(path_.c_str());
}

void FileSink::reserve_space(std::uint64_t size) {
  // No real save is 2^63 bytes; such metadata fails later, at its tensors.
  if (size == 0 || size > static_cast<std::uint64_t>(INT64_MAX)) return;
  const std::string action = "reserve " + std::to_string(size) + " bytes of disk space";
  struct statfs filesystem {};
  const bool in_memory = ::fstatfs(fd_, &filesystem) == 0 &&
                         (filesystem.f_type == TMPFS_MAGIC || filesystem.f_type == RAMFS_MAGIC);
  if (!in_memory) {
    // fallocate(), not posix_fallocate(): where the filesystem cannot
    // preallocate, glibc's posix_fallocate() writes zeros over the whole
    // size, which would double the I/O of the save.
    int result = 0;
    do {
      result = ::fallocate(fd_, 0, 0, static_cast<off_t>(size));
    } while (result != 0 && errno == EINTR);
    if (result == 0) return;
    if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL) {
      throw OsError(errno, path_, action);
    }
  }
  struct statvfs space {};
  if (::fstatvfs(fd_, &space) != 0 || space.f_frsize == 0) return;  // nothing to check against
  // root may also write into the blocks reserved for it.
  const std::uint64_t blocks = ::geteuid() == 0 ? space.f_bfree : space.f_bavail;
  if (blocks < size / space.f_frsize + 1) throw OsError(ENOSPC, path_, action);
}

void FileSink::truncate(std::uint64_t size) {
  flush();
  int result = 0;
  do {
    result = ::ftruncate(fd_, static_cast<off_t>(size));
  } while (result != 0 && errno == EINTR);
  if (result != 0) throw OsError(errno, path_, "truncate");
}

void FileSink::seek(std::uint64_t offset) {
  flush();
  if (::lseek(fd_, static_cast<off_t>(offset), SEEK_SET) < 0) {
    throw OsError(errno, path_, "seek");
  }
}

void FileSink::append(const void* data, std::size_t size) {
  if (size == 0) return;
  if (buffered_ + size <= kBufferBytes && size < kBufferBytes) {
    if (!buffer_) buffer_ = std::make_unique<char[]>(kBufferBytes);
    std::memcpy(buffer_.get() + buffered_, data, size);
    buffered_ += size;
    return;
  }
  flush();
  if (size < kBufferBytes) {
    append(data, size);
    return;
  }
  write_all(fd_, data, size, path_);
}

void FileSink::append_unbuffered(const void* data, std::size_t size) {
  if (size == 0) return;
  flush();
  write_all(fd_, data, size, path_);
}

void FileSink::write_at(std::uint64_t offset, const void* data, std::size_t size) {
  flush();
  pwrite_all(fd_, data, size, offset, path_);
}

void FileSink::flush() {
  if (buffered_ == 0) return;
  // Reset first: if the write throws, the sink is abandoned anyway.
  const std::size_t size = buffered_;
  buffered_ = 0;
  write_all(fd_, buffer_.get(), size, path_);
}

void FileSink::close_or_throw(bool sync) {
  flush();
  if (sync && ::fdatasync(fd_) != 0) throw OsError(errno, path_, "sync to disk");
  const int fd = fd_;
  fd_ = -1;
  // close() reports deferred write errors on some filesystems (NFS); it must
  // not be retried on EINTR, since the descriptor is gone either way.
  if (::close(fd) != 0 && errno != EINTR) {
    throw OsError(errno, path_, "close");
  }
}

void FileSink::close_and_rename(const std::string& destination, bool sync) {
  close_or_throw(sync);
  if (::rename(path_.c_str(), destination.c_str()) != 0) {
    throw OsError(errno, destination, "rename the temporary file '" + path_ + "' to it");
  }
  finished_ = true;
  if (sync) sync_parent_directory(destination);
}

void FileSink::close_and_keep(bool sync) {
  close_or_throw(sync);
  finished_ = true;
}

}  // namespace trinity_stream_saver
