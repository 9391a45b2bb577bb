// POSIX calls that finish the job: a write may be short, and any call may
// be interrupted by a signal (EINTR); only a real error stops them.
// Nothing here knows about torch or Python.
#pragma once

#include <sys/types.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <string>

namespace trinity_stream_saver {

// Calls `call` again while it fails with EINTR (a signal arrived before it
// could finish) and returns its last result. Only for calls that are safe
// to repeat: never close(), whose descriptor is gone even on EINTR.
template <typename Call>
auto retry_on_eintr(Call&& call) -> decltype(call()) {
  for (;;) {
    const auto result = call();
    if (result != -1 || errno != EINTR) return result;
  }
}

// Writes all `size` bytes at the descriptor's position, or throws OsError
// naming `path`. Goes through the system-call table (io/system_calls.h).
void write_all(int fd, const void* data, std::size_t size, const std::string& path);

// Writes all `size` bytes at `offset`, or throws OsError naming `path`.
void pwrite_all(int fd, const void* data, std::size_t size, std::uint64_t offset,
                const std::string& path);

// Reads up to `size` bytes at `offset`; fewer only at the end of the file.
// Throws OsError naming `path`.
std::string read_at(int fd, std::uint64_t offset, std::size_t size, const std::string& path);

}  // namespace trinity_stream_saver
