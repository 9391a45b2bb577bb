#include "writer/stream_loop.h"

#include "writer/background_writer.h"

namespace trinity_stream_saver {

namespace {

void write_in_turn(const TensorSource& next, TensorWriter& writer) {
  for (;;) {
    std::optional<std::pair<std::string, at::Tensor>> item = next();
    if (!item) return;
    writer.write(item->first, item->second);
  }  // `item` is released here, before next() runs again.
}

void write_overlapped(const TensorSource& next, TensorWriter& writer,
                      const std::function<void()>& poll) {
  BackgroundWriter background(writer, poll);
  at::Tensor finished;
  for (;;) {
    std::optional<std::pair<std::string, at::Tensor>> item = next();
    if (!item) break;
    background.write(std::move(item->first), std::move(item->second), &finished);
    finished.reset();
  }
  background.finish(&finished);
}

}  // namespace

void write_stream(const TensorSource& next, TensorWriter& writer, bool overlap,
                  const std::function<void()>& poll) {
  if (overlap) {
    write_overlapped(next, writer, poll);
  } else {
    write_in_turn(next, writer);
  }
}

}  // namespace trinity_stream_saver
