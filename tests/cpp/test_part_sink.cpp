#include "io/part_sink.h"

#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

#include <trinity_stream_saver/errors.h>

namespace trinity_stream_saver {
namespace {

// Parts handed off, copied, with their numbers; released at once unless
// the test holds them.
struct Recorder {
  std::vector<std::size_t> numbers;
  std::vector<std::string> parts;
  std::vector<std::size_t> held;
  bool hold = false;
  PartSink* sink = nullptr;

  PartSink::HandOff hand_off() {
    return [this](const Part& part) {
      numbers.push_back(part.number);
      parts.emplace_back(part.data, part.size);
      if (hold) {
        held.push_back(part.number);
      } else {
        sink->release(part.number, true);
      }
    };
  }
};

TEST(PartSink, CutsTheStreamIntoPartsInOrderWithAShortLastPart) {
  Recorder recorder;
  PartSink sink("s3://b/k", 4, 2, recorder.hand_off());
  recorder.sink = &sink;
  sink.append("abc", 3);
  sink.append("defghij", 7);
  sink.finish();
  EXPECT_EQ(recorder.numbers, (std::vector<std::size_t>{1, 2, 3}));
  EXPECT_EQ(recorder.parts, (std::vector<std::string>{"abcd", "efgh", "ij"}));
  EXPECT_EQ(sink.parts(), 3u);
}

TEST(PartSink, WaitsForAFreeBufferWhenEveryPartIsInFlight) {
  Recorder recorder;
  recorder.hold = true;
  PartSink sink("s3://b/k", 2, 2, recorder.hand_off());
  recorder.sink = &sink;
  sink.append("aabb", 4);  // two parts in flight: the pool is used up
  ASSERT_EQ(recorder.held.size(), 2u);
  std::thread uploader([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    sink.release(1, true);
  });
  sink.append("cc", 2);  // waits for part 1's buffer
  uploader.join();
  EXPECT_EQ(recorder.parts.back(), "cc");
  sink.release(2, true);
  sink.release(3, true);
  sink.finish();
}

TEST(PartSink, AFailedUploadFailsTheNextAppendNamingThePart) {
  Recorder recorder;
  recorder.hold = true;
  PartSink sink("s3://b/k", 2, 1, recorder.hand_off());
  recorder.sink = &sink;
  sink.append("aa", 2);
  sink.release(1, false);
  try {
    sink.append("bb", 2);
    FAIL() << "append after a failed upload did not throw";
  } catch (const OsError& error) {
    EXPECT_NE(std::string(error.what()).find("upload part 1"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("s3://b/k"), std::string::npos) << error.what();
  }
}

TEST(PartSink, PollCanStopAWaitForABuffer) {
  Recorder recorder;
  recorder.hold = true;
  int polls = 0;
  PartSink sink("s3://b/k", 1, 1, recorder.hand_off(), [&] {
    if (++polls == 2) throw ValueError("interrupted");
  });
  recorder.sink = &sink;
  sink.append("a", 1);
  EXPECT_THROW(sink.append("b", 1), ValueError);
  sink.release(1, true);  // the destructor waits for it
}

}  // namespace
}  // namespace trinity_stream_saver
