#include "io/file_sink.h"

#include <gtest/gtest.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <string>

#include <trinity_stream_saver/errors.h>
#include "test_support.h"

namespace trinity_stream_saver {
namespace {

using testing::exists;
using testing::in_memory_filesystem;
using testing::read_file;
using testing::ScratchDir;
using testing::write_file;

TEST(FileSink, AppendsSmallAndLargePiecesInOrder) {
  ScratchDir dir;
  const std::string small_piece = "small";
  const std::string large_piece(FileSink::kBufferBytes + 3, 'L');
  const std::string middle_piece(FileSink::kBufferBytes - 2, 'm');
  {
    FileSink sink(dir.file("f.tmp"));
    sink.append(small_piece.data(), small_piece.size());
    sink.append(large_piece.data(), large_piece.size());
    sink.append(small_piece.data(), small_piece.size());
    sink.append(middle_piece.data(), middle_piece.size());
    sink.append(small_piece.data(), small_piece.size());
    sink.close_and_keep(/*sync=*/false);
  }
  EXPECT_EQ(read_file(dir.file("f.tmp")),
            small_piece + large_piece + small_piece + middle_piece + small_piece);
}

TEST(FileSink, WriteAtFillsAHoleLeftBySeek) {
  ScratchDir dir;
  {
    FileSink sink(dir.file("f.tmp"));
    sink.seek(4);
    sink.append("data", 4);
    sink.write_at(0, "head", 4);
    sink.close_and_keep(/*sync=*/false);
  }
  EXPECT_EQ(read_file(dir.file("f.tmp")), "headdata");
}

// On disk, space is preallocated; in memory (TMPDIR on a tmpfs) it is only
// checked, since preallocating would fill memory with zeros.
TEST(FileSink, ReserveSpacePreallocatesOnDiskAndTruncateCutsIt) {
  ScratchDir dir;
  const std::uintmax_t reserved = in_memory_filesystem(dir.path()) ? 0 : 1u << 20;
  {
    FileSink sink(dir.file("f.tmp"));
    sink.reserve_space(1 << 20);
    EXPECT_EQ(std::filesystem::file_size(dir.file("f.tmp")), reserved);
    sink.append("data", 4);
    sink.truncate(4);
    sink.close_and_keep(/*sync=*/false);
  }
  EXPECT_EQ(read_file(dir.file("f.tmp")), "data");
}

TEST(FileSink, ReservingMoreThanTheDiskHoldsIsAnOsError) {
  ScratchDir dir;
  FileSink sink(dir.file("f.tmp"));
  // Far beyond any real disk, but representable: the filesystem must refuse.
  EXPECT_THROW(sink.reserve_space(std::uint64_t{1} << 62), OsError);
}

TEST(FileSink, ReserveSpaceOnTmpfsChecksFreeSpaceWithoutFillingMemory) {
  struct statfs filesystem {};
  if (::statfs("/dev/shm", &filesystem) != 0 || filesystem.f_type != TMPFS_MAGIC) {
    GTEST_SKIP() << "/dev/shm is not a tmpfs here";
  }
  const std::string path = "/dev/shm/stream_saver_test_" + std::to_string(::getpid());
  {
    FileSink sink(path);
    sink.reserve_space(1 << 20);
    EXPECT_EQ(std::filesystem::file_size(path), 0u);
    try {
      sink.reserve_space(std::uint64_t{1} << 60);
      FAIL() << "expected ENOSPC";
    } catch (const OsError& error) {
      EXPECT_EQ(error.error_number(), ENOSPC);
      EXPECT_EQ(error.path(), path);
    }
  }
  EXPECT_FALSE(exists(path));
}

TEST(FileSink, CloseAndRenameReplacesTheDestinationWithOrWithoutSync) {
  for (const bool sync : {false, true}) {
    ScratchDir dir;
    write_file(dir.file("f"), "old contents");
    {
      FileSink sink(dir.file("f.tmp"));
      sink.append("new", 3);
      sink.close_and_rename(dir.file("f"), sync);
    }
    EXPECT_EQ(read_file(dir.file("f")), "new") << "sync=" << sync;
    EXPECT_FALSE(exists(dir.file("f.tmp"))) << "sync=" << sync;
  }
}

TEST(FileSink, ReplacesAStaleTemporaryFile) {
  ScratchDir dir;
  write_file(dir.file("f.tmp"), "stale debris from a killed save");
  {
    FileSink sink(dir.file("f.tmp"));
    sink.append("new", 3);
    sink.close_and_keep(/*sync=*/false);
  }
  EXPECT_EQ(read_file(dir.file("f.tmp")), "new");
}

TEST(FileSink, DestroyedUnfinishedRemovesItsFile) {
  ScratchDir dir;
  {
    FileSink sink(dir.file("f.tmp"));
    sink.append("partial", 7);
    ASSERT_TRUE(exists(dir.file("f.tmp")));
  }
  EXPECT_FALSE(exists(dir.file("f.tmp")));
}

TEST(FileSink, FailedRenameRemovesTheTemporaryFileAndKeepsTheDestination) {
  ScratchDir dir;
  ASSERT_EQ(::mkdir(dir.file("dest").c_str(), 0755), 0);
  write_file(dir.file("dest/inner"), "keep me");
  try {
    FileSink sink(dir.file("f.tmp"));
    sink.append("new", 3);
    sink.close_and_rename(dir.file("dest"), /*sync=*/false);
    FAIL() << "renaming a file over a non-empty directory must fail";
  } catch (const OsError& error) {
    EXPECT_EQ(error.path(), dir.file("dest"));
  }
  EXPECT_FALSE(exists(dir.file("f.tmp")));
  EXPECT_EQ(read_file(dir.file("dest/inner")), "keep me");
}

TEST(FileSink, MissingDirectoryIsAnOsErrorNamingTheFolder) {
  ScratchDir dir;
  const std::string path = dir.file("missing/f.tmp");
  try {
    FileSink sink(path);
    FAIL() << "expected OsError";
  } catch (const OsError& error) {
    EXPECT_EQ(error.error_number(), ENOENT);
    EXPECT_EQ(error.path(), dir.file("missing/"));
    EXPECT_NE(std::string(error.what()).find("the folder does not exist"), std::string::npos);
    EXPECT_NE(std::string(error.what()).find(path), std::string::npos);
  }
}

TEST(FileSink, CreatesFilesWithTheUmaskApplied) {
  ScratchDir dir;
  const mode_t previous = ::umask(022);
  {
    FileSink sink(dir.file("f.tmp"));
    sink.close_and_keep(/*sync=*/false);
  }
  ::umask(previous);
  struct stat info {};
  ASSERT_EQ(::stat(dir.file("f.tmp").c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 0777, 0644u);
}

}  // namespace
}  // namespace trinity_stream_saver
