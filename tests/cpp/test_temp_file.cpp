#include "io/temp_file.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <string>

#include <trinity_stream_saver/errors.h>

#include "io/file_sink.h"
#include "test_support.h"

namespace trinity_stream_saver {
namespace {

using testing::exists;
using testing::read_file;
using testing::ScratchDir;
using testing::write_file;

// The errno of the OsError that `action` throws, or 0 if none.
template <typename Action>
int os_error_number(Action action) {
  try {
    action();
  } catch (const OsError& error) {
    return error.error_number();
  }
  return 0;
}

bool is_regular_file(const std::string& path) {
  struct stat info {};
  return ::lstat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode);
}

TEST(TempFile, NeverWritesThroughASymbolicLinkAtItsPath) {
  ScratchDir dir;
  write_file(dir.file("victim"), "someone else's notes");
  ASSERT_EQ(::symlink(dir.file("victim").c_str(), dir.file("f.tmp").c_str()), 0);
  {
    FileSink sink(dir.file("f.tmp"));
    sink.append("data", 4);
    sink.close_and_keep(/*sync=*/false);
  }
  EXPECT_EQ(read_file(dir.file("victim")), "someone else's notes");
  EXPECT_TRUE(is_regular_file(dir.file("f.tmp")));
  EXPECT_EQ(read_file(dir.file("f.tmp")), "data");
}

TEST(TempFile, ReplacesAFifoAtItsPathWithoutOpeningIt) {
  ScratchDir dir;
  ASSERT_EQ(::mkfifo(dir.file("f.tmp").c_str(), 0644), 0);
  ::alarm(20);  // opening the FIFO would block forever: fail instead
  {
    FileSink sink(dir.file("f.tmp"));
    sink.close_and_keep(/*sync=*/false);
  }
  ::alarm(0);
  EXPECT_TRUE(is_regular_file(dir.file("f.tmp")));
}

TEST(TempFile, ASecondWriterOfTheSamePathIsEbusyAndLeavesTheFirstAlone) {
  ScratchDir dir;
  FileSink first(dir.file("f.tmp"));
  first.append("first", 5);
  try {
    FileSink second(dir.file("f.tmp"));
    FAIL() << "a second sink on a path being written must fail";
  } catch (const OsError& error) {
    EXPECT_EQ(error.error_number(), EBUSY);
    EXPECT_EQ(error.path(), dir.file("f.tmp"));
    EXPECT_NE(std::string(error.what()).find("another save"), std::string::npos) << error.what();
  }
  first.close_and_keep(/*sync=*/false);
  EXPECT_EQ(read_file(dir.file("f.tmp")), "first");
}

TEST(TempFile, IsFreeForANewWriterOnceTheFirstHasFinished) {
  ScratchDir dir;
  {
    FileSink first(dir.file("f.tmp"));
    first.close_and_keep(/*sync=*/false);
  }
  {
    FileSink second(dir.file("f.tmp"));
    second.append("second", 6);
    second.close_and_keep(/*sync=*/false);
  }
  EXPECT_EQ(read_file(dir.file("f.tmp")), "second");
}

TEST(TempFile, ADirectoryInTheWayIsEisdirAndStays) {
  ScratchDir dir;
  ASSERT_EQ(::mkdir(dir.file("f.tmp").c_str(), 0755), 0);
  EXPECT_EQ(os_error_number([&] { FileSink sink(dir.file("f.tmp")); }), EISDIR);
  struct stat info {};
  ASSERT_EQ(::stat(dir.file("f.tmp").c_str(), &info), 0);
  EXPECT_TRUE(S_ISDIR(info.st_mode));
}

TEST(TempFile, AFailedWriterRemovesOnlyItsOwnFile) {
  ScratchDir dir;
  {
    FileSink abandoned(dir.file("f.tmp"));
    // Someone replaces the file behind the sink's back.
    ASSERT_EQ(::unlink(dir.file("f.tmp").c_str()), 0);
    write_file(dir.file("f.tmp"), "not the sink's");
  }
  EXPECT_EQ(read_file(dir.file("f.tmp")), "not the sink's");
}

TEST(TempFile, RenameRefusesAFileThatWasReplacedBehindTheWritersBack) {
  ScratchDir dir;
  FileSink sink(dir.file("f.tmp"));
  ASSERT_EQ(::unlink(dir.file("f.tmp").c_str()), 0);
  write_file(dir.file("f.tmp"), "not the sink's");
  EXPECT_EQ(os_error_number([&] { sink.close_and_rename(dir.file("f"), /*sync=*/false); }), EBUSY);
  EXPECT_FALSE(exists(dir.file("f")));
}

TEST(OpenFinishedTempFile, RefusesASymbolicLink) {
  ScratchDir dir;
  write_file(dir.file("real"), "data");
  ASSERT_EQ(::symlink(dir.file("real").c_str(), dir.file("f.tmp").c_str()), 0);
  EXPECT_EQ(os_error_number([&] { open_finished_temp_file(dir.file("f.tmp")); }), ELOOP);
}

TEST(OpenFinishedTempFile, RefusesAFileASaveIsWriting) {
  ScratchDir dir;
  FileSink writing(dir.file("f.tmp"));
  EXPECT_EQ(os_error_number([&] { open_finished_temp_file(dir.file("f.tmp")); }), EBUSY);
}

TEST(OpenFinishedTempFile, RefusesAFifoWithoutBlocking) {
  ScratchDir dir;
  ASSERT_EQ(::mkfifo(dir.file("f.tmp").c_str(), 0644), 0);
  ::alarm(20);
  EXPECT_EQ(os_error_number([&] { open_finished_temp_file(dir.file("f.tmp")); }), EINVAL);
  ::alarm(0);
}

TEST(OpenFinishedTempFile, KeepsANewWriterOutWhileHeld) {
  ScratchDir dir;
  write_file(dir.file("f.tmp"), "finished");
  const FileDescriptor held = open_finished_temp_file(dir.file("f.tmp"));
  EXPECT_EQ(os_error_number([&] { FileSink sink(dir.file("f.tmp")); }), EBUSY);
  EXPECT_EQ(read_file(dir.file("f.tmp")), "finished");
}

}  // namespace
}  // namespace trinity_stream_saver
