#include "writer/stream_loop.h"

#include "writer/background_writer.h"
#include "writer/released_memory.h"

namespace trinity_stream_saver {

namespace {

// Default mode: each tensor is written, then released, before the source
// is asked for the next one, so only one tensor is alive at a time.
void write_in_turn(const TensorSource& next, TensorWriter& writer) {
  for (;;) {
    std::optional<std::pair<std::string, at::Tensor>> item = next();
    if (!item) return;
    writer.write(item->first, item->second);
    release_tensor(item->second);  // before next() runs again
  }
}

// Overlap mode: a worker thread writes the tensors already yielded while
// the source produces the next ones.
void write_overlapped(const TensorSource& next, TensorWriter& writer,
                      std::uint64_t max_queued_bytes, const std::function<void()>& poll) {
  BackgroundWriter background(writer, max_queued_bytes, poll);
  for (;;) {
    std::optional<std::pair<std::string, at::Tensor>> item = next();
    if (!item) break;
    background.write(item->first, item->second);
    // What the saver still holds is in `background`.
    release_tensor(item->second);
  }
  background.finish();
}

}  // namespace

void write_stream(const TensorSource& next, TensorWriter& writer, bool overlap,
                  std::optional<std::uint64_t> max_queued_bytes,
                  const std::function<void()>& poll) {
  if (overlap) {
    write_overlapped(next, writer, max_queued_bytes.value_or(writer.largest_tensor()), poll);
  } else {
    write_in_turn(next, writer);
  }
}

}  // namespace trinity_stream_saver
