// Where a writer that never seeks puts its bytes: strictly in order, from
// the first byte of the file to the last. The file sink is one; the part
// sink (io/part_sink.h), which feeds an object store's multipart upload,
// is another. Knows nothing of torch, Python or any transport.
#pragma once

#include <cstddef>

namespace trinity_stream_saver {

class SequentialSink {
 public:
  virtual ~SequentialSink() = default;

  // Appends `size` bytes, copied or written before this returns: the
  // caller may reuse or free `data` afterwards.
  virtual void append(const void* data, std::size_t size) = 0;
};

}  // namespace trinity_stream_saver
