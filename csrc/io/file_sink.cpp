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

#include <trinity_stream_saver/errors.h>

#include "io/durability.h"
#include "io/posix_io.h"
#include "io/system_calls.h"
#include "io/temp_file.h"

namespace trinity_stream_saver {

FileSink::FileSink(std::string path)
    : path_(std::move(path)), fd_(create_temp_file(path_)) {
  lock_ = FileDescriptor(::fcntl(fd_.get(), F_DUPFD_CLOEXEC, 0));
  if (!lock_) {
    const int error = errno;
    ::unlink(path_.c_str());
    throw OsError(error, path_, "duplicate the temporary file's descriptor");
  }
}

FileSink::~FileSink() {
  if (finished_) return;
  fd_.reset();
  if (still_named(lock_, path_)) ::unlink(path_.c_str());
}

void FileSink::reserve_space(std::uint64_t size) {
  // No real save is 2^63 bytes; such metadata fails later, at its tensors.
  if (size == 0 || size > static_cast<std::uint64_t>(INT64_MAX)) return;
  const std::string action = "reserve " + std::to_string(size) + " bytes of disk space";
  struct statfs filesystem {};
  const bool in_memory = ::fstatfs(fd_.get(), &filesystem) == 0 &&
                         (filesystem.f_type == TMPFS_MAGIC || filesystem.f_type == RAMFS_MAGIC);
  if (!in_memory) {
    // fallocate(), not posix_fallocate(): where the filesystem cannot
    // preallocate, glibc's posix_fallocate() writes zeros over the whole
    // size, which would double the I/O of the save.
    if (retry_on_eintr([&] { return ::fallocate(fd_.get(), 0, 0, static_cast<off_t>(size)); }) ==
        0) {
      return;
    }
    if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL) {
      throw OsError(errno, path_, action);
    }
  }
  struct statvfs space {};
  if (::fstatvfs(fd_.get(), &space) != 0 || space.f_frsize == 0) return;  // nothing to check against
  // root may also write into the blocks reserved for it.
  const std::uint64_t blocks = ::geteuid() == 0 ? space.f_bfree : space.f_bavail;
  if (blocks < size / space.f_frsize + 1) throw OsError(ENOSPC, path_, action);
}

void FileSink::truncate(std::uint64_t size) {
  flush();
  if (retry_on_eintr([&] { return ::ftruncate(fd_.get(), static_cast<off_t>(size)); }) != 0) {
    throw OsError(errno, path_, "truncate");
  }
}

void FileSink::seek(std::uint64_t offset) {
  flush();
  if (::lseek(fd_.get(), static_cast<off_t>(offset), SEEK_SET) < 0) {
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
  write_all(fd_.get(), data, size, path_);
}

void FileSink::append_unbuffered(const void* data, std::size_t size) {
  if (size == 0) return;
  flush();
  write_all(fd_.get(), data, size, path_);
}

void FileSink::write_at(std::uint64_t offset, const void* data, std::size_t size) {
  flush();
  pwrite_all(fd_.get(), data, size, offset, path_);
}

void FileSink::flush() {
  if (buffered_ == 0) return;
  // Reset first: if the write throws, the sink is abandoned anyway.
  const std::size_t size = buffered_;
  buffered_ = 0;
  write_all(fd_.get(), buffer_.get(), size, path_);
}

void FileSink::close_or_throw(bool sync) {
  flush();
  if (sync && system_calls().fdatasync(fd_.get()) != 0) {
    throw OsError(errno, path_, "sync to disk");
  }
  fd_.close_or_throw(path_);
}

void FileSink::close_and_rename(const std::string& destination, bool sync) {
  close_or_throw(sync);
  check_still_named(lock_, path_);
  rename_into_place(path_, destination);
  finished_ = true;
  lock_.reset();
  if (sync) sync_after_rename(path_, destination);
}

FileDescriptor FileSink::close_and_keep(bool sync) {
  close_or_throw(sync);
  finished_ = true;
  return std::move(lock_);
}

}  // namespace trinity_stream_saver
