#include "io/posix_io.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <string>

#include <trinity_stream_saver/errors.h>

#include "io/system_calls.h"
#include "test_support.h"

namespace trinity_stream_saver {
namespace {

using testing::read_file;
using testing::ScratchDir;

// Fake system calls: every other call fails with EINTR, the rest write at
// most 7 bytes, as a signal-heavy process on a busy pipe would see.
int fake_calls = 0;

ssize_t short_interrupted_write(int fd, const void* data, std::size_t size) {
  if (++fake_calls % 2 == 0) {
    errno = EINTR;
    return -1;
  }
  return ::write(fd, data, std::min<std::size_t>(size, 7));
}

ssize_t short_interrupted_pwrite(int fd, const void* data, std::size_t size, off_t offset) {
  if (++fake_calls % 2 == 0) {
    errno = EINTR;
    return -1;
  }
  return ::pwrite(fd, data, std::min<std::size_t>(size, 7), offset);
}

ssize_t failing_write(int, const void*, std::size_t) {
  errno = ENOSPC;
  return -1;
}

ssize_t zero_write(int, const void*, std::size_t) { return 0; }

// The real system calls with `write` and `pwrite` replaced.
SystemCalls with_writes(decltype(SystemCalls::write) write,
                        decltype(SystemCalls::pwrite) pwrite = ::pwrite) {
  SystemCalls calls = ScopedSystemCalls::real();
  calls.write = write;
  calls.pwrite = pwrite;
  return calls;
}

class PosixIo : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_.file("out");
    fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(fd_, 0);
    fake_calls = 0;
  }
  void TearDown() override { ::close(fd_); }

  ScratchDir dir_;
  std::string path_;
  int fd_ = -1;
};

TEST_F(PosixIo, WriteAllFinishesThroughShortWritesAndEintr) {
  const std::string data = "0123456789abcdefghijklmnopqrstuvwxyz";
  const SystemCalls faults = with_writes(short_interrupted_write);
  const ScopedSystemCalls faked(faults);
  write_all(fd_, data.data(), data.size(), path_);
  EXPECT_EQ(read_file(path_), data);
  EXPECT_GT(fake_calls, 10);  // the fake really split the write
}

TEST_F(PosixIo, PwriteAllFinishesThroughShortWritesAndEintr) {
  const std::string data = "0123456789abcdefghijklmnopqrstuvwxyz";
  write_all(fd_, "................................................", 48, path_);
  const SystemCalls faults = with_writes(::write, short_interrupted_pwrite);
  const ScopedSystemCalls faked(faults);
  pwrite_all(fd_, data.data(), data.size(), 4, path_);
  EXPECT_GT(fake_calls, 10);
  EXPECT_EQ(read_file(path_), "...." + data + "........");
}

TEST_F(PosixIo, WriteAllThrowsOsErrorWithErrnoAndPath) {
  const SystemCalls faults = with_writes(failing_write);
  const ScopedSystemCalls faked(faults);
  try {
    write_all(fd_, "x", 1, path_);
    FAIL() << "expected OsError";
  } catch (const OsError& error) {
    EXPECT_EQ(error.error_number(), ENOSPC);
    EXPECT_EQ(error.path(), path_);
    EXPECT_NE(std::string(error.what()).find(path_), std::string::npos);
  }
}

TEST_F(PosixIo, WriteAllTreatsAZeroByteWriteAsAnError) {
  const SystemCalls faults = with_writes(zero_write);
  const ScopedSystemCalls faked(faults);
  try {
    write_all(fd_, "x", 1, path_);
    FAIL() << "expected OsError";
  } catch (const OsError& error) {
    EXPECT_EQ(error.error_number(), EIO);
  }
}

TEST_F(PosixIo, WriteAllOfNothingMakesNoCall) {
  const SystemCalls faults = with_writes(failing_write);
  const ScopedSystemCalls faked(faults);
  write_all(fd_, nullptr, 0, path_);
  EXPECT_EQ(read_file(path_), "");
}

}  // namespace
}  // namespace trinity_stream_saver
