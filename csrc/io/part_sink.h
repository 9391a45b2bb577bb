// A sequential sink that cuts the byte stream into parts of a fixed size,
// the parts of a multipart upload, and hands each filled part to an
// uploader. Part buffers come from a bounded pool: when every buffer is
// still being uploaded, append() waits, so memory stays at
// max_parts * part_size however large the object. Knows nothing of torch,
// Python or the object store; the uploader (given by the caller) does.
//
// Why parts and not a stream: an object store takes an object in parts
// that upload independently and in parallel, so that the upload of part k
// runs while the writer fills part k + 1; the object exists only once the
// caller completes the upload, which this class knows nothing of.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "io/sequential_sink.h"

namespace trinity_stream_saver {

// One filled part: its 1-based number in the object and its bytes, which
// stay valid until the uploader calls PartSink::release(number).
struct Part {
  std::size_t number;
  const char* data;
  std::size_t size;
};

class PartSink final : public SequentialSink {
 public:
  // Called on the writing thread with each filled part, in order. It should
  // queue the upload and return; whoever uploads the part calls release()
  // once done with its memory. If it throws, the part is taken back and the
  // exception propagates from append() or finish().
  using HandOff = std::function<void(const Part&)>;

  // `destination` names the object in error messages. `poll` runs every
  // few milliseconds while append() waits for a free buffer (the bindings
  // check for Ctrl-C there); it may throw to stop the wait.
  PartSink(std::string destination, std::size_t part_size, std::size_t max_parts,
           HandOff hand_off, std::function<void()> poll = {});

  // Waits until the uploader has released every part handed off, since it
  // reads their memory (whether the save succeeded or not).
  ~PartSink() override;

  PartSink(const PartSink&) = delete;
  PartSink& operator=(const PartSink&) = delete;

  void append(const void* data, std::size_t size) override;

  // Hands off the last part (shorter than part_size; an object of zero
  // bytes has no part) and waits until every part is released. Throws
  // OsError (EIO) naming the destination and part if an upload failed.
  void finish();

  // Called by the uploader, from any thread, once it no longer reads part
  // `number`; `uploaded` false if its upload failed for good, after which
  // every append() and finish() throws. Exactly once per part.
  void release(std::size_t number, bool uploaded);

  // Waits, without polling, until the uploader has released every part
  // handed off (after a failure, before the upload is aborted).
  void wait_until_released();

  // Parts handed off so far.
  std::size_t parts() const noexcept { return next_number_ - 1; }

 private:
  // Returns a free buffer, allocating one while fewer than max_parts exist,
  // else waiting for a release. Throws if an upload failed.
  char* take_buffer();
  void hand_off_current();
  // Throws OsError if an upload has failed. Requires mutex_ held.
  void throw_if_failed_locked() const;

  const std::string destination_;
  const std::size_t part_size_;
  const std::size_t max_parts_;
  const HandOff hand_off_;
  const std::function<void()> poll_;

  std::mutex mutex_;
  std::condition_variable released_;
  std::vector<std::unique_ptr<char[]>> buffers_;  // owned, at most max_parts_
  std::vector<char*> free_;                        // of buffers_, not in flight
  std::map<std::size_t, char*> in_flight_;         // part number -> buffer
  std::size_t failed_part_ = 0;                    // first part that failed, 0 if none

  // Touched only by the writing thread.
  char* current_ = nullptr;  // the part being filled
  std::size_t filled_ = 0;
  std::size_t next_number_ = 1;
};

}  // namespace trinity_stream_saver
