// The stream loop: pulls (name, tensor) items from a TensorSource into one
// TensorWriter until the source ends, in turn or overlapped. Shared by the
// single-file save and each file of a sharded save. Knows torch; nothing
// of Python.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>

#include <trinity_stream_saver/stream_saver.h>

#include "writer/tensor_writer.h"

namespace trinity_stream_saver {

// In turn (overlap false), each tensor is written, then released, before
// `next` is called again, so only one tensor is alive at a time. With
// overlap, a worker thread writes the tensors already yielded while `next`
// produces the next ones, with at most `max_queued_bytes` queued beyond the
// one being written (default: the writer's largest tensor), and `poll` runs
// while the caller waits for it. Does not close the writer.
void write_stream(const TensorSource& next, TensorWriter& writer, bool overlap,
                  std::optional<std::uint64_t> max_queued_bytes,
                  const std::function<void()>& poll);

}  // namespace trinity_stream_saver
