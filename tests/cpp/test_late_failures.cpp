// The system calls that fail after the data is written (fdatasync, close,
// rename, the directory's fsync), made to fail through the io layer's
// system-call table: each gives an OsError naming the path, and leaves the
// destination untouched unless the rename already happened.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <string>

#include <trinity_stream_saver/errors.h>
#include <trinity_stream_saver/stream_saver.h>

#include "io/durability.h"
#include "io/file_sink.h"
#include "io/system_calls.h"
#include "writer/tensor_writer.h"
#include "test_support.h"

namespace trinity_stream_saver {
namespace {

using testing::exists;
using testing::read_file;
using testing::safetensors_file;
using testing::ScratchDir;
using testing::write_file;

// The errno each faked call fails with (0: the real call).
int fsync_errno = 0;
int fdatasync_errno = 0;
int close_errno = 0;
int rename_errno = 0;

int failing_fsync(int fd) {
  if (fsync_errno == 0) return ScopedSystemCalls::real().fsync(fd);
  errno = fsync_errno;
  return -1;
}
int failing_fdatasync(int fd) {
  if (fdatasync_errno == 0) return ScopedSystemCalls::real().fdatasync(fd);
  errno = fdatasync_errno;
  return -1;
}
// A failing close() still closes the descriptor, as Linux does.
int failing_close(int fd) {
  const int result = ScopedSystemCalls::real().close(fd);
  if (close_errno == 0) return result;
  errno = close_errno;
  return -1;
}
int failing_rename(const char* from, const char* to) {
  if (rename_errno == 0) return ScopedSystemCalls::real().rename(from, to);
  errno = rename_errno;
  return -1;
}

constexpr SystemCalls kFailing{.write = ::write,
                               .pwrite = ::pwrite,
                               .fsync = failing_fsync,
                               .fdatasync = failing_fdatasync,
                               .close = failing_close,
                               .rename = failing_rename};

// Installs the failing calls for one test; every call is real until the
// test sets its errno.
class LateFailure : public ::testing::Test {
 protected:
  void SetUp() override { fsync_errno = fdatasync_errno = close_errno = rename_errno = 0; }
  void TearDown() override { fsync_errno = fdatasync_errno = close_errno = rename_errno = 0; }

  // Saves one tensor to `path` through the public API; the OsError it throws.
  OsError failed_save(const std::string& path, bool rename, bool fsync) {
    const at::Tensor tensor = at::arange(4, at::kInt);
    bool given = false;
    SaveOptions options;
    options.rename = rename;
    options.fsync = fsync;
    try {
      save_safetensors_streaming(
          [&]() -> std::optional<std::pair<std::string, at::Tensor>> {
            if (given) return std::nullopt;
            given = true;
            return std::make_pair(std::string("t"), tensor);
          },
          path, {tensor_meta("t", tensor)}, options);
    } catch (const OsError& error) {
      return error;
    }
    ADD_FAILURE() << "the save succeeded";
    return OsError(0, "", "");
  }

  ScratchDir dir_;
  const ScopedSystemCalls failing_{kFailing};
};

TEST_F(LateFailure, FdatasyncErrorFailsTheSaveRemovesTheTempAndKeepsTheDestination) {
  write_file(dir_.file("f"), "old");
  fdatasync_errno = EIO;
  const OsError error = failed_save(dir_.file("f"), /*rename=*/true, /*fsync=*/true);
  EXPECT_EQ(error.error_number(), EIO);
  EXPECT_EQ(error.path(), dir_.file("f.tmp"));
  EXPECT_FALSE(exists(dir_.file("f.tmp")));
  EXPECT_EQ(read_file(dir_.file("f")), "old");
}

TEST_F(LateFailure, CloseErrorFailsTheSaveRemovesTheTempAndKeepsTheDestination) {
  write_file(dir_.file("f"), "old");
  close_errno = EIO;
  const OsError error = failed_save(dir_.file("f"), /*rename=*/true, /*fsync=*/false);
  EXPECT_EQ(error.error_number(), EIO);
  EXPECT_EQ(error.path(), dir_.file("f.tmp"));
  close_errno = 0;
  EXPECT_FALSE(exists(dir_.file("f.tmp")));
  EXPECT_EQ(read_file(dir_.file("f")), "old");
}

TEST_F(LateFailure, RenameErrorFailsTheSaveRemovesTheTempAndKeepsTheDestination) {
  for (const int code : {EXDEV, EACCES}) {
    write_file(dir_.file("f"), "old");
    rename_errno = code;
    const OsError error = failed_save(dir_.file("f"), /*rename=*/true, /*fsync=*/true);
    EXPECT_EQ(error.error_number(), code);
    EXPECT_EQ(error.path(), dir_.file("f"));
    EXPECT_NE(std::string(error.what()).find(dir_.file("f.tmp")), std::string::npos);
    EXPECT_FALSE(exists(dir_.file("f.tmp")));
    EXPECT_EQ(read_file(dir_.file("f")), "old");
  }
}

TEST_F(LateFailure, DirectorySyncErrorAfterTheRenameSaysTheFileIsInPlace) {
  write_file(dir_.file("f"), "old");
  fsync_errno = EIO;
  const OsError error = failed_save(dir_.file("f"), /*rename=*/true, /*fsync=*/true);
  EXPECT_EQ(error.error_number(), EIO);
  EXPECT_EQ(error.path(), dir_.path());
  EXPECT_NE(std::string(error.what()).find("the new file is in place"), std::string::npos)
      << error.what();
  EXPECT_FALSE(exists(dir_.file("f.tmp")));
  EXPECT_NE(read_file(dir_.file("f")), "old");
}

TEST_F(LateFailure, FdatasyncErrorOfARenameFalseSaveRemovesTheTemp) {
  fdatasync_errno = EIO;
  const OsError error = failed_save(dir_.file("f"), /*rename=*/false, /*fsync=*/true);
  EXPECT_EQ(error.error_number(), EIO);
  EXPECT_FALSE(exists(dir_.file("f.tmp")));
  EXPECT_FALSE(exists(dir_.file("f")));
}

// finalize() works on the caller's finished file: a failure keeps it.
TEST_F(LateFailure, FinalizeKeepsTheTempFileWhenSyncOrRenameFails) {
  for (int* failing : {&fdatasync_errno, &rename_errno}) {
    write_file(dir_.file("f"), "old");
    write_file(dir_.file("f.tmp"), safetensors_file("new"));
    *failing = (failing == &rename_errno) ? EXDEV : EIO;
    EXPECT_THROW(finalize(dir_.file("f.tmp"), dir_.file("f"), /*fsync=*/true), OsError);
    *failing = 0;
    EXPECT_EQ(read_file(dir_.file("f.tmp")), safetensors_file("new"));
    EXPECT_EQ(read_file(dir_.file("f")), "old");
  }
}

TEST_F(LateFailure, TensorWriterRefusesToCloseAgainAfterAFailedClose) {
  fdatasync_errno = EIO;
  TensorWriter writer(dir_.file("f.tmp"), {{"t", "I32", {4}}}, std::nullopt);
  writer.write("t", at::arange(4, at::kInt));
  EXPECT_THROW(writer.close_and_rename(dir_.file("f"), /*sync=*/true), OsError);
  // A second fdatasync could succeed without the data being on disk: the
  // writer must not try again.
  fdatasync_errno = 0;
  EXPECT_THROW(writer.close_and_rename(dir_.file("f"), /*sync=*/true), ValueError);
  EXPECT_FALSE(exists(dir_.file("f")));
}

}  // namespace
}  // namespace trinity_stream_saver
