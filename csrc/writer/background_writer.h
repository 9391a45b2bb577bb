// Overlap mode: a thread that writes queued tensors while the caller
// produces the next ones. Knows torch tensors and the file only as an
// OverlapTarget (writer/overlap_target.h); nothing of Python.
//
// What the caller's thread does for each tensor: checks it and makes its
// header entry (so bad input fails at once); copies a small tensor (below
// kInlineBytes) into a batch of the saver's own memory, and a non-C-order
// one into pieces of the saver's own memory; queues a large C-order tensor
// as it is. The worker writes the batches and pieces, and reads the
// producer's memory only through write(2), so a producer that frees a
// queued tensor gets an error, never a crash.
//
// Memory contract: the bytes queued beyond the job being written stay at
// or below `max_queued_bytes` (a job larger than that waits until the
// worker is idle). A tensor of the producer is held from write() until the
// worker has written it; every tensor written is released before write()
// returns, so while the caller produces the next tensor, the saver holds
// the producer's tensors only as the job being written and the queue.
//
// Reused buffers: a held tensor that changes under the saver (modified in
// place, which bumps its version counter, or its storage freed or resized)
// is reported as a ValueError naming it when it is released, so a producer
// that refills a buffer too early gets an error instead of a wrong file.
// Tensors are released on the caller's thread: dropping the last reference
// to a tensor that Python created may need the GIL.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <trinity_stream_saver/stream_saver.h>

#include "writer/overlap_target.h"

namespace trinity_stream_saver {

// Tensors smaller than this many bytes are copied into the saver's memory
// as they are yielded (and never held): handing each over costs more than
// the copy.
inline constexpr std::size_t kInlineBytes = std::size_t{1} << 20;

class BackgroundWriter final {
 public:
  // How often a waiting caller runs `while_waiting` (e.g. to notice Ctrl-C).
  static constexpr std::chrono::milliseconds kWaitSlice{50};

  // Tensors smaller than kInlineBytes are copied on the
  // caller's thread into batches of up to this size: handing each over
  // costs more than the copy, and the producer may reuse their memory at once.
  static constexpr std::size_t kBatchBytes = std::size_t{4} << 20;

  // Tensors not in C order are put in C order in pieces of at most this
  // size, each a job of its own: they cost at most this much memory each.
  static constexpr std::size_t kPieceBytes = std::size_t{32} << 20;

  // Starts the worker. `target` must outlive this object. `while_waiting`
  // runs on the caller's thread, without the lock, while write() or
  // finish() waits and between pieces it copies; whatever it throws
  // propagates.
  BackgroundWriter(OverlapTarget& target, std::uint64_t max_queued_bytes,
                   std::function<void()> while_waiting);

  // Stops the worker (a write in progress is abandoned at its next chunk),
  // waits for it and releases every tensor still held.
  ~BackgroundWriter();

  BackgroundWriter(const BackgroundWriter&) = delete;
  BackgroundWriter& operator=(const BackgroundWriter&) = delete;

  // Checks `tensor`, queues its bytes (waiting while the queue is full) and
  // releases the tensors written so far. Rethrows the worker's error.
  void write(const std::string& name, const at::Tensor& tensor);

  // Queues what is left, waits for every byte to be written and releases
  // every tensor. Rethrows the worker's error.
  void finish();

  // How many of the producer's tensors the saver holds now (for tests).
  std::size_t held_tensors() const noexcept { return held_; }

 private:
  // Memory the saver owns: a batch of small tensors or a piece of one.
  struct Buffer {
    std::unique_ptr<char[]> data;
    std::size_t capacity = 0;
  };
  // The producer's tensor as it was queued, to tell whether it changed.
  struct Held {
    std::string name;
    at::Tensor tensor;
    const void* storage_data = nullptr;
    std::size_t storage_bytes = 0;
    std::int64_t version = -1;  // -1: an inference tensor, which has none
  };
  struct Job {
    const char* data = nullptr;
    std::size_t size = 0;
    Buffer owned;  // the bytes, when the saver owns them
    Held held;     // the tensor, when the bytes are the producer's
  };

  void run();
  void submit(Job job);
  void submit_batch();
  Buffer take_buffer(std::size_t size);
  void wait(std::unique_lock<std::mutex>& lock, const std::function<bool()>& done);
  // Takes back the written jobs: checks and drops their tensors, keeps
  // their buffers for reuse, rethrows the worker's error.
  void collect();
  static void check_unchanged(const Held& held);

  OverlapTarget& target_;
  const std::uint64_t max_queued_bytes_;
  const std::function<void()> while_waiting_;

  // The caller's thread only.
  Buffer batch_;
  std::size_t batch_used_ = 0;
  std::vector<Buffer> spare_;
  std::size_t held_ = 0;  // the producer's tensors in jobs not yet taken back

  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Job> queue_;              // handed over, not yet being written
  std::uint64_t queued_bytes_ = 0;     // bytes in queue_
  bool writing_ = false;               // the worker holds a job
  std::vector<Job> written_;           // written, not yet taken back
  std::exception_ptr error_;
  std::atomic<bool> stopping_{false};
  std::thread worker_;                 // last: started once the rest is ready
};

}  // namespace trinity_stream_saver
