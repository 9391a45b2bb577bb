// The stream loop: pulls (name, tensor) items from a TensorSource into one
// TensorWriter until the source ends, in turn or overlapped. Shared by the
// single-file save and each file of a sharded save. Knows torch; nothing
// of Python.
#pragma once

#include <functional>

#include <trinity_stream_saver/stream_saver.h>

#include "writer/tensor_writer.h"

namespace trinity_stream_saver {

// In turn (overlap false), each tensor is written, then released, before
// `next` is called again, so only one tensor is alive at a time. With
// overlap, a thread writes tensor k while `next` produces tensor k+1, and
// `poll` runs while the caller waits for it. Does not close the writer.
void write_stream(const TensorSource& next, TensorWriter& writer, bool overlap,
                  const std::function<void()>& poll);

}  // namespace trinity_stream_saver
