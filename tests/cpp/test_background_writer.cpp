#include "writer/background_writer.h"
#include "writer/tensor_writer.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <trinity_stream_saver/errors.h>
#include "test_support.h"

namespace trinity_stream_saver {
namespace {

using testing::exists;
using testing::read_file;
using testing::ScratchDir;

constexpr std::int64_t kLarge = static_cast<std::int64_t>(kInlineBytes);  // bytes, as U8

// Large and small tensors interleaved, so that jobs reach the worker
// thread and small ones go through batches between them.
std::vector<std::pair<TensorMeta, at::Tensor>> mixed_stream(int count) {
  std::vector<std::pair<TensorMeta, at::Tensor>> items;
  for (int i = 0; i < count; ++i) {
    const std::int64_t size = i % 2 == 0 ? kLarge + i : 100 + i;
    items.push_back({{"t" + std::to_string(i), "U8", {size}},
                     at::full({size}, i, at::kByte)});
  }
  return items;
}

std::vector<TensorMeta> meta_of(const std::vector<std::pair<TensorMeta, at::Tensor>>& items) {
  std::vector<TensorMeta> meta;
  for (const auto& item : items) meta.push_back(item.first);
  return meta;
}

TEST(BackgroundWriter, WritesTheSameFileAsTheWriterAloneForInterleavedSizes) {
  ScratchDir dir;
  auto items = mixed_stream(9);
  items.push_back({{"transposed", "I32", {600, 700}}, at::arange(420000, at::kInt).view({700, 600}).t()});
  const std::vector<TensorMeta> meta = meta_of(items);
  {
    TensorWriter direct(dir.file("direct.tmp"), meta, std::nullopt);
    for (const auto& [row, tensor] : items) direct.write(row.name, tensor);
    direct.close_and_keep(/*sync=*/false);
  }
  for (const std::uint64_t queue : {std::uint64_t{0}, std::uint64_t{1} << 30}) {
    const std::string path = dir.file("background" + std::to_string(queue) + ".tmp");
    TensorWriter writer(path, meta, std::nullopt);
    BackgroundWriter background(writer, queue, {});
    for (const auto& [row, tensor] : items) background.write(row.name, tensor);
    background.finish();
    writer.close_and_keep(/*sync=*/false);
    EXPECT_EQ(read_file(path), read_file(dir.file("direct.tmp"))) << queue;
  }
}

// An OverlapTarget that keeps the bytes in memory: overlap mode needs
// nothing of a file but these three calls.
class BytesTarget final : public OverlapTarget {
 public:
  std::uint64_t add(const std::string& name, const at::Tensor& tensor) override {
    names.push_back(name);
    return static_cast<std::uint64_t>(tensor.numel()) * tensor.element_size();
  }
  void append_owned(const void* data, std::size_t size) override {
    bytes.append(static_cast<const char*>(data), size);
  }
  void append_foreign(const std::string& name, const void* data, std::size_t size,
                      const std::function<void()>& /*between_chunks*/) override {
    foreign_names.push_back(name);
    bytes.append(static_cast<const char*>(data), size);
  }
  std::vector<std::string> names;          // the caller's thread's
  std::vector<std::string> foreign_names;  // the worker's, read after finish()
  std::string bytes;                       // the worker's, read after finish()
};

std::string c_order_bytes(const at::Tensor& tensor) {
  const at::Tensor contiguous = tensor.contiguous();
  return std::string(static_cast<const char*>(contiguous.const_data_ptr()),
                     contiguous.numel() * contiguous.element_size());
}

TEST(BackgroundWriter, AppendsEveryTensorInOrderThroughItsOverlapTarget) {
  auto items = mixed_stream(5);
  items.push_back({{"transposed", "I32", {600, 700}}, at::arange(420000, at::kInt).view({700, 600}).t()});
  BytesTarget target;
  std::string expected;
  std::vector<std::string> names;
  {
    BackgroundWriter background(target, 0, {});
    for (const auto& [row, tensor] : items) {
      background.write(row.name, tensor);
      expected += c_order_bytes(tensor);
      names.push_back(row.name);
    }
    background.finish();
  }
  EXPECT_EQ(target.names, names);
  EXPECT_TRUE(target.bytes == expected);
  // Only the large tensors in C order are written from their own memory.
  EXPECT_EQ(target.foreign_names, (std::vector<std::string>{"t0", "t2", "t4"}));
}

TEST(BackgroundWriter, HoldsOnlyLargeTensorsInCOrder) {
  ScratchDir dir;
  const std::vector<TensorMeta> meta{{"small", "U8", {10}},
                                     {"transposed", "I32", {1024, 512}},
                                     {"large", "U8", {kLarge}}};
  TensorWriter writer(dir.file("f.tmp"), meta, std::nullopt);
  BackgroundWriter background(writer, std::uint64_t{1} << 30, {});
  background.write("small", at::zeros({10}, at::kByte));
  background.write("transposed", at::zeros({512, 1024}, at::kInt).t());
  EXPECT_EQ(background.held_tensors(), 0u);  // both copied into the saver's memory
  background.write("large", at::zeros({kLarge}, at::kByte));
  background.finish();
  EXPECT_EQ(background.held_tensors(), 0u);  // released once written
}

TEST(BackgroundWriter, RefusesABadTensorOnTheCallersThreadAtOnce) {
  ScratchDir dir;
  TensorWriter writer(dir.file("f.tmp"), {{"t0", "U8", {kLarge}}}, std::nullopt);
  BackgroundWriter background(writer, 0, {});
  EXPECT_THROW(background.write("t0", at::zeros({kLarge}, at::kComplexDouble)), ValueError);
}

TEST(BackgroundWriter, ReportsATensorModifiedInPlaceWhileHeld) {
  ScratchDir dir;
  const std::int64_t size = std::int64_t{256} << 20;  // takes far longer to write than to queue
  TensorWriter writer(dir.file("f.tmp"), {{"a", "U8", {size}}, {"b", "U8", {size}}}, std::nullopt);
  BackgroundWriter background(writer, std::uint64_t{1} << 40, {});
  at::Tensor buffer = at::zeros({size}, at::kByte);
  background.write("a", buffer);
  buffer.fill_(1);  // reused while "a" is still being written
  try {
    background.write("b", at::zeros({size}, at::kByte));
    background.finish();
    FAIL() << "no error";
  } catch (const ValueError& error) {
    EXPECT_NE(std::string(error.what()).find("'a' was modified in place"), std::string::npos)
        << error.what();
  }
}

TEST(BackgroundWriter, TakesBackEveryWrittenTensorWhenOneWasModified) {
  ScratchDir dir;
  const std::int64_t size = std::int64_t{128} << 20;
  TensorWriter writer(dir.file("f.tmp"), {{"a", "U8", {size}}, {"b", "U8", {size}}}, std::nullopt);
  BackgroundWriter background(writer, std::uint64_t{1} << 40, {});
  at::Tensor a = at::zeros({size}, at::kByte);
  at::Tensor b = at::zeros({size}, at::kByte);
  try {
    background.write("a", a);
    background.write("b", b);
    a.fill_(1);  // both reused while queued or being written
    b.fill_(1);
    background.finish();
    FAIL() << "no error";
  } catch (const ValueError& error) {
    // 'a', unless it was written and taken back before it was modified.
    EXPECT_NE(std::string(error.what()).find("was modified in place"), std::string::npos)
        << error.what();
  }
  EXPECT_EQ(background.held_tensors(), 0u);
}

TEST(BackgroundWriter, RunsTheWaitHookWhileTheWorkerIsBusyAndLetsItStopTheWait) {
  ScratchDir dir;
  // 1 GiB from a tensor in C order: far longer than one wait slice.
  const std::int64_t size = std::int64_t{1} << 30;
  TensorWriter writer(dir.file("f.tmp"), {{"big", "U8", {size}}}, std::nullopt);
  int waits = 0;
  struct Stop {};
  BackgroundWriter background(writer, 0, [&] {
    ++waits;
    throw Stop{};
  });
  background.write("big", at::zeros({size}, at::kByte));
  EXPECT_THROW(background.finish(), Stop);
  EXPECT_EQ(waits, 1);
}

TEST(BackgroundWriter, DestroyedMidWriteAbandonsTheFile) {
  ScratchDir dir;
  const std::int64_t size = std::int64_t{512} << 20;
  {
    TensorWriter writer(dir.file("f.tmp"), {{"big", "U8", {size}}}, std::nullopt);
    BackgroundWriter background(writer, 0, {});
    background.write("big", at::zeros({size}, at::kByte));
  }  // cancels the write at its next chunk, then removes the file
  EXPECT_FALSE(exists(dir.file("f.tmp")));
}

}  // namespace
}  // namespace trinity_stream_saver
