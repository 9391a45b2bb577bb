// What overlap mode (writer/background_writer) needs of the file it feeds,
// and nothing more: header entries made on the caller's thread, bytes
// appended in order on its worker thread. TensorWriter is the file; a test
// may stand in for it. Knows torch tensors; nothing of Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace trinity_stream_saver {

class OverlapTarget {
 public:
  virtual ~OverlapTarget() = default;

  // Checks `tensor` and records its header entry as the next in the file;
  // returns its size in bytes, which must be appended next. Throws
  // ValueError naming the tensor; a refused tensor leaves the file as it was.
  virtual std::uint64_t add(const std::string& name, const at::Tensor& tensor) = 0;

  // Appends bytes the saver owns (batches of small tensors, pieces put in
  // C order).
  virtual void append_owned(const void* data, std::size_t size) = 0;

  // Appends the bytes of tensor `name` from memory its producer owns, read
  // only by write(2), in chunks with `between_chunks` (which may throw, to
  // abandon the write) called between them: if the producer frees the
  // memory meanwhile, this throws ValueError naming the tensor instead of
  // crashing.
  virtual void append_foreign(const std::string& name, const void* data, std::size_t size,
                              const std::function<void()>& between_chunks) = 0;
};

}  // namespace trinity_stream_saver
