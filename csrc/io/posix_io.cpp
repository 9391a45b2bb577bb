#include "io/posix_io.h"

#include <unistd.h>

#include <cerrno>

#include <trinity_stream_saver/errors.h>

#include "io/system_calls.h"

namespace trinity_stream_saver {

namespace {

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

void write_all(int fd, const void* data, std::size_t size, const std::string& path) {
  const SystemCalls& calls = system_calls();
  write_loop(data, size, path, [&](const char* chunk, std::size_t left, std::size_t) {
    return calls.write(fd, chunk, left);
  });
}

void pwrite_all(int fd, const void* data, std::size_t size, std::uint64_t offset,
                const std::string& path) {
  const SystemCalls& calls = system_calls();
  write_loop(data, size, path, [&](const char* chunk, std::size_t left, std::size_t done) {
    return calls.pwrite(fd, chunk, left, static_cast<off_t>(offset + done));
  });
}

std::string read_at(int fd, std::uint64_t offset, std::size_t size, const std::string& path) {
  std::string bytes(size, '\0');
  std::size_t done = 0;
  while (done < size) {
    const ssize_t got = retry_on_eintr([&] {
      return ::pread(fd, bytes.data() + done, size - done, static_cast<off_t>(offset + done));
    });
    if (got < 0) throw OsError(errno, path, "read");
    if (got == 0) break;
    done += static_cast<std::size_t>(got);
  }
  bytes.resize(done);
  return bytes;
}

}  // namespace trinity_stream_saver
