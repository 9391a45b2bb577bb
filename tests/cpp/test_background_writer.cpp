#include "writer/background_writer.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include <trinity_stream_saver/errors.h>
#include "test_support.h"

namespace trinity_stream_saver {
namespace {

using testing::exists;
using testing::read_file;
using testing::ScratchDir;

std::vector<TensorMeta> meta_for(int count, std::int64_t size) {
  std::vector<TensorMeta> meta;
  for (int i = 0; i < count; ++i) meta.push_back({"t" + std::to_string(i), "I32", {size}});
  return meta;
}

TEST(BackgroundWriter, WritesTheSameFileAsTheWriterAlone) {
  ScratchDir dir;
  const std::vector<TensorMeta> meta = meta_for(5, 1000);
  {
    TensorWriter direct(dir.file("direct.tmp"), meta, std::nullopt);
    for (int i = 0; i < 5; ++i) direct.write(meta[i].name, at::full({1000}, i, at::kInt));
    direct.close_and_keep(/*sync=*/false);
  }
  {
    TensorWriter writer(dir.file("background.tmp"), meta, std::nullopt);
    BackgroundWriter background(writer, {});
    at::Tensor finished;
    for (int i = 0; i < 5; ++i) {
      background.write(meta[i].name, at::full({1000}, i, at::kInt), &finished);
    }
    background.finish(&finished);
    writer.close_and_keep(/*sync=*/false);
  }
  EXPECT_EQ(read_file(dir.file("background.tmp")), read_file(dir.file("direct.tmp")));
}

TEST(BackgroundWriter, GivesEachWrittenTensorBackToTheCaller) {
  ScratchDir dir;
  const std::vector<TensorMeta> meta = meta_for(2, 10);
  TensorWriter writer(dir.file("f.tmp"), meta, std::nullopt);
  BackgroundWriter background(writer, {});
  const at::Tensor first = at::zeros({10}, at::kInt);
  at::Tensor finished;
  background.write("t0", first, &finished);
  EXPECT_FALSE(finished.defined());  // nothing was written before
  background.write("t1", at::ones({10}, at::kInt), &finished);
  EXPECT_TRUE(finished.is_same(first));
  background.finish(&finished);
  EXPECT_TRUE(finished.defined());
}

TEST(BackgroundWriter, RethrowsTheWorkersErrorAtTheNextCall) {
  ScratchDir dir;
  TensorWriter writer(dir.file("f.tmp"), meta_for(2, 1 << 18), std::nullopt);
  BackgroundWriter background(writer, {});
  at::Tensor finished;
  // Large enough to be handed to the worker; a dtype it must refuse.
  background.write("t0", at::zeros({1 << 18}, at::kComplexDouble), &finished);
  EXPECT_THROW(background.finish(&finished), ValueError);
}

TEST(BackgroundWriter, WritesSmallTensorsOnTheCallersThreadAndThrowsAtOnce) {
  ScratchDir dir;
  TensorWriter writer(dir.file("f.tmp"), meta_for(2, 10), std::nullopt);
  BackgroundWriter background(writer, {});
  at::Tensor finished;
  EXPECT_THROW(background.write("t0", at::zeros({10}, at::kComplexDouble), &finished),
               ValueError);
}

TEST(BackgroundWriter, RunsTheWaitHookWhileTheWorkerIsBusyAndLetsItStopTheWait) {
  ScratchDir dir;
  // 1 GiB through the staging buffer: far longer than one wait slice.
  const std::int64_t size = std::int64_t{1} << 30;
  TensorWriter writer(dir.file("f.tmp"), {{"big", "U8", {size}}}, std::nullopt);
  int waits = 0;
  struct Stop {};
  BackgroundWriter background(writer, [&] {
    ++waits;
    throw Stop{};
  });
  at::Tensor finished;
  background.write("big", at::zeros({1}, at::kByte).expand({size}), &finished);
  EXPECT_THROW(background.finish(&finished), Stop);
  EXPECT_EQ(waits, 1);
}

TEST(BackgroundWriter, DestroyedMidWriteAbandonsTheFile) {
  ScratchDir dir;
  const std::int64_t size = std::int64_t{512} << 20;
  {
    TensorWriter writer(dir.file("f.tmp"), {{"big", "U8", {size}}}, std::nullopt);
    BackgroundWriter background(writer, {});
    at::Tensor finished;
    background.write("big", at::zeros({1}, at::kByte).expand({size}), &finished);
  }  // cancels the write at its next chunk, then removes the file
  EXPECT_FALSE(exists(dir.file("f.tmp")));
}

}  // namespace
}  // namespace trinity_stream_saver
