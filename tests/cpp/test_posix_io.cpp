#include "io/posix_io.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <string>

#include <trinity_stream_saver/errors.h>
#include "test_support.h"

namespace trinity_stream_saver {
namespace {

using testing::read_file;
using testing::ScratchDir;

// Fake system calls: every other call fails with EINTR, the rest write at
// most 7 bytes, as a signal-heavy process on a busy pipe would see.
int calls = 0;

ssize_t short_interrupted_write(int fd, const void* data, std::size_t size) {
  if (++calls % 2 == 0) {
    errno = EINTR;
    return -1;
  }
  return ::write(fd, data, std::min<std::size_t>(size, 7));
}

ssize_t short_interrupted_pwrite(int fd, const void* data, std::size_t size, off_t offset) {
  if (++calls % 2 == 0) {
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

class PosixIo : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_.file("out");
    fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(fd_, 0);
    calls = 0;
  }
  void TearDown() override { ::close(fd_); }

  ScratchDir dir_;
  std::string path_;
  int fd_ = -1;
};

TEST_F(PosixIo, WriteAllFinishesThroughShortWritesAndEintr) {
  const std::string data = "0123456789abcdefghijklmnopqrstuvwxyz";
  write_all(fd_, data.data(), data.size(), path_, short_interrupted_write);
  EXPECT_EQ(read_file(path_), data);
  EXPECT_GT(calls, 10);  // the fake really split the write
}

TEST_F(PosixIo, PwriteAllFinishesThroughShortWritesAndEintr) {
  const std::string data = "0123456789abcdefghijklmnopqrstuvwxyz";
  write_all(fd_, "................................................", 48, path_);
  pwrite_all(fd_, data.data(), data.size(), 4, path_, short_interrupted_pwrite);
  EXPECT_EQ(read_file(path_), "...." + data + "........");
}

TEST_F(PosixIo, WriteAllThrowsOsErrorWithErrnoAndPath) {
  try {
    write_all(fd_, "x", 1, path_, failing_write);
    FAIL() << "expected OsError";
  } catch (const OsError& error) {
    EXPECT_EQ(error.error_number(), ENOSPC);
    EXPECT_EQ(error.path(), path_);
    EXPECT_NE(std::string(error.what()).find(path_), std::string::npos);
  }
}

TEST_F(PosixIo, WriteAllTreatsAZeroByteWriteAsAnError) {
  try {
    write_all(fd_, "x", 1, path_, zero_write);
    FAIL() << "expected OsError";
  } catch (const OsError& error) {
    EXPECT_EQ(error.error_number(), EIO);
  }
}

TEST_F(PosixIo, WriteAllOfNothingMakesNoCall) {
  write_all(fd_, nullptr, 0, path_, failing_write);
  EXPECT_EQ(read_file(path_), "");
}

}  // namespace
}  // namespace trinity_stream_saver
