#include "io/posix_io.h"

#include <unistd.h>

#include <cerrno>

#include <trinity_stream_saver/errors.h>

namespace trinity_stream_saver {

namespace {

ssize_t system_write(int fd, const void* data, std::size_t size) {
  return ::write(fd, data, size);
}

ssize_t system_pwrite(int fd, const void* data, std::size_t size, off_t offset) {
  return ::pwrite(fd, data, size, offset);
}

// Calls `write_some(data, size, done)` until every byte is written.
template <typename WriteSome>
void write_loop(const void* data, std::size_t size, const std::string& path,
                WriteSome write_some) {
  const char* bytes = static_cast<const char*>(data);
  std::size_t done = 0;
  while (done < size) {
    const ssize_t written =
        retry_on_eintr([&] { return write_some(bytes + done, size - done, done); });
    if (written < 0) throw OsError(errno, path, "write");
    // A regular file never accepts zero bytes of a non-empty write; treat it
    // as an I/O error rather than spin forever.
    if (written == 0) throw OsError(EIO, path, "write");
    done += static_cast<std::size_t>(written);
  }
}

}  // namespace

void write_all(int fd, const void* data, std::size_t size,
               const std::string& path, WriteFn write_fn) {
  const WriteFn fn = write_fn != nullptr ? write_fn : system_write;
  write_loop(data, size, path,
             [&](const char* chunk, std::size_t left, std::size_t) {
               return fn(fd, chunk, left);
             });
}

void pwrite_all(int fd, const void* data, std::size_t size,
                std::uint64_t offset, const std::string& path,
                PwriteFn pwrite_fn) {
  const PwriteFn fn = pwrite_fn != nullptr ? pwrite_fn : system_pwrite;
  write_loop(data, size, path,
             [&](const char* chunk, std::size_t left, std::size_t done) {
               return fn(fd, chunk, left, static_cast<off_t>(offset + done));
             });
}

}  // namespace trinity_stream_saver
